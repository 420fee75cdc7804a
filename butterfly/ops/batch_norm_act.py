"""Training-mode BatchNorm fused with the activation after it: ``butterfly::batch_norm_act``.

``act(bn(x))`` with a training-mode ``nn.BatchNorm2d`` costs PyTorch several passes over the
activation (statistics, normalisation, the activation; in backward the activation's gradient, a
reduction and the input gradient). BFT networks are 2-4x wider than dense networks of the same
multiply-adds, so these passes are a large share of their training step. The fused CPU kernel
(``csrc/batchnorm/``) does the forward in two passes (statistics, then normalisation with the
activation) and the backward in two (the reductions, then the input gradient).

* :func:`batch_norm_act` is the entry point: ``act(bn(x))`` for an ``nn.BatchNorm2d`` ``bn``
  in training mode, updating ``bn``'s running statistics and ``num_batches_tracked`` exactly as
  ``nn.BatchNorm2d.forward`` does (momentum, or the cumulative average for ``momentum=None``).
  It runs the kernel when :func:`butterfly.ops.backend_for` picks the ``"cpu"`` backend (CPU,
  float32/float64) in eager mode; anything else, ``use_backend("reference")`` included, runs
  ``bn(x)`` and the activation in PyTorch, the oracle the kernel is tested against. Under
  ``torch.compile`` it is PyTorch's too: inductor fuses those itself, faster.
* ``torch.ops.butterfly.batch_norm_act(x, weight, bias, eps, activation) -> (y, mean, invstd,
  var)`` and its backward are ``torch.library`` custom ops with fake kernels and autograd, so
  they also work under ``torch.compile`` (as one node each) when called directly. Activations:
  those of :mod:`butterfly.ops.bft_fused`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .bft_fused import ACTIVATIONS, activate
from .depthwise import output_format
from .dispatch import backend_for, kernels_loaded

__all__ = ["batch_norm_act", "kernel_runs"]

def fake_forward(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    C = x.shape[1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_format(x))
    return y, x.new_empty(C), x.new_empty(C), x.new_empty(C)


def fake_backward(x: Tensor, output_mask) -> Tuple[Tensor, Tensor, Tensor]:
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_format(x)) \
        if output_mask[0] else x.new_empty(0)
    C = x.shape[1]
    return gx, x.new_empty(C) if output_mask[1] else x.new_empty(0), \
        x.new_empty(C) if output_mask[2] else x.new_empty(0)


def kernel_runs(x: Tensor, bn: nn.BatchNorm2d) -> bool:
    """Whether :func:`batch_norm_act` runs the fused kernel for this input and layer."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4:
        return False
    if any(p is not None and (p.dtype != x.dtype or p.device != x.device)
           for p in (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
        return False
    # the backend policy checks a call's dtypes on an input and a weight: both are x's here
    return backend_for(x.device, x, x).name == "cpu" and kernels_loaded("cpu", x.device)


# ------------------------------------------------------------------------------ operators
@torch.library.custom_op("butterfly::batch_norm_act", mutates_args=())
def _bn_act_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               activation: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.ops.butterfly_cpu.bn_act_forward(x, weight, bias, None, None, 0.0, eps,
                                                  activation)


@torch.library.custom_op("butterfly::batch_norm_act_backward", mutates_args=())
def _bn_act_backward_op(grad: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], mean: Tensor, invstd: Tensor, activation: str,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.butterfly_cpu.bn_act_backward(grad, x, y, weight, bias, mean, invstd,
                                                   activation, output_mask)


@_bn_act_op.register_fake
def _(x, weight, bias, eps, activation):
    return fake_forward(x)


@_bn_act_backward_op.register_fake
def _(grad, x, y, weight, bias, mean, invstd, activation, output_mask):
    return fake_backward(x, output_mask)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, activation = inputs
    y, mean, invstd, _ = output
    ctx.activation, ctx.eps = activation, eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, y, weight, bias, mean, invstd)


def _backward(ctx, grad_y, grad_mean=None, grad_invstd=None, grad_var=None, eager=False):
    x, y, weight, bias, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]) and ctx.has_weight, bool(need[2]) and ctx.has_bias]
    if not any(mask):
        return None, None, None, None, None
    if torch.is_grad_enabled():
        # create_graph (a gradient penalty, double backward): the kernels have no derivative,
        # so the gradients are taken through PyTorch's own differentiable BatchNorm instead
        return _differentiable_backward(ctx, grad_y, x, weight, bias, mask)
    args = (grad_y, x, y, weight, bias, mean, invstd, ctx.activation, mask)
    gx, gw, gb = (torch.ops.butterfly_cpu.bn_act_backward(*args) if eager
                  else torch.ops.butterfly.batch_norm_act_backward(*args))
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None,
            None)


def _differentiable_backward(ctx, grad_y, x, weight, bias, mask):
    inputs = [t for t, m in zip((x, weight, bias), mask) if m]
    with torch.enable_grad():
        y = activate(F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps),
                     ctx.activation)
        grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True))
    return tuple(next(grads) if m else None for m in mask) + (None, None)


_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBatchNormAct(torch.autograd.Function):
    """The operator for eager calls, without the dispatcher's custom-op machinery (tens of
    microseconds a call): the same kernels and backward formula; the running statistics are
    updated inside the kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, activation):
        out = torch.ops.butterfly_cpu.bn_act_forward(x, weight, bias, running_mean, running_var,
                                                     momentum, eps, activation)
        _setup_context(ctx, (x, weight, bias, eps, activation), out)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_invstd, grad_var):
        return _backward(ctx, grad_y, eager=True)[:3] + (None,) * 5


# ------------------------------------------------------------------------------ public API
def _momentum(bn: nn.BatchNorm2d) -> float:
    """``nn.BatchNorm2d.forward``'s averaging factor, after counting this batch."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def batch_norm_act(x: Tensor, bn: nn.BatchNorm2d, activation: str = "none") -> Tensor:
    """``activation(bn(x))`` for a BatchNorm2d ``bn``; in training mode on CPU through the fused
    kernel, updating ``bn``'s running statistics as ``bn(x)`` would. Other cases (eval mode,
    other devices and dtypes, ``use_backend("reference")``) run ``bn(x)`` and the activation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if not bn.training or torch.compiler.is_compiling() or not kernel_runs(x, bn):
        # under torch.compile inductor fuses PyTorch's BatchNorm and activation itself, which
        # the training benchmark's compile path measures faster than this operator
        # (docs/depthwise.md)
        return activate(bn(x), activation)
    if x.shape[1] != bn.num_features:
        raise ValueError(f"{bn}: expected input with {bn.num_features} channels, got "
                         f"{x.shape[1]} (input of shape {tuple(x.shape)})")
    if x.numel() // max(x.shape[1], 1) <= 1:   # nn.BatchNorm2d's error
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    track = bn.track_running_stats and bn.running_mean is not None
    factor = _momentum(bn) if track else 0.0
    if _get_current_dispatch_mode() is not None:
        # under a dispatch mode (FlopCounterMode, ...): the functional operator, one node; the
        # running statistics as separate ops
        y, mean, _, var = torch.ops.butterfly.batch_norm_act(x, bn.weight, bn.bias, bn.eps,
                                                             activation)
        if track:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                bn.running_var.mul_(1 - factor).add_(var * (n / (n - 1)), alpha=factor)
        return y
    running = (bn.running_mean, bn.running_var) if track else (None, None)
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p is not None and p.requires_grad for p in (bn.weight, bn.bias))):
        return _EagerBatchNormAct.apply(x, bn.weight, bn.bias, *running, factor, bn.eps,
                                        activation)[0]
    return torch.ops.butterfly_cpu.bn_act_forward(x, bn.weight, bn.bias, *running, factor,
                                                  bn.eps, activation)[0]
