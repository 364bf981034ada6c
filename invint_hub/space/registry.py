"""The Space's pipelines: embedded ones, local folders and Hub repos, loaded on first use, each with
its own concurrency slots and example images made when it loads."""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..hub import WEIGHTS_NAME, read_safetensors, safetensors_sha256, tensors_sha256
from ..images import to_pil
from ..pipeline import PIPELINE_FILE, InvariancePipeline, component_dir, embedded_pipelines, resolve_pipeline_dir
from .inputs import input_domain, one_line


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
        self._ae_ids: dict[str, str | None] = {}  # autoencoder ids read from the files of models not loaded

    @property
    def default(self) -> str:
        return self.names[0]

    def label(self, name: str) -> str:
        """How ``name`` shows in the dropdown (without loading it)."""
        return self._entries[name].label

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

    def autoencoder_id(self, name: str) -> str | None:
        """The ``autoencoder_id`` of ``name``: from the loaded pipeline, else from the safetensors header of the
        autoencoder its local ``pipeline.json`` names (embedded or a folder: nothing else is loaded). None for a Hub
        model not loaded yet (it is not downloaded to find out) and for a folder that cannot be read."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.pipe is not None:
            return entry.pipe.autoencoder_id
        if name in self._ae_ids:
            return self._ae_ids[name]
        if not (name in embedded_pipelines() or Path(name).exists()):
            return None
        try:
            root = resolve_pipeline_dir(name)
            f = component_dir(root, json.loads((root / PIPELINE_FILE).read_text()), "autoencoder", "autoencoder") \
                / WEIGHTS_NAME
            sha = safetensors_sha256(f) or tensors_sha256(read_safetensors(f))
        except (OSError, ValueError):
            sha = None
        self._ae_ids[name] = sha
        return sha

    def compare_partners(self, name: str | None) -> list[str]:
        """The other models that share ``name``'s autoencoder (same ``autoencoder_id``), in dropdown order."""
        own = self.get(name).pipe.autoencoder_id  # type: ignore[union-attr]
        return [n for n in self.names if n != (name or self.default) and self.autoencoder_id(n) == own]

    @contextlib.contextmanager
    def use_many(self, *names: str | None) -> Iterator[list[ModelEntry]]:
        """``use`` for several models at once; slots are taken in name order, so requests that need the same two
        models never wait for each other's slots in a cycle."""
        entries = [self.get(n) for n in names]
        with contextlib.ExitStack() as stack:
            for e in sorted({e.name: e for e in entries}.values(), key=lambda e: e.name):
                assert e.slots is not None
                stack.enter_context(e.slots)
            yield entries

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
    from ..data import LOCAL_ALIASES, build_dataset, default_data_dir

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
