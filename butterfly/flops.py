"""Multiply-add counts as the papers report them ("MFLOPs" in the BFT and MobileNet papers).

Counted: convolutions, linear/matmul layers and the BFT operator (each a multiply-add = 1).
Not counted: BatchNorm, activations, pooling, additions, channel shuffles. A BFT counts what it
executes, ``layer.macs_per_pixel`` per output pixel (padding and every tiled block included).

``torch.utils.flop_counter.FlopCounterMode`` counts the same layers (its unit is 2 x MACs); the
formula for the ``butterfly::bft`` operator is registered in :mod:`butterfly.ops`.
"""
from __future__ import annotations

from collections import Counter
import warnings
from typing import Any, List, Sequence

import torch
from torch import nn

# fvcore counts the multiply-adds. It is a dependency of the package, but an environment without
# it (an image with its own packages) still imports butterfly: counting then raises, saying why.
try:
    with warnings.catch_warnings():  # its import touches torch.jit.script, deprecated in torch 2.9+
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis as _FvcoreFlopCountAnalysis
        from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
        from fvcore.nn.jit_handles import get_shape
    FVCORE_ERROR = ""
except ImportError as error:
    _FvcoreFlopCountAnalysis = object
    FVCORE_ERROR = (f"counting multiply-adds needs fvcore, which failed to import ({error}); "
                    "install it with pip install fvcore")

from .plan import BFTPlan
from .passes.fuse import is_fused
from .passes.surgery import eval_mode

BFT_OPS = ("butterfly::bft",)
# fvcore's handles for the layers that multiply (its unit is the multiply-add).
COUNTED = ("aten::_convolution", "aten::addmm", "aten::linear", "aten::matmul", "aten::mm",
           "aten::bmm", "aten::einsum")

# Ops fvcore meets in the zoo that the papers leave out of their counts.
NOT_COUNTED = (
    "aten::batch_norm", "aten::adaptive_avg_pool2d", "aten::mean", "aten::max_pool2d",
    "aten::avg_pool2d", "aten::hardswish", "aten::hardswish_", "aten::hardsigmoid",
    "aten::hardtanh", "aten::hardtanh_", "aten::sigmoid", "aten::add", "aten::add_", "aten::mul",
    "aten::mul_", "aten::transpose", "aten::view", "aten::split", "aten::split_with_sizes",
    "aten::channel_shuffle", "aten::pixel_shuffle",
    # elementwise activations of other networks (torchvision's EfficientNet, ...)
    "aten::silu", "aten::silu_", "aten::sigmoid_", "aten::gelu", "aten::tanh", "aten::relu6",
    "aten::dropout", "aten::dropout_",
)


def bft_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """fvcore handle for ``butterfly::bft(x, weight, radices, out_channels, residual)``: the
    multiply-adds of the plan, ``macs_per_pixel * B * P`` for ``x`` of shape ``(B, C_in, P)``."""
    batch, in_channels, pixels = get_shape(inputs[0])
    radices = [v.toIValue() for v in inputs[2].node().inputs()]  # a traced list is a ListConstruct
    plan = BFTPlan.of(in_channels, inputs[3].toIValue(), radices)
    return Counter({"bft": plan.macs_per_pixel * batch * pixels})


class FlopCountAnalysis(_FvcoreFlopCountAnalysis):
    """fvcore's ``FlopCountAnalysis`` that counts BFT layers and nothing the papers leave out.

    ``FlopCountAnalysis(model, (x,)).total()`` is the multiply-add count of conv, linear and BFT
    layers; ``.by_module()`` / ``.by_operator()`` break it down. To count BatchNorm again, use
    ``.set_op_handle("aten::batch_norm", fvcore.nn.jit_handles.batchnorm_flop_jit)``."""

    def __init__(self, model: nn.Module, inputs: Any):
        if FVCORE_ERROR:
            raise ImportError(FVCORE_ERROR)
        super().__init__(model, inputs)
        self.clear_op_handles()
        self.set_op_handle(**{op: _DEFAULT_SUPPORTED_OPS[op] for op in COUNTED})
        self.set_op_handle(**{op: bft_flop_jit for op in BFT_OPS})
        self.set_op_handle(**{op: None for op in NOT_COUNTED})


def _example_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    if len(input_size) not in (3, 4):
        raise ValueError(f"input_size must be (C, H, W) or (N, C, H, W), got {tuple(input_size)}")
    shape = tuple(input_size) if len(input_size) == 4 else (1, *input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of ``model`` on a zero input of ``input_size``
    (``(C, H, W)`` for one image, or ``(N, C, H, W)``), counted as the papers count them.
    The model is run in eval mode under ``torch.no_grad()``; its mode is restored."""
    if is_fused(model):
        raise TypeError("count_macs takes the model before optimize_for_inference (the fused "
                        "model computes the same multiply-adds). To count a fused model, use "
                        "torch.utils.flop_counter.FlopCounterMode, which counts its operators")
    x = _example_input(model, input_size)
    with eval_mode(model), torch.no_grad():
        analysis = FlopCountAnalysis(model, (x,))
        analysis.unsupported_ops_warnings(True).uncalled_modules_warnings(False)
        return int(analysis.total())
