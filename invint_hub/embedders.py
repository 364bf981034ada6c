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
    """Spatial features (B, C, H, W) -> (B, out_dim): ``n_down`` strided 4x4 convs, then a dense conv.

    ``spatial_size`` is the side of a square map, or ``(H, W)``; by default the convs halve the map until its
    larger side is at most 4.
    """

    def __init__(self, in_channels: int, spatial_size: int | tuple[int, int], out_dim: int, n_down: int | None = None,
                 width: int = 64):
        super().__init__()
        h, w = (spatial_size, spatial_size) if isinstance(spatial_size, int) else tuple(spatial_size)
        if n_down is None:  # downsample until the map is at most 4x4
            n_down, s = 0, max(h, w)
            while s > 4:
                s, n_down = (s - 2) // 2 + 1, n_down + 1
        # each conv halves a side that is still larger than 4 (4x4 kernel, stride 2, padding 1) and keeps a side
        # that is not (3-wide kernel, stride 1): a square map takes 4x4 stride-2 convs throughout
        layers: list[nn.Module] = []
        c = in_channels
        for s in range(n_down):
            c_out = width * min(2**s, 16)
            kernel, stride = [], []
            for side in (h, w):
                halve = side > 4 or h == w
                kernel.append(4 if halve else 3)
                stride.append(2 if halve else 1)
            h, w = ((h - 2) // 2 + 1 if stride[0] == 2 else h), ((w - 2) // 2 + 1 if stride[1] == 2 else w)
            k = kernel[0] if kernel[0] == kernel[1] else tuple(kernel)
            st = stride[0] if stride[0] == stride[1] else tuple(stride)
            layers += [nn.Conv2d(c, c_out, k, stride=st, padding=1, bias=False), ActNorm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        final = (h, w) if h != w else h
        if min(h, w) < 1:
            raise ValueError(f"{n_down} stride-2 convs shrink the map to nothing")
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
    1x1) features, a per-token projection for tokens, strided convs for maps. ``ValueError`` otherwise."""
    cond_shape = tuple(int(c) for c in cond_shape)
    if len(cond_shape) not in (1, 2, 3):
        raise ValueError(f"cond_shape must be [C], [N, C] (tokens) or [C, H, W], got {list(cond_shape)}")
    if len(cond_shape) == 2:
        return TokenEmbedder(cond_shape[0], cond_shape[1], out_dim, depth)
    if len(cond_shape) == 1 or cond_shape[1] * cond_shape[2] == 1:
        return DenseEmbedder(math.prod(cond_shape), out_dim, depth)
    return ConvEmbedder(cond_shape[0], cond_shape[1:], out_dim, n_down, width)
