"""ONNX export of BFT networks, checking with onnxruntime, and counting an ONNX graph's MACs.

Two forms:

* structured: every BFT becomes its stages as standard ONNX ops (Pad, Reshape, Transpose, one
  batched MatMul per stage, ReduceSum), so the graph keeps the O(n log n) cost: while
  ``torch.onnx.export`` runs, ``butterfly.ops.bft`` traces
  :func:`butterfly.ops.reference.bft_matmul` instead of the operator (MatMul rather than the
  reference's Einsum: every ONNX runtime has it, and runs it faster).
* dense: the BFTs are first replaced by their exact dense 1x1 convolutions (:func:`densify`), for
  runtimes whose fastest pointwise layer is a dense one.

Uses the ``torch.export``-based exporter (``dynamo=True``, PyTorch's default since 2.9), which needs
the ``onnxscript`` package. The legacy TorchScript exporter (``dynamo=False``) handles square
layers, but onnxruntime rejects its graph of a tiled layer (``in < out``: an ``Add`` fails shape
inference), so it is not used.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Union

import torch
from torch import nn

from .fuse import is_fused
from .optimize import densify
from .surgery import eval_mode

PathLike = Union[str, os.PathLike]


def export_onnx(model: nn.Module, example, path: PathLike, structured: bool = True,
                dynamic_batch: bool = False, opset_version: int | None = None) -> str:
    """Export ``model`` to ONNX at ``path`` and return the path.

    ``example``: an input tensor (or tuple of inputs) with the shape to export. ``structured=True``
    keeps the butterfly stages; ``False`` exports the dense equivalent (the model itself is not
    changed). ``dynamic_batch``: the first dimension of every input is left symbolic (any batch size
    from 1, whatever the example's). The model is exported in eval mode (its mode is restored
    afterwards)."""
    try:
        import onnxscript  # noqa: F401,PLC0415  (optional dependency)
    except ImportError as err:
        raise ImportError("butterfly.export_onnx uses torch.onnx.export(dynamo=True), which needs "
                          "onnxscript: pip install onnxscript onnx onnxruntime") from err
    if is_fused(model):
        raise TypeError("export_onnx takes the model before optimize_for_inference: a fused model "
                        "runs the library's CPU kernels, which ONNX has no operators for. Export "
                        "the eval-mode model itself (structured=False gives its dense form); "
                        "onnxruntime then fuses BatchNorm and activations its own way")
    args = example if isinstance(example, tuple) else (example,)
    if not structured:
        model = densify(model, inplace=False)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
        # torch.export specialises every dimension of size 1 to the constant 1, even one declared
        # dynamic: a batch-1 example is exported as a batch-2 copy (eval mode: the same graph)
        args = tuple(a.expand(2, *a.shape[1:]).clone()
                     if isinstance(a, torch.Tensor) and a.shape[0] == 1 else a for a in args)
    with eval_mode(model):
        torch.onnx.export(model, args, str(path), dynamo=True, verbose=False,
                          dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                          external_data=False)
    return str(path)


def check_onnx(path: PathLike, model: nn.Module, example) -> float:
    """Run the ONNX file with onnxruntime (CPU) on ``example`` and return the relative error of its
    output against ``model``'s in eval mode (single-output models):
    ``max |onnxruntime - PyTorch| / max |PyTorch|`` (the absolute difference when the output is all
    zeros), so the same bound holds for outputs of any magnitude: ~1e-7 is float32 rounding."""
    import onnxruntime as ort  # noqa: PLC0415  (optional dependency)
    args = example if isinstance(example, tuple) else (example,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {inp.name: a.detach().cpu().numpy() for inp, a in zip(session.get_inputs(), args)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with eval_mode(model), torch.no_grad():
        want = model(*args).cpu()
    error = (got.to(torch.float64) - want.to(torch.float64)).abs().max().item()
    scale = want.to(torch.float64).abs().max().item()
    return error / scale if scale > 0 else error


def onnx_macs(path: PathLike) -> Dict[str, int]:
    """Multiply-adds of the Einsum, MatMul, Gemm and Conv nodes of an ONNX graph with static shapes,
    by op type (from ONNX shape inference). An Einsum costs the product of the sizes of all its
    indices."""
    import onnx  # noqa: PLC0415  (optional dependency)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    shapes = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    macs: Dict[str, int] = {}
    for node in graph.node:
        ins = [shapes.get(name) for name in node.input]
        out = shapes.get(node.output[0])
        if node.op_type == "Einsum":
            equation = next(onnx.helper.get_attribute_value(a) for a in node.attribute
                            if a.name == "equation").decode().replace(" ", "")
            sizes = {}
            for term, shape in zip(equation.split("->")[0].split(","), ins):
                sizes.update(zip(term, shape))
            count = math.prod(sizes.values())
        elif node.op_type == "MatMul":
            count = math.prod(out) * ins[0][-1]
        elif node.op_type == "Gemm":
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            count = math.prod(out) * ins[0][0 if trans_a else 1]
        elif node.op_type == "Conv":
            count = math.prod(out) * math.prod(ins[1][1:])
        else:
            continue
        macs[node.op_type] = macs.get(node.op_type, 0) + count
    return macs
