"""The BFT with an epilogue: ``butterfly::bft_fused``, the operator of fused inference.

An epilogue is a short, fixed list of post-operations applied to the BFT's output before its one
store, the way oneDNN convolutions take post-ops and XNNPACK operators take an output clamp:

    y = bft(x)                    # the transform, residual included
    y = y * scale[c] + shift[c]   # per output channel (an eval-mode BatchNorm folds into this)
    y = act(y)                    # none, relu, relu6, hardswish, hardsigmoid
    y = y + add                   # a tensor of y's shape (an inverted-residual block's skip)

Each step is optional. The list is data, not one kernel per combination: every backend implements
the same list, and :func:`apply_epilogue` (plain PyTorch) is the oracle they are tested against.
A BatchNorm after a BFT with the residual cannot be folded into the butterfly's weights
(``B x + x`` would need a scaled identity), but it is exactly this per-channel affine step.

A backend registers its fused form with :func:`register_fused`; a backend without one runs its
plain forward and then :func:`apply_epilogue`, so every backend gives the same results.
``bft_fused`` is for inference: it has no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from ..plan import BFTPlan
from .dispatch import backend_for
from .reference import compute_dtype

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "hardsigmoid")

Fused = Callable[[Tensor, Tensor, List[int], int, bool, Optional[Tensor], Optional[Tensor], str,
                  Optional[Tensor]], Tensor]


@dataclass(frozen=True)
class Epilogue:
    """Post-operations of one fused layer: ``act(y * scale + shift) + add``.

    ``scale``, ``shift``: ``(C_out,)`` tensors or ``None``; ``activation``: one of
    :data:`ACTIVATIONS`; ``add``: whether the layer adds a second input of the output's shape."""

    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    activation: str = "none"
    add: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown epilogue activation {self.activation!r}; choose one of "
                             f"{ACTIVATIONS}")

    def describe(self) -> str:
        """A short text of the post-operations, e.g. ``"affine+relu+add"`` (``"-"``: none)."""
        parts = (["affine"] if self.scale is not None or self.shift is not None else []) + \
            ([self.activation] if self.activation != "none" else []) + (["add"] if self.add else [])
        return "+".join(parts) or "-"


_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                       nn.Hardsigmoid: "hardsigmoid"}


def activation_of(module: nn.Module) -> Optional[str]:
    """The :data:`ACTIVATIONS` name of an activation module (``nn.Hardtanh(0, 6)`` is "relu6"),
    or None for any other module."""
    if type(module) is nn.Hardtanh and (module.min_val, module.max_val) == (0.0, 6.0):
        return "relu6"
    return _ACTIVATION_MODULES.get(type(module))


def activate(y: Tensor, activation: str) -> Tensor:
    """One of :data:`ACTIVATIONS`, as PyTorch computes it."""
    if activation == "relu":
        return torch.relu(y)
    if activation == "relu6":
        return y.clamp(0.0, 6.0)
    if activation == "hardswish":
        return F.hardswish(y)
    if activation == "hardsigmoid":
        return F.hardsigmoid(y)
    if activation == "none":
        return y
    raise ValueError(f"unknown epilogue activation {activation!r}; choose one of {ACTIVATIONS}")


def activate_(y: Tensor, activation: str) -> Tensor:
    """:func:`activate` in place (``y`` is overwritten and returned)."""
    if activation == "relu":
        return y.relu_()
    if activation == "relu6":
        return y.clamp_(0.0, 6.0)
    if activation == "hardswish":
        return F.hardswish(y, inplace=True)
    if activation == "hardsigmoid":
        return F.hardsigmoid(y, inplace=True)
    return activate(y, activation)


def apply_epilogue(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], activation: str,
                   add: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """The reference epilogue on ``y`` ``(B, C, P)`` in the compute dtype; rounds once to
    ``out_dtype`` at the end."""
    if scale is not None:
        y = y * scale.to(y.dtype).view(1, -1, 1)
    if shift is not None:
        y = y + shift.to(y.dtype).view(1, -1, 1)
    y = activate(y, activation)
    if add is not None:
        y = y + add.to(y.dtype)
    return y.to(out_dtype).contiguous()


def check_epilogue(x: Tensor, out_channels: int, scale: Optional[Tensor], shift: Optional[Tensor],
                   activation: str, add: Optional[Tensor], out_shape=None) -> None:
    """Clear errors for epilogue arguments that do not fit the layer (``out_shape``: the
    output's shape, by default ``(B, C_out, P)`` for ``x`` ``(B, C_in, P)``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown epilogue activation {activation!r}; choose one of {ACTIVATIONS}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (out_channels,):
            raise ValueError(f"epilogue {name} must have shape ({out_channels},), one value per "
                             f"output channel, got {tuple(t.shape)}")
    want = tuple(out_shape) if out_shape is not None else (x.shape[0], out_channels, x.shape[2])
    if add is not None and tuple(add.shape) != want:
        raise ValueError(f"epilogue add must have the output's shape {want}, got "
                         f"{tuple(add.shape)}")
    for name, t in (("scale", scale), ("shift", shift), ("add", add)):
        if t is not None and t.device != x.device:
            raise ValueError(f"epilogue {name} is on {t.device} but the input is on {x.device}; "
                             "move it, e.g. fused_model.to(x.device)")
    if add is not None and add.dtype != x.dtype:
        raise ValueError(f"epilogue add must have the input's dtype {x.dtype}, got {add.dtype}")


_FUSED: Dict[str, Fused] = {}


def register_fused(backend: str, fused: Fused) -> None:
    """Give backend ``backend`` (a name of :func:`butterfly.available_backends`) a fused form with
    the arguments of ``butterfly::bft_fused``."""
    _FUSED[backend] = fused


def _run_fused(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
               residual: bool, scale: Optional[Tensor], shift: Optional[Tensor],
               activation: str, add: Optional[Tensor]) -> Tensor:
    """The body of ``butterfly::bft_fused``: the backend's fused form, or its forward and the
    reference epilogue."""
    check_epilogue(x, out_channels, scale, shift, activation, add)
    backend = backend_for(x.device, x, weight, radices)
    if backend.name != "cpu":   # only the C++ kernel reads strided rows in place
        x = x.contiguous()
    fused = _FUSED.get(backend.name)
    if fused is not None:
        return fused(x, weight, radices, out_channels, residual, scale, shift, activation, add)
    # The transform in the compute dtype, so the result is rounded once, after the epilogue.
    dtype = compute_dtype(x, weight)
    y = backend.forward(x.to(dtype), weight, radices, out_channels, residual)
    return apply_epilogue(y, scale, shift, activation, add, x.dtype)


@torch.library.triton_op("butterfly::bft_fused", mutates_args=())
def _bft_fused_op(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
                  residual: bool, scale: Optional[Tensor], shift: Optional[Tensor],
                  activation: str, add: Optional[Tensor]) -> Tensor:
    return _run_fused(x, weight, radices, out_channels, residual, scale, shift, activation, add)


def register_inference_only(op, name: str) -> None:
    """Give an inference operator (a fused one) an autograd formula that says it has none."""
    def no_gradient(ctx, grad):
        raise RuntimeError(f"{name} is for inference and has no gradient: train the original "
                           "model (optimize_for_inference leaves it untouched), or run the fused "
                           "one under torch.no_grad() / torch.inference_mode()")

    op.register_autograd(no_gradient, setup_context=lambda ctx, inputs, output: None)


register_inference_only(_bft_fused_op, "butterfly::bft_fused")


@register_flop_formula(torch.ops.butterfly.bft_fused)
def _flop_formula(x_shape, w_shape, radices, out_channels, *args, out_shape=None, **kwargs) -> int:
    """The transform's multiply-adds (x2), as for ``butterfly::bft``; the epilogue is
    elementwise and not counted, as a convolution's BatchNorm and activation are not."""
    plan = BFTPlan.of(x_shape[1], out_channels, radices)
    return 2 * plan.macs_per_pixel * x_shape[0] * x_shape[2]


def bft_fused(x: Tensor, weight: Tensor, plan: BFTPlan, residual: bool, epilogue: Epilogue,
              add: Optional[Tensor] = None) -> Tensor:
    """The BFT of ``plan`` on ``x`` ``(B, C_in, P)`` followed by ``epilogue``; ``add`` is its
    second input when ``epilogue.add``. Returns ``(B, C_out, P)``."""
    if epilogue.add != (add is not None):
        raise ValueError("the epilogue adds a tensor: pass add=" if epilogue.add else
                         "add= was given, but the epilogue has no add step")
    x = x if strided_rows(x) else x.contiguous()
    add = None if add is None else add.contiguous()
    args = (x, weight.reshape(plan.num_blocks, plan.weights_per_block), list(plan.radices),
            plan.out_channels, residual, epilogue.scale, epilogue.shift, epilogue.activation, add)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or \
            _get_current_dispatch_mode() is not None:   # traced or counted as one operator
        return torch.ops.butterfly.bft_fused(*args)
    # Eager inference: the operator's body without the dispatcher (tens of microseconds a call,
    # a tenth of a small layer's time).
    return _run_fused(*args)


def strided_rows(x: Tensor) -> bool:
    """Whether ``x`` ``(B, C, 1)`` is rows of contiguous channels at one stride, which the CPU
    kernel reads in place (a channels_last tensor's pixels, or a channel slice of them)."""
    return x.dim() == 3 and x.shape[2] == 1 and x.stride(1) == 1 and x.shape[0] > 1 and \
        x.stride(0) >= x.shape[1]


def pixel_rows(x: Tensor) -> Optional[Tensor]:
    """The ``(N*H*W, C, 1)`` view of the pixels of a channels_last ``x`` ``(N, C, H, W)`` (or of
    a channel slice of one, ShuffleNetV2's split: rows at a stride larger than ``C``); None when
    ``x`` is NCHW-contiguous or laid out otherwise."""
    if x.is_contiguous():
        return None
    N, C, H, W = x.shape
    try:
        rows = x.permute(0, 2, 3, 1).view(N * H * W, C, 1)
    except RuntimeError:   # the pixels are not at one stride
        return None
    return rows if rows.stride(1) == 1 else None


def bft_fused_image(x: Tensor, weight: Tensor, plan: BFTPlan, residual: bool, epilogue: Epilogue,
                    add: Optional[Tensor] = None) -> Tensor:
    """:func:`bft_fused` on an image batch ``(N, C_in, H, W)`` in either memory format (``add``,
    when the epilogue adds, of the output's shape); the output has the input's format (a channel
    slice of a channels_last tensor gives a channels_last output)."""
    N, C, H, W = x.shape
    out = plan.out_channels
    rows = pixel_rows(x)
    if rows is None:
        skip = None if add is None else add.reshape(N, out, H * W)
        y = bft_fused(x.reshape(N, C, H * W), weight, plan, residual, epilogue, skip)
        return y.view(N, out, H, W)
    # channels_last: pixels as rows of C channels, (N*H*W, C, 1), with no copy
    skip = None if add is None else add.permute(0, 2, 3, 1).reshape(N * H * W, out, 1)
    y = bft_fused(rows, weight, plan, residual, epilogue, skip)
    return y.view(N, H, W, out).permute(0, 3, 1, 2)
