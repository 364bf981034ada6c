"""Time one classifier training step on this CPU in fp32 and under bf16 autocast: why training falls back to fp32
on CPUs without native bf16 kernels (``invint_hub.train.cli.cpu_bf16_fallback``).

    python -m eval.bench_classifier_step --config configs/cifar10.yaml --threads 2 --out eval/results/bench_classifier_step.md

The step is the classifier stage's: forward of the config's ``Backbone`` on a random batch of its image size, cross-
entropy, backward, SGD update. The first ``--warmup`` steps are not timed; the table gives the median of ``--steps``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from invint_hub import Backbone
from invint_hub.train.config import data_settings, load_config, model_settings


def step_seconds(model: Backbone, x: torch.Tensor, y: torch.Tensor, bf16: bool, steps: int, warmup: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10.yaml")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    data = data_settings(cfg)
    kwargs = dict(in_channels=data["channels"], image_size=data["image_size"], num_classes=data.get("num_classes") or 10)
    kwargs.update(model_settings(cfg, "classifier"))
    torch.manual_seed(0)
    model = Backbone(**kwargs).train()
    x = torch.randn(args.batch_size, data["channels"], data["image_size"], data["image_size"])
    y = torch.randint(0, kwargs["num_classes"], (args.batch_size,))
    fp32 = step_seconds(model, x, y, False, args.steps, args.warmup)
    bf16 = step_seconds(model, x, y, True, args.steps, args.warmup)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    lines = [
        f"# One classifier training step: `{args.config}`, batch {args.batch_size}, {args.threads} threads",
        "",
        f"`python -m eval.bench_classifier_step --config {args.config} --threads {args.threads}"
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; oneDNN native bf16: {native}; torch {torch.__version__}.",
        "",
        "| path | s per step (median of %d) |" % args.steps,
        "|---|---|",
        f"| fp32 | {fp32:.2f} |",
        f"| bf16 autocast | {bf16:.2f} |",
        "",
        f"bf16 / fp32: {bf16 / fp32:.2f}x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
