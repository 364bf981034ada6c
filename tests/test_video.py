"""The Video tab: decoding with limits, bad files, the batched frame mix, encoding, the handler, and the browser.

Every video here is made at run time (PyAV, no system ffmpeg), from MNIST test digits where the local data has
them (else the embedded pipeline's own generated digits).
"""
import socket
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import app  # noqa: E402
from invint_hub import InvariancePipeline  # noqa: E402
from invint_hub.space import ModelRegistry  # noqa: E402
from invint_hub.space import video as V  # noqa: E402

av = pytest.importorskip("av")
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated)")
CHROMIUM = "/usr/bin/chromium"


def solid_frames(n: int, size: int = 16) -> list[np.ndarray]:
    return [np.full((size, size, 3), (7 * i) % 255, np.uint8) for i in range(n)]


def gif(path: Path, n: int, ms: int, size: int = 16) -> Path:
    ims = [Image.fromarray(f) for f in solid_frames(n, size)]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=ms, loop=0)
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return ModelRegistry(["mnist"], include_embedded=False, examples_per_model=10,
                         example_dir=tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def pipe(registry) -> InvariancePipeline:
    return registry.get("mnist").pipe


@pytest.fixture(scope="module")
def clips(registry, tmp_path_factory):
    """Example clips of a moving digit in every input format, and files that must be refused."""
    d = tmp_path_factory.mktemp("videos")
    digit = registry.get("mnist").examples[3]
    out = {fmt: V.make_example_video(digit, d / f"digit.{fmt}") for fmt in ("mp4", "webm", "gif")}
    out["many_frames_mp4"] = V.encode_video(solid_frames(301), d / "many.mp4", 60)  # 5 s, 301 frames
    out["many_frames_webm"] = V.encode_video(solid_frames(301), d / "many.webm", 60, "webm")  # no frame count stored
    out["long_mp4"] = V.encode_video(solid_frames(23), d / "long.mp4", 2)  # 11.5 s, 23 frames
    moving = V.read_video(out["mp4"]).frames  # at the limits: 300 frames, 10 s, 640x480, the digit moving
    big = [np.pad(np.asarray(moving[i % 24].resize((480, 480))), ((0, 0), (80, 80), (0, 0))) for i in range(300)]
    out["at_limits"] = V.encode_video(big, d / "at_limits.mp4", 30)
    out["long_gif"] = gif(d / "long.gif", 23, 500)
    out["many_frames_gif"] = gif(d / "many.gif", 301, 20)
    data = out["mp4"].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.mp4"
    (d / "text.mp4").write_text("this is plain text, not a video")
    out["text"] = d / "text.mp4"
    (d / "empty.webm").write_bytes(b"")
    out["empty"] = d / "empty.webm"
    out["audio_only"] = d / "audio.webm"
    with av.open(str(out["audio_only"]), "w") as c:  # sound, no picture
        s = c.add_stream("libopus", rate=48000)
        s.layout = "mono"
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 48000, i * 960
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return out


# ---------------------------------------------------------------------------------------
# decoding and its limits
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, codec", [("mp4", "h264"), ("webm", "vp9"), ("gif", "gif")])
def test_example_clips_decode_in_every_format(clips, fmt, codec):
    c = V.read_video(clips[fmt])
    assert len(c.frames) == 24 and (c.width, c.height) == (112, 112) and c.codec == codec
    assert 11.5 <= c.fps <= 12.6  # 12 fps written; a gif stores 8 cs a frame
    assert c.frames[0].mode == "RGB"
    assert not np.array_equal(np.asarray(c.frames[0]), np.asarray(c.frames[6]))  # the digit moves


@pytest.mark.parametrize("name, expected", [
    ("many_frames_mp4", "too many frames: 301"),
    ("many_frames_webm", "too many frames: more than 300"),  # found while decoding: webm stores no count
    ("many_frames_gif", "too many frames"),
    ("long_mp4", "too long: 11.5 s"),
    ("long_gif", "too long: 11.5 s"),
    ("truncated", "not a readable video"),
    ("text", "not a readable video"),
    ("empty", "is empty"),
    ("audio_only", "has no video stream"),
])
def test_bad_or_too_long_videos_are_refused_in_one_line(clips, name, expected):
    with pytest.raises(ValueError) as err:
        V.read_video(clips[name])
    msg = str(err.value)
    assert expected in msg and "\n" not in msg and str(clips[name].parent) not in msg, msg


def test_a_video_at_the_limits_is_accepted(clips):
    c = V.read_video(clips["at_limits"])
    assert len(c.frames) == 300 and abs(c.seconds - 10.0) < 1e-6 and (c.width, c.height) == (640, 480)


def test_big_frames_are_scaled_down_as_they_decode(clips, pipe):
    full = V.read_video(clips["at_limits"], max_frames=300)
    small = V.read_video(clips["at_limits"], min_side=4 * pipe.image_size)
    assert small.frames[0].size == (171, 128) and (small.width, small.height) == (640, 480)
    a, b = V.frames_to_batch(pipe, full.frames[:24]), V.frames_to_batch(pipe, small.frames[:24])
    assert (a - b).abs().mean() < 0.02  # the model sees (nearly) the same pixels


def test_size_limits_and_missing_input(clips):
    with pytest.raises(ValueError, match="file is too large"):
        V.read_video(clips["mp4"], max_bytes=1000)
    with pytest.raises(ValueError, match=r"frames are too large: 112x112"):
        V.read_video(clips["mp4"], max_frame_pixels=100 * 100)
    with pytest.raises(ValueError, match="too many frames"):
        V.read_video(clips["webm"], max_frames=10)
    with pytest.raises(ValueError, match="no video given"):
        V.read_video(None)
    with pytest.raises(ValueError, match="not found"):
        V.read_video("/nonexistent/clip.mp4")
    assert len(V.read_video({"path": str(clips["gif"])}).frames) == 24  # a Gradio file payload


def test_limits_are_the_issues():
    assert (V.MAX_SECONDS, V.MAX_FRAMES) == (10.0, 300)


# ---------------------------------------------------------------------------------------
# the computation and the output
# ---------------------------------------------------------------------------------------
def test_frames_to_batch_and_mix_frames_match_the_pipeline(pipe, clips, registry):
    clip = V.read_video(clips["mp4"])
    frames = V.frames_to_batch(pipe, clip.frames)
    assert frames.shape == (24, pipe.channels, pipe.image_size, pipe.image_size)
    assert frames.min() >= -1 and frames.max() <= 1
    still = pipe.preprocess(str(registry.get("mnist").examples[8]))
    m = V.mix_frames(pipe, still, frames, "fc", chunk=7)  # chunks of 7: 4 batches, the last one short
    ref = torch.cat([pipe.mix(still, frames[i : i + 1], "fc") for i in (0, 13, 23)])
    assert torch.allclose(m.mixed[[0, 13, 23]], ref, atol=1e-5)
    assert m.mixed.shape == frames.shape and m.mixed_pred.shape == (24,)
    assert m.still_pred == int(pipe.predict(still).argmax())
    assert torch.allclose(V.mix_frames(pipe, still, frames, "fc", chunk=64).mixed, m.mixed, atol=1e-5)
    # conv1 keeps the still image: its outputs stay near the still's reconstruction; the frames' motion shows at fc
    rec = pipe.reconstruct(still)
    conv1 = V.mix_frames(pipe, still, frames, "conv1").mixed
    assert (conv1 - rec).abs().mean() < (m.mixed - rec).abs().mean()
    with pytest.raises(ValueError, match="no cINN for layer"):
        V.mix_frames(pipe, still, frames, "nope")


def test_convert_frames_centres_each_digit(pipe, clips):
    clip = V.read_video(clips["mp4"])
    moving = V.frames_to_batch(pipe, clip.frames)
    centred = V.frames_to_batch(pipe, clip.frames, convert=True, domain="digit")
    com = lambda x: ((x + 1).sum(1).sum(1) * torch.arange(x.shape[-1])).sum(-1) / (x + 1).sum((1, 2, 3))  # noqa: E731
    assert com(centred).std() < 0.5 * com(moving).std()  # the horizontal centre of mass no longer travels


@pytest.mark.parametrize("fmt, codec", [("mp4", "h264"), ("webm", "vp9")])
def test_video_invariances_writes_a_side_by_side_video(pipe, clips, registry, tmp_path, fmt, codec):
    still = pipe.preprocess(str(registry.get("mnist").examples[8]))
    seen = []
    path, m, clip = V.video_invariances(pipe, clips["gif"], still, "fc", fmt=fmt, path=tmp_path / f"out.{fmt}",
                                        progress=lambda f, d: seen.append(f))
    back = V.read_video(path)
    assert back.codec == codec and len(back.frames) == 24 and abs(back.fps - clip.fps) < 0.1
    assert back.width % 2 == 0 and back.height % 2 == 0 and back.width > 2 * back.height * 0.9  # two cells side by side
    assert seen and max(seen) <= 1.0 and seen == sorted(seen)
    with pytest.raises(ValueError, match="output format"):
        V.video_invariances(pipe, clips["gif"], still, "fc", fmt="avi")


def test_encode_video_refuses_odd_or_ragged_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        V.encode_video([np.zeros((15, 16, 3), np.uint8)], tmp_path / "a.mp4", 10)
    with pytest.raises(ValueError, match="frame 1"):
        V.encode_video([np.zeros((16, 16, 3), np.uint8), np.zeros((18, 16, 3), np.uint8)], tmp_path / "b.mp4", 10)
    with pytest.raises(ValueError, match="no frames"):
        V.encode_video([], tmp_path / "c.mp4", 10)


def test_output_files_are_pruned(monkeypatch, tmp_path):
    monkeypatch.setattr(V, "_OUT_DIR", tmp_path)
    monkeypatch.setattr(V, "KEEP_OUTPUTS", 3)
    paths = [V.output_path("mp4") for _ in range(6)]
    assert len(list(tmp_path.iterdir())) == 3 and paths[-1].exists() and not paths[0].exists()


# ---------------------------------------------------------------------------------------
# the handler
# ---------------------------------------------------------------------------------------
def test_handler_returns_a_video_and_summary(registry, clips):
    sa = app.SpaceApp(registry)
    video, still = sa.video_example("mnist")
    assert Path(video).suffix == ".mp4" and len(V.read_video(video).frames) == 24
    calls = []
    out, md = sa.video("mnist", video, still, "fc", True, False, "mp4", progress=lambda f, desc=None: calls.append(f))
    assert V.read_video(out).codec == "h264" and "24 frames" in md and "layer `fc`" in md
    assert calls and calls[-1] <= 1.0
    out, md = sa.video("mnist", str(clips["webm"]), Image.open(still), "softmax", fmt="webm")
    assert out.endswith(".webm") and "`softmax`" in md
    with pytest.raises(ValueError, match="still image"):
        sa.video("mnist", video, None, "fc")
    ui = app.ui_errors(sa.video)
    for name, expected in [("long_gif", "too long"), ("text", "not a readable video")]:
        with pytest.raises(gr.Error) as err:
            ui("mnist", str(clips[name]), still, "fc")
        assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(gr.Error, match="no video given"):
        ui("mnist", None, still, "fc")


def test_video_endpoint_is_in_the_demo(registry):
    demo = app.build_demo(registry)
    names = [d.get("api_name") for d in demo.config["dependencies"]]
    assert "video" in names


# ---------------------------------------------------------------------------------------
# the browser
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_browser_uploads_a_video_and_plays_the_result(registry, clips, tmp_path):
    import os

    from playwright.sync_api import sync_playwright

    from test_app_browser import ARGS

    shots = Path(os.environ.get("INVINT_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    demo = app.build_demo(registry)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **app.launch_options())
    def upload_video(pg, path):
        """gr.File makes its file input when clicked: go through the file chooser, as a user does."""
        clear = pg.locator("#video-file button[aria-label='Clear']")
        if clear.count():
            clear.first.click()
        with pg.expect_file_chooser() as chooser:
            pg.locator("#video-file button.upload-container").click()
        chooser.value.set_files(str(path))
        pg.wait_for_function("(n) => document.querySelector('#video-file').innerText.includes(n)", arg=Path(path).stem)

    playing = ("() => { const v = document.querySelector('#video-result video'); "
               "return v && v.readyState >= 2 && v.videoWidth > 0; }")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(60_000)
            pg.goto(demo.local_url)
            pg.get_by_role("tab", name="Video").click()
            pg.locator("#video-still input[type=file]").set_input_files(str(registry.get("mnist").examples[8]))
            pg.wait_for_selector("#video-still img")
            # 300 frames of 640x480: the progress bar shows each stage
            upload_video(pg, clips["at_limits"])
            pg.click("#run-video")
            pg.wait_for_function("() => /decoding the video|frames \\d+\\/300|encoding/.test("
                                 "document.querySelector('#video-result').innerText)")
            pg.wait_for_function(playing)
            assert "300 frames" in pg.locator("#video-summary").inner_text()
            upload_video(pg, clips["webm"])
            pg.click("#run-video")
            pg.wait_for_function("() => document.querySelector('#video-summary').innerText.startsWith('24 frames')")
            pg.wait_for_function(playing)
            size = pg.evaluate("() => { const v = document.querySelector('#video-result video'); "
                               "return [v.videoWidth, v.videoHeight, v.duration]; }")
            assert size[0] > size[1] > 100 and 1.5 < size[2] < 2.5, size  # side by side, 24 frames at 12 fps
            assert "24 frames" in pg.locator("#video-summary").inner_text()
            pg.evaluate("() => { const v = document.querySelector('#video-result video'); v.pause(); v.currentTime = 0.5; }")
            pg.wait_for_timeout(500)
            pg.screenshot(path=str(shots / "video.png"), full_page=True)
            # a too long video: one line, and the tab still works
            upload_video(pg, clips["long_gif"])
            pg.click("#run-video")
            toast = pg.locator(".toast-body").first
            toast.wait_for()
            assert "too long" in toast.inner_text() and "Traceback" not in toast.inner_text()
            # the example button: makes a clip from an MNIST digit, fills both inputs, runs
            before = pg.locator("#video-summary").inner_text()
            pg.click("#video-example")
            pg.wait_for_function("(b) => document.querySelector('#video-summary').innerText !== b", arg=before)
            pg.wait_for_function(playing)
            browser.close()
    finally:
        demo.close()
