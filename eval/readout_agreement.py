"""Class agreement of a frozen ImageNet network's samples on CIFAR-10, read two ways: its own ImageNet top-1, and a
CIFAR-10 linear readout of its features.

    python -m eval.readout_agreement --pipeline cifar10-efficientnet_lite0 \
        --out eval/results/cifar10-efficientnet_lite0/readout.md

The ImageNet top-1 of an ImageNet network on 32 px CIFAR-10 photos is fragile: among 1,000 fine-grained classes
a small change of the image often moves it to a neighbour (the table measures how often blurring to 16 px and back
changes it). So next to it this script fits a linear readout (multinomial logistic regression on the standardised
``--feature-layer`` features, L-BFGS) on ``--train`` CIFAR-10 training images and asks the same questions with its
10 CIFAR-10 classes: on the first ``--images`` test images, does the readout give the same class for
- a plain reconstruction D(E(x)) (the ceiling: the autoencoder's loss caps every sample),
- ``--samples`` samples D(t^-1(v|z)) per image at each layer (v ~ N(0, I), seeded),
as for x? The readout reads the network's features; it is not trained on reconstructions or samples.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from invint_hub import InvariancePipeline
from invint_hub.data import build_dataset


def fit_readout(feats: torch.Tensor, labels: torch.Tensor, steps: int = 200, l2: float = 1e-3):
    """Linear readout on standardised features; returns ``predict(features) -> classes``."""
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mu) / sd
    k = int(labels.max()) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, labels) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: (((f - mu) / sd) @ w + b).argmax(1)


@torch.no_grad()
def heads(pipe: InvariancePipeline, x: torch.Tensor, layer: str, batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(features at ``layer`` (N, D) float, ImageNet top-1 (N,)) of images x."""
    fs, top = [], []
    for i in range(0, len(x), batch):
        out = pipe.backbone.forward_layers(x[i : i + batch], [layer, pipe.backbone.logits_layer])
        fs.append(out[layer].flatten(1).float())
        top.append(out[pipe.backbone.logits_layer].argmax(1))
    return torch.cat(fs), torch.cat(top)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--feature-layer", default="pre_logits")
    ap.add_argument("--train", type=int, default=5000, help="training images of the readout")
    ap.add_argument("--images", type=int, default=1000, help="test images")
    ap.add_argument("--samples", type=int, default=2, help="samples per image and layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    pipe = InvariancePipeline.from_pretrained(args.pipeline)
    data = {"name": pipe.info["dataset"], "image_size": pipe.image_size, "channels": pipe.channels,
            "train_split": "train", "test_split": "test"}
    tr = build_dataset(data, "train_split", limit=args.train)
    te = build_dataset(data, "test_split", limit=args.images)
    xtr, ytr = tr.get_batch(torch.arange(len(tr)))
    x, y = te.get_batch(torch.arange(len(te)))
    layer = args.feature_layer
    read = fit_readout(heads(pipe, xtr, layer)[0], torch.as_tensor(ytr).long())
    fx, tx = heads(pipe, x, layer)
    rx = read(fx)
    rows = {}

    def agree(imgs: torch.Tensor, reps: int = 1) -> tuple[float, float]:
        f, t = heads(pipe, imgs, layer)
        return (float((read(f) == rx.repeat_interleave(reps)).float().mean()),
                float((t == tx.repeat_interleave(reps)).float().mean()))

    with torch.no_grad():
        recon = torch.cat([pipe.reconstruct(x[i : i + 200]) for i in range(0, len(x), 200)])
        blur = F.interpolate(F.interpolate(x, size=16, mode="bilinear", antialias=True), size=pipe.image_size,
                             mode="bilinear")
        rows["blurred to 16 px and back (no model)"] = agree(blur)
        rows["reconstruction D(E(x)) (ceiling)"] = agree(recon)
        for l in pipe.layers:
            s = torch.cat([pipe.sample_invariances(x[i : i + 100], l, n=args.samples, seed=args.seed + i).flatten(0, 1)
                           for i in range(0, len(x), 100)])
            rows[f"samples at `{l}`"] = agree(s, args.samples)
    acc = float((rx == torch.as_tensor(y).long()).float().mean())
    ceil = rows["reconstruction D(E(x)) (ceiling)"]
    cmd = ("python -m eval.readout_agreement --pipeline " + args.pipeline
           + "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("pipeline", "out")
                     and v != ap.get_default(k)) + (f" --out {args.out}" if args.out else ""))
    lines = [f"# Class agreement on CIFAR-10 test images: ImageNet top-1 and a CIFAR-10 readout (`{args.pipeline}`)", "",
             f"`{cmd}`", "",
             f"Readout: linear, on `{layer}` features, fitted on {len(tr)} training images; on the first {len(te)} test "
             f"images it reads the true CIFAR-10 class in {100 * acc:.1f} %. Agreement = the same class as for the "
             f"image x itself ({args.samples} samples per image and layer).", "",
             "| images | CIFAR-10 readout agrees with x | ImageNet top-1 agrees with x | readout / ceiling |", "|---|---|---|---|"]
    for k, (r, t) in rows.items():
        lines.append(f"| {k} | {100 * r:.1f} % | {100 * t:.1f} % | {r / ceil[0]:.3f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"readout_accuracy": acc, "rows": {k: {"readout": r, "imagenet_top1": t} for k, (r, t) in rows.items()},
             "command": cmd}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
