"""Invertible building blocks (the paper's core, written by hand).

Every block follows one contract:

    y, logdet = block(x, cond)            # forward
    x, logdet_inv = block.inverse(y, cond)  # inverse, with logdet_inv == -logdet

``logdet`` is a float32 tensor of shape (B,): log |det dy/dx| per sample. ``cond``
is the conditioning embedding (B, E) or ``None`` for unconditional blocks.

The structure follows the official cINN (CompVis/invariances ``blocks.py``):
ActNorm -> double affine coupling (tanh-bounded log-scale, conditioning concatenated
into every subnet) -> fixed random permutation.

Fast path (a runtime option of ``Flow``, never saved; see ``set_fast_path``): the same
parameters and the same math, evaluated with fewer and larger kernels. The ``s`` and ``t``
subnets of a coupling run together as batched matmuls over stacked weights ``[W_s; W_t]``
(``torch.baddbmm``; tanh only on the ``s`` half); the weights of all couplings are stacked
in one copy per layer; the condition's share of every coupling's input layer is one matmul
for the whole flow; the forward pass never synchronises with the host once the ActNorms are
initialised (so a training step can be captured as one CUDA graph); and the subnets can run
in bf16 while the flow's state and its log-determinant stay in fp32.

Training on the fast path moves each subnet layer's parameters (of all couplings) into one
stacked storage once (``Flow.stack_parameters``; same parameter objects, same state dict), so a
step stacks them as views and their gradients are views of the stacked gradients: no weight-sized
copy per step. Inference on the fast path (gradients off, weights cached) issues as few ops as it
can, since small models are bound by the per-op cost: each block is one gather (the permutation,
with the in-place couplings' rotation folded in) and one addcmul (the ActNorm, permuted to match);
the coupling halves are updated in place in buffers a thread reuses, and the matmuls write into them.
"""
from __future__ import annotations

import contextlib
import operator
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class ActNorm(nn.Module):
    """Per-feature affine normalisation with data-dependent initialisation (Glow).

    On the first forward pass in training mode of a module that is not yet initialised,
    ``loc`` and ``scale`` are set so that the batch has zero mean and unit variance per
    feature. The ``initialized`` flag is a persistent buffer, so a saved and reloaded
    model never re-initialises. Works on (B, C) and (B, C, H, W) inputs.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        # Python-side cache of the flag, so the buffer is read (a host sync on GPU)
        # once per module, not at every forward.
        self._known_initialized = False

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
        self._known_initialized = True

    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if self._known_initialized:
            return
        if bool(self.initialized.item()):
            self._known_initialized = True
        elif self.training:
            self.initialize(x)

    def _load_from_state_dict(self, *args, **kwargs):  # a load may change the flag
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        self._maybe_initialize(x)
        y = (x + self._shape(self.loc, x)) * self._shape(self.log_scale.exp(), x)
        hw = x[0, 0].numel()
        logdet = (hw * self.log_scale.float().sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):
        x = y * self._shape((-self.log_scale).exp(), y) - self._shape(self.loc, y)
        hw = y[0, 0].numel()
        logdet = (-hw * self.log_scale.float().sum()).expand(y.shape[0])
        return x, logdet


SUBNET_SLOPE = 0.01  # LeakyReLU slope of the coupling subnets (official BasicFullyConnectedNet)
# Cached CPU inference on the fast path: subnets at least this wide run through oneDNN with weights
# pre-packed once (the blocked layout its matmul wants); narrower ones are faster as plain matmuls.
ONEDNN_MIN_WIDTH = 512


def _onednn_linear_available() -> bool:
    """oneDNN's pre-packed linear (the ops that torch.compile's CPU freezing uses) is present."""
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


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

    x = [x_a, x_b];  h = [x_a, cond];  y_b = x_b * exp(s(h)) + t(h);  y = [x_a, y_b].
    ``s`` ends in tanh, so the log-scale of every dimension lies in (-1, 1).
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

    def linear_pairs(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """The (s, t) Linear layers of the two subnets, input layer first."""
        s = [m for m in self.s if isinstance(m, nn.Linear)]
        t = [m for m in self.t if isinstance(m, nn.Linear)]
        return list(zip(s, t))

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
    """Two couplings with a half swap in between, so every dimension is transformed."""

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
    """A fixed random permutation (log-determinant 0).

    The permutation is drawn from a local generator seeded with ``seed`` (never the
    global RNG) and stored as persistent buffers, so a reloaded model is the same
    bijection.
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


class FlowBlock(nn.Module):
    """ActNorm -> DoubleAffineCoupling -> Shuffle, one step of the flow."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, depth: int, seed: int):
        super().__init__()
        self.norm = ActNorm(dim)
        self.coupling = DoubleAffineCoupling(dim, cond_dim, hidden, depth)
        self.shuffle = Shuffle(dim, seed)

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


@dataclass
class FlowPack:
    """Parameters of a ``Flow`` laid out for the fast path: one stacked copy per subnet layer.

    K = 2 * n_flows couplings (block k: first = 2k, second = 2k + 1), H = subnet width.
    Every tensor is a view of a few ``torch.stack`` results, so gradients reach the modules.

    w_in:    K views (2H, dim_a): input-layer weights acting on the kept half, rows [s; t].
    w_cond:  (K * 2H, cond_dim) input-layer weights acting on the condition, or None.
    b_in:    (K * 2H, 1) input-layer biases.
    hidden:  per coupling, per further layer: (W (2, out, in), b (2, out, 1)).
    scale, inv_scale, shift, neg_loc: ActNorm, n_flows x (dim, 1): y = x * scale + shift
        (shift = loc * scale), x = y * inv_scale + neg_loc.
    actnorm_logdet: sum of all ActNorm log-scales (fp32 scalar).
    perm, inv_perm: the blocks' permutations; dim, dim_a: vector size and kept half of a coupling.
    onednn:  CPU inference with wide subnets only (else None): per coupling, per further layer,
        oneDNN pre-packed (W_s, W_t) and biases (b_s, b_t), used instead of ``hidden``.
    """

    w_in: list[torch.Tensor]
    w_cond: torch.Tensor | None
    b_in: torch.Tensor
    hidden: list[list[tuple[torch.Tensor, torch.Tensor]]]
    scale: tuple[torch.Tensor, ...]
    inv_scale: tuple[torch.Tensor, ...]
    shift: tuple[torch.Tensor, ...]
    neg_loc: tuple[torch.Tensor, ...]
    actnorm_logdet: torch.Tensor
    perm: list[torch.Tensor]
    inv_perm: list[torch.Tensor]
    dim: int
    dim_a: int
    onednn: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None
    plan: "InferencePlan | None" = None  # set on cached (inference) packs only


@dataclass
class InferencePlan:
    """Gathers and ActNorm constants of the cached inference passes (``Flow._cached_pass``).

    The passes carry the state feature-major, (dim, B), in two buffers used in turn and update the
    coupling halves in place, so after its couplings a block holds its vector rotated by a known
    amount. Between two blocks there is then one gather, whose index folds that rotation into the
    permutation, and one addcmul with the ActNorm's scale and shift (permuted to the gathered order
    in the inverse, where the ActNorm comes before the permutation). Index k of a list is the k-th
    gather in the pass's own order; all scales/shifts are (dim, 1), ``*_out`` are (dim,).

    fwd_scale0, fwd_shift0: block 0's ActNorm on the input.
    fwd_index[k]: the gather after block k; fwd_scale[k], fwd_shift[k]: ActNorm k + 1 (k < n - 1).
        The last index gathers the output. With an odd ``dim`` the forward pass materialises the
        half swap (one cat per block) and its indices carry no rotation.
    inv_index[0]: the first gather (block n - 1's inverse permutation); inv_index[i], i >= 1: the
        gather before block n - 1 - i, after ActNorm n - i's inverse (inv_scale[i], inv_shift[i]).
    inv_index_out, inv_scale_out, inv_shift_out: the output gather and block 0's ActNorm inverse.
    """

    fwd_scale0: torch.Tensor
    fwd_shift0: torch.Tensor
    fwd_index: list[torch.Tensor]
    fwd_scale: list[torch.Tensor]
    fwd_shift: list[torch.Tensor]
    inv_index: list[torch.Tensor]
    inv_scale: list[torch.Tensor | None]
    inv_shift: list[torch.Tensor | None]
    inv_index_out: torch.Tensor
    inv_scale_out: torch.Tensor
    inv_shift_out: torch.Tensor


def _build_plan(p: FlowPack) -> InferencePlan:
    """Compose the blocks' permutations with the rotations left by the in-place couplings."""
    n, dim, da = len(p.perm), p.dim, p.dim_a
    db = dim - da
    ar = torch.arange(dim, device=p.perm[0].device)
    # forward: after a block's couplings the buffer holds [x_a, y_b] updated in place; the block's
    # output (the half-swapped vector) is output[i] = buffer[(i + da) % dim] (odd dim: a cat, no rotation)
    rot_fwd = (ar + da) % dim if da == db else ar
    # inverse: after a block's couplings the buffer holds [x_b, x_a]; x[i] = buffer[(i + db) % dim]
    rot_inv = (ar + db) % dim
    inv_index = [p.inv_perm[n - 1]]
    inv_scale: list[torch.Tensor | None] = [None]
    inv_shift: list[torch.Tensor | None] = [None]
    for k in reversed(range(n - 1)):  # ActNorm k + 1 inverse, then block k's inverse permutation
        ip = p.inv_perm[k]
        inv_index.append(rot_inv[ip])
        inv_scale.append(p.inv_scale[k + 1][ip].contiguous())
        inv_shift.append(p.neg_loc[k + 1][ip].contiguous())
    return InferencePlan(
        fwd_scale0=p.scale[0], fwd_shift0=p.shift[0],
        fwd_index=[rot_fwd[p.perm[k]] for k in range(n)],
        fwd_scale=list(p.scale[1:]), fwd_shift=list(p.shift[1:]),
        inv_index=inv_index, inv_scale=inv_scale, inv_shift=inv_shift,
        inv_index_out=rot_inv, inv_scale_out=p.inv_scale[0][:, 0], inv_shift_out=p.neg_loc[0][:, 0],
    )


# A thread keeps the buffers of its last cached inference pass up to this many elements (the op
# count of making them matters only for small batches); larger ones are made per call.
WORKSPACE_KEEP_NUMEL = 1 << 18


class _Workspace:
    """Buffers of a cached inference pass on B columns, with their views (each view is an op too).

    Nothing a pass returns aliases them, so a thread may reuse them for its next pass of the same shape.
    """

    __slots__ = ("a2", "a3", "h3", "o", "o0", "o1", "e", "s_all", "s", "y", "halves", "numel")

    @staticmethod
    def key(p: FlowPack, batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
        w = p.w_in[0]
        return (batch, dtype, device, w.shape, w.dtype, len(p.w_in), p.dim, p.dim_a,
                p.onednn is None, len(p.hidden[0]))

    def __init__(self, p: FlowPack, batch: int, dtype: torch.dtype, device: torch.device):
        k = len(p.w_in)
        h2 = p.w_in[0].shape[0]  # 2H
        wdtype = p.w_in[0].dtype
        db = p.dim - p.dim_a
        self.a2 = torch.empty(h2, batch, dtype=wdtype, device=device)  # input layer, rows [s; t]
        self.a3 = self.a2.view(2, h2 // 2, batch)
        self.h3 = torch.empty_like(self.a3) if p.onednn is None and len(p.hidden[0]) > 1 else None
        self.o = torch.empty(2, db, batch, dtype=wdtype, device=device)  # output layer: s (pre-tanh), t
        self.o0, self.o1 = self.o.unbind(0)
        self.e = torch.empty(db, batch, dtype=dtype, device=device)  # exp(s)
        self.s_all = torch.empty(k, db, batch, dtype=dtype, device=device)  # every coupling's log-scale
        self.s = self.s_all.unbind(0)
        self.y = (torch.empty(p.dim, batch, dtype=dtype, device=device),
                  torch.empty(p.dim, batch, dtype=dtype, device=device))
        da = p.dim_a
        # per buffer: [:da], [da:], [:db], [db:] (the coupling halves in both passes)
        self.halves = tuple((y[:da], y[da:]) * 2 if da == db else (y[:da], y[da:], y[:db], y[db:]) for y in self.y)
        self.numel = sum(t.numel() for t in (self.a2, self.h3, self.o, self.e, self.s_all, *self.y) if t is not None)


class Flow(nn.Module):
    """A stack of ``n_flows`` FlowBlocks on vectors of size ``dim``.

    ``set_fast_path(flow, True)`` (or ``flow.fast_path = True``) switches to the fast path:
    same parameters, same state-dict, same results up to float rounding.
    """

    def __init__(self, dim: int, cond_dim: int, n_flows: int, hidden: int, depth: int, seed: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(
            FlowBlock(dim, cond_dim, hidden, depth, seed=seed + i) for i in range(n_flows)
        )
        self._norms = [block.norm for block in self.blocks]  # (a plain list: not registered twice)
        # Runtime options (plain attributes: never in the state dict or the config).
        self.fast_path = False
        self.fast_dtype: torch.dtype | None = None  # subnet matmul dtype on the fast path (None: as the weights)
        self.fast_cache = True  # cache the stacked weights while gradients are off (inference)
        self.fast_onednn = True  # cached CPU inference: pre-packed oneDNN matmuls (see ONEDNN_MIN_WIDTH)
        self._pack_cache: tuple[tuple, FlowPack] | None = None
        self._pack_params: list[nn.Parameter] | None = None
        self._workspaces: threading.local | None = None  # per thread: (key, _Workspace) of its last pass
        self._layers: list[list[nn.Parameter]] | None = None  # subnet_layers(), built once
        self.register_load_state_dict_post_hook(_drop_pack_cache)
        self.register_state_dict_post_hook(_unshare_state)

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / ...: the cached pack is stale
        _drop_pack_cache(self)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies and pickles leave the cache behind (it may hold opaque oneDNN tensors)
        state = super().__getstate__()
        state["_pack_cache"] = state["_pack_params"] = state["_workspaces"] = state["_layers"] = None
        return state

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        if self.fast_path and self._fast_ready():
            return self._fast_forward(x, cond)
        logdet = x.new_zeros(x.shape[0], dtype=torch.float32)
        for block in self.blocks:
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None, cond_repeats: int = 1):
        """y -> (x, logdet). ``cond_repeats`` > 1: ``cond`` holds one row per ``cond_repeats``
        consecutive rows of ``y`` (many samples of one condition; the fast path then computes the
        condition's share of the subnets once per row of ``cond``)."""
        fast = self.fast_path and self._fast_ready()
        if cond is not None and cond_repeats != 1:
            if cond_repeats < 1 or cond.shape[0] * cond_repeats != y.shape[0]:
                raise ValueError(f"{cond.shape[0]} conditions x {cond_repeats} repeats != {y.shape[0]} rows")
            if not fast:
                cond = cond.repeat_interleave(cond_repeats, dim=0)
        if fast:
            return self._fast_inverse(y, cond, cond_repeats)
        logdet = y.new_zeros(y.shape[0], dtype=torch.float32)
        for block in reversed(self.blocks):
            y, ld = block.inverse(y, cond)
            logdet = logdet + ld
        return y, logdet

    # ---- fast path ----------------------------------------------------------------------
    def _fast_ready(self) -> bool:
        """False while an ActNorm still awaits its data-dependent init: that call takes the plain path.

        Reads each ActNorm's flag from the device at most once (then cached on the host), so a
        training step of an initialised flow never synchronises.
        """
        norms = self._norms
        if not norms:
            return False
        if all(norm._known_initialized for norm in norms):  # (the common case, without module lookups)
            return True
        for norm in norms:
            if not norm._known_initialized:
                if bool(norm.initialized.item()):
                    norm._known_initialized = True
                elif self.training:
                    return False
        return True

    def subnet_layers(self) -> list[list[nn.Parameter]]:
        """Per subnet layer index: the weights then the biases of that layer of every subnet, in the
        pack's order (coupling k = 2 * block + (0 first, 1 second); s before t). Layer i's weights
        (and its biases) are what the fast path stacks into one tensor."""
        if self._layers is None:
            couplings = [c for b in self.blocks for c in (b.coupling.first, b.coupling.second)]
            pairs = [c.linear_pairs() for c in couplings]
            groups = []
            for i in range(len(pairs[0]) if pairs else 0):
                lins = [lin for p in pairs for lin in p[i]]
                groups += [[lin.weight for lin in lins], [lin.bias for lin in lins]]
            self._layers = groups
        return self._layers

    def stack_parameters(self) -> bool:
        """Lay each subnet layer's weights (and biases) of all couplings back to back in one tensor.

        The parameters stay the same objects with the same values; only their storage moves (one
        copy, now). From then on the fast path stacks them as views, with no copy in the forward pass
        and none in the backward pass, where each parameter's gradient is a view of the stacked
        gradient. The fast path's training forward calls this once by itself; ``.to()`` and the like
        give every parameter its own storage again (and the next fast training step restacks).
        ``state_dict`` still returns independent tensors. Returns whether anything moved.
        """
        moved = False
        with torch.no_grad():
            for params in self.subnet_layers():
                if _stacked_base(params) is not None:
                    continue
                base = torch.stack([q.detach() for q in params])
                for q, view in zip(params, base.unbind(0)):
                    q.data = view
                moved = True
        if moved:
            _drop_pack_cache(self)
        return moved

    def pack(self, dtype: torch.dtype | None = None, cpu_inference: bool = False) -> FlowPack:
        """Stack the parameters for the fast path (differentiable).

        Parameters laid out back to back by ``stack_parameters`` are stacked as views (no copy, and
        per-parameter gradients as views of the stacked ones); otherwise one ``torch.stack`` per layer.
        ``cpu_inference`` (no gradients): pre-pack wide subnets for oneDNN (see ``ONEDNN_MIN_WIDTH``).
        """
        couplings = [c for b in self.blocks for c in (b.coupling.first, b.coupling.second)]
        dim_a, k = couplings[0].dim_a, len(couplings)
        layers = self.subnet_layers()
        n_layers = len(layers) // 2

        def stacked(i: int, groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """Layer i: ``groups`` x (weights (2K / groups, out, in), biases (2K / groups, out, 1)): s, t, s, t, ..."""
            split = 1 if dtype is not None else groups  # convert the whole layer, then split
            w, b = (_stack(layers[2 * i + j], split) for j in (0, 1))
            if dtype is not None:
                w, b = w[0].to(dtype).chunk(groups), b[0].to(dtype).chunk(groups)
            return [(wg, bg.unsqueeze(2)) for wg, bg in zip(w, b)]

        ((w0, b0),) = stacked(0, 1)
        hid = w0.shape[1]
        w_in = [w.reshape(2 * hid, dim_a) for w in w0[:, :, :dim_a].split(2)]
        w_cond = w0[:, :, dim_a:].reshape(2 * k * hid, -1) if w0.shape[2] > dim_a else None
        hidden: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in couplings]
        for i in range(1, n_layers):
            for c, (wk, bk) in enumerate(stacked(i, k)):
                hidden[c].append((wk, bk))
        packed = None
        if (cpu_inference and n_layers > 1 and hid >= ONEDNN_MIN_WIDTH
                and w0.dtype in (torch.float32, torch.bfloat16) and _onednn_linear_available()):
            packed = [[(_reorder(w[0]), _reorder(w[1]), b[0, :, 0], b[1, :, 0]) for w, b in layers]
                      for layers in hidden]
            hidden = [[] for _ in couplings]  # the pre-packed copies replace the stacked ones
        log_scale = torch.stack([b.norm.log_scale for b in self.blocks]).unsqueeze(2)  # (n, dim, 1)
        loc = torch.stack([b.norm.loc for b in self.blocks]).unsqueeze(2)
        scale = log_scale.exp()
        return FlowPack(
            w_in=w_in, w_cond=w_cond, b_in=b0.reshape(2 * k * hid, 1), hidden=hidden,
            scale=scale.unbind(0), inv_scale=(-log_scale).exp().unbind(0), shift=(loc * scale).unbind(0),
            neg_loc=(-loc).unbind(0),
            actnorm_logdet=log_scale.float().sum(),
            perm=[b.shuffle.perm for b in self.blocks], inv_perm=[b.shuffle.inv_perm for b in self.blocks],
            dim=log_scale.shape[1], dim_a=dim_a,
            onednn=packed,
        )

    def _get_pack(self) -> FlowPack:
        """The pack, from the cache when gradients are off and no parameter changed since it was built.

        A change is seen through the parameters' version counters (in-place updates such as an
        optimizer step or ``load_state_dict``) and storage pointers (``.to()``); ``_apply`` and
        state-dict loads drop the cache outright.
        """
        if not self.fast_cache or torch.is_grad_enabled():
            self._pack_cache = None
            if torch.is_grad_enabled() and self.training and not _capturing():
                layer0 = self.subnet_layers()[0]
                if layer0[0].requires_grad and _stacked_base(layer0) is None:
                    self.stack_parameters()  # once: from then on no stacking copies in training steps
            return self.pack(self.fast_dtype)
        if self._pack_params is None:  # the parameters and the permutations (the plan composes them)
            self._pack_params = list(self.parameters()) + [t for b in self.blocks for t in b.shuffle.buffers()]
        key = _tensor_key(self._pack_params)
        if key is None:  # e.g. inference tensors have no version counter
            return self.pack(self.fast_dtype)
        key = (self.fast_dtype, self.fast_onednn, key)
        if self._pack_cache is None or self._pack_cache[0] != key:
            self._pack_cache = None  # free the old copy first
            cpu = self.fast_onednn and self._pack_params[0].device.type == "cpu"
            pack = self.pack(self.fast_dtype, cpu_inference=cpu)
            # the input layers' column blocks as contiguous copies (strided rows cost ~10 % at small sizes)
            pack.w_in = [w.contiguous() for w in pack.w_in]
            pack.w_cond = None if pack.w_cond is None else pack.w_cond.contiguous()
            pack.plan = _build_plan(pack)
            self._pack_cache = (key, pack)
        return self._pack_cache[1]

    # The fast passes carry activations feature-major, (dim, B): every layer is W @ a, so the
    # weights are read in their stored (out, in) order, the halves of a coupling are row
    # slices, and the s/t input layer of a coupling is one matmul with the rows [W_s; W_t].

    def _input_terms(self, p: FlowPack, cond: torch.Tensor | None, repeats: int = 1) -> tuple[torch.Tensor, ...]:
        """Bias + condition part of every coupling's input layer, K x (2H, B) or (2H, 1): one matmul
        (on the distinct conditions, then repeated ``repeats`` times)."""
        k = len(p.w_in)
        if cond is None or p.w_cond is None:
            return p.b_in.view(k, -1, 1).unbind(0)
        terms = torch.addmm(p.b_in, p.w_cond, cond.t().to(p.w_cond.dtype))  # (K * 2H, B / repeats)
        if repeats > 1 and terms.shape[1] > 1:  # one condition: a (2H, 1) column broadcasts in addmm
            terms = terms.repeat_interleave(repeats, dim=1)
        return terms.view(k, -1, terms.shape[1]).unbind(0)

    def _subnets(self, p: FlowPack, j: int, x_a: torch.Tensor, terms: tuple[torch.Tensor, ...]):
        """s (tanh) and t of coupling ``j`` for the kept half x_a (dim_a, B); both in x_a's dtype."""
        dtype, w_in = x_a.dtype, p.w_in[j]
        a = torch.addmm(terms[j], w_in, x_a if w_in.dtype == dtype else x_a.to(w_in.dtype))  # (2H, B): [s; t]
        a = a.view(2, -1, a.shape[-1])
        if p.onednn is None:
            for w, b in p.hidden[j]:
                a = torch.baddbmm(b, w, F.leaky_relu(a, SUBNET_SLOPE))  # (2, out, B)
            s, t = a.unbind(0)  # unbind (not indexing): one node in the backward pass
        else:  # CPU inference: batch-major through pre-packed weights, bias and LeakyReLU fused
            s, t = (h.t() for h in F.leaky_relu(a, SUBNET_SLOPE).unbind(0))  # (B, H) each
            layers = p.onednn[j]
            for i, (w_s, w_t, b_s, b_t) in enumerate(layers):
                act, scalars = ("none", []) if i == len(layers) - 1 else ("leaky_relu", [SUBNET_SLOPE])
                s = torch.ops.mkldnn._linear_pointwise(s, w_s, b_s, act, scalars, "")
                t = torch.ops.mkldnn._linear_pointwise(t, w_t, b_t, act, scalars, "")
            s, t = s.t(), t.t()  # (out, B)
        if s.dtype != dtype:
            s, t = s.to(dtype), t.to(dtype)
        return torch.tanh(s), t

    def _workspace(self, p: FlowPack, batch: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
        """This thread's buffers from its last pass if the shapes match, else new ones (kept if small)."""
        key = _Workspace.key(p, batch, dtype, device)
        local = self._workspaces
        if local is None:
            local = self._workspaces = threading.local()
        last = getattr(local, "last", None)
        if last is not None and last[0] == key:
            return last[1]
        ws = _Workspace(p, batch, dtype, device)
        local.last = (key, ws) if ws.numel <= WORKSPACE_KEEP_NUMEL else None
        return ws

    def _cached_ok(self, p: FlowPack, x: torch.Tensor) -> bool:
        """The buffer-based inference passes apply: a cached pack, a batch, no autocast (out= ops)."""
        return p.plan is not None and x.shape[0] > 0 and not torch.is_autocast_enabled(x.device.type)

    def _fast_forward(self, x: torch.Tensor, cond: torch.Tensor | None):
        p = self._get_pack()
        if self._cached_ok(p, x):
            return self._cached_forward(p, x, cond)
        terms = self._input_terms(p, cond)
        halves = [p.dim_a, p.dim - p.dim_a]  # a split (not slicing) is one node in the backward pass
        even = halves[0] == halves[1]
        x = x.t().contiguous()  # (dim, B)
        s_all: list[torch.Tensor] = []  # every coupling's log-scale, summed once at the end
        for k in range(len(p.perm)):
            x = torch.addcmul(p.shift[k], x, p.scale[k])  # ActNorm
            # first coupling: [x_a, x_b] -> [x_a, y_b], then the half swap at dim // 2 == dim_a: [y_b, x_a]
            x_a, x_b = x.split_with_sizes(halves)
            s, t = self._subnets(p, 2 * k, x_a, terms)
            s_all.append(s)
            y_b = torch.addcmul(t, x_b, s.exp())
            # second coupling on [y_b, x_a]: with an even dim its halves are y_b and x_a themselves
            x_a, x_b = (y_b, x_a) if even else torch.cat([y_b, x_a]).split_with_sizes(halves)
            s, t = self._subnets(p, 2 * k + 1, x_a, terms)
            s_all.append(s)
            x = torch.cat([x_a, torch.addcmul(t, x_b, s.exp())])
            x = x.index_select(0, p.perm[k])  # Shuffle
        logdet = torch.cat(s_all).float().sum(0) + p.actnorm_logdet
        return x.t().contiguous(), logdet

    def _fast_inverse(self, y: torch.Tensor, cond: torch.Tensor | None, cond_repeats: int = 1):
        p = self._get_pack()
        if self._cached_ok(p, y):
            return self._cached_inverse(p, y, cond, cond_repeats)
        terms = self._input_terms(p, cond, cond_repeats)
        da, split = p.dim_a, p.dim - p.dim // 2  # kept half; where the inverse half swap cuts
        halves = [da, p.dim - da]
        y = y.t().contiguous()  # (dim, B)
        s_all: list[torch.Tensor] = []
        for k in reversed(range(len(p.perm))):
            y = y.index_select(0, p.inv_perm[k])  # Shuffle
            # second coupling: [y_a, y_b] -> [y_a, x_b], then the inverse half swap at `split`
            y_a, y_b = y.split_with_sizes(halves)
            s, t = self._subnets(p, 2 * k + 1, y_a, terms)
            s_all.append(s)
            x_b = (y_b - t) / s.exp()
            if split == da:  # even dim: the swapped vector is [x_b, y_a], i.e. the first coupling's halves
                y_a, y_b = x_b, y_a
            else:
                y = torch.cat([y_a, x_b])
                y_a, y_b = torch.cat([y[split:], y[:split]]).split_with_sizes(halves)
            # first coupling
            s, t = self._subnets(p, 2 * k, y_a, terms)
            s_all.append(s)
            y = torch.cat([y_a, (y_b - t) / s.exp()])
            y = torch.addcmul(p.neg_loc[k], y, p.inv_scale[k])  # ActNorm inverse
        logdet = -(torch.cat(s_all).float().sum(0) + p.actnorm_logdet)
        return y.t().contiguous(), logdet

    # ---- cached inference passes: per block one gather + one addcmul, couplings in place ----------
    def _cached_st(self, p: FlowPack, j: int, keep: torch.Tensor, terms: tuple[torch.Tensor, ...],
                   ws: _Workspace) -> torch.Tensor:
        """Coupling ``j`` on its kept half (dim_a, B): writes s to ``ws.s[j]`` and exp(s) to ``ws.e``;
        returns t (a view of the workspace, in the subnets' dtype)."""
        a2 = ws.a2
        torch.addmm(terms[j], p.w_in[j], keep if keep.dtype == a2.dtype else keep.to(a2.dtype), out=a2)
        x = F.leaky_relu_(ws.a3, SUBNET_SLOPE)
        if p.onednn is None:
            layers, spare = p.hidden[j], ws.h3
            for w, b in layers[:-1]:  # hidden layers, in turn between the two (2, H, B) buffers
                F.leaky_relu_(torch.baddbmm(b, w, x, out=spare), SUBNET_SLOPE)
                x, spare = spare, x
            w, b = layers[-1]
            torch.baddbmm(b, w, x, out=ws.o)
            s, t = ws.o0, ws.o1
        else:  # CPU inference through oneDNN pre-packed weights, batch-major, bias and LeakyReLU fused
            s, t = x[0].t(), x[1].t()
            layers = p.onednn[j]
            for i, (w_s, w_t, b_s, b_t) in enumerate(layers):
                act, scalars = ("none", []) if i == len(layers) - 1 else ("leaky_relu", [SUBNET_SLOPE])
                s = torch.ops.mkldnn._linear_pointwise(s, w_s, b_s, act, scalars, "")
                t = torch.ops.mkldnn._linear_pointwise(t, w_t, b_t, act, scalars, "")
            s, t = s.t(), t.t()
        s_j = ws.s[j]
        torch.tanh(s if s.dtype == s_j.dtype else s.to(s_j.dtype), out=s_j)
        torch.exp(s_j, out=ws.e)
        return t

    def _cached_forward(self, p: FlowPack, x: torch.Tensor, cond: torch.Tensor | None):
        """Forward pass with cached weights (no gradients): same math as ``FlowBlock.forward``."""
        plan, ws = p.plan, self._workspace(p, x.shape[0], x.dtype, x.device)
        terms = self._input_terms(p, cond)
        da, n = p.dim_a, len(p.perm)
        y = torch.addcmul(plan.fwd_shift0, x.t(), plan.fwd_scale0, out=ws.y[0])  # ActNorm of block 0
        for k in range(n):
            lo, hi = ws.halves[k % 2][:2]  # [:da], [da:]
            t = self._cached_st(p, 2 * k, lo, terms, ws)  # first coupling: y_b = x_b * exp(s) + t
            hi.mul_(ws.e).add_(t)
            if da * 2 == p.dim:  # second coupling on the half-swapped vector [hi, lo]: kept hi, updates lo
                t = self._cached_st(p, 2 * k + 1, hi, terms, ws)
                lo.mul_(ws.e).add_(t)
            else:  # odd dim: the swapped halves are not row ranges of the buffer; materialise the swap
                y = torch.cat([hi, lo])
                t = self._cached_st(p, 2 * k + 1, y[:da], terms, ws)
                y[da:].mul_(ws.e).add_(t)
            if k == n - 1:
                out = y.t().index_select(1, plan.fwd_index[k])  # last permutation: the (B, dim) output
            else:  # permutation of block k, then ActNorm of block k + 1
                y = torch.index_select(y, 0, plan.fwd_index[k], out=ws.y[(k + 1) % 2])
                torch.addcmul(plan.fwd_shift[k], y, plan.fwd_scale[k], out=y)
        logdet = ws.s_all.sum((0, 1), dtype=torch.float32) + p.actnorm_logdet
        return out, logdet

    def _cached_inverse(self, p: FlowPack, v: torch.Tensor, cond: torch.Tensor | None, repeats: int = 1):
        """Inverse pass with cached weights (no gradients): same math as ``FlowBlock.inverse``."""
        plan, ws = p.plan, self._workspace(p, v.shape[0], v.dtype, v.device)
        terms = self._input_terms(p, cond, repeats)
        n = len(p.perm)
        y = torch.index_select(v.t(), 0, plan.inv_index[0], out=ws.y[0])  # permutation of the last block
        for i, k in enumerate(reversed(range(n))):
            lo_a, hi_a, lo_b, hi_b = ws.halves[i % 2]  # [:da], [da:], [:db], [db:]
            t = self._cached_st(p, 2 * k + 1, lo_a, terms, ws)  # second coupling: y_b = (y_b - t) / exp(s)
            hi_a.sub_(t).div_(ws.e)
            # the buffer now holds the half-swapped vector [y_b (db), x_a (da)]: the first coupling
            t = self._cached_st(p, 2 * k, hi_b, terms, ws)
            lo_b.sub_(t).div_(ws.e)
            if k > 0:  # ActNorm of block k inverse, then block k - 1's inverse permutation
                y = torch.index_select(y, 0, plan.inv_index[i + 1], out=ws.y[(i + 1) % 2])
                torch.addcmul(plan.inv_shift[i + 1], y, plan.inv_scale[i + 1], out=y)
        out = torch.addcmul(plan.inv_shift_out, y.t().index_select(1, plan.inv_index_out), plan.inv_scale_out)
        logdet = -(ws.s_all.sum((0, 1), dtype=torch.float32) + p.actnorm_logdet)
        return out, logdet


def _tensor_key(tensors: list[torch.Tensor]) -> tuple | None:
    """Storage pointers and version counters: a cache keyed by this sees ``.to()`` and in-place updates
    (optimizer steps, ``load_state_dict``); ``None`` where a tensor has no version counter."""
    try:
        return tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(_VERSION, tensors))
    except RuntimeError:  # inference tensors
        return None


_VERSION = operator.attrgetter("_version")


def _stacked_base(params: list[torch.Tensor]) -> torch.Tensor | None:
    """A (detached) tensor whose rows are ``params``, if they lie back to back in one storage, else None."""
    first = params[0]
    if not first.is_contiguous():
        return None
    step, size = first.numel() * first.element_size(), first.shape
    ptr = first.data_ptr()
    for i, q in enumerate(params):
        if q.data_ptr() != ptr + i * step or q.shape != size or q.dtype != first.dtype or not q.is_contiguous():
            return None
    storage = first.untyped_storage()
    if first.storage_offset() * first.element_size() + len(params) * step > storage.nbytes():
        return None  # (pointers that merely follow on in memory, in another storage)
    return first.detach().as_strided((len(params), *size), (first.numel(), *first.stride()))


class _StackedParams(torch.autograd.Function):
    """``base`` (whose rows are ``params``' own storage) as ``groups`` equal views: a stack without a
    copy. Backward: each parameter's gradient is a view of its group's gradient (no concatenation)."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, groups: int, *params: torch.Tensor):
        return tuple(base.view(groups, -1, *base.shape[1:]).unbind(0))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, None, *(g_param for g in grads for g_param in g.unbind(0)))


def _stack(params: list[torch.Tensor], groups: int) -> tuple[torch.Tensor, ...]:
    """``torch.stack(params)`` in ``groups`` equal parts along dim 0 (differentiable): views when the
    parameters lie back to back in one storage (``Flow.stack_parameters``), else one copy."""
    base = _stacked_base(params)
    if base is None:
        # split (not indexing): its backward is a single concatenation of the gradients
        return torch.stack(params).split(len(params) // groups)
    if torch.is_grad_enabled() and any(q.requires_grad for q in params):
        return _StackedParams.apply(base, groups, *params)
    return base.view(groups, -1, *base.shape[1:]).unbind(0)


def _reorder(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous())


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _unshare_state(flow: "Flow", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` of a flow whose parameters share stacked storage (``stack_parameters``): give each
    entry its own storage, as on the plain path (safetensors refuses tensors that share memory)."""
    for key, value in state_dict.items():
        if (key.startswith(prefix) and not isinstance(value, nn.Parameter)
                and value.untyped_storage().nbytes() != value.numel() * value.element_size()):
            state_dict[key] = value.clone()


def _drop_pack_cache(flow: "Flow", *args) -> None:
    """Forget the fast path's cached weights (a state-dict load or ``.to()`` may replace them)."""
    flow._pack_cache = None
    flow._pack_params = None
    flow._workspaces = None
    flow._layers = None


def set_fast_path(
    module: nn.Module, enabled: bool = True, dtype: torch.dtype | None = None, cache: bool = True
) -> nn.Module:
    """Switch every ``Flow`` inside ``module`` to (or back from) the fast path; returns ``module``.

    Args:
        enabled: use stacked-subnet batched matmuls without host synchronisation.
        dtype: run the subnet matmuls in this dtype (e.g. ``torch.bfloat16``); the flow's
            activations and log-determinant stay in the input dtype. ``None``: the weights'
            dtype (an enclosing ``torch.autocast`` still applies).
        cache: keep the stacked weights between calls while gradients are off (inference);
            costs one extra copy of the subnet weights (in ``dtype``).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"fast-path dtype must be a floating dtype, got {dtype}")
    flows = [m for m in module.modules() if isinstance(m, Flow)]
    if not flows:
        raise ValueError(f"{type(module).__name__} contains no Flow")
    for f in flows:
        f.fast_path, f.fast_dtype, f.fast_cache = bool(enabled), dtype, bool(cache)
        if not (enabled and cache):
            f._pack_cache = None  # the cache is keyed by dtype and parameter versions: keep it otherwise
    return module


@contextlib.contextmanager
def fast_path(
    module: nn.Module, enabled: bool = True, dtype: torch.dtype | None = None, cache: bool = True
) -> Iterator[nn.Module]:
    """Context manager form of ``set_fast_path``; restores the previous options on exit."""
    flows = [m for m in module.modules() if isinstance(m, Flow)]
    before = [(f.fast_path, f.fast_dtype, f.fast_cache) for f in flows]
    set_fast_path(module, enabled, dtype, cache)
    try:
        yield module
    finally:
        for f, (e, d, c) in zip(flows, before):
            f.fast_path, f.fast_dtype, f.fast_cache, f._pack_cache = e, d, c, None


def standard_normal_nll(v: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood (nats) of ``v`` under N(0, I) plus the flow's logdet."""
    v = v.float().flatten(1)
    d = v.shape[1]
    return 0.5 * (v**2).sum(1) + 0.5 * d * torch.log(torch.tensor(2 * torch.pi)) - logdet


def bits_per_dim(nll: torch.Tensor, dim: int) -> torch.Tensor:
    return nll / (dim * torch.log(torch.tensor(2.0)))
