"""Reproduce the paper's concept analyses on a ColorMNIST pipeline with a concept INN e.

    python -m eval.concepts_report --pipeline runs/colormnist --config configs/colormnist.yaml \
        --out eval/results/colormnist_concepts [--sections layers,dims,response,transfer,dynamics]

Writes ``<out>/report.md``, ``<out>/results.json`` (every number, the flags and timings) and PNG plots.
Sections (paper numbers in adjacent columns; see ../shared/docs/paper-brief.md §2.2, §2.6):

* ``layers``: share of each concept's variance explained by z at every layer with a cINN (ECCV Fig. 4 measure).
* ``dims``: IIN dimensionality estimate of (digit, colour, residual) on the classifier's representation vs the
  autoencoder latent (IIN README: [22, 11, 31] vs [13, 17, 34] of 64).
* ``response``: resample one factor of e, decode, classify: spread of the predicted class (IIN: digit sigma 2.74,
  colour 0.19, residual 0.0).
* ``transfer``: transfer digit / fg / bg from a source to a target; a separately trained digit classifier reads
  the digit, the colours are measured from the pixels.
* ``dynamics``: a classifier trained from scratch, snapshots across training, a cINN per snapshot; share of digit
  and colour variance explained by z next to the accuracy (ECCV Fig. 4: 4k steps digit 2.57 % / bg 38.44 %,
  36k steps digit 36.08 % / bg 2.76 %). The most expensive section.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from invint_hub.backbones import Backbone
from invint_hub.concepts import ColorMNISTPairs, concept_variance_explained, estimate_factor_dims, network_response
from invint_hub.data import ColorMNIST
from invint_hub.images import grid
from invint_hub.pipeline import InvariancePipeline

SECTIONS = ("layers", "dims", "response", "transfer", "dynamics")
PAPER = {
    "dims": {"classifier": [22, 11, 31], "autoencoder": [13, 17, 34]},  # [digit, colour, residual] of 64 (IIN README)
    "response_sigma": {"digit": 2.74, "colour": 0.19, "residual": 0.0},  # IIN sensitivity figure (one input "7")
    "dynamics": {4000: {"digit": 2.57, "bg": 38.44}, 36000: {"digit": 36.08, "bg": 2.76}},  # ECCV Fig. 4 caption, %
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def test_set(pipe, args) -> ColorMNIST:
    if pipe.info.get("dataset") != "colormnist" or pipe.channels != 3:
        raise SystemExit(f"this report needs a ColorMNIST pipeline, got dataset {pipe.info.get('dataset')!r}")
    return ColorMNIST("test", pipe.image_size, args.data_dir, args.n_test, seed=1)


def batched(fn, x: torch.Tensor, bs: int = 250) -> torch.Tensor:
    return torch.cat([fn(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


def measure_colors(x: torch.Tensor, fg_share: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background colour of ColorMNIST-like images, from the pixels alone: (B, 3) each in [0, 1].

    Background: per-channel median of a 2-pixel border (MNIST digits are centred). Foreground: median of the
    ``fg_share`` of pixels farthest from the background colour.
    """
    img = (x.float().clamp(-1, 1) + 1) / 2
    b, _, h, w = img.shape
    border = torch.cat([img[:, :, :2].flatten(2), img[:, :, -2:].flatten(2), img[:, :, 2:-2, :2].flatten(2),
                        img[:, :, 2:-2, -2:].flatten(2)], 2)
    bg = border.median(2).values
    flat = img.flatten(2)
    dist = (flat - bg[:, :, None]).norm(dim=1)
    k = max(1, int(fg_share * h * w))
    idx = dist.topk(k, dim=1).indices
    fg = torch.gather(flat, 2, idx[:, None].expand(-1, 3, -1)).median(2).values
    return fg, bg


def closer_to_source(measured, source, target, min_gap: float = 0.3) -> tuple[float, int]:
    """Share of images whose measured colour is closer to the source colour than to the target colour, among
    those where source and target differ by more than ``min_gap`` (RGB, [0, 1]); and that count."""
    gap = (source - target).norm(dim=1)
    sel = gap > min_gap
    if not sel.any():
        return float("nan"), 0
    ok = (measured - source).norm(dim=1) < (measured - target).norm(dim=1)
    return ok[sel].float().mean().item(), int(sel.sum())


def pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def load_config(path: str | None, pipe) -> dict:
    if path is None:
        cand = Path("configs") / f"{pipe.info.get('dataset')}.yaml"
        if not cand.is_file():
            raise SystemExit("pass --config (the pipeline's training config; needed to train the reader / the cINNs)")
        path = str(cand)
    return yaml.safe_load(Path(path).read_text())


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def section_layers(pipe, ds, args, out: Path) -> dict:
    x = ds.get_batch(torch.arange(min(len(ds), args.n_images)))[0]
    res = {layer: concept_variance_explained(pipe, layer, x, n=args.n_samples, seed=args.seed) for layer in pipe.layers}
    names = pipe.concepts.factor_names
    lines = ["## Concept variance explained by z, per layer (ECCV Fig. 4 measure)", "",
             f"1 - E_j[Var_v e_k(t^-1(v|z_j))] / Var(e_k) on {x.shape[0]} test images, {args.n_samples} samples of v each.",
             "The paper shows this measure over training for one layer (see `dynamics`); here it is over depth.", "",
             "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {layer} | " + " | ".join(pct(v[n]) for n in names) + " |" for layer, v in res.items()]
    _plot_lines({n: [res[layer][n] for layer in pipe.layers] for n in names}, pipe.layers, "layer",
                "variance explained by z", out / "layers.png")
    lines += ["", "![per layer](layers.png)"]
    return {"table": res, "images": x.shape[0], "samples": args.n_samples, "md": lines}


@torch.no_grad()
def section_dims(pipe, ds, args, out: Path) -> dict:
    n = min(len(ds), args.n_pairs)
    res = {}
    for concepts in (["digit", "color"], ["digit", "fg", "bg"]):
        pairs = ColorMNISTPairs.from_dataset(ds, concepts, seed=args.seed + 7)
        xs, fs = [], []
        for i in range(0, n, 500):
            x, f = pairs.get_batch(torch.arange(i, min(i + 500, n)))
            xs.append(x)
            fs.append(f)
        x, f = torch.cat(xs), torch.cat(fs)
        key = "+".join(concepts)
        res[key] = {}
        za = batched(lambda b: pipe.backbone.representation(b, args.dims_layer).flatten(1), x[:, 0])
        zb = batched(lambda b: pipe.backbone.representation(b, args.dims_layer).flatten(1), x[:, 1])
        dims, scores = estimate_factor_dims(za, zb, f, len(concepts))
        res[key]["classifier"] = {"dims": dims, "scores": scores, "dim": za.shape[1], "layer": args.dims_layer}
        za = batched(lambda b: pipe.autoencoder.encode(b).mode(), x[:, 0])
        zb = batched(lambda b: pipe.autoencoder.encode(b).mode(), x[:, 1])
        dims, scores = estimate_factor_dims(za, zb, f, len(concepts))
        res[key]["autoencoder"] = {"dims": dims, "scores": scores, "dim": za.shape[1]}
    dc = res["digit+color"]
    lines = ["## Factor dimensionality: classifier vs autoencoder (IIN dimension estimate)", "",
             f"{n} test pairs; IIN `dim_callback` (scores -> softmax -> share of the dimensions, residual last).",
             f"Classifier representation: layer `{args.dims_layer}` ({dc['classifier']['dim']}-d); autoencoder: latent mean "
             f"({dc['autoencoder']['dim']}-d). Paper (IIN README): 64-d z of both.", "",
             "| representation | digit | colour | residual | paper digit | paper colour | paper residual |", "|---|---|---|---|---|---|---|"]
    for who in ("classifier", "autoencoder"):
        d = dc[who]["dims"]
        p = PAPER["dims"][who]
        scaled = "" if dc[who]["dim"] == 64 else f" (x64/{dc[who]['dim']}: {[round(v * 64 / dc[who]['dim'], 1) for v in d]})"
        lines.append(f"| {who}{scaled} | {d[0]} | {d[1]} | {d[2]} | {p[0]} | {p[1]} | {p[2]} |")
    c, a = dc["classifier"], dc["autoencoder"]
    more_digit = c["dims"][0] / c["dim"] > a["dims"][0] / a["dim"]
    less_colour = c["dims"][1] / c["dim"] < a["dims"][1] / a["dim"]
    lines += ["", f"Paper's finding (classifier gives digit more and colour fewer dimensions than the autoencoder): "
              f"digit {'reproduced' if more_digit else 'NOT reproduced'}, colour {'reproduced' if less_colour else 'NOT reproduced'}.",
              f"Scores (digit, colour): classifier {[round(s, 3) for s in c['scores'][:2]]}, autoencoder {[round(s, 3) for s in a['scores'][:2]]}.",
              "", "With separate foreground and background colours (this pipeline's concepts):", "",
              "| representation | digit | fg | bg | residual |", "|---|---|---|---|---|"]
    for who in ("classifier", "autoencoder"):
        d = res["digit+fg+bg"][who]["dims"]
        lines.append(f"| {who} | {d[0]} | {d[1]} | {d[2]} | {d[3]} |")
    return {"table": res, "pairs": n, "reproduced": {"digit": more_digit, "colour": less_colour}, "md": lines}


@torch.no_grad()
def section_response(pipe, ds, args, out: Path) -> dict:
    n = min(len(ds), args.n_response)
    x, y = ds.get_batch(torch.arange(n))
    res = {}
    for name in pipe.concepts.factor_names:
        r = network_response(pipe, x, name, n=args.response_samples, seed=args.seed)
        seven = (y == 7).nonzero()
        res[name] = {"sigma": r["std"].mean().item(), "changed": r["changed"].mean().item(),
                     "sigma_first_7": r["std"][seven[0, 0]].item() if len(seven) else None}
    paper_key = {"digit": "digit", "fg": "colour", "bg": "colour", "color": "colour", "residual": "residual"}
    lines = ["## Network response (IIN sensitivity analysis)", "",
             f"For each of {n} test images, one factor of e(E(x)) is replaced by {args.response_samples} draws from N(0, I), "
             "decoded and classified. sigma = std of the predicted class index (the IIN figure's number, there for one "
             "input '7'); changed = share of samples whose class differs from that of the unmodified reconstruction.", "",
             "| factor | sigma (mean over images) | sigma (first '7') | changed | paper sigma |", "|---|---|---|---|---|"]
    for name, r in res.items():
        p = PAPER["response_sigma"].get(paper_key.get(name, ""), None)
        s7 = "n/a" if r["sigma_first_7"] is None else f"{r['sigma_first_7']:.2f}"
        lines.append(f"| {name} | {r['sigma']:.2f} | {s7} | {pct(r['changed'])} | {p if p is not None else '-'} |")
    lines += ["", "Differences: the IIN dIIN acts on the classifier's own 64-d z and reads the class through Psi; here e acts on "
              "the autoencoder latent and the class is read by classifying the decoded image."]
    _plot_bars({k: v["sigma"] for k, v in res.items()}, "sigma of predicted class", out / "response.png")
    lines += ["", "![response](response.png)"]
    return {"table": res, "images": n, "samples": args.response_samples, "md": lines}


def train_reader(pipe, cfg: dict, args, out: Path) -> Backbone:
    """A separately trained digit classifier (other seed, width 32) that reads the digit of transferred images."""
    from invint_hub.train import main as train_main

    rdir = out / "reader"
    if (rdir / "backbone" / "model.safetensors").is_file() and not args.retrain:
        return Backbone.from_pretrained(rdir / "backbone").eval()
    rcfg = {"data": cfg["data"], "classifier": {"model": {"arch": "mnist_cnn", "width": 32},
                                                "train": dict(cfg.get("classifier", {}).get("train", {}), steps=args.reader_steps)}}
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "config.yaml").write_text(yaml.safe_dump(rcfg))
    argv = ["classifier", "--config", str(rdir / "config.yaml"), "--output-dir", str(rdir), "--seed", "1", "--quiet"]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.limit_train:
        argv += ["--limit-train", str(args.limit_train)]
    train_main(argv)
    return Backbone.from_pretrained(rdir / "backbone").eval()


def section_transfer(pipe, ds, args, out: Path, cfg: dict) -> dict:
    reader = train_reader(pipe, cfg, args, out)  # trains with gradients: outside no_grad
    return _transfer_eval(pipe, ds, args, out, reader)


@torch.no_grad()
def _transfer_eval(pipe, ds, args, out: Path, reader: Backbone) -> dict:
    n = min(len(ds), args.n_transfer)
    g = torch.Generator().manual_seed(args.seed + 11)
    t_idx = torch.arange(n)
    # a source with another digit for every target
    s_idx = torch.randperm(len(ds), generator=g)[:n]
    clash = ds.labels[s_idx] == ds.labels[t_idx]
    while clash.any():
        s_idx[clash] = torch.randint(len(ds), (int(clash.sum()),), generator=g)
        clash = ds.labels[s_idx] == ds.labels[t_idx]
    xt, yt = ds.get_batch(t_idx)
    xs, ys = ds.get_batch(s_idx)
    fg_t, bg_t, fg_s, bg_s = ds.fg[t_idx], ds.bg[t_idx], ds.fg[s_idx], ds.bg[s_idx]
    read = lambda x: batched(lambda b: reader(b).argmax(1), x)  # noqa: E731

    # colour estimator floor: on the original test images
    fg_m, bg_m = measure_colors(xt)
    est = {"fg_mae": (fg_m - fg_t).abs().mean().item(), "bg_mae": (bg_m - bg_t).abs().mean().item()}
    rec_t = batched(pipe.reconstruct, xt)
    rows = {}

    def score(name, x):
        d = read(x)
        fg, bg = measure_colors(x)
        rows[name] = {
            "reads_source_digit": (d == ys).float().mean().item(), "reads_target_digit": (d == yt).float().mean().item(),
            "fg_closer_to_source": closer_to_source(fg, fg_s, fg_t)[0], "bg_closer_to_source": closer_to_source(bg, bg_s, bg_t)[0],
            "fg_mae_to_source": (fg - fg_s).abs().mean().item(), "fg_mae_to_target": (fg - fg_t).abs().mean().item(),
            "bg_mae_to_source": (bg - bg_s).abs().mean().item(), "bg_mae_to_target": (bg - bg_t).abs().mean().item(),
        }

    score("target (original)", xt)
    score("target reconstruction (no transfer)", rec_t)
    outs = {}
    for c in pipe.concept_names:
        outs[c] = batched(lambda b, c=c: pipe.transfer(b[:, 0], b[:, 1], c), torch.stack([xt, xs], 1))
        score(f"transfer {c}", outs[c])
    score("source reconstruction", batched(pipe.reconstruct, xs))
    reader_acc = (read(xt) == yt).float().mean().item()
    cols = list(next(iter(rows.values())))
    lines = ["## Concept transfer", "",
             f"{n} (target, source) test pairs with different digits and independent colours. A separately trained digit "
             f"classifier (mnist_cnn width 32, seed 1; accuracy {pct(reader_acc)} on the original test targets) reads the digit. "
             "Colours are measured from the pixels (border median = background; the 8 % of pixels farthest from it = "
             f"foreground); estimator error on the original images: fg {est['fg_mae']:.3f}, bg {est['bg_mae']:.3f} mean abs "
             "error in [0, 1] RGB. 'closer to source' counts images whose measured colour is nearer the source's than the "
             "target's, among pairs whose colours differ by > 0.3.", "",
             "Expected (paper's claim, the ColorMNIST proxy of its CelebA transfer): after `transfer digit` the reader sees the "
             "source digit and the colours stay the target's; after `transfer fg`/`bg` that colour is the source's and the "
             "digit stays the target's.", "",
             "| images | reads source digit | reads target digit | fg closer to source | bg closer to source | fg MAE to source | bg MAE to source |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {pct(r['reads_source_digit'])} | {pct(r['reads_target_digit'])} | {pct(r['fg_closer_to_source'])} | "
                     f"{pct(r['bg_closer_to_source'])} | {r['fg_mae_to_source']:.3f} | {r['bg_mae_to_source']:.3f} |")
    k = min(8, n)
    rows_img = [xt[:k], xs[:k]] + [outs[c][:k] for c in pipe.concept_names]
    grid(torch.cat(rows_img), nrow=k).resize((32 * k * 3, 32 * len(rows_img) * 3), 0).save(out / "transfer.png")
    lines += ["", f"Rows: target, source, then transfer of {', '.join(pipe.concept_names)}.", "", "![transfer](transfer.png)"]
    return {"table": rows, "columns": cols, "pairs": n, "reader_accuracy": reader_acc, "color_estimator": est, "md": lines}


def section_dynamics(pipe, ds, args, out: Path, cfg: dict) -> dict:
    """Classifier snapshots across training; a cINN per snapshot; concept variance explained by z."""
    from invint_hub.data import build_dataset
    from invint_hub.train import main as train_main

    steps = sorted(int(s) for s in args.dynamics_steps.split(","))
    layer = args.dynamics_layer
    ddir = out / "dynamics"
    ddir.mkdir(parents=True, exist_ok=True)
    bb_cfg = json.loads((pipe.root / pipe.info.get("backbone", "backbone") / "config.json").read_text())
    torch.manual_seed(args.seed)
    model = Backbone(**bb_cfg)
    ctrain = cfg.get("classifier", {}).get("train", {})
    opt = torch.optim.AdamW(model.parameters(), lr=float(ctrain.get("lr", 1e-3)))  # constant lr, as the paper's Adam
    bs = int(ctrain.get("batch_size", 128))
    train_ds = build_dataset(dict(cfg["data"]), "train_split", args.data_dir, args.limit_train)
    g = torch.Generator().manual_seed(args.seed)
    x_eval, y_eval = ds.get_batch(torch.arange(min(len(ds), args.n_images)))
    x_acc, y_acc = ds.get_batch(torch.arange(len(ds)))
    ccfg = dict(cfg)
    ccfg["cinn"] = dict(cfg.get("cinn", {}), layers=[layer])
    (ddir / "config.yaml").write_text(yaml.safe_dump(ccfg))
    rows = {}
    step = 0
    for target in steps:
        model.train()
        while step < target:
            idx = torch.randint(len(train_ds), (bs,), generator=g)
            x, y = train_ds.get_batch(idx)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            acc = (batched(lambda b: model(b).argmax(1), x_acc) == y_acc).float().mean().item()
        sdir = ddir / f"step_{step}"
        if not (sdir / "cinn" / layer / "model.safetensors").is_file() or args.retrain:
            if sdir.exists():
                shutil.rmtree(sdir)
            model.save_pretrained(sdir / "backbone")
            shutil.copytree(pipe.root / pipe.info.get("autoencoder", "autoencoder"), sdir / "autoencoder")
            argv = ["cinn", "--config", str(ddir / "config.yaml"), "--output-dir", str(sdir), "--layer", layer,
                    "--steps", str(args.dynamics_cinn_steps), "--quiet"]
            if args.data_dir:
                argv += ["--data-dir", args.data_dir]
            if args.limit_train:
                argv += ["--limit-train", str(args.limit_train)]
            train_main(argv)
        snap = InvariancePipeline.from_pretrained(sdir)
        snap.concepts = pipe.concepts
        cve = concept_variance_explained(snap, layer, x_eval, n=args.n_samples, seed=args.seed)
        rows[step] = {"accuracy": acc, **cve}
        print(f"[dynamics] step {step}: accuracy {acc:.4f}, " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in cve.items()), flush=True)
    names = pipe.concepts.factor_names
    lines = ["## Training dynamics (ECCV Fig. 4 analogue)", "",
             f"A {bb_cfg['arch']} (the pipeline's classifier architecture) trained from scratch on ColorMNIST with AdamW, "
             f"constant lr {ctrain.get('lr', 1e-3)}, batch {bs}; at each snapshot a cINN for layer `{layer}` is trained for "
             f"{args.dynamics_cinn_steps} steps (the config's cINN settings) and the pipeline's e measures the share of each "
             f"concept's variance explained by z on {x_eval.shape[0]} test images ({args.n_samples} samples of v each). "
             f"Accuracy on {x_acc.shape[0]} test images.", "",
             "| step | accuracy | " + " | ".join(names) + " | paper digit | paper bg |", "|---|---|" + "---|" * (len(names) + 2)]
    for s, r in rows.items():
        p = PAPER["dynamics"].get(s, {})
        lines.append(f"| {s} | {pct(r['accuracy'])} | " + " | ".join(pct(r[n]) for n in names)
                     + f" | {p.get('digit', '')}{' %' if p else ''} | {p.get('bg', '')}{' %' if p else ''} |")
    lines += ["", "Paper (SqueezeNet, 40k steps): at 4k steps digit 2.57 % / background 38.44 %; at 36k steps digit 36.08 % / "
              "background 2.76 %; the digit curve follows the accuracy. Our steps are not comparable one to one (other network, "
              "optimiser settings, batch size): compare the trend, i.e. whether colour shares fall and the digit share rises "
              "as the accuracy rises."]
    first, last = rows[steps[0]], rows[steps[-1]]
    trend = {n: last[n] - first[n] for n in names}
    lines += ["", "Change from the first to the last snapshot: " + ", ".join(f"{n} {100 * d:+.1f} points" for n, d in trend.items()) + "."]
    series = {n: [rows[s][n] for s in rows] for n in names}
    series["accuracy"] = [rows[s]["accuracy"] for s in rows]
    _plot_lines(series, [str(s) for s in rows], "classifier training step", "variance explained by z / accuracy",
                out / "dynamics.png")
    lines += ["", "![dynamics](dynamics.png)"]
    return {"table": {str(k): v for k, v in rows.items()}, "layer": layer, "cinn_steps": args.dynamics_cinn_steps,
            "trend": trend, "md": lines}


# ---------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------
def _plot_lines(series: dict[str, list[float]], xlabels: list[str], xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        ax.plot(range(len(ys)), ys, marker="o", label=name, linestyle="--" if name == "accuracy" else "-")
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bars(values: dict[str, float], ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(values), list(values.values()))
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.concepts_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="ColorMNIST pipeline folder or Hub repo id, with a concepts/ model")
    p.add_argument("--out", required=True, help="output folder (report.md, results.json, PNGs)")
    p.add_argument("--config", default=None, help="the pipeline's training config (transfer reader, dynamics); default configs/<dataset>.yaml")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=None, help="use only N test images (default all 10000)")
    p.add_argument("--n-images", type=int, default=1000, help="test images for the variance-explained measures")
    p.add_argument("--n-samples", type=int, default=16, help="samples of v per image for variance explained")
    p.add_argument("--n-pairs", type=int, default=10000, help="test pairs for the dimensionality estimate")
    p.add_argument("--dims-layer", default="fc", help="classifier layer for the dimensionality estimate")
    p.add_argument("--n-response", type=int, default=500, help="test images for the network response")
    p.add_argument("--response-samples", type=int, default=64, help="resampled codes per image and factor")
    p.add_argument("--n-transfer", type=int, default=2000, help="(target, source) pairs for the transfer section")
    p.add_argument("--reader-steps", type=int, default=3000, help="training steps of the digit reader")
    p.add_argument("--dynamics-steps", default="0,100,300,1000,3000", help="classifier snapshot steps")
    p.add_argument("--dynamics-layer", default="fc")
    p.add_argument("--dynamics-cinn-steps", type=int, default=2000, help="cINN training steps per snapshot")
    p.add_argument("--limit-train", type=int, default=None, help="training images for the reader / snapshots (quick checks)")
    p.add_argument("--retrain", action="store_true", help="retrain the reader and snapshot cINNs even if found in --out")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown sections {bad}; choose from {SECTIONS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    pipe = InvariancePipeline.from_pretrained(args.pipeline)
    if pipe.concepts is None:
        raise SystemExit(f"{args.pipeline} has no concept model; run `python -m invint_hub.train concepts ...` first")
    ds = test_set(pipe, args)
    cfg = load_config(args.config, pipe) if {"transfer", "dynamics"} & set(sections) else None
    results = {"pipeline": str(args.pipeline), "concepts": pipe.concepts.factor_names,
               "factor_sizes": pipe.concepts.factor_sizes, "flags": vars(args), "timings_s": {}, "cpu_s": {}}
    md = [f"# Concept analyses: {args.pipeline}", "",
          f"Pipeline: {pipe!r}. Concept INN e: factors {dict(zip(pipe.concepts.factor_names, pipe.concepts.factor_sizes))} "
          f"(residual last). Test split: {len(ds)} ColorMNIST test images (seed 1 colours). Seed {args.seed}.", "",
          "Command: `python -m eval.concepts_report " + " ".join(sys.argv[1:] if argv is None else argv) + "`", ""]
    for name in sections:
        t0, c0 = time.time(), time.process_time()
        fn = {"layers": section_layers, "dims": section_dims, "response": section_response}.get(name)
        res = fn(pipe, ds, args, out) if fn else {"transfer": section_transfer, "dynamics": section_dynamics}[name](pipe, ds, args, out, cfg)
        results["timings_s"][name] = round(time.time() - t0, 1)
        results["cpu_s"][name] = round(time.process_time() - c0, 1)  # all threads; wall time depends on machine load
        md += res.pop("md") + ["", f"_({name}: {results['timings_s'][name]} s wall, {results['cpu_s'][name]} CPU-s)_", ""]
        results[name] = res
        print(f"[concepts_report] {name} done in {results['timings_s'][name]} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
