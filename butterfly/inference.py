"""Inference: rewriting a BFT network for deployment.

* :func:`densify`: every BFT of a network replaced by its exact dense equivalent
  (``BFT.to_conv2d()`` / ``BFTLinear.to_linear()``, residual and bias folded in).
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

from .modules import dense_equivalent
from .surgery import LayerReport, bft_layers, capture_inputs, swap_module


def densify(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every ``BFT``/``BFTLinear`` in ``model`` by its exact dense equivalent.

    For runtimes whose fastest pointwise layer is a dense 1x1 convolution or GEMM. Changes
    ``model`` in place unless ``inplace=False`` (then a deep copy is changed); returns the
    model (a dense layer when ``model`` itself is a BFT)."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in bft_layers(model).items():
        model = swap_module(model, name, dense_equivalent(layer))
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


class InferenceReport(LayerReport):
    """The :class:`LayerChoice` of every BFT layer, in model order; ``str()`` gives a table."""

    columns = (("layer", 28, lambda c: c.name or "<model>"),
               ("shape", 11, lambda c: f"{c.in_channels}->{c.out_channels}"),
               ("input", 18, lambda c: "x".join(map(str, c.input_shape))),
               ("bft ms", 9, lambda c: f"{c.bft_ms:.4f}"),
               ("dense ms", 9, lambda c: f"{c.dense_ms:.4f}"),
               ("chosen", 6, lambda c: c.chosen))

    def __init__(self, choices=(), device: str = ""):
        super().__init__(choices)
        self.device = device

    def title(self) -> str:
        return (f"optimize_for_inference on {self.device}: {len(self)} BFT layers, "
                f"{sum(c.chosen == 'dense' for c in self)} made dense")


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
    layers = bft_layers(model)
    if not layers:
        return model, InferenceReport()
    inputs = {}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    capture_inputs(model, layers, [args], lambda name, layer, x: inputs.setdefault(name, x))
    report = InferenceReport(device=str(next(iter(inputs.values())).device) if inputs else "")
    for name, layer in layers.items():
        if name not in inputs:
            continue
        x = inputs[name]
        dense = dense_equivalent(layer)
        bft_s, dense_s = time_call(layer, x, min_run_time), time_call(dense, x, min_run_time)
        chosen = "dense" if dense_s < bft_s else "bft"
        if chosen == "dense":
            model = swap_module(model, name, dense)
        report.append(LayerChoice(name, type(layer).__name__, layer.plan.in_channels,
                                  layer.plan.out_channels, tuple(x.shape), bft_s * 1e3,
                                  dense_s * 1e3, chosen))
    return model, report
