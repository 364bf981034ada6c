"""Benchmark the cINN on CPU (and CUDA when present): plain eager, ``torch.compile`` of it, bf16 autocast.

    python -m eval.bench_cinn                                   # CPU, and CUDA when present
    python -m eval.bench_cinn --devices cpu --sections demo     # demo sampling latency only
    python -m eval.bench_cinn --markdown eval/results/bench_cinn.md

Paths (``--paths``; the same ``ConditionalINN`` with the same parameters):
  plain     the module as it is, fp32.
  compiled  ``torch.compile`` (inductor) of the plain module's embedder and flow (both directions);
            the one-time compile time is reported separately ("first call").
  bf16      the plain module under ``torch.autocast(dtype=torch.bfloat16)`` (the flow's log-determinant
            stays fp32). Where a bf16 matmul does not run, it falls back to fp32 with a one-line warning.

Sections (``--sections``, comma list):
  demo    ``n`` = 16 samples of one representation for the demo sizes (the MNIST cINN with a flat and
          a spatial condition, and the paper size); median latency of interleaved calls.
  train   paper-size training steps/s at ``--batches`` with TFLOP/s (FLOPs counted by
          ``torch.utils.flop_counter`` on the plain step) and, on CUDA, the share of the bf16 peak.
  sample  paper-size sampling throughput at ``--batches`` (one sample per representation).
  parity  training NLL curves of plain and ``--parity-path`` on the same data and seed, against the
          run-to-run noise of a second seed.

The training loss is ``flows.standard_normal_nll`` (the one NLL of the library). CPU timings on a shared
machine are noisy: every comparison runs all paths in one process, interleaved, so they share the load.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from invint_hub.cinn import ConditionalINN
from invint_hub.flows import standard_normal_nll

SIZES: dict[str, dict] = {
    # the embedded MNIST pipeline's cINNs (configs/mnist.yaml): fc (128) and conv1 (32x16x16) layers
    "mnist-flat": dict(latent_dim=64, cond_shape=[128], embed_dim=64, n_flows=8, hidden=128, depth=1,
                       embedder_depth=3),
    "mnist-spatial": dict(latent_dim=64, cond_shape=[32, 16, 16], embed_dim=64, n_flows=8, hidden=128, depth=1,
                          embedder_depth=3, embedder_width=32),
    # the paper's t (Table 11: 128-d, 20 flows, width 1024, depth 2) on an fc-sized (4096) representation
    "paper": dict(latent_dim=128, cond_shape=[4096], embed_dim=128, n_flows=20, hidden=1024, depth=2,
                  embedder_depth=3),
    # a small model for the CPU parity run
    "small": dict(latent_dim=32, cond_shape=[16], embed_dim=16, n_flows=4, hidden=128, depth=2, embedder_depth=2),
}
PATHS = ("plain", "compiled", "bf16")
PAPER_LR, PAPER_BETAS = 7.2e-5, (0.5, 0.9)  # 4.5e-6 x batch 16, official configs
# Dense bf16 tensor-core peak (spec sheets, TFLOP/s), matched against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
_BF16_OK: dict[str, bool] = {}


# ---------------------------------------------------------------------------------------------
# models, paths, timing
# ---------------------------------------------------------------------------------------------
def build(size: str, device: torch.device, seed: int = 0) -> ConditionalINN:
    """A model of ``size`` with its ActNorms initialised on a random batch (not the identity)."""
    torch.manual_seed(seed)
    model = ConditionalINN(**SIZES[size]).to(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    zbar = torch.randn(64, model.latent_dim, generator=g, device=device)
    z = torch.randn(64, *model.cond_shape, generator=g, device=device)
    with torch.no_grad():
        model.train()(zbar, z)
    return model.eval()


def bf16_works(device: torch.device) -> bool:
    """Probe once per device type whether a bf16 autocast matmul runs; if not, warn (one line) and say so."""
    kind = device.type
    if kind not in _BF16_OK:
        try:
            a = torch.ones(8, 8, device=device)
            with torch.autocast(kind, dtype=torch.bfloat16):
                (a @ a).sum().item()
            _BF16_OK[kind] = True
        except RuntimeError as e:
            warnings.warn(f"bf16 matmuls fail on {kind} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          "the bf16 path runs in fp32", stacklevel=2)
            _BF16_OK[kind] = False
    return _BF16_OK[kind]


def autocast(path: str, device: torch.device):
    """The context of ``path``: bf16 autocast for 'bf16' (fp32 where bf16 does not run), else nothing."""
    if path == "bf16" and bf16_works(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dtype_name(path: str, device: torch.device) -> str:
    return "bfloat16" if path == "bf16" and bf16_works(device) else "float32"


def for_path(model: ConditionalINN, path: str) -> ConditionalINN:
    """A copy of ``model`` for ``path`` ('compiled': the embedder and both directions of the flow
    wrapped by ``torch.compile``; the state dict is unchanged)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; known: {list(PATHS)}")
    m = copy.deepcopy(model)
    if path == "compiled":
        m.embedder.forward = torch.compile(m.embedder.forward, dynamic=False)
        m.flow.forward = torch.compile(m.flow.forward, dynamic=False)
        m.flow.inverse = torch.compile(m.flow.inverse, dynamic=False)
    return m


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of the first call (for 'compiled': the compile time)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds per call of each function, called in turn so they share the load.

    On a CPU shared with other jobs the wall clock mostly measures waiting for a core; the CPU time
    of this process measures the work (with several torch threads it includes their spin-waits).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> tuple[float, float]:
    """Interquartile range (seconds)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def nll_loss(model: ConditionalINN, zbar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean per-sample NLL in nats (``flows.standard_normal_nll``, the loss of the training command)."""
    v, logdet = model(zbar, z)
    return standard_normal_nll(v, logdet).mean()


def make_step(model: ConditionalINN, path: str, device: torch.device, lr: float) -> Callable:
    """One Adam step of ``path`` on (zbar, z); returns the loss (a device tensor, no sync)."""
    model = for_path(model, path).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=PAPER_BETAS)

    def step(zbar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(path, device):
            loss = nll_loss(model, zbar, z)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def count_step_flops(model: ConditionalINN, batch: int, device: torch.device) -> int:
    """Matmul/conv FLOPs of one plain training step (forward + backward) at ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).train()
    zbar = torch.randn(batch, m.latent_dim, device=device)
    z = torch.randn(batch, *m.cond_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        nll_loss(m, zbar, z).backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def bench_demo(device: torch.device, repeats: int, warmup: int, sizes: list[str], paths: list[str],
               n: int = 16) -> list[dict]:
    """Latency of drawing ``n`` samples for one representation on every path."""
    rows = []
    for size in sizes:
        model = build(size, device)
        z = torch.randn(1, *model.cond_shape, device=device)
        models = {k: for_path(model, k) for k in paths}

        def call(k):
            with torch.no_grad(), autocast(k, device):
                return models[k].sample(z, n=n, generator=torch.Generator(device=device).manual_seed(0))

        first = {k: first_call_s(lambda k=k: call(k), device) for k in paths}
        with torch.no_grad():
            ref = for_path(model, "plain").sample(z, n=n, generator=torch.Generator(device=device).manual_seed(0))
        err = {k: ((call(k).float() - ref).norm() / ref.norm()).item() for k in paths}
        t, c = time_interleaved({k: (lambda k=k: call(k)) for k in paths}, repeats, warmup, device)
        base = paths[0]
        for k in paths:
            lo, hi = spread(t[k])
            rows.append(dict(device=device.type, size=size, params=n_params(model), path=k, samples=n, repeats=repeats,
                             ms=1e3 * median(t[k]), iqr_ms=(1e3 * lo, 1e3 * hi), first_s=first[k],
                             speedup=median(t[base]) / median(t[k]), cpu_ms=1e3 * median(c[k]), rel_err=err[k],
                             dtype=dtype_name(k, device)))
        del models
    return rows


def bench_train(device: torch.device, batches: list[int], paths: list[str], repeats: int, warmup: int,
                peak: float | None) -> list[dict]:
    """Paper-size training step on every path: steps/s and TFLOP/s."""
    rows = []
    base_model = build("paper", device)
    flops16 = count_step_flops(base_model, 16, device)  # matmul FLOPs scale linearly with the batch
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(batch)
        zbar = torch.randn(batch, base_model.latent_dim, generator=g, device=device)
        z = torch.randn(batch, *base_model.cond_shape, generator=g, device=device)
        steps = {k: make_step(base_model, k, device, PAPER_LR) for k in paths}
        first = {k: first_call_s(lambda s=s: s(zbar, z), device) for k, s in steps.items()}
        t, c = time_interleaved({k: (lambda s=s: s(zbar, z)) for k, s in steps.items()}, repeats, warmup, device)
        flops = flops16 * batch / 16
        for k in paths:
            sec = median(t[k])
            tflops = flops / sec / 1e12
            rows.append(dict(device=device.type, batch=batch, path=k, repeats=repeats, ms=1e3 * sec,
                             steps_per_s=1 / sec, tflops=tflops, peak_pct=100 * tflops / peak if peak else None,
                             dtype=dtype_name(k, device), first_s=first[k], speedup=median(t[paths[0]]) / sec,
                             cpu_ms=1e3 * median(c[k])))
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_sample(device: torch.device, batches: list[int], paths: list[str], repeats: int, warmup: int) -> list[dict]:
    """Paper-size sampling throughput, one sample per representation (the embedder included)."""
    rows = []
    model = build("paper", device)
    models = {k: for_path(model, k) for k in paths}
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(batch)
        z = torch.randn(batch, *model.cond_shape, generator=g, device=device)
        v = torch.randn(batch, model.latent_dim, generator=g, device=device)

        def call(k):
            with torch.no_grad(), autocast(k, device):
                return models[k].inverse(v, z)

        first = {k: first_call_s(lambda k=k: call(k), device) for k in paths}
        t, c = time_interleaved({k: (lambda k=k: call(k)) for k in paths}, repeats, warmup, device)
        for k in paths:
            sec = median(t[k])
            rows.append(dict(device=device.type, batch=batch, path=k, repeats=repeats, ms=1e3 * sec,
                             samples_per_s=batch / sec, dtype=dtype_name(k, device), first_s=first[k],
                             speedup=median(t[paths[0]]) / sec, cpu_ms=1e3 * median(c[k])))
    return rows


class SyntheticConditional:
    """A fixed conditional density: z ~ N(0, I), z_bar = 2 tanh(z A) B + (0.3 + 0.5 sigmoid(z c)) eps."""

    def __init__(self, latent_dim: int, cond_dim: int, n: int, device: torch.device, seed: int = 1234):
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.randn(cond_dim, 64, generator=g) / math.sqrt(cond_dim)
        b = torch.randn(64, latent_dim, generator=g) / 8
        c = torch.randn(cond_dim, generator=g) / math.sqrt(cond_dim)
        z = torch.randn(n, cond_dim, generator=g)
        eps = torch.randn(n, latent_dim, generator=g)
        zbar = 2 * torch.tanh(z @ a) @ b + (0.3 + 0.5 * torch.sigmoid(z @ c))[:, None] * eps
        self.z, self.zbar = z.to(device), zbar.to(device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.zbar[idx], self.z[idx]


def run_curve(size: str, path: str, steps: int, batch: int, lr: float, seed: int, data: SyntheticConditional,
              device: torch.device) -> list[float]:
    """Per-step training NLL (nats/sample) of one run; init and data order from ``seed``."""
    torch.manual_seed(seed)
    model = ConditionalINN(**SIZES[size]).to(device)
    order = torch.Generator(device="cpu").manual_seed(seed)
    n = data.z.shape[0]
    idx = [torch.randint(n, (batch,), generator=order).to(device) for _ in range(steps + 1)]
    zbar0, z0 = data.batch(idx[0])
    with torch.no_grad():  # data-dependent ActNorm init on the first batch, as train.py does
        model.train()(zbar0, z0)
    step = make_step(model, path, device, lr)
    losses = torch.empty(steps, device=device)
    for i in range(steps):
        losses[i] = step(*data.batch(idx[i + 1]))
    return losses.cpu().tolist()


def bench_parity(device: torch.device, size: str, steps: int, batch: int, lr: float, path: str,
                 window: int, noise_path: str = "plain", seed: int = 0) -> dict:
    """Plain vs ``path`` on the same data and seed, against a run with another seed (run-to-run noise).

    The noise run takes ``noise_path`` (``plain``, or ``path`` where plain steps are slow).
    """
    spec = SIZES[size]
    data = SyntheticConditional(spec["latent_dim"], math.prod(spec["cond_shape"]), 16384, device)
    t0 = time.perf_counter()
    curves = {
        "plain": run_curve(size, "plain", steps, batch, lr, seed, data, device),
        "other": run_curve(size, path, steps, batch, lr, seed, data, device),
        "seed2": run_curve(size, noise_path, steps, batch, lr, seed + 1, data, device),
    }
    window = max(1, min(window, steps // 4))

    def smooth(c):
        return [statistics.fmean(c[i : i + window]) for i in range(0, len(c) - window + 1, window)]

    sm = {k: smooth(c) for k, c in curves.items()}
    half = len(sm["plain"]) // 2
    diff = statistics.fmean(abs(a - b) for a, b in zip(sm["plain"][half:], sm["other"][half:]))
    ref = sm["plain" if noise_path == "plain" else "other"]  # noise: the same recipe with two seeds
    diff_noise = statistics.fmean(abs(a - b) for a, b in zip(ref[half:], sm["seed2"][half:]))
    return dict(
        device=device.type, size=size, params=n_params(ConditionalINN(**spec)), steps=steps, batch=batch, lr=lr,
        path=path, window=window,
        first=sm["plain"][0], final={k: v[-1] for k, v in sm.items()},
        diff=diff, diff_noise=diff_noise, passed=diff <= diff_noise, noise_path=noise_path,
        curve_points={k: [round(x, 3) for x in v[:: max(1, len(v) // 8)]] for k, v in sm.items()},
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.1e}"
    return str(x)


def tables(results: dict) -> str:
    out = []
    if results.get("demo"):
        out += ["### Demo sampling latency (16 samples of one representation)", "",
                "| device | model | params | path | dtype | wall ms (median) | IQR ms | speed-up vs first path "
                "| CPU-time ms | first call s | rel. error vs plain | repeats |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["demo"]:
            out.append(f"| {r['device']} | {r['size']} | {r['params'] / 1e6:.1f} M | {r['path']} | {r['dtype']} | "
                       f"{_f(r['ms'])} | {_f(r['iqr_ms'][0])}-{_f(r['iqr_ms'][1])} | {_f(r['speedup'])}x | "
                       f"{_f(r['cpu_ms'])} | {_f(r['first_s'], 1)} | {_f(r['rel_err'], 6)} | {r['repeats']} |")
        out += ["", "Medians over the interleaved repeats. CPU time: this process's CPU seconds per call. First call: "
                    "for 'compiled' the compile time.", ""]
    if results.get("train"):
        out += ["### Training step, paper size (ms per step; TFLOP/s from the counted matmul FLOPs)", "",
                "| device | batch | path | dtype | ms/step | steps/s | TFLOP/s | % bf16 peak | speed-up vs first path "
                "| CPU-time ms | first call s | repeats |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["train"]:
            out.append(f"| {r['device']} | {r['batch']} | {r['path']} | {r['dtype']} | {_f(r['ms'])} | "
                       f"{_f(r['steps_per_s'], 3)} | {_f(r['tflops'], 3)} | {_f(r['peak_pct'], 1)} | "
                       f"{_f(r['speedup'])}x | {_f(r['cpu_ms'])} | {_f(r['first_s'], 1)} | {r['repeats']} |")
        out.append("")
    if results.get("sample"):
        out += ["### Sampling throughput, paper size (one sample per representation, embedder included)", "",
                "| device | batch | path | dtype | ms/call | samples/s | speed-up vs first path | CPU-time ms "
                "| first call s | repeats |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["sample"]:
            out.append(f"| {r['device']} | {r['batch']} | {r['path']} | {r['dtype']} | {_f(r['ms'])} | "
                       f"{_f(r['samples_per_s'], 1)} | {_f(r['speedup'])}x | {_f(r['cpu_ms'])} | "
                       f"{_f(r['first_s'], 1)} | {r['repeats']} |")
        out.append("")
    for p in results.get("parity", []):
        out += [f"### NLL parity ({p['device']}, model '{p['size']}' {p['params'] / 1e6:.2f} M params, "
                f"{p['steps']} steps, batch {p['batch']}, lr {p['lr']}, window {p['window']} steps)", "",
                "| run | NLL first window | NLL last window | curve (every 1/8) |", "|---|---|---|---|"]
        for k in ("plain", "other", "seed2"):
            name = {"plain": "plain, seed 1", "other": f"{p['path']}, seed 1", "seed2": f"{p['noise_path']}, seed 2"}[k]
            out.append(f"| {name} | {_f(p['curve_points'][k][0], 3)} | {_f(p['final'][k], 3)} | "
                       f"{' '.join(str(x) for x in p['curve_points'][k])} |")
        verdict = "PASS" if p["passed"] else "FAIL"
        out += ["", f"Second half, mean |windowed NLL difference|: plain vs {p['path']} {p['diff']:.4f}, "
                    f"{p['noise_path']} seed 1 vs seed 2 (run-to-run noise) {p['diff_noise']:.4f} -> **{verdict}** "
                    f"({p['seconds']:.0f} s)", ""]
    for dev in results.get("skipped", []):
        out += [f"CUDA: not run ({dev}).", ""]
    for err in results.get("errors", []):
        out += [f"ERROR in {err}", ""]
    return "\n".join(out)


def environment(devices: list[torch.device]) -> dict:
    env = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
               python=platform.python_version(), cpu=platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), command="python -m eval.bench_cinn " + " ".join(sys.argv[1:]))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for d in devices:
        if d.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(d)
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="auto",
                   help="'auto' (cpu, plus cuda when present), 'cpu', 'cuda' or 'cpu,cuda'")
    p.add_argument("--sections", default="demo,train,sample,parity")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--batches", default="16,256,1024")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (default: cpu 21 demo / 2 train+sample, cuda 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: cpu 3 demo / 1, cuda 5)")
    p.add_argument("--demo-sizes", default="mnist-flat,mnist-spatial,paper")
    p.add_argument("--paths", default="plain,compiled,bf16", help=f"comma list from {list(PATHS)}")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 matrix peak of the card (default: by name)")
    p.add_argument("--parity-steps", type=int, default=None, help="default: cpu 300, cuda 2000")
    p.add_argument("--parity-size", default=None, choices=list(SIZES), help="default: cpu small, cuda paper")
    p.add_argument("--parity-batch", type=int, default=None, help="default: cpu 64, cuda 16")
    p.add_argument("--parity-lr", type=float, default=None, help="default: paper 7.2e-5, else 5e-4")
    p.add_argument("--parity-window", type=int, default=None, help="steps per smoothing window (default steps // 20)")
    p.add_argument("--parity-path", default="bf16", choices=["compiled", "bf16"], help="path compared with plain")
    p.add_argument("--parity-noise-path", default=None, choices=list(PATHS),
                   help="path of the second-seed run that measures run-to-run noise (default: plain)")
    p.add_argument("--markdown", default=None, help="write the tables (with card, date, command) to this file")
    p.add_argument("--json", default=None, help="write the raw results to this file")
    return p.parse_args(argv)


def resolve_devices(spec: str) -> tuple[list[torch.device], list[str]]:
    names = ["cpu", "cuda"] if spec == "auto" else [s.strip() for s in spec.split(",") if s.strip()]
    devices, skipped = [], []
    for name in names:
        if name not in ("cpu", "cuda"):
            raise SystemExit(f"unknown device {name!r}: use cpu, cuda or auto")
        if name == "cuda" and not torch.cuda.is_available():
            skipped.append("no CUDA device on this machine")
            continue
        devices.append(torch.device(name))
    return devices, skipped


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"demo", "train", "sample", "parity"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}: use demo, train, sample, parity")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batches must be a comma list of integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise SystemExit("--batches needs at least one positive batch size")
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    if not paths or set(paths) - set(PATHS):
        raise SystemExit(f"--paths must be a comma list from {list(PATHS)}, got {args.paths!r}")
    if "plain" in paths:  # the baseline first
        paths = ["plain"] + [q for q in paths if q != "plain"]
    demo_sizes = [s.strip() for s in args.demo_sizes.split(",") if s.strip()]
    if set(demo_sizes) - set(SIZES):
        raise SystemExit(f"unknown --demo-sizes {sorted(set(demo_sizes) - set(SIZES))}; known: {list(SIZES)}")
    devices, skipped = resolve_devices(args.devices)
    if "parity" in sections and args.parity_steps is not None and args.parity_steps < 8:
        raise SystemExit("--parity-steps must be at least 8")
    results: dict = {"env": environment(devices), "skipped": skipped, "errors": [],
                     "demo": [], "train": [], "sample": [], "parity": []}

    def save() -> None:  # after every section, so a run cut short still leaves its tables
        env = results["env"]
        header = (f"Card: {env.get('gpu', 'none (CPU only)')}; CPU: {env['cpu']}, {env['threads']} torch threads; "
                  f"torch {env['torch']}; {env['date']}\n\nCommand: `{env['command']}`\n")
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(header + "\n" + tables(results) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    for device in devices:
        cuda = device.type == "cuda"
        reps = args.repeats or (50 if cuda else None)
        warm = args.warmup if args.warmup is not None else (5 if cuda else None)
        for section in ("demo", "train", "sample", "parity"):
            if section not in sections:
                continue
            try:
                if section == "demo":
                    rows = bench_demo(device, reps or 21, warm if warm is not None else 3, demo_sizes, paths)
                elif section == "train":
                    rows = bench_train(device, batches, paths, reps or 2, warm if warm is not None else 1,
                                       bf16_peak(device, args.peak_tflops))
                elif section == "sample":
                    rows = bench_sample(device, batches, paths, reps or 2, warm if warm is not None else 1)
                else:
                    size = args.parity_size or ("paper" if cuda else "small")
                    parity_path = args.parity_path
                    steps = args.parity_steps or (2000 if cuda else 300)
                    rows = [bench_parity(device, size, steps, args.parity_batch or (16 if cuda else 64),
                                         args.parity_lr or (PAPER_LR if size == "paper" else 5e-4), parity_path,
                                         args.parity_window or max(1, steps // 20),
                                         args.parity_noise_path or "plain")]
            except Exception as e:  # report it and go on with the next section (device time is scarce)
                if not cuda:
                    raise
                traceback.print_exc()
                results["errors"].append(f"{device.type} {section}: {type(e).__name__}: {e}")
                save()
                continue
            results[section] += rows
            print(tables({section: rows}), flush=True)
            save()
    env = results["env"]
    print(f"Card: {env.get('gpu', 'none (CPU only)')}; CPU: {env['cpu']}, {env['threads']} torch threads; "
          f"torch {env['torch']}; {env['date']}\nCommand: `{env['command']}`")
    for reason in skipped:
        print(f"CUDA: not run ({reason}).")
    for err in results["errors"]:
        print(f"ERROR in {err}")
    save()
    return results

if __name__ == "__main__":
    main()
