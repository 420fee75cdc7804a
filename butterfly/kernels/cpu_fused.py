"""The "cpu" backend's fused form of ``butterfly::bft_fused``: the C++ operator
``butterfly_cpu::forward_fused`` (``csrc/bft_cpu.cpp``).

The kernel applies the epilogue (per-channel scale and shift, activation, add; see
:mod:`butterfly.epilogue`) to every output tile while it is still in registers, just before its
one store, so that BFT -> BatchNorm -> activation (-> skip add) costs one pass over memory, as the
plain forward does. It computes in the kernel's compute dtype (float32 for float32, bfloat16 and
float16 input; float64 for float64) and rounds once to x's dtype. This module registers the
operator's fake implementation (for ``torch.compile``) and the fused form; when
``butterfly::bft_fused`` picks it, the "cpu" backend's dtype checks and the operator's epilogue
checks (shapes, devices, add's dtype) have already run.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..epilogue import register_fused
from . import cpu

_fake_registered = False


def _register_fake_kernel() -> None:
    """The output shape of ``butterfly_cpu::forward_fused`` for FakeTensor tracing, once per
    process; the operator must exist (the extension loaded)."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("butterfly_cpu::forward_fused")
    def _(x, weight, radices, out_channels, residual, scale, shift, activation, add):
        return x.new_empty(x.shape[0], out_channels, x.shape[2])

    _fake_registered = True


def load_extension() -> Optional[str]:
    """:func:`butterfly.kernels.cpu.load_extension`, with the fused operator's fake
    implementation registered; the extension's name, or ``None`` if it is unavailable."""
    name = cpu.load_extension()
    if name is not None:
        _register_fake_kernel()
    return name


def _compute(x: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel epilogue tensor in the kernel's compute dtype."""
    if t is None:
        return None
    return t.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def _fused(x: Tensor, weight: Tensor, radices: List[int], out_channels: int, residual: bool,
           scale: Optional[Tensor], shift: Optional[Tensor], activation: str,
           add: Optional[Tensor]) -> Tensor:
    if not _fake_registered:  # the backend was chosen, so the extension is loaded
        _register_fake_kernel()
    return torch.ops.butterfly_cpu.forward_fused(   # x: contiguous, or rows at a stride
        x, cpu._kernel_weight(x, weight), radices, out_channels, residual,
        _compute(x, scale), _compute(x, shift), activation,
        None if add is None else add.contiguous())


register_fused("cpu", _fused)
