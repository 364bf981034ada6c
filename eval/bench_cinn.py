"""Benchmark the cINN's straightforward and fast paths (issue 6).

    python -m eval.bench_cinn                                   # CPU, and CUDA when present
    python -m eval.bench_cinn --devices cpu --sections demo     # CPU demo sampling latency only
    python -m eval.bench_cinn --markdown eval/results/bench_cinn.md

Both paths are the same ``ConditionalINN`` with the same parameters: "plain" is the
straightforward eager model (``model.fast(False)``, fp32, ``torch.optim.Adam``), "fast" is
``model.fast(True)`` (stacked s/t subnets in batched matmuls, no host synchronisation; for
training the parameters of each subnet layer share one stacked storage, so a step stacks them as
views; for inference cached weights, one gather + one addcmul per block, in-place couplings and
the embedder's ActNorms folded into its Linear/Conv weights) plus, on CUDA, a fused capturable
Adam and the whole training step replayed as one CUDA graph, optionally with bf16 autocast
(log-determinants in fp32).

Sections (``--sections``, comma list):
  demo    16 samples for the demo sizes (MNIST cINN with a flat and a spatial condition, and
          the paper size); median latency of ``--repeats`` interleaved calls after warm-up.
  train   training steps/s at ``--batches`` for the paper size, with TFLOP/s (FLOPs counted by
          ``torch.utils.flop_counter`` on the plain step) and, on CUDA, the share of the card's
          bf16 matrix peak; ``--big-batch`` adds one large fast-path batch on CUDA.
  sample  samples/s at ``--batches`` for the paper size (one sample per representation).
  parity  NLL curves of plain and fast over ``--parity-steps`` steps on the same synthetic data,
          against the run-to-run noise of a second seed.

CPU timings on a shared machine are noisy: every comparison runs both paths in one process,
interleaved, so both see the same contention.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from invint_hub.cinn import ConditionalINN

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
# "plain": the straightforward eager model; "fast": the fast path in fp32; "fast-bf16": its subnet
# matmuls in bf16 (autocast while training), the flow's state and log-determinant in fp32.
PATHS: dict[str, torch.dtype | None] = {"plain": None, "fast": None, "fast-bf16": torch.bfloat16}
PAPER_LR, PAPER_BETAS = 7.2e-5, (0.5, 0.9)  # 4.5e-6 x batch 16, official configs
# Dense bf16 tensor-core peak (spec sheets, TFLOP/s), matched against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


# ---------------------------------------------------------------------------------------------
# models, data, timing
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


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def make_adam(params, fused: bool, capturable: bool, lr: float) -> torch.optim.Optimizer:
    """Adam with the paper's betas; ``fused`` falls back to the default kernel where unsupported."""
    params = list(params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=PAPER_BETAS, fused=True, capturable=capturable)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, betas=PAPER_BETAS, capturable=capturable)


def nll_loss(model: ConditionalINN, zbar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The training loss of ``train.py``: mean of 0.5 |v|^2 - logdet (constant dropped), in fp32."""
    v, logdet = model(zbar, z)
    return (0.5 * v.float().pow(2).sum(1) - logdet).mean()


class TrainStep:
    """One optimisation step of ``model`` on (zbar, z); returns the loss (a device tensor, no sync).

    With ``graph=True`` (CUDA) the first ``warmup`` calls run eagerly on a side stream, the next
    call captures forward + backward + optimizer step as one CUDA graph, and every call from then
    on copies its batch into the graph's static inputs and replays it. Every call is a real step,
    so a graphed run and an eager run see the same sequence of updates. The optimizer must be
    ``capturable`` for graphs. ``autocast`` runs the forward in that dtype (bf16); the fast path
    keeps the flow's state and its log-determinant in fp32.
    """

    def __init__(self, model: ConditionalINN, opt: torch.optim.Optimizer, graph: bool = False,
                 autocast: torch.dtype | None = None, warmup: int = 3):
        self.model, self.opt, self.graph, self.autocast, self.warmup = model, opt, graph, autocast, warmup
        self.calls = 0
        self._g: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _body(self, zbar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        device_type = zbar.device.type
        # the autocast weight cache must be off under graph capture
        with torch.autocast(device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                            cache_enabled=False if self.graph else None):
            loss = nll_loss(self.model, zbar, z)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, zbar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.graph:
            self.opt.zero_grad(set_to_none=True)
            return self._body(zbar, z)
        if self._g is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                loss = self._body(zbar, z)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self._g is None:
            static_zbar, static_z = zbar.clone(), z.clone()
            self.opt.zero_grad(set_to_none=True)
            self._g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._g):
                static_loss = self._body(static_zbar, static_z)
            self._static = (static_zbar, static_z, static_loss)
        static_zbar, static_z, static_loss = self._static
        static_zbar.copy_(zbar)
        static_z.copy_(z)
        self._g.replay()
        return static_loss


def make_step(model: ConditionalINN, path: str, device: torch.device, lr: float) -> TrainStep:
    """'plain': eager fp32 + Adam (default kernels); 'fast'/'fast-bf16': fast path + fused Adam
    (+ on CUDA a capturable optimizer and the whole step as one CUDA graph; + bf16 autocast)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; known: {list(PATHS)}")
    model.train()
    if path == "plain":
        model.fast(False)
        return TrainStep(model, make_adam(model.parameters(), fused=False, capturable=False, lr=lr))
    model.fast(True)
    model.flow.stack_parameters()  # the one-time move into stacked storage (else the first fast step does it)
    cuda = device.type == "cuda"
    opt = make_adam(model.parameters(), fused=True, capturable=cuda, lr=lr)
    return TrainStep(model, opt, graph=cuda, autocast=PATHS[path])


def dtype_name(path: str) -> str:
    return str(PATHS[path] or torch.float32).replace("torch.", "")


def count_step_flops(model: ConditionalINN, batch: int, device: torch.device) -> int:
    """Matmul/conv FLOPs of one plain training step (forward + backward) at ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).train().fast(False)
    zbar = torch.randn(batch, m.latent_dim, device=device)
    z = torch.randn(batch, *m.cond_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        nll_loss(m, zbar, z).backward()
    return int(counter.get_total_flops())


def count_step_ops(path: str, device: torch.device) -> int:
    """Kernel-launching aten ops (views and allocations excluded) of one training step of a model with
    the paper's structure (20 blocks, depth 2; narrow, as the count does not depend on the width).
    A device-independent proxy for the kernel launches per step; the fast path is counted eagerly
    (its CUDA graph replays exactly these kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"empty", "empty_strided", "_local_scalar_dense", "detach", "lift_fresh"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.__name__.split(".")[0] not in free:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    spec = dict(SIZES["paper"], hidden=8, cond_shape=[64])
    torch.manual_seed(0)
    model = ConditionalINN(**spec).to(device)
    zbar, z = torch.randn(16, spec["latent_dim"], device=device), torch.randn(16, 64, device=device)
    with torch.no_grad():
        model.train()(zbar, z)
    step = make_step(model, path, device, PAPER_LR)
    step.graph = False  # count eagerly
    step(zbar, z)
    with Count():
        step(zbar, z)
    return Count.n


def count_call_ops(fn: Callable[[], object]) -> int:
    """The aten ops (views included: each is a dispatch too) that one call of ``fn`` issues."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def bench_demo(device: torch.device, repeats: int, warmup: int, sizes: list[str], n: int = 16) -> list[dict]:
    """Latency of drawing ``n`` samples for one representation: plain vs fast fp32 vs fast bf16."""
    rows = []
    for size in sizes:
        model = build(size, device)
        z = torch.randn(1, *model.cond_shape, device=device)
        models = {
            "plain": model,
            "fast": copy.deepcopy(model).fast(True),
            "fast-bf16": copy.deepcopy(model).fast(True, dtype=torch.bfloat16),
        }
        gen = {k: torch.Generator(device=device) for k in models}

        def call(k):
            gen[k].manual_seed(0)
            return models[k].sample(z, n=n, generator=gen[k])

        with torch.no_grad():
            ref = call("plain")
            err = {k: ((call(k) - ref).norm() / ref.norm()).item() for k in models}
            ops = {k: count_call_ops(lambda k=k: call(k)) for k in models}
            reps = repeats
            t, c = time_interleaved({k: (lambda k=k: call(k)) for k in models}, reps, warmup, device)
        for k in models:
            rows.append(dict(device=device.type, size=size, params=n_params(model), path=k, samples=n, repeats=reps,
                             ms=1e3 * median(t[k]), speedup=median(t["plain"]) / median(t[k]),
                             cpu_ms=1e3 * median(c[k]), cpu_speedup=median(c["plain"]) / median(c[k]), rel_err=err[k],
                             ops=ops[k]))
        del models
    return rows


def bench_train(device: torch.device, batches: list[int], paths: list[str], repeats: int, warmup: int,
                big_batch: int | None, peak: float | None) -> list[dict]:
    """Paper-size training step: plain eager vs fast, steps/s and TFLOP/s."""
    rows = []
    base_model = build("paper", device)
    flops16 = count_step_flops(base_model, 16, device)  # matmul FLOPs scale linearly with the batch
    ops = {path: count_step_ops(path, device) for path in paths}
    plans = [(b, paths) for b in batches]
    if big_batch and device.type == "cuda" and "fast-bf16" in paths:
        plans.append((big_batch, ["fast-bf16"]))
    for batch, paths in plans:
        g = torch.Generator(device=device).manual_seed(batch)
        zbar = torch.randn(batch, base_model.latent_dim, generator=g, device=device)
        z = torch.randn(batch, *base_model.cond_shape, generator=g, device=device)
        steps, err = {}, {}
        for path in paths:
            try:
                steps[path] = make_step(copy.deepcopy(base_model), path, device, PAPER_LR)
                for _ in range(max(warmup, 4 if device.type == "cuda" else 0)):  # graph warm-up + capture
                    steps[path](zbar, z)
                sync(device)
            except RuntimeError as e:  # out of memory (or a failed capture) at the big batch: report, go on
                if not (isinstance(e, torch.cuda.OutOfMemoryError) or batch == big_batch):
                    raise
                err[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                steps.pop(path, None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        t, c = time_interleaved({k: (lambda s=s: s(zbar, z)) for k, s in steps.items()}, repeats, 0, device)
        flops = flops16 * batch / 16
        for path in paths:
            if path in err:
                rows.append(dict(device=device.type, batch=batch, path=path, error=err[path]))
                continue
            sec = median(t[path])
            tflops = flops / sec / 1e12
            rows.append(dict(device=device.type, batch=batch, path=path, repeats=repeats, ms=1e3 * sec,
                             steps_per_s=1 / sec, tflops=tflops, ops=ops[path],
                             peak_pct=100 * tflops / peak if peak else None,
                             dtype=dtype_name(path),
                             speedup=median(t["plain"]) / sec if "plain" in t else None,
                             cpu_ms=1e3 * median(c[path]),
                             cpu_speedup=median(c["plain"]) / median(c[path]) if "plain" in c else None))
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_sample(device: torch.device, batches: list[int], paths: list[str], repeats: int, warmup: int) -> list[dict]:
    """Paper-size sampling throughput, one sample per representation (the embedder included).

    The fast paths keep their stacked weights cached (inference); on CUDA each call is one graph replay.
    """
    rows = []
    model = build("paper", device)
    models = {k: model if k == "plain" else copy.deepcopy(model).fast(True, dtype=PATHS[k]) for k in paths}
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(batch)
        z = torch.randn(batch, *model.cond_shape, generator=g, device=device)
        v = torch.randn(batch, model.latent_dim, generator=g, device=device)
        fns = {k: (lambda m=m: m.inverse(v, z)) for k, m in models.items()}
        with torch.no_grad():
            if device.type == "cuda":
                fns = {k: graphed(fn) if k != "plain" else fn for k, fn in fns.items()}
            t, c = time_interleaved(fns, repeats, warmup, device)
        for k in fns:
            sec = median(t[k])
            rows.append(dict(device=device.type, batch=batch, path=k, repeats=repeats, ms=1e3 * sec,
                             samples_per_s=batch / sec, dtype=dtype_name(k),
                             speedup=median(t["plain"]) / sec if "plain" in t else None, cpu_ms=1e3 * median(c[k]),
                             cpu_speedup=median(c["plain"]) / median(c[k]) if "plain" in c else None))
    return rows


def graphed(fn: Callable[[], torch.Tensor], warmup: int = 2) -> Callable[[], torch.Tensor]:
    """Capture a no-grad call with static inputs as a CUDA graph; the returned function replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay():
        g.replay()
        return out

    return replay


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
    """Per-step training NLL (nats/sample, constant dropped) of one run; init and data order from ``seed``."""
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


def bench_parity(device: torch.device, size: str, steps: int, batch: int, lr: float, fast_path: str,
                 window: int, noise_path: str = "plain", seed: int = 0) -> dict:
    """Plain vs ``fast_path`` on the same data and seed, against a run with another seed (run-to-run noise).

    The noise run takes ``noise_path`` (``plain``, or a fast path where eager plain steps are slow).
    """
    spec = SIZES[size]
    data = SyntheticConditional(spec["latent_dim"], math.prod(spec["cond_shape"]), 16384, device)
    t0 = time.perf_counter()
    curves = {
        "plain": run_curve(size, "plain", steps, batch, lr, seed, data, device),
        "fast": run_curve(size, fast_path, steps, batch, lr, seed, data, device),
        "seed2": run_curve(size, noise_path, steps, batch, lr, seed + 1, data, device),
    }
    window = max(1, min(window, steps // 4))

    def smooth(c):
        return [statistics.fmean(c[i : i + window]) for i in range(0, len(c) - window + 1, window)]

    sm = {k: smooth(c) for k, c in curves.items()}
    half = len(sm["plain"]) // 2
    diff_fast = statistics.fmean(abs(a - b) for a, b in zip(sm["plain"][half:], sm["fast"][half:]))
    ref = sm["plain" if noise_path == "plain" else "fast"]  # noise: the same recipe with two seeds
    diff_noise = statistics.fmean(abs(a - b) for a, b in zip(ref[half:], sm["seed2"][half:]))
    return dict(
        device=device.type, size=size, params=n_params(ConditionalINN(**spec)), steps=steps, batch=batch, lr=lr,
        fast_path=fast_path, window=window,
        first=sm["plain"][0], final={k: v[-1] for k, v in sm.items()},
        diff_fast=diff_fast, diff_noise=diff_noise, passed=diff_fast <= diff_noise, noise_path=noise_path,
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
                "| device | model | params | path | wall ms | speed-up (wall) | CPU-time ms | speed-up (CPU time) "
                "| rel. error vs plain | ops/call | repeats |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["demo"]:
            out.append(f"| {r['device']} | {r['size']} | {r['params'] / 1e6:.1f} M | {r['path']} | {_f(r['ms'])} | "
                       f"{_f(r['speedup'])}x | {_f(r['cpu_ms'])} | {_f(r['cpu_speedup'])}x | {_f(r['rel_err'], 6)} | "
                       f"{r.get('ops', '-')} | {r['repeats']} |")
        out += ["", "Medians over the repeats. CPU time: this process's CPU seconds per call (the fair comparison "
                    "when other jobs share the cores; on an idle machine the wall clock is the latency). ops/call: "
                    "aten ops dispatched by one call, views included.", ""]
    if results.get("train"):
        out += ["### Training step, paper size (ms per step; TFLOP/s from the counted matmul FLOPs)", "",
                "| device | batch | path | dtype | ms/step | steps/s | TFLOP/s | % bf16 peak | speed-up (wall) "
                "| CPU-time ms | speed-up (CPU time) | ops/step | repeats |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["train"]:
            if "error" in r:
                out.append(f"| {r['device']} | {r['batch']} | {r['path']} | - | {r['error']} | | | | | | | | |")
                continue
            out.append(f"| {r['device']} | {r['batch']} | {r['path']} | {r['dtype']} | {_f(r['ms'])} | "
                       f"{_f(r['steps_per_s'], 3)} | {_f(r['tflops'], 3)} | {_f(r['peak_pct'], 1)} | "
                       f"{_f(r['speedup'])}x | {_f(r['cpu_ms'])} | {_f(r['cpu_speedup'])}x | {r['ops']} | "
                       f"{r['repeats']} |")
        out += ["", "ops/step: kernel-launching aten ops of one training step (forward, backward, optimizer), "
                    "counted eagerly on a model of the same structure; a proxy for kernel launches.", ""]
    if results.get("sample"):
        out += ["### Sampling throughput, paper size (one sample per representation, embedder included)", "",
                "| device | batch | path | dtype | ms/call | samples/s | speed-up (wall) | CPU-time ms "
                "| speed-up (CPU time) | repeats |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["sample"]:
            out.append(f"| {r['device']} | {r['batch']} | {r['path']} | {r['dtype']} | {_f(r['ms'])} | "
                       f"{_f(r['samples_per_s'], 1)} | {_f(r['speedup'])}x | {_f(r['cpu_ms'])} | "
                       f"{_f(r['cpu_speedup'])}x | {r['repeats']} |")
        out.append("")
    for p in results.get("parity", []):
        out += [f"### NLL parity ({p['device']}, model '{p['size']}' {p['params'] / 1e6:.2f} M params, "
                f"{p['steps']} steps, "
                f"batch {p['batch']}, lr {p['lr']}, window {p['window']} steps)", "",
                "| run | NLL first window | NLL last window | curve (every 1/8) |", "|---|---|---|---|"]
        for k in ("plain", "fast", "seed2"):
            name = {"plain": "plain, seed 1", "fast": f"{p['fast_path']}, seed 1",
                    "seed2": f"{p['noise_path']}, seed 2"}[k]
            out.append(f"| {name} | {_f(p['curve_points'][k][0], 3)} | {_f(p['final'][k], 3)} | "
                       f"{' '.join(str(x) for x in p['curve_points'][k])} |")
        verdict = "PASS" if p["passed"] else "FAIL"
        out += ["", f"Second half, mean |windowed NLL difference|: plain vs {p['fast_path']} {p['diff_fast']:.4f}, "
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
    p.add_argument("--paths", default="plain,fast,fast-bf16", help=f"train/sample paths, from {list(PATHS)}")
    p.add_argument("--big-batch", type=int, default=32768, help="CUDA only: one more fast bf16 training batch (0: off)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 matrix peak of the card (default: by name)")
    p.add_argument("--parity-steps", type=int, default=None, help="default: cpu 300, cuda 2000")
    p.add_argument("--parity-size", default=None, choices=list(SIZES), help="default: cpu small, cuda paper")
    p.add_argument("--parity-batch", type=int, default=None, help="default: cpu 64, cuda 16")
    p.add_argument("--parity-lr", type=float, default=None, help="default: paper 7.2e-5, else 5e-4")
    p.add_argument("--parity-window", type=int, default=None, help="steps per smoothing window (default steps // 20)")
    p.add_argument("--parity-path", default=None, choices=["fast", "fast-bf16"],
                   help="fast path compared with plain (default: cpu fast, cuda fast-bf16)")
    p.add_argument("--parity-noise-path", default=None, choices=list(PATHS),
                   help="path of the second-seed run that measures run-to-run noise (default: cpu plain, "
                        "cuda the --parity-path)")
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
                    rows = bench_demo(device, reps or 21, warm if warm is not None else 3, demo_sizes)
                elif section == "train":
                    rows = bench_train(device, batches, paths, reps or 2, warm if warm is not None else 1,
                                       args.big_batch or None, bf16_peak(device, args.peak_tflops))
                elif section == "sample":
                    rows = bench_sample(device, batches, paths, reps or 2, warm if warm is not None else 1)
                else:
                    size = args.parity_size or ("paper" if cuda else "small")
                    parity_path = args.parity_path or ("fast-bf16" if cuda else "fast")
                    steps = args.parity_steps or (2000 if cuda else 300)
                    rows = [bench_parity(device, size, steps, args.parity_batch or (16 if cuda else 64),
                                         args.parity_lr or (PAPER_LR if size == "paper" else 5e-4), parity_path,
                                         args.parity_window or max(1, steps // 20),
                                         args.parity_noise_path or (parity_path if cuda else "plain"))]
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
