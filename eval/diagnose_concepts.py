"""Diagnosis of issue 13 item 2: why the ColorMNIST concept INN e plateaus at a shared-factor correlation ~0.165.

1. Encode ColorMNIST pairs (``ColorMNISTPairs``, train seed 0 / test seed 1, as the concepts stage) once with the
   embedded autoencoder (posterior means and stds, cached in --cache).
2. Train small ``FactorINN``s on the cached latents with the project's ``pair_loss``, varying one thing at a time.
3. Measure on held-out test pairs the project's number (train/concepts.py ``eval_fn``): for pairs sharing concept k,
   mean over pairs and over the dimensions d of factor k of e_k,d(a) e_k,d(b) (ideal rho), on posterior samples.
   Also the per-dimension profile inside each factor (sorted), which separates "a few dimensions at rho, the rest 0"
   from "every dimension weakly correlated".

Usage: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python eval/diagnose_concepts.py [--only NAME ...] [--steps N]
Library code is not changed; everything here is read-only use of invint_hub.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from invint_hub.autoencoder import Autoencoder
from invint_hub.concepts import ColorMNISTPairs, FactorINN, estimate_factor_dims, pair_loss
from invint_hub.data import ColorMNIST

NAMES = ["digit", "fg", "bg", "residual"]
EMBEDDED = [9, 11, 16, 28]  # the embedded pipeline's estimated sizes


@torch.no_grad()
def encode_pairs(ae, pairs, n, bs=500):
    out = {k: [] for k in ("mean_a", "std_a", "mean_b", "std_b", "factors")}
    for i in range(0, n, bs):
        x, f = pairs.get_batch(torch.arange(i, min(i + bs, n)))
        for h, s in ((0, "a"), (1, "b")):
            post = ae.encode(x[:, h])
            out[f"mean_{s}"].append(post.mean.float())
            out[f"std_{s}"].append(post.std.float())
        out["factors"].append(f)
    return {k: torch.cat(v) for k, v in out.items()}


def load_cache(args):
    path = Path(args.cache)
    if path.exists():
        return torch.load(path, weights_only=True)  # (a dict of tensors: nothing to unpickle)
    t0 = time.time()
    ae = Autoencoder.from_pretrained(Path(args.pipeline) / "autoencoder").eval()
    tr = ColorMNISTPairs.from_dataset(ColorMNIST("train", 32, args.data_dir, limit=args.n_train), ("digit", "fg", "bg"), seed=0)
    te = ColorMNISTPairs.from_dataset(ColorMNIST("test", 32, args.data_dir, limit=args.n_test), ("digit", "fg", "bg"), seed=1)
    cache = {"train": encode_pairs(ae, tr, len(tr)), "test": encode_pairs(ae, te, len(te))}
    torch.save(cache, path)
    print(f"[cache] encoded {len(tr)} train + {len(te)} test pairs in {time.time() - t0:.0f} s -> {path}", flush=True)
    return cache


def latents(d, idx, mode, g=None):
    za, zb = d["mean_a"][idx], d["mean_b"][idx]
    if mode == "sample":
        za = za + d["std_a"][idx] * torch.randn(za.shape, generator=g)
        zb = zb + d["std_b"][idx] * torch.randn(zb.shape, generator=g)
    return za, zb, d["factors"][idx]


def loss_fn(variant, ea, la, eb, lb, f, sizes, rho):
    if variant == "project":
        return pair_loss(ea, la, eb, lb, f, sizes, rho)
    raise ValueError(variant)


@torch.no_grad()
def evaluate(model, d, sizes, mode="sample", seed=123):
    """The project's eval_fn measure, on all cached test pairs; plus sorted per-dimension profiles."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    za, zb, f = latents(d, torch.arange(len(d["factors"])), mode, g)
    ea, eb = model(za)[0], model(zb)[0]
    res, prof = {}, {}
    for k in range(len(sizes) - 1):
        sel = f == k
        pa, pb = torch.split(ea[sel], sizes, 1), torch.split(eb[sel], sizes, 1)
        res[NAMES[k]] = {NAMES[j]: float((pa[j] * pb[j]).mean()) for j in range(len(sizes))}
        prof[NAMES[k]] = sorted([round(float(v), 2) for v in (pa[k] * pb[k]).mean(0)], reverse=True)
    shared = sum(res[n][n] for n in NAMES[:-1]) / 3
    others = [abs(res[a][b]) for a in NAMES[:-1] for b in NAMES if b != a]
    model.train()
    return {"shared_corr": shared, "unshared_corr": sum(others) / len(others),
            "per_concept": {n: round(res[n][n], 3) for n in NAMES[:-1]}, "profiles": prof}


def train(cache, sizes, steps=2000, hidden=128, depth=1, n_flows=12, mode="sample", variant="project",
          rho=0.975, lr=5e-4, bs=128, seed=0, eval_at=(), mixing="shuffle"):
    torch.manual_seed(seed)
    d = cache["train"]
    n = len(d["factors"])
    model = FactorINN(64, n_flows, hidden, depth, seed, list(sizes), NAMES, rho, mixing)
    g = torch.Generator().manual_seed(seed)
    za, zb, _ = latents(d, torch.randperm(n, generator=g)[:bs], mode, g)
    with torch.no_grad():  # data-dependent ActNorm init, as the stage
        model(torch.cat([za, zb]))
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    hist, t0 = {}, time.time()
    for s in range(steps):
        idx = torch.randint(n, (bs,), generator=g)
        za, zb, f = latents(d, idx, mode, g)
        e, ld = model(torch.cat([za, zb]))
        loss = loss_fn(variant, e[:bs], ld[:bs], e[bs:], ld[bs:], f, sizes, rho)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if s + 1 in eval_at:
            hist[s + 1] = round(evaluate(model, cache["test"], sizes, mode="sample")["shared_corr"], 3)
    out = evaluate(model, cache["test"], sizes, mode="sample")
    out.update(train_s=round(time.time() - t0, 1), final_loss=round(float(loss.detach()), 2), curve=hist)
    return out


def canonical(d, top=6):
    """Per concept: top eigenvalues of the symmetrised cross-correlation of za, zb after whitening with their pooled
    covariance, i.e. the best per-dimension pair correlations a *linear* e could reach (train pairs, means)."""
    out = {}
    for k, n in enumerate(NAMES[:-1]):
        s = d["factors"] == k
        if s.sum() < 200:
            continue
        a, b = d["mean_a"][s].double(), d["mean_b"][s].double()
        z = torch.cat([a, b])
        mu = z.mean(0)
        w = torch.linalg.inv(torch.linalg.cholesky(torch.cov((z - mu).T) + 1e-6 * torch.eye(z.shape[1])))
        m = ((a - mu) @ w.T).T @ ((b - mu) @ w.T) / len(a)
        out[n] = [round(float(x), 3) for x in torch.linalg.eigvalsh(0.5 * (m + m.T)).flip(0)[:top]]
    return out


@torch.no_grad()
def digit_pairs_same_colours(args, n=6000, top=12):
    """Canonical correlations (top 12) of pairs whose second image keeps the first's colours (a probe, not a training
    construction): same digit vs a random other digit (control). Directions beyond the control's (the colours) that
    are high only with the same digit are linear digit features once the colours are fixed; the ordinary digit pairs
    (new colours for the second image) have none, because the digit's shape sits in the latent multiplied by the
    colour contrast fg - bg, which a new pair of colours scrambles."""
    ae = Autoencoder.from_pretrained(Path(args.pipeline) / "autoencoder").eval()
    tr = ColorMNISTPairs.from_dataset(ColorMNIST("train", 32, args.data_dir, limit=n), ("digit",), seed=0)
    s = tr.sample(torch.arange(n))
    xa = tr._paint(torch.arange(n), s["fg_a"], s["bg_a"])
    out = {}
    for name, j in (("same digit", s["j"]), ("random digit (control)", torch.randperm(n, generator=torch.Generator().manual_seed(5)))):
        xb = tr._paint(j, s["fg_a"], s["bg_a"])
        d = {"mean_a": ae.encode(xa).mean.float(), "mean_b": ae.encode(xb).mean.float(), "factors": torch.zeros(n, dtype=torch.long)}
        out[name] = canonical(d, top)["digit"]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", default="invint_hub/pretrained/colormnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default="/tmp/diagnose_concepts_latents.pt")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--probe", action="store_true", help="also probe the latents for the digit (linear vs MLP)")
    p.add_argument("--out", default="/tmp/diagnose_concepts.json")
    p.add_argument("--custom", default=None, metavar="JSON",
                   help='one more run named "custom" with these train() settings, e.g. '
                        '\'{"sizes": [3, 3, 3, 55], "hidden": 256, "depth": 2, "mixing": "linear"}\'')
    args = p.parse_args()
    torch.set_num_threads(1)
    cache = load_cache(args)

    # facts about the latents: posterior noise vs spread of the means, and the IIN dimension estimate on them
    tr = cache["train"]
    spread = tr["mean_a"].std(0)
    noise = tr["std_a"].mean(0)
    print(f"[latents] per-dim std of posterior means: median {spread.median():.3f}; mean posterior std: median "
          f"{noise.median():.3f}; dims with posterior std > 0.5 x spread: {int((noise > 0.5 * spread).sum())}/64")
    dims, scores = estimate_factor_dims(tr["mean_a"][:10000], tr["mean_b"][:10000], tr["factors"][:10000], 3, 64)
    print(f"[latents] IIN dimension estimate on means: dims {dims}, scores {[round(s, 3) for s in scores]}")

    print(f"[latents] symmetric canonical correlations of za, zb per concept (linear ceiling): {canonical(tr)}")
    if args.probe:
        print(f"[latents] digit pairs with the colours kept: canonical correlations {digit_pairs_same_colours(args)}")
        print(f"[latents] digit probe test accuracy on the first halves' means: {digit_probe(cache, args.data_dir)}", flush=True)

    S = args.steps
    exps = {
        # name: (kwargs, what varies)
        "baseline": dict(sizes=EMBEDDED),
        "sizes_3_3_3": dict(sizes=[3, 3, 3, 55]),
        "sizes_2_3_3": dict(sizes=[2, 3, 3, 56]),
        "sizes_6_6_6": dict(sizes=[6, 6, 6, 46]),
        "sizes_1_1_1": dict(sizes=[1, 1, 1, 61]),
        "baseline_means": dict(sizes=EMBEDDED, mode="mean"),
        "baseline_hidden512": dict(sizes=EMBEDDED, hidden=512),
        "baseline_4xsteps": dict(sizes=EMBEDDED, steps=4 * S),
        "sizes_3_3_3_4xsteps": dict(sizes=[3, 3, 3, 55], steps=4 * S),
        "sizes_2_3_3_hidden512_depth2": dict(sizes=[2, 3, 3, 56], hidden=512, depth=2),  # the paper's e width/depth
    }
    if args.custom:
        exps["custom"] = json.loads(args.custom)
    results = {}
    if Path(args.out).exists():
        results = json.loads(Path(args.out).read_text())
    for name, kw in exps.items():
        if args.only and name not in args.only:
            continue
        kw = dict(kw)
        steps = kw.pop("steps", S)
        r = train(cache, steps=steps, eval_at=tuple(x for x in (S // 4, S // 2, S, 2 * S) if x < steps), **kw)
        r["setting"] = dict(kw, steps=steps)
        results[name] = r
        print(f"[{name}] {json.dumps(r['setting'])}: shared {r['shared_corr']:.3f} {r['per_concept']} unshared "
              f"{r['unshared_corr']:.3f} curve {r['curve']} ({r['train_s']} s)\n    profiles {r['profiles']}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))



def digit_probe(cache, data_dir=None, steps=1500, seed=0):
    """Is the digit in the autoencoder latent, linearly and non-linearly? Probes on the first halves' means."""
    labels = ColorMNIST("train", 32, data_dir, limit=len(cache["train"]["factors"])).labels.long()
    tl = ColorMNIST("test", 32, data_dir, limit=len(cache["test"]["factors"])).labels.long()
    za, zt = cache["train"]["mean_a"], cache["test"]["mean_a"]
    mu, sd = za.mean(0), za.std(0)
    out = {}
    for name, hidden in (("linear", None), ("mlp_256x2", 256)):
        torch.manual_seed(seed)
        net = torch.nn.Linear(64, 10) if hidden is None else torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(steps):
            i = torch.randint(len(za), (256,))
            loss = torch.nn.functional.cross_entropy(net((za[i] - mu) / sd), labels[i])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            out[name] = float((net((zt - mu) / sd).argmax(1) == tl).float().mean())
    return out


if __name__ == "__main__":
    main()
