"""The depthwise convolution ``butterfly::depthwise_conv``: a ``k x k`` conv per channel (padding
``k // 2``, stride 1 or 2), then ``+ bias[c]``, then an activation, fused on CPU.

BFT networks are 2-4x wider than the dense networks of the same multiply-adds, so their depthwise
3x3 convolutions cost 2-4x more and PyTorch's depthwise kernels (oneDNN) become a large share of
the step. This module is the operator, its backends and a drop-in layer:

* ``torch.ops.butterfly.depthwise_conv(x, weight, bias, stride, activation)`` and its backward
  ``torch.ops.butterfly.depthwise_conv_backward(grad, x, weight, stride, output_mask)`` are
  ``torch.library.custom_op`` operators with fake kernels and autograd, so ``torch.compile`` sees
  both (as single nodes). :func:`depthwise_conv` is the checked Python entry point.
* The implementation is chosen per call by :func:`butterfly.ops.backend_for`, the library's one
  fallback policy, under :func:`butterfly.use_backend`: the ``"cpu"`` backend (chosen by
  ``"auto"`` on CPU tensors) runs the fused C++ kernel ``butterfly_cpu::dw_forward`` /
  ``dw_backward`` (``csrc/dw_cpu.cpp``) for k = 3, 5, 7 and float32/float64 (bfloat16 and
  float16 compute in float32); everything else, and ``"reference"``, runs
  :func:`depthwise_reference`: ``F.conv2d(groups=C)`` and :func:`butterfly.ops.bft_fused.activate`,
  the oracle the kernel is tested against.
* :class:`DepthwiseConv2d` is an ``nn.Conv2d`` (same arguments, parameters and state_dict) whose
  forward runs the operator when the conv is depthwise with a square odd kernel, zero padding
  ``k // 2`` and dilation 1, and ``nn.Conv2d.forward`` otherwise (and under ``torch.jit``
  tracing, e.g. fvcore's FLOP count, and ONNX export).

Memory format: an input that is channels_last-contiguous (and not contiguous) gives a
channels_last output, anything else a contiguous one; the input gradient has the input's format.
The weight gradient is deterministic: bit-identical for the same inputs, whatever the number of
threads (docs/depthwise.md).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from .bft_fused import ACTIVATIONS, activate
from .dispatch import backend_for, current_backend, kernels_loaded, use_backend

KERNEL_SIZES = (3, 5, 7)
STRIDES = (1, 2)

__all__ = ["depthwise_conv", "depthwise_reference", "kernel_args", "kernel_available",
           "output_format", "run_depthwise"]


# ------------------------------------------------------------------------------ shape rules
def output_format(x: Tensor) -> torch.memory_format:
    """The memory format of the outputs for input ``x`` (the kernels' rule): channels_last when
    ``x`` is channels_last-contiguous and not contiguous, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _out_size(size, k: int, stride: int):
    return (size + 2 * (k // 2) - k) // stride + 1


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty(x: Tensor) -> Tensor:
    """The placeholder for a gradient that ``output_mask`` leaves out."""
    return x.new_empty(0)


# -------------------------------------------------------------------------------- reference
def depthwise_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
                        activation: str) -> Tensor:
    """The operator in plain PyTorch: ``activate(F.conv2d(x, weight, bias, stride, k // 2,
    groups=C))`` in float64 (any float64 operand) or float32, rounded once to ``x.dtype``."""
    dt, k = _compute_dtype(x, weight), weight.shape[-1]
    y = F.conv2d(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), stride, k // 2,
                 groups=x.shape[1])
    return activate(y, activation).to(x.dtype).contiguous(memory_format=output_format(x))


def depthwise_reference_backward(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
                                 output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_w, grad_b)`` of the convolution (no activation) by PyTorch's own
    ``convolution_backward``; a gradient that ``output_mask`` leaves out is an empty tensor."""
    dt, k, C = _compute_dtype(x, weight), weight.shape[-1], x.shape[1]
    mask = [bool(m) for m in output_mask]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.to(dt), x.to(dt), weight.to(dt), [C] if mask[2] else None, [stride, stride],
        [k // 2, k // 2], [1, 1], False, [0, 0], C, mask)
    gx = gx.to(x.dtype).contiguous(memory_format=output_format(x)) if mask[0] else _empty(x)
    gw = gw.to(weight.dtype).contiguous() if mask[1] else _empty(weight)
    gb = gb.to(weight.dtype).contiguous() if mask[2] else _empty(weight)
    return gx, gw, gb


# ----------------------------------------------------------------------------------- kernel
def kernel_available() -> bool:
    """Whether the fused C++ kernel is built and loaded (builds it on first use)."""
    return kernels_loaded("cpu", torch.device("cpu"))


def _use_kernel(x: Tensor, weight: Tensor, stride: int) -> bool:
    """Whether this call runs the C++ kernel: CPU tensors, a shape the kernel takes, and the
    ``"cpu"`` backend chosen by :func:`butterfly.ops.backend_for` (which warns once when a
    chosen backend cannot run and the reference runs instead)."""
    if x.device.type != "cpu" or weight.shape[-1] not in KERNEL_SIZES or stride not in STRIDES:
        return False
    return backend_for(x.device, x, weight).name == "cpu" and kernel_available()


def _kernel_param(x: Tensor, p: Tensor) -> Tensor:
    """A weight or bias in the kernel's compute dtype."""
    return p.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def kernel_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
                activation: str) -> Optional[tuple]:
    """The arguments after ``x`` of ``butterfly_cpu::dw_forward`` when the C++ kernel runs this
    call (weight and bias in the kernel's compute dtype), else None: for layers that prepare the
    kernel for later inputs like ``x`` (``butterfly.passes.fuse.FusedConv``)."""
    check_args(x, weight, bias, stride, activation)
    if not _use_kernel(x, weight, stride):
        return None
    return (_kernel_param(x, weight).contiguous(),
            None if bias is None else _kernel_param(x, bias).contiguous(), stride, activation)


# -------------------------------------------------------------------------------- operators
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
             activation: str) -> Tensor:
    """The body of ``butterfly::depthwise_conv``: the kernel or the reference."""
    if _use_kernel(x, weight, stride):
        return torch.ops.butterfly_cpu.dw_forward(
            x, _kernel_param(x, weight), None if bias is None else _kernel_param(x, bias), stride,
            activation)
    return depthwise_reference(x, weight, bias, stride, activation)


def _backward_body(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
                   output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """The body of ``butterfly::depthwise_conv_backward``."""
    if _use_kernel(x, weight, stride):
        gx, gw, gb = torch.ops.butterfly_cpu.dw_backward(grad, x, _kernel_param(x, weight),
                                                         stride, list(output_mask))
        return gx, gw.to(weight.dtype), gb.to(weight.dtype)
    return depthwise_reference_backward(grad, x, weight, stride, output_mask)


@torch.library.custom_op("butterfly::depthwise_conv", mutates_args=())
def _depthwise_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
                  activation: str) -> Tensor:
    return _forward(x, weight, bias, stride, activation)


@torch.library.custom_op("butterfly::depthwise_conv_backward", mutates_args=())
def _depthwise_backward_op(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
                           output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_body(grad, x, weight, stride, output_mask)


def fake_forward(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    N, C, H, W = x.shape
    k = weight.shape[-1]
    return torch.empty((N, C, _out_size(H, k, stride), _out_size(W, k, stride)), dtype=x.dtype,
                       device=x.device, memory_format=output_format(x))


def fake_backward(x: Tensor, weight: Tensor, output_mask) -> Tuple[Tensor, Tensor, Tensor]:
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                     memory_format=output_format(x)) if output_mask[0] else _empty(x)
    gw = weight.new_empty(weight.shape) if output_mask[1] else _empty(weight)
    gb = weight.new_empty(weight.shape[0]) if output_mask[2] else _empty(weight)
    return gx, gw, gb


@_depthwise_op.register_fake
def _(x, weight, bias, stride, activation):
    return fake_forward(x, weight, stride)


@_depthwise_backward_op.register_fake
def _(grad, x, weight, stride, output_mask):
    return fake_backward(x, weight, output_mask)


# Activations whose derivative the output determines; hardswish's needs the pre-activation,
# which the backward recomputes (one more forward, without the activation).
_FROM_OUTPUT = ("relu", "relu6", "hardsigmoid")


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, activation = inputs
    ctx.stride, ctx.activation, ctx.has_bias = stride, activation, bias is not None
    ctx.backend = current_backend()   # the backward runs on the forward's choice
    ctx.save_for_backward(x, weight, bias if activation == "hardswish" else None,
                          output if activation in _FROM_OUTPUT else None)


def _activation_backward(ctx, grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         out: Optional[Tensor]) -> Tensor:
    """The gradient before the activation (PyTorch's formulas)."""
    act = ctx.activation
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if act == "relu6":
        return grad.masked_fill(~((out > 0) & (out < 6)), 0)
    if act == "hardsigmoid":
        return (grad * (1.0 / 6.0)).masked_fill(~((out > 0) & (out < 1)), 0)
    if act == "hardswish":
        pre = torch.ops.butterfly.depthwise_conv(x, weight, bias, ctx.stride, "none")
        return torch.ops.aten.hardswish_backward(grad, pre)
    return grad


def _backward(ctx, grad: Tensor, eager: bool = False):
    x, weight, bias, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(need[2]) and ctx.has_bias]
    if not any(mask):
        return None, None, None, None, None
    with use_backend(ctx.backend):
        return _backward_on(ctx, grad, x, weight, bias, out, mask, eager)


def _backward_on(ctx, grad, x, weight, bias, out, mask, eager):
    grad = _activation_backward(ctx, grad, x, weight, bias, out)
    if torch.is_grad_enabled():
        # create_graph (a gradient penalty, double backward): the kernel has no derivative;
        # PyTorch's convolution_backward has one
        gx, gw, gb = depthwise_reference_backward(grad, x, weight, ctx.stride, mask)
    elif eager:
        gx, gw, gb = _backward_body(grad, x, weight, ctx.stride, mask)
    else:
        gx, gw, gb = torch.ops.butterfly.depthwise_conv_backward(grad, x, weight, ctx.stride,
                                                                 mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None,
            None)


_depthwise_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerDepthwise(torch.autograd.Function):
    """The operator for eager calls that need gradients: the same bodies and backward formula as
    ``butterfly::depthwise_conv`` without the dispatcher's custom-op machinery (which costs tens
    of microseconds a call: a quarter of a small layer's time). torch.compile and other traced
    calls take the operator."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, activation):  # ctx first: no signature binding
        out = _forward(x, weight, bias, stride, activation)
        _setup_context(ctx, (x, weight, bias, stride, activation), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, eager=True)


def run_depthwise(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
          activation: str) -> Tensor:
    """``butterfly::depthwise_conv`` (traced calls, and calls under a dispatch mode such as
    ``FlopCounterMode``: one operator), or, in eager mode, its body directly (no gradient
    needed) or through :class:`_EagerDepthwise`."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return torch.ops.butterfly.depthwise_conv(x, weight, bias, stride, activation)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return _EagerDepthwise.apply(x, weight, bias, stride, activation)
    return _forward(x, weight, bias, stride, activation)


def _flops(x_shape, w_shape, stride: int) -> int:
    k = w_shape[-1]
    N, C, H, W = x_shape
    return 2 * N * C * _out_size(H, k, stride) * _out_size(W, k, stride) * k * k


@register_flop_formula(torch.ops.butterfly.depthwise_conv)
def _flop_formula(x_shape, w_shape, bias_shape, stride, activation, *args, out_shape=None,
                  **kwargs) -> int:
    return _flops(x_shape, w_shape, stride)


@register_flop_formula(torch.ops.butterfly.depthwise_conv_backward)
def _flop_formula_backward(grad_shape, x_shape, w_shape, stride, output_mask, *args,
                           out_shape=None, **kwargs) -> int:
    # the input gradient and the weight gradient each cost one convolution
    return (int(bool(output_mask[0])) + int(bool(output_mask[1]))) * _flops(x_shape, w_shape,
                                                                            stride)


# ------------------------------------------------------------------------------- public API
def check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
               activation: str) -> None:
    """Clear errors for what the operator cannot take."""
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv expects input of shape (N, C, H, W), got "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"depthwise_conv expects a floating-point input, got {x.dtype}")
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 or \
            weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"depthwise_conv expects a weight of shape ({C}, 1, k, k) with odd k "
                         f"for {C} channels, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"depthwise_conv expects a bias of shape ({C},), got "
                         f"{tuple(bias.shape)}")
    if stride not in STRIDES:
        raise ValueError(f"depthwise_conv takes stride 1 or 2, got {stride}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if x.device != weight.device:
        raise ValueError(f"depthwise_conv: input is on {x.device} but the weight is on "
                         f"{weight.device}")


def depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
                   activation: str = "none") -> Tensor:
    """``activation(conv(x, weight, stride, padding k // 2, groups=C) + bias)`` for ``x`` of
    shape ``(N, C, H, W)`` (NCHW or channels_last; the output keeps the format) and ``weight``
    of shape ``(C, 1, k, k)``, odd ``k``. Differentiable in ``x``, ``weight`` and ``bias``."""
    check_args(x, weight, bias, stride, activation)
    if torch.onnx.is_in_onnx_export():
        return depthwise_reference(x, weight, bias, stride, activation)
    return run_depthwise(x, weight, bias, stride, activation)
