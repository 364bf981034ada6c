"""The conditional INN t of the paper: z_bar <-> v given the representation z.

    v, logdet = t(z_bar, z)        # invariances of the layer (trained to be N(0, I))
    z_bar     = t.inverse(v, z)    # any v ~ N(0, I) decodes to an image with representation z

The representation z (flat (B, C) or spatial (B, C, H, W)) is first mapped to a
conditioning vector by an embedder that is trained jointly with the flow.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .flows import ActNorm, Flow, _tensor_key, set_fast_path, standard_normal_nll
from .hub import HUB_KWARGS, HubMixin


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


EmbedStep = tuple  # ("linear", W^T, b) | ("conv", W, b, stride, padding) | ("lrelu", slope) | ("flatten",)


@torch.no_grad()
def fold_embedder(embedder: nn.Module, cond_shape: tuple[int, ...]) -> list[EmbedStep] | None:
    """The embedder's layers for inference with every ActNorm folded into the Linear/Conv before it.

    ``ActNorm(W x + b) = (W x + b + loc) * exp(log_scale)`` = ``W' x + b'`` with ``W' = exp(log_scale) W``
    and ``b' = (b + loc) exp(log_scale)``. A convolution whose kernel covers its whole (unpadded) input
    is a dense layer on the flattened map and runs as one matmul. Returns ``None`` for a layer
    sequence it does not know (the caller then runs the embedder as it is).
    """
    layers = list(embedder.net) if isinstance(embedder, (DenseEmbedder, ConvEmbedder)) else None
    if not layers:
        return None
    steps: list[EmbedStep] = [("flatten",)] if isinstance(embedder, DenseEmbedder) else []
    size = cond_shape[-1] if len(cond_shape) == 3 else 1  # spatial size of the current map
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.LeakyReLU):
            steps.append(("lrelu", layer.negative_slope))
            i += 1
            continue
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            return None
        w = layer.weight.detach()
        b = layer.bias.detach() if layer.bias is not None else w.new_zeros(w.shape[0])
        if i + 1 < len(layers) and isinstance(layers[i + 1], ActNorm):
            norm = layers[i + 1]
            scale = norm.log_scale.detach().exp()
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
            b = (b + norm.loc.detach()) * scale
            i += 1
        i += 1
        if isinstance(layer, nn.Linear):
            steps.append(("linear", w.t().contiguous(), b))
            continue
        if layer.groups != 1 or layer.dilation != (1, 1) or isinstance(layer.padding, str):
            return None
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        if kh == kw == size and ph == pw == 0:  # one output position: a dense layer
            steps += [("flatten",), ("linear", w.flatten(1).t().contiguous(), b)]
            size = 1
        else:
            steps.append(("conv", w.contiguous(), b, (sh, sw), (ph, pw)))
            size = (size + 2 * ph - kh) // sh + 1
    if isinstance(embedder, ConvEmbedder) and steps[-1][0] != "linear":
        steps.append(("flatten",))
    return steps


def run_folded(steps: list[EmbedStep], z: torch.Tensor) -> torch.Tensor:
    """Apply ``fold_embedder``'s steps (inference, no gradients)."""
    h, fresh = z, False  # fresh: h is this function's own tensor (LeakyReLU may then work in place)
    for step in steps:
        kind = step[0]
        if kind == "linear":
            h, fresh = torch.addmm(step[2], h, step[1]), True
        elif kind == "lrelu":
            h = F.leaky_relu_(h, step[1]) if fresh else F.leaky_relu(h, step[1])
        elif kind == "conv":
            h, fresh = F.conv2d(h, step[1], step[2], step[3], step[4]), True
        else:
            h = h.flatten(1)
    return h


def make_embedder(cond_shape, out_dim: int, depth: int = 3, n_down: int | None = None, width: int = 64) -> nn.Module:
    """The embedder for a representation of shape ``[C]`` or ``[C, H, W]``: dense for flat (or 1x1) features,
    strided convs for square maps. Raises ``ValueError`` for other shapes."""
    cond_shape = tuple(int(c) for c in cond_shape)
    if len(cond_shape) not in (1, 3):
        raise ValueError(f"cond_shape must be [C] or [C, H, W], got {list(cond_shape)}")
    if len(cond_shape) == 1 or cond_shape[1] * cond_shape[2] == 1:
        return DenseEmbedder(math.prod(cond_shape), out_dim, depth)
    if cond_shape[1] != cond_shape[2]:
        raise ValueError(f"spatial conditions must be square, got {list(cond_shape)}")
    return ConvEmbedder(cond_shape[0], cond_shape[1], out_dim, n_down, width)


class ConditionalINN(nn.Module, HubMixin, **HUB_KWARGS):
    """The paper's t: z_bar (autoencoder latent) -> v (invariances), conditioned on z = Phi(x).

    Args:
        latent_dim: size of the autoencoder latent z_bar (paper: 128).
        cond_shape: shape of the representation z without batch: ``[C]`` or ``[C, H, W]``.
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
        # fast-path inference: the embedder with its ActNorms folded (see ``fold_embedder``), keyed by
        # the embedder's tensors like the flow's weight cache; never saved
        self._embed_cache: tuple[tuple, list[EmbedStep] | None] | None = None
        self._embed_tensors: list[torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(_drop_embed_cache)

    def _apply(self, fn, *args, **kwargs):  # .to() / .double() / ...: the folded weights are stale
        _drop_embed_cache(self)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies and pickles leave the cache behind
        state = super().__getstate__()
        state["_embed_cache"] = state["_embed_tensors"] = None
        return state

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
        if z.dim() == 2 and len(self.cond_shape) == 3:
            z = z.view(z.shape[0], *self.cond_shape)
        steps = self._folded_embedder(z)
        return self.embedder(z) if steps is None else run_folded(steps, z)

    def _folded_embedder(self, z: torch.Tensor) -> list[EmbedStep] | None:
        """The cached folded embedder for fast-path inference, or ``None`` where the plain one must run
        (fast path off, cache off, gradients on, autocast, or an ActNorm still awaiting its init)."""
        flow = self.flow
        if not (flow.fast_path and flow.fast_cache) or torch.is_grad_enabled() \
                or torch.is_autocast_enabled(z.device.type):
            return None
        if self._embed_tensors is None:
            self._embed_tensors = list(self.embedder.parameters()) + list(self.embedder.buffers())
        key = _tensor_key(self._embed_tensors)
        if key is None:
            return None
        if self._embed_cache is None or self._embed_cache[0] != key:
            norms = [m for m in self.embedder.modules() if isinstance(m, ActNorm)]
            if self.training and not all(bool(m.initialized.item()) for m in norms):
                return None  # the plain forward initialises them (data-dependent)
            self._embed_cache = (key, fold_embedder(self.embedder, self.cond_shape))
        return self._embed_cache[1]

    def forward(self, zbar: torch.Tensor, z: torch.Tensor):
        """z_bar, z -> (v, logdet)."""
        self._check(zbar, z)
        return self.flow(zbar, self.embed(z))

    def inverse(self, v: torch.Tensor, z: torch.Tensor, return_logdet: bool = False):
        """v, z -> z_bar (and the inverse logdet if asked)."""
        self._check(v, z)
        zbar, logdet = self.flow.inverse(v, self.embed(z))
        return (zbar, logdet) if return_logdet else zbar

    def fast(self, enabled: bool = True, dtype: torch.dtype | None = None, cache: bool = True) -> "ConditionalINN":
        """Switch the flow to the fast path (see ``flows.set_fast_path``); a runtime option, never saved.

        On the fast path ``sample`` also embeds each representation once instead of ``n`` times.
        """
        set_fast_path(self.flow, enabled, dtype, cache)
        return self

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
        param = next(self.parameters())
        device = generator.device if generator is not None else param.device
        if self.flow.fast_path:  # embed each representation once, not n times
            self._check_cond(z)
            v = torch.randn(z.shape[0] * n, self.latent_dim, generator=generator, device=device)
            v = v.to(param.device, param.dtype)
            if temperature != 1.0:  # 1.0 * v is v: skip the op
                v = temperature * v
            return self.flow.inverse(v, self.embed(z), cond_repeats=n)[0]
        z = z.repeat_interleave(n, dim=0)
        v = torch.randn(z.shape[0], self.latent_dim, generator=generator, device=device).to(param.device, param.dtype)
        return self.inverse(temperature * v, z)


def _drop_embed_cache(model: "ConditionalINN", *args) -> None:
    model._embed_cache = None
    model._embed_tensors = None


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
    ):
        super().__init__()
        if factor_sizes is not None and sum(factor_sizes) != dim:
            raise ValueError(f"factor sizes {factor_sizes} must add up to dim {dim}")
        if factor_names is not None and (factor_sizes is None or len(factor_names) != len(factor_sizes)):
            raise ValueError("factor_names needs factor_sizes of the same length")
        self.dim = dim
        self.factor_sizes = list(factor_sizes) if factor_sizes else [dim]
        self.factor_names = list(factor_names) if factor_names else [f"factor{i}" for i in range(len(self.factor_sizes))]
        self.flow = Flow(dim, 0, n_flows, hidden, depth, seed=seed)

    def forward(self, zbar: torch.Tensor):
        if zbar.dim() != 2 or zbar.shape[1] != self.dim:
            raise ValueError(f"expected latents of shape (B, {self.dim}), got {tuple(zbar.shape)}")
        return self.flow(zbar, None)

    def inverse(self, e: torch.Tensor, return_logdet: bool = False):
        if e.dim() != 2 or e.shape[1] != self.dim:
            raise ValueError(f"expected codes of shape (B, {self.dim}), got {tuple(e.shape)}")
        zbar, logdet = self.flow.inverse(e, None)
        return (zbar, logdet) if return_logdet else zbar

    def fast(self, enabled: bool = True, dtype: torch.dtype | None = None, cache: bool = True) -> "INN":
        """Switch the flow to the fast path (see ``flows.set_fast_path``); a runtime option, never saved."""
        set_fast_path(self.flow, enabled, dtype, cache)
        return self

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
        return self.inverse(temperature * e)
