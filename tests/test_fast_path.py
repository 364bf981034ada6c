"""The fast path (issue 6): same parameters, same state dict, same numbers as the plain path."""
import copy
import io
import json

import pytest
import torch

from invint_hub.cinn import INN, ConditionalINN
from invint_hub.flows import ActNorm, Flow, fast_path, set_fast_path

RTOL = 1e-5  # relative parity (fp32) asked by the issue


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _randomized_flow(dim, cond, n_flows=3, hidden=16, depth=2, seed=0):
    torch.manual_seed(seed)
    flow = Flow(dim, cond, n_flows=n_flows, hidden=hidden, depth=depth)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    for m in flow.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(1)
    return flow


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("dim,cond,depth", [(6, 3, 2), (7, 3, 1), (8, 0, 0), (5, 4, 2)])
@pytest.mark.parametrize("batch", [1, 5])
def test_flow_fast_matches_plain(dim, cond, depth, batch):
    """Forward, inverse, logdets and every parameter gradient agree (fp32, |diff| < 1e-5 relative)."""
    flow = _randomized_flow(dim, cond, depth=depth).train()
    fast = copy.deepcopy(flow)
    set_fast_path(fast)
    x = torch.randn(batch, dim, requires_grad=True)
    c = torch.randn(batch, cond, requires_grad=True) if cond else None

    y0, ld0 = flow(x, c)
    y1, ld1 = fast(x, c)
    assert y1.shape == y0.shape and ld1.shape == (batch,) and y1.is_contiguous()
    assert rel(y1, y0) < RTOL and rel(ld1, ld0) < RTOL

    w = torch.randn_like(y0)
    g0 = _grads(flow, (y0 * w).sum() - ld0.sum())
    g1 = _grads(fast, (y1 * w).sum() - ld1.sum())
    assert g0.keys() == g1.keys()
    for name in g0:
        assert rel(g1[name], g0[name]) < RTOL, name
    # gradients w.r.t. the inputs too
    gx0 = torch.autograd.grad((flow(x, c)[0] * w).sum(), [x] + ([c] if cond else []))
    gx1 = torch.autograd.grad((fast(x, c)[0] * w).sum(), [x] + ([c] if cond else []))
    for a, b in zip(gx1, gx0):
        assert rel(a, b) < RTOL

    flow.eval(), fast.eval()
    with torch.no_grad():
        x0, li0 = flow.inverse(y0, c)
        x1, li1 = fast.inverse(y0, c)
    assert rel(x1, x0) < RTOL and rel(li1, li0) < RTOL
    assert (x1 - x).abs().max() < 1e-4 and torch.allclose(li1, -ld0, atol=1e-5)  # still a bijection


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cpu_inference_with_prepacked_wide_subnets(dtype):
    """Cached CPU inference with subnets >= 512 wide runs through pre-packed oneDNN matmuls; same results."""
    from invint_hub.flows import _onednn_linear_available

    if not _onednn_linear_available():
        pytest.skip("this torch build has no oneDNN pre-packed linear")
    flow = _randomized_flow(8, 3, n_flows=2, hidden=512, depth=1).eval()
    fast = set_fast_path(copy.deepcopy(flow), dtype=dtype)
    y, c = torch.randn(5, 8), torch.randn(5, 3)
    with torch.no_grad():
        ref, ld_ref = flow.inverse(y, c)
        out, ld = fast.inverse(y, c)
        assert fast._pack_cache[1].onednn is not None
        fast.fast_onednn = False  # the stacked-matmul path, for comparison
        out2, ld2 = fast.inverse(y, c)
        assert fast._pack_cache[1].onednn is None
        fwd, fld = flow(y, c)
        fast.fast_onednn = True
        fwd1, fld1 = fast(y, c)
    tol = RTOL if dtype is None else 2e-2
    assert rel(out, ref) < tol and rel(out2, ref) < tol and rel(ld, ld_ref) < tol
    assert rel(fwd1, fwd) < tol and rel(fld1, fld) < tol
    # copies and pickles leave the cache (opaque oneDNN tensors) behind
    copied = copy.deepcopy(fast)
    assert copied._pack_cache is None and rel(copied.eval().inverse(y, c)[0], out) < RTOL
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    torch.save(fast, io.BytesIO())
    # narrow subnets never take the pre-packed route
    narrow = _randomized_flow(8, 3, hidden=64).eval()
    fast_narrow = set_fast_path(copy.deepcopy(narrow), dtype=dtype)
    with torch.no_grad():
        out = fast_narrow.inverse(y, c)[0]
        assert fast_narrow._pack_cache[1].onednn is None
        assert rel(out, narrow.inverse(y, c)[0]) < tol


def test_repeated_conditions():
    """inverse(v, cond, cond_repeats=n) == inverse(v, cond repeated n times), on both paths."""
    flow = _randomized_flow(6, 3).eval()
    y, c = torch.randn(6, 6), torch.randn(2, 3)
    with torch.no_grad():
        ref = flow.inverse(y, c.repeat_interleave(3, 0))
        plain = flow.inverse(y, c, cond_repeats=3)
        fast = set_fast_path(copy.deepcopy(flow)).inverse(y, c, cond_repeats=3)
    assert torch.equal(plain[0], ref[0]) and rel(fast[0], ref[0]) < RTOL and rel(fast[1], ref[1]) < RTOL
    with pytest.raises(ValueError, match="repeats"):
        flow.inverse(y, c, cond_repeats=2)


def test_fast_path_does_the_same_matmul_work():
    """The fast path adds no matmul FLOPs (same math, fewer and larger kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    flow = _randomized_flow(8, 4, n_flows=2, hidden=32, depth=2).train()
    x, c = torch.randn(6, 8), torch.randn(6, 4)
    fwd, total = [], []
    for enabled in (False, True):
        set_fast_path(flow, enabled)
        with FlopCounterMode(display=False) as counter:
            y, ld = flow(x, c)
        fwd.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            (y.sum() - ld.sum()).backward()
        total.append(counter.get_total_flops())
    assert fwd[0] > 0 and fwd[0] == fwd[1]
    # backward: the plain path also differentiates the concatenated condition, which needs no gradient here
    n_couplings, batch, hidden = 4, 6, 32
    assert total[0] - total[1] == n_couplings * 2 * (2 * batch * 4 * hidden)


def _cinn(cond_shape, **kw):
    torch.manual_seed(0)
    args = dict(latent_dim=10, cond_shape=cond_shape, embed_dim=6, n_flows=3, hidden=16, depth=2,
                embedder_depth=2, embedder_width=4)
    args.update(kw)
    t = ConditionalINN(**args)
    with torch.no_grad():
        t.train()(torch.randn(32, 10), torch.randn(32, *cond_shape))  # data-dependent ActNorm init
        for p in t.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return t


@pytest.mark.parametrize("cond_shape", [[7], [6, 8, 8]])
def test_conditional_inn_fast_matches_plain(cond_shape):
    t = _cinn(cond_shape)
    f = copy.deepcopy(t).fast(True)
    zbar, z = torch.randn(4, 10), torch.randn(4, *cond_shape)
    t.train(), f.train()
    nll0, nll1 = t.nll(zbar, z), f.nll(zbar, z)
    assert rel(nll1, nll0) < RTOL
    g0, g1 = _grads(t, nll0.mean()), _grads(f, nll1.mean())
    for name in g0:  # embedder gradients included
        assert rel(g1[name], g0[name]) < RTOL, name
    t.eval(), f.eval()
    with torch.no_grad():
        v = torch.randn(4, 10)
        assert rel(f.inverse(v, z), t.inverse(v, z)) < RTOL
        s0 = t.sample(z, n=3, generator=torch.Generator().manual_seed(1))
        s1 = f.sample(z, n=3, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (12, 10) and rel(s1, s0) < RTOL
    with pytest.raises(ValueError, match="representations"):
        f.sample(torch.randn(2, 5))


def test_unconditional_inn_fast_matches_plain():
    torch.manual_seed(0)
    inn = INN(dim=12, n_flows=2, hidden=16, depth=1)
    with torch.no_grad():
        inn.train()(torch.randn(64, 12))
    f = copy.deepcopy(inn).fast(True)
    x = torch.randn(5, 12)
    assert rel(f.nll(x), inn.nll(x)) < RTOL
    with torch.no_grad():
        e = torch.randn(5, 12)
        assert rel(f.eval().inverse(e), inn.eval().inverse(e)) < RTOL


def test_state_dict_and_config_unchanged(tmp_path):
    """The fast path is a runtime option: keys, shapes, config.json and the saved file are the same."""
    t = _cinn([7])
    keys = {k: tuple(v.shape) for k, v in t.state_dict().items()}
    t.save_pretrained(tmp_path / "plain")
    t.fast(True, dtype=torch.bfloat16)
    with torch.no_grad():
        t.eval().sample(torch.randn(1, 7), n=2)  # fills the weight cache
    assert {k: tuple(v.shape) for k, v in t.state_dict().items()} == keys
    t.save_pretrained(tmp_path / "fast")
    cfg_plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg_fast = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert cfg_plain == cfg_fast and not any("fast" in k for k in cfg_fast)
    plain_bytes = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert plain_bytes == (tmp_path / "fast" / "model.safetensors").read_bytes()
    loaded = ConditionalINN.from_pretrained(tmp_path / "fast")
    assert not loaded.flow.fast_path  # a reload starts on the plain path


def test_inference_cache_follows_parameter_changes():
    t = _cinn([7]).eval()
    f = copy.deepcopy(t).fast(True)
    v, z = torch.randn(3, 10), torch.randn(3, 7)
    with torch.no_grad():
        f.inverse(v, z)
        assert f.flow._pack_cache is not None
        # an in-place update (what an optimizer step does)
        for m in (t, f):
            m.flow.blocks[1].coupling.second.s[0].weight.mul_(1.5)
            m.flow.blocks[0].norm.loc.add_(0.3)
        assert rel(f.inverse(v, z), t.inverse(v, z)) < RTOL
        # a state-dict load
        other = _cinn([7])
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05)
        t.load_state_dict(other.state_dict())
        f.load_state_dict(other.state_dict())
        assert rel(f.inverse(v, z), t.inverse(v, z)) < RTOL
        # a dtype change
        t64, f64 = t.double(), f.double()
        out = f64.inverse(v.double(), z.double())
        assert out.dtype == torch.float64 and rel(out, t64.inverse(v.double(), z.double())) < 1e-10
    # with gradients on, nothing is cached and gradients reach the parameters
    f64.train()
    f64.nll(v.double(), z.double()).mean().backward()
    assert f64.flow._pack_cache is None
    assert f64.flow.blocks[0].coupling.first.t[0].weight.grad.abs().sum() > 0


def test_training_steps_track_plain_path():
    """A few Adam steps on the fast path land on the same parameters as on the plain path."""
    t = _cinn([7])
    f = copy.deepcopy(t).fast(True)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (t, f)]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        zbar, z = torch.randn(8, 10, generator=g), torch.randn(8, 7, generator=g)
        for m, opt in zip((t, f), opts):
            opt.zero_grad()
            m.train().nll(zbar, z).mean().backward()
            opt.step()
    for (n, a), b in zip(t.named_parameters(), f.parameters()):
        assert (a - b).abs().max() < 1e-5, n


def test_actnorm_init_happens_on_the_fast_path_too():
    torch.manual_seed(0)
    t = ConditionalINN(latent_dim=8, cond_shape=[3], embed_dim=4, n_flows=2, hidden=8, depth=1, embedder_depth=1)
    f = copy.deepcopy(t).fast(True)
    x = torch.randn(64, 8) * 3 + 1
    c = torch.randn(64, 3)
    t.train()(x, c)
    f.train()(x, c)
    for a, b in zip(t.modules(), f.modules()):
        if isinstance(a, ActNorm):
            assert a.initialized.item() == b.initialized.item() == 1
            assert torch.allclose(a.loc, b.loc, atol=1e-6) and torch.allclose(a.log_scale, b.log_scale, atol=1e-6)
    # both are now initialised and still agree
    assert rel(f(x, c)[0], t(x, c)[0]) < RTOL


def test_fast_forward_has_no_host_sync():
    """Once initialised, a training forward + backward issues no op that reads a device value on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sync_ops = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default",
                "aten.is_nonzero.default", "aten.equal.default"}

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    t = _cinn([7]).fast(True).train()
    zbar, z = torch.randn(4, 10), torch.randn(4, 7)
    t.nll(zbar, z).mean().backward()  # the first call may read the ActNorm flags once
    with Recorder() as rec:
        t.nll(zbar, z).mean().backward()
    assert rec.ops and not (set(rec.ops) & sync_ops), set(rec.ops) & sync_ops
    # the plain path reads nothing either once initialised (control: the recorder does see .item())
    with Recorder() as rec:
        torch.ones(()).item()
    assert "aten._local_scalar_dense.default" in rec.ops


@pytest.mark.parametrize("how", ["explicit", "autocast"])
def test_bf16_keeps_state_and_logdet_in_fp32(how):
    t = _cinn([7]).train()
    zbar, z = torch.randn(16, 10), torch.randn(16, 7)
    v0, ld0 = t(zbar, z)
    f = copy.deepcopy(t)
    if how == "explicit":
        f.fast(True, dtype=torch.bfloat16)
        v1, ld1 = f(zbar, z)
    else:
        f.fast(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v1, ld1 = f(zbar, z)
    assert v1.dtype == torch.float32 and ld1.dtype == torch.float32
    assert 0 < rel(v1, v0) < 5e-2 and rel(ld1, ld0) < 5e-2  # bf16 matmuls: close, not identical
    (0.5 * v1.pow(2).sum() - ld1.sum()).backward()
    w = f.flow.blocks[0].coupling.first.s[0].weight
    assert w.grad is not None and w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0
    with torch.no_grad():  # sampling in bf16 stays a close approximation of the fp32 inverse
        f.eval(), t.eval()
        vv = torch.randn(4, 10)
        assert rel(f.inverse(vv, z[:4]), t.inverse(vv, z[:4])) < 5e-2


def test_options_and_context_manager():
    t = _cinn([7])
    with fast_path(t, dtype=torch.bfloat16):
        assert t.flow.fast_path and t.flow.fast_dtype == torch.bfloat16
    assert not t.flow.fast_path and t.flow.fast_dtype is None
    assert t.fast() is t and t.flow.fast_path
    t.fast(False)
    assert not t.flow.fast_path and t.flow._pack_cache is None
    with pytest.raises(ValueError, match="floating"):
        set_fast_path(t, dtype=torch.int8)
    with pytest.raises(ValueError, match="no Flow"):
        set_fast_path(torch.nn.Linear(2, 2))
    empty = set_fast_path(Flow(4, 0, n_flows=0, hidden=8, depth=1))  # nothing to stack: the plain path
    x = torch.randn(3, 4)
    y, ld = empty(x)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(3))


def test_trained_pipeline_on_the_fast_path(tiny_pipeline_dir):
    """cINNs trained and saved by the real training command give the same samples and NLL on the fast path."""
    from invint_hub.pipeline import InvariancePipeline

    pipe = InvariancePipeline.from_pretrained(tiny_pipeline_dir)
    images = torch.rand(3, pipe.channels, pipe.image_size, pipe.image_size) * 2 - 1
    for layer in pipe.layers:  # a spatial (conv1) and a flat (logits) condition
        t = pipe.cinns[layer]
        x = pipe.preprocess(images)
        zbar, z = pipe.autoencoder.encode(x).mode(), pipe.backbone.representation(x, layer)
        plain = pipe.sample_invariances(images, layer, n=4, seed=0)
        nll = t.nll(zbar, z).detach()
        t.fast(True)
        try:
            fast = pipe.sample_invariances(images, layer, n=4, seed=0)
            assert fast.shape == plain.shape == (3, 4, pipe.channels, pipe.image_size, pipe.image_size)
            assert (fast - plain).abs().max() < 1e-4
            assert rel(t.nll(zbar, z).detach(), nll) < RTOL
        finally:
            t.fast(False)


# ---- the benchmark command --------------------------------------------------------------------
TINY_PAPER = dict(latent_dim=8, cond_shape=[12], embed_dim=6, n_flows=2, hidden=16, depth=2, embedder_depth=2)


def test_bench_runs_end_to_end(tmp_path, monkeypatch):
    """Every section of ``python -m eval.bench_cinn`` on CPU, with the paper size shrunk to seconds."""
    from eval import bench_cinn as bench

    monkeypatch.setitem(bench.SIZES, "paper", TINY_PAPER)
    monkeypatch.setitem(bench.SIZES, "small", TINY_PAPER)
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    res = bench.main(["--devices", "cpu", "--batches", "4,8", "--repeats", "2", "--warmup", "1",
                      "--demo-sizes", "paper", "--parity-steps", "24", "--parity-batch", "8",
                      "--markdown", str(md), "--json", str(js)])
    assert {r["path"] for r in res["demo"]} == {"plain", "fast", "fast-bf16"}
    fast_demo = next(r for r in res["demo"] if r["path"] == "fast")
    assert fast_demo["rel_err"] < RTOL and fast_demo["ms"] > 0
    plain_demo = next(r for r in res["demo"] if r["path"] == "plain")
    assert 0 < fast_demo["ops"] < plain_demo["ops"] / 2  # far fewer ops per sampling call
    paths = ("plain", "fast", "fast-bf16")
    assert {(r["batch"], r["path"]) for r in res["train"]} == {(b, q) for b in (4, 8) for q in paths}
    assert all(r["tflops"] > 0 and r["steps_per_s"] > 0 and r["cpu_ms"] > 0 for r in res["train"])
    ops = {r["path"]: r["ops"] for r in res["train"]}
    assert ops["fast"] < ops["plain"] / 2  # far fewer kernels per training step
    assert {(r["batch"], r["path"]) for r in res["sample"]} == {(b, q) for b in (4, 8) for q in paths}
    (p,) = res["parity"]
    assert p["fast_path"] == "fast" and p["noise_path"] == "plain"
    assert p["steps"] == 24 and p["diff_fast"] < 1e-3 and p["passed"]  # fp32 fast path: the same curve
    assert p["final"]["plain"] < p["first"]  # it learns
    text = md.read_text()
    assert "Command: `python -m eval.bench_cinn" in text and "NLL parity" in text and "| cpu |" in text
    assert json.loads(js.read_text())["env"]["torch"] == torch.__version__


def test_bench_flop_count_matches_the_architecture(monkeypatch):
    from eval import bench_cinn as bench

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
    from eval import bench_cinn as bench

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


# ---- cached inference passes: one gather + one addcmul per block, couplings in place -------------
def _aten_ops(fn):
    """The aten ops (overload names dropped) that ``fn()`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Recorder.ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    Recorder.ops = []
    with Recorder():
        out = fn()
    return Recorder.ops, out


@pytest.mark.parametrize("dim,cond,depth", [(6, 3, 2), (7, 3, 1), (8, 0, 0), (9, 4, 2), (2, 1, 1)])
@pytest.mark.parametrize("batch", [1, 5])
def test_cached_passes_match_plain(dim, cond, depth, batch):
    """No-grad forward and inverse with cached weights (even and odd dims) == the plain path."""
    flow = _randomized_flow(dim, cond, n_flows=4, depth=depth).eval()
    fast = set_fast_path(copy.deepcopy(flow))
    x = torch.randn(batch, dim)
    c = torch.randn(batch, cond) if cond else None
    with torch.no_grad():
        y0, ld0 = flow(x, c)
        y1, ld1 = fast(x, c)
        assert fast._pack_cache is not None and fast._pack_cache[1].plan is not None  # the cached passes ran
        x0, li0 = flow.inverse(y0, c)
        x1, li1 = fast.inverse(y0, c)
        y2, ld2 = fast(x, c)  # again, with this thread's kept buffers
    for a, b in ((y1, y0), (ld1, ld0), (x1, x0), (li1, li0), (y2, y0), (ld2, ld0)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous() and rel(a, b) < RTOL
    assert torch.equal(y1, y2)  # the second pass did not overwrite the first one's output
    assert (x1 - x).abs().max() < 1e-4


def test_cached_inverse_issues_few_ops():
    """Per block: one gather + one addcmul (no cat/split/stack); per coupling 7 + 2 * depth ops."""
    n_flows, depth = 6, 1
    flow = set_fast_path(_randomized_flow(8, 3, n_flows=n_flows, depth=depth).eval())
    y, c = torch.randn(5, 8), torch.randn(1, 3)
    with torch.no_grad():
        flow.inverse(y, c, cond_repeats=5)  # builds the cache and this thread's buffers
        ops, (x, _) = _aten_ops(lambda: flow.inverse(y, c, cond_repeats=5))
        ref = flow.eval().inverse  # (the plain path, for the values)
        set_fast_path(flow, False)
        x0 = ref(y, c.expand(5, -1))[0]
    assert rel(x, x0) < RTOL
    assert not {"cat", "stack", "split", "split_with_sizes", "repeat_interleave", "clone"} & set(ops), ops
    assert ops.count("index_select") == n_flows + 1 and ops.count("addcmul") == n_flows
    per_coupling = 7 + 2 * depth  # addmm, (baddbmm, leaky_relu_) x depth, baddbmm, leaky_relu_, tanh, exp, sub_, div_
    assert len(ops) <= 2 * n_flows * per_coupling + 2 * n_flows + 10, (len(ops), ops)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cached_passes_bf16_and_prepacked(dtype):
    """The cached passes with bf16 subnets and with oneDNN pre-packed wide subnets."""
    from invint_hub.flows import _onednn_linear_available

    for hidden in (16, 512):
        flow = _randomized_flow(7, 3, n_flows=2, hidden=hidden, depth=1).eval()
        fast = set_fast_path(copy.deepcopy(flow), dtype=dtype)
        x, c = torch.randn(4, 7), torch.randn(4, 3)
        with torch.no_grad():
            y0, ld0 = flow(x, c)
            y1, ld1 = fast(x, c)
            v = torch.randn(4, 7)  # (not y0: the inverse of these random wide flows is ill-conditioned)
            x0, li0 = flow.inverse(v, c)
            x1, li1 = fast.inverse(v, c)
            pack = fast._pack_cache[1]
        assert pack.plan is not None
        if hidden == 512 and _onednn_linear_available():
            assert pack.onednn is not None
        assert y1.dtype == ld1.dtype == x1.dtype == torch.float32
        tol = RTOL if dtype is None else 5e-2
        assert rel(y1, y0) < tol and rel(ld1, ld0) < tol and rel(x1, x0) < tol and rel(li1, li0) < tol


def test_cached_passes_are_thread_safe():
    """Every thread has its own buffers: concurrent samples equal the serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    flow = set_fast_path(_randomized_flow(8, 3, n_flows=3).eval())
    inputs = [(torch.randn(6, 8), torch.randn(6, 3)) for _ in range(8)]
    with torch.no_grad():
        serial = [flow.inverse(y, c)[0] for y, c in inputs]

    def run(i):
        with torch.no_grad():
            return [flow.inverse(*inputs[i])[0] for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(8)))
    for ref, outs in zip(serial, results):
        assert all(torch.equal(o, ref) for o in outs)


def test_cached_plan_follows_actnorm_and_permutation_changes():
    """The folded ActNorm constants and composed gathers are rebuilt after any change of their sources."""
    flow = _randomized_flow(8, 3, n_flows=3).eval()
    fast = set_fast_path(copy.deepcopy(flow))
    y, c = torch.randn(4, 8), torch.randn(4, 3)
    with torch.no_grad():
        fast.inverse(y, c)
        for f in (flow, fast):
            f.blocks[1].norm.log_scale.add_(0.2)
            f.blocks[2].norm.loc.mul_(-1)
        assert rel(fast.inverse(y, c)[0], flow.inverse(y, c)[0]) < RTOL
        assert rel(fast(y, c)[0], flow(y, c)[0]) < RTOL
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
        for f in (flow, fast):  # a changed permutation buffer (in place)
            f.blocks[0].shuffle.perm.copy_(perm)
            f.blocks[0].shuffle.inv_perm.copy_(torch.argsort(perm))
        assert rel(fast.inverse(y, c)[0], flow.inverse(y, c)[0]) < RTOL
        assert rel(fast(y, c)[0], flow(y, c)[0]) < RTOL


# ---- the embedder with its ActNorms folded (fast-path inference) --------------------------------
@pytest.mark.parametrize("cond_shape,kw", [([7], {}), ([6, 8, 8], {}), ([5, 4, 4], {"embedder_down": 0}),
                                           ([3, 16, 16], {"embedder_down": 1})])
def test_folded_embedder_matches_plain(cond_shape, kw):
    from invint_hub.cinn import fold_embedder

    t = _cinn(cond_shape, **kw).eval()
    with torch.no_grad():
        for m in t.embedder.modules():  # non-trivial ActNorms
            if isinstance(m, ActNorm):
                m.loc.normal_()
                m.log_scale.normal_(0, 0.3)
    steps = fold_embedder(t.embedder, t.cond_shape)
    kinds = [s[0] for s in steps]
    assert "linear" in kinds and kinds[-1] == "linear"  # the map-sized conv runs as one matmul
    n_norms = sum(isinstance(m, ActNorm) for m in t.embedder.modules())
    n_weights = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in t.embedder.modules())
    assert (n_norms > 0) == (kw.get("embedder_down") != 0)  # (no strided convs, no ActNorm)
    assert len([k for k in kinds if k in ("linear", "conv")]) == n_weights  # the ActNorms are folded away
    f = copy.deepcopy(t).fast(True)
    z = torch.randn(3, *cond_shape)
    with torch.no_grad():
        e0, e1 = t.embed(z), f.embed(z)
        assert f._embed_cache is not None and f._embed_cache[1] is not None
        ops, _ = _aten_ops(lambda: f.embed(z))
        v = torch.randn(3, 10)
        assert rel(f.inverse(v, z), t.inverse(v, z)) < RTOL
        s0 = t.sample(z[:1], n=4, generator=torch.Generator().manual_seed(0))
        s1 = f.sample(z[:1], n=4, generator=torch.Generator().manual_seed(0))
    assert rel(e1, e0) < RTOL and rel(s1, s0) < RTOL
    assert "mul" not in ops and "exp" not in ops  # no ActNorm ops left
    e = f.embed(z)  # gradients on: the plain modules run and get gradients
    assert e.requires_grad and rel(e.detach(), e0) < RTOL
    e.sum().backward()
    assert next(f.embedder.parameters()).grad is not None


def test_folded_embedder_cache_follows_weight_changes():
    t = _cinn([6, 8, 8]).eval()
    f = copy.deepcopy(t).fast(True)
    z = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        f.embed(z)
        first = f._embed_cache
        for m in (t, f):
            m.embedder.net[0].weight.mul_(1.3)  # an in-place update (an optimizer step)
            next(x for x in m.embedder.modules() if isinstance(x, ActNorm)).loc.add_(0.5)
        assert rel(f.embed(z), t.embed(z)) < RTOL and f._embed_cache is not first
        other = _cinn([6, 8, 8])
        with torch.no_grad():
            for p in other.embedder.parameters():
                p.add_(0.1)
        t.load_state_dict(other.state_dict())
        f.load_state_dict(other.state_dict())
        assert f._embed_cache is None  # dropped by the load
        assert rel(f.embed(z), t.embed(z)) < RTOL
        out = f.double().embed(z.double())
        assert out.dtype == torch.float64 and rel(out, t.double().embed(z.double())) < 1e-10
        f.fast(False)
        assert torch.equal(f.embed(z.double()), t.embed(z.double()))  # off the fast path: the plain embedder
    c = copy.deepcopy(f.fast(True))
    assert c._embed_cache is None


def test_embedder_actnorm_init_not_skipped_on_the_fast_path():
    """A fast-path model in training mode still initialises its embedder's ActNorms from data."""
    torch.manual_seed(0)
    t = ConditionalINN(latent_dim=8, cond_shape=[6], embed_dim=4, n_flows=2, hidden=8, depth=1, embedder_depth=3)
    f = copy.deepcopy(t).fast(True)
    zbar, z = torch.randn(64, 8), torch.randn(64, 6) * 3 + 2
    with torch.no_grad():  # the data-dependent init pass, as train.py does it
        t.train()(zbar, z)
        f.train()(zbar, z)
        norms = [(a, b) for a, b in zip(t.embedder.modules(), f.embedder.modules()) if isinstance(a, ActNorm)]
        assert norms and all(a.initialized.item() == b.initialized.item() == 1 for a, b in norms)
        assert all(torch.allclose(a.loc, b.loc, atol=1e-6) for a, b in norms)
        assert rel(f.eval().embed(z), t.eval().embed(z)) < RTOL


# ---- training on the fast path: parameters stacked once, no copies per step ----------------------
def test_fast_training_stacks_parameters_once(tmp_path):
    from invint_hub.flows import _stacked_base

    t = _cinn([7], hidden=32)
    f = copy.deepcopy(t).fast(True)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (t, f)]
    params_before = list(f.parameters())
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        zbar, z = torch.randn(8, 10, generator=g), torch.randn(8, 7, generator=g)
        for m, opt in zip((t, f), opts):
            opt.zero_grad(set_to_none=True)
            m.train().nll(zbar, z).mean().backward()
            opt.step()
        layers = f.flow.subnet_layers()
        assert all(_stacked_base(group) is not None for group in layers)  # one storage per layer
    assert all(a is b for a, b in zip(params_before, f.parameters()))  # the same parameter objects
    for (n, a), b in zip(t.named_parameters(), f.parameters()):
        assert (a - b).abs().max() < 1e-5, n
    # each gradient is a view of its layer's stacked gradient (no concatenation), hidden layers included
    w = f.flow.subnet_layers()[2]
    assert w[0].grad.untyped_storage().data_ptr() == w[1].grad.untyped_storage().data_ptr()
    # one training step copies no hidden-layer-sized weight or gradient stack
    hid_numel = w[0].numel() * len(w)
    sizes = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("stack", "cat", "clone", "copy_") and isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Sizes():
        f.nll(zbar, z).mean().backward()
    assert sizes and max(sizes) < hid_numel, (max(sizes), hid_numel)
    # the state dict: same keys, independent tensors, a byte-identical file, reloads on both paths
    sd = f.state_dict()
    assert list(sd) == list(t.state_dict())
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in sd.values())
    f.save_pretrained(tmp_path / "fast")
    copy.deepcopy(f).fast(False).save_pretrained(tmp_path / "plain")
    saved = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("fast", "plain")]
    assert saved[0] == saved[1]
    loaded = ConditionalINN.from_pretrained(tmp_path / "fast").eval()
    v, zv = torch.randn(3, 10), torch.randn(3, 7)
    with torch.no_grad():
        ref = f.eval().inverse(v, zv)
        assert rel(loaded.inverse(v, zv), ref) < RTOL and rel(loaded.fast(True).inverse(v, zv), ref) < RTOL
        assert rel(f.fast(False).inverse(v, zv), ref) < RTOL
    # .to() gives the parameters their own storage again; the next fast step restacks
    f.double().float().fast(True).train()
    assert _stacked_base(f.flow.subnet_layers()[2]) is None
    f.nll(zbar, z).mean().backward()
    assert _stacked_base(f.flow.subnet_layers()[2]) is not None
