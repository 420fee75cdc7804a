"""Deployment: dense equivalents of BFT layers, and picking the faster of the two per layer.

* :func:`dense_equivalent` / ``BFT.to_conv2d()`` / ``BFTLinear.to_linear()``: the exactly equivalent
  ``nn.Conv2d(in, out, 1)`` / ``nn.Linear`` (residual and bias folded in).
* :func:`densify`: every BFT of a network replaced by its dense equivalent.
* :func:`optimize_for_inference`: every BFT timed against its dense equivalent on the real device
  and input, and the faster kept.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

from .modules import BFT, BFTLinear, is_bft


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


def _bft_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_bft(m)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``model`` with the submodule ``name`` swapped for ``new`` (``new`` itself for the root)."""
    if name == "":
        return new
    model.set_submodule(name, new)
    return model


def densify(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every ``BFT``/``BFTLinear`` in ``model`` by its exact dense equivalent.

    For runtimes whose fastest pointwise layer is a dense 1x1 convolution or GEMM. Changes
    ``model`` in place unless ``inplace=False`` (then a deep copy is changed); returns the
    model (a dense layer when ``model`` itself is a BFT)."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in _bft_layers(model):
        model = _replace(model, name, dense_equivalent(layer))
    return model


@dataclass
class LayerChoice:
    """What :func:`optimize_for_inference` measured for one BFT layer."""

    name: str
    kind: str                  # "BFT" or "BFTLinear"
    in_channels: int
    out_channels: int
    input_shape: Tuple[int, ...]
    bft_ms: float
    dense_ms: float
    chosen: str                # "bft" or "dense"

    @property
    def speedup(self) -> float:
        """How much faster the chosen implementation is than the other one (>= 1)."""
        return max(self.bft_ms, self.dense_ms) / min(self.bft_ms, self.dense_ms)


class InferenceReport(list):
    """The :class:`LayerChoice` of every BFT layer, in model order; ``str()`` gives a table."""

    def __init__(self, choices=(), device: str = ""):
        super().__init__(choices)
        self.device = device

    def __str__(self) -> str:
        head = (f"{'layer':<28} {'shape':>11} {'input':>18} {'bft ms':>9} {'dense ms':>9} "
                f"{'chosen':>6}")
        rows = [f"optimize_for_inference on {self.device}: {len(self)} BFT layers, "
                f"{sum(c.chosen == 'dense' for c in self)} made dense", head]
        for c in self:
            rows.append(f"{c.name or '<model>':<28} {f'{c.in_channels}->{c.out_channels}':>11} "
                        f"{'x'.join(map(str, c.input_shape)):>18} {c.bft_ms:>9.4f} "
                        f"{c.dense_ms:>9.4f} {c.chosen:>6}")
        return "\n".join(rows)


def time_call(fn: Callable[[Tensor], Tensor], x: Tensor, min_run_time: float = 0.05,
              warmup: int = 2) -> float:
    """Median seconds of one ``fn(x)`` call without autograd, synchronising CUDA around each call.
    ``warmup`` calls first (kernel compilation, caches), then calls until ``min_run_time`` seconds
    and at least 5 calls have run."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: List[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        sync()
        while len(times) < 5 or sum(times) < min_run_time:
            start = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _capture_inputs(model: nn.Module, example_input, names: List[str]) -> dict:
    """The input each named layer receives on its first call during ``model(example_input)``."""
    captured, handles = {}, []
    for name in names:
        def hook(module, args, name=name):
            captured.setdefault(name, args[0].detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def optimize_for_inference(model: nn.Module, example_input, inplace: bool = True,
                           min_run_time: float = 0.05) -> Tuple[nn.Module, InferenceReport]:
    """For every BFT layer, time the butterfly against its dense equivalent on the layer's real
    input (captured by running ``model(example_input)`` once, on the device and with the dtype and
    memory format of ``example_input``) and keep the faster one.

    Puts the model in eval mode. Changes ``model`` in place unless ``inplace=False``. Returns
    ``(model, report)``; ``print(report)`` shows each layer's measured times and choice. Layers that
    the example does not reach stay BFTs and are not in the report. The outputs do not change (up
    to floating-point rounding: the dense layer sums in a different order)."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    layers = dict(_bft_layers(model))
    if not layers:
        return model, InferenceReport()
    inputs = _capture_inputs(model, example_input, list(layers))
    report = InferenceReport(device=str(next(iter(inputs.values())).device) if inputs else "")
    for name, layer in layers.items():
        if name not in inputs:
            continue
        x = inputs[name]
        dense = dense_equivalent(layer)
        bft_s, dense_s = time_call(layer, x, min_run_time), time_call(dense, x, min_run_time)
        chosen = "dense" if dense_s < bft_s else "bft"
        if chosen == "dense":
            model = _replace(model, name, dense)
        report.append(LayerChoice(name, type(layer).__name__, layer.plan.in_channels,
                                  layer.plan.out_channels, tuple(x.shape), bft_s * 1e3,
                                  dense_s * 1e3, chosen))
    return model, report
