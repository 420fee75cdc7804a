"""``BFT`` and ``BFTLinear``: drop-in replacements for a 1x1 ``nn.Conv2d`` and for ``nn.Linear``,
their exact dense equivalents, and their fit to a dense layer.

The layers' forward passes are the module-level functions :func:`bft_conv2d` and
:func:`bft_linear`, registered with ``torch.fx.wrap``: ``torch.fx.symbolic_trace`` (and the FX
feature extractors of torchvision and timm built on it) records each BFT as one call node instead
of tracing into its input checks, which branch on the input's shape and memory format.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn

from .factorization import fit_weights, input_covariance
from .init import init_bft_
from ..ops.bft import bft, check_input
from ..plan import BFTPlan, make_plan


def bft_refusal(in_channels: int, out_channels: int) -> str:
    """Why no BFT replaces a layer ``in_channels -> out_channels`` (``""`` when one does).

    With one input or one output channel every block of the tiling (see :mod:`butterfly.plan`) is
    a 1x1 butterfly: no stages, hence no weights, and the layer would only repeat or sum its
    input. Its dense form has ``in * out`` weights, no more than a butterfly of the other side
    would, so the dense layer is the right one to keep."""
    if min(in_channels, out_channels) == 1:
        return (f"a BFT needs at least 2 input and 2 output channels, got {in_channels} -> "
                f"{out_channels}: with one channel on a side every block is a 1x1 butterfly "
                f"without weights, which only repeats or sums the input; keep the dense layer "
                f"(nn.Conv2d / nn.Linear, {in_channels * out_channels} weights) there")
    return ""


def pointwise_refusal(module: nn.Module) -> str:
    """Why ``module``, a 1x1 ``nn.Conv2d`` or an ``nn.Linear``, gets no BFT (``""`` when it can)."""
    if isinstance(module, nn.Linear):
        return bft_refusal(module.in_features, module.out_features)
    return bft_refusal(module.in_channels, module.out_channels)


LAYOUT_FORMAT = 1  # first element of the extra state: how the rest is laid out


class _BFTBase(nn.Module):
    """Holds the weights of a BFT and applies it to ``(B, C, P)`` tensors.

    Besides its tensors the ``state_dict`` holds the layout that gives the weights their meaning
    (``_extra_state``: channels, radices, residual; see :meth:`get_extra_state`), so that loading
    a checkpoint into a layer of another layout fails instead of computing another function. A
    checkpoint that differs only in its radices (saved when :func:`butterfly.plan.choose_radices`
    chose others for these channels) is loaded with them: the layer takes the checkpoint's plan."""

    def __init__(self, in_channels: int, out_channels: int, base: int = 4, residual: bool = True,
                 bias: bool = False, init: str = "paper", device=None, dtype=None):
        super().__init__()
        self.plan: BFTPlan = make_plan(in_channels, out_channels, base)
        refusal = bft_refusal(in_channels, out_channels)
        if refusal:
            raise ValueError(f"{type(self).__name__}({in_channels}, {out_channels}): {refusal}")
        self.base = base
        self.residual = bool(residual)
        self.init = init
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self._weight_shape(), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def _weight_shape(self) -> tuple:
        """``(L, n/k, k, k)`` for a single square block of uniform radix ``k`` (the binding
        layout), with a leading ``T`` for ``T`` blocks; ``(W,)`` / ``(T, W)`` for mixed radices."""
        plan = self.plan
        lead = (plan.num_blocks,) if plan.num_blocks > 1 else ()
        if len(set(plan.radices)) == 1:
            k = plan.radices[0]
            return lead + (len(plan.radices), plan.size // k, k, k)
        return lead + (plan.weights_per_block,)

    def reset_parameters(self) -> None:
        init_bft_(self.weight.view(self.plan.num_blocks, self.plan.weights_per_block), self.plan,
                  self.init, self.residual)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _apply(self, fn, recurse=True):
        # Memory formats are for activations: under model.to(memory_format=...) the weight keeps its
        # contiguous binding layout (a 5-D weight would even make channels_last fail), so `fn`
        # sees it as a flat vector.
        w, shape = self.weight, self.weight.shape
        w.data = w.data.reshape(-1)
        if w.grad is not None:
            w.grad = w.grad.reshape(-1)
        try:
            return super()._apply(fn, recurse)
        finally:
            w = self.weight
            w.data = w.data.view(shape)
            if w.grad is not None:
                w.grad = w.grad.view(shape)

    # -- layout in the state_dict ------------------------------------------------------------

    def layout(self) -> Tuple[int, ...]:
        """``(in_channels, out_channels, residual, *radices)``: what, besides the weights, defines
        the function the layer computes (the base only chooses the radices)."""
        p = self.plan
        return (p.in_channels, p.out_channels, int(self.residual), *p.radices)

    @staticmethod
    def describe_layout(layout: Sequence[int]) -> str:
        cin, cout, residual, *radices = (int(v) for v in layout)
        return f"{cin} -> {cout}, radices={tuple(radices)}, residual={bool(residual)}"

    def get_extra_state(self) -> Tensor:
        """The layout as an int64 tensor ``[format, in, out, residual, *radices]``: a tensor, so
        that code treating a ``state_dict`` as tensors (EMA, checksums, shape checks) takes it."""
        return torch.tensor((LAYOUT_FORMAT, *self.layout()), dtype=torch.int64)

    @staticmethod
    def _saved_layout(state) -> Optional[Tuple[int, ...]]:
        """The layout ``state`` (a saved extra state) records, or None if it records none this
        version reads."""
        values: List[int] = (state.tolist() if isinstance(state, Tensor)
                             else list(state) if isinstance(state, (list, tuple)) else [])
        if len(values) < 4 or values[0] != LAYOUT_FORMAT:
            return None
        return tuple(int(v) for v in values[1:])

    def _layout_mismatch(self, state) -> str:
        """Why ``state`` (a saved extra state) does not describe this layer (``""`` if it does)."""
        saved = self._saved_layout(state)
        if saved is None:
            return (f"the saved layout {state!r} is not one this version of butterfly reads "
                    f"(expected [{LAYOUT_FORMAT}, in, out, residual, *radices])")
        if saved != self.layout():
            return (f"the checkpoint's {type(self).__name__} is {self.describe_layout(saved)}, but "
                    f"this layer is {self.describe_layout(self.layout())}: the weights would "
                    f"compute another function; build the layer with the checkpoint's channels "
                    f"and residual")
        return ""

    def _adopt_radices(self, state) -> None:
        """Re-plans the layer with the radices of ``state`` (a saved extra state) when they are
        all that differs from its layout and they are a plan for its channels; its weight is
        then zeros of the new shape, for the checkpoint's weights to fill."""
        saved = self._saved_layout(state)
        if saved is None:
            return
        cin, cout, residual, *radices = saved
        p = self.plan
        if ((cin, cout, residual) != (p.in_channels, p.out_channels, int(self.residual))
                or tuple(radices) == p.radices or not radices or min(radices) < 2):
            return
        plan = BFTPlan(cin, cout, tuple(radices))
        if plan.size < plan.block:
            return
        self.plan = plan
        w = self.weight
        w.data = w.data.new_zeros(self._weight_shape())  # the checkpoint's weights fill it
        w.grad = None

    def set_extra_state(self, state) -> None:
        problem = self._layout_mismatch(state)
        if problem:
            raise ValueError(problem)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        if key in state_dict:
            self._adopt_radices(state_dict[key])
            problem = self._layout_mismatch(state_dict[key])
            if problem:  # reported like a shape mismatch; this layer's tensors are left as they are
                error_msgs.append(f"layout mismatch for {key}: {problem}")
                return
        first_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys[first_missing:]:
            missing_keys.remove(key)  # a checkpoint written before the layout was stored

    @property
    def radices(self) -> tuple:
        return self.plan.radices

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds this layer executes per pixel (or per row for ``BFTLinear``)."""
        return self.plan.macs_per_pixel

    @classmethod
    def from_dense(cls, weight: Union[Tensor, nn.Module], bias: Optional[Tensor] = None, *,
                   base: int = 4, residual: Union[bool, str] = "auto",
                   calib: Optional[Tensor] = None, steps: int = 100) -> "_BFTBase":
        """A layer of this class fitted to a dense one.

        ``weight``: ``(out, in)`` or ``(out, in, 1, 1)`` tensor, or the ``nn.Conv2d``/``nn.Linear``
        itself (its bias is copied). ``calib``: inputs of that layer (``(N, C, H, W)`` or
        ``(..., C)``) for a least-squares fit of its outputs. ``residual``: ``True`` fits ``W - I``
        (a BFT computing ``Bx + x``), ``False`` fits ``W``, ``"auto"`` fits both and keeps the
        smaller error. The layer has the weight's device and dtype; the relative error of the fit
        is in ``layer.fit_error`` (see :func:`butterfly.nn.factorization.fit_weights`)."""
        weight, bias = dense_weight(weight, bias)
        cov = None if calib is None else input_covariance(calib.to(weight.device),
                                                          issubclass(cls, BFTLinear))
        return cls._fit(weight, bias, base, residual, cov, steps)

    @classmethod
    def _fit(cls, weight: Tensor, bias: Optional[Tensor], base: int, residual: Union[bool, str],
             cov: Optional[Tensor], steps: int) -> "_BFTBase":
        if residual not in (True, False, "auto"):
            raise ValueError(f"residual must be True, False or 'auto', got {residual!r}")
        for what, t in (("weight", weight), ("bias", bias), ("calibration data", cov)):
            if t is not None and not bool(torch.isfinite(t).all()):
                where = ("its inputs' second moments are not finite: the calibration data (or "
                         "the activations it produces) hold NaN or Inf" if what ==
                         "calibration data" else f"the dense layer's {what} holds NaN or Inf")
                raise ValueError(f"cannot fit a BFT to this layer: {where}; fix or drop those "
                                 "values before converting")
        out_channels, in_channels = weight.shape
        best = None
        for res in ((False, True) if residual == "auto" else (residual,)):
            layer = cls(in_channels, out_channels, base=base, residual=res, bias=bias is not None,
                        init="identity", device=weight.device, dtype=weight.dtype)
            flat, error = fit_weights(weight, layer.plan, res, cov, steps)
            if best is None or error < best[2]:
                best = (layer, flat, error)
        layer, flat, layer.fit_error = best
        with torch.no_grad():
            layer.weight.copy_(flat.view(layer.weight.shape))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def to_dense(self) -> Tensor:
        """The exact ``(out, in)`` matrix the layer applies (residual included, bias excluded)."""
        eye = torch.eye(self.plan.in_channels, dtype=self.weight.dtype, device=self.weight.device)
        out = bft(eye.unsqueeze(-1), self.weight, self.plan, self.residual)
        return out.squeeze(-1).t()

    def extra_repr(self) -> str:
        p = self.plan
        s = f"{p.in_channels}, {p.out_channels}, base={self.base}, radices={p.radices}"
        if p.num_blocks > 1:
            s += f", blocks={p.num_blocks}"
        if p.size != p.block:
            s += f", padded={p.block}->{p.size}"
        return s + f", residual={self.residual}, bias={self.bias is not None}"


class BFT(_BFTBase):
    """Butterfly Transform: a learned O(n log n) replacement for ``nn.Conv2d(in, out, 1)``.

    Takes ``(N, C_in, H, W)`` input in either memory format and returns ``(N, C_out, H, W)`` in the
    same format. ``base`` is the preferred radix (the paper's k), ``residual`` adds the identity
    (``Bx + x``), ``init`` is one of ``"paper"``, ``"identity"``, ``"ortho"`` (see
    :mod:`butterfly.nn.init`). Channel counts that are not powers of ``base`` and ``in != out`` are
    supported (see :mod:`butterfly.plan`); ``macs_per_pixel`` is what the layer executes.
    """

    def __init__(self, in_channels: int, out_channels: int, base: int = 4, residual: bool = True,
                 bias: bool = False, init: str = "paper", device=None, dtype=None):
        super().__init__(in_channels, out_channels, base, residual, bias, init, device, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: Tensor) -> Tensor:
        return bft_conv2d(x, self.weight, self.bias, self.plan, self.residual)

    def to_conv2d(self) -> nn.Conv2d:
        """The exactly equivalent ``nn.Conv2d(in, out, 1)`` (residual and bias folded in)."""
        return dense_equivalent(self)


class BFTLinear(_BFTBase):
    """The BFT on the last dimension: a drop-in replacement for ``nn.Linear(in, out)``."""

    def __init__(self, in_features: int, out_features: int, base: int = 4, residual: bool = True,
                 bias: bool = False, init: str = "paper", device=None, dtype=None):
        super().__init__(in_features, out_features, base, residual, bias, init, device, dtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        return bft_linear(x, self.weight, self.bias, self.plan, self.residual)

    def to_linear(self) -> nn.Linear:
        """The exactly equivalent ``nn.Linear(in, out)`` (residual and bias folded in)."""
        return dense_equivalent(self)


def _apply_bft(x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: BFTPlan,
               residual: bool) -> Tensor:
    """``(B, C_in, P) -> (B, C_out, P)``, bias added."""
    y = bft(x, weight, plan, residual)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1)
    return y


def bft_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: BFTPlan,
               residual: bool) -> Tensor:
    """What ``BFT.forward`` computes: ``(N, C_in, H, W) -> (N, C_out, H, W)`` in the input's
    memory format. One node under ``torch.fx`` tracing (``torch.fx.wrap``)."""
    if x.dim() != 4:
        raise ValueError(f"BFT expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}; "
                         "use BFTLinear for (..., features) input")
    check_input(x, weight, plan.in_channels, x.shape[1], "BFT")
    N, C, H, W = x.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        y = _apply_bft(x.reshape(N, C, H * W), weight, bias, plan, residual)
        return y.view(N, plan.out_channels, H, W)
    y = _apply_bft(x.permute(0, 2, 3, 1).reshape(N * H * W, C, 1), weight, bias, plan, residual)
    return y.view(N, H, W, plan.out_channels).permute(0, 3, 1, 2)


def bft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: BFTPlan,
               residual: bool) -> Tensor:
    """What ``BFTLinear.forward`` computes: ``(..., in) -> (..., out)``. One node under
    ``torch.fx`` tracing (``torch.fx.wrap``)."""
    if x.dim() < 1:
        raise ValueError("BFTLinear expects an input with a feature dimension, got a scalar")
    check_input(x, weight, plan.in_channels, x.shape[-1], "BFTLinear")
    lead = x.shape[:-1]
    y = _apply_bft(x.reshape(-1, plan.in_channels, 1), weight, bias, plan, residual)
    return y.view(*lead, plan.out_channels)


torch.fx.wrap("bft_conv2d")
torch.fx.wrap("bft_linear")


def is_bft(module: nn.Module) -> bool:
    return isinstance(module, _BFTBase)


def is_1x1_conv(module: nn.Module) -> bool:
    """A 1x1 ``nn.Conv2d`` with stride 1, no padding, no groups/dilation: a per-pixel matrix."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1) and module.groups == 1
            and tuple(module.dilation) == (1, 1)
            and (module.padding in ("valid", (0, 0)) or tuple(module.padding) == (0, 0)))


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 ``nn.Conv2d`` that a BFT replaces exactly: :func:`is_1x1_conv`, with at least two
    input and two output channels (see :func:`bft_refusal`)."""
    return is_1x1_conv(module) and not pointwise_refusal(module)


def dense_weight(weight: Union[Tensor, nn.Module],
                 bias: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight (out, in), bias)`` of a pointwise ``nn.Conv2d``, an ``nn.Linear``, or of an
    ``(out, in)`` / ``(out, in, 1, 1)`` weight tensor, detached."""
    if isinstance(weight, nn.Module):
        if not (is_1x1_conv(weight) or isinstance(weight, nn.Linear)):
            raise TypeError(f"expected a weight tensor, a pointwise nn.Conv2d (1x1, stride 1, "
                            f"no padding/groups/dilation) or an nn.Linear, got {weight}")
        weight, bias = weight.weight, weight.bias if bias is None else bias
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2:
        raise ValueError(f"expected an (out, in) or (out, in, 1, 1) weight, "
                         f"got shape {tuple(weight.shape)}")
    return weight.detach(), bias


@torch.no_grad()
def dense_equivalent(layer: nn.Module) -> nn.Module:
    """The dense layer that computes exactly what ``layer`` (a ``BFT`` or ``BFTLinear``) computes:
    an ``nn.Conv2d(in, out, 1)`` or an ``nn.Linear(in, out)`` on the same device and dtype, with
    ``layer.to_dense()`` (residual included) as its weight and the layer's bias, if any."""
    if not is_bft(layer):
        raise TypeError(f"dense_equivalent expects a BFT or BFTLinear layer, "
                        f"got {type(layer).__name__}")
    matrix = layer.to_dense()
    factory = {"device": matrix.device, "dtype": matrix.dtype}
    has_bias = layer.bias is not None
    out_channels, in_channels = matrix.shape
    if isinstance(layer, BFTLinear):
        dense = nn.Linear(in_channels, out_channels, bias=has_bias, **factory)
        dense.weight.copy_(matrix)
    else:
        dense = nn.Conv2d(in_channels, out_channels, 1, bias=has_bias, **factory)
        dense.weight.copy_(matrix.view(out_channels, in_channels, 1, 1))
    if has_bias:
        dense.bias.copy_(layer.bias)
    dense.train(layer.training)
    return dense
