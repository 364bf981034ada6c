"""Datasets through Hugging Face ``datasets``: Hub ids or a local folder of Parquet files.

Local layout (the one of ``../shared/data``): ``<data_dir>/<name>/<split>-*.parquet`` with
columns ``image`` (HF Image) and ``label``. The data folder comes from ``--data-dir``, the
``INVINT_DATA_DIR`` environment variable, or ``../shared/data`` next to the repository.

Names: ``mnist``, ``fashion_mnist``, ``cifar10``, ``colormnist`` (generated from MNIST),
any local folder name, or any Hub dataset id (``org/name``). Splits may be sliced as in
``datasets``: ``train[:90%]``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import arrays_to_batch, pil_to_array

# name -> (Hub id, image column); the Hub ids are used when no local copy exists.
HUB_IDS = {
    "mnist": ("ylecun/mnist", "image"),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "image"),
    "cifar10": ("uoft-cs/cifar10", "img"),
}
# local folder names that hold a dataset under another name
LOCAL_ALIASES = {"cifar10": ["cifar10", "cifar10_jpeg_q75"]}
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path | None:
    env = os.environ.get("INVINT_DATA_DIR")
    if env:
        return Path(env)
    for cand in (REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "data"):
        if cand.is_dir():
            return cand
    return None


def _split_parts(split: str) -> tuple[str, str]:
    m = re.fullmatch(r"(\w+)(\[[^\]]*\])?", split)
    if not m:
        raise ValueError(f"bad split {split!r}; use e.g. 'train', 'test' or 'train[:90%]'")
    return m.group(1), m.group(2) or ""


def _apply_slice(ds, spec: str, seed: int = 0):
    """``[a:b]`` rows or ``[a%:b%]`` percent, taken after a seeded shuffle (so ``train[:90%]`` and
    ``train[90%:]`` are disjoint and not sorted by class)."""
    m = re.fullmatch(r"\[(-?\d*)(%?):(-?\d*)(%?)\]", spec)
    if not m:
        raise ValueError(f"bad split slice {spec!r}; use e.g. [:90%], [90%:] or [:1000]")
    n = len(ds)

    def pos(value: str, percent: str, default: int) -> int:
        if value == "":
            return default
        v = int(value)
        v = round(n * v / 100) if percent else v
        return max(0, min(n, v if v >= 0 else n + v))

    a, b = pos(m.group(1), m.group(2), 0), pos(m.group(3), m.group(4), n)
    return ds.shuffle(seed=seed).select(range(a, max(a, b)))


def load_split(name: str, split: str, data_dir: str | Path | None = None):
    """A ``datasets.Dataset`` with columns ``image`` (PIL) and ``label``.

    Looks for ``<data_dir>/<name>/<split>-*.parquet``, then an image folder
    ``<data_dir>/<name>/<split>/<class>/*``, then the Hub.
    """
    import datasets

    base, slice_ = _split_parts(split)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    ds = None
    if data_dir is not None:
        for folder in LOCAL_ALIASES.get(name, [name]):
            files = sorted((data_dir / folder).glob(f"{base}-*.parquet"))
            if files:
                ds = datasets.load_dataset("parquet", data_files={base: [str(f) for f in files]}, split=base)
                if "image" in ds.column_names:
                    ds = ds.cast_column("image", datasets.Image())
                break
            if (data_dir / folder / base).is_dir():
                ds = datasets.load_dataset("imagefolder", data_dir=str(data_dir / folder / base), split="train")
                break
        if ds is None and (data_dir / name).is_dir():
            raise FileNotFoundError(f"{data_dir / name} has neither {base}-*.parquet files nor a {base}/ image folder")
    if ds is None:
        hub_id, col = HUB_IDS.get(name, (name, "image"))
        if "/" not in hub_id:
            raise FileNotFoundError(
                f"dataset {name!r} not found under {data_dir} and it is not a Hub id; "
                f"set --data-dir / INVINT_DATA_DIR to a folder with {name}/{base}-*.parquet"
            )
        ds = datasets.load_dataset(hub_id, split=base)
        if col != "image":
            ds = ds.rename_column(col, "image")
    return _apply_slice(ds, slice_) if slice_ else ds


def class_names(ds, column: str = "label") -> list[str] | None:
    feat = ds.features.get(column)
    return list(feat.names) if hasattr(feat, "names") else None


def labels_tensor(values) -> torch.Tensor:
    """A label column -> long tensor; booleans and -1/1 attributes (CelebA) become 0/1."""
    t = torch.tensor([float(v) for v in values])
    if t.numel() and set(torch.unique(t).tolist()) <= {-1.0, 1.0}:
        t = (t > 0).float()
    return t.long()


class ImageDataset(Dataset):
    """Decoded images as a uint8 tensor in memory, served as ([-1, 1] float, label).

    Args:
        name, split, data_dir: see ``load_split``.
        image_size, channels: the pipeline's image domain.
        limit: keep only the first ``limit`` rows after a seeded shuffle (for quick runs).
        label_column: the column with the class (e.g. a CelebA attribute such as ``Male``).
    """

    def __init__(
        self,
        name: str,
        split: str,
        image_size: int,
        channels: int,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        seed: int = 0,
        label_column: str = "label",
    ):
        ds = load_split(name, split, data_dir)
        if label_column not in ds.column_names:
            raise ValueError(f"dataset {name!r} has no column {label_column!r} (columns {ds.column_names}); set data.label_column")
        if limit is not None and limit < len(ds):
            ds = ds.shuffle(seed=seed).select(range(limit))
        self.class_names = class_names(ds, label_column)
        images = arrays_to_batch([pil_to_array(im, channels) for im in ds["image"]], image_size)
        self.images = ((images + 1) * 127.5).round().to(torch.uint8)
        self.labels = labels_tensor(ds[label_column]) if label_column != "label" else torch.tensor(ds["label"], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, self.labels[i]

    def get_batch(self, idx: torch.Tensor):
        return self.images[idx].float() / 127.5 - 1.0, self.labels[idx]


class ColorMNIST(Dataset):
    """MNIST with a random foreground and background colour per image (IIN paper's ColorMNIST).

    Image = bg * (1 - m) + fg * m where m is the MNIST intensity and fg, bg ~ U(0, 1)^3,
    drawn once from a generator seeded with ``seed``, so the data set is reproducible.
    Known factors per item: ``digit`` (label), ``fg`` and ``bg`` colours.
    """

    def __init__(self, split: str, image_size: int = 32, data_dir=None, limit: int | None = None, seed: int = 0):
        base = ImageDataset("mnist", split, image_size, 1, data_dir, limit, seed)
        self.masks = base.images  # uint8 (N, 1, S, S)
        self.labels = base.labels
        self.class_names = base.class_names or [str(i) for i in range(10)]
        g = torch.Generator().manual_seed(seed)
        self.fg = torch.rand(len(self.labels), 3, generator=g)
        self.bg = torch.rand(len(self.labels), 3, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def colorize(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        """mask (1, S, S) uint8, colours (3,) in [0, 1] -> RGB image in [-1, 1]."""
        m = mask.float() / 255.0
        img = bg.view(3, 1, 1) * (1 - m) + fg.view(3, 1, 1) * m
        return img * 2 - 1

    def __getitem__(self, i):
        return self.colorize(self.masks[i], self.fg[i], self.bg[i]), self.labels[i]

    def get_batch(self, idx: torch.Tensor):
        m = self.masks[idx].float() / 255.0
        img = self.bg[idx].view(-1, 3, 1, 1) * (1 - m) + self.fg[idx].view(-1, 3, 1, 1) * m
        return img * 2 - 1, self.labels[idx]


class InMemoryDataset(Dataset):
    """Images (N, C, S, S) in [-1, 1] and labels (N,), held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None):
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected images (N, C, S, S) and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images, self.labels, self.class_names = images, labels.long(), class_names

    @classmethod
    def from_dataset(cls, ds, image_size: int, channels: int, class_names: list[str] | None = None) -> "InMemoryDataset":
        """Any dataset of (image, label) pairs, images in any form ``invint_hub.images.to_batch`` reads."""
        from .images import to_batch

        images, labels = [], []
        for i in range(len(ds)):
            image, label = ds[i]
            images.append(to_batch(image, image_size, channels))
            labels.append(int(label))
        if not images:
            raise ValueError("the dataset is empty")
        return cls(torch.cat(images), torch.tensor(labels), class_names or getattr(ds, "class_names", None))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def get_batch(self, idx: torch.Tensor):
        return self.images[idx], self.labels[idx]


REGISTERED: dict[str, dict[str, Dataset]] = {}  # data.name -> {split: dataset}, for data that is not in files


def register_dataset(name: str, splits: dict[str, Dataset]) -> None:
    """Make in-memory datasets available to the training stages as ``data: {name: <name>}`` (this process only)."""
    REGISTERED[name] = dict(splits)


def build_dataset(cfg: dict, split_key: str, data_dir=None, limit: int | None = None) -> Dataset:
    """Dataset from the ``data`` section of a config (``name``, ``image_size``, ``channels``, splits)."""
    split = cfg.get(split_key, "train" if split_key == "train_split" else "test")
    seed = int(cfg.get("seed", 0))
    if cfg["name"] in REGISTERED:
        ds = REGISTERED[cfg["name"]][split]
        return torch.utils.data.Subset(ds, range(min(limit, len(ds)))) if limit else ds
    if cfg["name"] == "colormnist":
        return ColorMNIST(split, cfg["image_size"], data_dir, limit, seed=seed + (0 if split_key == "train_split" else 1))
    return ImageDataset(cfg["name"], split, cfg["image_size"], cfg["channels"], data_dir, limit, seed,
                        label_column=cfg.get("label_column", "label"))


class SyntheticDataset(InMemoryDataset):
    """Random blobs with labels, for tests and dry runs without any data files."""

    def __init__(self, n: int, image_size: int, channels: int, num_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
        cx = (labels.float() / max(num_classes - 1, 1)) * 1.2 - 0.6
        noise = 0.1 * torch.randn(n, 2, generator=g)
        d = (xx[None] - (cx + noise[:, 0]).view(-1, 1, 1)) ** 2 + (yy[None] - noise[:, 1].view(-1, 1, 1)) ** 2
        img = torch.exp(-d / 0.08) * 2 - 1
        super().__init__(img[:, None].expand(-1, channels, -1, -1).contiguous(), labels,
                         [str(i) for i in range(num_classes)])


__all__ = ["load_split", "ImageDataset", "ColorMNIST", "SyntheticDataset", "InMemoryDataset", "register_dataset",
           "build_dataset", "default_data_dir"]
