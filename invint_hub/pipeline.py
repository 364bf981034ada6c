"""``InvariancePipeline``: backbone f = Psi o Phi + autoencoder (E, D) + one cINN t per layer.

Repository layout (local folder or Hub repo)::

    pipeline.json            # dataset, image domain, layers
    README.md                # pipeline card
    backbone/                # config.json + model.safetensors (+ README.md)
    autoencoder/             # or, in pipeline.json, "autoencoder": "../<sibling pipeline>/autoencoder" (shared)
    cinn/<layer>/            # one conditional INN per layer
    concepts/                # optional: the concept INN e (listed as "concepts" in pipeline.json)

``InvariancePipeline.from_pretrained()`` with no argument loads the embedded MNIST pipeline.

Two kinds of methods: the paper's operations on batches (``sample_invariances``, ``mix``,
``variance_explained``, ...), which return tensors, and the batched views of one image
(``interpret``, ``layer_sweep``, ``mix_layers``, ``attack``, ``compare``), which compute everything one request
of the Space shows in one pass through each network and return small dataclasses of tensors and
floats. The concept views live next to the concept operations in ``invint_hub.concepts``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attacks import fgsm, sign_noise
from .autoencoder import Autoencoder
from .backbones import Backbone
from .cinn import ConditionalINN
from .hub import weights_sha256
from . import concepts as _concepts
from .concepts import FactorINN
from .images import ImageLike, to_batch

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_PIPELINE = "mnist"
PIPELINE_FILE = "pipeline.json"


def resolve_pipeline_dir(name_or_path: str | Path | None = None, **hub_kwargs) -> Path:
    """Embedded name (``mnist``), local folder, or Hub repo id -> local folder (downloaded if needed)."""
    if name_or_path is None:
        name_or_path = DEFAULT_PIPELINE
    p = Path(name_or_path)
    if (p / PIPELINE_FILE).is_file():
        return p
    if (PRETRAINED_DIR / str(name_or_path) / PIPELINE_FILE).is_file():
        return PRETRAINED_DIR / str(name_or_path)
    if p.exists():
        raise FileNotFoundError(f"{p} is not an invint_hub pipeline folder (no {PIPELINE_FILE})")
    if str(name_or_path).count("/") != 1:
        embedded = sorted(d.name for d in PRETRAINED_DIR.glob("*") if (d / PIPELINE_FILE).is_file())
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local pipeline folder, an embedded pipeline {embedded}, nor a Hub repo id"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(name_or_path), **hub_kwargs))


def _is_local(name_or_path: str | Path | None) -> bool:
    """Whether ``resolve_pipeline_dir`` finds ``name_or_path`` on this machine (no Hub download)."""
    if name_or_path is None:
        return True
    return (Path(name_or_path) / PIPELINE_FILE).is_file() or (PRETRAINED_DIR / str(name_or_path) / PIPELINE_FILE).is_file()


def component_dir(root: str | Path, info: dict, key: str, default: str | None = None, hub: bool = False) -> Path:
    """The folder that ``pipeline.json``'s entry ``key`` names, resolved relative to the pipeline folder ``root``.

    An entry may name a folder of a sibling pipeline (``"autoencoder": "../cifar10/autoencoder"``: two pipelines
    that share one autoencoder store it once). Every entry must stay inside the parent of ``root``: an absolute
    path, or one that climbs further up, is a ``ValueError`` naming ``pipeline.json`` and the key; a folder that
    does not exist is a ``FileNotFoundError`` that names them too. ``hub=True`` (a downloaded Hub snapshot, which
    holds one repository only): a reference outside ``root`` is refused with a ``ValueError`` saying so.
    """
    root = Path(root)
    where = root / PIPELINE_FILE
    value = info.get(key, default) if default is not None else info.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key} = {value!r}; expected a folder name relative to the pipeline folder")
    if "\\" in value or Path(value).is_absolute() or Path(value).drive:
        raise ValueError(f"{where}: {key} = {value!r} must be a path relative to the pipeline folder, not an absolute one")
    base = Path(os.path.normpath(root.absolute()))
    target = Path(os.path.normpath(base / value))
    if not target.is_relative_to(base.parent) or target == base.parent:
        raise ValueError(f"{where}: {key} = {value!r} leaves the folder that holds the pipeline ({base.parent}); "
                         "entries may name folders of the pipeline or of a sibling pipeline (../<pipeline>/<folder>)")
    if hub and not target.is_relative_to(base):
        raise ValueError(f"{where}: {key} = {value!r} names a folder of another pipeline, which a Hub repository cannot "
                         "reference (a download holds one repository); save the pipeline with its own copy "
                         "(InvariancePipeline.save_pretrained) before pushing it, or load it from local folders")
    if not target.is_dir():
        raise FileNotFoundError(f"{where}: {key} names the folder {value!r}, which does not exist ({target})")
    return target


def embedded_pipelines() -> list[str]:
    """Names of the pipelines shipped in the package, the default (``mnist``) first."""
    names = sorted(d.name for d in PRETRAINED_DIR.glob("*") if (d / PIPELINE_FILE).is_file())
    return sorted(names, key=lambda n: n != DEFAULT_PIPELINE)


# --- the batched views (one request = one pass through each network; used by the Space) --------
@dataclass
class Interpretation:
    """One image at one layer: prediction, reconstruction and n samples D(t^-1(v | z))."""

    layer: str
    x: torch.Tensor  # (1, C, S, S) the model input
    probs: torch.Tensor  # (K,) class probabilities of x
    recon: torch.Tensor  # (1, C, S, S) D(E(x))
    samples: torch.Tensor  # (n, C, S, S)
    sample_pred: torch.Tensor  # (n,) classes of the samples
    variance_explained: float | None  # share of z_bar's data variance the samples span, clipped to [0, 1] (None: unknown)
    class_agreement: float  # share of samples classified like x
    variance_ratio: float | None = None  # the same ratio unclipped (> 1: the samples spread more than the data does)
    reencode_cosine: float | None = None  # mean cos(Phi_L(sample), Phi_L(x)) over the samples
    reencode_cosines: torch.Tensor | None = None  # (n,) per sample
    random_pair_cosine: float | None = None  # reference: mean cosine of random pairs of test images at the layer
    domain_score: float | None = None  # InvariancePipeline.domain_score of x
    out_of_domain: bool | None = None  # domain_score above the calibrated threshold (None: no calibration)


@dataclass
class LayerSweep:
    """Samples for every layer with the same v (so sample j shows the same invariances at every layer)."""

    x: torch.Tensor  # (1, C, S, S)
    probs: torch.Tensor  # (K,)
    recon: torch.Tensor  # (1, C, S, S)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, C, S, S)
    sample_pred: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n,)
    variance_explained: dict[str, float | None] = field(default_factory=dict)  # clipped to [0, 1]
    class_agreement: dict[str, float] = field(default_factory=dict)
    variance_ratio: dict[str, float | None] = field(default_factory=dict)  # unclipped
    reencode_cosine: dict[str, float] = field(default_factory=dict)  # mean cos(Phi_L(sample), Phi_L(x))
    random_pair_cosine: dict[str, float | None] = field(default_factory=dict)  # reference per layer
    domain_score: float | None = None
    out_of_domain: bool | None = None


@dataclass
class LayerMix:
    """Per layer: A's representation decoded with B's invariances, and B's with A's."""

    x: torch.Tensor  # (2, C, S, S): A, B
    recon: torch.Tensor  # (2, C, S, S)
    pred: torch.Tensor  # (2,) classes of A and B
    a_with_b: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (1, C, S, S)
    b_with_a: dict[str, torch.Tensor] = field(default_factory=dict)
    pred_a_with_b: dict[str, int] = field(default_factory=dict)
    pred_b_with_a: dict[str, int] = field(default_factory=dict)


@dataclass
class Attack:
    """FGSM vs random sign noise of the same eps, and what every layer sees of each (ECCV Fig. 5)."""

    eps: float
    x: torch.Tensor  # (3, C, S, S): original, FGSM, random signs
    probs: torch.Tensor  # (3, K)
    recon: torch.Tensor  # (3, C, S, S): D(E(.)) of each
    recon_pred: list[int]  # classes of the reconstructions
    seen: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (3, C, S, S): D(t^-1(v_orig | Phi_L(.)))
    seen_pred: dict[str, list[int]] = field(default_factory=dict)
    # v-sample grids: the same n samples v ~ N(0, T^2 I) decoded with the clean z and with the FGSM z, per layer
    samples_clean: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, C, S, S)
    samples_attacked: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, C, S, S)
    sample_pred_clean: dict[str, list[int]] = field(default_factory=dict)
    sample_pred_attacked: dict[str, list[int]] = field(default_factory=dict)
    domain_score: float | None = None  # of the original image
    out_of_domain: bool | None = None


@dataclass
class CompareSide:
    """One network of a ``Comparison``: its view of the image and the shared v decoded with its representation."""

    network: str  # the backbone's arch
    layer: str
    probs: torch.Tensor  # (K,) the network's class probabilities of x
    class_name: str  # its top-1 class
    probability: float  # and that class's probability
    samples: torch.Tensor  # (n, C, S, S): D(t^-1(v | z)) with the shared v and this network's z at ``layer``
    sample_pred: torch.Tensor  # (n,) this network's classes of its samples
    class_agreement: float  # share of its samples it puts in its class of x
    variance_explained: float | None  # share of z_bar's data variance the samples span, clipped to [0, 1]
    variance_ratio: float | None = None  # unclipped


@dataclass
class Comparison:
    """One image, two pipelines that share an autoencoder, the same v decoded with each network's representation
    (the official demo's texture-bias mode: ImageNet vs Stylized-ImageNet ResNet-50 on one v)."""

    x: torch.Tensor  # (1, C, S, S) the model input (the same for both: the autoencoder's images)
    recon: torch.Tensor  # (1, C, S, S) D(E(x)), the same for both
    v: torch.Tensor  # (n, latent_dim) the shared invariance samples, v ~ N(0, T^2 I)
    a: CompareSide  # this pipeline
    b: CompareSide  # the other one
    autoencoder_id: str


def _sampling(n, temperature, seed) -> tuple[int, float, int]:
    try:
        n, temperature, seed = int(n), float(temperature), int(seed)
    except (TypeError, ValueError):
        raise ValueError("samples, temperature and seed must be numbers") from None
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    if not (0.0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return n, temperature, seed


class InvariancePipeline:
    """Interpret a classifier's layers: what each representation keeps and what it is invariant to.

    All image arguments accept PIL images, file paths, bytes, numpy arrays, tensors
    (uint8 0..255 or float in [-1, 1]) or lists of these, of any size and mode.
    """

    def __init__(
        self,
        backbone: Backbone,
        autoencoder: Autoencoder,
        cinns: dict[str, ConditionalINN],
        info: dict | None = None,
        concepts: FactorINN | None = None,
    ):
        if autoencoder.image_size != backbone.image_size or autoencoder.channels != backbone.in_channels:
            raise ValueError(
                f"autoencoder images ({autoencoder.channels}x{autoencoder.image_size}px) and backbone images "
                f"({backbone.in_channels}x{backbone.image_size}px) differ"
            )
        for layer, t in cinns.items():
            if layer not in backbone.layers:
                raise ValueError(f"cINN for unknown layer {layer!r}; this {backbone.arch} has layers {backbone.layers}")
            if t.latent_dim != autoencoder.latent_dim:
                raise ValueError(f"cINN for {layer} expects latent {t.latent_dim}, autoencoder has {autoencoder.latent_dim}")
            if tuple(t.cond_shape) != tuple(backbone.feature_shapes[layer]):
                raise ValueError(f"cINN for {layer} was trained on representations of shape {list(t.cond_shape)}; this "
                                 f"backbone's {layer} has shape {list(backbone.feature_shapes[layer])}")
        if concepts is not None and concepts.dim != autoencoder.latent_dim:
            raise ValueError(f"concept INN expects latent {concepts.dim}, autoencoder has {autoencoder.latent_dim}")
        self.concepts = concepts.eval() if concepts is not None else None
        self.backbone = backbone.eval()
        self.autoencoder = autoencoder.eval()
        self.cinns = {k: cinns[k].eval() for k in backbone.layers if k in cinns}  # network order
        self.info = dict(info or {})

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, device: str | torch.device = "cpu",
                        backbone: "Backbone | torch.nn.Module | None" = None, **hub_kwargs):
        """Load the embedded default (no argument), an embedded name, a local folder or a Hub repo id.

        ``backbone``: your own classifier (an ``nn.Module`` mapping normalised images to logits, or a ``Backbone``)
        instead of the saved one; it is wrapped with the saved backbone's layers, sizes and normalisation and must
        give every cINN's layer the shape it was trained on.
        """
        hub = not _is_local(name_or_path)
        root = resolve_pipeline_dir(name_or_path, **hub_kwargs)
        try:
            info = json.loads((root / PIPELINE_FILE).read_text())
        except ValueError as err:
            raise ValueError(f"{root / PIPELINE_FILE} is not valid JSON ({err})") from err
        if not isinstance(info, dict):
            raise ValueError(f"{root / PIPELINE_FILE} must hold a JSON object")

        def sub(key: str, default: str | None = None, entries: dict | None = None) -> Path:
            return component_dir(root, entries if entries is not None else info, key, default, hub=hub)

        if backbone is None:
            backbone = Backbone.from_pretrained(sub("backbone", "backbone"))
        elif not isinstance(backbone, Backbone):
            rec = json.loads((sub("backbone", "backbone") / "config.json").read_text())
            backbone = Backbone.from_module(
                backbone, layers=rec.get("layers"), image_size=rec["image_size"], mean=rec["mean"], std=rec["std"],
                input_size=rec.get("input_size"), class_names=rec.get("class_names"), in_channels=rec.get("in_channels"),
                module_kwargs=rec.get("model_kwargs"))
        ae_dir = sub("autoencoder", "autoencoder")
        autoencoder = Autoencoder.from_pretrained(ae_dir)
        autoencoder._pipeline_dir = ae_dir  # where it came from: save_pretrained copies the folder as it is
        cinns = {}
        entries = info.get("cinn", {})
        if not isinstance(entries, dict):
            raise ValueError(f"{root / PIPELINE_FILE}: cinn must map layer names to folders, got {entries!r}")
        for layer, folder in entries.items():
            cinns[layer] = ConditionalINN.from_pretrained(sub(f"cinn.{layer}", entries={f"cinn.{layer}": folder}))
        concepts = FactorINN.from_pretrained(sub("concepts")) if info.get("concepts") else None
        pipe = cls(backbone, autoencoder, cinns, info, concepts=concepts)
        pipe.root = root
        return pipe.to(device)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the pipeline folder; it holds every model itself (an autoencoder loaded by reference to a sibling
        pipeline is copied in). An autoencoder unchanged since it was loaded is copied file by file when ``dtype``
        is None, so ``autoencoder_id`` stays the same."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory / "backbone", dtype=dtype)
        src = getattr(self.autoencoder, "_pipeline_dir", None)
        if dtype is None and src is not None and self._autoencoder_unchanged():
            dst = directory / "autoencoder"
            dst.mkdir(parents=True, exist_ok=True)
            if Path(src).resolve() != dst.resolve():
                for f in Path(src).iterdir():
                    if f.is_file():
                        shutil.copyfile(f, dst / f.name)
        else:
            self.autoencoder.save_pretrained(directory / "autoencoder", dtype=dtype)
        for layer, t in self.cinns.items():
            t.save_pretrained(directory / "cinn" / layer, dtype=dtype)
        info = dict(self.info)
        info.pop("concepts", None)
        if self.concepts is not None:
            self.concepts.save_pretrained(directory / "concepts", dtype=dtype)
            info["concepts"] = "concepts"
        info.update(
            backbone="backbone",
            backbone_source={"source": self.backbone.source, "arch": self.backbone.arch,
                             "weights": self.backbone.pretrained or "backbone/model.safetensors"},
            autoencoder="autoencoder",
            cinn={layer: f"cinn/{layer}" for layer in self.cinns},
            image_size=self.image_size,
            channels=self.channels,
        )
        (directory / PIPELINE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return directory

    def to(self, device: str | torch.device) -> "InvariancePipeline":
        self.backbone.to(device)
        self.autoencoder.to(device)
        for t in self.cinns.values():
            t.to(device)
        if self.concepts is not None:
            self.concepts.to(device)
        return self

    # --- properties -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def layers(self) -> list[str]:
        """Layers with a trained cINN, in network order."""
        return list(self.cinns)

    @property
    def image_size(self) -> int:
        return self.autoencoder.image_size

    @property
    def channels(self) -> int:
        return self.autoencoder.channels

    @property
    def class_names(self) -> list[str]:
        return self.backbone.class_names

    @property
    def autoencoder_id(self) -> str:
        """A stable id of the autoencoder's weights: the sha256 of its tensor data (``hub.weights_sha256``; for
        weights loaded from a file and unchanged since, the hash its safetensors header records). Two pipelines
        with the same id share one autoencoder, wherever they were loaded from: ``compare`` needs that."""
        return weights_sha256(self.autoencoder)

    def _autoencoder_unchanged(self) -> bool:
        loaded = getattr(self.autoencoder, "_loaded_weights", None)
        return loaded is not None and weights_sha256(self.autoencoder) == loaded["sha256"]

    def cinn(self, layer: str) -> ConditionalINN:
        """The conditional INN t of ``layer`` (``ValueError`` naming the pipeline's layers if it has none)."""
        if layer not in self.cinns:
            raise ValueError(f"no cINN for layer {layer!r}; this pipeline has {self.layers}")
        return self.cinns[layer]

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator().manual_seed(int(seed))

    # --- basic operations -------------------------------------------------------------
    def preprocess(self, images: ImageLike) -> torch.Tensor:
        """Images in any supported form -> (B, C, S, S) in [-1, 1] on the pipeline's device."""
        return to_batch(images, self.image_size, self.channels).to(self.device)

    @torch.no_grad()
    def predict(self, images: ImageLike) -> torch.Tensor:
        """Class probabilities (B, num_classes)."""
        return self.backbone(self.preprocess(images)).softmax(1)

    @torch.no_grad()
    def representation(self, images: ImageLike, layer: str) -> torch.Tensor:
        """z = Phi(x) at ``layer``."""
        return self.backbone.representation(self.preprocess(images), layer)

    @torch.no_grad()
    def encode(self, images: ImageLike) -> torch.Tensor:
        """Autoencoder latent z_bar = E(x) (posterior mean)."""
        return self.autoencoder.encode(self.preprocess(images)).mode()

    @torch.no_grad()
    def decode(self, zbar: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(zbar.to(self.device))

    @torch.no_grad()
    def reconstruct(self, images: ImageLike) -> torch.Tensor:
        """D(E(x)) = D(t^-1(t(z_bar | z) | z)): the plain autoencoder reconstruction."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def invariances(self, images: ImageLike, layer: str) -> torch.Tensor:
        """v = t(E(x) | Phi(x)): what the autoencoder sees of x that the layer does not."""
        x = self.preprocess(images)
        z = self.backbone.representation(x, layer)
        return self.cinn(layer)(self.autoencoder.encode(x).mode(), z)[0]

    # --- the paper's operations ---------------------------------------------------------
    @torch.no_grad()
    def sample_latents(
        self, images: ImageLike, layer: str, n: int = 8, temperature: float = 1.0, seed: int | None = None
    ) -> torch.Tensor:
        """z_bar = t^-1(v | Phi(x)) with v ~ N(0, temperature^2 I): (B, n, latent_dim)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x = self.preprocess(images)
        z = self.backbone.representation(x, layer)
        zbar = self.cinn(layer).sample(z, n, temperature, self._generator(seed))
        return zbar.view(x.shape[0], n, -1)

    @torch.no_grad()
    def sample_invariances(
        self, images: ImageLike, layer: str, n: int = 8, temperature: float = 1.0, seed: int | None = None
    ) -> torch.Tensor:
        """n images D(t^-1(v | Phi(x))) per input, v ~ N(0, temperature^2 I): (B, n, C, S, S) in [-1, 1].

        What stays fixed across the n samples is what the layer encodes; what varies is
        what it is invariant to.
        """
        zbar = self.sample_latents(images, layer, n, temperature, seed)
        b = zbar.shape[0]
        return self.decode(zbar.flatten(0, 1)).view(b, n, self.channels, self.image_size, self.image_size)

    @torch.no_grad()
    def mix(self, content: ImageLike, invariances: ImageLike, layer: str) -> torch.Tensor:
        """Decode the representation of ``content`` with the invariances of ``invariances``.

        D(t^-1(t(E(x_b) | Phi(x_b)) | Phi(x_a))); batches must have equal size (or one of them size 1).
        """
        xa, xb = self.preprocess(content), self.preprocess(invariances)
        if xa.shape[0] != xb.shape[0]:
            if xa.shape[0] == 1:
                xa = xa.expand(xb.shape[0], -1, -1, -1)
            elif xb.shape[0] == 1:
                xb = xb.expand(xa.shape[0], -1, -1, -1)
            else:
                raise ValueError(f"cannot mix batches of {xa.shape[0]} and {xb.shape[0]} images")
        v_b = self.cinn(layer)(self.autoencoder.encode(xb).mode(), self.backbone.representation(xb, layer))[0]
        return self.decode(self._invert(layer, v_b, self.backbone.representation(xa, layer)))

    def _invert(self, layer: str, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z_bar = t^-1(v | z) at ``layer``."""
        return self.cinn(layer).inverse(v, z)[0]

    @torch.no_grad()
    def variance_explained(
        self, images: ImageLike, layer: str, n: int = 32, temperature: float = 1.0, seed: int | None = 0
    ) -> torch.Tensor:
        """Share of z_bar's variance explained by v, per image: (B,), unclipped.

        sum_d Var_v[t^-1(v | z)_d] / sum_d Var_data[z_bar_d]: near 0 when z fixes the latent
        (the layer keeps everything), near 1 when z says nothing about it. The data
        variance is the one the autoencoder recorded after training; if it recorded none,
        the variance over the whole batch of samples is used (needs more than one image).

        Averaged over data, the true ratio is at most 1 (Var_data = E_z Var[z_bar | z] + Var_z E[z_bar | z]), but for
        one image it is not bounded: the n-sample variance is an estimate, and a representation unlike the training
        data (an out-of-domain input, a temperature above 1) can let the cINN spread wider than the data does. This
        method returns the ratio as estimated (means over images stay unbiased); the views (``interpret``,
        ``layer_sweep``) report it clipped to [0, 1] as ``variance_explained`` and unclipped as ``variance_ratio``,
        and the Space says when it clipped.
        """
        if n < 2:
            raise ValueError(f"need n >= 2 samples to estimate a variance, got {n}")
        share = self._variance_share(self.sample_latents(images, layer, n, temperature, seed))
        if share is None:
            raise ValueError("this autoencoder recorded no latent variance; pass a batch of >= 2 images")
        return share.float()

    def _variance_share(self, zbar: torch.Tensor) -> torch.Tensor | None:
        """The estimator behind ``variance_explained`` and the views: samples (B, n, D) -> (B,), or None when
        it cannot be estimated (fewer than 2 samples, or no recorded data variance and a single image).
        Divides in float64 (the float32 result of ``variance_explained`` is the same as a float32 division)."""
        total = float(self.autoencoder.latent_var)
        if total <= 0 and zbar.shape[0] >= 2:
            total = zbar.flatten(0, 1).var(dim=0, unbiased=True).sum().item()
        if zbar.shape[1] < 2 or total <= 0:
            return None
        return zbar.var(dim=1, unbiased=True).sum(-1).double() / total

    @torch.no_grad()
    def class_agreement(self, images: ImageLike, layer: str, n: int = 8, temperature: float = 1.0, seed: int | None = 0):
        """Share of samples D(t^-1(v | z)) that the classifier puts in the same class as x: (B,)."""
        x = self.preprocess(images)
        pred = self.backbone(x).argmax(1)
        samples = self.sample_invariances(x, layer, n, temperature, seed).flatten(0, 1)
        pred_s = self.backbone(samples).argmax(1).view(x.shape[0], n)
        return (pred_s == pred[:, None]).float().mean(1)

    # --- domain: what inputs the pipeline understands, and a measured out-of-domain check ---------
    @property
    def domain(self) -> str:
        """What inputs the pipeline understands, in plain words (``pipeline.json`` ``"domain"``; a generic
        sentence from the dataset name and image size if it has none)."""
        text = self.info.get("domain")
        if text:
            return str(text)
        return (f"images like the {self.info.get('dataset', 'training')} data it was trained on "
                f"({self.channels}x{self.image_size}px)")

    @property
    def ood(self) -> dict | None:
        """The out-of-domain calibration stored in ``pipeline.json`` ``"ood"`` (written by
        ``eval/ood_calibration.py``), or None when the pipeline has none."""
        ood = self.info.get("ood")
        return dict(ood) if isinstance(ood, dict) and "threshold" in ood else None

    @torch.no_grad()
    def domain_score(self, images: ImageLike, batch_size: int = 512) -> torch.Tensor:
        """Out-of-domain score per image: (B,) float, higher = farther from the training data.

        The autoencoder's reconstruction error: the mean over pixels of the per-pixel error norm
        sqrt(mean_c (x - D(E(x)))_c^2), on the [-1, 1] scale. The autoencoder was trained to reproduce the
        training images only, so inputs unlike them (photos for a digit model) come back blurred into something
        it knows. (Of the variants measured by ``eval/ood_calibration.py``'s author, mean squared error, max of
        pooled errors and the Mahalanobis distance of E(x), this one separated photos from test images best.)
        ``out_of_domain`` compares it with the threshold calibrated on the test split.
        """
        x = self.preprocess(images)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            err = (self.autoencoder.decode(self.autoencoder.encode(xb).mode()) - xb).pow(2).mean(1).sqrt()
            out.append(err.flatten(1).mean(1))
        return torch.cat(out).float()

    def out_of_domain(self, images: ImageLike, score: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bool: ``domain_score`` above the calibrated threshold (``pipeline.json`` ``"ood"``).

        Raises ``ValueError`` when the pipeline has no calibration (run ``eval/ood_calibration.py``).
        """
        ood = self.ood
        if ood is None:
            raise ValueError("this pipeline has no out-of-domain calibration; run eval/ood_calibration.py on it")
        if score is None:
            score = self.domain_score(images)
        return score > float(ood["threshold"])

    def random_pair_cosine(self, layer: str) -> float | None:
        """Mean cosine between the ``layer`` representations of random pairs of test images (``pipeline.json``
        ``"random_pair_cosine"``, written by ``eval/ood_calibration.py``): the reference for the re-encoding
        cosine of the views. None when not recorded."""
        ref = self.info.get("random_pair_cosine", {})
        value = ref.get("layers", {}).get(layer) if isinstance(ref, dict) else None
        return None if value is None else float(value)

    def _domain_check(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[float, bool | None]:
        """``domain_score`` of one image from its reconstruction (already computed by a view), and the verdict."""
        score = float((recon[:1] - x[:1]).pow(2).mean(1).sqrt().flatten(1).mean(1)[0])
        ood = self.ood
        return score, None if ood is None else score > float(ood["threshold"])

    @staticmethod
    def _clip_share(share: float | None) -> float | None:
        return None if share is None else min(max(share, 0.0), 1.0)

    @staticmethod
    def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of flattened representations, (N, ...) x (N or 1, ...) -> (N,)."""
        return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-12)

    # --- batched views: everything one UI request shows, one pass through each network ---------
    def _one_image(self, images: ImageLike, what: str) -> torch.Tensor:
        x = self.preprocess(images)
        if x.shape[0] != 1:
            raise ValueError(f"{what} takes one image, got a batch of {x.shape[0]}")
        return x

    def _codes(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One pass each: every cINN layer's representation plus the logits, and the latent mean E(x)."""
        feats = self.backbone.forward_layers(x, self.layers + [self.backbone.logits_layer])
        return feats, self.autoencoder.encode(x).mode()

    @torch.inference_mode()
    def interpret(self, image: ImageLike, layer: str, n: int = 16, temperature: float = 1.0, seed: int = 0) -> Interpretation:
        """One image at one layer: prediction, reconstruction, n samples D(t^-1(v | z)) (the same as
        ``sample_invariances(image, layer, n, temperature, seed)[0]``), their classes, variance explained
        and class agreement."""
        n, temperature, seed = _sampling(n, temperature, seed)
        x = self._one_image(image, "interpret")
        t = self.cinn(layer)
        logits_layer = self.backbone.logits_layer
        feats = self.backbone.forward_layers(x, [layer, logits_layer])
        probs = feats[logits_layer].softmax(1)[0]
        zbar = t.sample(feats[layer], n, temperature, self._generator(seed))
        dec = self.decode(torch.cat([self.autoencoder.encode(x).mode(), zbar]))
        recon, samples = dec[:1], dec[1:]
        fs = self.backbone.forward_layers(samples, [layer, logits_layer])
        sample_pred = fs[logits_layer].argmax(1)
        agreement = float((sample_pred == probs.argmax()).float().mean())
        share = self._variance_share(zbar[None])
        ratio = None if share is None else float(share[0])
        cos = self._cosine(fs[layer], feats[layer]).float()
        score, ood = self._domain_check(x, recon)
        return Interpretation(layer, x, probs, recon, samples, sample_pred, self._clip_share(ratio), agreement,
                              variance_ratio=ratio, reencode_cosine=float(cos.mean()), reencode_cosines=cos,
                              random_pair_cosine=self.random_pair_cosine(layer), domain_score=score, out_of_domain=ood)

    @torch.inference_mode()
    def layer_sweep(self, image: ImageLike, n: int = 8, temperature: float = 1.0, seed: int = 0) -> LayerSweep:
        """``interpret`` at every layer with the same v: sample j decodes the same invariances at each layer."""
        n, temperature, seed = _sampling(n, temperature, seed)
        x = self._one_image(image, "layer_sweep")
        layers = self.layers
        feats, zbar = self._codes(x)
        probs = feats[self.backbone.logits_layer].softmax(1)[0]
        zbars = [self.cinns[l].sample(feats[l], n, temperature, self._generator(seed)) for l in layers]
        dec = self.decode(torch.cat([zbar] + zbars))
        fs = self.backbone.forward_layers(dec[1:], layers + [self.backbone.logits_layer])
        preds = fs[self.backbone.logits_layer].argmax(1)
        cls = probs.argmax()
        out = LayerSweep(x, probs, dec[:1])
        out.domain_score, out.out_of_domain = self._domain_check(x, dec[:1])
        for i, l in enumerate(layers):
            rows = slice(i * n, (i + 1) * n)
            out.samples[l] = dec[1 + i * n : 1 + (i + 1) * n]
            out.sample_pred[l] = preds[rows]
            out.class_agreement[l] = float((out.sample_pred[l] == cls).float().mean())
            share = self._variance_share(zbars[i][None])
            out.variance_ratio[l] = None if share is None else float(share[0])
            out.variance_explained[l] = self._clip_share(out.variance_ratio[l])
            out.reencode_cosine[l] = float(self._cosine(fs[l][rows], feats[l]).mean())
            out.random_pair_cosine[l] = self.random_pair_cosine(l)
        return out

    @torch.inference_mode()
    def mix_layers(self, a: ImageLike, b: ImageLike) -> LayerMix:
        """``mix`` both ways at every layer: A's representation with B's invariances and B's with A's."""
        x = torch.cat([self._one_image(a, "mix_layers (image A)"), self._one_image(b, "mix_layers (image B)")])
        feats, zbar = self._codes(x)
        swapped = []
        for l in self.layers:
            v = self.cinns[l](zbar, feats[l])[0]
            swapped.append(self._invert(l, v.flip(0), feats[l]))  # row 0: z_A with v_B; row 1: z_B with v_A
        dec = self.decode(torch.cat([zbar] + swapped))
        preds = self.backbone(dec[2:]).argmax(1).tolist()
        out = LayerMix(x, dec[:2], feats[self.backbone.logits_layer].argmax(1))
        for i, l in enumerate(self.layers):
            out.a_with_b[l], out.b_with_a[l] = dec[2 + 2 * i : 3 + 2 * i], dec[3 + 2 * i : 4 + 2 * i]
            out.pred_a_with_b[l], out.pred_b_with_a[l] = preds[2 * i], preds[2 * i + 1]
        return out

    @torch.inference_mode()
    def attack(self, image: ImageLike, eps: float = 0.1, seed: int = 0, n: int = 8, temperature: float = 1.0) -> Attack:
        """FGSM (``attacks.fgsm``) and seeded random sign noise of the same ``eps`` (on the [-1, 1] scale), and
        what each layer sees of them: D(t^-1(v_orig | Phi_L(.))) with the original image's invariances; plus, per
        layer, ``n`` samples v ~ N(0, temperature^2 I) (seeded with ``seed``) decoded with the clean image's z and
        with the FGSM image's z (the same v in both grids; ``n=0``: no grids)."""
        try:
            eps, seed = float(eps), int(seed)
            n, temperature = int(n), float(temperature)
        except (TypeError, ValueError):
            raise ValueError("eps, seed, samples and temperature must be numbers") from None
        if n < 0 or not (0.0 <= temperature < math.inf):
            raise ValueError(f"samples must be >= 0 and temperature a finite number >= 0, got {n} and {temperature}")
        if not (0.0 <= eps <= 2.0):
            raise ValueError(f"eps must be between 0 and 2 (images are in [-1, 1]), got {eps}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        x = self._one_image(image, "attack")
        xs = torch.cat([x, fgsm(self.backbone, x, eps), sign_noise(x, eps, seed)])
        feats, zbar = self._codes(xs)
        seen, grids = [], []
        for l in self.layers:
            v_orig = self.cinns[l](zbar[:1], feats[l][:1])[0]
            seen.append(self._invert(l, v_orig.expand(3, -1), feats[l]))
            if n:
                # drawn as ConditionalINN.sample draws them: the clean grid is interpret(image, l, n, T, seed)'s samples
                v = temperature * torch.randn(n, self.autoencoder.latent_dim, generator=self._generator(seed)).to(zbar)
                grids.append(self._invert(l, v.repeat(2, 1), feats[l][:2].repeat_interleave(n, 0)))
        dec = self.decode(torch.cat([zbar] + seen + grids))
        preds = self.backbone(dec).argmax(1).tolist()
        out = Attack(eps, xs, feats[self.backbone.logits_layer].softmax(1), dec[:3], preds[:3])
        out.domain_score, out.out_of_domain = self._domain_check(xs, dec[:1])
        g0 = 3 + 3 * len(self.layers)
        for i, l in enumerate(self.layers):
            out.seen[l] = dec[3 + 3 * i : 6 + 3 * i]
            out.seen_pred[l] = preds[3 + 3 * i : 6 + 3 * i]
            if n:
                a = g0 + 2 * n * i
                out.samples_clean[l], out.samples_attacked[l] = dec[a : a + n], dec[a + n : a + 2 * n]
                out.sample_pred_clean[l], out.sample_pred_attacked[l] = preds[a : a + n], preds[a + n : a + 2 * n]
        return out

    @torch.inference_mode()
    def compare(self, other: "InvariancePipeline", image: ImageLike, layer: str, other_layer: str | None = None,
                n: int = 16, seed: int = 0, temperature: float = 1.0) -> Comparison:
        """One image through two pipelines that share one autoencoder: the same n samples v ~ N(0, T^2 I) (seeded
        with ``seed``) decoded with this network's representation at ``layer`` and with the other's at
        ``other_layer`` (default: ``layer``): D(t_A^-1(v | z_A)) beside D(t_B^-1(v | z_B)). Side A's samples are
        ``interpret(image, layer, n, temperature, seed)``'s. Each network classifies x and its own samples; each
        side's variance explained by v is the measure ``interpret`` reports. The two networks may take other input
        sizes and normalisations (their backbones resize and normalise the shared images themselves).

        ``ValueError`` when the autoencoders differ (``autoencoder_id``): the same v means the same image only
        through one decoder."""
        if not isinstance(other, InvariancePipeline):
            raise TypeError(f"compare needs another InvariancePipeline, got {type(other).__name__}")
        n, temperature, seed = _sampling(n, temperature, seed)
        other_layer = layer if other_layer is None else other_layer
        if self.autoencoder_id != other.autoencoder_id:
            raise ValueError(f"the two pipelines do not share an autoencoder (autoencoder_id {self.autoencoder_id[:12]} "
                             f"vs {other.autoencoder_id[:12]}): compare decodes one v with both, so they need the same one")
        t_a, t_b = self.cinn(layer), other.cinn(other_layer)
        x = self._one_image(image, "compare")
        # drawn as ConditionalINN.sample draws them, so side A is interpret(image, layer, n, temperature, seed)
        v = temperature * torch.randn(n, self.autoencoder.latent_dim, generator=self._generator(seed))
        zbars, views = [], []
        for pipe, t, l in ((self, t_a, layer), (other, t_b, other_layer)):
            xp = x.to(pipe.device)
            feats = pipe.backbone.forward_layers(xp, [l, pipe.backbone.logits_layer])
            t._check_cond(feats[l])
            cond = t.embed(feats[l]).repeat_interleave(n, dim=0)  # embedded once, as ConditionalINN.sample does
            zbars.append(t.flow.inverse(v.to(xp), cond)[0].to(self.device))
            views.append(feats[pipe.backbone.logits_layer].softmax(1)[0])
        dec = self.decode(torch.cat([self.autoencoder.encode(x).mode()] + zbars))
        sides = []
        for i, (pipe, l) in enumerate(((self, layer), (other, other_layer))):
            samples = dec[1 + i * n : 1 + (i + 1) * n]
            pred = pipe.backbone(samples.to(pipe.device)).argmax(1).cpu()
            probs = views[i]
            c = int(probs.argmax())
            share = pipe._variance_share(zbars[i][None])
            ratio = None if share is None else float(share[0])
            names = pipe.class_names
            sides.append(CompareSide(pipe.backbone.arch, l, probs, names[c] if 0 <= c < len(names) else str(c),
                                     float(probs[c]), samples, pred, float((pred == c).float().mean()),
                                     self._clip_share(ratio), ratio))
        return Comparison(x, dec[:1], v, sides[0], sides[1], self.autoencoder_id)

    # --- concepts (the interpretation INN e; see invint_hub.concepts) ---------------------
    @property
    def concept_names(self) -> list[str]:
        """Names of the concept factors of e (residual excluded); [] without a concept model."""
        return self.concepts.concept_names if self.concepts is not None else []

    def transfer(self, target: ImageLike, source: ImageLike, concept, amount: float = 1.0) -> torch.Tensor:
        """The target image with ``concept`` (name, index or list) taken from the source: (B, C, S, S) in [-1, 1].

        D(e^-1(e(E(target)) with factor c <- e_c(target) + amount (e_c(source) - e_c(target)))); amount 1 = full
        transfer, 0 = the target's reconstruction. Batches of equal size, or one of them a single image.
        """
        return _concepts.transfer(self, target, source, concept, amount)

    def edit(self, image: ImageLike, concept, amount: float, direction: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        """Walk ``amount`` prior standard deviations along one concept (a seeded random direction inside the factor
        unless ``direction`` is given): (B, C, S, S) in [-1, 1]."""
        return _concepts.edit(self, image, concept, amount, direction, seed)

    def edit_many(self, image: ImageLike, amounts: dict, seed: int = 0) -> torch.Tensor:
        """Move several concepts at once, ``{concept: amount}`` (one slider per concept): (B, C, S, S) in [-1, 1]."""
        return _concepts.edit_many(self, image, amounts, seed)

    def concept_variance_explained(self, layer: str, images: ImageLike | None = None, n: int = 16, seed: int | None = 0) -> dict[str, float]:
        """Share of each concept's variance (and the residual's) that z = Phi(x) at ``layer`` explains (ECCV Fig. 4).

        ``images`` default: samples of the pipeline's own generative model D(e^-1(eps)); pass test images for a report.
        """
        return _concepts.concept_variance_explained(self, layer, images, n, seed)

    def __repr__(self) -> str:
        return (
            f"InvariancePipeline(backbone={self.backbone.arch}, dataset={self.info.get('dataset')}, "
            f"image={self.channels}x{self.image_size}px, latent={self.autoencoder.latent_dim}, layers={self.layers}"
            + (f", concepts={self.concept_names}" if self.concepts is not None else "") + ")"
        )
