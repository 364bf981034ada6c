"""Semantic concepts: the interpretation INN e of the paper, trained with pairs of images that share a concept.

    e(z_bar) = (e_1, ..., e_K, e_res)     # K concept factors, then the residual (last, as in the IIN code;
                                          # the paper calls it e_0)
    z_bar    = e^-1(e_1, ..., e_K, e_res)

e is an unconditional flow on autoencoder latents (``invint_hub.cinn.INN``) trained with the IIN pair loss
(Esser, Rombach, Ommer, CVPR 2020): for a pair (x_a, x_b) that shares concept F,
e(x_a) ~ N(0, I) and e_F(x_b) | e_F(x_a) ~ N(rho e_F(x_a), (1 - rho^2) I), all other factors of e(x_b) ~ N(0, I).
Because (z, v) <-> z_bar is a bijection through the cINN t, e o t^-1(v | z) re-expresses a layer's
representation and its invariances in named concepts, which gives:

* ``transfer``: take one concept from a source image, everything else from the target;
* ``edit``: walk along one concept;
* ``concept_variance_explained``: the share of each concept's variance that the representation z of a
  layer fixes (the ECCV paper's Fig. 4 measure);
* ``network_response``: how much the classifier's prediction moves when one concept is resampled
  (the IIN paper's sensitivity figure).

Pairs come from ColorMNIST (digit, foreground colour, background colour, generated on the fly), from class
labels of any labelled dataset, or from binary attributes (CelebA). The factor sizes are given in the config
or estimated with the IIN dimensionality estimate (``estimate_factor_dims``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from .cinn import INN

DEFAULT_RHO = 0.975  # IIN's Loss/rho
RESIDUAL = "residual"
COLORMNIST_CONCEPTS = ("digit", "fg", "bg", "color", "shape")  # "color" = both colours shared, "shape" = same image
ConceptLike = str | int | Sequence[str | int]


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------
class FactorINN(INN):
    """The paper's e: an INN on autoencoder latents whose output is split into named factors.

    Args:
        dim: size of the autoencoder latent z_bar.
        n_flows, hidden, depth: flow blocks and coupling-subnet width/depth (paper: 12, 512, 2).
        seed: seed of the fixed permutations.
        factor_sizes: sizes of the factors; the **last** factor is the residual. Must add up to ``dim``.
        factor_names: one name per factor; default ``concept0, concept1, ..., residual``.
        rho: correlation of a shared factor within a pair (IIN: 0.975), used by ``pair_nll``.
        mixing: between blocks, ``shuffle`` (a fixed permutation, as IIN) or ``linear`` (a learned invertible
            linear map, Glow's LU 1x1 convolution), which lets e gather a concept spread over many latent dimensions.
    """

    def __init__(
        self,
        dim: int = 64,
        n_flows: int = 12,
        hidden: int = 512,
        depth: int = 2,
        seed: int = 0,
        factor_sizes: list[int] | None = None,
        factor_names: list[str] | None = None,
        rho: float = DEFAULT_RHO,
        mixing: str = "shuffle",
    ):
        if factor_sizes is None or len(factor_sizes) < 2:
            raise ValueError(f"a FactorINN needs at least one concept factor plus the residual, got sizes {factor_sizes}")
        if any(int(s) < 1 for s in factor_sizes):
            raise ValueError(f"every factor needs at least one dimension, got sizes {factor_sizes}")
        if factor_names is None:
            factor_names = [f"concept{i}" for i in range(len(factor_sizes) - 1)] + [RESIDUAL]
        if len(set(factor_names)) != len(factor_names):
            raise ValueError(f"factor names must be unique, got {factor_names}")
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho must lie in (0, 1), got {rho}")
        super().__init__(dim, n_flows, hidden, depth, seed, [int(s) for s in factor_sizes], list(factor_names), mixing)
        self.rho = float(rho)

    @property
    def concept_names(self) -> list[str]:
        """The concept factors (everything but the residual)."""
        return self.factor_names[:-1]

    @property
    def residual_name(self) -> str:
        return self.factor_names[-1]

    def factor_index(self, concept: str | int) -> int:
        """A factor's name (or index, residual included) -> its index, with a clear error."""
        if isinstance(concept, bool) or not isinstance(concept, (str, int)):
            raise ValueError(f"a concept is a name or an index, got {concept!r}")
        if isinstance(concept, int):
            if not 0 <= concept < len(self.factor_sizes):
                raise ValueError(f"factor index {concept} out of range; this model has factors {self.factor_names}")
            return concept
        if concept not in self.factor_names:
            raise ValueError(f"unknown concept {concept!r}; this model has factors {self.factor_names}")
        return self.factor_names.index(concept)

    def factor_slice(self, concept: str | int) -> slice:
        k = self.factor_index(concept)
        start = sum(self.factor_sizes[:k])
        return slice(start, start + self.factor_sizes[k])

    def factor_mask(self, concepts: ConceptLike) -> torch.Tensor:
        """Boolean (dim,) mask of the dimensions of one or several factors."""
        if isinstance(concepts, (str, int)):
            concepts = [concepts]
        if len(concepts) == 0:
            raise ValueError("no concept given")
        mask = torch.zeros(self.dim, dtype=torch.bool)
        for c in concepts:
            mask[self.factor_slice(c)] = True
        return mask

    def pair_nll(self, za: torch.Tensor, zb: torch.Tensor, factors: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The IIN pair loss of latents (za, zb) whose pairs share factor ``factors`` (see ``pair_loss``)."""
        ea, lda = self(za)
        eb, ldb = self(zb)
        return pair_loss(ea, lda, eb, ldb, factors, self.factor_sizes, self.rho, reduction)


# ---------------------------------------------------------------------------------------
# the pair loss and the dimensionality estimate
# ---------------------------------------------------------------------------------------
def shared_factor_mask(factors: torch.Tensor, n_factors: int) -> torch.Tensor:
    """m[b, k] = 1 where pair b shares factor k: k == F, or F < 0 and k != -F (IIN's "all but -F" label)."""
    k = torch.arange(n_factors, device=factors.device)[None]
    f = factors[:, None]
    return ((f == k) | ((f < 0) & (f != -k))).float()


def pair_loss(
    ea: torch.Tensor,
    logdet_a: torch.Tensor,
    eb: torch.Tensor,
    logdet_b: torch.Tensor,
    factors: torch.Tensor,
    factor_sizes: Sequence[int],
    rho: float = DEFAULT_RHO,
    reduction: str = "mean",
) -> torch.Tensor:
    """IIN's ``FactorLoss``: negative log-likelihood of a pair, constants dropped.

    loss1 = 1/2 ||e(z_a)||^2 - log|det J_e(z_a)|
    loss2 = sum_k 1/2 ||e_k(z_b) - m_k rho e_k(z_a)||^2 / (1 - m_k rho^2) - log|det J_e(z_b)|
    with m_k = 1 if the pair shares factor k (see ``shared_factor_mask``). Returns the batch mean of
    loss1 + loss2 (``reduction="mean"``, as the official code) or one value per pair (``"none"``).
    The -1/2 N_F log(1 - rho^2) normaliser of the conditional is dropped, as in the official code.
    """
    if ea.dim() != 2 or ea.shape != eb.shape:
        raise ValueError(f"codes must both be (B, D), got {tuple(ea.shape)} and {tuple(eb.shape)}")
    if sum(factor_sizes) != ea.shape[1]:
        raise ValueError(f"factor sizes {list(factor_sizes)} do not add up to the code size {ea.shape[1]}")
    if factors.shape != (ea.shape[0],):
        raise ValueError(f"need one factor label per pair, got shape {tuple(factors.shape)} for {ea.shape[0]} pairs")
    n = len(factor_sizes)
    if (factors >= n).any() or (factors <= -n).any():
        raise ValueError(f"factor labels must lie in (-{n}, {n}), got {factors.tolist()}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    ea, eb = ea.float(), eb.float()
    m = shared_factor_mask(factors, n)
    loss1 = 0.5 * ea.pow(2).sum(1) - logdet_a
    loss2 = -logdet_b
    for k, (a_k, b_k) in enumerate(zip(torch.split(ea, list(factor_sizes), 1), torch.split(eb, list(factor_sizes), 1))):
        mk = m[:, k]
        loss2 = loss2 + 0.5 * (b_k - (mk * rho)[:, None] * a_k).pow(2).sum(1) / (1 - mk * rho**2)
    loss = loss1 + loss2
    return loss.mean() if reduction == "mean" else loss


@torch.no_grad()
def pair_correlations(ea: torch.Tensor, eb: torch.Tensor, factors: torch.Tensor, factor_sizes: Sequence[int],
                      factor_names: Sequence[str]) -> dict[str, dict]:
    """How well e's factors are shared in pairs: per concept k (pairs with label k) and factor j,

    * ``product``: mean over pairs and dimensions d of factor j of e_j,d(a) e_j,d(b) (IIN's measure, the loss's
      model predicts rho for the shared factor, 0 for the others);
    * ``correlation``: the same with each dimension normalised, mean_d cov(a_d, b_d) / (std(a_d) std(b_d)), which
      a factor cannot exceed 1 on by having a large spread;
    * ``profile``: the shared factor's per-dimension correlations, sorted (a few dimensions near rho and the rest
      near 0 means the factor is too wide; all low means the concept is not learned).
    """
    out = {}
    for k, name in enumerate(factor_names[:-1]):
        sel = factors == k
        if not sel.any():
            continue
        pa, pb = torch.split(ea[sel].double(), list(factor_sizes), 1), torch.split(eb[sel].double(), list(factor_sizes), 1)
        row = {"pairs": int(sel.sum()), "product": {}, "correlation": {}}
        for j, other in enumerate(factor_names):
            a, b = pa[j], pb[j]
            corr = ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / (a.std(0, unbiased=False) * b.std(0, unbiased=False) + 1e-12)
            row["product"][other] = float((a * b).mean())
            row["correlation"][other] = float(corr.mean())
            if j == k:
                row["profile"] = sorted((round(float(v), 3) for v in corr), reverse=True)
        out[name] = row
    return out


def factor_scores(za: torch.Tensor, zb: torch.Tensor, factors: torch.Tensor, n_concepts: int) -> list[float]:
    """IIN ``dim_callback`` scores: for concept f, sum_d mean_pairs[(za_d - mu_f)(zb_d - mu_f)] / total variance.

    mu_f is the mean of the two halves' means over the pairs of type f; the total variance is summed over
    dimensions and taken over all a and b of all pairs. The residual (last) gets score 1.
    """
    za, zb = za.double().flatten(1), zb.double().flatten(1)
    if za.shape != zb.shape or za.shape[0] != factors.shape[0]:
        raise ValueError(f"za {tuple(za.shape)}, zb {tuple(zb.shape)} and factors {tuple(factors.shape)} do not match")
    zall = torch.cat([za, zb])
    var = (zall - zall.mean(0, keepdim=True)).pow(2).mean(0).sum()
    if var <= 0:
        raise ValueError("the representations have zero variance; cannot estimate factor dimensions")
    scores = []
    for f in range(n_concepts):
        sel = factors == f
        if not sel.any():
            raise ValueError(f"no pairs of factor {f}; need pairs of every concept to estimate dimensions")
        a, b = za[sel], zb[sel]
        mu = 0.5 * (a.mean(0, keepdim=True) + b.mean(0, keepdim=True))
        scores.append(float(((a - mu) * (b - mu)).mean(0).sum() / var))
    return scores + [1.0]


def dims_from_scores(scores: Sequence[float], dim: int) -> list[int]:
    """floor(softmax(scores) * dim) per factor; the residual (last) takes the remainder (IIN ``dim_callback``)."""
    s = torch.tensor(list(scores), dtype=torch.float64)
    p = torch.softmax(s, 0)
    dims = [int(math.floor(float(v) * dim)) for v in p]
    dims[-1] = dim - sum(dims[:-1])
    return dims


def estimate_factor_dims(
    za: torch.Tensor, zb: torch.Tensor, factors: torch.Tensor, n_concepts: int, dim: int | None = None
) -> tuple[list[int], list[float]]:
    """The IIN dimensionality estimate: how many of ``dim`` dimensions each concept (and the residual) gets.

    ``za``, ``zb``: representations of the two halves of each pair (B, D); ``factors``: the shared concept of
    each pair in [0, n_concepts). Returns (dims with the residual last, scores). ``dim`` defaults to D.
    """
    scores = factor_scores(za, zb, factors, n_concepts)
    return dims_from_scores(scores, dim or za[0].numel()), scores


def usable_dims(dims: Sequence[int]) -> list[int]:
    """Make every factor at least one dimension wide, taking the missing ones from the largest factor."""
    dims = list(dims)
    for k, d in enumerate(dims):
        while dims[k] < 1:
            big = max(range(len(dims)), key=lambda i: dims[i])
            if dims[big] <= 1:
                raise ValueError(f"cannot give {len(dims)} factors one dimension each out of {sum(dims)}")
            dims[big] -= 1
            dims[k] += 1
    return dims


# ---------------------------------------------------------------------------------------
# pair datasets
# ---------------------------------------------------------------------------------------
class PairDataset(Dataset):
    """Pairs of images that share one concept.

    ``get_batch(idx)`` returns ``(pairs, factors)``: pairs (B, 2, C, S, S) in [-1, 1] (the first image of
    pair b is item ``idx[b]``), factors (B,) the index of the shared concept in ``concept_names``.
    The random choices are a pure function of ``idx`` and ``seed``, so training resumes exactly and a
    test set of pairs is fixed.
    """

    concept_names: list[str]
    seed: int
    weights: torch.Tensor | None = None  # how often each concept is the shared one (None: uniform, as in IIN)

    def set_weights(self, weights: dict[str, float] | None) -> "PairDataset":
        """Draw the shared concept with these relative weights ({concept name: weight > 0}) instead of uniformly."""
        if weights is None:
            self.weights = None
            return self
        if set(weights) != set(self.concept_names):
            raise ValueError(f"pair weights need one weight per concept {self.concept_names}, got {sorted(weights)}")
        w = [float(weights[n]) for n in self.concept_names]
        if not all(v > 0 for v in w):
            raise ValueError(f"pair weights must all be > 0, got {dict(weights)}")
        self.weights = torch.tensor(w, dtype=torch.float64)
        return self

    def _draw_factors(self, g: torch.Generator, b: int) -> torch.Tensor:
        if self.weights is None:
            return torch.randint(len(self.concept_names), (b,), generator=g)
        return torch.multinomial(self.weights, b, replacement=True, generator=g)

    def _generator(self, idx: torch.Tensor) -> torch.Generator:
        weights = torch.arange(1, len(idx) + 1, dtype=torch.long)
        key = int((idx.long().cpu() * weights).sum()) * 1_000_003 + len(idx) * 7919 + self.seed * 104_729
        return torch.Generator().manual_seed(key % (2**62))

    def __getitem__(self, i: int):
        pairs, factors = self.get_batch(torch.tensor([i]))
        return pairs[0], factors[0]

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _same_value_sampler(values: torch.Tensor):
    """values (N,) ints -> f(v (B,), u (B,) in [0, 1)) giving a random index with the same value."""
    order = torch.argsort(values, stable=True)
    uniq, counts = torch.unique(values, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    lookup = {int(v): (int(s), int(c)) for v, s, c in zip(uniq, starts, counts)}

    def sample(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        s = torch.tensor([lookup[int(x)][0] for x in v], dtype=torch.long)
        c = torch.tensor([lookup[int(x)][1] for x in v], dtype=torch.long)
        return order[s + (u * c).long().clamp_max(c - 1)]

    return sample


class ColorMNISTPairs(PairDataset):
    """ColorMNIST pairs generated on the fly: image = bg * (1 - m) + fg * m with fresh U(0, 1)^3 colours.

    Concepts (any subset, in the given order):
        ``digit``: same class, other image, new colours for both (IIN's factor 0);
        ``fg``: same foreground colour, random other image, new background;
        ``bg``: same background colour, random other image, new foreground;
        ``color``: same foreground and background colour, random other image (IIN's one "colour" factor);
        ``shape``: the same MNIST image repainted with new colours (the autoencoder's recolouring-invariance pairs).
    The shared concept of each pair is drawn uniformly, as in the IIN code, unless ``set_weights`` is called.
    """

    def __init__(self, masks: torch.Tensor, labels: torch.Tensor, concepts: Sequence[str] = ("digit", "fg", "bg"), seed: int = 0):
        bad = [c for c in concepts if c not in COLORMNIST_CONCEPTS]
        if bad or not concepts:
            raise ValueError(f"ColorMNIST concepts must be a non-empty subset of {COLORMNIST_CONCEPTS}, got {list(concepts)}")
        if masks.dim() != 4 or masks.shape[1] != 1 or masks.dtype != torch.uint8:
            raise ValueError(f"masks must be uint8 (N, 1, S, S), got {masks.dtype} {tuple(masks.shape)}")
        self.masks, self.labels = masks, labels.long()
        self.concept_names = list(concepts)
        self.seed = seed
        self._same_class = _same_value_sampler(self.labels)

    @classmethod
    def from_dataset(cls, ds, concepts: Sequence[str] = ("digit", "fg", "bg"), seed: int = 0) -> "ColorMNISTPairs":
        """From an ``invint_hub.data.ColorMNIST``."""
        return cls(ds.masks, ds.labels, concepts, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def _paint(self, j: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        m = self.masks[j].float() / 255.0
        return (bg.view(-1, 3, 1, 1) * (1 - m) + fg.view(-1, 3, 1, 1) * m) * 2 - 1

    def sample(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pairs with their ground truth: images, factors, partner index, digits and colours of both halves."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        g = self._generator(idx)
        b = len(idx)
        factors = self._draw_factors(g, b)
        fg_a, bg_a, fg_b, bg_b = torch.rand(4, b, 3, generator=g)
        j_any = torch.randint(len(self.labels), (b,), generator=g)
        j_same = self._same_class(self.labels[idx], torch.rand(b, generator=g))
        kind = [self.concept_names[int(f)] for f in factors]
        same_digit = torch.tensor([k == "digit" for k in kind])
        same_fg = torch.tensor([k in ("fg", "color") for k in kind])
        same_bg = torch.tensor([k in ("bg", "color") for k in kind])
        j = torch.where(same_digit, j_same, j_any)
        j = torch.where(torch.tensor([k == "shape" for k in kind]), idx, j)
        fg_b = torch.where(same_fg[:, None], fg_a, fg_b)
        bg_b = torch.where(same_bg[:, None], bg_a, bg_b)
        xa, xb = self._paint(idx, fg_a, bg_a), self._paint(j, fg_b, bg_b)
        return dict(pairs=torch.stack([xa, xb], 1), factors=factors, j=j, digit_a=self.labels[idx], digit_b=self.labels[j],
                    fg_a=fg_a, bg_a=bg_a, fg_b=fg_b, bg_b=bg_b)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample(idx)
        return s["pairs"], s["factors"]


class LabelPairs(PairDataset):
    """Pairs from class labels of any labelled image dataset: both images have the same class (concept ``class``)."""

    def __init__(self, dataset, seed: int = 0, concept: str = "class"):
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise ValueError("LabelPairs needs a dataset with a .labels tensor")
        self.dataset, self.labels = dataset, torch.as_tensor(labels).long()
        self.concept_names = [concept]
        self.seed = seed
        self._same_class = _same_value_sampler(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(idx)[0]
        return torch.stack([self.dataset[int(i)][0] for i in idx])

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        g = self._generator(idx)
        j = self._same_class(self.labels[idx], torch.rand(len(idx), generator=g))
        return torch.stack([self._images(idx), self._images(j)], 1), torch.zeros(len(idx), dtype=torch.long)


class AttributePairs(PairDataset):
    """Pairs that share the value of one binary attribute (IIN's ``BaseFactorCelebA``).

    Args:
        images: uint8 (N, C, S, S) images.
        attributes: (N, K) attribute values (any two values per column, e.g. -1/1, 0/1, False/True).
        concept_names: one name per attribute column.
    """

    def __init__(self, images: torch.Tensor, attributes: torch.Tensor, concept_names: Sequence[str], seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, S, S), got {images.dtype} {tuple(images.shape)}")
        attributes = torch.as_tensor(attributes).long()
        if attributes.shape != (images.shape[0], len(concept_names)):
            raise ValueError(f"attributes {tuple(attributes.shape)} do not match {images.shape[0]} images x {len(concept_names)} concepts")
        self.images, self.attributes = images, attributes
        self.concept_names = list(concept_names)
        self.seed = seed
        self._same = [_same_value_sampler(attributes[:, k]) for k in range(attributes.shape[1])]

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        g = self._generator(idx)
        factors = self._draw_factors(g, len(idx))
        u = torch.rand(len(idx), generator=g)
        j = torch.empty_like(idx)
        for k in range(len(self.concept_names)):
            sel = factors == k
            if sel.any():
                j[sel] = self._same[k](self.attributes[idx[sel], k], u[sel])
        x = torch.stack([self.images[idx], self.images[j]], 1).float() / 127.5 - 1.0
        return x, factors


def load_attribute_images(
    name: str, split: str, image_size: int, channels: int, columns: Sequence[str],
    data_dir=None, limit: int | None = None, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A local parquet folder or Hub dataset with an ``image`` column and one column per attribute
    -> (uint8 images (N, C, S, S), attributes (N, K) with values 0/1)."""
    from .data import load_split
    from .images import arrays_to_batch, pil_to_array

    ds = load_split(name, split, data_dir)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {name!r} has no attribute columns {missing}; it has {ds.column_names}")
    if limit is not None and limit < len(ds):
        ds = ds.shuffle(seed=seed).select(range(limit))
    images = arrays_to_batch([pil_to_array(im, channels) for im in ds["image"]], image_size)
    images = ((images + 1) * 127.5).round().to(torch.uint8)
    attrs = []
    for c in columns:
        v = torch.tensor([float(a) for a in ds[c]])
        uniq = torch.unique(v)
        if len(uniq) > 2:
            raise ValueError(f"attribute column {c!r} is not binary: values {uniq.tolist()[:10]}")
        attrs.append((v == uniq.max()).long())
    return images, torch.stack(attrs, 1)


# ---------------------------------------------------------------------------------------
# concept operations on a pipeline
# ---------------------------------------------------------------------------------------
def _model(pipe) -> FactorINN:
    if getattr(pipe, "concepts", None) is None:
        raise ValueError("this pipeline has no concept model; train one with `python -m invint_hub.train concepts ...`")
    return pipe.concepts


def _pair_up(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if xa.shape[0] == xb.shape[0]:
        return xa, xb
    if xa.shape[0] == 1:
        return xa.expand(xb.shape[0], *xa.shape[1:]), xb
    if xb.shape[0] == 1:
        return xa, xb.expand(xa.shape[0], *xb.shape[1:])
    raise ValueError(f"cannot pair batches of {xa.shape[0]} and {xb.shape[0]} images (give equal sizes or one image)")


@torch.no_grad()
def encode_concepts(pipe, images) -> dict[str, torch.Tensor]:
    """Images -> {factor name: (B, size) code} of e(E(x)) (posterior mean)."""
    e = _model(pipe)
    codes = e(pipe.encode(images))[0]
    return dict(zip(e.factor_names, e.split(codes)))


@torch.no_grad()
def transfer_latents(pipe, target, source, concept: ConceptLike, amount: float = 1.0) -> torch.Tensor:
    """z_bar of the target with concept(s) taken from the source: e^-1(e(t) with e_c <- e_c(t) + amount (e_c(s) - e_c(t)))."""
    e = _model(pipe)
    zt, zs = _pair_up(pipe.encode(target), pipe.encode(source))
    return e.inverse(transfer_codes(e, e(zt)[0], e(zs)[0], concept, amount))[0]


def transfer_codes(e: FactorINN, ct: torch.Tensor, cs: torch.Tensor, concept: ConceptLike, amount: float = 1.0) -> torch.Tensor:
    """Codes of e: ``ct`` with the factor(s) of ``concept`` moved ``amount`` of the way to ``cs``'s."""
    mask = e.factor_mask(concept).to(ct.device)
    return torch.where(mask[None], ct + float(amount) * (cs - ct), ct)


@torch.no_grad()
def transfer(pipe, target, source, concept: ConceptLike, amount: float = 1.0) -> torch.Tensor:
    """D(e^-1(...)): the target image with ``concept`` (a name, index or list) from the source image.

    ``amount`` interpolates (0 = the target's reconstruction, 1 = full transfer). Batches must have the same
    size, or one of them one image. Returns (B, C, S, S) in [-1, 1].
    """
    return pipe.decode(transfer_latents(pipe, target, source, concept, amount))


def concept_direction(e: FactorINN, concept: str | int, seed: int = 0) -> torch.Tensor:
    """A unit direction inside one factor (zero elsewhere), drawn from N(0, I) with ``seed``: (dim,)."""
    sl = e.factor_slice(concept)
    d = torch.zeros(e.dim)
    v = torch.randn(sl.stop - sl.start, generator=torch.Generator().manual_seed(int(seed)))
    d[sl] = v / v.norm().clamp_min(1e-12)
    return d


@torch.no_grad()
def edit(pipe, images, concept: str | int, amount: float, direction: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Walk ``amount`` (in units of the factor's prior std) along one concept: D(e^-1(e(E(x)) + amount d)).

    ``direction``: a vector of the factor's size (normalised here); default a seeded random unit direction
    inside the factor (``concept_direction``), so a slider with a fixed seed is reproducible.
    """
    e = _model(pipe)
    if not math.isfinite(float(amount)):
        raise ValueError(f"amount must be a finite number, got {amount}")
    sl = e.factor_slice(concept)
    if direction is None:
        d = concept_direction(e, concept, seed)
    else:
        direction = torch.as_tensor(direction, dtype=torch.float32).flatten()
        if direction.numel() != sl.stop - sl.start:
            raise ValueError(f"direction has {direction.numel()} entries; factor {concept!r} has {sl.stop - sl.start}")
        if direction.norm() == 0:
            raise ValueError("direction must not be zero")
        d = torch.zeros(e.dim)
        d[sl] = direction / direction.norm()
    code = e(pipe.encode(images))[0]
    return pipe.decode(e.inverse(code + float(amount) * d.to(code))[0])


@torch.no_grad()
def edit_many(pipe, images, amounts: Mapping[str | int, float], seed: int = 0) -> torch.Tensor:
    """Several concepts at once (one slider per concept): D(e^-1(e(E(x)) + sum_c amount_c d_c)).

    ``d_c`` is ``concept_direction(e, c, seed)``, so ``edit_many(p, x, {c: a}, s)`` equals ``edit(p, x, c, a, seed=s)``.
    """
    e = _model(pipe)
    shift = torch.zeros(e.dim)
    for concept, amount in amounts.items():
        if not math.isfinite(float(amount)):
            raise ValueError(f"amount of {concept!r} must be a finite number, got {amount}")
        shift += float(amount) * concept_direction(e, concept, seed)
    code = e(pipe.encode(images))[0]
    return pipe.decode(e.inverse(code + shift.to(code))[0])


@torch.no_grad()
def sample_images(pipe, n: int, temperature: float = 1.0, seed: int | None = 0) -> torch.Tensor:
    """n images D(e^-1(eps)), eps ~ N(0, temperature^2 I): the autoencoder + e as a generative model."""
    e = _model(pipe)
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    return pipe.decode(e.sample(n, temperature, g))


@torch.no_grad()
def concept_variance_explained(
    pipe, layer: str, images=None, n: int = 16, seed: int | None = 0, n_images: int = 256, batch_size: int = 128
) -> dict[str, float]:
    """Share of each factor's variance that the representation z = Phi(x) at ``layer`` explains (ECCV Fig. 4).

    For each image j draw z_bar_jm = t^-1(v_m | z_j), m = 1..n, and code it with e. Per factor k:
    1 - E_j[sum_d Var_m e_k,d] / sum_d Var_{j,m} e_k,d. Near 1: z fixes the concept; near 0: the layer is
    invariant to it. ``images`` default: ``n_images`` samples D(e^-1(eps)) of the pipeline's own generative
    model (pass real test images for a report).
    """
    e = _model(pipe)
    t = pipe.cinn(layer)
    if n < 2:
        raise ValueError(f"need n >= 2 samples per image to estimate a variance, got {n}")
    x = pipe.preprocess(images) if images is not None else sample_images(pipe, n_images, seed=seed)
    if x.shape[0] < 2:
        raise ValueError("need at least 2 images to estimate the variance over the data")
    g = None if seed is None else torch.Generator().manual_seed(int(seed) + 1)
    codes = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        z = pipe.backbone.representation(xb, layer)
        zbar = t.sample(z, n, generator=g)
        codes.append(e(zbar)[0].view(xb.shape[0], n, -1))
    c = torch.cat(codes).double()
    out = {}
    for name, ck in zip(e.factor_names, torch.split(c, e.factor_sizes, dim=2)):
        within = ck.var(dim=1, unbiased=True).sum(-1).mean()
        total = ck.flatten(0, 1).var(dim=0, unbiased=True).sum()
        out[name] = float(1.0 - within / total)
    return out


@torch.no_grad()
def network_response(pipe, images, concept: str | int, n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Resample one factor of e(E(x)) from N(0, I), decode, classify (IIN's network-response analysis).

    Returns per image: ``std`` of the predicted class index over the n samples (the IIN figure's sigma),
    ``changed`` the share of samples whose prediction differs from that of the reconstruction D(E(x)),
    and ``predictions`` (B, n).
    """
    e = _model(pipe)
    if n < 2:
        raise ValueError(f"need n >= 2 samples, got {n}")
    x = pipe.preprocess(images)
    code = e(pipe.encode(x))[0]
    base = pipe.backbone(pipe.decode(e.inverse(code)[0])).argmax(1)
    mask = e.factor_mask(concept).to(code.device)
    g = torch.Generator().manual_seed(int(seed))
    codes = code.repeat_interleave(n, 0)
    noise = torch.randn(codes.shape, generator=g).to(codes)
    codes = torch.where(mask[None], noise, codes)
    preds = torch.cat([pipe.backbone(pipe.decode(e.inverse(c)[0])).argmax(1) for c in codes.split(512)]).view(x.shape[0], n)
    return {"std": preds.float().std(1, unbiased=False), "changed": (preds != base[:, None]).float().mean(1), "predictions": preds}


# ---------------------------------------------------------------------------------------
# batched concept views (everything one request of the Space shows, one pass through each network)
# ---------------------------------------------------------------------------------------
EDIT_STEPS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


@dataclass
class ConceptTransfer:
    """Each concept of the source put into the target (row 0) and of the target into the source (row 1)."""

    concepts: list[str]  # the columns: each concept, then (with several) "all concepts"
    amount: float
    x: torch.Tensor  # (2, C, S, S): target, source
    pred: list[int]  # classes of target and source
    rows: torch.Tensor  # (2, len(concepts), C, S, S)
    row_pred: list[list[int]]


@dataclass
class ConceptEdit:
    """An image with every concept moved by its amount, and a walk along each concept alone."""

    concepts: list[str]
    amounts: dict[str, float]
    x: torch.Tensor  # (1, C, S, S)
    recon: torch.Tensor  # (1, C, S, S)
    edited: torch.Tensor  # (1, C, S, S)
    pred: list[int]  # input, reconstruction, edited
    steps: tuple[float, ...]
    walks: torch.Tensor  # (len(concepts), len(steps), C, S, S)
    walk_pred: list[list[int]]


def _one_image(pipe, images, what: str) -> torch.Tensor:
    x = pipe.preprocess(images)
    if x.shape[0] != 1:
        raise ValueError(f"{what} takes one image, got a batch of {x.shape[0]}")
    return x


@torch.inference_mode()
def concept_transfer(pipe, target, source, amount: float = 1.0) -> ConceptTransfer:
    """Every concept (one at a time, then all together) moved ``amount`` of the way from the target's value to
    the source's, and the reverse; equals ``pipe.transfer(target, source, c, amount)`` per column."""
    e = _model(pipe)
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise ValueError(f"amount must be a number, got {amount!r}") from None
    if not -1.0 <= amount <= 2.0:
        raise ValueError(f"amount must lie in [-1, 2] (0 = no change, 1 = full transfer), got {amount}")
    names = e.concept_names
    columns: list = list(names) + ([list(names)] if len(names) > 1 else [])
    x = torch.cat([_one_image(pipe, target, "concept_transfer (target)"), _one_image(pipe, source, "concept_transfer (source)")])
    code = e(pipe.encode(x))[0]  # encoded once; per column: target with the source's concept, then the reverse
    codes = torch.cat([transfer_codes(e, code, code.flip(0), c, amount) for c in columns])
    dec = pipe.decode(e.inverse(codes)[0])
    preds = pipe.backbone(torch.cat([x, dec])).argmax(1).tolist()
    k = len(columns)
    rows = dec.view(k, 2, *dec.shape[1:]).transpose(0, 1)
    row_pred = [[preds[2 + 2 * j + i] for j in range(k)] for i in range(2)]
    labels = list(names) + (["all concepts"] if len(names) > 1 else [])
    return ConceptTransfer(labels, amount, x, preds[:2], rows, row_pred)


@torch.inference_mode()
def concept_edit(pipe, image, amounts: Mapping[str, float], seed: int = 0, steps: Sequence[float] = EDIT_STEPS) -> ConceptEdit:
    """The image with every concept moved by its amount (prior standard deviations, in [-5, 5]) at once
    (``pipe.edit_many(image, amounts, seed)``), and each concept alone walked through ``steps``."""
    e = _model(pipe)
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
    x = _one_image(pipe, image, "concept_edit")
    code = e(pipe.encode(x))[0]  # (1, dim)
    dirs = torch.stack([concept_direction(e, c, seed) for c in names]).to(code)  # (K, dim)
    shift = sum((amounts.get(c, 0.0) * d for c, d in zip(names, dirs)), torch.zeros_like(code[0]))
    walk = code + torch.tensor(steps).to(code)[None, :, None] * dirs[:, None, :]  # (K, n_steps, dim)
    dec = pipe.decode(e.inverse(torch.cat([code, code + shift, walk.flatten(0, 1)]))[0])
    preds = pipe.backbone(torch.cat([x, dec])).argmax(1).tolist()
    walks = dec[2:].view(len(names), len(steps), *dec.shape[1:])
    walk_pred = [preds[3 + i * len(steps) : 3 + (i + 1) * len(steps)] for i in range(len(names))]
    return ConceptEdit(names, amounts, x, dec[:1], dec[1:2], preds[:3], tuple(steps), walks, walk_pred)


@torch.inference_mode()
def concept_layers(pipe, n_images: int = 64, n: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per layer, the share of each concept's variance that the layer's representation fixes (ECCV Fig. 4),
    on ``n_images`` images the pipeline generates itself: {layer: {factor: share}}."""
    _model(pipe)
    images = sample_images(pipe, n_images, seed=seed)
    return {l: concept_variance_explained(pipe, l, images, n=n, seed=seed) for l in pipe.layers}


__all__ = [
    "FactorINN", "pair_loss", "shared_factor_mask", "factor_scores", "dims_from_scores", "estimate_factor_dims",
    "usable_dims", "PairDataset", "ColorMNISTPairs", "LabelPairs", "AttributePairs", "load_attribute_images",
    "encode_concepts", "transfer", "transfer_latents", "transfer_codes", "edit", "concept_direction", "sample_images",
    "concept_variance_explained", "network_response",
]
