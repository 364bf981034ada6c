"""Every config under configs/ describes models that can be built (shapes only, on the meta device)."""
from pathlib import Path

import pytest
import torch

from invint_hub import Autoencoder, Backbone, ConditionalINN
from invint_hub.train import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    cfg = load_config(path)
    data = cfg["data"]
    if "classifier" not in cfg:
        pytest.skip("no pipeline stages in this config")
    with torch.device("meta"):
        pre = cfg["classifier"].get("pretrained")
        if pre:
            backbone = Backbone.from_torchvision(pre["arch"], weights=None, in_channels=data["channels"],
                                                 image_size=data["image_size"], **cfg["classifier"].get("model", {}))
        else:
            backbone = Backbone(in_channels=data["channels"], image_size=data["image_size"], **cfg["classifier"]["model"])
        ae = Autoencoder(image_size=data["image_size"], channels=data["channels"], **cfg["autoencoder"]["model"])
        for layer in cfg["cinn"]["layers"]:
            kwargs = dict(cfg["cinn"]["model"])
            kwargs.update(cfg["cinn"].get("layer_overrides", {}).get(layer, {}))
            t = ConditionalINN(latent_dim=ae.latent_dim, cond_shape=list(backbone.feature_shapes[layer]), layer=layer, **kwargs)
            assert t.latent_dim == ae.latent_dim


def test_mnist_config_is_the_embedded_one():
    from invint_hub.pipeline import PRETRAINED_DIR
    import json

    cfg = load_config(Path(__file__).parent.parent / "configs" / "mnist.yaml")
    info = json.loads((PRETRAINED_DIR / "mnist" / "pipeline.json").read_text())
    assert list(info["cinn"]) == cfg["cinn"]["layers"]
