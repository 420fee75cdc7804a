"""The depthwise-separable block as one operator, ``butterfly::dw_bft_fused``: a depthwise conv
with its bias and activation, then a BFT with its epilogue (:mod:`butterfly.ops.bft_fused`),

    h = dw_activation(depthwise_conv(x, dw_weight, stride) + dw_bias)
    y = activation(bft(h) * scale + shift) + add

in one pass over tiles of output pixels on CPU: for each tile the depthwise conv computes the
tile's channels into a buffer that stays in cache and the BFT reads them from there, so ``h``
never goes to memory (``csrc/dw_bft_cpu.cpp``). BFT networks at equal multiply-adds are 2-4x
wider than dense ones, so ``h`` is 2-4x larger; the pass saves writing it and reading it back.

The kernel takes channels_last float32/float64 CPU input, kernel sizes 3, 5, 7 and strides 1
and 2; everything else, and the ``"reference"`` backend, runs :func:`separable_reference`: the
depthwise operator and ``butterfly::bft_fused`` one after the other, the oracle the kernel is
tested against. For inference only: the operator has no gradient.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from ..plan import BFTPlan
from .bft_fused import Epilogue, bft_fused_image, check_epilogue, register_inference_only
from .depthwise import KERNEL_SIZES, STRIDES, check_args, depthwise_conv, kernel_available
from .dispatch import backend_for

__all__ = ["dw_bft_fused", "kernel_applies", "output_shape", "separable_reference"]


def output_shape(x: Tensor, dw_weight: Tensor, stride: int, out_channels: int):
    """``(N, C_out, H_out, W_out)`` of the block on ``x``."""
    N, _, H, W = x.shape
    k = dw_weight.shape[-1]
    return (N, out_channels, (H + 2 * (k // 2) - k) // stride + 1,
            (W + 2 * (k // 2) - k) // stride + 1)


def kernel_applies(x: Tensor, dw_weight: Tensor, stride: int) -> bool:
    """Whether :func:`dw_bft_fused` runs the one-pass C++ kernel for this input: a channels_last
    float32/float64 CPU batch, a kernel size and stride it takes, the ``"cpu"`` backend chosen
    (:func:`butterfly.ops.backend_for`) and the kernel built."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous(memory_format=torch.channels_last)
            and dw_weight.shape[-1] in KERNEL_SIZES and stride in STRIDES
            and backend_for(x.device, x, dw_weight).name == "cpu" and kernel_available())


def separable_reference(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], stride: int,
                        dw_activation: str, weight: Tensor, radices: List[int],
                        out_channels: int, residual: bool, scale: Optional[Tensor],
                        shift: Optional[Tensor], activation: str,
                        add: Optional[Tensor]) -> Tensor:
    """The two layers one after the other: ``butterfly::depthwise_conv`` then
    ``butterfly::bft_fused`` (each on the backend chosen for it)."""
    h = depthwise_conv(x, dw_weight, dw_bias, stride, dw_activation)
    plan = BFTPlan.of(x.shape[1], out_channels, radices)
    return bft_fused_image(h, weight, plan, residual,
                           Epilogue(scale, shift, activation, add is not None), add)


def _run(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], stride: int,
         dw_activation: str, weight: Tensor, radices: List[int], out_channels: int,
         residual: bool, scale: Optional[Tensor], shift: Optional[Tensor], activation: str,
         add: Optional[Tensor]) -> Tensor:
    args = (x, dw_weight, dw_bias, stride, dw_activation, weight, radices, out_channels, residual,
            scale, shift, activation, add)
    if not kernel_applies(x, dw_weight, stride):
        return separable_reference(*args)
    dt = x.dtype
    cast = (lambda t: None if t is None else t.to(dt))
    return torch.ops.butterfly_cpu.dw_bft_fused(
        x, dw_weight.to(dt), cast(dw_bias), stride, dw_activation, weight.to(dt), radices,
        out_channels, residual, cast(scale), cast(shift), activation,
        None if add is None else add.contiguous(memory_format=torch.channels_last))


@torch.library.custom_op("butterfly::dw_bft_fused", mutates_args=())
def _dw_bft_fused_op(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], stride: int,
                     dw_activation: str, weight: Tensor, radices: List[int], out_channels: int,
                     residual: bool, scale: Optional[Tensor], shift: Optional[Tensor],
                     activation: str, add: Optional[Tensor]) -> Tensor:
    return _run(x, dw_weight, dw_bias, stride, dw_activation, weight, radices, out_channels,
                residual, scale, shift, activation, add)


@_dw_bft_fused_op.register_fake
def _(x, dw_weight, dw_bias, stride, dw_activation, weight, radices, out_channels, residual,
      scale, shift, activation, add):
    shape = output_shape(x, dw_weight, stride, out_channels)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


register_inference_only(_dw_bft_fused_op, "butterfly::dw_bft_fused")


@register_flop_formula(torch.ops.butterfly.dw_bft_fused)
def _flop_formula(x_shape, dw_shape, dw_bias_shape, stride, dw_activation, w_shape, radices,
                  out_channels, *args, out_shape=None, **kwargs) -> int:
    """The depthwise conv's and the transform's multiply-adds (x2); epilogues not counted."""
    N, C, H, W = x_shape
    k = dw_shape[-1]
    pixels = N * ((H - 1) // stride + 1) * ((W - 1) // stride + 1)
    return 2 * pixels * (C * k * k + BFTPlan.of(C, out_channels, radices).macs_per_pixel)


def dw_bft_fused(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], stride: int,
                 dw_activation: str, weight: Tensor, plan: BFTPlan, residual: bool,
                 epilogue: Epilogue, add: Optional[Tensor] = None) -> Tensor:
    """The depthwise conv ``dw_weight`` ``(C, 1, k, k)`` (padding ``k // 2``, ``stride``) with
    ``dw_bias`` and ``dw_activation``, then the BFT of ``plan`` (``weight`` as the layer holds it)
    with ``epilogue``, on ``x`` ``(N, C, H, W)``; ``add`` is the epilogue's second input. The
    output has the format the reference gives (channels_last for channels_last input)."""
    check_args(x, dw_weight, dw_bias, stride, dw_activation)
    if plan.in_channels != x.shape[1]:
        raise ValueError(f"dw_bft_fused: the BFT takes {plan.in_channels} channels but the input "
                         f"has {x.shape[1]}")
    if epilogue.add != (add is not None):
        raise ValueError("the epilogue adds a tensor: pass add=" if epilogue.add else
                         "add= was given, but the epilogue has no add step")
    check_epilogue(x, plan.out_channels, epilogue.scale, epilogue.shift, epilogue.activation,
                   add, out_shape=output_shape(x, dw_weight, stride, plan.out_channels))
    args = (x, dw_weight, dw_bias, stride, dw_activation,
            weight.reshape(plan.num_blocks, plan.weights_per_block), list(plan.radices),
            plan.out_channels, residual, epilogue.scale, epilogue.shift, epilogue.activation, add)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or \
            _get_current_dispatch_mode() is not None:   # traced or counted as one operator
        return torch.ops.butterfly.dw_bft_fused(*args)
    return _run(*args)   # eager inference: the body without the dispatcher's overhead
