"""``DepthwiseConv2d``: a drop-in ``nn.Conv2d`` whose depthwise form runs the operator
``butterfly::depthwise_conv`` (:mod:`butterfly.ops.depthwise`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.depthwise import STRIDES, run_depthwise

__all__ = ["DepthwiseConv2d", "is_operator_conv"]


def is_operator_conv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is what ``butterfly::depthwise_conv`` computes: depthwise (``groups ==
    in_channels == out_channels``), a square odd kernel, zero padding ``k // 2``, dilation 1 and
    equal strides of 1 or 2."""
    k = conv.kernel_size
    if isinstance(conv.padding, str):
        padded = conv.padding == "same" and tuple(conv.stride) == (1, 1)
    else:
        padded = tuple(conv.padding) == (k[0] // 2, k[1] // 2)
    return (conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1]
            and k[0] % 2 == 1 and padded and tuple(conv.dilation) == (1, 1)
            and conv.stride[0] == conv.stride[1] and conv.stride[0] in STRIDES
            and conv.padding_mode == "zeros")


@torch.fx.wrap
def _layer_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """:class:`DepthwiseConv2d`'s operator call; one node under ``torch.fx`` tracing (timm's FX
    feature extractors), which cannot branch on the input's rank."""
    if x.dim() != 4:  # unbatched (C, H, W): nn.Conv2d's semantics
        return F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, 1, weight.shape[0])
    return run_depthwise(x, weight, bias, stride, "none")


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and state_dict) whose depthwise form runs
    ``butterfly::depthwise_conv``: ``groups == in_channels == out_channels``, a square odd
    kernel, padding ``k // 2`` with zeros, dilation 1, equal strides of 1 or 2. Any other
    configuration, ``torch.jit`` tracing, ONNX export and inference under ``torch.compile`` run
    ``nn.Conv2d.forward`` (unbatched input: ``F.conv2d``). ``torch.fx`` traces the operator's
    call as one node.

    ``DepthwiseConv2d(C, C, 3, stride, 1, groups=C, bias=False)`` replaces
    ``nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=False)``; :meth:`from_conv` wraps an existing
    conv, sharing its parameters."""

    def runs_operator(self) -> bool:
        """Whether :meth:`forward` runs the operator (for 4-d input)."""
        return is_operator_conv(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.runs_operator() and not torch.jit.is_tracing() and \
                not torch.onnx.is_in_onnx_export() and not self._inductor_infers(x):
            return _layer_forward(x, self.weight, self.bias, self.stride[0])
        return super().forward(x)

    def _inductor_infers(self, x: Tensor) -> bool:
        """Whether inductor's own convolution runs this call: under torch.compile without
        gradients (inference), where inductor folds BatchNorm into it with freezing. With
        gradients the operator's backward is faster, so training keeps the operator (the models
        and training benchmarks measure both; docs/depthwise.md)."""
        return torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A ``DepthwiseConv2d`` with the configuration of ``conv`` and its parameters (the same
        ``nn.Parameter`` objects: an optimizer that holds them keeps working)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device="meta")
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.train(conv.training)
        return layer
