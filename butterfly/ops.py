"""The ``butterfly::bft`` operator and the one place that picks its implementation.

Every module and model calls :func:`bft`; the backends (``reference``, ``cpu``, ``triton``) are
interchangeable behind it and tested against each other. The operator is a
``torch.library.triton_op``, so ``torch.compile`` traces into it without graph breaks: its body
must consist of PyTorch operators, other ``torch.ops`` operators and ``wrap_triton`` kernel calls.

Operator layout: ``x`` is ``(B, C_in, P)`` contiguous (``P = H*W`` for NCHW input, ``P = 1`` for
channels-last and linear input), ``weight`` is ``(T, W)`` (see :mod:`butterfly.plan`).
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from .plan import BFTPlan
from .reference import bft_reference, bft_reference_backward

Forward = Callable[[Tensor, Tensor, List[int], int, bool], Tensor]
Backward = Callable[[Tensor, Tensor, Tensor, List[int], int, bool], Tuple[Tensor, Tensor]]


@dataclass
class Backend:
    """An implementation of the operator.

    ``available(device)`` says whether it can run on tensors of that device (it may warn once
    and return False, e.g. when a compiler is missing); "auto" considers the backends whose
    ``auto_devices`` name the device type, highest ``auto_priority`` first."""

    name: str
    forward: Forward
    backward: Backward
    available: Callable[[torch.device], bool]
    auto_devices: Tuple[str, ...] = ()
    auto_priority: int = 0


_BACKENDS: Dict[str, Backend] = {}
_selected: contextvars.ContextVar[str] = contextvars.ContextVar("butterfly_backend", default="auto")


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> List[str]:
    return ["auto", *_BACKENDS]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the BFT operator with one implementation inside the ``with`` block.

    ``"reference"`` (pure PyTorch), ``"cpu"`` (fused C++ kernel), ``"triton"`` (GPU kernel, or CPU
    under ``TRITON_INTERPRET=1``) or ``"auto"`` (the fastest available for the tensor's device)."""
    if name not in available_backends():
        raise ValueError(f"unknown BFT backend {name!r}; choose one of {available_backends()}")
    token = _selected.set(name)
    try:
        yield
    finally:
        _selected.reset(token)


def current_backend() -> str:
    return _selected.get()


def backend_for(device: torch.device) -> Backend:
    """The backend that runs on ``device`` under the current :func:`use_backend` choice."""
    name = _selected.get()
    if name == "auto":
        ranked = sorted((b for b in _BACKENDS.values() if device.type in b.auto_devices),
                        key=lambda b: -b.auto_priority)
        for backend in ranked:
            if backend.available(device):
                return backend
        return _BACKENDS["reference"]
    backend = _BACKENDS[name]
    if not backend.available(device):
        if name == "triton":
            raise RuntimeError(
                f"the 'triton' BFT backend cannot run on {device.type} tensors: use CUDA tensors, "
                "set TRITON_INTERPRET=1 before importing triton (slow, for tests), or pick "
                "use_backend('auto')")
        # available() has warned why; the reference gives the same result, slower.
        return _BACKENDS["reference"]
    return backend


register_backend(Backend("reference", bft_reference, bft_reference_backward,
                         available=lambda device: True))


@torch.library.triton_op("butterfly::bft", mutates_args=())
def _bft_op(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
            residual: bool) -> Tensor:
    return backend_for(x.device).forward(x, weight, radices, out_channels, residual)


@torch.library.triton_op("butterfly::bft_backward", mutates_args=())
def _bft_backward_op(grad: Tensor, x: Tensor, weight: Tensor, radices: List[int],
                     out_channels: int, residual: bool) -> Tuple[Tensor, Tensor]:
    return backend_for(x.device).backward(grad, x, weight, radices, out_channels, residual)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, radices, out_channels, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (radices, out_channels, residual)


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = torch.ops.butterfly.bft_backward(grad.contiguous(), x, weight, *ctx.args)
    return grad_x, grad_w, None, None, None


_bft_op.register_autograd(_backward, setup_context=_setup_context)


def _flop_formula(x_shape, w_shape, radices, out_channels, residual, *args, out_shape=None,
                  **kwargs) -> int:
    plan = BFTPlan(x_shape[1], out_channels, tuple(radices))
    return 2 * plan.macs_per_pixel * x_shape[0] * x_shape[2]


def _flop_formula_backward(grad_shape, x_shape, w_shape, radices, out_channels, residual, *args,
                           out_shape=None, **kwargs) -> int:
    # input gradient and weight gradient each cost one pass of the transform
    return 2 * _flop_formula(x_shape, w_shape, radices, out_channels, residual)


from torch.utils.flop_counter import register_flop_formula  # noqa: E402

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
    (``butterfly.export.bft_matmul``), so the graph has standard ONNX ops and keeps O(n log n)."""
    weight = weight.reshape(plan.num_blocks, plan.weights_per_block)
    if torch.onnx.is_in_onnx_export():
        from .export import bft_matmul  # noqa: PLC0415 (lazy: export imports modules -> ops)
        return bft_matmul(x.contiguous(), weight, list(plan.radices), plan.out_channels, residual)
    return torch.ops.butterfly.bft(x.contiguous(), weight, list(plan.radices), plan.out_channels,
                                   residual)
