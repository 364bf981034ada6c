"""The Space's video mode (the official demo's): each frame's invariances decoded with a still image's representation.

For a layer L, frame f and still image s: v_f = t(E(f) | Phi_L(f)) and the output frame is D(t^-1(v_f | Phi_L(s))),
what the still image looks like with the frame's invariances (``InvariancePipeline.mix(content=s, invariances=f)``).

* ``read_video``: mp4 / webm / gif (anything FFmpeg reads, through PyAV, no system ffmpeg) with limits on the
  file size, the duration, the number of frames and the frame size; every refusal is a one-line ``ValueError``;
* ``frames_to_batch``: decoded frames -> the pipeline's input domain (optionally MNIST-style centred digits);
* ``mix_frames``: the batched computation, in chunks, through public pipeline methods only;
* ``encode_video``: frames -> H.264 mp4 or VP9 webm that browsers play; ``side_by_side`` composes input | output;
* ``make_example_video``: a short clip of a digit moving and turning, made at run time from one image.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import to_pil
from ..pipeline import InvariancePipeline
from .inputs import to_model_domain
from .render import font

MAX_SECONDS = 10.0
MAX_FRAMES = 300
MAX_BYTES = 64 * 1024 * 1024
MAX_FRAME_PIXELS = 3840 * 2160  # 4K UHD
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".m4v")
OUTPUT_FORMATS = {"mp4": ("libx264", {"crf": "18", "preset": "veryfast"}),
                  "webm": ("libvpx-vp9", {"crf": "24", "b:v": "0", "deadline": "realtime", "cpu-used": "8"})}
ProgressFn = Callable[[float, str], Any]


@dataclass
class Clip:
    """Decoded frames (RGB PIL images at the file's size) and their frame rate."""

    frames: list[Image.Image]
    fps: float
    width: int
    height: int
    codec: str

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


def _path_of(value: Any) -> Path:
    """A path, or a Gradio file payload (dict or object with ``path``) -> Path."""
    if value is None:
        raise ValueError("no video given: upload an mp4, webm or gif (or click the example)")
    if not isinstance(value, (str, Path)):
        get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
        value = get("path") or get("name")
        if not value:
            raise ValueError("cannot read a video from this input")
    return Path(value)


def _too_long(seconds: float) -> str:
    return f"the video is too long: {seconds:.1f} s (limit {MAX_SECONDS:g} s and {MAX_FRAMES} frames); trim it first"


def read_video(value: Any, max_seconds: float = MAX_SECONDS, max_frames: int = MAX_FRAMES,
               max_bytes: int = MAX_BYTES, max_frame_pixels: int = MAX_FRAME_PIXELS, min_side: int | None = None,
               progress: ProgressFn | None = None) -> Clip:
    """Decode a video file (path or Gradio payload), refusing bad, too long or huge ones with a one-line ``ValueError``.

    The limits are checked on the container's metadata before decoding and again while decoding (metadata can lie).
    ``min_side``: frames whose shorter side is longer are scaled down to it (keeping the aspect) as they decode, so
    300 frames of 4K never sit in memory at full size. ``Clip.width``/``height`` are the file's frame size.
    """
    import av

    path = _path_of(value)
    name = path.name
    if not path.is_file():
        raise ValueError(f"video file not found: {name}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"the video file {name} is empty")
    if size > max_bytes:
        raise ValueError(f"the video file is too large: {size / 2**20:.1f} MB (limit {max_bytes / 2**20:g} MB)")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{name} is not a readable video ({e.__class__.__name__})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{name} has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width * height > max_frame_pixels:
            raise ValueError(f"the video's frames are too large: {width}x{height} (limit {max_frame_pixels / 1e6:g} "
                             "megapixels a frame)")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        declared = float(container.duration) / 1e6 if container.duration else None
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
        if declared is not None and declared > max_seconds + 0.05:
            raise ValueError(_too_long(declared))
        if stream.frames and stream.frames > max_frames:
            raise ValueError(f"the video has too many frames: {stream.frames} (limit {max_frames} and {max_seconds:g} s)")
        frames: list[Image.Image] = []
        times: list[float] = []
        total = stream.frames or (round(declared * fps) if declared and fps else 0)
        try:
            for frame in container.decode(stream):
                if frame.width * frame.height > max_frame_pixels:
                    raise ValueError(f"the video's frames are too large: {frame.width}x{frame.height} (limit "
                                     f"{max_frame_pixels / 1e6:g} megapixels a frame)")
                if len(frames) >= max_frames:
                    raise ValueError(f"the video has too many frames: more than {max_frames} (limit {max_seconds:g} s "
                                     f"and {max_frames} frames)")
                t = float(frame.time) if frame.time is not None else None
                if t is not None:
                    times.append(t)
                    if t - times[0] >= max_seconds + 0.05:
                        raise ValueError(_too_long(t - times[0]))
                short = min(frame.width, frame.height)
                if min_side is not None and short > min_side:
                    f = min_side / short
                    frames.append(frame.to_image(width=max(2, round(frame.width * f)), height=max(2, round(frame.height * f)),
                                                 interpolation="AREA"))
                else:
                    frames.append(frame.to_image())  # RGB
                if not width:
                    width, height = frame.width, frame.height
                if progress is not None and total and len(frames) % 16 == 0:
                    progress(0.3 * min(1.0, len(frames) / total), "decoding the video")
        except av.FFmpegError as e:
            if not frames:
                raise ValueError(f"{name} could not be decoded ({e.__class__.__name__})") from None
            # a truncated file: keep the frames that decoded
        codec = stream.codec_context.name
    if not frames:
        raise ValueError(f"{name} has no frames that decode")
    if len(times) >= 2 and times[-1] > times[0]:
        fps = (len(times) - 1) / (times[-1] - times[0])
    if not (fps > 0 and math.isfinite(fps)):
        fps = 10.0
    fps = min(max(fps, 1.0), 60.0)
    if len(frames) / fps > max_seconds + 0.05:
        raise ValueError(_too_long(len(frames) / fps))
    return Clip(frames, fps, width or frames[0].width, height or frames[0].height, codec)


def frames_to_batch(pipe: InvariancePipeline, frames: list[Image.Image], convert: bool = False,
                    domain: str = "photo") -> torch.Tensor:
    """Frames -> (T, C, S, S) in [-1, 1]: centre-cropped and resized like every input (``pipe.preprocess``).

    ``convert`` (digit domain only): each frame MNIST-style (grey, bright strokes, centred; this removes motion);
    a blank frame is used as it is.
    """
    out = []
    for img in frames:
        s = min(img.size)
        if s > 4 * pipe.image_size:  # shrink big frames first (keeps the aspect, so the centre crop is the same)
            f = 4 * pipe.image_size / s
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BILINEAR,
                             reducing_gap=2.0)
        if convert and domain != "photo":
            try:
                img = to_model_domain(img, domain, pipe.channels)
            except ValueError:
                pass
        out.append(img)
    return pipe.preprocess(out)


@dataclass
class FrameMix:
    """Per frame: the model input, the still image's representation with the frame's invariances, and classes."""

    layer: str
    still: torch.Tensor  # (1, C, S, S)
    frames: torch.Tensor  # (T, C, S, S)
    mixed: torch.Tensor  # (T, C, S, S): D(t^-1(t(E(frame) | Phi(frame)) | Phi(still)))
    still_pred: int
    frame_pred: torch.Tensor  # (T,)
    mixed_pred: torch.Tensor  # (T,)


@torch.inference_mode()
def mix_frames(pipe: InvariancePipeline, still: torch.Tensor, frames: torch.Tensor, layer: str, chunk: int = 64,
               progress: ProgressFn | None = None) -> FrameMix:
    """Each frame's invariances with the still image's representation at ``layer``, ``chunk`` frames a batch."""
    pipe.cinn(layer)  # unknown layer: ValueError naming the pipeline's layers
    if still.shape[0] != 1:
        raise ValueError(f"one still image, got a batch of {still.shape[0]}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    mixed, frame_pred, mixed_pred = [], [], []
    n = frames.shape[0]
    for start in range(0, n, chunk):
        part = frames[start : start + chunk]
        m = pipe.mix(content=still, invariances=part, layer=layer)
        mixed.append(m)
        frame_pred.append(pipe.predict(part).argmax(1))
        mixed_pred.append(pipe.predict(m).argmax(1))
        if progress is not None:
            progress(0.3 + 0.5 * min(n, start + chunk) / n, f"frames {min(n, start + chunk)}/{n} at layer {layer}")
    return FrameMix(layer, still, frames, torch.cat(mixed), int(pipe.predict(still).argmax(1)[0]),
                    torch.cat(frame_pred), torch.cat(mixed_pred))


def side_by_side(left: torch.Tensor, right: torch.Tensor, cell: int = 160, gap: int = 8,
                 labels: tuple[str, str] = ("frame (model input)", "still's z, frame's v")) -> list[np.ndarray]:
    """(T, C, S, S) pairs -> RGB uint8 frames (H, W, 3), each ``[left | right]`` upscaled (nearest) under a label strip.

    Widths and heights are even (H.264 with 4:2:0 chroma needs them so).
    """
    if left.shape[0] != right.shape[0]:
        raise ValueError(f"{left.shape[0]} frames on the left, {right.shape[0]} on the right")
    cell += cell % 2
    gap += gap % 2
    head = 20
    width, height = 2 * cell + 3 * gap, head + cell + gap
    base = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(base)
    f = font(13)
    for j, text in enumerate(labels):
        draw.text((gap + j * (cell + gap) + cell / 2, head / 2 + 1), text, fill=(40, 40, 40), font=f, anchor="mm")
    out = []
    for a, b in zip(to_pil(left), to_pil(right)):
        canvas = base.copy()
        for j, im in enumerate((a, b)):
            canvas.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (gap + j * (cell + gap), head))
        out.append(np.asarray(canvas))
    return out


def encode_video(frames: list[np.ndarray], path: str | Path, fps: float, fmt: str = "mp4",
                 progress: ProgressFn | None = None) -> Path:
    """RGB uint8 frames (all one size, even sides) -> an H.264 mp4 or VP9 webm (yuv420p) that browsers play."""
    import av

    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {sorted(OUTPUT_FORMATS)}, got {fmt!r}")
    if not frames:
        raise ValueError("no frames to write")
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"frame sides must be even for 4:2:0 video, got {w}x{h}")
    codec, options = OUTPUT_FORMATS[fmt]
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = dict(options)
        for i, arr in enumerate(frames):
            if arr.shape[:2] != (h, w):
                raise ValueError(f"frame {i} is {arr.shape[1]}x{arr.shape[0]}, not {w}x{h}")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                out.mux(packet)
            if progress is not None and i % 16 == 0:
                progress(0.8 + 0.2 * i / len(frames), "encoding the video")
        for packet in stream.encode():
            out.mux(packet)
    return path


_OUT_DIR: Path | None = None
KEEP_OUTPUTS = 32


def output_path(suffix: str) -> Path:
    """A fresh file for a result video in this process's folder; only the newest ``KEEP_OUTPUTS`` are kept."""
    global _OUT_DIR
    if _OUT_DIR is None:
        _OUT_DIR = Path(tempfile.mkdtemp(prefix="invint_video_"))
    old = sorted(_OUT_DIR.glob("*"), key=lambda p: p.stat().st_mtime)
    for p in old[: max(0, len(old) - KEEP_OUTPUTS + 1)]:
        p.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(suffix=f".{suffix}", prefix="invariances_", dir=_OUT_DIR)
    os.close(fd)
    return Path(name)


def video_invariances(pipe: InvariancePipeline, video: Any, still: torch.Tensor, layer: str, convert: bool = False,
                      domain: str = "photo", fmt: str = "mp4", path: str | Path | None = None,
                      progress: ProgressFn | None = None) -> tuple[Path, FrameMix, Clip]:
    """The whole video mode: decode (with limits) -> model domain -> ``mix_frames`` -> side-by-side video file."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {sorted(OUTPUT_FORMATS)}, got {fmt!r}")
    clip = read_video(video, min_side=4 * pipe.image_size, progress=progress)
    frames = frames_to_batch(pipe, clip.frames, convert, domain)
    m = mix_frames(pipe, still, frames, layer, progress=progress)
    path = Path(path) if path is not None else output_path(fmt)
    encode_video(side_by_side(m.frames, m.mixed), path, clip.fps, fmt, progress)
    return path, m, clip


def make_example_video(image: Any, path: str | Path, seconds: float = 2.0, fps: int = 12, size: int = 112,
                       fmt: str | None = None) -> Path:
    """A short clip of ``image`` (a digit, a path or PIL image) translating and turning, written to ``path``
    (mp4, webm or gif after its suffix). Made at run time, e.g. from an MNIST test digit."""
    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert("RGB")
    n = max(2, round(seconds * fps))
    inner = int(size * 0.6)
    digit = img.resize((inner, inner), Image.Resampling.BILINEAR)
    bg = tuple(int(c) for c in np.median(np.concatenate([np.asarray(img)[0], np.asarray(img)[-1]]), axis=0))
    frames = []
    for i in range(n):
        t = i / (n - 1)
        angle = 35 * math.sin(2 * math.pi * t)
        dx = int(round(0.18 * size * math.sin(2 * math.pi * t)))
        dy = int(round(0.12 * size * math.cos(2 * math.pi * t)))
        canvas = Image.new("RGB", (size, size), bg)
        rot = digit.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=bg)
        canvas.paste(rot, ((size - inner) // 2 + dx, (size - inner) // 2 + dy))
        frames.append(canvas)
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt == "gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        return path
    size += size % 2
    return encode_video([np.asarray(f.resize((size, size))) for f in frames], path, fps, fmt)


__all__ = ["MAX_SECONDS", "MAX_FRAMES", "MAX_BYTES", "MAX_FRAME_PIXELS", "OUTPUT_FORMATS", "Clip", "FrameMix",
           "read_video", "frames_to_batch", "mix_frames", "side_by_side", "encode_video", "video_invariances",
           "make_example_video"]
