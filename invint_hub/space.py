"""The logic behind the Gradio Space (``app.py``), free of any UI code so that it can be tested alone.

* input handling: reading uploads safely, converting photos and sketches to a pipeline's
  input domain (MNIST-style digits: white on black, centred in a 20x20 box of 28x28);
* a registry of pipelines (embedded, local folders, Hub repos) loaded on demand, each with
  its own concurrency slots and example images made at start-up;
* the computations of the views (interpret, layer sweep, mix, adversarial, concept transfer and
  edit), batched so that one request is one pass through each network;
* rendering of labelled image grids.

Every function refuses bad input with a one-line ``ValueError``.
"""
from __future__ import annotations

import base64
import contextlib
import json
import math
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import concepts as _concepts
from .attacks import fgsm, sign_noise
from .images import open_image, to_pil, to_rgb
from .pipeline import PIPELINE_FILE, InvariancePipeline, embedded_pipelines, resolve_pipeline_dir

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
    if getattr(img, "is_animated", False):
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        pass
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


def prepare_input(
    pipe: InvariancePipeline, value: Any, convert: bool = True, domain: str | None = None
) -> tuple[torch.Tensor, str]:
    """A user image -> (model input (1, C, S, S) in [-1, 1], a note on what was done)."""
    img = load_image(value)
    note = f"{img.width}x{img.height} {img.mode}"
    domain = domain or input_domain(pipe)
    if convert and domain != "photo":
        try:
            img = to_model_domain(img, domain, pipe.channels)
            note += f" → centred {domain} (MNIST-style)"
        except ValueError as e:
            note += f" → used as is ({one_line(e)})"
    x = pipe.preprocess(img)
    return x, note + f" → {pipe.channels}x{pipe.image_size}px"


# ---------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """One pipeline of the Space, loaded on first use."""

    name: str
    label: str
    pipe: InvariancePipeline | None = None
    examples: list[Path] = field(default_factory=list)
    example_labels: list[str] = field(default_factory=list)
    domain: str = "photo"
    slots: threading.BoundedSemaphore | None = None
    error: str | None = None


def source_label(name: str) -> str:
    """How a model name shows in the dropdown."""
    if name in embedded_pipelines():
        return f"{name} (embedded)"
    if Path(name).exists():
        return f"{Path(name).name} (local: {name})"
    return f"{name} (Hub)"


class ModelRegistry:
    """Named pipelines: embedded ones plus extra Hub ids / local folders, loaded lazily and once.

    Args:
        extra: Hub repo ids or local folders to offer besides the embedded pipelines.
        include_embedded: offer the embedded pipelines (default).
        per_model_limit: requests one pipeline computes at the same time.
        examples_per_model: example images written at load time.
        example_dir: where they go (default: a fresh temporary folder).
    """

    def __init__(
        self,
        extra: list[str] | tuple[str, ...] = (),
        include_embedded: bool = True,
        per_model_limit: int = 2,
        examples_per_model: int = 10,
        example_dir: str | Path | None = None,
    ):
        names = list(embedded_pipelines()) if include_embedded else []
        for n in extra:
            n = str(n).strip()
            if n and n not in names:
                names.append(n)
        if not names:
            raise ValueError("no pipelines to serve: no embedded pipeline found and no --model / INVINT_MODELS given")
        if per_model_limit < 1:
            raise ValueError(f"per_model_limit must be >= 1, got {per_model_limit}")
        self.names = names
        self.per_model_limit = per_model_limit
        self.examples_per_model = examples_per_model
        self.example_dir = Path(example_dir) if example_dir else Path(tempfile.mkdtemp(prefix="invint_space_"))
        self._entries = {n: ModelEntry(n, source_label(n)) for n in names}
        self._locks = {n: threading.Lock() for n in names}

    @property
    def default(self) -> str:
        return self.names[0]

    def choices(self) -> list[tuple[str, str]]:
        return [(self._entries[n].label, n) for n in self.names]

    def get(self, name: str | None) -> ModelEntry:
        """The entry of ``name`` with its pipeline loaded (raises ``ValueError`` with the reason if it cannot be)."""
        name = name or self.default
        if name not in self._entries:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(self.names)}")
        entry = self._entries[name]
        if entry.pipe is not None:
            return entry
        with self._locks[name]:
            if entry.pipe is None:
                try:
                    pipe = InvariancePipeline.from_pretrained(resolve_pipeline_dir(name))
                except Exception as e:  # offline Hub, bad folder, corrupt weights: one line for the UI
                    entry.error = one_line(e)
                    raise ValueError(f"could not load model {name!r}: {entry.error}") from None
                if not pipe.layers:
                    raise ValueError(f"model {name!r} has no trained cINN layers")
                entry.domain = input_domain(pipe)
                entry.slots = threading.BoundedSemaphore(self.per_model_limit)
                folder = self.example_dir / _safe_name(name)
                entry.examples, entry.example_labels = build_examples(pipe, folder, self.examples_per_model)
                entry.pipe = pipe
        return entry

    def has_concepts(self, name: str) -> bool:
        """Whether ``name`` has a concept model: from the loaded pipeline, else from a local ``pipeline.json``
        (embedded or a folder; Hub models are not downloaded to find out)."""
        entry = self._entries.get(name)
        if entry is None:
            return False
        if entry.pipe is not None:
            return entry.pipe.concepts is not None
        try:
            root = resolve_pipeline_dir(name) if name in embedded_pipelines() or Path(name).exists() else None
            return bool(root and json.loads((root / PIPELINE_FILE).read_text()).get("concepts"))
        except (OSError, ValueError):
            return False

    def concept_models(self) -> list[str]:
        return [n for n in self.names if self.has_concepts(n)]

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[ModelEntry]:
        """Load ``name`` and hold one of its concurrency slots while computing."""
        entry = self.get(name)
        assert entry.slots is not None
        with entry.slots:
            yield entry


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:] or "model"


# ---------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------
def dataset_examples(pipe: InvariancePipeline, n: int) -> tuple[torch.Tensor, list[int]] | None:
    """Up to ``n`` test images of the pipeline's dataset from the local data folder (one per class first), or ``None``."""
    from .data import LOCAL_ALIASES, build_dataset, default_data_dir

    name = str(pipe.info.get("dataset", ""))
    data_dir = default_data_dir()
    if not name or data_dir is None:
        return None
    source = "mnist" if name == "colormnist" else name
    if not any(any((data_dir / f).glob("test-*.parquet")) for f in LOCAL_ALIASES.get(source, [source])):
        return None  # never download: only a local copy counts
    try:
        cfg = {"name": name, "image_size": pipe.image_size, "channels": pipe.channels, "test_split": "test"}
        ds = build_dataset(cfg, "test_split", data_dir=data_dir, limit=max(8 * n, 64))
    except Exception:
        return None
    idx = torch.arange(len(ds))
    x, y = ds.get_batch(idx)
    return _pick_per_class(x, y.tolist(), n)


def _pick_per_class(x: torch.Tensor, labels: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Up to ``n`` items, one per class in class order first, then the rest in order."""
    first: dict[int, int] = {}
    for i, c in enumerate(labels):
        first.setdefault(c, i)
    order = [first[c] for c in sorted(first)]
    order += [i for i in range(len(labels)) if i not in set(order)]
    order = order[:n]
    return x[order], [labels[i] for i in order]


@torch.inference_mode()
def generated_examples(pipe: InvariancePipeline, n: int, seed: int = 0, pool: int = 256) -> tuple[torch.Tensor, list[int]]:
    """Images the pipeline makes itself: decode latents z_bar ~ N(0, latent variance / dim) and keep
    the most confidently classified, one per class first."""
    g = torch.Generator().manual_seed(seed)
    var = float(pipe.autoencoder.latent_var)
    std = math.sqrt(var / pipe.autoencoder.latent_dim) if var > 0 else 1.0
    zbar = torch.randn(pool, pipe.autoencoder.latent_dim, generator=g) * std
    x = pipe.decode(zbar)
    probs = pipe.backbone(x).softmax(1)
    conf, pred = probs.max(1)
    order = conf.argsort(descending=True)
    x, pred = x[order], pred[order]
    return _pick_per_class(x, pred.tolist(), n)


def build_examples(pipe: InvariancePipeline, folder: str | Path, n: int = 10) -> tuple[list[Path], list[str]]:
    """Write ``n`` example PNGs for ``pipe`` into ``folder``: test images of its dataset if a local
    copy exists, else images it generates. Returns the paths and a label for each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if n <= 0:
        return [], []
    found = dataset_examples(pipe, n)
    kind = "test image"
    if found is None:
        found, kind = generated_examples(pipe, n), "generated"
    x, labels = found
    names = pipe.class_names
    paths, captions = [], []
    for i, (img, c) in enumerate(zip(to_pil(x), labels)):
        path = folder / f"example_{i:02d}.png"
        img.save(path)
        paths.append(path)
        captions.append(f"{names[c] if 0 <= c < len(names) else c} ({kind})")
    return paths, captions


# ---------------------------------------------------------------------------------------
# the computations
# ---------------------------------------------------------------------------------------
def _check_sampling(n: int, temperature: float, seed: int) -> tuple[int, float, int]:
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


def _variance_share(pipe: InvariancePipeline, zbar: torch.Tensor) -> float | None:
    """Share of z_bar's data variance that the samples (n, D) of one image span (None if unknown)."""
    total = float(pipe.autoencoder.latent_var)
    if zbar.shape[0] < 2 or total <= 0:
        return None
    return float(zbar.var(dim=0, unbiased=True).sum()) / total


@dataclass
class Interpretation:
    """One image at one layer: prediction, reconstruction and samples D(t^-1(v|z))."""

    layer: str
    x: torch.Tensor  # (1, C, S, S) the model input
    probs: torch.Tensor  # (K,)
    recon: torch.Tensor  # (1, C, S, S) D(E(x))
    samples: torch.Tensor  # (n, C, S, S)
    sample_pred: torch.Tensor  # (n,) classes of the samples
    variance_explained: float | None
    class_agreement: float


@torch.inference_mode()
def interpret(pipe: InvariancePipeline, x: torch.Tensor, layer: str, n: int = 16, temperature: float = 1.0, seed: int = 0) -> Interpretation:
    n, temperature, seed = _check_sampling(n, temperature, seed)
    t = pipe._cinn(layer)
    logits_layer = pipe.backbone.logits_layer
    feats = pipe.backbone.forward_layers(x, [layer, logits_layer])
    probs = feats[logits_layer].softmax(1)[0]
    zbar = t.sample(feats[layer], n, temperature, torch.Generator().manual_seed(seed))
    dec = pipe.decode(torch.cat([pipe.autoencoder.encode(x).mode(), zbar]))
    recon, samples = dec[:1], dec[1:]
    sample_pred = pipe.backbone(samples).argmax(1)
    agreement = float((sample_pred == probs.argmax()).float().mean())
    return Interpretation(layer, x, probs, recon, samples, sample_pred, _variance_share(pipe, zbar), agreement)


@dataclass
class Sweep:
    """Samples for every layer with the same v (so column j shows the same invariances at every layer)."""

    x: torch.Tensor
    probs: torch.Tensor
    recon: torch.Tensor
    samples: dict[str, torch.Tensor]  # layer -> (n, C, S, S)
    sample_pred: dict[str, torch.Tensor]
    variance_explained: dict[str, float | None]
    class_agreement: dict[str, float]


@torch.inference_mode()
def layer_sweep(pipe: InvariancePipeline, x: torch.Tensor, n: int = 8, temperature: float = 1.0, seed: int = 0) -> Sweep:
    n, temperature, seed = _check_sampling(n, temperature, seed)
    layers = pipe.layers
    logits_layer = pipe.backbone.logits_layer
    feats = pipe.backbone.forward_layers(x, layers + [logits_layer])
    probs = feats[logits_layer].softmax(1)[0]
    zbars = [pipe.cinns[l].sample(feats[l], n, temperature, torch.Generator().manual_seed(seed)) for l in layers]
    dec = pipe.decode(torch.cat([pipe.autoencoder.encode(x).mode()] + zbars))
    preds = pipe.backbone(dec[1:]).argmax(1)
    cls = probs.argmax()
    out = Sweep(x, probs, dec[:1], {}, {}, {}, {})
    for i, l in enumerate(layers):
        out.samples[l] = dec[1 + i * n : 1 + (i + 1) * n]
        out.sample_pred[l] = preds[i * n : (i + 1) * n]
        out.class_agreement[l] = float((out.sample_pred[l] == cls).float().mean())
        out.variance_explained[l] = _variance_share(pipe, zbars[i])
    return out


@dataclass
class Mix:
    """Per layer: A's representation decoded with B's invariances, and B's with A's."""

    x: torch.Tensor  # (2, C, S, S): A, B
    recon: torch.Tensor  # (2, C, S, S)
    pred: torch.Tensor  # (2,) classes of A and B
    a_with_b: dict[str, torch.Tensor]  # layer -> (1, C, S, S)
    b_with_a: dict[str, torch.Tensor]
    pred_a_with_b: dict[str, int]
    pred_b_with_a: dict[str, int]


def _codes(pipe: InvariancePipeline, x: torch.Tensor):
    """One pass each: every cINN layer's representation (and the logits) and the latent mean of a batch."""
    layers, logits_layer = pipe.layers, pipe.backbone.logits_layer
    return layers, logits_layer, pipe.backbone.forward_layers(x, layers + [logits_layer]), pipe.autoencoder.encode(x).mode()


@torch.inference_mode()
def mix(pipe: InvariancePipeline, xa: torch.Tensor, xb: torch.Tensor) -> Mix:
    x = torch.cat([xa, xb])
    layers, logits_layer, feats, zbar = _codes(pipe, x)
    swapped = []
    for l in layers:
        v = pipe.cinns[l](zbar, feats[l])[0]
        swapped.append(pipe.cinns[l].inverse(v.flip(0), feats[l])[0])  # row 0: z_A with v_B; row 1: z_B with v_A
    dec = pipe.decode(torch.cat([zbar] + swapped))
    preds = pipe.backbone(dec[2:]).argmax(1).tolist()
    out = Mix(x, dec[:2], feats[logits_layer].argmax(1), {}, {}, {}, {})
    for i, l in enumerate(layers):
        out.a_with_b[l], out.b_with_a[l] = dec[2 + 2 * i : 3 + 2 * i], dec[3 + 2 * i : 4 + 2 * i]
        out.pred_a_with_b[l], out.pred_b_with_a[l] = preds[2 * i], preds[2 * i + 1]
    return out


@dataclass
class Attack:
    """FGSM vs random sign noise of the same eps, and what every layer sees of each."""

    eps: float
    x: torch.Tensor  # (3, C, S, S): original, FGSM, random signs
    probs: torch.Tensor  # (3, K)
    recon: torch.Tensor  # (3, C, S, S): D(E(.)) of each
    recon_pred: list[int]  # classes of the reconstructions
    seen: dict[str, torch.Tensor]  # layer -> (3, C, S, S): D(t^-1(v_orig | Phi_L(.)))
    seen_pred: dict[str, list[int]]


@torch.inference_mode()
def adversarial(pipe: InvariancePipeline, x: torch.Tensor, eps: float = 0.1, seed: int = 0) -> Attack:
    try:
        eps, seed = float(eps), int(seed)
    except (TypeError, ValueError):
        raise ValueError("eps and seed must be numbers") from None
    if not (0.0 <= eps <= 2.0):
        raise ValueError(f"eps must be between 0 and 2 (images are in [-1, 1]), got {eps}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    x_adv = fgsm(pipe.backbone, x, eps)
    xs = torch.cat([x, x_adv, sign_noise(x, eps, seed)])
    layers, logits_layer, feats, zbar = _codes(pipe, xs)
    seen = []
    for l in layers:
        v_orig = pipe.cinns[l](zbar[:1], feats[l][:1])[0]
        seen.append(pipe.cinns[l].inverse(v_orig.expand(3, -1), feats[l])[0])
    dec = pipe.decode(torch.cat([zbar] + seen))
    preds = pipe.backbone(dec).argmax(1).tolist()
    out = Attack(eps, xs, feats[logits_layer].softmax(1), dec[:3], preds[:3], {}, {})
    for i, l in enumerate(layers):
        out.seen[l] = dec[3 + 3 * i : 6 + 3 * i]
        out.seen_pred[l] = preds[3 + 3 * i : 6 + 3 * i]
    return out


# ---------------------------------------------------------------------------------------
# concepts (pipelines with an interpretation INN e)
# ---------------------------------------------------------------------------------------
EDIT_STEPS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


def _concept_model(pipe: InvariancePipeline):
    if pipe.concepts is None:
        raise ValueError("this pipeline has no concept model e; pick one that has (e.g. the embedded colormnist)")
    return pipe.concepts


@dataclass
class ConceptTransfer:
    """Each concept of the source put into the target (row 0) and of the target into the source (row 1)."""

    concepts: list[str]  # the columns: each concept, then all of them together
    amount: float
    x: torch.Tensor  # (2, C, S, S): target, source
    pred: list[int]
    rows: torch.Tensor  # (2, len(concepts), C, S, S)
    row_pred: list[list[int]]


@torch.inference_mode()
def concept_transfer(pipe: InvariancePipeline, target: torch.Tensor, source: torch.Tensor, amount: float = 1.0) -> ConceptTransfer:
    e = _concept_model(pipe)
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise ValueError(f"amount must be a number, got {amount!r}") from None
    if not -1.0 <= amount <= 2.0:
        raise ValueError(f"amount must lie in [-1, 2] (0 = no change, 1 = full transfer), got {amount}")
    names = e.concept_names
    columns: list = list(names) + ([list(names)] if len(names) > 1 else [])
    x = torch.cat([target, source])
    code = e(pipe.encode(x))[0]  # encoded once; per column: target with the source's concept, then the reverse
    codes = torch.cat([_concepts.transfer_codes(e, code, code.flip(0), c, amount) for c in columns])
    dec = pipe.decode(e.inverse(codes)[0])
    preds = pipe.backbone(torch.cat([x, dec])).argmax(1).tolist()
    k = len(columns)
    rows = dec.view(k, 2, *dec.shape[1:]).transpose(0, 1)
    row_pred = [[preds[2 + 2 * j + i] for j in range(k)] for i in range(2)]
    labels = list(names) + (["all concepts"] if len(names) > 1 else [])
    return ConceptTransfer(labels, amount, x, preds[:2], rows, row_pred)


@dataclass
class ConceptEdit:
    """An image with every concept moved by its slider amount, and a walk along each concept alone."""

    concepts: list[str]
    amounts: dict[str, float]
    x: torch.Tensor  # (1, C, S, S)
    recon: torch.Tensor  # (1, C, S, S)
    edited: torch.Tensor  # (1, C, S, S)
    pred: list[int]  # input, reconstruction, edited
    steps: tuple[float, ...]
    walks: torch.Tensor  # (len(concepts), len(steps), C, S, S)
    walk_pred: list[list[int]]


@torch.inference_mode()
def concept_edit(pipe: InvariancePipeline, x: torch.Tensor, amounts: dict[str, float], seed: int = 0,
                 steps: tuple[float, ...] = EDIT_STEPS) -> ConceptEdit:
    e = _concept_model(pipe)
    try:
        seed = int(seed)
        amounts = {str(c): float(a) for c, a in amounts.items()}
    except (TypeError, ValueError):
        raise ValueError("seed and amounts must be numbers") from None
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for c, a in amounts.items():
        if c not in e.factor_names:
            raise ValueError(f"unknown concept {c!r}; this model has {e.concept_names}")
        if not -5.0 <= a <= 5.0:
            raise ValueError(f"amount of {c!r} must lie in [-5, 5] prior standard deviations, got {a}")
    names = e.concept_names
    code = e(pipe.encode(x))[0]  # (1, dim)
    dirs = torch.stack([_concepts.concept_direction(e, c, seed) for c in names]).to(code)  # (K, dim)
    shift = sum((amounts.get(c, 0.0) * d for c, d in zip(names, dirs)), torch.zeros_like(code[0]))
    walk = code + torch.tensor(steps).to(code)[None, :, None] * dirs[:, None, :]  # (K, n_steps, dim)
    dec = pipe.decode(e.inverse(torch.cat([code, code + shift, walk.flatten(0, 1)]))[0])
    preds = pipe.backbone(torch.cat([x, dec])).argmax(1).tolist()
    walks = dec[2:].view(len(names), len(steps), *dec.shape[1:])
    walk_pred = [preds[3 + i * len(steps) : 3 + (i + 1) * len(steps)] for i in range(len(names))]
    return ConceptEdit(names, amounts, x, dec[:1], dec[1:2], preds[:3], tuple(steps), walks, walk_pred)


@torch.inference_mode()
def concept_layers(pipe: InvariancePipeline, n_images: int = 64, n: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per layer, the share of each concept's variance that the layer's representation fixes (ECCV Fig. 4),
    on ``n_images`` images the pipeline generates itself: {layer: {factor: share}}."""
    _concept_model(pipe)
    images = _concepts.sample_images(pipe, n_images, seed=seed)
    return {l: pipe.concept_variance_explained(l, images, n=n, seed=seed) for l in pipe.layers}


# ---------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------
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


def _fit(text: str, f, width: int) -> str:
    if f.getlength(text) <= width:
        return text
    while text and f.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def class_name(pipe: InvariancePipeline, c: int) -> str:
    names = pipe.class_names
    return names[c] if 0 <= c < len(names) else str(c)


__all__ = [
    "load_image", "input_domain", "stroke_mask", "center_digit", "to_model_domain", "sketch_to_image",
    "prepare_input", "ModelRegistry", "ModelEntry", "build_examples", "interpret", "layer_sweep", "mix",
    "adversarial", "concept_transfer", "concept_edit", "concept_layers", "compose_grid", "upscale", "one_line",
]
