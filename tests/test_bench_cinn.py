"""The benchmark command ``python -m eval.bench_cinn`` (plain, torch.compile'd and bf16-autocast cINN)."""
import json

import pytest
import torch

from eval import bench_cinn as bench

TINY_PAPER = dict(latent_dim=8, cond_shape=[12], embed_dim=6, n_flows=2, hidden=16, depth=2, embedder_depth=2)


def test_bench_runs_end_to_end(tmp_path, monkeypatch):
    """Every section on CPU, with the paper size shrunk to seconds."""
    monkeypatch.setitem(bench.SIZES, "paper", TINY_PAPER)
    monkeypatch.setitem(bench.SIZES, "small", TINY_PAPER)
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    res = bench.main(["--devices", "cpu", "--batches", "4,8", "--repeats", "2", "--warmup", "1", "--paths", "plain,bf16",
                      "--demo-sizes", "paper", "--parity-steps", "24", "--parity-batch", "8",
                      "--markdown", str(md), "--json", str(js)])
    assert {r["path"] for r in res["demo"]} == {"plain", "bf16"}
    plain_demo = next(r for r in res["demo"] if r["path"] == "plain")
    bf16_demo = next(r for r in res["demo"] if r["path"] == "bf16")
    assert plain_demo["rel_err"] == 0 and plain_demo["ms"] > 0 and 0 < bf16_demo["rel_err"] < 0.1
    assert bf16_demo["dtype"] == "bfloat16"  # bf16 autocast runs on this CPU (also with ONEDNN_MAX_CPU_ISA=AVX2)
    assert {(r["batch"], r["path"]) for r in res["train"]} == {(b, q) for b in (4, 8) for q in ("plain", "bf16")}
    assert all(r["tflops"] > 0 and r["steps_per_s"] > 0 and r["cpu_ms"] > 0 for r in res["train"])
    assert {(r["batch"], r["path"]) for r in res["sample"]} == {(b, q) for b in (4, 8) for q in ("plain", "bf16")}
    (p,) = res["parity"]
    assert p["path"] == "bf16" and p["noise_path"] == "plain" and p["steps"] == 24
    assert p["final"]["plain"] < p["first"]  # it learns
    text = md.read_text()
    assert "Command: `python -m eval.bench_cinn" in text and "NLL parity" in text and "| cpu |" in text
    assert json.loads(js.read_text())["env"]["torch"] == torch.__version__


def test_compiled_path_matches_plain(monkeypatch):
    """torch.compile of the plain module: the same samples (float rounding) and the same training loss."""
    monkeypatch.setitem(bench.SIZES, "small", TINY_PAPER)
    cpu = torch.device("cpu")
    model = bench.build("small", cpu)
    compiled = bench.for_path(model, "compiled")
    z = torch.randn(2, 12)
    with torch.no_grad():
        a = model.sample(z, n=3, generator=torch.Generator().manual_seed(0))
        b = compiled.sample(z, n=3, generator=torch.Generator().manual_seed(0))
    assert (a - b).abs().max() < 1e-5
    assert set(compiled.state_dict()) == set(model.state_dict())
    zbar = torch.randn(4, 8)
    losses = [bench.make_step(model, k, cpu, 1e-3)(zbar, z[:1].expand(4, -1)) for k in ("plain", "compiled")]
    assert abs(losses[0].item() - losses[1].item()) < 1e-4


def test_bf16_probe_falls_back_with_a_warning(monkeypatch):
    """Where a bf16 matmul fails, the bf16 path runs in fp32 and says why in one line."""
    monkeypatch.setattr(bench, "_BF16_OK", {})

    def broken(*args, **kwargs):
        raise RuntimeError("bf16 path needs avx512bw\nmore detail")

    monkeypatch.setattr(torch, "autocast", broken)
    with pytest.warns(UserWarning, match="bf16 matmuls fail on cpu \\(bf16 path needs avx512bw\\); the bf16 path runs in fp32"):
        assert bench.dtype_name("bf16", torch.device("cpu")) == "float32"
    assert isinstance(bench.autocast("bf16", torch.device("cpu")), type(bench.contextlib.nullcontext()))


def test_bench_flop_count_matches_the_architecture():
    model = bench.build("small", torch.device("cpu"))
    flops = bench.count_step_flops(model, 4, torch.device("cpu"))
    s = bench.SIZES["small"]
    # flow: per subnet (in -> H, depth x H -> H, H -> out), x 4 subnets per block; embedder linears
    d, e, h = s["latent_dim"], s["embed_dim"], s["hidden"]
    subnet = (d // 2 + e) * h + s["depth"] * h * h + h * (d - d // 2)
    emb = sum(m.in_features * m.out_features for m in model.embedder.modules() if isinstance(m, torch.nn.Linear))
    forward = 2 * 4 * (s["n_flows"] * 4 * subnet + emb)
    assert forward * 2 < flops <= forward * 3  # backward adds about 2x (no input-gradient for the first layer)


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="sections"):
        bench.main(["--devices", "cpu", "--sections", "nope"])
    with pytest.raises(SystemExit, match="batches"):
        bench.main(["--devices", "cpu", "--batches", "a,b"])
    with pytest.raises(SystemExit, match="device"):
        bench.main(["--devices", "tpu"])
    with pytest.raises(SystemExit, match="paths"):
        bench.main(["--devices", "cpu", "--paths", "plain,turbo"])
    with pytest.raises(ValueError, match="unknown path"):
        bench.make_step(bench.build("small", torch.device("cpu")), "turbo", torch.device("cpu"), 1e-3)
