"""Why do samples at the deep layers keep the class so rarely? Checks on one pipeline's frozen networks.

    python -m eval.deep_layers --pipeline cifar10 --out eval/results/cifar10_deep_layers.md
    python -m eval.deep_layers --pipeline cifar10 --sections augment --out eval/results/cifar10_deep_layers_augment.md
    python -m eval.deep_layers --pipeline cifar10 --sections fit,jitter --layers logits --autoencoder runs/X/autoencoder

On the first ``--test-images`` test images, where plain reconstructions D(E(x)) set the ceiling of the class
agreement (the share classified like x):

- ``embedded``: the pipeline's own cINNs at temperatures 1, 0.7, 0.5 and 0 (v = 0).
- ``gaussian``: a class-conditional Gaussian of the autoencoder latent (mean and full covariance of the posterior
  means of the ``--train-images`` training images the classifier puts in each class): z_bar ~ N(mu_c, T^2 Sigma_c)
  for the class c of x, decoded and classified. The simplest model of p(z_bar | class): a cINN at logits that keeps
  the class no better than this uses its condition only as a class label.
- ``ridge``: the share of z_bar's variance (test R^2) that a ridge regression from each layer explains (maps
  average-pooled to at most 2048 numbers). An upper bound of a linear use of the condition; compare 1 - the
  variance explained by v.
- ``augment``: a logits cINN (the pipeline's own settings) trained on 1 and on ``--copies`` copies of the training
  split (copy 0 as is, the others cropped and flipped, as ``cinn.augment``), ``--steps`` steps each: test NLL and
  agreement. If memorised latents limited the agreement, more pairs would raise it. Slow on a CPU (each copy is a
  backbone and encoder pass over the training split, 5.5 min on one thread for cifar10; each run 15 min).
- ``fit``: for each of ``--layers``, a cINN with the pipeline's settings for that layer trained from scratch
  (``--steps``) on the training split as it is: test NLL and agreement. With ``--autoencoder DIR`` (another
  autoencoder for the same images, e.g. one trained with a larger KL weight) it measures what that latent does for
  the samples; the sections embedded and augment then refuse to run (the embedded cINNs model the old latent).
- ``jitter``: how close to real latents a sampler of p(z_bar | class) must stay to keep the class. For each test
  image, a random training posterior mean of its class (the classifier's) plus Gaussian noise of ``sigma`` times the
  per-dimension std of z_bar, for sigma 0 (a memorising sampler) to 1; next to it, for the embedded cINNs (T = 1,
  0.5) and the class-conditional Gaussian, the agreement and the distance of their samples to the nearest of the
  ``--train-images`` training latents (root mean square over the standardised dimensions). Two controls that stay
  on the data: the held-out test latent of another test image of the class (what a perfect sampler of
  p(z_bar | class) draws: as far from the training latents as any new image) and the midpoint of two training
  latents of the class.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from invint_hub import InvariancePipeline
from invint_hub.autoencoder import Autoencoder, DiagonalGaussian
from invint_hub.cinn import ConditionalINN
from invint_hub.data import build_dataset
from invint_hub.flows import bits_per_dim, standard_normal_nll
from invint_hub.train.classifier import augment_batch

SECTIONS = ("embedded", "gaussian", "ridge", "augment", "jitter", "fit")


def _data(pipe: InvariancePipeline, split: str, n: int | None, data_dir=None) -> torch.Tensor:
    data = {"name": pipe.info["dataset"], "image_size": pipe.image_size, "channels": pipe.channels,
            "train_split": "train", "test_split": "test"}
    ds = build_dataset(data, split, data_dir, n)
    return ds.get_batch(torch.arange(len(ds)))[0]


@torch.no_grad()
def encode(pipe: InvariancePipeline, x: torch.Tensor, layers: list[str], batch: int = 500) -> tuple[torch.Tensor, dict]:
    """Posterior means (N, d) and each layer's representation of ``x``."""
    means, feats = [], {layer: [] for layer in layers}
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        means.append(pipe.autoencoder.encode(xb).mode().float())
        for layer, z in pipe.backbone.forward_layers(xb, layers).items():
            feats[layer].append(z.float())
    return torch.cat(means), {k: torch.cat(v) for k, v in feats.items()}


@torch.no_grad()
def _agreement(pipe: InvariancePipeline, zbar: torch.Tensor, classes: torch.Tensor) -> float:
    pred = torch.cat([pipe.backbone(pipe.decode(zbar[i : i + 500])).argmax(1) for i in range(0, len(zbar), 500)])
    return (pred == classes).float().mean().item()


@torch.no_grad()
def embedded(pipe: InvariancePipeline, xt: torch.Tensor, layers: list[str], temps=(1.0, 0.7, 0.5, 0.0)) -> dict:
    out = {}
    for layer in layers:
        out[layer] = {str(t): torch.cat([pipe.class_agreement(xt[i : i + 250], layer, n=1, temperature=t, seed=i)
                                         for i in range(0, len(xt), 250)]).mean().item() for t in temps}
    return out


@torch.no_grad()
def gaussian(pipe: InvariancePipeline, ztr: torch.Tensor, ctr: torch.Tensor, ct: torch.Tensor,
             temps=(1.0, 0.5, 0.0), seed: int = 0) -> dict:
    """Agreement of z_bar ~ N(mu_c, T^2 Sigma_c) with the test images' classes ``ct``."""
    g = torch.Generator().manual_seed(seed)
    return {str(t): _agreement(pipe, *gaussian_samples(ztr, ctr, ct, t, g)) for t in temps}


def gaussian_samples(ztr, ctr, ct, t: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """As many draws of N(mu_c, T^2 Sigma_c) per class c as ``ct`` holds, and their classes."""
    d = ztr.shape[1]
    zs, cs = [], []
    for c in ct.unique():
        zc = ztr[ctr == c]
        chol = torch.linalg.cholesky(torch.cov(zc.T) + 1e-4 * torch.eye(d))
        k = int((ct == c).sum())
        zs.append(zc.mean(0) + t * torch.randn(k, d, generator=g) @ chol.T)
        cs.append(torch.full((k,), int(c)))
    return torch.cat(zs), torch.cat(cs)


def nearest_rms(q: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, batch: int = 500) -> float:
    """Median over ``q`` of the distance to the nearest row of ``ref``, per dimension (RMS), in units of ``scale``."""
    r = ref / scale
    d = [torch.cdist(q[i : i + batch] / scale, r).min(1).values for i in range(0, len(q), batch)]
    return (torch.cat(d) / q.shape[1] ** 0.5).median().item()


@torch.no_grad()
def jitter(pipe: InvariancePipeline, ztr: torch.Tensor, ctr: torch.Tensor, zt: torch.Tensor, ct: torch.Tensor,
           xt: torch.Tensor, layers: list[str], sigmas=(0.0, 0.1, 0.2, 0.35, 0.5, 1.0), seed: int = 0) -> dict:
    """Agreement and nearest-training-latent distance of jittered training latents, the cINNs' and the Gaussian's samples."""
    g = torch.Generator().manual_seed(seed)
    scale = ztr.std(0)
    pick, pick2, other = (torch.empty(len(ct), dtype=torch.long) for _ in range(3))
    for c in ct.unique():
        pool = (ctr == c).nonzero().flatten()  # training latents of the class (the classifier's)
        where = (ct == c).nonzero().flatten()  # test images of the class
        pick[where] = pool[torch.randint(0, len(pool), (len(where),), generator=g)]
        pick2[where] = pool[torch.randint(0, len(pool), (len(where),), generator=g)]
        shift = torch.randint(1, max(len(where), 2), (len(where),), generator=g)  # another test image of the class
        other[where] = where[(torch.arange(len(where)) + shift) % len(where)]
    rows = {"held-out test latent of another image of the class (a perfect sampler)": {
        "distance": nearest_rms(zt[other], ztr, scale), "agreement": _agreement(pipe, zt[other], ct)}}
    z = (ztr[pick] + ztr[pick2]) / 2
    rows["midpoint of two training latents of the class"] = {"distance": nearest_rms(z, ztr, scale),
                                                             "agreement": _agreement(pipe, z, ct)}
    for sg in sigmas:
        z = ztr[pick] + sg * scale * torch.randn(len(pick), ztr.shape[1], generator=g)
        rows[f"training latent of the class + noise, sigma {sg}"] = {
            "distance": nearest_rms(z, ztr, scale), "agreement": _agreement(pipe, z, ct)}
    for layer in layers:
        if layer not in pipe.layers:
            continue
        for t in (1.0, 0.5):
            z = torch.cat([pipe.sample_latents(xt[i : i + 250], layer, 1, t, seed=i)[:, 0] for i in range(0, len(xt), 250)])
            rows[f"cINN {layer}, T = {t}"] = {"distance": nearest_rms(z, ztr, scale), "agreement": _agreement(pipe, z, ct)}
    for t in (1.0, 0.5):
        z, c = gaussian_samples(ztr, ctr, ct, t, g)
        rows[f"class-conditional Gaussian, T = {t}"] = {"distance": nearest_rms(z, ztr, scale), "agreement": _agreement(pipe, z, c)}
    return rows


def _flat(z: torch.Tensor, max_features: int = 2048) -> torch.Tensor:
    if z.dim() == 4:
        while z[0].numel() > max_features and min(z.shape[2:]) > 1:
            z = F.avg_pool2d(z, 2)
    return z.flatten(1)


def ridge(ztr: torch.Tensor, ftr: dict, zt: torch.Tensor, ft: dict, lam: float = 1.0) -> dict:
    """Test R^2 of a ridge regression from each layer's (pooled) features to z_bar."""
    out = {}
    for layer in ftr:
        x, xt = _flat(ftr[layer]), _flat(ft[layer])
        mu, sd = x.mean(0), x.std(0) + 1e-3
        xn = torch.cat([(x - mu) / sd, torch.ones(len(x), 1)], 1)
        xtn = torch.cat([(xt - mu) / sd, torch.ones(len(xt), 1)], 1)
        a = torch.linalg.solve(xn.T @ xn + lam * torch.eye(xn.shape[1]), xn.T @ ztr)
        r2 = 1 - ((xtn @ a - zt) ** 2).sum() / ((zt - ztr.mean(0)) ** 2).sum()
        out[layer] = {"features": int(x.shape[1]), "test_r2": r2.item()}
    return out


@torch.no_grad()
def augmented_latents(pipe: InvariancePipeline, x: torch.Tensor, layer: str, copies: int) -> tuple[torch.Tensor, ...]:
    """(posterior means, log-variances, representations) of ``copies`` copies of ``x``; copy 0 as is, copy c
    cropped and flipped with seed 1000 + c."""
    means, logvars, feats = [], [], []
    for c in range(copies):
        g = torch.Generator().manual_seed(1000 + c)
        for i in range(0, len(x), 500):
            xb = x[i : i + 500]
            if c > 0:
                xb = augment_batch(xb, ["crop", "flip"], g)
            post = pipe.autoencoder.encode(xb)
            means.append(post.mean.half())
            logvars.append(post.logvar.half())
            feats.append(pipe.backbone.forward_layers(xb, [layer])[layer].half())
    return torch.cat(means).float(), torch.cat(logvars).float(), torch.cat(feats).float()


def fit_cinn(pipe: InvariancePipeline, layer: str, settings: dict, mean, logvar, z, xt, steps: int, seed: int = 0) -> dict:
    """The pipeline's cINN settings for ``layer`` retrained from scratch on (posterior, z) rows, as the training
    stage does (AdamW betas 0.5 / 0.9, lr 5e-4, 200 warm-up steps, cosine, clip 10, batch 128, z_bar drawn from
    the posterior): test NLL and class agreement (one sample per test image)."""
    torch.manual_seed(seed)
    m = ConditionalINN(**settings)  # the embedded model's arguments (its config.json)
    soft = layer == "softmax"
    cond = (lambda zz: zz.softmax(1)) if soft else (lambda zz: zz)
    n = len(mean)
    with torch.no_grad():
        i0 = torch.randperm(n)[:128]
        m(mean[i0], cond(z[i0]))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-4, betas=(0.5, 0.9), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    const = standard_normal_nll(torch.zeros(1, mean.shape[1]), torch.zeros(1)).item()
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(0, n, (128,), generator=g)
        zb = DiagonalGaussian(torch.cat([mean[idx], logvar[idx]], 1)).sample()
        v, ld = m(zb, cond(z[idx]))
        loss = standard_normal_nll(v, ld).mean() - const
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
        opt.step()
        sched.step()
    m.eval()
    with torch.no_grad():
        zt, ft = encode(pipe, xt, [layer])
        v, ld = m(zt, cond(ft[layer]))
        bpd = bits_per_dim(standard_normal_nll(v, ld).mean(), mean.shape[1]).item()
        p2 = InvariancePipeline(pipe.backbone, pipe.autoencoder, {layer: m})
        agree = torch.cat([p2.class_agreement(xt[i : i + 250], layer, n=1, seed=i)
                           for i in range(0, len(xt), 250)]).mean().item()
    return {"rows": n, "steps": steps, "test_bpd": bpd, "agreement": agree, "seconds": round(time.time() - t0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default="cifar10")
    ap.add_argument("--layers", default="layer3,avgpool,logits")
    ap.add_argument("--sections", default="embedded,gaussian,ridge", help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--train-images", type=int, default=20000, help="for gaussian and ridge (augment: all)")
    ap.add_argument("--fit-images", type=int, default=None, help="fit: train on the first N training images (default all)")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--autoencoder", default=None, metavar="DIR",
                    help="replace the pipeline's autoencoder by this folder's (sections gaussian, ridge, jitter, fit)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    pipe = InvariancePipeline.from_pretrained(args.pipeline)
    layers = args.layers.split(",")
    settings = {layer: t._hub_mixin_config for layer, t in pipe.cinns.items()}  # the embedded cINNs' arguments
    if args.autoencoder:
        # another autoencoder: the embedded cINNs do not model its latent, so only sections that fit their own run
        if "embedded" in sections or "augment" in sections:
            raise SystemExit("--autoencoder: the sections embedded and augment need the pipeline's own autoencoder")
        pipe = InvariancePipeline(pipe.backbone, Autoencoder.from_pretrained(args.autoencoder), {}, pipe.info)
    if "fit" in sections:
        missing = [layer for layer in layers if layer not in settings]
        if missing:
            raise SystemExit(f"--sections fit: {args.pipeline} has no cINN settings for {', '.join(missing)}")
    xt = _data(pipe, "test_split", args.test_images, args.data_dir)
    zt, ft = encode(pipe, xt, layers)
    with torch.no_grad():
        ct = torch.cat([pipe.backbone(xt[i : i + 500]).argmax(1) for i in range(0, len(xt), 500)])
    res = {"pipeline": args.pipeline, "autoencoder": args.autoencoder, "test_images": len(xt),
           "ceiling": _agreement(pipe, zt, ct)}
    cmd = "python -m eval.deep_layers " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    if "embedded" in sections:
        res["embedded"] = embedded(pipe, xt, [l for l in layers if l in pipe.layers])
    if "gaussian" in sections or "ridge" in sections or "jitter" in sections:
        xtr = _data(pipe, "train_split", args.train_images, args.data_dir)
        ztr, ftr = encode(pipe, xtr, layers)
        if "jitter" in sections:
            logits = ftr["logits"] if "logits" in ftr else encode(pipe, xtr, ["logits"])[1]["logits"]
            res["jitter"] = jitter(pipe, ztr, logits.argmax(1), zt, ct, xt, layers)
        if "gaussian" in sections:
            logits = ftr["logits"] if "logits" in ftr else encode(pipe, xtr, ["logits"])[1]["logits"]
            res["gaussian"] = gaussian(pipe, ztr, logits.argmax(1), ct)
        if "ridge" in sections:
            res["ridge"] = ridge(ztr, ftr, zt, ft)
    if "augment" in sections:
        xtr = _data(pipe, "train_split", None, args.data_dir)
        mean, logvar, z = augmented_latents(pipe, xtr, "logits", args.copies)
        n = len(xtr)
        res["augment"] = {"1": fit_cinn(pipe, "logits", settings["logits"], mean[:n], logvar[:n], z[:n], xt, args.steps),
                          str(args.copies): fit_cinn(pipe, "logits", settings["logits"], mean, logvar, z, xt, args.steps)}
    if "fit" in sections:
        xtr = _data(pipe, "train_split", args.fit_images, args.data_dir)
        res["fit"] = {}
        for layer in layers:
            mean, logvar, z = augmented_latents(pipe, xtr, layer, 1)
            res["fit"][layer] = fit_cinn(pipe, layer, settings[layer], mean, logvar, z, xt, args.steps)
    text = render(res, cmd)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2))


def render(res: dict, cmd: str) -> str:
    lines = [f"# Deep-layer samples of `{res['pipeline']}`: what limits their class agreement", "", f"`{cmd}`", "",
             f"First {res['test_images']} test images. Ceiling (plain reconstructions D(E(x)) classified like x): "
             f"**{res['ceiling']:.3f}**." + (f" Autoencoder: `{res['autoencoder']}` instead of the pipeline's."
                                              if res.get("autoencoder") else ""), ""]
    if "embedded" in res:
        temps = list(next(iter(res["embedded"].values())))
        lines += ["## The embedded cINNs, by temperature of v", "", "| layer | " + " | ".join(f"T = {t}" for t in temps)
                  + " |", "|---|" + "---|" * len(temps)]
        lines += [f"| {l} | " + " | ".join(f"{a:.3f}" for a in r.values()) + " |" for l, r in res["embedded"].items()]
        lines.append("")
    if "gaussian" in res:
        lines += ["## A class-conditional Gaussian of z_bar", "", "| T | agreement |", "|---|---|"]
        lines += [f"| {t} | {a:.3f} |" for t, a in res["gaussian"].items()] + [""]
    if "ridge" in res:
        lines += ["## Ridge regression from the layer to z_bar", "", "| layer | features | test R^2 |", "|---|---|---|"]
        lines += [f"| {l} | {r['features']} | {r['test_r2']:.3f} |" for l, r in res["ridge"].items()] + [""]
    if "jitter" in res:
        lines += ["## How close to real latents samples must stay", "",
                  "Distance: median over the samples of the distance to the nearest training latent, RMS over the "
                  "standardised dimensions (in stds of z_bar).", "",
                  "| sampler | distance to the nearest training latent | agreement | agreement / ceiling |", "|---|---|---|---|"]
        for k, r in res["jitter"].items():
            a = "–" if r["agreement"] is None else f"{r['agreement']:.3f}"
            q = "–" if r["agreement"] is None else f"{r['agreement'] / res['ceiling']:.2f}"
            lines.append(f"| {k} | {r['distance']:.3f} | {a} | {q} |")
        lines.append("")
    if "augment" in res:
        lines += ["## The logits cINN on augmented copies of the training split", "",
                  "| copies | rows | steps | test NLL (bits/dim) | agreement | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {r['rows']} | {r['steps']} | {r['test_bpd']:.3f} | {r['agreement']:.3f} | {r['seconds']} |"
                  for k, r in res["augment"].items()] + [""]
    if "fit" in res:
        lines += ["## A cINN with the pipeline's settings, trained on this autoencoder's latent", "",
                  "| layer | rows | steps | test NLL (bits/dim) | agreement | agreement / ceiling | seconds |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {r['rows']} | {r['steps']} | {r['test_bpd']:.3f} | {r['agreement']:.3f} | "
                  f"{r['agreement'] / res['ceiling']:.2f} | {r['seconds']} |" for k, r in res["fit"].items()] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
