"""Whole-network helpers, written once: walk and swap submodules, choose pointwise layers, capture
the inputs layers receive, run in eval mode, and report what a pass did per layer.

Every network rewrite (``replace_pointwise`` here; conversion, densifying and the inference
optimisation built on these helpers) is a pass over ``named_modules`` that swaps submodules.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn.bft import BFT, BFTLinear, is_1x1_conv, is_bft, is_pointwise_conv, pointwise_refusal

__all__ = ["LayerReport", "bft_layers", "capture_inputs", "eval_mode", "is_pointwise_conv", "pointwise_layers",
           "replace_pointwise", "swap_module"]

LayerFilter = Callable[[str, nn.Module], bool]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the ``with`` block; its own training flags (of every
    submodule) are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def aliases(model: nn.Module, name: str) -> List[str]:
    """Every name of the submodule ``name`` of ``model``, in model order: a layer shared under
    two attribute names has two (``named_modules()`` lists it once)."""
    module = model.get_submodule(name)
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``model`` with its submodule ``name`` replaced by ``new`` (``new`` itself when ``name`` is
    ``""``, the root) under every name that submodule has, so a shared layer stays shared.
    Returns the model, changed in place."""
    if name == "":
        return new
    for alias in aliases(model, name):
        model.set_submodule(alias, new)
    return model


def pointwise_layers(model: nn.Module, linear: bool = False,
                     filter_fn: Optional[LayerFilter] = None) -> Dict[str, nn.Module]:
    """The layers a BFT can replace exactly, by name, in model order: pointwise ``nn.Conv2d``
    (see :func:`is_pointwise_conv`) and, with ``linear=True``, ``nn.Linear``.
    ``filter_fn(name, module)`` may veto a layer."""
    return {name: m for name, m in model.named_modules()
            if (is_pointwise_conv(m) or (linear and isinstance(m, nn.Linear)
                                         and not pointwise_refusal(m)))
            and (filter_fn is None or filter_fn(name, m))}


def bft_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every ``BFT`` / ``BFTLinear`` of ``model``, by name, in model order."""
    return {name: m for name, m in model.named_modules() if is_bft(m)}


def capture_inputs(model: nn.Module, layers: Dict[str, nn.Module], batches: Iterable[tuple],
                   on_input: Callable[..., None]) -> None:
    """Run ``model(*args)`` in eval mode without gradients for each ``args`` tuple of ``batches``,
    and call ``on_input(name, layer, *inputs)`` with the inputs each named layer receives."""
    handles = [layer.register_forward_pre_hook(
        lambda module, args, name=name: on_input(
            name, module, *(a.detach() if isinstance(a, Tensor) else a for a in args)))
        for name, layer in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for args in batches:
                model(*args)
    finally:
        for handle in handles:
            handle.remove()


class LayerReport(list):
    """What a network pass did, one entry per layer in model order; ``str()`` gives a table.

    Subclasses give ``columns``: ``(header, width, format)`` triples, where ``format(entry)``
    returns the cell's text, and a ``title()`` line."""

    columns: Tuple[Tuple[str, int, Callable], ...] = ()

    def title(self) -> str:
        return f"{type(self).__name__}: {len(self)} layers"

    def __str__(self) -> str:
        head = " ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}"
                        for i, (h, w, _) in enumerate(self.columns))
        rows = [self.title(), head]
        for entry in self:
            rows.append(" ".join(f"{fmt(entry):<{w}}" if i == 0 else f"{fmt(entry):>{w}}"
                                 for i, (_, w, fmt) in enumerate(self.columns)))
        return "\n".join(rows)


def _channels(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features} -> {module.out_features}"
    return f"{module.in_channels} -> {module.out_channels}"


class ReplacedNames(list):
    """The names of the layers :func:`replace_pointwise` replaced (a plain ``list``), and in
    ``skipped`` the layers it kept, by name, with the reason (see
    :func:`butterfly.nn.bft.bft_refusal`)."""

    def __init__(self, names=(), skipped: Optional[Dict[str, str]] = None):
        super().__init__(names)
        self.skipped: Dict[str, str] = dict(skipped or {})


def replace_pointwise(model: nn.Module, filter_fn: Optional[LayerFilter] = None,
                      linear: bool = False, **bft_kwargs) -> Tuple[nn.Module, List[str]]:
    """Swap every pointwise ``nn.Conv2d`` (and, with ``linear=True``, every ``nn.Linear``) for a BFT
    with the same channels, bias, device and dtype. ``filter_fn(name, module)`` may veto a layer.

    Returns ``(model, names)``: the model, changed in place, and the names of the replaced layers.
    A 1x1 layer that no BFT can replace (one input or output channel) is kept, with a warning;
    ``names.skipped`` maps each such layer's name to the reason."""
    layers = pointwise_layers(model, linear, filter_fn)
    skipped = {name: pointwise_refusal(m) for name, m in model.named_modules()
               if (is_1x1_conv(m) or (linear and isinstance(m, nn.Linear)))
               and (filter_fn is None or filter_fn(name, m)) and pointwise_refusal(m)}
    names = []
    for name, module in layers.items():
        if name in skipped:
            continue
        factory = {"bias": module.bias is not None, "device": module.weight.device,
                   "dtype": module.weight.dtype}
        if isinstance(module, nn.Linear):
            new = BFTLinear(module.in_features, module.out_features, **factory, **bft_kwargs)
        else:
            new = BFT(module.in_channels, module.out_channels, **factory, **bft_kwargs)
        names.extend(aliases(model, name))
        model = swap_module(model, name, new)
    if skipped:
        shapes = ", ".join(f"{name or '<model>'} ({_channels(model.get_submodule(name))})"
                           for name in skipped)
        warnings.warn(f"replace_pointwise kept {len(skipped)} dense layer(s), {shapes}: a BFT "
                      "needs at least 2 input and 2 output channels (names.skipped has the "
                      "reasons)", UserWarning, stacklevel=2)
    return model, ReplacedNames(names, skipped)
