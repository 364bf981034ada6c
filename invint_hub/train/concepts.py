"""Stage 4 (optional): the concept INN e of the paper, trained on frozen autoencoder latents of image pairs
that share a concept (IIN pair loss); the model, loss and pair datasets live in ``invint_hub.concepts``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..autoencoder import Autoencoder
from ..concepts import (RESIDUAL, AttributePairs, ColorMNISTPairs, FactorINN, LabelPairs, PairDataset,
                        concept_variance_explained, estimate_factor_dims, load_attribute_images, pair_correlations, pair_loss,
                        usable_dims)
from ..data import ColorMNIST
from ..flows import bits_per_dim, standard_normal_nll
from ..hub import write_model_card
from ..pipeline import PIPELINE_FILE, InvariancePipeline
from .common import (autoencoder_dir, batch_indices, command_history, eval_loop, frozen, get_batch, make_dataset, make_optimizer,
                     run_training, save_component, saved_config, update_pipeline_json)
from .config import (CARD_SAMPLES, CONCEPT_VARIANCE_IMAGES, EVAL_SEED, concept_settings, data_settings, split_name,
                     train_settings)


def make_pair_dataset(cfg: dict, split_key: str, args, limit: int | None, seed: int) -> PairDataset:
    """The pairs of one split; ``concepts.pair_weights`` applies to the training split only (test pairs stay uniform)."""
    pairs = _pair_dataset(cfg, split_key, args, limit, seed)
    weights = concept_settings(cfg).get("pair_weights")
    if weights is not None and split_key == "train_split":
        try:
            pairs.set_weights(weights)
        except ValueError as err:
            raise ValueError(f"concepts.pair_weights: {err}") from None
    return pairs


def _pair_dataset(cfg: dict, split_key: str, args, limit: int | None, seed: int) -> PairDataset:
    c = concept_settings(cfg)
    data = data_settings(cfg)
    if c["pairs"] == "colormnist":
        ds = make_dataset(cfg, split_key, args, limit)
        if not isinstance(ds, ColorMNIST):
            raise ValueError(f"concepts.pairs: colormnist needs data.name: colormnist, got {data['name']!r}")
        return ColorMNISTPairs.from_dataset(ds, c["factors"], seed)
    if c["pairs"] == "labels":
        return LabelPairs(make_dataset(cfg, split_key, args, limit), seed, c["factors"][0])
    split = split_name(cfg, split_key)
    columns = [c["attributes"][f] for f in c["factors"]]
    images, attrs = load_attribute_images(data["name"], split, data["image_size"], data["channels"], columns,
                                          args.data_dir, limit, int(data["seed"]))
    return AttributePairs(images, attrs, c["factors"], seed)


@torch.no_grad()
def latents_of_pairs(ae, pairs: PairDataset, n: int, device, batch_size: int = 250, mode: bool = True):
    """(za, zb, factors) of the first n pairs (posterior means by default, as IIN's dimension estimate)."""
    za, zb, fs = [], [], []
    for i in range(0, min(n, len(pairs)), batch_size):
        x, f = pairs.get_batch(torch.arange(i, min(i + batch_size, n, len(pairs))))
        x = x.to(device)
        for half, out in ((0, za), (1, zb)):
            post = ae.encode(x[:, half])
            out.append((post.mode() if mode else post.sample()).float().cpu())
        fs.append(f)
    return torch.cat(za), torch.cat(zb), torch.cat(fs)


def train_concepts(acc, cfg: dict, args, out: Path):
    """Train e on frozen autoencoder latents (posterior samples) of the pipeline folder ``out``."""
    c = concept_settings(cfg)
    t = train_settings(cfg, "concepts", args)
    data = data_settings(cfg)
    ae = frozen(Autoencoder.from_pretrained(autoencoder_dir(out))).to(acc.device)
    train_ds = make_pair_dataset(cfg, "train_split", args, args.limit_train, seed=args.seed)
    test_ds = make_pair_dataset(cfg, "test_split", args, args.limit_test, seed=args.seed + 1)
    names = list(c["factors"]) + [RESIDUAL]
    n_concepts = len(c["factors"])

    # factor sizes: from the config, or IIN's dimensionality estimate on autoencoder latents of training pairs
    estimate = None
    if c["factor_sizes"] == "estimate":
        za, zb, fs = latents_of_pairs(ae, train_ds, int(c["estimate_pairs"]), acc.device)
        dims, scores = estimate_factor_dims(za, zb, fs, n_concepts, ae.latent_dim)
        sizes = usable_dims(dims)
        estimate = {"scores": dict(zip(names, scores)), "dims": dict(zip(names, dims)), "pairs": int(za.shape[0])}
        acc.print(f"[concepts] estimated factor sizes {dict(zip(names, sizes))} (scores {[round(s, 4) for s in scores]})")
    else:
        sizes = [int(s) for s in c["factor_sizes"]]
        if len(sizes) != len(names) or sum(sizes) != ae.latent_dim:
            raise ValueError(f"concepts.factor_sizes {sizes} must have {len(names)} entries ({names}, residual last) "
                             f"adding up to the latent size {ae.latent_dim}")

    kwargs = dict(c["model"])
    kwargs.update(dim=ae.latent_dim, factor_sizes=sizes, factor_names=names, rho=float(c["rho"]))
    torch.manual_seed(args.seed)
    model = FactorINN(**kwargs)
    dim = ae.latent_dim

    def latents(x, gen=None):
        with torch.no_grad(), acc.autocast():
            z = ae.encode(x.flatten(0, 1)).sample(gen)  # posterior samples, as IIN trains its flows
        return z.float().view(x.shape[0], 2, -1)

    # data-dependent ActNorm initialisation on one global batch before wrapping (same on every rank)
    init_idx = batch_indices(len(train_ds), 0, t["batch_size"], args.seed + 1, 0, 1)
    x0, _ = get_batch(train_ds, init_idx)
    z0 = latents(x0.to(acc.device), torch.Generator(device=acc.device).manual_seed(args.seed))
    model.to(acc.device).train()
    with torch.no_grad():
        model(z0.flatten(0, 1))
    opt = make_optimizer(model.parameters(), t)
    model, opt = acc.prepare(model, opt)

    def step_fn(x, y, step):
        model.train()
        z = latents(x)
        b = z.shape[0]
        with acc.autocast():
            codes, logdet = model(z.flatten(0, 1))
        codes, logdet = codes.float().view(b, 2, -1), logdet.view(b, 2)
        loss = pair_loss(codes[:, 0], logdet[:, 0], codes[:, 1], logdet[:, 1], y, sizes, float(c["rho"]))
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    corr: dict[str, dict[str, float]] = {}

    def eval_fn():
        model.eval()
        g = torch.Generator(device=acc.device).manual_seed(EVAL_SEED)

        def fn(x, y):
            z = latents(x, g)
            b = z.shape[0]
            codes, logdet = model(z.flatten(0, 1))
            codes, logdet = codes.float().view(b, 2, -1), logdet.view(b, 2)
            ea, eb = codes[:, 0], codes[:, 1]
            res = {"pair_loss": pair_loss(ea, logdet[:, 0], eb, logdet[:, 1], y, sizes, float(c["rho"]), "none"),
                   "bpd": bits_per_dim(standard_normal_nll(ea, logdet[:, 0]), dim)}
            prods = [(a * b_).mean(1) for a, b_ in zip(torch.split(ea, sizes, 1), torch.split(eb, sizes, 1))]
            for k in range(n_concepts):  # mean_d e_j,d(a) e_j,d(b) over pairs that share concept k
                mk = (y == k).float()
                res[f"n_{k}"] = mk
                for j in range(len(names)):
                    res[f"p_{k}_{j}"] = mk * prods[j]
            return res

        ev = eval_loop(acc, test_ds, t["eval_samples"], fn)
        corr.clear()
        for k in range(n_concepts):
            nk = ev.pop(f"n_{k}")
            corr[names[k]] = {names[j]: ev.pop(f"p_{k}_{j}") / max(nk, 1e-12) for j in range(len(names))}
        ev["shared_corr"] = sum(corr[n][n] for n in c["factors"]) / n_concepts
        others = [abs(corr[a][b]) for a in c["factors"] for b in names if b != a]
        ev["unshared_corr"] = sum(others) / len(others)
        return ev

    ev = run_training(acc, "concepts", [opt], step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    save_component(acc, model, out / "concepts", args)
    acc.wait_for_everyone()
    if acc.is_main_process:
        m = acc.unwrap_model(model).eval()
        saved = saved_config(out / "concepts")
        update_pipeline_json(out, cfg, concepts="concepts")
        metrics = dict(ev, pair_correlation=corr, factor_sizes=dict(zip(names, sizes)))
        # the same test pairs, per dimension and normalised (posterior means)
        n_pairs = min(t["eval_samples"], len(test_ds))
        za, zb, fs = latents_of_pairs(ae, test_ds, n_pairs, acc.device)
        with torch.no_grad():
            ea, eb = m(za.to(acc.device))[0].cpu(), m(zb.to(acc.device))[0].cpu()
        metrics["pair_statistics"] = pair_correlations(ea, eb, fs, sizes, names)
        metrics["normalised_shared_corr"] = {n: metrics["pair_statistics"][n]["correlation"][n]
                                             for n in c["factors"] if n in metrics["pair_statistics"]}
        if estimate:
            metrics["dimensionality_estimate"] = estimate
        info = json.loads((out / PIPELINE_FILE).read_text())
        if info.get("cinn") and (out / info.get("backbone", "backbone")).is_dir():
            # Fig. 4 measure per layer, on (a part of) the test split
            pipe = InvariancePipeline.from_pretrained(out).to(acc.device)
            pipe.concepts = m
            n_eval = min(t["eval_samples"], len(test_ds), CONCEPT_VARIANCE_IMAGES)
            x = test_ds.get_batch(torch.arange(n_eval))[0][:, 0]  # first halves = test items 0..n_eval-1
            metrics["concept_variance_explained"] = {
                layer: concept_variance_explained(pipe, layer, x.to(acc.device), n=CARD_SAMPLES, seed=0) for layer in pipe.layers
            }
        (out / "concepts" / "metrics.json").write_text(json.dumps(metrics, indent=2))
        card_metrics = {f"test pair loss (nats per pair, first {min(t['eval_samples'], len(test_ds))} test pairs)": ev["pair_loss"],
                        "test NLL of single images (bits/dim)": ev["bpd"],
                        f"mean_d e_k(a) e_k(b) over pairs sharing k (ideal rho = {c['rho']})": ev["shared_corr"],
                        "mean abs(mean_d e_j(a) e_j(b)) for the other factors (ideal 0)": ev["unshared_corr"]}
        for k, row in corr.items():
            card_metrics[f"pairs sharing {k}: mean_d e_j(a) e_j(b) per factor j"] = ", ".join(f"{j} {v:.3f}" for j, v in row.items())
        for k, row in metrics["pair_statistics"].items():
            card_metrics[f"pairs sharing {k}: normalised correlation per factor j (posterior means)"] = ", ".join(
                f"{j} {v:.3f}" for j, v in row["correlation"].items())
            card_metrics[f"pairs sharing {k}: per-dimension correlations of {k}"] = " ".join(f"{v:.2f}" for v in row["profile"])
        for layer, v in metrics.get("concept_variance_explained", {}).items():
            card_metrics[f"variance explained by z at {layer}"] = ", ".join(f"{k} {100 * x:.1f}%" for k, x in v.items())
        write_model_card(
            out / "concepts", f"Concept INN e on {data['name']}: {', '.join(c['factors'])} + residual",
            "The interpretation INN e of the paper: it maps the autoencoder latent z_bar to named semantic factors "
            "(concepts) and a residual, trained with pairs of images that share one concept (IIN pair loss).",
            {"factors (residual last)": ", ".join(f"{n}: {s}" for n, s in zip(names, sizes)),
             "factor sizes from": "IIN dimensionality estimate" if estimate else "config",
             "pairs": c["pairs"], "pair weights (training)": c.get("pair_weights") or "uniform", "rho": saved["rho"], "latent dim": saved["dim"], "flows": saved["n_flows"],
             "subnet width": saved["hidden"], "subnet depth": saved["depth"], "mixing": saved.get("mixing", "shuffle"),
             "parameters": sum(p.numel() for p in m.parameters()), "steps": t["steps"], "batch size (pairs)": t["batch_size"],
             "lr": t["lr"]},
            metrics=card_metrics, command=command_history(out, "concepts", args), datasets=[data["name"]],
        )
    acc.free_memory()
    return ev
