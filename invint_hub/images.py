"""Turning whatever a user hands us into model input, with clear errors for bad input.

The pipeline's image domain is float32 in [-1, 1], shape (B, C, S, S).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # anything larger is refused before it is decoded

ImageLike = Any  # PIL.Image | str | Path | bytes | np.ndarray | torch.Tensor


def open_image(obj: ImageLike) -> Image.Image:
    """Open a path, bytes or PIL image, refusing unreadable, empty or absurdly large images with ``ValueError``."""
    if isinstance(obj, Image.Image):
        img = obj
    elif isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"image file is empty: {path}")
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(f"image is too large ({e})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path} is not a readable image ({e.__class__.__name__})") from None
    elif isinstance(obj, (bytes, bytearray)):
        if len(obj) == 0:
            raise ValueError("image data is empty")
        try:
            img = Image.open(io.BytesIO(obj))
        except Image.DecompressionBombError as e:
            raise ValueError(f"image is too large ({e})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"data is not a readable image ({e.__class__.__name__})") from None
    else:
        raise ValueError(f"cannot read an image from a {type(obj).__name__}")
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError(f"image has zero size ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ValueError(f"image is too large: {w}x{h} = {w * h / 1e6:.0f} megapixels (limit {MAX_PIXELS / 1e6:.0f})")
    try:
        img.load()  # decode now, so truncated files fail here and not later
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ValueError(f"image could not be decoded ({e.__class__.__name__}: {e})") from None
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode (16-bit, CMYK, palette, LA/RGBA with alpha, first frame of an animation) -> 8-bit RGB."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and arr.max() > 255:  # a real 16-bit range: 65535 -> 255
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB")


def pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    """PIL (any mode) -> uint8 array (H, W, channels) at its own size."""
    img = to_rgb(img)
    if channels == 1:
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size): centre-crop to a square, then antialiased bilinear resize.

    The one resize used everywhere (training data and user input), so both see the same pixels.
    """
    h, w = x.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top : top + s, left : left + s]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def arrays_to_batch(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 (H, W, C) arrays -> (B, C, size, size) float in [-1, 1], resizing same-sized arrays together."""
    out: list[torch.Tensor | None] = [None] * len(arrays)
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    for shape, idx in groups.items():
        for start in range(0, len(idx), 4096):
            chunk = idx[start : start + 4096]
            t = torch.from_numpy(np.stack([arrays[i] for i in chunk])).permute(0, 3, 1, 2).float()
            t = resize_batch(t, size) / 127.5 - 1.0
            for j, i in enumerate(chunk):
                out[i] = t[j]
    return torch.stack(out).clamp(-1, 1)  # type: ignore[arg-type]


def pil_to_tensor(img: Image.Image, size: int, channels: int) -> torch.Tensor:
    """PIL -> (C, size, size) float in [-1, 1]."""
    return arrays_to_batch([pil_to_array(img, channels)], size)[0]


def tensor_to_batch(t: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """A user tensor -> (B, C, size, size) in [-1, 1].

    uint8 tensors are read as 0..255; float tensors must already lie in [-1, 1].
    Accepts (H, W), (C, H, W) or (B, C, H, W).
    """
    if t.numel() == 0:
        raise ValueError(f"image tensor is empty (shape {tuple(t.shape)})")
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"image tensors must have 2, 3 or 4 dimensions, got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3, 4):
        raise ValueError(f"image tensors must have 1, 3 or 4 channels in dim 1, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float() / 127.5 - 1.0
    elif t.is_floating_point():
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError("image tensor contains NaN or infinite values")
        if t.min() < -1.0001 or t.max() > 1.0001:
            raise ValueError(f"float image tensors must lie in [-1, 1], got range [{t.min():.3g}, {t.max():.3g}]")
    else:
        raise ValueError(f"unsupported image tensor dtype {t.dtype}")
    if t.shape[1] == 4:
        t = t[:, :3]
    if t.shape[1] != channels:
        t = t.mean(1, keepdim=True) if channels == 1 else t.expand(-1, 3, -1, -1)
    return resize_batch(t, size).clamp(-1, 1).contiguous()


def to_batch(images: ImageLike | Iterable[ImageLike], size: int, channels: int) -> torch.Tensor:
    """Images in any form (PIL, path, bytes, numpy HxW[xC] uint8, tensor, or a list of these) -> model batch."""
    if isinstance(images, torch.Tensor):
        return tensor_to_batch(images, size, channels)
    if isinstance(images, np.ndarray):
        return tensor_to_batch(_array_to_tensor(images), size, channels)
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.cat([to_batch(im, size, channels) for im in images], dim=0)
    return pil_to_tensor(open_image(images), size, channels)[None]


def _array_to_tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(a))
    elif np.issubdtype(a.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    else:
        raise ValueError(f"unsupported array dtype {a.dtype}")
    if t.dim() == 3 and t.shape[-1] in (1, 3, 4):  # HWC -> CHW
        t = t.permute(2, 0, 1)
    elif t.dim() == 4 and t.shape[-1] in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    return t


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> list of PIL images."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    out = []
    for im in x:
        arr = im.permute(1, 2, 0).numpy()
        out.append(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    return out


def grid(x: torch.Tensor, nrow: int) -> Image.Image:
    """A grid image of a batch (B, C, H, W) in [-1, 1]."""
    import torchvision

    g = torchvision.utils.make_grid(x.detach().float().cpu(), nrow=nrow, padding=1, normalize=False, pad_value=1.0)
    return to_pil(g[None])[0]
