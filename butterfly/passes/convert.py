"""Conversion: a trained dense network becomes a BFT network to fine-tune.

Every pointwise layer is replaced by a BFT fitted to it (``BFT.from_dense``; the fit itself is in
:mod:`butterfly.nn.factorization`), optionally on the activations the dense network produces.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.factorization import input_covariance, output_metric
from ..nn.bft import BFT, BFTLinear, dense_weight
from .surgery import LayerReport, capture_inputs, pointwise_layers, swap_module


def from_dense(weight: Union[Tensor, nn.Module], bias: Optional[Tensor] = None, *,
               linear: Optional[bool] = None, **kwargs) -> Union[BFT, BFTLinear]:
    """A ``BFT`` (or a ``BFTLinear`` with ``linear=True``, the default for an ``nn.Linear``) fitted
    to a dense pointwise layer; keyword arguments as in ``BFT.from_dense``."""
    if linear is None:
        linear = isinstance(weight, nn.Linear)
    return (BFTLinear if linear else BFT).from_dense(weight, bias, **kwargs)


@dataclass
class LayerFit:
    """What :func:`convert` did to one dense layer."""

    name: str
    in_channels: int
    out_channels: int
    dense_macs: int            # per pixel (or per row for linear layers)
    bft_macs: int
    rel_error: float           # ||B - W|| / ||W||, or ||(B - W) X|| / ||W X|| with calibration
    calibrated: bool
    residual: bool


class ConversionReport(LayerReport):
    """The :class:`LayerFit` of every converted layer; ``str()`` gives a table."""

    columns = (("layer", 28, lambda f: f.name),
               ("shape", 11, lambda f: f"{f.in_channels}->{f.out_channels}"),
               ("dense MACs", 10, lambda f: str(f.dense_macs)),
               ("BFT MACs", 9, lambda f: str(f.bft_macs)),
               ("residual", 8, lambda f: str(f.residual)),
               ("rel. error", 10, lambda f: f"{f.rel_error:.4f}"),
               ("", 9, lambda f: "(outputs)" if f.calibrated else ""))

    def title(self) -> str:
        dense = sum(f.dense_macs for f in self)
        bft = sum(f.bft_macs for f in self)
        return f"convert: {len(self)} layers, pointwise MACs per pixel {dense} -> {bft}"


def _model_inputs(calib_data) -> Iterable[tuple]:
    """Argument tuples for the model from a batch, or an iterable of batches (tensors, or tuples
    whose first element is the input, like a DataLoader's)."""
    for batch in [calib_data] if isinstance(calib_data, Tensor) else calib_data:
        yield (batch[0] if isinstance(batch, (tuple, list)) else batch,)


def _calibrate(model: nn.Module, layers: dict, calib_data) -> dict:
    """``X^T X`` of every named layer's inputs while the model runs (eval mode) on ``calib_data``."""
    covs = {}
    device = next(model.parameters()).device

    def accumulate(name: str, module: nn.Module, x: Tensor) -> None:
        cov = input_covariance(x, isinstance(module, nn.Linear))
        covs[name] = cov if name not in covs else covs[name] + cov

    batches = ((x.to(device),) for (x,) in _model_inputs(calib_data))
    capture_inputs(model, layers, batches, accumulate)
    return covs


def convert(model: nn.Module, calib_data=None, *, base: int = 4, residual: Union[bool, str] = "auto",
            linear: bool = False, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
            steps: int = 100, inplace: bool = True) -> Tuple[nn.Module, ConversionReport]:
    """Replace every pointwise ``nn.Conv2d`` (and with ``linear=True`` every ``nn.Linear``) of a
    trained model by a BFT fitted to it, ready to fine-tune.

    ``calib_data``: a batch of model inputs, or an iterable of batches (tensors, or tuples whose first
    element is the input, like a DataLoader); the fit then minimises each layer's output error on
    the activations the dense model produces. ``residual``: as in ``BFT.from_dense``.
    ``filter_fn(name, module)`` may veto a layer. Changes
    ``model`` in place unless ``inplace=False``. Returns ``(model, report)``."""
    if not inplace:
        model = copy.deepcopy(model)
    layers = pointwise_layers(model, linear, filter_fn)
    covs = _calibrate(model, layers, calib_data) if calib_data is not None and layers else {}
    report = ConversionReport()
    for name, dense in layers.items():
        weight, bias = dense_weight(dense)
        cls = BFTLinear if isinstance(dense, nn.Linear) else BFT
        layer = cls._fit(weight, bias, base, residual, covs.get(name), steps)
        layer.train(dense.training)
        model = swap_module(model, name, layer)
        report.append(LayerFit(name, layer.plan.in_channels, layer.plan.out_channels,
                               weight.numel(), layer.macs_per_pixel, layer.fit_error, name in covs,
                               layer.residual))
    return model, report


def relative_error(layer: nn.Module, weight: Tensor, calib: Optional[Tensor] = None) -> float:
    """``||B - W|| / ||W||`` of a BFT layer against a dense ``(out, in)`` weight, or with calibration
    inputs ``X`` the relative output error ``||(B - W) X|| / ||W X||`` (biases excluded)."""
    weight, _ = dense_weight(weight)
    with torch.no_grad():
        err = (layer.to_dense().to(torch.float64) - weight.to(torch.float64))
        ref = weight.to(torch.float64)
        if calib is not None:
            metric = output_metric(input_covariance(calib, isinstance(layer, BFTLinear)))
            err, ref = err @ metric, ref @ metric
    return (err.norm() / ref.norm()).item()
