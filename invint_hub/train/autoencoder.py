"""Stage 2: the autoencoder (E, D) whose latent z_bar the cINNs translate (L1 + perceptual + KL, optional GAN)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from ..autoencoder import Autoencoder, FeaturePerceptualLoss, recolor_invariance, PatchDiscriminator, adaptive_weight, hinge_d_loss, lpips_loss, psnr
from ..hub import write_model_card
from ..pipeline import PIPELINE_FILE
from .common import (load_backbone, command_history, eval_loop, frozen, get_batch, make_dataset, make_optimizer, run_training,
                     save_component, saved_config, update_pipeline_json)
from .config import LATENT_VAR_IMAGES, autoencoder_from, autoencoder_loss, data_settings, model_settings, train_settings


def link_autoencoder(acc, cfg: dict, out: Path) -> dict:
    """``autoencoder.from``: record another pipeline folder's autoencoder in ``<out>/pipeline.json`` by reference
    (``"autoencoder": "../<pipeline>/autoencoder"``) instead of training one. That folder must sit next to ``out``
    (the same parent folder: a reference may not leave it) and its autoencoder must take this config's images."""
    from ..pipeline import component_dir

    src = Path(autoencoder_from(cfg))
    where = f"autoencoder.from = {str(src)!r}"
    if not (src / PIPELINE_FILE).is_file():
        raise ValueError(f"{where}: not a pipeline folder (no {PIPELINE_FILE}); train that pipeline's autoencoder first")
    info = json.loads((src / PIPELINE_FILE).read_text())
    ae_dir = component_dir(src, info, "autoencoder", "autoencoder")
    base = Path(os.path.normpath(Path(out).absolute()))
    rel = os.path.relpath(os.path.normpath(ae_dir.absolute()), base)
    try:
        component_dir(out, {"autoencoder": rel}, "autoencoder")  # the checks of loading: inside out's parent
    except ValueError:
        raise ValueError(f"{where}: its autoencoder {ae_dir} is not inside {base.parent}, the folder that holds the "
                         f"output folder (a reference may only name a sibling pipeline's, ../<pipeline>/autoencoder); "
                         "put both pipeline folders in one folder") from None
    rec = saved_config(ae_dir)
    data = data_settings(cfg)
    got = (rec.get("image_size", 32), rec.get("channels", 1))
    if got != (data["image_size"], data["channels"]):
        raise ValueError(f"{where}: that autoencoder takes {got[1]}x{got[0]}px images, this config's data is "
                         f"{data['channels']}x{data['image_size']}px")
    if acc.is_main_process:
        update_pipeline_json(out, cfg, autoencoder=rel)
        acc.print(f"{out}/{PIPELINE_FILE}: autoencoder = {rel!r} (shared with {src}; nothing trained)")
    return {"autoencoder": rel}


def train_autoencoder(acc, cfg: dict, args, out: Path):
    if autoencoder_from(cfg):
        return link_autoencoder(acc, cfg, out)
    lcfg = autoencoder_loss(cfg)
    t = train_settings(cfg, "autoencoder", args)
    data = data_settings(cfg)
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    if lcfg["recolor_invariance"] > 0:  # pairs (B, 2, 3, S, S): one digit image painted twice with fresh colours
        from ..concepts import ColorMNISTPairs

        train_ds = ColorMNISTPairs.from_dataset(train_ds, ("shape",), seed=args.seed)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    kwargs = dict(image_size=data["image_size"], channels=data["channels"])
    kwargs.update(model_settings(cfg, "autoencoder"))
    torch.manual_seed(args.seed)
    model = Autoencoder(**kwargs)

    perceptual, perceptual_desc = None, "none"
    if lcfg["perceptual"] == "lpips":
        perceptual = lpips_loss(lcfg["lpips_weights"]).to(acc.device)
        perceptual_desc = f"LPIPS (alex, local weights {lcfg['lpips_weights']})"
    elif lcfg["perceptual"] == "backbone":
        backbone = frozen(load_backbone(out)).to(acc.device)
        layers = lcfg["perceptual_layers"] or [l for l in backbone.layers if len(backbone.feature_shapes[l]) == 3][:3]
        side = lcfg["perceptual_input_size"] or backbone.input_size
        if side != backbone.input_size:  # a copy: the saved backbone keeps its own input size
            backbone = copy.deepcopy(backbone)
            backbone.input_size = side
        perceptual = FeaturePerceptualLoss(lambda x: list(backbone.forward_layers(x, layers).values()))
        perceptual_desc = (f"normalised feature distance at {', '.join(layers)} of the pipeline's own classifier "
                           f"({backbone.arch}, run at {side} px); LPIPS backbone weights were not available")
    elif lcfg["perceptual"] not in (None, "none"):
        raise ValueError(f"autoencoder.loss.perceptual must be lpips, backbone or none, got {lcfg['perceptual']!r}")

    opt = make_optimizer(model.parameters(), t)
    optimizers = [opt]
    disc = None
    if lcfg["disc_weight"] > 0:
        disc = PatchDiscriminator(data["channels"])
        dt = dict(t, lr=t["lr"] * lcfg["disc_lr_factor"])
        opt_d = make_optimizer(disc.parameters(), dt)
        disc, opt_d = acc.prepare(disc, opt_d)
        optimizers.append(opt_d)
    model, opt = acc.prepare(model, opt)
    optimizers[0] = opt
    last_layer = acc.unwrap_model(model).decoder[-2].weight

    def rec_loss(x, xr):
        l1 = (x - xr).abs().flatten(1).mean(1)
        p = perceptual(x, xr) if perceptual is not None else torch.zeros_like(l1)
        return l1, p

    def step_fn(x, y, step):
        model.train()
        pairs = x.dim() == 5
        if pairs:
            x = x.flatten(0, 1)  # (a0, b0, a1, b1, ...)
        with acc.autocast():
            xr, post = model(x)
            l1, p = rec_loss(x, xr)
            rec = (l1 + lcfg["perceptual_weight"] * p).mean()
            kl = post.kl().mean()
            loss = rec + lcfg["kl_weight"] * kl
            logs = {"loss": loss.detach(), "l1": l1.mean().detach(), "perceptual": p.mean().detach(), "kl": kl.detach()}
            if pairs:
                s = post.mean[:, : lcfg["invariant_dims"]].float().unflatten(0, (-1, 2))
                inv = recolor_invariance(s[:, 0], s[:, 1])
                loss = loss + lcfg["recolor_invariance"] * inv
                logs["recolor_invariance"] = inv.detach()
            use_gan = disc is not None and step >= lcfg["disc_start"]
            if use_gan:
                g_loss = -disc(xr).mean()
                w = adaptive_weight(rec, g_loss, last_layer) * lcfg["disc_weight"]
                loss = loss + w * g_loss
                logs["g_loss"] = g_loss.detach()
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if use_gan:
            with acc.autocast():
                d_loss = hinge_d_loss(disc(x), disc(xr.detach()))
            acc.backward(d_loss)
            optimizers[1].step()
            optimizers[1].zero_grad(set_to_none=True)
            logs["d_loss"] = d_loss.detach()
        return logs

    def eval_fn():
        model.eval()

        def fn(x, y):
            xr = model(x, sample=False)[0]
            return {"l1": (x - xr).abs().flatten(1).mean(1), "psnr": psnr(x, xr)}

        return eval_loop(acc, test_ds, t["eval_samples"], fn)

    ev = run_training(acc, "autoencoder", optimizers, step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    # record the data variance of z_bar (posterior samples, as the cINN sees them)
    m = acc.unwrap_model(model).eval()
    with torch.no_grad():
        n = min(len(train_ds), LATENT_VAR_IMAGES)
        x, _ = get_batch(train_ds, torch.arange(n))
        x = x[:, 0] if x.dim() == 5 else x
        zs = torch.cat([m.encode(x[i : i + 500].to(acc.device)).sample() for i in range(0, n, 500)])
        m.latent_var.fill_(zs.float().var(0).sum().item())
    ev["latent_var"] = float(m.latent_var)
    save_component(acc, model, out / "autoencoder", args)
    if acc.is_main_process:
        update_pipeline_json(out, cfg)
        write_model_card(
            out / "autoencoder", f"Autoencoder (latent {m.latent_dim}) on {data['name']}",
            "The autoencoder (E, D) whose latent z_bar the cINNs translate into invariances v.",
            {"image": f"{m.channels}x{m.image_size}px in [-1, 1]", "latent": m.latent_dim,
             "parameters": sum(p.numel() for p in m.parameters()), "loss": f"L1 + {lcfg['perceptual_weight']} x perceptual + {lcfg['kl_weight']} x KL"
             + (f" + {lcfg['disc_weight']} x adaptive hinge GAN (from step {lcfg['disc_start']})" if disc is not None else ""),
             "perceptual term": perceptual_desc, "steps": t["steps"], "batch size": t["batch_size"],
             **({"recolouring invariance": f"{lcfg['recolor_invariance']} x normalised squared change of latent dims "
                 f"0-{lcfg['invariant_dims'] - 1} (posterior means) between two paintings of one digit image with "
                 "fresh colours; every training image has fresh colours"} if lcfg["recolor_invariance"] > 0 else {})},
            metrics={"test L1 (posterior mean)": ev["l1"], "test PSNR dB": ev["psnr"], "latent variance (sum over dims)": ev["latent_var"]},
            command=command_history(out, "autoencoder", args), datasets=[data["name"]],
        )
    return ev
