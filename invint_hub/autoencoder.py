"""Autoencoder (E, D) with a diagonal-Gaussian posterior, and its training losses.

Images live in [-1, 1], shape (B, C, S, S) with S a power of two (32 for MNIST-like
data with latent 64; 64-128 px with latent 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hub import HubMixin, HUB_KWARGS


class DiagonalGaussian:
    """Posterior q(z_bar | x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, params: torch.Tensor):
        self.mean, logvar = params.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 10.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device if generator is None else generator.device)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=1)


def _norm(c: int) -> nn.Module:
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)


class ResBlock(nn.Module):
    """x + conv3x3(SiLU(norm(conv3x3(SiLU(norm(x)))))), the last conv zero-initialised (starts as the identity)."""

    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
        nn.init.zeros_(self.block[-1].weight)
        nn.init.zeros_(self.block[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Autoencoder(nn.Module, HubMixin, **HUB_KWARGS):
    """Conv encoder -> diagonal Gaussian over a ``latent_dim`` vector -> conv decoder (tanh output).

    Args:
        image_size: side of the (square) input images, a power of two >= 8.
        channels: image channels (1 for MNIST-like, 3 for RGB).
        latent_dim: size of z_bar (64 for 28-32 px, 128 for 64-128 px).
        width: channels of the first conv; doubles at each downsampling, capped at ``max_mult * width``.
        n_down: number of stride-2 stages (feature map side = image_size / 2**n_down).
        res_blocks: residual 3x3 conv blocks after every encoder stage and before every decoder stage (0 = the
            plain strided encoder/decoder; more capacity at the same latent size).

    The buffer ``latent_var`` holds the total variance of z_bar over the training data,
    measured after training (to express the variance of samples as a share); 0 = unknown.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        latent_dim: int = 64,
        width: int = 32,
        n_down: int = 3,
        max_mult: int = 4,
        res_blocks: int = 0,
    ):
        super().__init__()
        if image_size % (2**n_down) != 0 or image_size // (2**n_down) < 1:
            raise ValueError(f"image_size {image_size} must be divisible by 2**n_down = {2**n_down}")
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.register_buffer("latent_var", torch.tensor(0.0))
        # every stage halves the resolution with a 4x4 stride-2 conv (cheap on a CPU: no full-resolution layers)
        widths = [min(width * 2**i, max_mult * width) for i in range(n_down)]
        self.bottom = image_size // 2**n_down
        self.res_blocks = res_blocks
        enc: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, stride=2, padding=1), nn.SiLU()]
        enc += [ResBlock(widths[0]) for _ in range(res_blocks)]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.Conv2d(a, b, 4, stride=2, padding=1), _norm(b), nn.SiLU()]
            enc += [ResBlock(b) for _ in range(res_blocks)]
        self.encoder = nn.Sequential(*enc)
        flat = widths[-1] * self.bottom**2
        self.to_params = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
            dec += [ResBlock(a) for _ in range(res_blocks)]
            dec += [_norm(a), nn.SiLU(), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        dec += [ResBlock(widths[0]) for _ in range(res_blocks)]
        dec += [_norm(widths[0]), nn.SiLU(), nn.ConvTranspose2d(widths[0], channels, 4, stride=2, padding=1), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        self._top = widths[-1]

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.dim() != 4 or x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, {self.channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.to_params(self.encoder(x).flatten(1)))

    def decode(self, zbar: torch.Tensor) -> torch.Tensor:
        if zbar.dim() != 2 or zbar.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents of shape (B, {self.latent_dim}), got {tuple(zbar.shape)}")
        h = self.from_latent(zbar).view(-1, self._top, self.bottom, self.bottom)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, sample: bool = True):
        posterior = self.encode(x)
        zbar = posterior.sample() if sample else posterior.mode()
        return self.decode(zbar), posterior


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (3 strided conv layers) for the optional adversarial loss."""

    def __init__(self, channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, n_layers):
            c_out = width * min(2**i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FeaturePerceptualLoss(nn.Module):
    """Distance between normalised feature maps of a frozen network (LPIPS without learned heads).

    ``features(x)`` must return a list of feature tensors. Used with the project's own
    classifier when LPIPS backbone weights are not available.
    """

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(x.shape[0])
        for fx, fy in zip(self.features(x), self.features(y)):
            fx = fx / (fx.flatten(1).norm(dim=1).view(-1, *[1] * (fx.dim() - 1)) + 1e-8)
            fy = fy / (fy.flatten(1).norm(dim=1).view(-1, *[1] * (fy.dim() - 1)) + 1e-8)
            loss = loss + (fx - fy).pow(2).flatten(1).sum(1)
        return loss


def lpips_loss(weights_path: str, net: str = "alex") -> nn.Module:
    """LPIPS with its backbone loaded from a local torchvision state dict (never downloaded)."""
    import lpips  # optional dependency

    from .backbones import load_local_state_dict

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = load_local_state_dict(weights_path)
    tv = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
    import torchvision

    ref = getattr(torchvision.models, tv)(weights=None)
    ref.load_state_dict(state, strict=True)
    # lpips' backbone slices hold references to the torchvision feature modules' layers
    feats = ref.features
    for slice_ in [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]:
        for name, module in slice_.named_children():
            module.load_state_dict(feats[int(name)].state_dict())
    model.eval().requires_grad_(False)
    return _LPIPSWrapper(model)


class _LPIPSWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        return self.model(x, y).flatten(1).sum(1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """||grad rec|| / ||grad g|| at the decoder's last layer (Esser et al.), clamped."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def recolor_invariance(sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """Scale-free change of latent codes between two paintings of one image: mean ||s_a - s_b||^2 over the batch
    divided by twice the summed variance of the pooled codes (0 = unchanged; 1 = as far apart as two random images).

    Dividing by the codes' own spread keeps the encoder from meeting the term by shrinking them.
    """
    pooled = torch.cat([sa, sb])
    return (sa - sb).pow(2).sum(1).mean() / (2 * pooled.var(0).sum() + 1e-6)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "Autoencoder",
    "DiagonalGaussian",
    "PatchDiscriminator",
    "FeaturePerceptualLoss",
    "lpips_loss",
    "hinge_d_loss",
    "adaptive_weight",
    "psnr",
    "recolor_invariance",
    "param_count",
]
