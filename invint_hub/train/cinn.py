"""Stage 3: one conditional INN t per layer, v = t(z_bar | z), trained with the NLL of v under N(0, I)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..autoencoder import Autoencoder
from ..backbones import Backbone
from ..cinn import ConditionalINN
from ..flows import bits_per_dim, standard_normal_nll
from ..hub import write_model_card
from ..pipeline import InvariancePipeline
from .common import (batch_indices, command_history, eval_loop, frozen, get_batch, make_dataset, make_optimizer,
                     run_training, save_component, saved_config, update_pipeline_json)
from .config import CARD_SAMPLES, EVAL_SEED, cinn_model_settings, data_settings, train_settings


def train_cinn(acc, cfg: dict, args, out: Path, layer: str):
    t = train_settings(cfg, "cinn", args, layer)
    data = data_settings(cfg)
    backbone = frozen(Backbone.from_pretrained(out / "backbone")).to(acc.device)
    ae = frozen(Autoencoder.from_pretrained(out / "autoencoder")).to(acc.device)
    if layer not in backbone.layers:
        raise ValueError(f"unknown layer {layer!r}; this {backbone.arch} has layers {backbone.layers}")
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    kwargs = cinn_model_settings(cfg, layer)
    kwargs.update(latent_dim=ae.latent_dim, cond_shape=list(backbone.feature_shapes[layer]), layer=layer)
    torch.manual_seed(args.seed)
    model = ConditionalINN(**kwargs)

    def inputs(x, gen=None):
        with torch.no_grad(), acc.autocast():
            zbar = ae.encode(x).sample(gen)
            z = backbone.representation(x, layer)
        return zbar.float(), z.float()

    # Data-dependent ActNorm initialisation on one global batch before wrapping: every rank
    # draws the same batch and the same posterior noise, so all ranks start identical.
    init_idx = batch_indices(len(train_ds), 0, t["batch_size"], args.seed + 1, 0, 1)
    xi, _ = get_batch(train_ds, init_idx)
    zbar0, z0 = inputs(xi.to(acc.device), torch.Generator(device=acc.device).manual_seed(args.seed))
    model.to(acc.device).train()
    with torch.no_grad():
        model(zbar0, z0)
    opt = make_optimizer(model.parameters(), t)
    model, opt = acc.prepare(model, opt)
    dim = ae.latent_dim
    const = standard_normal_nll(torch.zeros(1, dim), torch.zeros(1)).item()  # 0.5 dim log(2 pi)

    def step_fn(x, y, step):
        model.train()
        zbar, z = inputs(x)
        with acc.autocast():
            v, logdet = model(zbar, z)
        nll = standard_normal_nll(v, logdet).mean()
        loss = nll - const  # the paper's loss: the NLL without its constant (same gradient)
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "bpd": bits_per_dim(nll.detach(), dim)}

    def eval_fn():
        model.eval()
        g = torch.Generator(device=acc.device).manual_seed(EVAL_SEED)

        def fn(x, y):
            zbar, z = inputs(x, g)
            v, logdet = model(zbar, z)
            return {"bpd": bits_per_dim(standard_normal_nll(v, logdet), dim)}

        return eval_loop(acc, test_ds, t["eval_samples"], fn)

    name = f"cinn_{layer}"
    ev = run_training(acc, name, [opt], step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    save_component(acc, model, out / "cinn" / layer, args)
    acc.wait_for_everyone()
    if acc.is_main_process:
        m = acc.unwrap_model(model).eval()
        saved = saved_config(out / "cinn" / layer)
        pipe = InvariancePipeline(backbone, ae, {layer: m})
        n_eval = min(t["eval_samples"], len(test_ds))
        xs, _ = get_batch(test_ds, torch.arange(n_eval))
        agree, var = [], []
        for i in range(0, n_eval, 250):
            xb = xs[i : i + 250].to(acc.device)
            agree.append(pipe.class_agreement(xb, layer, n=1, seed=i))
            var.append(pipe.variance_explained(xb, layer, n=CARD_SAMPLES, seed=i))
        ev["class_agreement"] = torch.cat(agree).mean().item()
        ev["variance_explained"] = torch.cat(var).mean().item()
        update_pipeline_json(out, cfg, cinn_layer=layer)
        write_model_card(
            out / "cinn" / layer, f"cINN t for layer {layer} of {backbone.arch} on {data['name']}",
            "Conditional INN mapping the autoencoder latent z_bar to the invariances v of the layer's representation z = Phi(x).",
            {"backbone": backbone.arch, "layer": layer, "representation shape": list(backbone.feature_shapes[layer]),
             "latent dim": saved["latent_dim"], "flows": saved["n_flows"], "subnet width": saved["hidden"],
             "subnet depth": saved["depth"], "parameters": sum(p.numel() for p in m.parameters()),
             "steps": t["steps"], "batch size": t["batch_size"], "lr": t["lr"]},
            metrics={f"test NLL (bits/dim, first {n_eval} test images)": ev["bpd"],
                     "class agreement of samples D(t^-1(v|z)) with the input (1 sample per image)": ev["class_agreement"],
                     f"share of z_bar variance explained by v ({CARD_SAMPLES} samples per image)": ev["variance_explained"]},
            command=command_history(out, name, args), datasets=[data["name"]],
        )
        (out / "cinn" / layer / "metrics.json").write_text(json.dumps(ev, indent=2))
    acc.free_memory()  # forget this layer's model and optimizer before the next layer
    return ev
