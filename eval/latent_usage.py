"""How much of an autoencoder's latent is in use: is the latent size the data's or the bottleneck's?

    python -m eval.latent_usage --pipeline cifar10-efficientnet_lite0 --out eval/results/cifar10_latent_usage.md

On ``--images`` test images: per latent dimension the mean KL of the posterior to N(0, 1) (a dimension the encoder
does not use has KL ~ 0: its posterior is the prior), the number of dimensions above 0.01 / 0.1 nats, and how many
principal components of the posterior means hold 90 / 99 % of their variance. If every dimension is in use and the
variance is spread over nearly all of them, a larger latent could hold more of the images; if many are unused, a
smaller one would do.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from invint_hub import InvariancePipeline
from invint_hub.data import build_dataset


@torch.no_grad()
def usage(pipe: InvariancePipeline, x: torch.Tensor, batch: int = 500) -> dict:
    kl, means = [], []
    for i in range(0, len(x), batch):
        post = pipe.autoencoder.encode(pipe.preprocess(x[i : i + batch]))
        kl.append(0.5 * (post.mean.pow(2) + post.logvar.exp() - 1.0 - post.logvar).float())
        means.append(post.mean.float())
    kl, m = torch.cat(kl).mean(0), torch.cat(means)
    ev = torch.linalg.eigvalsh(torch.cov(m.T.double())).flip(0).clamp_min(0)
    share = ev.cumsum(0) / ev.sum()
    return {"latent_dim": int(m.shape[1]), "images": int(len(x)), "kl_per_dim": kl.tolist(),
            "active_0.01": int((kl > 0.01).sum()), "active_0.1": int((kl > 0.1).sum()),
            "pcs_90": int((share < 0.90).sum()) + 1, "pcs_99": int((share < 0.99).sum()) + 1,
            "kl_total": float(kl.sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe = InvariancePipeline.from_pretrained(args.pipeline)
    data = {"name": pipe.info["dataset"], "image_size": pipe.image_size, "channels": pipe.channels, "test_split": "test"}
    ds = build_dataset(data, "test_split", limit=args.images)
    r = usage(pipe, ds.get_batch(torch.arange(len(ds)))[0])
    kl = sorted(r["kl_per_dim"], reverse=True)
    lines = [f"# Latent usage of the `{args.pipeline}` autoencoder", "",
             f"`python -m eval.latent_usage --pipeline {args.pipeline} --images {args.images}"
             + (f" --out {args.out}`" if args.out else "`"), "",
             f"| latent dims | test images | dims with KL > 0.01 nats | > 0.1 nats | PCs for 90 % / 99 % of the means' variance | total KL (nats) |",
             "|---|---|---|---|---|---|",
             f"| {r['latent_dim']} | {r['images']} | {r['active_0.01']} | {r['active_0.1']} | {r['pcs_90']} / {r['pcs_99']} | {r['kl_total']:.1f} |",
             "", "KL per dimension, sorted: largest " + ", ".join(f"{v:.2f}" for v in kl[:5]) + "; median "
             f"{kl[len(kl) // 2]:.2f}; smallest " + ", ".join(f"{v:.3f}" for v in kl[-5:]) + "."]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
