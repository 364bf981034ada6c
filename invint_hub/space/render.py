"""Rendering the Space's results: labelled image grids, nearest-neighbour upscaling, class names."""
from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw, ImageFont

from ..images import to_pil
from ..pipeline import CompareSide, InvariancePipeline, LayerSweep

_FONTS: dict[int, Any] = {}


def font(size: int = 13):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow without FreeType
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def upscale(img: Image.Image, min_side: int = 128) -> Image.Image:
    """Enlarge small images by an integer factor (nearest neighbour: the model's pixels, unsmoothed)."""
    f = max(1, math.ceil(min_side / max(1, min(img.size))))
    return img if f == 1 else img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST)


def tensor_images(x: torch.Tensor, min_side: int = 128) -> list[Image.Image]:
    return [upscale(im.convert("RGB"), min_side) for im in to_pil(x)]


def compose_grid(
    rows: list[list[torch.Tensor | Image.Image]],
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    captions: list[list[str | None]] | None = None,
    cell: int = 72,
    gap: int = 4,
    highlight: list[list[bool]] | None = None,
) -> Image.Image:
    """A labelled grid of images: one row per list, optional row/column labels and captions under cells.

    ``highlight`` marks cells with an orange frame (e.g. samples whose class changed).
    """
    if not rows or not any(rows):
        raise ValueError("nothing to draw")
    f, fs = font(13), font(12)
    ncol = max(len(r) for r in rows)
    label_w = int(max((f.getlength(s) for s in row_labels or []), default=0)) + (10 if row_labels else 0)
    head_h = 20 if col_labels else 0
    cap_h = 16 if captions else 0
    cw, ch = cell + gap, cell + cap_h + gap
    width = label_w + ncol * cw + gap
    height = head_h + len(rows) * ch + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels or []):
        cx = label_w + gap + j * cw + cell / 2
        draw.text((cx, head_h / 2 + 1), _fit(text, fs, cw), fill=(60, 60, 60), font=fs, anchor="mm")
    for i, row in enumerate(rows):
        y = head_h + gap + i * ch
        if row_labels:
            draw.text((label_w - 6, y + cell / 2), row_labels[i], fill=(40, 40, 40), font=f, anchor="rm")
        for j, im in enumerate(row):
            if isinstance(im, torch.Tensor):
                im = to_pil(im.reshape(1, *im.shape[-3:]))[0]
            im = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            x = label_w + gap + j * cw
            canvas.paste(im, (x, y))
            if highlight and highlight[i][j]:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(240, 120, 0), width=2)
            if captions and captions[i][j]:
                draw.text((x + cell / 2, y + cell + 2), _fit(captions[i][j], fs, cw), fill=(60, 60, 60), font=fs, anchor="ma")
    return canvas


def sample_grid(
    samples: torch.Tensor | list[torch.Tensor | Image.Image],
    captions: list[str] | None = None,
    highlight: list[bool] | None = None,
    columns: int = 8,
    cell: int = 64,
) -> Image.Image:
    """N images as one captioned grid, ``columns`` per row (one image file instead of N: what a browser or
    client fetches per result). ``highlight`` frames cells orange (e.g. samples whose class changed)."""
    items = list(samples)
    if not items:
        raise ValueError("nothing to draw")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    chunk = lambda xs: [list(xs[i:i + columns]) for i in range(0, len(items), columns)]  # noqa: E731
    return compose_grid(chunk(items), captions=chunk(captions) if captions else None, cell=cell,
                        highlight=chunk(highlight) if highlight else None)


def interpret_grid(
    x: torch.Tensor | Image.Image,
    recon: torch.Tensor | Image.Image,
    samples: torch.Tensor | list[torch.Tensor | Image.Image],
    captions: list[str] | None = None,
    highlight: list[bool] | None = None,
    columns: int = 8,
    cell: int = 64,
    big: int = 128,
) -> Image.Image:
    """Interpret's whole result as one image: the model input and its reconstruction D(E(x)) (``big`` px, left)
    beside the captioned samples (``sample_grid``, right). One file per click: each output image is another
    request for a browser and another download (and CPU) for a client."""
    left = compose_grid([[x, recon]], col_labels=["model input", "reconstruction D(E(x))"], cell=big)
    right = sample_grid(samples, captions, highlight, columns, cell)
    head = 20  # compose_grid's column-label band: the samples start level with the input
    canvas = Image.new("RGB", (left.width + 8 + right.width, max(left.height, head + right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, head))
    draw = ImageDraw.Draw(canvas)
    draw.line([(left.width + 3, head), (left.width + 3, canvas.height - 4)], fill=(200, 200, 200), width=1)
    draw.text((left.width + 12, head / 2 + 1), f"{len(list(samples))} samples: the same z, new v", fill=(60, 60, 60),
              font=font(12), anchor="lm")
    return canvas


def sweep_grid(s: LayerSweep, class_name: Callable[[int], str], row_labels: list[str] | None = None) -> Image.Image:
    """The layer sweep as one image: a row per layer with the input, D(E(x)) and the same v samples decoded with
    that layer's z, captioned with their class; orange frames: a class other than the input's."""
    layers = list(s.samples)
    cls = int(s.probs.argmax())
    rows = [[s.x[0], s.recon[0]] + list(s.samples[l]) for l in layers]
    caps = [[None, None] + [class_name(int(c)) for c in s.sample_pred[l]] for l in layers]
    marks = [[False, False] + [int(c) != cls for c in s.sample_pred[l]] for l in layers]
    ncols = max(len(r) for r in rows)
    cols = ["input", "D(E(x))"] + [f"v{j + 1}" for j in range(ncols - 2)]
    return compose_grid(rows, row_labels or layers, cols, caps, cell=64, highlight=marks)


def compare_grid(side: CompareSide, class_name: Callable[[int], str], title: str, model: str = "",
                 columns: int = 8, cell: int = 64) -> Image.Image:
    """One side of ``InvariancePipeline.compare`` as one image: a title band (``title``, the ``model`` it belongs
    to, then the network's prediction, the variance explained by v and the class agreement) over the samples
    decoded with the shared v, captioned with this network's class of each; orange frames: a class other than its
    class of the input. (The top right corner stays clear of text: Gradio draws its buttons there.)"""
    c = side.class_name
    preds = [int(p) for p in side.sample_pred]
    own = int(side.probs.argmax())
    grid = sample_grid(list(side.samples), [class_name(p) for p in preds], [p != own for p in preds], columns, cell)
    ve = "n/a" if side.variance_explained is None else f"{100 * side.variance_explained:.0f}%"
    stats = (f"predicts {c} ({100 * side.probability:.0f}%) · v explains {ve} · "
             f"{sum(p == own for p in preds)}/{len(preds)} samples {c}")
    f, fs = font(14), font(12)
    width = max(grid.width, 8 * (cell + 4) + 4)
    room = width - 80
    lines = [(title, f, (30, 30, 30)), (model, fs, (110, 110, 110)), (stats, fs, (60, 60, 60))]
    lines = [(t, ft, col) for t, ft, col in lines if t]
    head = 8 + 18 * len(lines)
    canvas = Image.new("RGB", (width, head + grid.height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (text, ft, col) in enumerate(lines):
        draw.text((6, 4 + 18 * i), _fit(text, ft, room if i == 0 else width - 12), fill=col, font=ft)
    canvas.paste(grid, (0, head))
    return canvas


def _fit(text: str, f, width: int) -> str:
    if f.getlength(text) <= width:
        return text
    while text and f.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def class_name(pipe: InvariancePipeline, c: int) -> str:
    names = pipe.class_names
    return names[c] if 0 <= c < len(names) else str(c)


def png_file(img: Image.Image, folder: str | Path, name: str = "image", compress_level: int = 1) -> str:
    """Save ``img`` as ``folder/<sha256 of the PNG>/name.png`` and return the path; atomically, once per content.

    Given a path inside its cache, Gradio serves the file as it is, without encoding, hashing or copying it
    again. Writing to a temporary name and renaming it into place means a concurrent request for the same
    image (e.g. the same input's reconstruction) never reads a half-written file; Gradio's own saving of PIL
    outputs rewrites such a file in place, and clients downloading it under load then get truncated bodies.
    PNG is lossless (the model's pixels exactly); ``compress_level`` 1 encodes a few times faster than PIL's
    default 6 for about the same size on these grids.
    """
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=compress_level)
    data = buf.getvalue()
    target = Path(folder) / hashlib.sha256(data).hexdigest() / f"{name}.png"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)
