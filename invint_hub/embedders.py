"""Conditioning embedders of the cINN: a representation z = Phi(x) -> the vector fed to every coupling.

Flat features (B, C) (or 1x1 maps) take a dense embedder, tokens (B, N, C) a per-token projection
before a dense one, square maps (B, C, H, W) a strided-conv one; ``make_embedder`` picks by shape. Both are trained jointly with the flow.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .flows import ActNorm


class DenseEmbedder(nn.Module):
    """Flat features (B, C) -> (B, out_dim): Linear/ActNorm/LeakyReLU with widths linspace(C, out, depth+1)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 3):
        super().__init__()
        dims = [round(in_dim + (out_dim - in_dim) * i / depth) for i in range(depth + 1)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < depth - 1:
                layers += [ActNorm(b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.flatten(1)
        for layer in self.net:
            h = layer(h)[0] if isinstance(layer, ActNorm) else layer(h)
        return h


class ConvEmbedder(nn.Module):
    """Spatial features (B, C, H, W) -> (B, out_dim): ``n_down`` strided 4x4 convs, then a dense conv."""

    def __init__(self, in_channels: int, spatial_size: int, out_dim: int, n_down: int | None = None, width: int = 64):
        super().__init__()
        if n_down is None:  # downsample until the map is at most 4x4
            n_down, s = 0, spatial_size
            while s > 4:
                s, n_down = (s - 2) // 2 + 1, n_down + 1
        final = spatial_size
        for _ in range(n_down):
            final = (final - 2) // 2 + 1  # 4x4 conv, stride 2, padding 1
        if final < 1:
            raise ValueError(f"{n_down} stride-2 convs shrink a {spatial_size}x{spatial_size} map to nothing")
        layers: list[nn.Module] = []
        c = in_channels
        for s in range(n_down):
            c_out = width * min(2**s, 16)
            layers += [nn.Conv2d(c, c_out, 4, stride=2, padding=1, bias=False), ActNorm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, out_dim, final))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for layer in self.net:
            h = layer(h)[0] if isinstance(layer, ActNorm) else layer(h)
        return h.flatten(1)


class TokenEmbedder(nn.Module):
    """Tokens (B, N, C) (a ViT's blocks) -> (B, out_dim): each token projected to ``token_dim`` channels
    (Linear, LeakyReLU; shared across tokens), then the N * token_dim features, in token order (so where a
    token sits is kept), through a dense embedder."""

    def __init__(self, n_tokens: int, channels: int, out_dim: int, depth: int = 3, token_dim: int = 8):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(channels, token_dim), nn.LeakyReLU(0.2))
        self.dense = DenseEmbedder(n_tokens * token_dim, out_dim, depth)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.dense(self.proj(z).flatten(1))


def make_embedder(cond_shape, out_dim: int, depth: int = 3, n_down: int | None = None, width: int = 64) -> nn.Module:
    """The embedder for a representation of shape ``[C]``, tokens ``[N, C]`` or ``[C, H, W]``: dense for flat (or
    1x1) features, a per-token projection for tokens, strided convs for square maps. ``ValueError`` otherwise."""
    cond_shape = tuple(int(c) for c in cond_shape)
    if len(cond_shape) not in (1, 2, 3):
        raise ValueError(f"cond_shape must be [C], [N, C] (tokens) or [C, H, W], got {list(cond_shape)}")
    if len(cond_shape) == 2:
        return TokenEmbedder(cond_shape[0], cond_shape[1], out_dim, depth)
    if len(cond_shape) == 1 or cond_shape[1] * cond_shape[2] == 1:
        return DenseEmbedder(math.prod(cond_shape), out_dim, depth)
    if cond_shape[1] != cond_shape[2]:
        raise ValueError(f"spatial conditions must be square, got {list(cond_shape)}")
    return ConvEmbedder(cond_shape[0], cond_shape[1], out_dim, n_down, width)
