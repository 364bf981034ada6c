"""Train an interpretation pipeline for your own classifier and data from Python (the CLI's stages, in-process).

    from invint_hub import Backbone
    from invint_hub.train import train_pipeline

    backbone = Backbone.from_module(my_net, layers=["layer2", "pre_logits", "logits"], image_size=32,
                                    mean=[0.5] * 3, std=[0.5] * 3)
    pipe = train_pipeline(backbone, train_set, test_set, "runs/my_net", steps={"autoencoder": 20000, "cinn": 10000})

``train_set`` / ``test_set``: datasets of ``(image, label)`` pairs, images in any form ``invint_hub.images.to_batch``
reads (PIL, arrays, tensors in [-1, 1]), converted once to the backbone's image size. The folder gets the same
layout, cards and checkpoints as the CLI's (``--resume`` works with ``resume=True``); the YAML config it used is
written to ``<output_dir>/config.yaml``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..backbones import Backbone
from ..data import InMemoryDataset, register_dataset
from ..pipeline import InvariancePipeline
from .cli import main
from .common import BACKBONES, update_pipeline_json


def train_pipeline(
    backbone: Backbone,
    train_set,
    test_set,
    output_dir: str | Path,
    layers: list[str] | None = None,
    autoencoder: dict | None = None,
    cinn: dict | None = None,
    steps: dict | None = None,
    batch_size: int | None = None,
    config: dict | None = None,
    dataset_name: str = "custom",
    resume: bool = False,
    extra_args: list[str] | None = None,
) -> InvariancePipeline:
    """Autoencoder, then one cINN per layer, for ``backbone`` (kept frozen) on your data; returns the pipeline.

    Args:
        layers: layers to interpret (default: ``backbone.layers``).
        autoencoder / cinn: constructor arguments of the models (``Autoencoder`` / ``ConditionalINN``).
        steps: training steps per stage, e.g. ``{"autoencoder": 20000, "cinn": 10000}``.
        config: a full config dict (as in ``configs/*.yaml``) to start from; the arguments above override it.
        extra_args: more CLI flags for every stage (``["--mixed-precision", "bf16"]``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    size, channels = backbone.image_size, backbone.in_channels
    splits = {"train": InMemoryDataset.from_dataset(train_set, size, channels, backbone.class_names),
              "test": InMemoryDataset.from_dataset(test_set, size, channels, backbone.class_names)}
    register_dataset(dataset_name, splits)
    cfg = copy.deepcopy(config or {})
    cfg["data"] = {**cfg.get("data", {}), "name": dataset_name, "image_size": size, "channels": channels,
                   "num_classes": backbone.num_classes}
    for stage, model in (("autoencoder", autoencoder), ("cinn", cinn)):
        sec = cfg.setdefault(stage, {})
        if model:
            sec["model"] = {**sec.get("model", {}), **model}
        if steps and stage in steps:
            sec.setdefault("train", {})["steps"] = int(steps[stage])
        if batch_size:
            sec.setdefault("train", {})["batch_size"] = int(batch_size)
    cfg["cinn"]["layers"] = list(layers or cfg["cinn"].get("layers") or backbone.layers)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    backbone.save_pretrained(out / "backbone")
    update_pipeline_json(out, cfg)
    flags = ["--config", str(path), "--output-dir", str(out), *(["--resume"] if resume else []), *(extra_args or [])]
    BACKBONES[str(out.resolve())] = backbone
    try:
        main(["autoencoder", *flags])
        main(["cinn", *flags])
    finally:
        BACKBONES.pop(str(out.resolve()), None)
    return InvariancePipeline.from_pretrained(out, backbone=backbone)
