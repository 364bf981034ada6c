"""The conditional INN t of the paper, z_bar <-> v given the representation z, and the unconditional INN.

    v, logdet    = t(z_bar, z)           # invariances of the layer (trained to be N(0, I))
    z_bar, _     = t.inverse(v, z)       # any v ~ N(0, I) decodes to an image with representation z
    z_bars       = t.sample(z, n=16)     # n latents per representation (a tensor)

Both directions return (output, logdet), as every invertible module here. The representation z
(flat (B, C) or spatial (B, C, H, W)) is first mapped to a conditioning vector by an embedder
(``embedders.py``) that is trained jointly with the flow.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .embedders import make_embedder
from .flows import Flow, standard_normal_nll
from .hub import HUB_KWARGS, HubMixin


class ConditionalINN(nn.Module, HubMixin, **HUB_KWARGS):
    """The paper's t: z_bar (autoencoder latent) -> v (invariances), conditioned on z = Phi(x).

    Args:
        latent_dim: size of the autoencoder latent z_bar (paper: 128).
        cond_shape: shape of the representation z without batch: ``[C]``, tokens ``[N, C]`` or ``[C, H, W]``.
        embed_dim: size of the conditioning embedding fed to every coupling (paper: 128).
        n_flows: number of ActNorm/coupling/shuffle blocks (paper: 20).
        hidden: width of the coupling subnets s and t (paper: 1024).
        depth: hidden depth of the subnets (paper: 2).
        embedder_depth: layers of the dense embedder for flat z (paper: 4 for fc layers).
        embedder_down: strided convs of the conv embedder for spatial z (paper: 1-5;
            ``None`` = until the map is at most 4x4).
        embedder_width: channels of the first conv of the conv embedder (paper: 64).
        seed: seed of the fixed permutations.
        layer: name of the backbone layer this model was trained for (metadata).
    """

    def __init__(
        self,
        latent_dim: int = 128,
        cond_shape: list[int] | tuple[int, ...] = (128,),
        embed_dim: int = 128,
        n_flows: int = 20,
        hidden: int = 1024,
        depth: int = 2,
        embedder_depth: int = 4,
        embedder_down: int | None = None,
        embedder_width: int = 64,
        seed: int = 0,
        layer: str | None = None,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.cond_shape = cond_shape = tuple(int(c) for c in cond_shape)
        self.layer = layer
        self.embedder = make_embedder(cond_shape, embed_dim, embedder_depth, embedder_down, embedder_width)
        self.flow = Flow(latent_dim, embed_dim, n_flows, hidden, depth, seed=seed)

    def _check(self, zbar: torch.Tensor, z: torch.Tensor) -> None:
        if zbar.dim() != 2 or zbar.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents of shape (B, {self.latent_dim}), got {tuple(zbar.shape)}")
        self._check_cond(z)
        if z.shape[0] != zbar.shape[0]:
            raise ValueError(f"batch sizes differ: latents {zbar.shape[0]}, representations {z.shape[0]}")

    def _check_cond(self, z: torch.Tensor) -> None:
        if tuple(z.shape[1:]) != self.cond_shape and (z.dim() < 2 or z[0].numel() != math.prod(self.cond_shape)):
            raise ValueError(f"expected representations of shape (B, {list(self.cond_shape)}), got {tuple(z.shape)}")

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Representations (B, *cond_shape) (or flattened) -> conditioning vectors (B, embed_dim)."""
        if z.dim() == 2 and len(self.cond_shape) > 1:
            z = z.view(z.shape[0], *self.cond_shape)
        return self.embedder(z)

    def forward(self, zbar: torch.Tensor, z: torch.Tensor):
        """z_bar, z -> (v, logdet)."""
        self._check(zbar, z)
        return self.flow(zbar, self.embed(z))

    def inverse(self, v: torch.Tensor, z: torch.Tensor):
        """v, z -> (z_bar, logdet of the inverse) (= minus the forward logdet at z_bar)."""
        self._check(v, z)
        return self.flow.inverse(v, self.embed(z))

    def nll(self, zbar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood (nats) of z_bar given z: the training loss."""
        v, logdet = self(zbar, z)
        return standard_normal_nll(v, logdet)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        n: int = 1,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` latents z_bar = t^-1(v | z) per representation, v ~ N(0, temperature^2 I).

        Returns (B * n, latent_dim), ordered as ``n`` samples of the first representation,
        then ``n`` of the second, and so on.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self._check_cond(z)
        param = next(self.parameters())
        device = generator.device if generator is not None else param.device
        v = torch.randn(z.shape[0] * n, self.latent_dim, generator=generator, device=device).to(param.device, param.dtype)
        cond = self.embed(z).repeat_interleave(n, dim=0)  # each representation embedded once
        return self.flow.inverse(temperature * v, cond)[0]


class INN(nn.Module, HubMixin, **HUB_KWARGS):
    """An unconditional INN T: z_bar <-> e ~ N(0, I) on autoencoder latents (the IIN paper's T).

    Same blocks as the cINN without a condition. ``factor_sizes`` (optional) splits the output
    into semantic factors (e_1 ... e_K) and a residual e_0, used by the concept model.
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
        mixing: str = "shuffle",
    ):
        super().__init__()
        if factor_sizes is not None and sum(factor_sizes) != dim:
            raise ValueError(f"factor sizes {factor_sizes} must add up to dim {dim}")
        if factor_names is not None and (factor_sizes is None or len(factor_names) != len(factor_sizes)):
            raise ValueError("factor_names needs factor_sizes of the same length")
        self.dim = dim
        self.factor_sizes = list(factor_sizes) if factor_sizes else [dim]
        self.factor_names = list(factor_names) if factor_names else [f"factor{i}" for i in range(len(self.factor_sizes))]
        self.flow = Flow(dim, 0, n_flows, hidden, depth, seed=seed, mixing=mixing)

    def forward(self, zbar: torch.Tensor):
        """z_bar -> (e, logdet)."""
        if zbar.dim() != 2 or zbar.shape[1] != self.dim:
            raise ValueError(f"expected latents of shape (B, {self.dim}), got {tuple(zbar.shape)}")
        return self.flow(zbar, None)

    def inverse(self, e: torch.Tensor):
        """e -> (z_bar, logdet of the inverse)."""
        if e.dim() != 2 or e.shape[1] != self.dim:
            raise ValueError(f"expected codes of shape (B, {self.dim}), got {tuple(e.shape)}")
        return self.flow.inverse(e, None)

    def nll(self, zbar: torch.Tensor) -> torch.Tensor:
        e, logdet = self(zbar)
        return standard_normal_nll(e, logdet)

    def split(self, e: torch.Tensor) -> list[torch.Tensor]:
        """Codes -> list of factors (sizes ``factor_sizes``)."""
        return list(torch.split(e, self.factor_sizes, dim=1))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        param = next(self.parameters())
        device = generator.device if generator is not None else param.device
        e = torch.randn(n, self.dim, generator=generator, device=device).to(param.device, param.dtype)
        return self.inverse(temperature * e)[0]
