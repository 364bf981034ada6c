"""The concept INN e: pair loss, dimensionality estimate, pair datasets, training stage, transfer/edit/variance API."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from invint_hub.concepts import (
    AttributePairs,
    ColorMNISTPairs,
    FactorINN,
    LabelPairs,
    concept_direction,
    dims_from_scores,
    estimate_factor_dims,
    load_attribute_images,
    network_response,
    pair_loss,
    shared_factor_mask,
    transfer_latents,
)
from invint_hub.data import SyntheticDataset
from invint_hub.pipeline import InvariancePipeline


# ---------------------------------------------------------------------------------------
# pair loss
# ---------------------------------------------------------------------------------------
def test_pair_loss_matches_hand_computation():
    """Two pairs, factors of sizes [1, 2] (factor 1 = residual); pair 0 shares factor 0, pair 1 shares nothing."""
    rho = 0.975
    ea = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    eb = torch.tensor([[0.9, -1.0, 1.0], [2.0, 1.0, -2.0]])
    lda, ldb = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    factors = torch.tensor([0, 1])
    # loss1 per pair: 1/2 ||ea||^2 - logdet_a
    l1 = [0.5 * (1 + 4 + 1) - 0.3, 0.5 * (0.25 + 0 + 9) + 0.2]
    # pair 0 shares factor 0: (0.9 - rho * 1)^2 / 2 / (1 - rho^2); the other factor is plain N(0, I)
    l2_0 = 0.5 * (0.9 - rho) ** 2 / (1 - rho**2) + 0.5 * (1 + 1) - 0.1
    # pair 1 has label 1 = the residual factor: shared as well (the loss does what the label says)
    l2_1 = 0.5 * 4.0 + 0.5 * ((1 - rho * 0.0) ** 2 + (-2 - rho * 3.0) ** 2) / (1 - rho**2) - 0.4
    want = ((l1[0] + l2_0) + (l1[1] + l2_1)) / 2
    got = pair_loss(ea, lda, eb, ldb, factors, [1, 2], rho)
    assert math.isclose(got.item(), want, rel_tol=1e-6)
    per_pair = pair_loss(ea, lda, eb, ldb, factors, [1, 2], rho, reduction="none")
    assert torch.allclose(per_pair, torch.tensor([l1[0] + l2_0, l1[1] + l2_1]), rtol=1e-6)


def test_pair_loss_rewards_correlated_shared_factors():
    torch.manual_seed(0)
    a = torch.randn(4096, 4)
    b = torch.randn(4096, 4)
    b_shared = b.clone()
    b_shared[:, :2] = 0.975 * a[:, :2] + math.sqrt(1 - 0.975**2) * b[:, :2]  # the model's own pair distribution
    zero = torch.zeros(4096)
    f = torch.zeros(4096, dtype=torch.long)
    assert pair_loss(a, zero, b_shared, zero, f, [2, 2]) < pair_loss(a, zero, b, zero, f, [2, 2]) - 10


def test_shared_factor_mask_negative_label_means_all_but():
    m = shared_factor_mask(torch.tensor([1, -2, 0]), 3)
    assert m.tolist() == [[0, 1, 0], [1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("bad", ["shape", "labels", "sizes"])
def test_pair_loss_rejects_bad_input(bad):
    e, ld, f = torch.zeros(2, 3), torch.zeros(2), torch.tensor([0, 1])
    with pytest.raises(ValueError):
        if bad == "shape":
            pair_loss(e, ld, torch.zeros(2, 4), ld, f, [1, 2])
        elif bad == "labels":
            pair_loss(e, ld, e, ld, torch.tensor([0, 5]), [1, 2])
        else:
            pair_loss(e, ld, e, ld, f, [1, 1])


# ---------------------------------------------------------------------------------------
# dimensionality estimate
# ---------------------------------------------------------------------------------------
def test_dimensionality_estimate_known_answer():
    """64-d codes: pairs of factor 0 share 32 unit-variance dimensions, pairs of factor 1 share 16.

    Scores are then 32/64 and 16/64 (residual 1); softmax([0.5, 0.25, 1]) * 64 = [18.67, 14.54, 30.8] -> [18, 14, 32].
    """
    g = torch.Generator().manual_seed(0)
    n = 20000
    za = torch.randn(n, 64, generator=g)
    zb = torch.randn(n, 64, generator=g)
    factors = torch.arange(n) % 2
    zb[factors == 0, :32] = za[factors == 0, :32]
    zb[factors == 1, 32:48] = za[factors == 1, 32:48]
    dims, scores = estimate_factor_dims(za, zb, factors, n_concepts=2)
    assert scores[0] == pytest.approx(0.5, abs=0.02) and scores[1] == pytest.approx(0.25, abs=0.02) and scores[2] == 1.0
    assert dims == [18, 14, 32]
    assert dims_from_scores([0.5, 0.25, 1.0], 64) == [18, 14, 32]


def test_dimensionality_estimate_needs_every_factor():
    z = torch.randn(10, 4)
    with pytest.raises(ValueError, match="no pairs of factor 1"):
        estimate_factor_dims(z, z, torch.zeros(10, dtype=torch.long), n_concepts=2)


# ---------------------------------------------------------------------------------------
# the model and its Hub I/O
# ---------------------------------------------------------------------------------------
def _factor_inn() -> FactorINN:
    torch.manual_seed(0)
    e = FactorINN(dim=8, n_flows=2, hidden=16, depth=1, factor_sizes=[2, 3, 3], factor_names=["digit", "color", "residual"])
    e.train()
    e(torch.randn(32, 8) * 2 + 1)  # initialise the ActNorms
    return e.eval()


def test_factor_inn_invertible_and_named():
    e = _factor_inn()
    z = torch.randn(5, 8)
    code, logdet = e(z)
    assert torch.allclose(e.inverse(code)[0], z, atol=1e-5)
    assert e.concept_names == ["digit", "color"] and e.residual_name == "residual"
    assert e.factor_slice("color") == slice(2, 5) and e.factor_index(2) == 2
    assert e.factor_mask(["digit", "residual"]).tolist() == [True, True, False, False, False, True, True, True]
    with pytest.raises(ValueError, match="unknown concept"):
        e.factor_index("hair")


@pytest.mark.parametrize("kwargs", [dict(factor_sizes=[8]), dict(factor_sizes=[4, 3]), dict(factor_sizes=[0, 8]),
                                    dict(factor_sizes=[4, 4], rho=1.0), dict(factor_sizes=[4, 4], factor_names=["a", "a"])])
def test_factor_inn_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        FactorINN(dim=8, n_flows=1, hidden=8, depth=1, **kwargs)


def test_factor_inn_save_load_identical(tmp_path):
    e = _factor_inn()
    e.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["factor_sizes"] == [2, 3, 3] and cfg["factor_names"] == ["digit", "color", "residual"] and cfg["rho"] == 0.975
    loaded = FactorINN.from_pretrained(tmp_path)
    z = torch.linspace(-2, 2, 24).view(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(z)[0], e(z)[0])
    assert loaded.concept_names == ["digit", "color"]


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_factor_inn_strict_keys(tmp_path, change):
    e = _factor_inn()
    e.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    if change == "missing":
        state.pop(sorted(state)[0])
    else:
        state["flow.extra_weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="do not match FactorINN"):
        FactorINN.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------
# pair datasets
# ---------------------------------------------------------------------------------------
def _masks(n=40, size=8):
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.6).to(torch.uint8) * 255
    return masks, torch.arange(n) % 4


def test_colormnist_pairs_share_what_they_say():
    masks, labels = _masks()
    pairs = ColorMNISTPairs(masks, labels, ["digit", "fg", "bg", "color"], seed=3)
    s = pairs.sample(torch.arange(40))
    assert s["pairs"].shape == (40, 2, 3, 8, 8) and s["pairs"].min() >= -1 and s["pairs"].max() <= 1
    for k, name in enumerate(["digit", "fg", "bg", "color"]):
        sel = s["factors"] == k
        assert sel.any(), name
        same_digit = (s["digit_a"][sel] == s["digit_b"][sel]).all()
        same_fg = torch.equal(s["fg_a"][sel], s["fg_b"][sel])
        same_bg = torch.equal(s["bg_a"][sel], s["bg_b"][sel])
        assert (bool(same_digit), same_fg, same_bg) == {
            "digit": (True, False, False), "fg": (same_digit.item(), True, False),
            "bg": (same_digit.item(), False, True), "color": (same_digit.item(), True, True)}[name]
    # the first image of each pair is the item itself, painted with its colours
    i = 5
    m = masks[i].float() / 255
    want = (s["bg_a"][i].view(3, 1, 1) * (1 - m) + s["fg_a"][i].view(3, 1, 1) * m) * 2 - 1
    assert torch.allclose(s["pairs"][i, 0], want)
    # a pure function of the indices: resuming and fixed test pairs
    again = pairs.get_batch(torch.arange(40))
    assert torch.equal(again[0], s["pairs"]) and torch.equal(again[1], s["factors"])
    assert not torch.equal(pairs.get_batch(torch.arange(40).flip(0))[1], s["factors"].flip(0))


def test_colormnist_shape_pairs_repaint_the_same_image():
    masks, labels = _masks()
    s = ColorMNISTPairs(masks, labels, ["shape"], seed=1).sample(torch.arange(40))
    assert torch.equal(s["j"], torch.arange(40))
    assert not torch.equal(s["fg_a"], s["fg_b"]) and not torch.equal(s["bg_a"], s["bg_b"])
    m = masks.float() / 255  # both halves are the same mask, each with its own colours
    for h, (fg, bg) in enumerate(((s["fg_a"], s["bg_a"]), (s["fg_b"], s["bg_b"]))):
        want = (bg.view(-1, 3, 1, 1) * (1 - m) + fg.view(-1, 3, 1, 1) * m) * 2 - 1
        assert torch.allclose(s["pairs"][:, h], want)


def test_pair_weights_set_how_often_each_concept_is_shared():
    masks, labels = _masks()
    uniform = ColorMNISTPairs(masks, labels, ["digit", "fg", "bg"], seed=3)
    weighted = ColorMNISTPairs(masks, labels, ["digit", "fg", "bg"], seed=3).set_weights({"digit": 4, "fg": 1, "bg": 1})
    idx = torch.arange(40).repeat(150)  # 6000 pairs
    f = weighted.sample(idx)["factors"]
    share = torch.bincount(f, minlength=3).double() / len(f)
    assert abs(share[0] - 4 / 6) < 0.03 and abs(share[1] - 1 / 6) < 0.03 and abs(share[2] - 1 / 6) < 0.03
    fu = uniform.sample(idx)["factors"]
    assert (torch.bincount(fu, minlength=3).double() / len(fu) - 1 / 3).abs().max() < 0.03
    # the pairs still share what their label says, and stay a pure function of the indices
    s = weighted.sample(torch.arange(40))
    digit = s["factors"] == 0
    assert (s["digit_a"][digit] == s["digit_b"][digit]).all() and torch.equal(weighted.sample(torch.arange(40))["pairs"], s["pairs"])
    # weights=None gives back the uniform draw exactly (the shipped test pairs do not change)
    assert torch.equal(weighted.set_weights(None).sample(idx)["factors"], fu)


@pytest.mark.parametrize("weights, match", [({"digit": 1, "fg": 1}, "one weight per concept"),
                                            ({"digit": 1, "fg": 1, "bg": 1, "size": 1}, "one weight per concept"),
                                            ({"digit": 0, "fg": 1, "bg": 1}, "> 0")])
def test_pair_weights_reject_bad_values(weights, match):
    masks, labels = _masks()
    with pytest.raises(ValueError, match=match):
        ColorMNISTPairs(masks, labels, ["digit", "fg", "bg"]).set_weights(weights)


def test_pair_weights_apply_to_the_training_pairs_only(monkeypatch):
    from types import SimpleNamespace

    import invint_hub.train.concepts as stage

    masks, labels = _masks()
    monkeypatch.setattr(stage, "make_dataset", lambda *a, **k: SimpleNamespace(masks=masks, labels=labels))
    monkeypatch.setattr(stage, "ColorMNIST", SimpleNamespace)  # the fake dataset passes the stage's type check
    cfg = {"data": {"name": "colormnist", "image_size": 32, "channels": 3},
           "concepts": {"pair_weights": {"digit": 4, "fg": 1, "bg": 1}}}
    args = SimpleNamespace(data_dir=None)
    train, test = stage.make_pair_dataset(cfg, "train_split", args, None, 0), stage.make_pair_dataset(cfg, "test_split", args, None, 1)
    assert train.weights.tolist() == [4.0, 1.0, 1.0] and test.weights is None
    cfg["concepts"]["pair_weights"] = {"digit": 4}
    with pytest.raises(ValueError, match="concepts.pair_weights: .*one weight per concept"):
        stage.make_pair_dataset(cfg, "train_split", args, None, 0)


def test_colormnist_pairs_reject_unknown_concepts():
    masks, labels = _masks()
    with pytest.raises(ValueError, match="subset"):
        ColorMNISTPairs(masks, labels, ["digit", "size"])


def test_label_pairs_same_class():
    ds = SyntheticDataset(64, 8, 1, num_classes=4, seed=0)
    pairs = LabelPairs(ds, seed=0)
    x, f = pairs.get_batch(torch.arange(64))
    assert x.shape == (64, 2, 1, 8, 8) and (f == 0).all() and pairs.concept_names == ["class"]
    # recover each partner's index from its pixels and check its class
    flat = ds.images.flatten(1)
    partner = torch.cdist(x[:, 1].flatten(1), flat).argmin(1)
    assert torch.equal(ds.labels[partner], ds.labels[:64])
    assert torch.equal(x[:, 0], ds.images[:64])


def test_attribute_pairs_from_a_parquet_folder(tmp_path):
    """The CelebA path: a local parquet folder with an image column and binary attribute columns."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    n = 24
    images = [Image.fromarray(rng.integers(0, 255, (20, 16, 3), dtype=np.uint8)) for _ in range(n)]
    glasses = rng.integers(0, 2, n).astype(bool).tolist()
    smiling = [int(v) for v in rng.choice([-1, 1], n)]
    ds = datasets.Dataset.from_dict({"image": images, "Eyeglasses": glasses, "Smiling": smiling},
                                    features=datasets.Features({"image": datasets.Image(), "Eyeglasses": datasets.Value("bool"),
                                                                "Smiling": datasets.Value("int64")}))
    (tmp_path / "faces").mkdir()
    ds.to_parquet(str(tmp_path / "faces" / "train-00000.parquet"))
    imgs, attrs = load_attribute_images("faces", "train", 8, 3, ["Eyeglasses", "Smiling"], data_dir=tmp_path)
    assert imgs.shape == (n, 3, 8, 8) and imgs.dtype == torch.uint8
    assert attrs[:, 0].tolist() == [int(g) for g in glasses] and attrs[:, 1].tolist() == [int(s > 0) for s in smiling]
    pairs = AttributePairs(imgs, attrs, ["glasses", "smiling"], seed=0)
    x, f = pairs.get_batch(torch.arange(n))
    partner = torch.cdist(x[:, 1].flatten(1), imgs.float().flatten(1) / 127.5 - 1).argmin(1)
    assert torch.equal(attrs[partner, f], attrs[torch.arange(n), f])
    with pytest.raises(ValueError, match="no attribute columns"):
        load_attribute_images("faces", "train", 8, 3, ["Bald"], data_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# the training stage and the pipeline API
# ---------------------------------------------------------------------------------------
def test_concepts_stage_writes_a_loadable_component(concept_pipeline_dir, cpipe):
    info = json.loads((concept_pipeline_dir / "pipeline.json").read_text())
    assert info["concepts"] == "concepts" and set(info["cinn"]) == {"conv1", "logits"}
    assert cpipe.concept_names == ["class"] and cpipe.concepts.factor_names == ["class", "residual"]
    assert sum(cpipe.concepts.factor_sizes) == cpipe.autoencoder.latent_dim
    metrics = json.loads((concept_pipeline_dir / "concepts" / "metrics.json").read_text())
    assert set(metrics["dimensionality_estimate"]["dims"]) == {"class", "residual"}
    assert set(metrics["concept_variance_explained"]) == {"conv1", "logits"}
    assert set(metrics["pair_correlation"]["class"]) == {"class", "residual"}
    card = (concept_pipeline_dir / "concepts" / "README.md").read_text()
    assert "invint_hub.train concepts" in card and "variance explained by z at logits" in card
    logs = [json.loads(line) for line in (concept_pipeline_dir / "logs" / "concepts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["split"] == "train"] == [1, 2, 3]
    assert "concepts=['class']" in repr(cpipe)


def test_concepts_stage_needs_an_autoencoder(tiny_config, tmp_path):
    from invint_hub.train import main

    with pytest.raises(SystemExit, match="autoencoder"):
        main(["concepts", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--quiet"])


def _images(n=4, seed=0):
    ds = SyntheticDataset(n, 16, 1, num_classes=4, seed=seed)
    return ds.images


def test_transfer_from_itself_changes_nothing(cpipe):
    x = _images(4)
    for concept in ("class", "residual", ["class", "residual"]):
        assert torch.allclose(cpipe.transfer(x, x, concept), cpipe.reconstruct(x), atol=1e-4)


def test_transfer_replaces_exactly_the_chosen_factor(cpipe):
    e = cpipe.concepts
    target, source = _images(3, seed=0), _images(3, seed=1)
    z = transfer_latents(cpipe, target, source, "class")
    code = e(z)[0]
    ct, cs = e(cpipe.encode(target))[0], e(cpipe.encode(source))[0]
    sl = e.factor_slice("class")
    assert torch.allclose(code[:, sl], cs[:, sl], atol=1e-4)
    rest = ~e.factor_mask("class")
    assert torch.allclose(code[:, rest], ct[:, rest], atol=1e-4)
    assert not torch.allclose(code[:, sl], ct[:, sl], atol=1e-2)
    # amount interpolates; one source image broadcasts over a batch of targets
    half = transfer_latents(cpipe, target, source, "class", amount=0.5)
    assert torch.allclose(e(half)[0][:, sl], 0.5 * (ct[:, sl] + cs[:, sl]), atol=1e-4)
    assert cpipe.transfer(target, source[:1], "class").shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="cannot pair"):
        cpipe.transfer(target, _images(2), "class")


def test_edit(cpipe):
    x = _images(2)
    assert torch.allclose(cpipe.edit(x, "class", 0.0), cpipe.reconstruct(x), atol=1e-4)
    a, b = cpipe.edit(x, "class", 3.0, seed=0), cpipe.edit(x, "class", 3.0, seed=1)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, cpipe.edit(x, "class", 3.0, seed=0)) and not torch.equal(a, b)
    # an explicit direction: exactly e^-1(e(E(x)) + amount * d / |d|) inside the factor
    e = cpipe.concepts
    size = e.factor_sizes[0]
    d = torch.ones(size)
    code = e(cpipe.encode(x))[0]
    z_new = e.inverse(code + 2.0 * torch.cat([d / d.norm(), torch.zeros(e.dim - size)]))[0]
    assert torch.allclose(cpipe.edit(x, "class", 2.0, direction=d), cpipe.decode(z_new), atol=1e-5)
    for bad in (dict(concept="hair", amount=1.0), dict(concept="class", amount=float("nan")),
                dict(concept="class", amount=1.0, direction=torch.ones(size + 1))):
        with pytest.raises(ValueError):
            cpipe.edit(x, **bad)


def test_edit_many_sums_the_single_edits(cpipe):
    x = _images(2)
    assert torch.allclose(cpipe.edit_many(x, {"class": 2.0}, seed=3), cpipe.edit(x, "class", 2.0, seed=3), atol=1e-5)
    assert torch.allclose(cpipe.edit_many(x, {}), cpipe.reconstruct(x), atol=1e-4)
    e = cpipe.concepts
    both = cpipe.edit_many(x, {"class": 1.5, e.residual_name: -2.0}, seed=0)
    code = e(cpipe.encode(x))[0]
    shift = 1.5 * concept_direction(e, "class", 0) - 2.0 * concept_direction(e, e.residual_name, 0)
    assert torch.allclose(both, cpipe.decode(e.inverse(code + shift)[0]), atol=1e-5)
    assert not torch.allclose(both, cpipe.edit(x, "class", 1.5, seed=0), atol=1e-3)
    for bad in ({"hair": 1.0}, {"class": float("inf")}):
        with pytest.raises(ValueError):
            cpipe.edit_many(x, bad)


def test_concept_variance_explained(cpipe):
    x = _images(16)
    for layer in cpipe.layers:
        v = cpipe.concept_variance_explained(layer, x, n=4, seed=0)
        assert set(v) == {"class", "residual"} and all(-0.5 < f <= 1.0 for f in v.values())
        assert v == cpipe.concept_variance_explained(layer, x, n=4, seed=0)
    v = cpipe.concept_variance_explained("logits", n=4)  # default: the pipeline's own samples
    assert set(v) == {"class", "residual"}
    with pytest.raises(ValueError, match="no cINN"):
        cpipe.concept_variance_explained("conv2", x)
    with pytest.raises(ValueError, match="n >= 2"):
        cpipe.concept_variance_explained("logits", x, n=1)


def test_network_response(cpipe):
    r = network_response(cpipe, _images(3), "class", n=8, seed=0)
    assert r["predictions"].shape == (3, 8) and r["std"].shape == (3,) and ((0 <= r["changed"]) & (r["changed"] <= 1)).all()


def test_pipeline_round_trip_with_concepts(cpipe, tmp_path):
    cpipe.save_pretrained(tmp_path / "p")
    info = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert info["concepts"] == "concepts" and (tmp_path / "p" / "concepts" / "model.safetensors").is_file()
    again = InvariancePipeline.from_pretrained(tmp_path / "p")
    x, y = _images(2, 0), _images(2, 1)
    assert torch.equal(again.transfer(x, y, "class"), cpipe.transfer(x, y, "class"))
    # without a concept model the key disappears and the API says what is missing
    bare = InvariancePipeline(cpipe.backbone, cpipe.autoencoder, cpipe.cinns, cpipe.info)
    bare.save_pretrained(tmp_path / "bare")
    assert "concepts" not in json.loads((tmp_path / "bare" / "pipeline.json").read_text())
    assert bare.concept_names == []
    with pytest.raises(ValueError, match="no concept model"):
        bare.transfer(x, y, "class")


def test_concept_model_must_match_the_autoencoder(cpipe):
    e = FactorINN(dim=cpipe.autoencoder.latent_dim + 2, n_flows=1, hidden=8, depth=1, factor_sizes=[2, cpipe.autoencoder.latent_dim])
    with pytest.raises(ValueError, match="concept INN expects latent"):
        InvariancePipeline(cpipe.backbone, cpipe.autoencoder, cpipe.cinns, concepts=e)


# ---------------------------------------------------------------------------------------
# the shipped configs
# ---------------------------------------------------------------------------------------
def test_colormnist_config_concepts_section():
    from pathlib import Path

    from invint_hub.train.config import concept_settings

    cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / "colormnist.yaml").read_text())
    c = concept_settings(cfg)
    assert cfg["data"]["name"] == "colormnist" and cfg["data"]["channels"] == 3 and cfg["data"]["image_size"] == 32
    assert c["pairs"] == "colormnist" and c["factors"] == ["digit", "fg", "bg"] and c["rho"] == 0.995
    assert c["factor_sizes"] == [5, 3, 3, 53] and c["pair_weights"] == {"digit": 8, "fg": 1, "bg": 1}


def test_celeba_config_runs_on_a_fake_celeba_folder(tmp_path):
    """configs/celeba_concepts.yaml end to end (all four stages) on 32 fake faces, with tiny models."""
    from pathlib import Path

    import datasets
    import numpy as np
    from PIL import Image

    from invint_hub.train import main

    cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / "celeba_concepts.yaml").read_text())
    columns = sorted(set(cfg["concepts"]["attributes"].values()) | {cfg["data"]["label_column"]})
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 16)):
        feats = {"image": datasets.Image(), **{c: datasets.Value("int64") for c in columns}}
        rows = {"image": [Image.fromarray(rng.integers(0, 255, (26, 22, 3), dtype=np.uint8)) for _ in range(n)],
                **{c: [int(v) for v in rng.choice([-1, 1], n)] for c in columns}}
        (tmp_path / "data" / "celeba").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=datasets.Features(feats)).to_parquet(
            str(tmp_path / "data" / "celeba" / f"{split}-00000.parquet"))
    tiny_train = {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "eval_samples": 16}
    cfg["data"]["image_size"] = 16
    cfg["classifier"] = {"model": dict(cfg["classifier"]["model"], width=4), "train": tiny_train}
    cfg["autoencoder"]["model"] = {"latent_dim": 16, "width": 4, "n_down": 2, "max_mult": 2}
    cfg["autoencoder"]["train"] = tiny_train
    cfg["cinn"] = {"layers": ["layer3", "logits"], "model": {"embed_dim": 8, "n_flows": 2, "hidden": 16, "depth": 1,
                                                              "embedder_depth": 2, "embedder_width": 4}, "train": tiny_train}
    cfg["concepts"].update(model={"n_flows": 2, "hidden": 16, "depth": 1}, train=tiny_train, estimate_pairs=32)
    path = tmp_path / "celeba.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    for stage in ("classifier", "autoencoder", "cinn", "concepts"):
        main([stage, "--config", str(path), "--output-dir", str(out), "--data-dir", str(tmp_path / "data"), "--quiet"])
    pipe = InvariancePipeline.from_pretrained(out)
    assert pipe.concept_names == ["hair", "glasses", "gender", "beard", "age", "smiling"]
    assert pipe.class_names == ["female", "male"] and sum(pipe.concepts.factor_sizes) == 16
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(pipe.transfer(x, x, "glasses"), pipe.reconstruct(x), atol=1e-4)


def test_report_colour_measurement_recovers_painted_colours():
    """eval/concepts_report.py reads fg/bg colours from pixels; on painted digit-like masks it must find them."""
    from eval.concepts_report import closer_to_source, measure_colors

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 8:24, 13:19] = 255  # a thick centred stroke (~9 % of the pixels)
    fg, bg = torch.rand(16, 3, generator=g), torch.rand(16, 3, generator=g)
    x = ColorMNISTPairs(masks, torch.zeros(16), ["fg"])._paint(torch.arange(16), fg, bg)
    fg_m, bg_m = measure_colors(x)
    assert torch.allclose(bg_m, bg, atol=1e-5) and torch.allclose(fg_m, fg, atol=1e-5)
    share, count = closer_to_source(fg_m, fg, bg)
    gap = (fg - bg).norm(dim=1) > 0.3
    assert count == int(gap.sum()) and share == 1.0
    assert closer_to_source(bg_m, fg, bg)[0] == 0.0


def test_a_concepts_checkpoint_becomes_a_loadable_pipeline(concept_pipeline_dir, tmp_path):
    """eval/concepts_checkpoint.py: the newest checkpoint of the tiny run is the saved e, loadable as a pipeline."""
    import json

    from eval.concepts_checkpoint import checkpoint_pipeline
    from invint_hub.pipeline import InvariancePipeline

    saved = json.loads((concept_pipeline_dir / "concepts" / "config.json").read_text())
    cfg = yaml.safe_load((concept_pipeline_dir / "concepts.yaml").read_text())
    cfg["concepts"]["factor_sizes"] = saved["factor_sizes"]  # the run estimated them; the rebuild needs them fixed
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(yaml.safe_dump(cfg))
    ckpt = checkpoint_pipeline(concept_pipeline_dir, fixed, tmp_path / "pipe")
    assert ckpt.name == "step_3"
    pipe = InvariancePipeline.from_pretrained(tmp_path / "pipe")
    final = InvariancePipeline.from_pretrained(concept_pipeline_dir)
    z = torch.randn(5, saved["dim"])
    with torch.no_grad():
        assert torch.allclose(pipe.concepts.eval()(z)[0], final.concepts.eval()(z)[0], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint step_99"):
        checkpoint_pipeline(concept_pipeline_dir, fixed, tmp_path / "pipe2", step=99)
    with pytest.raises(ValueError, match="factor_sizes must be fixed"):
        checkpoint_pipeline(concept_pipeline_dir, concept_pipeline_dir / "concepts.yaml", tmp_path / "pipe3")


def test_nearest_class_mean_accuracy_known_answer():
    from eval.concept_codes import nearest_mean_accuracy

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.tensor([[0.0], [0.2], [10.0], [10.2], [20.0], [1.0]])  # the last row (class 2) sits by class 0's mean
    assert nearest_mean_accuracy(codes, labels) == pytest.approx(5 / 6)
    assert nearest_mean_accuracy(torch.tensor([[0.0], [0.1], [5.0], [5.1]]), torch.tensor([3, 3, 7, 7])) == 1.0
