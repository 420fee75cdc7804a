"""The ``butterfly::bft`` operator and the one place that picks its implementation.

Every module and model calls :func:`bft`; the backends (``reference``, ``cpu``, ``triton``) are
interchangeable behind it and tested against each other. The operator is a
``torch.library.triton_op``, so ``torch.compile`` traces into it without graph breaks: its body
must consist of PyTorch operators, other ``torch.ops`` operators and ``wrap_triton`` kernel calls.

Operator layout: ``x`` is ``(B, C_in, P)`` contiguous (``P = H*W`` for NCHW input, ``P = 1`` for
channels-last and linear input), ``weight`` is ``(T, W)`` (see :mod:`butterfly.plan`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..plan import BFTPlan
from .dispatch import (Backend, available_backends, backend_for, current_backend,
                       register_backend, use_backend)
from .reference import bft_matmul, bft_reference, bft_reference_backward


register_backend(Backend("reference", bft_reference, bft_reference_backward))


@torch.library.triton_op("butterfly::bft", mutates_args=())
def _bft_op(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
            residual: bool) -> Tensor:
    return backend_for(x.device, x, weight, radices).forward(x, weight, radices, out_channels,
                                                              residual)


@torch.library.triton_op("butterfly::bft_backward", mutates_args=())
def _bft_backward_op(grad: Tensor, x: Tensor, weight: Tensor, radices: List[int],
                     out_channels: int, residual: bool) -> Tuple[Tensor, Tensor]:
    return backend_for(x.device, x, weight, radices).backward(grad, x, weight, radices,
                                                               out_channels, residual)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, radices, out_channels, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (radices, out_channels, residual)
    ctx.backend = current_backend()   # the backward runs on the forward's choice


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    with use_backend(ctx.backend):
        grad_x, grad_w = torch.ops.butterfly.bft_backward(grad.contiguous(), x, weight, *ctx.args)
    return grad_x, grad_w, None, None, None


_bft_op.register_autograd(_backward, setup_context=_setup_context)


# Double backward. Write y = F(x, w) = B(w) x: linear in x, and multilinear in the stages'
# weights (B is the product of the stages, the paper's eq. 3 unrolled). bft_backward(g, x, w)
# returns gx = B^T g and gw = d<g, B x>/dw. For upstream gradients (a, b) of (gx, gw):
#   <a, gx> = <g, B a>, so d/dg = B a = bft(a, w), d/dx = 0, d/dw = the weight gradient of the
#   forward at input a with output gradient g = bft_backward(g, a, w)[1]: the operator itself,
#   on whichever backend runs it. This is all a gradient penalty on the input (R1, WGAN-GP) needs.
#   <b, gw> (a penalty on weight gradients) is second order in w: its derivatives are taken by
#   autograd through the reference's hand-written backward, which is made of PyTorch operators.

def _setup_context_backward(ctx, inputs, output) -> None:
    grad, x, weight, radices, out_channels, residual = inputs
    ctx.save_for_backward(grad, x, weight)
    ctx.args = (radices, out_channels, residual)
    ctx.backend = current_backend()
    ctx.set_materialize_grads(False)


def _backward_backward_gx(ctx, grad_gx: Optional[Tensor], grad: Tensor, weight: Tensor):
    """The derivatives in ``grad`` and ``weight`` from the upstream gradient of ``gx``."""
    d_grad = d_weight = None
    if grad_gx is not None:
        grad_gx = grad_gx.contiguous()
        if ctx.needs_input_grad[0]:
            d_grad = torch.ops.butterfly.bft(grad_gx, weight, *ctx.args)
        if ctx.needs_input_grad[2]:
            d_weight = torch.ops.butterfly.bft_backward(grad, grad_gx, weight, *ctx.args)[1]
    return d_grad, d_weight


def _backward_backward(ctx, grad_gx: Optional[Tensor], grad_gw: Optional[Tensor]):
    grad, x, weight = ctx.saved_tensors
    radices, out_channels, residual = ctx.args
    d_x = None
    with use_backend(ctx.backend):
        d_grad, d_weight = _backward_backward_gx(ctx, grad_gx, grad, weight)
    if grad_gw is not None:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [t if t.requires_grad else t.detach().requires_grad_()
                      for t in (grad, x, weight)]
            _, gw = bft_reference_backward(*leaves, radices, out_channels, residual)
            more = torch.autograd.grad(gw, leaves, grad_gw, allow_unused=True,
                                       materialize_grads=True, create_graph=create_graph)
        d_grad, d_x, d_weight = (m if d is None else d + m
                                 for d, m in zip((d_grad, d_x, d_weight), more))
    return d_grad, d_x, d_weight, None, None, None


_bft_backward_op.register_autograd(_backward_backward, setup_context=_setup_context_backward)


def _flop_formula(x_shape, w_shape, radices, out_channels, residual, *args, out_shape=None,
                  **kwargs) -> int:
    plan = BFTPlan.of(x_shape[1], out_channels, radices)
    return 2 * plan.macs_per_pixel * x_shape[0] * x_shape[2]


def _flop_formula_backward(grad_shape, x_shape, w_shape, radices, out_channels, residual, *args,
                           out_shape=None, **kwargs) -> int:
    # input gradient and weight gradient each cost one pass of the transform
    return 2 * _flop_formula(x_shape, w_shape, radices, out_channels, residual)


register_flop_formula(torch.ops.butterfly.bft)(_flop_formula)
register_flop_formula(torch.ops.butterfly.bft_backward)(_flop_formula_backward)


def check_input(x: Tensor, weight: Tensor, in_channels: int, received: int, layer: str) -> None:
    """Clear errors for what the operator cannot take."""
    if not x.is_floating_point():
        raise TypeError(f"{layer} expects a floating-point input (float64/32/16, bfloat16), got "
                        f"{x.dtype}; convert it first, e.g. x.float()")
    if x.device != weight.device:
        raise ValueError(f"{layer}: input is on {x.device} but the weights are on {weight.device}; "
                         f"move one of them, e.g. layer.to(x.device)")
    if received != in_channels:
        raise ValueError(f"{layer} expects {in_channels} input channels, got {received} "
                         f"(input shape {tuple(x.shape)})")


def bft(x: Tensor, weight: Tensor, plan: BFTPlan, residual: bool) -> Tensor:
    """Apply the BFT of ``plan`` to ``x`` of shape ``(B, C_in, P)``; returns ``(B, C_out, P)``.

    Under ``torch.onnx.export`` the stages are traced as plain PyTorch ops instead of the operator
    (:func:`butterfly.ops.reference.bft_matmul`), so the graph has standard ONNX ops and keeps
    O(n log n)."""
    weight = weight.reshape(plan.num_blocks, plan.weights_per_block)
    # torch.compile decomposes the operator into the chosen backend's kernels while it traces, so
    # the choice must be part of what a compiled graph is guarded on: reading the ContextVar here,
    # in the Python that dynamo traces, installs that guard (a graph traced under one
    # use_backend() choice is recompiled, not reused, under another).
    name = current_backend()
    if name not in available_backends():  # a backend unregistered since use_backend()
        raise ValueError(f"unknown BFT backend {name!r}; choose one of {available_backends()}")
    if torch.onnx.is_in_onnx_export():
        return bft_matmul(x.contiguous(), weight, list(plan.radices), plan.out_channels, residual)
    return torch.ops.butterfly.bft(x.contiguous(), weight, list(plan.radices), plan.out_channels,
                                   residual)
