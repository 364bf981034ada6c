"""Stage 3: one conditional INN t per layer, v = t(z_bar | z), trained with the NLL of v under N(0, I).

Layers whose training settings agree (``cinn.train`` and ``cinn.train_overrides.<layer>``) are trained together,
from one backbone pass (and one autoencoder pass) per batch: every layer's cINN sees the same batch and the same
posterior sample z_bar. With ``cinn.cache_features: true`` the frozen networks' outputs for the training split
(z_bar's posterior and every layer's z) are computed once and kept on disk (``<output-dir>/cache/``), so a step
runs no backbone at all: for small data sets and large backbones. ``cinn.augment`` (crop, flip) augments the
training images before both frozen networks, so z_bar and z stay a pair: afresh in every batch without the cache,
and as ``cinn.augment_copies`` cached copies of the training split with it (copy 0 as is). More (z_bar, z) pairs
than images lower the test NLL (on cifar10's logits they did not raise the samples' class agreement).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..autoencoder import Autoencoder, DiagonalGaussian
from ..backbones import Backbone
from ..cinn import ConditionalINN
from ..flows import bits_per_dim, standard_normal_nll
from ..hub import write_model_card
from ..pipeline import InvariancePipeline
from .common import (autoencoder_dir, load_backbone, batch_indices, command_history, eval_loop, frozen, get_batch, make_dataset, make_optimizer,
                     run_training, save_component, saved_config, update_pipeline_json)
from .classifier import augment_batch
from .config import CARD_SAMPLES, EVAL_SEED, cinn_model_settings, cinn_cache_settings, data_settings, train_settings


class CINNGroup(nn.Module):
    """The cINNs of several layers, trained as one module (one optimizer, one prepared model)."""

    def __init__(self, models: dict[str, ConditionalINN]):
        super().__init__()
        self.layers = list(models)
        self.models = nn.ModuleList(models.values())  # (a list: layer names may hold dots, "layer3.1")

    def model(self, layer: str) -> ConditionalINN:
        return self.models[self.layers.index(layer)]

    def forward(self, zbar: torch.Tensor, zs: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {layer: m(zbar, zs[layer]) for layer, m in zip(self.layers, self.models)}


def train_cinns(acc, cfg: dict, args, out: Path, layers: list[str]) -> dict:
    """Train the cINNs of ``layers``: layers with equal training settings together (see the module docstring)."""
    groups: list[list[str]] = []
    keys: list[str] = []
    for layer in layers:
        key = json.dumps(train_settings(cfg, "cinn", args, layer), sort_keys=True)
        if key in keys:
            groups[keys.index(key)].append(layer)
        else:
            keys.append(key)
            groups.append([layer])
    results = {}
    for group in groups:
        results.update(train_group(acc, cfg, args, out, group))
    return results


class FeatureCache(torch.utils.data.Dataset):
    """A frozen autoencoder's posterior (mean, log-variance) and a frozen backbone's representations at ``layers``
    for every image of a dataset, as rows of one float16 / float32 memory-mapped file; ``get_batch`` returns the
    rows (B, D) and the labels, like an image dataset, so the training loop is the same. With ``copies`` > 1 it
    holds that many copies of the dataset (rows ``k * len(ds)`` on), copy 0 as is and the others through
    ``augment`` (seeded by copy and position: a rebuilt cache is the same)."""

    def __init__(self, path: Path, rows: np.ndarray, labels: torch.Tensor, shapes: dict[str, tuple[int, ...]], latent: int):
        self.path, self.rows, self.labels, self.shapes, self.latent = path, rows, labels, shapes, latent

    def __len__(self) -> int:
        return self.rows.shape[0]

    def get_batch(self, idx: torch.Tensor):
        return torch.from_numpy(np.asarray(self.rows[idx.numpy()], dtype=np.float32)), self.labels[idx]

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Rows -> (posterior mean, log-variance, {layer: z})."""
        d = self.latent
        mean, logvar, rest = rows[:, :d], rows[:, d:2 * d], rows[:, 2 * d:]
        zs, i = {}, 0
        for layer, shape in self.shapes.items():
            n = math.prod(shape)
            zs[layer] = rest[:, i:i + n].reshape(-1, *shape)
            i += n
        return mean, logvar, zs

    @classmethod
    @torch.no_grad()
    def build(cls, acc, ds, backbone: Backbone, ae: Autoencoder, layers: list[str], folder: Path, key: str,
              dtype: str, max_gb: float, augment: list[str] | None = None, copies: int = 1) -> "FeatureCache":
        shapes = {layer: tuple(backbone.feature_shapes[layer]) for layer in layers}
        width = 2 * ae.latent_dim + sum(math.prod(s) for s in shapes.values())
        np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
        n = len(ds)
        total = n * copies
        size = total * width * np.dtype(np_dtype).itemsize
        if size > max_gb * 1e9:
            raise ValueError(f"cinn.cache_features: the cache would take {size / 1e9:.1f} GB (> cinn.cache_max_gb = "
                             f"{max_gb}); use fewer layers or images, or train without the cache")
        path = folder / f"features_{key}.{dtype}"
        labels_path = path.with_suffix(".labels.npy")
        if acc.is_main_process and not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(total, width))
            labels = np.zeros(total, dtype=np.int64)
            for copy in range(copies):
                for i in range(0, n, 256):
                    idx = torch.arange(i, min(i + 256, n))
                    x, y = get_batch(ds, idx)
                    if copy > 0:
                        x = augment_batch(x, augment or [], torch.Generator().manual_seed(copy * 1_000_003 + i))
                    x = x.to(acc.device)
                    post = ae.encode(x)
                    feats = backbone.forward_layers(x, layers)
                    parts = [post.mean, post.logvar] + [feats[layer].flatten(1) for layer in layers]
                    r = copy * n + i
                    rows[r:r + len(idx)] = torch.cat(parts, 1).float().cpu().numpy().astype(np_dtype)
                    labels[r:r + len(idx)] = torch.as_tensor(y).numpy()
            rows.flush()
            del rows
            np.save(labels_path, labels)
            os.replace(tmp, path)  # complete, or not there
            what = f"{n} training images" + (f" in {copies} copies" if copies > 1 else "")
            acc.print(f"cached the frozen networks' outputs for {what} in {path} ({size / 1e9:.2f} GB)")
        acc.wait_for_everyone()
        rows = np.load(path, mmap_mode="r")
        if rows.shape != (total, width):
            raise ValueError(f"{path} holds {rows.shape}, expected {(total, width)}: delete it to rebuild the cache")
        return cls(path, rows, torch.from_numpy(np.load(labels_path)), shapes, ae.latent_dim)


def _cache_key(out: Path, cfg: dict, args, layers: list[str], dtype: str, augment=(), copies: int = 1) -> str:
    """Changes with anything the cached outputs depend on: both networks' files, the data, the layers, the
    augmentation."""
    h = hashlib.sha256()
    for f in sorted((out / "backbone").glob("*.json")) + sorted((out / "backbone").glob("*.safetensors")) \
            + sorted(autoencoder_dir(out).glob("*.safetensors")):
        h.update(f.read_bytes())
    extra = [list(augment), copies] if copies > 1 else []  # (a cache without copies keeps its old key)
    h.update(json.dumps([data_settings(cfg), args.limit_train, args.data_dir, layers, dtype] + extra, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:16]


def train_group(acc, cfg: dict, args, out: Path, layers: list[str]) -> dict:
    t = train_settings(cfg, "cinn", args, layers[0])
    data = data_settings(cfg)
    backbone = frozen(load_backbone(out)).to(acc.device)
    ae = frozen(Autoencoder.from_pretrained(autoencoder_dir(out))).to(acc.device)
    for layer in layers:
        backbone.check_layer(layer)
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    models, kwargs = {}, {}
    for layer in layers:
        kwargs[layer] = cinn_model_settings(cfg, layer)
        kwargs[layer].update(latent_dim=ae.latent_dim, cond_shape=list(backbone.feature_shapes[layer]), layer=layer)
        torch.manual_seed(args.seed)  # each layer's cINN starts as it would if trained alone
        models[layer] = ConditionalINN(**kwargs[layer])
    cache = cinn_cache_settings(cfg)
    augment, copies = list(cache["augment"] or []), int(cache["augment_copies"])
    if cache["cache_features"]:
        key = _cache_key(out, cfg, args, layers, cache["cache_dtype"], augment, copies)
        train_ds = FeatureCache.build(acc, train_ds, backbone, ae, layers, out / "cache", key, cache["cache_dtype"],
                                      cache["cache_max_gb"], augment, copies)

    def inputs(x, gen=None):
        """A batch -> (z_bar sampled from the posterior, {layer: z}), from images or from cached rows."""
        with torch.no_grad(), acc.autocast():
            if isinstance(train_ds, FeatureCache) and x.dim() == 2:
                mean, logvar, zs = train_ds.unpack(x)
                zbar = DiagonalGaussian(torch.cat([mean, logvar], 1)).sample(gen)
            else:
                zbar = ae.encode(x).sample(gen)
                zs = backbone.forward_layers(x, layers)
        return zbar.float(), {layer: z.float() for layer, z in zs.items()}

    # Data-dependent ActNorm initialisation on one global batch before wrapping: every rank
    # draws the same batch and the same posterior noise, so all ranks start identical.
    init_idx = batch_indices(len(train_ds), 0, t["batch_size"], args.seed + 1, 0, 1)
    xi, _ = get_batch(train_ds, init_idx)
    zbar0, zs0 = inputs(xi.to(acc.device), torch.Generator(device=acc.device).manual_seed(args.seed))
    group = CINNGroup(models).to(acc.device).train()
    with torch.no_grad():
        group(zbar0, zs0)
    opt = make_optimizer(group.parameters(), t)
    group, opt = acc.prepare(group, opt)
    dim = ae.latent_dim
    const = standard_normal_nll(torch.zeros(1, dim), torch.zeros(1)).item()  # 0.5 dim log(2 pi)
    single = len(layers) == 1

    def step_fn(x, y, step):
        group.train()
        if augment and not isinstance(train_ds, FeatureCache):  # seeded by the step, as the classifier stage does
            x = augment_batch(x, augment, torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 64
                                                                        + acc.process_index))
        zbar, zs = inputs(x)
        with acc.autocast():
            outs = group(zbar, zs)
        nlls = {layer: standard_normal_nll(v, logdet).mean() for layer, (v, logdet) in outs.items()}
        loss = sum(nlls.values()) - len(nlls) * const  # the paper's loss: NLLs without their constant (same gradient)
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(group.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if single:
            return {"loss": loss.detach(), "bpd": bits_per_dim(nlls[layers[0]].detach(), dim)}
        return {"loss": loss.detach(), **{f"bpd_{layer}": bits_per_dim(n.detach(), dim) for layer, n in nlls.items()}}

    def eval_fn():
        group.eval()
        g = torch.Generator(device=acc.device).manual_seed(EVAL_SEED)

        def fn(x, y):
            with torch.no_grad():
                zbar = ae.encode(x).sample(g).float()
                zs = {k: v.float() for k, v in backbone.forward_layers(x, layers).items()}
            outs = group(zbar, zs)
            bpd = {f"bpd_{layer}": bits_per_dim(standard_normal_nll(v, logdet), dim) for layer, (v, logdet) in outs.items()}
            return {"bpd": bpd[f"bpd_{layers[0]}"]} if single else bpd

        return eval_loop(acc, test_ds, t["eval_samples"], fn)

    name = f"cinn_{layers[0]}" if single else "cinn_" + "+".join(layers)
    ev = run_training(acc, name, [opt], step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return {layer: None for layer in layers}
    trained = acc.unwrap_model(group)
    results = {}
    for layer in layers:
        m = trained.model(layer)
        save_component(acc, m, out / "cinn" / layer, args)
        results[layer] = {"bpd": ev["bpd"] if single else ev[f"bpd_{layer}"]}
    acc.wait_for_everyone()
    if acc.is_main_process:
        n_eval = min(t["eval_samples"], len(test_ds))
        xs, _ = get_batch(test_ds, torch.arange(n_eval))
        # the ceiling of the class agreement: plain reconstructions D(E(x)) classified like the input
        with torch.no_grad():
            ceiling = torch.cat([
                (backbone(ae.decode(ae.encode(xb).mode())).argmax(1) == backbone(xb).argmax(1)).float()
                for xb in (xs[i : i + 250].to(acc.device) for i in range(0, n_eval, 250))]).mean().item()
        for layer in layers:
            m = trained.model(layer).eval()
            saved = saved_config(out / "cinn" / layer)
            pipe = InvariancePipeline(backbone, ae, {layer: m})
            agree, var = [], []
            for i in range(0, n_eval, 250):
                xb = xs[i : i + 250].to(acc.device)
                agree.append(pipe.class_agreement(xb, layer, n=1, seed=i))
                var.append(pipe.variance_explained(xb, layer, n=CARD_SAMPLES, seed=i))
            ev_l = results[layer]
            ev_l["class_agreement"] = torch.cat(agree).mean().item()
            ev_l["variance_explained"] = torch.cat(var).mean().item()
            ev_l["reconstruction_agreement"] = ceiling
            update_pipeline_json(out, cfg, cinn_layer=layer)
            together = "" if single else f" (trained together with {', '.join(l for l in layers if l != layer)})"
            write_model_card(
                out / "cinn" / layer, f"cINN t for layer {layer} of {backbone.arch} on {data['name']}",
                "Conditional INN mapping the autoencoder latent z_bar to the invariances v of the layer's "
                "representation z = Phi(x)." + together,
                {"backbone": backbone.arch, "layer": layer, "representation shape": list(backbone.feature_shapes[layer]),
                 "latent dim": saved["latent_dim"], "flows": saved["n_flows"], "subnet width": saved["hidden"],
                 "subnet depth": saved["depth"], "parameters": sum(p.numel() for p in m.parameters()),
                 "steps": t["steps"], "batch size": t["batch_size"], "lr": t["lr"],
                 "frozen networks' outputs cached": bool(cache["cache_features"]),
                 "augmentation": (", ".join(augment) + (f" ({copies} cached copies)" if copies > 1 else "")) or "none"},
                metrics={f"test NLL (bits/dim, first {n_eval} test images)": ev_l["bpd"],
                         "class agreement of samples D(t^-1(v|z)) with the input (1 sample per image)": ev_l["class_agreement"],
                         "class agreement of reconstructions D(E(x)) (the ceiling)": ceiling,
                         f"share of z_bar variance explained by v ({CARD_SAMPLES} samples per image)": ev_l["variance_explained"]},
                command=command_history(out, name, args), datasets=[data["name"]],
            )
            (out / "cinn" / layer / "metrics.json").write_text(json.dumps(ev_l, indent=2))
    acc.free_memory()  # forget this group's model and optimizer before the next group
    return results
