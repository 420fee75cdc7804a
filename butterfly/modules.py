"""``BFT`` and ``BFTLinear``: drop-in replacements for a 1x1 ``nn.Conv2d`` and for ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .init import init_bft_
from .ops import bft, check_input
from .plan import BFTPlan, make_plan


class _BFTBase(nn.Module):
    """Holds the weights of a BFT and applies it to ``(B, C, P)`` tensors."""

    def __init__(self, in_channels: int, out_channels: int, base: int = 4, residual: bool = True,
                 bias: bool = False, init: str = "paper", device=None, dtype=None):
        super().__init__()
        self.plan: BFTPlan = make_plan(in_channels, out_channels, base)
        self.base = base
        self.residual = bool(residual)
        self.init = init
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self._weight_shape(), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def _weight_shape(self) -> tuple:
        """``(L, n/k, k, k)`` for a single square block of uniform radix ``k`` (the binding
        layout), with a leading ``T`` for ``T`` blocks; ``(W,)`` / ``(T, W)`` for mixed radices."""
        plan = self.plan
        lead = (plan.num_blocks,) if plan.num_blocks > 1 else ()
        if len(set(plan.radices)) == 1:
            k = plan.radices[0]
            return lead + (len(plan.radices), plan.size // k, k, k)
        return lead + (plan.weights_per_block,)

    def reset_parameters(self) -> None:
        init_bft_(self.weight.view(self.plan.num_blocks, self.plan.weights_per_block), self.plan,
                  self.init, self.residual)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _apply(self, fn, recurse=True):
        # Memory formats are for activations: under model.to(memory_format=...) the weight keeps its
        # contiguous binding layout (a 5-D weight would even make channels_last fail), so `fn`
        # sees it as a flat vector.
        w, shape = self.weight, self.weight.shape
        w.data = w.data.reshape(-1)
        if w.grad is not None:
            w.grad = w.grad.reshape(-1)
        try:
            return super()._apply(fn, recurse)
        finally:
            w = self.weight
            w.data = w.data.view(shape)
            if w.grad is not None:
                w.grad = w.grad.view(shape)

    @property
    def radices(self) -> tuple:
        return self.plan.radices

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds this layer executes per pixel (or per row for ``BFTLinear``)."""
        return self.plan.macs_per_pixel

    def _apply_bft(self, x: Tensor) -> Tensor:
        y = bft(x, self.weight, self.plan, self.residual)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1)
        return y

    @classmethod
    def from_dense(cls, weight, bias: Optional[Tensor] = None, **kwargs) -> "_BFTBase":
        """A layer of this class fitted to a dense one: a 1x1 ``nn.Conv2d`` / ``nn.Linear`` or its
        ``(out, in[, 1, 1])`` weight; keyword arguments and the fit are those of
        :func:`butterfly.conversion.from_dense`."""
        from .conversion import from_dense
        return from_dense(weight, bias, linear=issubclass(cls, BFTLinear), **kwargs)

    def to_dense(self) -> Tensor:
        """The exact ``(out, in)`` matrix the layer applies (residual included, bias excluded)."""
        eye = torch.eye(self.plan.in_channels, dtype=self.weight.dtype, device=self.weight.device)
        out = bft(eye.unsqueeze(-1), self.weight, self.plan, self.residual)
        return out.squeeze(-1).t()

    def extra_repr(self) -> str:
        p = self.plan
        s = f"{p.in_channels}, {p.out_channels}, base={self.base}, radices={p.radices}"
        if p.num_blocks > 1:
            s += f", blocks={p.num_blocks}"
        if p.size != p.block:
            s += f", padded={p.block}->{p.size}"
        return s + f", residual={self.residual}, bias={self.bias is not None}"


class BFT(_BFTBase):
    """Butterfly Transform: a learned O(n log n) replacement for ``nn.Conv2d(in, out, 1)``.

    Takes ``(N, C_in, H, W)`` input in either memory format and returns ``(N, C_out, H, W)`` in the
    same format. ``base`` is the preferred radix (the paper's k), ``residual`` adds the identity
    (``Bx + x``), ``init`` is one of ``"paper"``, ``"identity"``, ``"ortho"`` (see
    :mod:`butterfly.init`). Channel counts that are not powers of ``base`` and ``in != out`` are
    supported (see :mod:`butterfly.plan`); ``macs_per_pixel`` is what the layer executes.
    """

    def __init__(self, in_channels: int, out_channels: int, base: int = 4, residual: bool = True,
                 bias: bool = False, init: str = "paper", device=None, dtype=None):
        super().__init__(in_channels, out_channels, base, residual, bias, init, device, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"BFT expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}; "
                             "use BFTLinear for (..., features) input")
        check_input(x, self.weight, self.in_channels, x.shape[1], "BFT")
        N, C, H, W = x.shape
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            y = self._apply_bft(x.reshape(N, C, H * W))
            return y.view(N, self.out_channels, H, W)
        y = self._apply_bft(x.permute(0, 2, 3, 1).reshape(N * H * W, C, 1))
        return y.view(N, H, W, self.out_channels).permute(0, 3, 1, 2)

    def to_conv2d(self) -> nn.Conv2d:
        """The exactly equivalent ``nn.Conv2d(in, out, 1)`` (residual and bias folded in)."""
        from .deploy import dense_equivalent
        return dense_equivalent(self)


class BFTLinear(_BFTBase):
    """The BFT on the last dimension: a drop-in replacement for ``nn.Linear(in, out)``."""

    def __init__(self, in_features: int, out_features: int, base: int = 4, residual: bool = True,
                 bias: bool = False, init: str = "paper", device=None, dtype=None):
        super().__init__(in_features, out_features, base, residual, bias, init, device, dtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1:
            raise ValueError("BFTLinear expects an input with a feature dimension, got a scalar")
        check_input(x, self.weight, self.in_features, x.shape[-1], "BFTLinear")
        lead = x.shape[:-1]
        y = self._apply_bft(x.reshape(-1, self.in_features, 1))
        return y.view(*lead, self.out_features)

    def to_linear(self) -> nn.Linear:
        """The exactly equivalent ``nn.Linear(in, out)`` (residual and bias folded in)."""
        from .deploy import dense_equivalent
        return dense_equivalent(self)


def is_bft(module: nn.Module) -> bool:
    return isinstance(module, _BFTBase)
