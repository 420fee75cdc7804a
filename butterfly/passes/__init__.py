"""Passes over whole networks, each built on :mod:`.surgery` (walking and swapping submodules):
:mod:`.convert` (dense -> BFT), :mod:`.fuse` (the fused inference layers),
:mod:`.optimize` (``optimize_for_inference``, ``densify``), :mod:`.export` (ONNX)."""
from .convert import convert, from_dense
from .export import export_onnx
from .optimize import densify, optimize_for_inference
from .surgery import replace_pointwise

__all__ = ["convert", "densify", "export_onnx", "from_dense", "optimize_for_inference",
           "replace_pointwise"]
