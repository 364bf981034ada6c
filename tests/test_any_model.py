"""Interpret your own model: train_pipeline for a custom nn.Module, pipelines that rebuild or take their backbone,
and a timm backbone named in a config (issue 11)."""
import json

import pytest
import torch

from conftest import BranchyNet
from invint_hub import Backbone, InvariancePipeline
from invint_hub.data import SyntheticDataset


TINY_AE = {"latent_dim": 8, "width": 4, "n_down": 2}
TINY_CINN = {"embed_dim": 8, "n_flows": 2, "hidden": 16, "depth": 1, "embedder_depth": 2, "embedder_width": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from invint_hub.train import train_pipeline

    torch.manual_seed(0)
    net = BranchyNet(width=6, num_classes=4).eval()
    backbone = Backbone.from_module(net, layers=["body.a", "body.b", "pre_logits", "logits"], image_size=16,
                                    mean=[0.5] * 3, std=[0.5] * 3)
    out = tmp_path_factory.mktemp("own_model")
    pipe = train_pipeline(backbone, SyntheticDataset(64, 16, 3, 4, seed=0), SyntheticDataset(32, 16, 3, 4, seed=1), out,
                          autoencoder=TINY_AE, cinn=TINY_CINN, steps={"autoencoder": 2, "cinn": 2}, batch_size=8,
                          config={"autoencoder": {"loss": {"perceptual_layers": ["body.a"]}}}, extra_args=["--quiet"])
    return net, backbone, pipe, out


def test_train_pipeline_for_a_module_of_ones_own(trained):
    net, backbone, pipe, out = trained
    assert pipe.layers == ["body.a", "body.b", "pre_logits", "logits"]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert pipe.sample_invariances(x, "body.b", n=3, seed=0).shape == (2, 3, 3, 16, 16)
    assert (out / "config.yaml").is_file() and (out / "cinn" / "pre_logits" / "README.md").is_file()
    rec = json.loads((out / "backbone" / "config.json").read_text())
    assert rec["source"] == "module" and rec["arch"].endswith(":BranchyNet") and rec["layers"] == pipe.layers


def test_a_pipeline_takes_the_users_module_back(trained):
    net, backbone, pipe, out = trained
    again = InvariancePipeline.from_pretrained(out, backbone=net)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(again.sample_invariances(x, "body.a", n=2, seed=1), pipe.sample_invariances(x, "body.a", n=2, seed=1))
    with pytest.raises(ValueError, match=r"body.a was trained on representations of shape \[6, 16, 16\]; this backbone.s body.a has shape \[5, 16, 16\]"):  # another architecture: the cINNs do not fit
        InvariancePipeline.from_pretrained(out, backbone=BranchyNet(width=5, num_classes=4))


def test_a_missing_subfolder_is_named(trained, tmp_path):
    import shutil

    _, _, _, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "cinn" / "body.a")
    with pytest.raises(FileNotFoundError, match="names the folder 'cinn/body.a'"):
        InvariancePipeline.from_pretrained(copy, backbone=trained[0])


def test_a_timm_backbone_named_in_the_config_needs_no_classifier_stage(tmp_path):
    """classifier.pretrained: {source: timm, ...}: the autoencoder stage writes the backbone folder itself."""
    import timm
    import yaml
    from safetensors.torch import save_file

    from invint_hub.train import main

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", num_classes=1000)
    weights = tmp_path / "resnet10t.safetensors"
    save_file(ref.state_dict(), str(weights))
    cfg = {"data": {"name": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4},
           "classifier": {"pretrained": {"source": "timm", "name": "resnet10t", "weights": str(weights),
                                         "layers": ["layer1", "layer3", "pre_logits", "logits"], "input_size": 32},
                          "train": {"steps": 0}},
           "autoencoder": {"model": TINY_AE, "loss": {"perceptual_layers": ["layer1"]},
                           "train": {"steps": 1, "batch_size": 4, "eval_samples": 8}},
           "cinn": {"layers": ["layer3", "logits"], "model": TINY_CINN, "train": {"steps": 1, "batch_size": 4, "eval_samples": 8}}}
    path = tmp_path / "timm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    for stage in ("autoencoder", "cinn"):
        main([stage, "--config", str(path), "--output-dir", str(out), "--quiet", "--limit-train", "16", "--limit-test", "8"])
    pipe = InvariancePipeline.from_pretrained(out)
    assert pipe.backbone.source == "timm" and pipe.layers == ["layer3", "logits"]
    assert torch.equal(pipe.backbone.net.conv1[0].weight, ref.conv1[0].weight)
