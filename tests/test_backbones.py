"""Named layers, feature shapes, Psi o Phi = f, torchvision weights from local files only."""
import pytest
import torch

from invint_hub import Backbone
from invint_hub.backbones import torchvision_model


@pytest.mark.parametrize("arch,channels,size", [("mnist_cnn", 1, 32), ("cifar_resnet", 3, 32), ("mnist_cnn", 3, 16)])
def test_own_backbones_layers_and_head(arch, channels, size):
    torch.manual_seed(0)
    b = Backbone(arch, num_classes=7, in_channels=channels, image_size=size, width=8).eval()
    x = torch.rand(3, channels, size, size) * 2 - 1
    logits = b(x)
    assert logits.shape == (3, 7)
    feats = b.forward_layers(x, b.layers)
    for layer in b.layers:
        assert tuple(feats[layer].shape[1:]) == b.feature_shapes[layer]
        # Psi(Phi(x)) == f(x) at every layer (log-softmax at the softmax layer)
        out = b.head(feats[layer], layer)
        ref = logits.log_softmax(1) if layer == "softmax" else logits
        got = out.log_softmax(1) if layer == "softmax" else out
        assert torch.allclose(got, ref, atol=1e-5), layer
    assert b.layers[-1] == "softmax" and b.logits_layer == "logits"


def test_unknown_layer_and_arch():
    b = Backbone("mnist_cnn", image_size=16, width=4)
    with pytest.raises(ValueError, match="unknown layer 'conv9'"):
        b.representation(torch.zeros(1, 1, 16, 16), "conv9")
    with pytest.raises(ValueError, match="unknown architecture"):
        Backbone("vgg99")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        b(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("arch,layers", [
    ("alexnet", ["conv5", "fc6", "fc7", "fc8", "softmax"]),
    ("resnet50", ["input", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc", "softmax"]),
    ("squeezenet1_1", ["conv1", "fire9", "logits", "softmax"]),
])
def test_torchvision_backbones_random_weights(arch, layers):
    b = Backbone.from_torchvision(arch, weights=None, image_size=64)
    assert set(layers) <= set(b.layers)
    shapes = {"alexnet": {"conv5": (256, 13, 13), "fc6": (4096,)}, "resnet50": {"layer4": (2048, 7, 7), "avgpool": (2048,)}}
    for layer, shape in shapes.get(arch, {}).items():
        assert b.feature_shapes[layer] == shape
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(b(x), b.head(b.representation(x, layers[1]), layers[1]), atol=1e-4)


def test_torchvision_weights_from_local_file_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        Backbone.from_torchvision("alexnet")
    # a local file is used, with strict keys; a new head for another number of classes
    tv = torchvision_model("squeezenet1_1", 1000)
    path = tmp_path / "sq.pth"
    torch.save(tv.state_dict(), path)
    b = Backbone.from_torchvision("squeezenet1_1", weights=None, weights_path=path, image_size=32)
    assert torch.equal(b.stages["conv1"][0].weight, tv.features[0].weight)
    b10 = Backbone.from_torchvision("squeezenet1_1", weights=None, weights_path=path, image_size=32, num_classes=10)
    assert b10(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert torch.equal(b10.stages["conv1"][0].weight, tv.features[0].weight)
    bad = tmp_path / "bad.pth"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError):
        Backbone.from_torchvision("squeezenet1_1", weights=None, weights_path=bad)
