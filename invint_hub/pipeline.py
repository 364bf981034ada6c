"""``InvariancePipeline``: backbone f = Psi o Phi + autoencoder (E, D) + one cINN t per layer.

Repository layout (local folder or Hub repo)::

    pipeline.json            # dataset, image domain, layers
    README.md                # pipeline card
    backbone/                # config.json + model.safetensors (+ README.md)
    autoencoder/
    cinn/<layer>/            # one conditional INN per layer
    concepts/                # optional: the concept INN e (listed as "concepts" in pipeline.json)

``InvariancePipeline.from_pretrained()`` with no argument loads the embedded MNIST pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .autoencoder import Autoencoder
from .backbones import Backbone
from .cinn import ConditionalINN
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


def embedded_pipelines() -> list[str]:
    """Names of the pipelines shipped in the package, the default (``mnist``) first."""
    names = sorted(d.name for d in PRETRAINED_DIR.glob("*") if (d / PIPELINE_FILE).is_file())
    return sorted(names, key=lambda n: n != DEFAULT_PIPELINE)


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
            backbone._check_layer(layer)
            if t.latent_dim != autoencoder.latent_dim:
                raise ValueError(f"cINN for {layer} expects latent {t.latent_dim}, autoencoder has {autoencoder.latent_dim}")
        if concepts is not None and concepts.dim != autoencoder.latent_dim:
            raise ValueError(f"concept INN expects latent {concepts.dim}, autoencoder has {autoencoder.latent_dim}")
        self.concepts = concepts.eval() if concepts is not None else None
        self.backbone = backbone.eval()
        self.autoencoder = autoencoder.eval()
        self.cinns = {k: cinns[k].eval() for k in backbone.layers if k in cinns}  # network order
        self.info = dict(info or {})

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, device: str | torch.device = "cpu", **hub_kwargs):
        """Load the embedded default (no argument), an embedded name, a local folder or a Hub repo id."""
        root = resolve_pipeline_dir(name_or_path, **hub_kwargs)
        info = json.loads((root / PIPELINE_FILE).read_text())
        backbone = Backbone.from_pretrained(root / info.get("backbone", "backbone"))
        autoencoder = Autoencoder.from_pretrained(root / info.get("autoencoder", "autoencoder"))
        cinns = {}
        for layer, sub in info.get("cinn", {}).items():
            cinns[layer] = ConditionalINN.from_pretrained(root / sub)
        concepts = FactorINN.from_pretrained(root / info["concepts"]) if info.get("concepts") else None
        pipe = cls(backbone, autoencoder, cinns, info, concepts=concepts)
        pipe.root = root
        return pipe.to(device)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        directory = Path(directory)
        self.backbone.save_pretrained(directory / "backbone", dtype=dtype)
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

    def _cinn(self, layer: str) -> ConditionalINN:
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
        return self._cinn(layer)(self.autoencoder.encode(x).mode(), z)[0]

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
        zbar = self._cinn(layer).sample(z, n, temperature, self._generator(seed))
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
        t = self._cinn(layer)
        v_b = t(self.autoencoder.encode(xb).mode(), self.backbone.representation(xb, layer))[0]
        return self.decode(t.inverse(v_b, self.backbone.representation(xa, layer))[0])

    @torch.no_grad()
    def variance_explained(
        self, images: ImageLike, layer: str, n: int = 32, temperature: float = 1.0, seed: int | None = 0
    ) -> torch.Tensor:
        """Share of z_bar's variance explained by v, per image: (B,) in [0, 1] (ideally).

        sum_d Var_v[t^-1(v | z)_d] / sum_d Var_data[z_bar_d]: near 0 when z fixes the latent
        (the layer keeps everything), near 1 when z says nothing about it. The data
        variance is the one the autoencoder recorded after training; if it recorded none,
        the variance over the whole batch of samples is used (needs more than one image).
        """
        if n < 2:
            raise ValueError(f"need n >= 2 samples to estimate a variance, got {n}")
        zbar = self.sample_latents(images, layer, n, temperature, seed)  # (B, n, D)
        within = zbar.var(dim=1, unbiased=True).sum(-1)
        total = float(self.autoencoder.latent_var)
        if total <= 0:
            if zbar.shape[0] < 2:
                raise ValueError("this autoencoder recorded no latent variance; pass a batch of >= 2 images")
            total = zbar.flatten(0, 1).var(dim=0, unbiased=True).sum().item()
        return within / total

    @torch.no_grad()
    def class_agreement(self, images: ImageLike, layer: str, n: int = 8, temperature: float = 1.0, seed: int | None = 0):
        """Share of samples D(t^-1(v | z)) that the classifier puts in the same class as x: (B,)."""
        x = self.preprocess(images)
        pred = self.backbone(x).argmax(1)
        samples = self.sample_invariances(x, layer, n, temperature, seed).flatten(0, 1)
        pred_s = self.backbone(samples).argmax(1).view(x.shape[0], n)
        return (pred_s == pred[:, None]).float().mean(1)

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
