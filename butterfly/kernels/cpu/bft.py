"""The "cpu" backend of ``butterfly::bft`` and its fused form ``butterfly::bft_fused``: the C++
operators ``butterfly_cpu::forward``, ``backward`` and ``forward_fused`` (``csrc/bft/``), and the
prepared forms of the fused inference layers (``csrc/bft/prepared.cpp``,
:func:`butterfly.ops.dispatch.register_prepared`).

The kernels compute in float32 (bfloat16 and float16 inputs accumulate in float32) or float64;
other dtype combinations (a float64 weight with a non-float64 input) run the reference. The fused
form applies the epilogue (per-channel scale and shift, activation, add; see
:mod:`butterfly.ops.bft_fused`) to every output tile while it is still in registers, just before
its one store. When ``butterfly::bft_fused`` picks it, the backend's dtype checks and the
operator's epilogue checks have already run. The backend calls the C++ operators directly,
without a Python ``custom_op`` wrapper in between (which costs tens of microseconds per call).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...ops.bft_fused import register_fused
from ...ops.dispatch import Backend, register_backend, register_prepared
from ...ops.reference import compute_dtype
from ...plan import BFTPlan
from .build import KERNEL_DTYPES, native, unavailable


def _unsupported(x: Tensor, weight: Tensor, radices: Sequence[int]) -> str:
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        return f"the kernel does not take {x.dtype} input with a {weight.dtype} weight"
    if weight.dtype == torch.float64 and x.dtype != torch.float64:
        return (f"a float64 weight with {x.dtype} input computes in float64, which the kernel "
                "does only for float64 input")
    return ""


def _cast(x: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """A weight or epilogue tensor in the kernel's compute dtype for input ``x``."""
    return None if t is None else t.to(compute_dtype(x)).contiguous()


def _forward(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
             residual: bool) -> Tensor:
    return torch.ops.butterfly_cpu.forward(x.contiguous(), _cast(x, weight), radices,
                                           out_channels, residual)


def _backward(grad: Tensor, x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
              residual: bool) -> Tuple[Tensor, Tensor]:
    grad_x, grad_w = torch.ops.butterfly_cpu.backward(
        grad.to(x.dtype).contiguous(), x.contiguous(), _cast(x, weight), radices, out_channels,
        residual)
    return grad_x, grad_w.to(weight.dtype)


def _fused(x: Tensor, weight: Tensor, radices: List[int], out_channels: int, residual: bool,
           scale: Optional[Tensor], shift: Optional[Tensor], activation: str,
           add: Optional[Tensor]) -> Tensor:
    return torch.ops.butterfly_cpu.forward_fused(   # x: contiguous, or rows at a stride
        x, _cast(x, weight), radices, out_channels, residual, _cast(x, scale), _cast(x, shift),
        activation, None if add is None else add.contiguous())


def _prepare_bft(weight: Tensor, plan: BFTPlan, residual: bool, scale: Optional[Tensor],
                 shift: Optional[Tensor], activation: str, dtype: torch.dtype):
    """A fused BFT for inputs of ``dtype`` (weight, scale and shift in its compute dtype):
    ``PreparedBFT`` of ``csrc/bft/prepared.cpp``, called as ``(x, add=None)`` on images."""
    return native().PreparedBFT(weight.view(plan.num_blocks, plan.weights_per_block),
                                list(plan.radices), plan.in_channels, plan.out_channels,
                                residual, scale, shift, activation, dtype)


def _prepare_depthwise(weight: Tensor, bias: Optional[Tensor], stride: int, activation: str,
                       dtype: torch.dtype):
    """A fused depthwise conv for float32 or float64 inputs of ``dtype`` (weight and bias in it):
    ``PreparedDepthwise``, called as ``(x)``."""
    return native().PreparedDepthwise(weight, bias, stride, activation, dtype)


def _prepare_dw_bft(depthwise, weight: Tensor, plan: BFTPlan, residual: bool,
                    scale: Optional[Tensor], shift: Optional[Tensor], activation: str):
    """The depthwise -> BFT block in one pass, from a prepared depthwise conv and the BFT's
    arguments as for ``_prepare_bft``: ``PreparedDepthwiseBFT``, called as ``(x, add=None)`` on
    channels_last images."""
    return native().PreparedDepthwiseBFT(depthwise,
                                         weight.view(plan.num_blocks, plan.weights_per_block),
                                         list(plan.radices), plan.out_channels, residual, scale,
                                         shift, activation)


register_backend(Backend("cpu", _forward, _backward, unavailable, _unsupported, degrades=True,
                         auto_devices=("cpu",), auto_priority=10))
register_fused("cpu", _fused)
register_prepared("cpu", "bft_fused", _prepare_bft)
register_prepared("cpu", "depthwise_conv", _prepare_depthwise)
register_prepared("cpu", "dw_bft_fused", _prepare_dw_bft)
