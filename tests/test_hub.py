"""Save -> load round trips with strict key checks, for every model class."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from invint_hub import Autoencoder, Backbone, ConditionalINN
from invint_hub.hub import load_weights


def _models():
    torch.manual_seed(0)
    t = ConditionalINN(latent_dim=8, cond_shape=[4, 8, 8], embed_dim=6, n_flows=2, hidden=16, depth=1, embedder_width=4)
    t.train()
    t(torch.randn(16, 8), torch.randn(16, 4, 8, 8))  # initialise ActNorms
    return {
        "cinn": (t, lambda m: m(torch.ones(2, 8) * 0.3, torch.linspace(-1, 1, 512).view(2, 4, 8, 8))[0]),
        "autoencoder": (Autoencoder(image_size=16, channels=1, latent_dim=8, width=4, n_down=2),
                        lambda m: m(torch.linspace(-1, 1, 512).view(2, 1, 16, 16), sample=False)[0]),
        "backbone_cnn": (Backbone("mnist_cnn", num_classes=3, in_channels=1, image_size=16, width=4),
                         lambda m: m(torch.linspace(-1, 1, 512).view(2, 1, 16, 16))),
        "backbone_resnet": (Backbone("cifar_resnet", num_classes=3, in_channels=3, image_size=16, width=4),
                            lambda m: m(torch.linspace(-1, 1, 1536).view(2, 3, 16, 16))),
    }


@pytest.mark.parametrize("name", ["cinn", "autoencoder", "backbone_cnn", "backbone_resnet"])
def test_save_load_identical(tmp_path, name):
    model, run = _models()[name]
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = type(model).from_pretrained(tmp_path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(run(model), run(loaded))


def test_config_is_the_constructor(tmp_path):
    model, _ = _models()["cinn"]
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["latent_dim"] == 8 and cfg["cond_shape"] == [4, 8, 8] and cfg["n_flows"] == 2
    again = ConditionalINN(**cfg)
    assert set(again.state_dict()) == set(model.state_dict())


def test_loaded_actnorm_is_not_reinitialised(tmp_path):
    model, run = _models()["cinn"]
    model.save_pretrained(tmp_path)
    loaded = ConditionalINN.from_pretrained(tmp_path)
    loaded.train()  # even in training mode, a loaded model keeps its statistics
    loaded(torch.randn(8, 8) * 50, torch.randn(8, 4, 8, 8))
    assert torch.equal(loaded.flow.blocks[0].norm.loc, model.flow.blocks[0].norm.loc)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_keys(tmp_path, change):
    model, _ = _models()["autoencoder"]
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    if change == "missing":
        state.pop(next(iter(state)))
    else:
        state["surprise.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="missing keys|unexpected keys"):
        Autoencoder.from_pretrained(tmp_path)


def test_fp16_weights_load_into_fp32(tmp_path):
    model, run = _models()["backbone_cnn"]
    model.eval().save_pretrained(tmp_path, dtype=torch.float16)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = Backbone.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(run(model), run(loaded), atol=1e-2, rtol=1e-2)


def test_shape_mismatch_fails(tmp_path):
    model, _ = _models()["autoencoder"]
    model.save_pretrained(tmp_path)
    other = Autoencoder(image_size=16, channels=1, latent_dim=9, width=4, n_down=2)
    with pytest.raises(RuntimeError):
        load_weights(other, tmp_path / "model.safetensors")


def test_model_card_written(tmp_path):
    from invint_hub.hub import write_model_card

    write_model_card(tmp_path, "T", "summary", {"layer": "fc"}, metrics={"acc": 0.99}, command="accelerate launch x")
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---") and "library_name: invint_hub" in text
    assert "| acc | 0.99 |" in text and "accelerate launch x" in text and "@inproceedings{rombach2020making" in text
