"""Invertible building blocks of the paper's cINN, and the likelihood they are trained with.

Every block follows one contract:

    y, logdet = block(x, cond)              # forward
    x, logdet_inv = block.inverse(y, cond)  # inverse, with logdet_inv == -logdet

``logdet`` is a float32 tensor of shape (B,): log |det dy/dx| per sample. ``cond`` is the
conditioning embedding (B, E), or ``None`` for unconditional blocks (which ignore it).

The structure follows the official cINN (CompVis/invariances ``blocks.py``): a ``Flow`` is a stack
of ``FlowBlock`` = ActNorm -> DoubleAffineCoupling (tanh-bounded log-scale, the condition
concatenated into every subnet) -> Shuffle (a fixed random permutation). Trained by maximum
likelihood under a standard normal on the output (``standard_normal_nll``):

    -log p(x | c) = 0.5 |f(x, c)|^2 + 0.5 D log(2 pi) - log |det df/dx|.
"""
from __future__ import annotations

import torch
from torch import nn

SUBNET_SLOPE = 0.01  # LeakyReLU slope of the coupling subnets (official BasicFullyConnectedNet)


class ActNorm(nn.Module):
    """Per-feature affine normalisation with data-dependent initialisation (Glow).

        y = (x + loc) * exp(log_scale),   log |det dy/dx| = H * W * sum(log_scale)

    (per channel, broadcast over H x W for (B, C, H, W) inputs; H * W = 1 for (B, C) inputs).

    On the first forward pass in training mode of a module that is not yet initialised, ``loc``
    and ``scale`` are set from that batch so that its output has zero mean and unit variance per
    feature: loc = -mean(x), log_scale = -log(std(x) + 1e-6). The ``initialized`` flag is a
    persistent buffer, so a saved and reloaded model never re-initialises. Its host copy
    ``_initialized`` (set by ``initialize`` and by state-dict loads) keeps the forward pass from
    reading the buffer, a host synchronisation on a GPU, at every step.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._initialized = False

    def _shape(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        mean = x.float().mean(dim=dims)
        std = x.float().std(dim=dims, unbiased=False) if x.shape[0] * x[0, 0].numel() > 1 else torch.ones_like(mean)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None and flag.device.type != "meta":
            self._initialized = bool(flag)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        if self.training and not self._initialized:
            self._initialized = bool(self.initialized)  # (the flag may have been set by hand)
            if not self._initialized:
                self.initialize(x)
        y = (x + self._shape(self.loc, x)) * self._shape(self.log_scale.exp(), x)
        hw = x[0, 0].numel()
        logdet = (hw * self.log_scale.float().sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        """x = y * exp(-log_scale) - loc."""
        x = y * self._shape((-self.log_scale).exp(), y) - self._shape(self.loc, y)
        hw = y[0, 0].numel()
        logdet = (-hw * self.log_scale.float().sum()).expand(y.shape[0])
        return x, logdet


def mlp(in_dim: int, out_dim: int, hidden: int, depth: int, final_tanh: bool = False) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` with LeakyReLU(0.01), as the official subnets.

    Official ``BasicFullyConnectedNet(depth=2)`` = Linear-LReLU, 2x(Linear-LReLU), Linear:
    i.e. ``depth + 1`` hidden layers. We keep that convention.
    """
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.LeakyReLU(SUBNET_SLOPE)]
    for _ in range(depth):
        layers += [nn.Linear(hidden, hidden), nn.LeakyReLU(SUBNET_SLOPE)]
    layers.append(nn.Linear(hidden, out_dim))
    if final_tanh:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class AffineCoupling(nn.Module):
    """One affine coupling: keeps the first half, transforms the second.

        x = [x_a, x_b],  h = [x_a, cond],  s = tanh(s_net(h)),  t = t_net(h)
        y = [x_a, x_b * exp(s) + t],        log |det dy/dx| = sum(s)
        inverse: x_b = (y_b - t) * exp(-s)  (h depends on the kept half only, so it is known)

    The tanh bounds the log-scale of every transformed dimension to (-1, 1).
    """

    def __init__(self, dim: int, cond_dim: int, hidden: int, depth: int):
        super().__init__()
        self.dim_a = dim // 2
        self.dim_b = dim - self.dim_a
        self.s = mlp(self.dim_a + cond_dim, self.dim_b, hidden, depth, final_tanh=True)
        self.t = mlp(self.dim_a + cond_dim, self.dim_b, hidden, depth)

    def _st(self, x_a: torch.Tensor, cond: torch.Tensor | None):
        h = x_a if cond is None else torch.cat([x_a, cond], dim=1)
        return self.s(h), self.t(h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        x_a, x_b = x[:, : self.dim_a], x[:, self.dim_a :]
        s, t = self._st(x_a, cond)
        y = torch.cat([x_a, x_b * s.exp() + t], dim=1)
        return y, s.float().sum(dim=1)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        y_a, y_b = y[:, : self.dim_a], y[:, self.dim_a :]
        s, t = self._st(y_a, cond)
        x = torch.cat([y_a, (y_b - t) * (-s).exp()], dim=1)
        return x, -s.float().sum(dim=1)


class DoubleAffineCoupling(nn.Module):
    """Two couplings with a half swap in between, so every dimension is transformed:

        y = second(swap(first(x))),  swap([u_1..u_k, u_k+1..u_D]) = [u_k+1..u_D, u_1..u_k],  k = D // 2.

    The swap is a permutation (log-determinant 0); the inverse undoes it at D - k.
    """

    def __init__(self, dim: int, cond_dim: int, hidden: int, depth: int):
        super().__init__()
        self.dim = dim
        self.first = AffineCoupling(dim, cond_dim, hidden, depth)
        self.second = AffineCoupling(dim, cond_dim, hidden, depth)

    def _swap(self, x: torch.Tensor, split: int) -> torch.Tensor:
        return torch.cat([x[:, split:], x[:, :split]], dim=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        x, ld1 = self.first(x, cond)
        x = self._swap(x, self.dim // 2)
        x, ld2 = self.second(x, cond)
        return x, ld1 + ld2

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        y, ld2 = self.second.inverse(y, cond)
        y = self._swap(y, self.dim - self.dim // 2)
        y, ld1 = self.first.inverse(y, cond)
        return y, ld1 + ld2


class Shuffle(nn.Module):
    """A fixed random permutation, y = x[:, perm] (log-determinant 0).

    The permutation is drawn from a local generator seeded with ``seed`` (never the global RNG)
    and stored as persistent buffers, so a reloaded model is the same bijection.
    """

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(dim, generator=g)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return x[:, self.perm], x.new_zeros(x.shape[0], dtype=torch.float32)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        return y[:, self.inv_perm], y.new_zeros(y.shape[0], dtype=torch.float32)


class InvertibleLinear(nn.Module):
    """A learned invertible linear map y = x W^T with W = P L (U + diag(exp(log_s))) (Glow's LU-decomposed 1x1
    convolution, for vectors): P a fixed permutation, L unit lower and U strictly upper triangular.

    log |det W| = sum(log_s). It starts as the permutation P (the one ``Shuffle(dim, seed)`` would use), so an
    untrained block is the same bijection as with ``Shuffle``; training can then rotate the features, which lets a
    flow gather information spread over many input dimensions into a few output dimensions.
    """

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(dim, generator=g)
        self.register_buffer("perm", perm)
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_s = nn.Parameter(torch.zeros(dim))
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))

    def _lu(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.log_s.shape[0], device=self.log_s.device, dtype=self.log_s.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.log_s.exp())
        return lower, upper

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        lower, upper = self._lu()
        y = (x[:, self.perm] @ (lower @ upper).T.to(x.dtype))  # W = P L U with (P v) = v[perm]
        return y, self.log_s.float().sum().expand(x.shape[0])

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        lower, upper = (m.double() for m in self._lu())  # float64 solves: the round-off stays far below fp32's
        # solve x_p (L U)^T = y, i.e. (L U) x_p^T = y^T, then undo the permutation
        h = torch.linalg.solve_triangular(lower, y.T.double(), upper=False, unitriangular=True)
        xp = torch.linalg.solve_triangular(upper, h, upper=True).T.to(y.dtype)
        x = torch.empty_like(xp)
        x[:, self.perm] = xp
        return x, -self.log_s.float().sum().expand(y.shape[0])


MIXINGS = ("shuffle", "linear")


class FlowBlock(nn.Module):
    """ActNorm -> DoubleAffineCoupling -> Shuffle (or a learned ``InvertibleLinear``), one step of the flow;
    log-determinants add up."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, depth: int, seed: int, mixing: str = "shuffle"):
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
        self.norm = ActNorm(dim)
        self.coupling = DoubleAffineCoupling(dim, cond_dim, hidden, depth)
        self.shuffle = Shuffle(dim, seed) if mixing == "shuffle" else InvertibleLinear(dim, seed)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        logdet = x.new_zeros(x.shape[0], dtype=torch.float32)
        for layer in (self.norm, self.coupling, self.shuffle):
            x, ld = layer(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        logdet = y.new_zeros(y.shape[0], dtype=torch.float32)
        for layer in (self.shuffle, self.coupling, self.norm):
            y, ld = layer.inverse(y, cond)
            logdet = logdet + ld
        return y, logdet


class Flow(nn.Module):
    """A stack of ``n_flows`` FlowBlocks on vectors of size ``dim`` (block i's permutation: seed + i).

        f = f_n o ... o f_1,   log |det df/dx| = sum_i log |det df_i/dx_i|,   f^-1 = f_1^-1 o ... o f_n^-1.
    """

    def __init__(self, dim: int, cond_dim: int, n_flows: int, hidden: int, depth: int, seed: int = 0,
                 mixing: str = "shuffle"):
        super().__init__()
        self.blocks = nn.ModuleList(
            FlowBlock(dim, cond_dim, hidden, depth, seed=seed + i, mixing=mixing) for i in range(n_flows)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        logdet = x.new_zeros(x.shape[0], dtype=torch.float32)
        for block in self.blocks:
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        logdet = y.new_zeros(y.shape[0], dtype=torch.float32)
        for block in reversed(self.blocks):
            y, ld = block.inverse(y, cond)
            logdet = logdet + ld
        return y, logdet


def standard_normal_nll(v: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood (nats) of the flow's input, from its output ``v`` and logdet:

        nll = 0.5 |v|^2 + 0.5 D log(2 pi) - logdet,   D = v[0].numel()

    (change of variables: log p(x) = log N(f(x); 0, I) + log |det df/dx|). Computed in fp32.
    """
    v = v.float().flatten(1)
    d = v.shape[1]
    return 0.5 * (v**2).sum(1) + 0.5 * d * torch.log(torch.tensor(2 * torch.pi)) - logdet


def bits_per_dim(nll: torch.Tensor, dim: int) -> torch.Tensor:
    """nats per sample -> bits per dimension: nll / (dim * log 2)."""
    return nll / (dim * torch.log(torch.tensor(2.0)))
