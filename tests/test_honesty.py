"""Honesty about the domain (issue 15, items 2 and 4): domain sentences, the calibrated out-of-domain warning,
variance explained clipped with an explanation, notices for odd uploads, the re-encoding cosine with its random-pair
reference, and the Adversarial tab's v-sample grids on the clean and the attacked z."""
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import app  # noqa: E402
from invint_hub import InvariancePipeline  # noqa: E402
from invint_hub.data import default_data_dir, load_split  # noqa: E402
from invint_hub.pipeline import PRETRAINED_DIR  # noqa: E402
from invint_hub.space import ModelRegistry, load_image, prepare_input, upload_notices  # noqa: E402

EMBEDDED = ["mnist", "colormnist"]
DATA = default_data_dir()
needs_photos = pytest.mark.skipif(DATA is None or not (DATA / "cifar10_jpeg_q75").is_dir(),
                                  reason="needs ../shared/data/cifar10_jpeg_q75")


@pytest.fixture(scope="module")
def mnist():
    return InvariancePipeline.from_pretrained("mnist")


@pytest.fixture(scope="module")
def embedded_app(tmp_path_factory):
    registry = ModelRegistry(EMBEDDED, include_embedded=False, examples_per_model=4,
                             example_dir=tmp_path_factory.mktemp("examples"))
    return app.SpaceApp(registry)


@pytest.fixture(scope="module")
def photos():
    """A few cifar10 test photos, upscaled to 128 px as a user's upload would be."""
    ds = load_split("cifar10", "test").select(range(40))
    return [im.convert("RGB").resize((128, 128), Image.BICUBIC) for im in ds["image"]]


# --- domain sentences ---------------------------------------------------------------------
@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_pipelines_say_what_they_understand(name):
    info = json.loads((PRETRAINED_DIR / name / "pipeline.json").read_text())
    pipe = InvariancePipeline.from_pretrained(name)
    assert pipe.domain == info["domain"] and "digits" in pipe.domain
    card = (PRETRAINED_DIR / name / "README.md").read_text()
    assert info["domain"] in card and "is out of domain" in card and "out_of_domain" in card


def test_model_info_shows_the_domain(embedded_app):
    text = embedded_app.model_info("mnist")
    assert "Understands:" in text and "white strokes on a black background" in text and "(calibrated)" in text


def test_model_info_says_when_the_warning_misses_much(tmp_path):
    """Where the calibrated warning fires on less than 90 % of an out-of-domain set (measured in pipeline.json), the
    model line gives those rates (the CIFAR-10 pipeline's reconstruction error flags few digit images; the MNIST
    pipeline's misses some converted photos); the sets it flags well are not listed."""
    from invint_hub.pipeline import embedded_pipelines

    names = [n for n in ("mnist", "colormnist", "cifar10-efficientnet_lite0", "cifar10") if n in embedded_pipelines()]
    space_app = app.SpaceApp(ModelRegistry(names, include_embedded=False, examples_per_model=2, example_dir=tmp_path))
    for name in names:
        pipe = InvariancePipeline.from_pretrained(name)
        text = space_app.model_info(name)
        rates = pipe.ood["ood_rates"]
        weak = {k: v for k, v in rates.items() if v < 0.9}
        assert ("misses many" in text) == bool(weak), name
        for k, v in rates.items():
            shown = f"{100 * v:.1f}% of {k.replace(' (as is)', '')}"
            assert (shown in text) == (v < 0.9), (name, k)
    for name in ("cifar10-efficientnet_lite0", "cifar10"):  # one autoencoder: it reconstructs digits too well
        if name in names:
            assert "misses many" in space_app.model_info(name)


def test_a_pipeline_without_a_domain_sentence_gets_a_generic_one(tiny_pipeline_dir):
    pipe = InvariancePipeline.from_pretrained(tiny_pipeline_dir)
    assert "trained on" in pipe.domain and pipe.ood is None
    with pytest.raises(ValueError, match="no out-of-domain calibration"):
        pipe.out_of_domain(torch.zeros(1, pipe.channels, pipe.image_size, pipe.image_size))
    assert pipe.random_pair_cosine(pipe.layers[0]) is None


# --- the calibrated warning ---------------------------------------------------------------------
@pytest.mark.parametrize("name", EMBEDDED)
def test_stored_calibration_meets_the_rates(name):
    ood = InvariancePipeline.from_pretrained(name).ood
    assert ood is not None and ood["test_rate"] < 0.05 and ood["ood_rate"] >= 0.9
    assert ood["counts"]["test"] == 10000 and "ood_calibration.py" in ood["command"]
    results = (Path(__file__).resolve().parent.parent / "eval" / "results" / "ood.md").read_text()
    assert f"{ood['threshold']:.5f}" in results


def test_domain_score_matches_the_views_and_the_definition(mnist):
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    s = mnist.domain_score(x)
    ref = (mnist.reconstruct(x) - x).pow(2).mean(1).sqrt().flatten(1).mean(1)
    assert torch.allclose(s, ref, atol=1e-6)
    r = mnist.interpret(x[:1], "fc", n=2)
    assert r.domain_score == pytest.approx(float(s[0]), rel=1e-5)
    assert r.out_of_domain is bool(mnist.out_of_domain(x[:1])[0])
    assert mnist.layer_sweep(x[:1], n=2).domain_score == pytest.approx(float(s[0]), rel=1e-5)


@needs_photos
def test_warning_rates_on_fresh_samples(mnist):
    """Re-measured here on a subset: few test digits are flagged, photos are."""
    from invint_hub.data import build_dataset

    ds = build_dataset({"name": "mnist", "image_size": 32, "channels": 1, "test_split": "test"}, "test_split", limit=1000)
    test_rate = float(mnist.out_of_domain(ds.get_batch(torch.arange(len(ds)))[0]).float().mean())
    photos = list(load_split("cifar10", "test").select(range(200))["image"])
    photo_rate = float(mnist.out_of_domain(photos).float().mean())
    assert test_rate < 0.07 and photo_rate >= 0.9, (test_rate, photo_rate)
    # the Space's default path for digit models re-centres uploads: test digits converted so are rarely flagged either
    digits = list(load_split("mnist", "test").select(range(300))["image"])
    x = torch.cat([prepare_input(mnist, im, convert=True, domain="digit")[0] for im in digits])
    assert float(mnist.out_of_domain(x).float().mean()) < 0.08


@needs_photos
def test_check_uploads_warns_for_a_photo_and_not_for_a_digit(embedded_app, photos):
    e = embedded_app.registry.get("mnist")
    assert embedded_app.check_uploads("mnist", True, str(e.examples[0])) == ""
    warned = [embedded_app.check_uploads("mnist", False, p) for p in photos[:10]]
    assert all("Out of domain" in w and "handwritten digits" in w for w in warned)
    # colormnist fires on 96.9% of 1000 such upscaled photos (eval/results/ood.md); these 40 are a sample of them
    color = [embedded_app.check_uploads("colormnist", False, p) for p in photos]
    assert sum("Out of domain" in w for w in color) >= 32
    two = embedded_app.check_uploads("mnist", False, photos[0], str(e.examples[1]))
    assert two.startswith("Image A: ⚠️") and "Image B" not in two


@needs_photos
def test_interpret_sweep_attack_results_carry_the_warning(embedded_app, photos):
    out = embedded_app.interpret("mnist", "upload", photos[0], None, False, "fc", 4, 1.0, 0)
    assert "Out of domain" in out[3]
    assert "Out of domain" in embedded_app.sweep("mnist", "upload", photos[0], None, False, 2, 1.0, 0)[5]
    assert "Out of domain" in embedded_app.attack("mnist", photos[0], False, 0.1, 0)[10]
    e = embedded_app.registry.get("mnist")
    assert "Out of domain" not in embedded_app.interpret("mnist", "upload", str(e.examples[0]), None, True, "fc", 4, 1.0, 0)[3]


def test_calibration_script_end_to_end(tmp_path):
    if DATA is None or not (DATA / "animalfaces10").is_dir() or not (DATA / "cifar10_jpeg_q75").is_dir():
        pytest.skip("needs ../shared/data")
    from eval import ood_calibration

    out = tmp_path / "ood.md"
    ood_calibration.main(["--pipeline", "mnist", "--ood-limit", "60", "--convert-limit", "20", "--pairs", "100",
                          "--results", str(out)])
    text = out.read_text()
    assert "| mnist | 0.0" in text and "animalfaces10 (as is) | 60 |" in text and "`softmax`" in text
    with pytest.raises(SystemExit, match="quantile"):
        ood_calibration.main(["--pipeline", "mnist", "--quantile", "0.9"])


# --- variance explained: clipped, and said so ---------------------------------------------------
def test_variance_explained_is_clipped_and_explained(mnist, embedded_app):
    torch.manual_seed(0)
    found = None
    for k in range(20):  # noise images: the softmax layer's cINN spreads wider than the data for some
        x = torch.rand(1, 1, 32, 32) * 2 - 1
        r = mnist.interpret(x, "softmax", n=16, seed=k)
        assert r.variance_explained == pytest.approx(min(r.variance_ratio, 1.0))
        assert 0.0 <= r.variance_explained <= 1.0
        if r.variance_ratio > 1:
            found = (x, k, r)
            break
    assert found is not None, "no noise image with a ratio above 1 in 20 tries"
    x, k, r = found
    img = Image.fromarray(((x[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8))
    out = embedded_app.interpret("mnist", "upload", img, None, False, "softmax", 16, 1.0, k)
    assert "100%" in out[2] and "clipped at 100%" in out[3] and f"{100 * r.variance_ratio:.0f}%" in out[3]
    assert "103%" not in out[2] or r.variance_ratio * 100 < 102.5


# --- odd uploads ------------------------------------------------------------------------------
def test_odd_uploads_get_a_notice(odd_image_files, mnist):
    def notes(name, convert=False):
        return prepare_input(mnist, load_image(odd_image_files[name]), convert=convert)[1]

    assert "transparency flattened onto white" in notes("rgba")
    assert "16-bit values scaled to 8 bits" in notes("gray16")
    assert "single pixel" in notes("one_pixel")
    assert "cut off" in notes("wide") and "15.0:1" in notes("wide")
    assert "first of 3 frames" in notes("animated")
    assert "CMYK" in notes("cmyk")
    assert upload_notices(load_image(odd_image_files["gray"]), 1, 32) == []  # a plain grey image: nothing to say


def test_check_uploads_shows_the_notice_in_one_line(embedded_app, odd_image_files):
    for name, text in [("rgba", "transparency"), ("gray16", "16-bit"), ("one_pixel", "single pixel"), ("wide", "cut off")]:
        md = embedded_app.check_uploads("colormnist", False, str(odd_image_files[name]))
        notice = [line for line in md.split("  \n") if line.startswith("ℹ️")]
        assert len(notice) == 1 and text in notice[0] and "\n" not in notice[0], md


# --- re-encoding cosine ----------------------------------------------------------------------------
def test_reencoding_cosine_is_the_cosine_of_the_samples_representations(mnist):
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    r = mnist.interpret(x, "conv2", n=5, seed=2)
    rep_s, rep_x = mnist.representation(r.samples, "conv2").flatten(1), mnist.representation(x, "conv2").flatten(1)
    ref = torch.nn.functional.cosine_similarity(rep_s, rep_x)
    assert torch.allclose(r.reencode_cosines, ref, atol=1e-4) and r.reencode_cosine == pytest.approx(float(ref.mean()), abs=1e-4)
    assert r.random_pair_cosine == mnist.info["random_pair_cosine"]["layers"]["conv2"]
    s = mnist.layer_sweep(x, n=5, seed=2)
    assert s.reencode_cosine["conv2"] == pytest.approx(r.reencode_cosine, abs=1e-4)
    assert set(s.random_pair_cosine) == set(mnist.layers) and all(v is not None for v in s.random_pair_cosine.values())


def test_digits_reencode_closer_than_random_pairs(embedded_app, mnist):
    """On test digits the samples keep more of x's representation than a random other digit shares with it."""
    e = embedded_app.registry.get("mnist")
    r = mnist.interpret(str(e.examples[0]), "fc", n=16)
    assert r.reencode_cosine > r.random_pair_cosine
    out = embedded_app.interpret("mnist", "upload", str(e.examples[0]), None, True, "fc", 8, 1.0, 0)
    assert "re-encoding cosine" in out[3] and f"{r.random_pair_cosine:.2f}" in out[3]
    sweep_extra = embedded_app.sweep("mnist", "upload", str(e.examples[0]), None, True, 4, 1.0, 0)[5]
    assert all(f"`{l}`" in sweep_extra for l in mnist.layers) and "random" in sweep_extra


# --- Adversarial: v samples on the clean and the attacked z -------------------------------------------
def test_attack_v_sample_grids(mnist, embedded_app):
    e = embedded_app.registry.get("mnist")
    x = mnist.preprocess(str(e.examples[2]))
    a = mnist.attack(x, 0.3, seed=4, n=6)
    for l in mnist.layers:
        assert a.samples_clean[l].shape == a.samples_attacked[l].shape == (6, 1, 32, 32)
        assert len(a.sample_pred_clean[l]) == len(a.sample_pred_attacked[l]) == 6
    # the clean grid is exactly Interpret's samples with the same seed
    assert torch.allclose(a.samples_clean["fc"], mnist.interpret(x, "fc", n=6, seed=4).samples, atol=1e-5)
    assert not torch.allclose(a.samples_clean["logits"], a.samples_attacked["logits"])
    assert mnist.attack(x, 0.3, seed=4, n=0).samples_clean == {}
    with pytest.raises(ValueError, match="samples must be >= 0"):
        mnist.attack(x, 0.3, n=-1)
    out = embedded_app.attack("mnist", str(e.examples[2]), True, 0.3, 4)
    assert len(out) == 11 and isinstance(out[8], Image.Image) and isinstance(out[9], Image.Image)
    assert out[8].size == out[9].size and "v samples" in out[10]


# --- in the browser: the warning is visible for a photo upload ------------------------------------------
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@needs_photos
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium")
@pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated)")
def test_browser_shows_the_ood_warning_for_a_photo(tmp_path_factory, photos):
    from playwright.sync_api import sync_playwright

    d = Path(os.environ.get("INVINT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screens"))
    d.mkdir(parents=True, exist_ok=True)
    photo = d / "photo.png"
    photos[3].save(photo)
    registry = ModelRegistry(EMBEDDED, include_embedded=False, examples_per_model=10,
                             example_dir=tmp_path_factory.mktemp("examples"))
    demo = app.build_demo(registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_options())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(120_000)
            pg.goto(demo.local_url)
            assert "Understands:" in pg.locator("#model-info").inner_text()
            pg.locator("#interpret-image input[type=file]").set_input_files(str(photo))
            pg.wait_for_function("document.querySelector('#interpret-check')?.innerText.includes('Out of domain')")
            assert pg.locator("#interpret-check").is_visible()
            pg.click("#run-interpret")
            pg.wait_for_function("document.querySelector('#interpret-extra')?.innerText.includes('re-encoding cosine')")
            assert "Out of domain" in pg.locator("#interpret-extra").inner_text()
            pg.screenshot(path=str(d / "ood_interpret.png"), full_page=False)
            pg.get_by_role("tab", name="Adversarial").click()
            pg.locator("#adv-image input[type=file]").set_input_files(str(photo))
            pg.wait_for_function("document.querySelector('#adv-check')?.innerText.includes('Out of domain')")
            pg.click("#run-attack")
            pg.wait_for_selector("#adv-v-clean img")
            pg.wait_for_selector("#adv-v-attacked img")
            pg.screenshot(path=str(d / "ood_adversarial.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
