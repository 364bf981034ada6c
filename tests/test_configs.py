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
        if pre and pre.get("source") == "timm":
            backbone = Backbone.from_timm(pre["name"], pretrained=False, image_size=data["image_size"],
                                          input_size=pre.get("input_size"), layers=pre.get("layers"))
        elif pre:
            backbone = Backbone.from_torchvision(pre["arch"], weights=None, in_channels=data["channels"],
                                                 image_size=data["image_size"], **cfg["classifier"].get("model", {}))
        else:
            backbone = Backbone(in_channels=data["channels"], image_size=data["image_size"], **cfg["classifier"]["model"])
        if "autoencoder" not in cfg:  # a classifier-only config (a further training stage of one classifier)
            assert set(cfg) == {"data", "classifier"} and cfg["classifier"].get("init_from") and backbone.layers
            return
        ae_cfg = cfg["autoencoder"]
        if "from" in ae_cfg:  # another config's autoencoder (runs/<name> -> configs/<name>.yaml): same images
            src = load_config(path.parent / f"{Path(ae_cfg['from']).name}.yaml")
            assert (src["data"]["image_size"], src["data"]["channels"]) == (data["image_size"], data["channels"])
            ae_cfg = src["autoencoder"]
        ae = Autoencoder(image_size=data["image_size"], channels=data["channels"], **ae_cfg["model"])
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


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(trian=c.pop("cinn")), r"unknown section 'trian'"),
    (lambda c: c["cinn"]["train"].update(schedule="cosinee"), r"cinn\.train\.schedule = 'cosinee'; allowed values: 'constant', 'cosine'"),
    (lambda c: c["cinn"]["train"].update(lr="fast"), r"cinn\.train\.lr = 'fast' is not a number"),
    (lambda c: c["data"].update(image_size="32"), r"data\.image_size = '32' \(str\); expected int \(write 32 without quotes\)"),
    (lambda c: c["cinn"]["train"].update(batch_size=0), r"cinn\.train\.batch_size = 0 is out of range"),
    (lambda c: c["cinn"]["model"].update(hiden=16), r"cinn\.model: unknown key\(s\) \['hiden'\] for ConditionalINN"),
    (lambda c: c["cinn"]["train"].update(stpes=3), r"unknown key cinn\.train\.stpes"),
    (lambda c: c["data"].update(channels=2), r"data\.channels = 2; allowed values: 1, 3"),
    (lambda c: c["classifier"].update(pretrained={"source": "keras", "name": "x"}), r"classifier\.pretrained\.source = 'keras'"),
    (lambda c: c["cinn"]["train"].update(optimizer="adam"), r"cinn\.train\.optimizer = 'adam'; allowed values: 'adamw', 'sgd'"),
    (lambda c: c["classifier"].setdefault("train", {}).update(label_smoothing=1.0),
     r"classifier\.train\.label_smoothing = 1\.0 is out of range"),
])
def test_config_mistakes_are_one_line_errors_naming_file_and_key(change, message, tmp_path):
    """Every mistake is caught when the config is read, before any training starts."""
    import copy

    import yaml

    from conftest import TINY
    from invint_hub.train import main

    cfg = copy.deepcopy(TINY)
    change(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=f"^{path}: " + message):
        main(["cinn", "--config", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()  # nothing started


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    import copy

    import yaml

    from conftest import TINY

    cfg = copy.deepcopy(TINY)
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("schedule: cosine", "schedule: cosine\n    lr: 1e-3"))
    assert load_config(path)["cinn"]["train"]["lr"] == "1e-3"  # YAML 1.1 reads it as a string; training floats it


def test_sgd_is_nesterov_with_momentum_from_betas():
    from torch import nn

    from invint_hub.train.common import make_optimizer
    from invint_hub.train.config import TRAIN

    w = [nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(w, dict(TRAIN, optimizer="sgd", lr=0.1, weight_decay=5e-4))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    assert isinstance(make_optimizer(w, dict(TRAIN)), torch.optim.AdamW)  # the default
