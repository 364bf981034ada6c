"""Baselines the report compares the cINN with.

``InverseDecoder``  deterministic inversion of a layer (Dosovitskiy & Brox style): z = Phi(x) -> x,
                    trained with an L1 pixel loss plus a feature loss on the classifier's conv features.
                    It has the cINN's embedder for z and the autoencoder's decoder architecture
                    (warm-started from D by default), so the only difference to the cINN route
                    D(t^-1(v|z)) is that it is deterministic: it must average over everything z
                    is invariant to.
``train_iin``       the IIN paper's generative model: an unconditional INN T on autoencoder
                    posterior samples, trained with the NLL; samples are D(T^-1(eps)).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from invint_hub.autoencoder import Autoencoder, FeaturePerceptualLoss
from invint_hub.backbones import Backbone
from invint_hub.cinn import INN
from invint_hub.embedders import make_embedder
from invint_hub.hub import HUB_KWARGS, HubMixin


def _lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))


def _check_images(images: torch.Tensor, channels: int, size: int) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(f"expected training images of shape (N, {channels}, {size}, {size}), got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 training images, got {images.shape[0]}")


# ---------------------------------------------------------------------------------------
# deterministic inverse (Dosovitskiy & Brox)
# ---------------------------------------------------------------------------------------
class InverseDecoder(nn.Module, HubMixin, **HUB_KWARGS):
    """z = Phi(x) -> image, deterministically.

    Args:
        cond_shape: representation shape without batch, ``[C]`` or ``[C, H, W]``.
        image_size, channels, latent_dim, width, n_down, max_mult: the autoencoder's
            architecture (the decoder part is rebuilt with these).
        embedder_depth: layers of the dense embedder for flat z.
        embedder_width: first conv width of the conv embedder for spatial z.
        layer: the backbone layer this decoder inverts (metadata).
    """

    def __init__(
        self,
        cond_shape: list[int] | tuple[int, ...] = (10,),
        image_size: int = 32,
        channels: int = 1,
        latent_dim: int = 64,
        width: int = 32,
        n_down: int = 3,
        max_mult: int = 4,
        embedder_depth: int = 3,
        embedder_width: int = 32,
        layer: str | None = None,
    ):
        super().__init__()
        self.cond_shape, self.layer = tuple(int(c) for c in cond_shape), layer
        self.image_size, self.channels = image_size, channels
        self.embedder = make_embedder(self.cond_shape, latent_dim, embedder_depth, None, embedder_width)
        ae = Autoencoder(image_size, channels, latent_dim, width, n_down, max_mult)
        self.from_latent, self.decoder = ae.from_latent, ae.decoder
        self._top, self._bottom = ae._top, ae.bottom

    @classmethod
    def for_pipeline(cls, backbone: Backbone, autoencoder: Autoencoder, layer: str, init_from_autoencoder: bool = True, **kwargs):
        """A decoder for ``layer`` with the autoencoder's decoder architecture (and weights, by default)."""
        backbone.check_layer(layer)
        cfg = dict(getattr(autoencoder, "_hub_mixin_config", {}) or {})
        arch = {k: cfg[k] for k in ("width", "n_down", "max_mult") if k in cfg}
        model = cls(
            cond_shape=list(backbone.feature_shapes[layer]), image_size=autoencoder.image_size,
            channels=autoencoder.channels, latent_dim=autoencoder.latent_dim, layer=layer, **arch, **kwargs,
        )
        if init_from_autoencoder:
            model.from_latent.load_state_dict(autoencoder.from_latent.state_dict(), strict=True)
            model.decoder.load_state_dict(autoencoder.decoder.state_dict(), strict=True)
        return model

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        if z[0].numel() != math.prod(self.cond_shape):
            raise ValueError(f"expected representations of shape (B, {list(self.cond_shape)}), got {tuple(z.shape)}")
        if len(self.cond_shape) == 3 and self.cond_shape[1] * self.cond_shape[2] > 1:
            z = z.reshape(z.shape[0], *self.cond_shape)
        return self.embedder(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Representations -> images (B, C, S, S) in [-1, 1]."""
        h = self.from_latent(self.embed(z)).view(-1, self._top, self._bottom, self._bottom)
        return self.decoder(h)


def feature_layers_for(backbone: Backbone, layers: list[str] | None = None) -> list[str]:
    """The layers of the feature loss: given ones, else the first three spatial layers (as the autoencoder's default)."""
    if layers:
        for layer in layers:
            backbone.check_layer(layer)
        return list(layers)
    spatial = [name for name in backbone.layers if len(backbone.feature_shapes[name]) == 3]
    return spatial[:3] or [backbone.layers[0]]


def train_inverse_decoder(
    backbone: Backbone,
    autoencoder: Autoencoder,
    layer: str,
    images: torch.Tensor,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    feature_weight: float = 1.0,
    feature_layers: list[str] | None = None,
    init_from_autoencoder: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[InverseDecoder, dict]:
    """Fit an ``InverseDecoder`` for ``layer`` on ``images`` ((N, C, S, S) in [-1, 1]).

    Loss: mean |x - x_hat| + ``feature_weight`` * normalised feature distance at
    ``feature_layers`` of the (frozen) backbone. AdamW (betas 0.5, 0.9), cosine schedule,
    gradient clipping at 10. Returns the model (eval mode) and a training summary.
    """
    _check_images(images, autoencoder.channels, autoencoder.image_size)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    backbone = backbone.eval().requires_grad_(False).to(device)
    layers = feature_layers_for(backbone, feature_layers)
    perceptual = FeaturePerceptualLoss(lambda x: list(backbone.forward_layers(x, layers).values()))
    torch.manual_seed(seed)
    model = InverseDecoder.for_pipeline(backbone, autoencoder, layer, init_from_autoencoder).to(device)
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    with torch.no_grad():  # data-dependent ActNorm initialisation of the embedder
        x0 = images[torch.randperm(n, generator=g)[: max(batch_size, 256)]].to(device)
        model.train()
        model(backbone.representation(x0, layer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    t0, tail = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        x = images[torch.randint(0, n, (batch_size,), generator=g)].to(device)
        with torch.no_grad():
            z = backbone.representation(x, layer)
        xr = model(z)
        l1 = (x - xr).abs().flatten(1).mean(1)
        loss = (l1 + feature_weight * perceptual(x, xr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if step >= steps - max(steps // 10, 1):
            tail.append((loss.item(), l1.mean().item()))
    model.eval()
    summary = {
        "layer": layer, "steps": steps, "batch_size": batch_size, "lr": lr, "train_images": n,
        "feature_layers": layers, "feature_weight": feature_weight, "init_from_autoencoder": init_from_autoencoder,
        "final_loss": sum(t[0] for t in tail) / len(tail), "final_l1": sum(t[1] for t in tail) / len(tail),
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 1),
    }
    return model, summary


@torch.no_grad()
def invert(backbone: Backbone, decoder: InverseDecoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """x_hat = decoder(Phi(x)) for a batch of images, on the decoder's device; returns CPU images."""
    device = next(decoder.parameters()).device
    out = []
    for x in images.split(batch_size):
        out.append(decoder(backbone.representation(x.to(device), decoder.layer)).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# autoencoder + unconditional INN (IIN)
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def posterior_params(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of q(z_bar | x) for every image (CPU tensors)."""
    device = next(autoencoder.parameters()).device
    means, stds = [], []
    for x in images.split(batch_size):
        q = autoencoder.encode(x.to(device))
        means.append(q.mean.cpu())
        stds.append(q.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_iin(
    autoencoder: Autoencoder,
    images: torch.Tensor,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 5e-4,
    n_flows: int = 8,
    hidden: int = 256,
    depth: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    test_images: torch.Tensor | None = None,
) -> tuple[INN, dict]:
    """Train T: z_bar -> e ~ N(0, I) on posterior samples z_bar ~ q(z_bar | x) of the frozen autoencoder.

    Loss: mean(0.5 ||T(z_bar)||^2 - log|det J_T|), the NLL without its constant (as the paper).
    The IIN paper's T is 12 flows of width 512, depth 2 (``n_flows=12, hidden=512, depth=2``).
    """
    _check_images(images, autoencoder.channels, autoencoder.image_size)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    autoencoder = autoencoder.eval().to(device)
    mean, std = posterior_params(autoencoder, images)
    dim = mean.shape[1]
    torch.manual_seed(seed)
    inn = INN(dim=dim, n_flows=n_flows, hidden=hidden, depth=depth, seed=seed).to(device)
    g = torch.Generator().manual_seed(seed)
    n = mean.shape[0]

    def draw(idx: torch.Tensor) -> torch.Tensor:
        return (mean[idx] + std[idx] * torch.randn(len(idx), dim, generator=g)).to(device)

    inn.train()
    with torch.no_grad():  # data-dependent ActNorm initialisation on a large batch
        inn(draw(torch.randperm(n, generator=g)[: max(batch_size, 512)]))
    opt = torch.optim.AdamW(inn.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    t0, tail = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        e, logdet = inn(draw(torch.randint(0, n, (batch_size,), generator=g)))
        loss = (0.5 * e.pow(2).sum(1) - logdet).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(inn.parameters(), 10.0)
        opt.step()
        if step >= steps - max(steps // 10, 1):
            tail.append(loss.item())
    inn.eval()
    const = 0.5 * dim * math.log(2 * math.pi)
    summary = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "n_flows": n_flows, "hidden": hidden, "depth": depth,
        "train_images": n, "latent_dim": dim, "parameters": sum(p.numel() for p in inn.parameters()),
        "final_train_nll_bits_per_dim": (sum(tail) / len(tail) + const) / (dim * math.log(2)),
        "seconds": round(time.time() - t0, 1),
    }
    if test_images is not None:
        tm, ts = posterior_params(autoencoder, test_images)
        gt = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            zt = (tm + ts * torch.randn(tm.shape, generator=gt)).to(device)
            nll = torch.cat([inn.nll(z) for z in zt.split(1000)]).mean().item()
        summary["test_nll_bits_per_dim"] = nll / (dim * math.log(2))
    return inn, summary


@torch.no_grad()
def sample_iin(autoencoder: Autoencoder, inn: INN, n: int, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """n images D(T^-1(eps)), eps ~ N(0, I) (CPU tensor)."""
    g = torch.Generator().manual_seed(int(seed))
    device = next(autoencoder.parameters()).device
    out = []
    for i in range(0, n, batch_size):
        eps = torch.randn(min(batch_size, n - i), inn.dim, generator=g).to(device)
        out.append(autoencoder.decode(inn.inverse(eps)[0]).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_prior(autoencoder: Autoencoder, n: int, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """n images D(eps), eps ~ N(0, I): the autoencoder used as a generator without the INN (CPU tensor)."""
    g = torch.Generator().manual_seed(int(seed))
    device = next(autoencoder.parameters()).device
    out = []
    for i in range(0, n, batch_size):
        eps = torch.randn(min(batch_size, n - i), autoencoder.latent_dim, generator=g).to(device)
        out.append(autoencoder.decode(eps).cpu())
    return torch.cat(out)


__all__ = [
    "InverseDecoder",
    "feature_layers_for",
    "train_inverse_decoder",
    "invert",
    "posterior_params",
    "train_iin",
    "sample_iin",
    "sample_prior",
]
