"""Reading what users send the Space: uploads decoded once and safely, photos and sketches converted
to a pipeline's input domain (MNIST-style digits: white on black, centred in a 20x20 box of 28x28),
and the limits on the sampling settings. Every function refuses bad input with a one-line ``ValueError``.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..images import open_image, to_rgb
from ..pipeline import InvariancePipeline

# MNIST-style grey digits; ColorMNIST is not one (its colours are concepts: uploads keep them, as photos)
DIGIT_DATASETS = ("mnist", "emnist", "kmnist", "qmnist")
DOMAINS = ("digit", "photo")
MNIST_BOX, MNIST_SIZE = 20, 28  # MNIST digits: fitted into 20x20, centred by mass in 28x28
MAX_SAMPLES = 64


# ---------------------------------------------------------------------------------------
# reading input
# ---------------------------------------------------------------------------------------
def one_line(err: BaseException | str) -> str:
    """An error message on one line (for the UI)."""
    text = str(err).strip() or err.__class__.__name__
    return " ".join(text.split())


def load_image(value: Any) -> Image.Image:
    """Whatever an image input delivers -> a decoded PIL image (EXIF orientation applied).

    Accepts ``None`` (refused), PIL images, numpy arrays, paths, bytes, and Gradio file
    payloads (dicts or objects with ``path`` or a ``data:`` ``url``).
    """
    if value is None:
        raise ValueError("no image given: upload, paste or draw one (or click an example)")
    if isinstance(value, np.ndarray):
        if value.size == 0:
            raise ValueError("the image is empty")
        if value.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {value.dtype}")
        value = Image.fromarray(value)
    shown = None  # the name to show in messages instead of a server-side path
    if not isinstance(value, (Image.Image, str, Path, bytes, bytearray)):
        get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
        path, url, shown = get("path"), get("url"), get("orig_name") or "the uploaded file"
        if path:
            value = path
        elif isinstance(url, str) and url.startswith("data:"):
            try:
                value = base64.b64decode(url.split(",", 1)[1], validate=False)
            except (IndexError, ValueError):
                raise ValueError("the image data URL is malformed") from None
        else:
            raise ValueError(f"cannot read an image from {type(value).__name__}")
    try:
        img = open_image(value)
    except ValueError as e:
        if shown is None or not isinstance(value, (str, Path)):
            raise
        raise ValueError(str(e).replace(str(value), str(shown))) from None
    frames = int(getattr(img, "n_frames", 1) or 1)
    if getattr(img, "is_animated", False):
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        pass
    if frames > 1:
        img.info["frames"] = frames  # exif_transpose returns a copy without n_frames (for upload_notices)
    return img


# ---------------------------------------------------------------------------------------
# input domain: photos and sketches -> what the pipeline was trained on
# ---------------------------------------------------------------------------------------
def input_domain(pipe: InvariancePipeline) -> str:
    """``digit`` for MNIST-like pipelines (centred strokes on a plain background), else ``photo``.

    ``pipeline.json`` may state it as ``"input_domain"``; otherwise it follows the dataset name.
    """
    explicit = pipe.info.get("input_domain")
    if explicit is not None:
        if explicit not in DOMAINS:
            raise ValueError(f"pipeline.json input_domain must be one of {DOMAINS}, got {explicit!r}")
        return explicit
    return "digit" if str(pipe.info.get("dataset", "")).lower() in DIGIT_DATASETS else "photo"


def stroke_mask(img: Image.Image) -> tuple[np.ndarray, bool]:
    """Strokes of a drawing or photo as a float mask in [0, 1] (1 = ink), and whether it was inverted.

    Grayscale; a bright background (median of the border) is inverted, so MNIST's white
    digits on black and dark ink on paper both give bright strokes; then the background
    level is subtracted and the contrast stretched.
    """
    gray = np.asarray(to_rgb(img).convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    inverted = bool(np.median(border) > 0.5)
    if inverted:
        gray = 1.0 - gray
        border = 1.0 - border
    bg = float(np.median(border))
    peak = float(gray.max())
    if peak - bg < 0.1:
        return np.zeros_like(gray), inverted
    return np.clip((gray - bg) / (peak - bg), 0.0, 1.0), inverted


def center_digit(mask: np.ndarray, box: int = MNIST_BOX, size: int = MNIST_SIZE, min_stroke: float = 2.0) -> np.ndarray:
    """MNIST-style normalisation of a stroke mask: crop to the strokes, fit into ``box`` x ``box``
    keeping the aspect ratio, centre by centre of mass in ``size`` x ``size``.

    Strokes that would end up thinner than ``min_stroke`` pixels (a thin pen on a large
    canvas) are thickened first, so that drawings look like MNIST digits. Raises
    ``ValueError`` if there are no strokes.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-d mask, got shape {mask.shape}")
    ys, xs = np.nonzero(mask > 0.1)
    if len(ys) == 0:
        raise ValueError("no strokes found: the image is blank")
    crop = torch.from_numpy(np.ascontiguousarray(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))[None, None]
    h, w = crop.shape[-2:]
    work = 4 * box  # large crops are max-pooled to 4x the final size first (keeps thin lines)
    if max(h, w) > work:
        crop = F.adaptive_max_pool2d(crop, (max(1, round(h * work / max(h, w))), max(1, round(w * work / max(h, w)))))
    h, w = crop.shape[-2:]
    binary = (crop > 0.5).float()
    area = float(binary.sum())
    if area > 0:
        boundary = float((binary + F.max_pool2d(-binary, 3, 1, 1)).sum())  # pixels next to the background
        thickness = 2.0 * area / max(boundary, 1.0)  # width of a band of strokes (exact for widths >= 2)
        k = int(round(min_stroke * max(h, w) / box - thickness))
        if k >= 2:
            k += 1 - k % 2  # odd kernel: dilation without a shift
            pad = k // 2  # room for the strokes to grow beyond the tight crop
            crop = F.max_pool2d(F.pad(crop, (pad,) * 4), k, 1, padding=pad)
    h, w = crop.shape[-2:]
    nh, nw = max(1, round(h * box / max(h, w))), max(1, round(w * box / max(h, w)))
    digit = F.interpolate(crop, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0, 0].clamp(0, 1).numpy()
    total = digit.sum()
    cy = (digit.sum(1) * np.arange(nh)).sum() / total + 0.5 if total > 0 else nh / 2
    cx = (digit.sum(0) * np.arange(nw)).sum() / total + 0.5 if total > 0 else nw / 2
    top = int(np.clip(round(size / 2 - cy), 0, size - nh))
    left = int(np.clip(round(size / 2 - cx), 0, size - nw))
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + nh, left : left + nw] = digit
    return out


def to_model_domain(img: Image.Image, domain: str, channels: int) -> Image.Image:
    """A user image -> an image in the pipeline's domain (before the library's resize).

    ``digit``: strokes centred MNIST-style in 28x28; 1 channel gives white on black, 3 channels
    keep the drawing's ink and background colours (as ColorMNIST: bg * (1 - m) + fg * m).
    ``photo``: the image as it is (the library centre-crops and resizes).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown input domain {domain!r}; choose one of {DOMAINS}")
    img = to_rgb(img)
    if domain == "photo":
        return img
    mask, _ = stroke_mask(img)
    digit = center_digit(mask)
    if channels == 1:
        return Image.fromarray((digit * 255).round().astype(np.uint8), mode="L")
    rgb = np.asarray(img, dtype=np.float32) / 255.0
    ink = mask > 0.5
    fg = np.median(rgb[ink], axis=0) if ink.any() else np.ones(3, np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    out = bg[None, None] * (1 - digit[..., None]) + fg[None, None] * digit[..., None]
    return Image.fromarray((out * 255).round().clip(0, 255).astype(np.uint8), mode="RGB")


def sketch_to_image(value: Any, domain: str, channels: int) -> Image.Image:
    """A sketchpad value (dict with ``composite`` / ``background`` / ``layers``, RGBA) -> model-domain image.

    Transparent parts count as white paper, so dark ink on an empty canvas becomes a white
    digit on black for MNIST-like pipelines.
    """
    if value is None:
        raise ValueError("the sketchpad is empty: draw something first")
    if isinstance(value, dict):
        composite = value.get("composite")
        if composite is None:
            layers = [l for l in (value.get("layers") or []) if l is not None]
            background = value.get("background")
            if background is None and not layers:
                raise ValueError("the sketchpad is empty: draw something first")
            parts = [load_image(p).convert("RGBA") for p in ([background] if background is not None else []) + layers]
            composite = Image.new("RGBA", parts[0].size, (255, 255, 255, 0))
            for p in parts:
                composite = Image.alpha_composite(composite, p.resize(composite.size))
        value = composite
    img = load_image(value)
    rgb = to_rgb(img)  # transparent -> white paper
    if np.ptp(np.asarray(rgb.convert("L"))) < 10:
        raise ValueError("the sketchpad is empty: draw something first")
    return to_model_domain(rgb, domain, channels)


def upload_notices(img: Image.Image, channels: int, image_size: int, cropped: bool = True) -> list[str]:
    """What reading ``img`` for a ``channels`` x ``image_size`` model does to it that a user may not expect, as short
    phrases (empty for a plain 8-bit image of a sensible shape): transparency flattened onto white, 16-bit or float
    values rescaled to 8 bits, CMYK converted, animation frames dropped, colour dropped, tiny images upscaled, and
    (``cropped``: the image goes through the library's centre crop) the share of a long image that is cut off."""
    notes = []
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            notes.append(f"transparency flattened onto white ({100 * float((alpha < 255).mean()):.0f}% of pixels "
                         "partly transparent)")
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        hi = int(np.asarray(img).max()) if img.width * img.height else 0
        notes.append("16-bit values scaled to 8 bits (65535 → 255)" if hi > 255 else "16-bit image read as 8-bit values")
    elif mode == "F":
        notes.append("floating-point values stretched to 0..255")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    frames = max(int(getattr(img, "n_frames", 1) or 1), int(img.info.get("frames", 1)))
    if frames > 1:
        notes.append(f"animated: only the first of {frames} frames is used")
    if channels == 1 and mode not in ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I", "F"):
        rgb = np.asarray(to_rgb(img), dtype=np.int16)
        if np.abs(rgb - rgb[..., :1]).max() > 8:
            notes.append("colours dropped (this model reads grayscale)")
    w, h = img.size
    if w * h == 1:
        notes.append(f"a single pixel: the model sees one flat {image_size}x{image_size} colour")
    elif min(w, h) < image_size / 2:
        notes.append(f"small ({w}x{h}): upscaled to {image_size}x{image_size}")
    if cropped and w != h:
        lost = 1 - min(w, h) / max(w, h)
        if lost >= 0.2:
            notes.append(f"aspect ratio {max(w, h) / min(w, h):.1f}:1: centre-cropped to a square, {100 * lost:.0f}% of the "
                         "image cut off")
    return notes


def prepare_input(
    pipe: InvariancePipeline, img: Image.Image, convert: bool = True, domain: str | None = None
) -> tuple[torch.Tensor, str]:
    """A decoded user image (``load_image``) -> (model input (1, C, S, S) in [-1, 1], a note on what was done,
    including ``upload_notices``)."""
    if not isinstance(img, Image.Image):
        raise ValueError(f"prepare_input takes a decoded PIL image (see load_image), got {type(img).__name__}")
    note = f"{img.width}x{img.height} {img.mode}"
    domain = domain or input_domain(pipe)
    converted = False
    original = img
    if convert and domain != "photo":
        try:
            img = to_model_domain(img, domain, pipe.channels)
            note += f" → centred {domain} (MNIST-style)"
            converted = True
        except ValueError as e:
            note += f" → used as is ({one_line(e)})"
    notices = upload_notices(original, pipe.channels, pipe.image_size, cropped=not converted)
    if notices:
        note += " (" + "; ".join(notices) + ")"
    x = pipe.preprocess(img)
    return x, note + f" → {pipe.channels}x{pipe.image_size}px"


def check_sampling(n: Any, temperature: Any, seed: Any) -> tuple[int, float, int]:
    """The Space's limits on the sampling settings: 1..MAX_SAMPLES samples, temperature in [0, 10], seed >= 0."""
    try:
        n, temperature, seed = int(n), float(temperature), int(seed)
    except (TypeError, ValueError):
        raise ValueError("samples, temperature and seed must be numbers") from None
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"number of samples must be between 1 and {MAX_SAMPLES}, got {n}")
    if not (0.0 <= temperature <= 10.0):
        raise ValueError(f"temperature must be between 0 and 10, got {temperature}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return n, temperature, seed
