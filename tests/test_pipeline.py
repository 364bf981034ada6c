"""The embedded default pipeline end to end: loading, shapes, determinism, the paper's operations, bad input."""
import time

import pytest
import torch
from PIL import Image

from invint_hub import InvariancePipeline
from invint_hub.data import default_data_dir
from invint_hub.pipeline import embedded_pipelines


@pytest.fixture(scope="module")
def pipe():
    return InvariancePipeline.from_pretrained()


@pytest.fixture(scope="module")
def digits(pipe):
    """A few real test digits if the data folder is there, else drawn strokes."""
    if default_data_dir() is not None and (default_data_dir() / "mnist").is_dir():
        from invint_hub.data import ImageDataset

        ds = ImageDataset("mnist", "test", 32, 1, limit=16)
        return ds.images[:16].float() / 127.5 - 1, ds.labels[:16]
    x = -torch.ones(4, 1, 32, 32)
    x[:, :, 6:26, 15:18] = 1.0  # a "1"
    return x, torch.ones(4, dtype=torch.long)


def test_default_is_embedded_and_complete(pipe):
    assert embedded_pipelines()[0] == "mnist"  # the default comes first (the Space's default model)
    assert pipe.layers == ["conv1", "conv2", "fc", "logits", "softmax"]
    assert pipe.image_size == 32 and pipe.channels == 1
    assert pipe.class_names == [str(i) for i in range(10)]
    assert "mnist" in repr(pipe)


def test_loads_quickly_offline():
    t = time.perf_counter()
    InvariancePipeline.from_pretrained()
    assert time.perf_counter() - t < 5.0  # the bound (in-process, torch already imported)


def test_classifier_is_accurate_on_real_digits(pipe, digits):
    x, y = digits
    assert (pipe.predict(x).argmax(1) == y).float().mean() >= 0.9


def test_sample_shapes_and_seeded_determinism(pipe, digits):
    x = digits[0][:3]
    for layer in pipe.layers:
        s1 = pipe.sample_invariances(x, layer, n=4, seed=7)
        assert s1.shape == (3, 4, 1, 32, 32)
        assert s1.min() >= -1 and s1.max() <= 1
        assert torch.equal(s1, pipe.sample_invariances(x, layer, n=4, seed=7))
        assert not torch.equal(s1, pipe.sample_invariances(x, layer, n=4, seed=8))


def test_temperature_zero_gives_identical_samples(pipe, digits):
    s = pipe.sample_invariances(digits[0][:1], "fc", n=3, temperature=0.0, seed=0)
    assert torch.allclose(s[0, 0], s[0, 1], atol=1e-5)


def test_invariances_round_trip_is_the_reconstruction(pipe, digits):
    x = digits[0][:4]
    for layer in ("conv1", "logits"):
        v = pipe.invariances(x, layer)
        z = pipe.representation(x, layer)
        zbar = pipe.cinns[layer].inverse(v, z)[0]
        assert (zbar - pipe.encode(x)).abs().max() < 1e-3
    assert pipe.reconstruct(x).shape == x.shape


def test_mix_keeps_the_content_class_at_deep_layers(pipe, digits):
    x, y = digits
    if len(x) < 8:
        pytest.skip("needs real digits")
    a, b = x[:8], x[8:16]
    mixed = pipe.mix(a, b, "logits")
    assert mixed.shape == a.shape
    agree = (pipe.predict(mixed).argmax(1) == pipe.predict(a).argmax(1)).float().mean()
    assert agree >= 0.75
    with pytest.raises(ValueError, match="cannot mix"):
        pipe.mix(x[:2], x[:3], "fc")


def test_variance_explained_rises_with_depth(pipe, digits):
    x = digits[0][:8]
    first = pipe.variance_explained(x, pipe.layers[0], n=16).mean()
    last = pipe.variance_explained(x, "logits", n=16).mean()
    assert 0 <= first < last
    assert pipe.variance_explained(x[:1], "fc", n=8).shape == (1,)


def test_inputs_of_every_form(pipe, odd_image_files):
    img = Image.new("L", (100, 60), 0)
    for inp in (img, str(odd_image_files["rgba"]), odd_image_files["cmyk"], torch.zeros(28, 28), [img, img]):
        assert pipe.predict(inp).shape[1] == 10


def test_bad_inputs_raise_value_error(pipe, bad_image_files):
    for path in bad_image_files.values():
        with pytest.raises(ValueError):
            pipe.sample_invariances(path, "fc", n=2)
    with pytest.raises(ValueError, match="conv9"):
        pipe.sample_invariances(torch.zeros(1, 1, 32, 32), "conv9")
    with pytest.raises(ValueError, match="n must be"):
        pipe.sample_invariances(torch.zeros(1, 1, 32, 32), "fc", n=0)


def test_unknown_pipeline_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an invint_hub pipeline"):
        InvariancePipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        InvariancePipeline.from_pretrained("no_such_pipeline")


def test_embedded_weights_fit_the_budget():
    from invint_hub.pipeline import PRETRAINED_DIR

    total = sum(f.stat().st_size for f in PRETRAINED_DIR.rglob("*.safetensors"))
    assert total <= 60_000_000, f"embedded weights are {total / 1e6:.2f} MB; the budget is 60 MB"



def test_interpret_equals_the_single_view_methods(pipe, digits):
    x = digits[0][:1]
    for layer in ("conv1", "fc"):
        r = pipe.interpret(x, layer, n=6, temperature=0.8, seed=5)
        assert r.layer == layer and r.x.shape == x.shape and r.probs.shape == (10,)
        assert r.samples.shape == (6, 1, 32, 32) and r.sample_pred.shape == (6,) and r.recon.shape == x.shape
        assert torch.allclose(r.samples, pipe.sample_invariances(x, layer, 6, 0.8, seed=5)[0], atol=1e-5)
        assert torch.allclose(r.recon, pipe.reconstruct(x), atol=1e-5)
        assert torch.allclose(r.probs, pipe.predict(x)[0], atol=1e-6)
        assert r.variance_explained == pytest.approx(float(pipe.variance_explained(x, layer, 6, 0.8, seed=5)), rel=1e-5)
        assert abs(r.class_agreement - float(pipe.class_agreement(x, layer, 6, 0.8, seed=5))) <= 1 / 6 + 1e-9
        assert torch.equal(r.sample_pred, pipe.backbone(r.samples).argmax(1))
    assert pipe.interpret(x, "fc", n=1, seed=0).variance_explained is None  # one sample spans no variance


def test_layer_sweep_uses_the_same_v_at_every_layer(pipe, digits):
    x = digits[0][:1]
    s = pipe.layer_sweep(x, n=4, temperature=1.0, seed=3)
    assert list(s.samples) == pipe.layers == list(s.variance_explained) == list(s.class_agreement)
    for layer in pipe.layers:
        assert s.samples[layer].shape == (4, 1, 32, 32) and s.sample_pred[layer].shape == (4,)
        assert torch.allclose(s.samples[layer], pipe.sample_invariances(x, layer, 4, seed=3)[0], atol=1e-5)
        assert 0.0 <= s.class_agreement[layer] <= 1.0
    assert torch.allclose(s.recon, pipe.reconstruct(x), atol=1e-5)


def test_mix_layers_equals_mix_both_ways(pipe, digits):
    xa, xb = digits[0][:1], digits[0][1:2]
    m = pipe.mix_layers(xa, xb)
    assert m.x.shape == (2, 1, 32, 32) and m.pred.tolist() == pipe.predict(torch.cat([xa, xb])).argmax(1).tolist()
    for layer in pipe.layers:
        assert torch.allclose(m.a_with_b[layer], pipe.mix(xa, xb, layer), atol=1e-5), layer
        assert torch.allclose(m.b_with_a[layer], pipe.mix(xb, xa, layer), atol=1e-5), layer
        assert isinstance(m.pred_a_with_b[layer], int)
    same = pipe.mix_layers(xa, xa)
    assert all(torch.allclose(same.a_with_b[l], same.recon[:1], atol=1e-3) for l in pipe.layers)


def test_attack_view_equals_fgsm_and_sign_noise(pipe, digits):
    from invint_hub.attacks import fgsm, sign_noise

    x = digits[0][:1]
    a = pipe.attack(x, eps=0.2, seed=4)
    assert a.eps == 0.2 and a.x.shape == (3, 1, 32, 32) and a.probs.shape == (3, 10) and len(a.recon_pred) == 3
    assert torch.equal(a.x[:1], x) and torch.equal(a.x[1:2], fgsm(pipe.backbone, x, 0.2))
    assert torch.equal(a.x[2:], sign_noise(x, 0.2, seed=4))
    assert torch.allclose(a.recon, pipe.reconstruct(a.x), atol=1e-5)
    for layer in pipe.layers:  # with its own invariances, the original decodes to its reconstruction
        assert torch.allclose(a.seen[layer][0], a.recon[0], atol=1e-3) and len(a.seen_pred[layer]) == 3


@pytest.mark.parametrize("call, match", [
    (lambda p, x: p.interpret(x, "fc", n=0), "samples"),
    (lambda p, x: p.interpret(x, "fc", temperature=-1), "temperature"),
    (lambda p, x: p.layer_sweep(x, seed=-2), "seed"),
    (lambda p, x: p.interpret(x, "conv9"), "conv9"),
    (lambda p, x: p.interpret(torch.cat([x, x]), "fc"), "one image"),
    (lambda p, x: p.mix_layers(x, torch.cat([x, x])), "one image"),
    (lambda p, x: p.attack(x, eps=3.0), "eps"),
    (lambda p, x: p.attack(x, eps="a lot"), "eps"),
    (lambda p, x: p.cinn("conv9"), "conv9"),
])
def test_views_refuse_bad_input_with_one_line(pipe, digits, call, match):
    with pytest.raises(ValueError, match=match) as e:
        call(pipe, digits[0][:1])
    assert "\n" not in str(e.value)
