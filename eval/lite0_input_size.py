"""Which input size to run EfficientNet-Lite0 at on 32 px CIFAR-10 images: class information against cost.

    python -m eval.lite0_input_size --out eval/results/lite0_input_size.md

For each side S the 32 px images are resized to S (the backbone's own bicubic resize) and Lite0's ImageNet
``pre_logits`` features (1280-d) are read. A multinomial logistic regression (a linear probe, L-BFGS on standardised
features) trained on ``--train`` CIFAR-10 training images is scored on ``--test`` test images: how much of CIFAR's
class information the frozen ImageNet network sees at that size. Next to it: the mean top-1 ImageNet probability
(how sure the network is), and the forward time per image (batch 64, this machine's threads).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from invint_hub import Backbone
from invint_hub.data import build_dataset

from .readout_agreement import fit_readout


def features(b: Backbone, ds, n: int, batch: int = 64):
    feats, conf, ys, secs = [], [], [], 0.0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        x, y = ds.get_batch(idx) if hasattr(ds, "get_batch") else (torch.stack([ds[int(j)][0] for j in idx]), torch.tensor([int(ds[int(j)][1]) for j in idx]))
        t = time.perf_counter()
        with torch.no_grad():
            out = b.forward_layers(x, ["pre_logits", "softmax"])
        secs += time.perf_counter() - t
        feats.append(out["pre_logits"].float())
        conf.append(out["softmax"].max(1).values)
        ys.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(conf), torch.cat(ys), secs / n


def probe(xtr, ytr, xte, yte) -> float:
    """Test accuracy of a linear readout (``eval.readout_agreement.fit_readout``) fitted on the training features."""
    return (fit_readout(xtr, ytr)(xte) == yte).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128, 160, 224])
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = dict(name="cifar10", image_size=32, channels=3, train_split="train", test_split="test")
    tr = build_dataset(data, "train_split", args.data_dir, args.train)
    te = build_dataset(data, "test_split", args.data_dir, args.test)
    rows = []
    for s in args.sizes:
        b = Backbone.from_timm("tf_efficientnet_lite0", pretrained=True, image_size=32, input_size=s).eval()
        xtr, ctr, ytr, sec = features(b, tr, args.train)
        xte, cte, yte, _ = features(b, te, args.test)
        acc = probe(xtr, ytr, xte, yte)
        rows.append((s, acc, cte.mean().item(), sec * 1000))
        print(f"S={s}: linear probe {acc:.3f}, mean top-1 prob {cte.mean():.3f}, {sec * 1000:.2f} ms/image", flush=True)
    lines = ["# EfficientNet-Lite0 on CIFAR-10: input size against class information and cost", "",
             f"`python -m eval.lite0_input_size{' --out ' + args.out if args.out else ''}` ({torch.get_num_threads()} threads; "
             f"probe: {args.train} training / {args.test} test images, 32 px resized to S, bicubic)", "",
             "| input side S | linear probe on pre_logits (CIFAR-10 test) | mean top-1 ImageNet probability | forward ms / image |",
             "|---|---|---|---|"]
    lines += [f"| {s} | {a * 100:.1f} % | {c:.3f} | {ms:.2f} |" for s, a, c, ms in rows]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
