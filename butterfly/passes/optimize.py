"""Inference: rewriting a BFT network for deployment.

* :func:`densify`: every BFT of a network replaced by its exact dense equivalent
  (``BFT.to_conv2d()`` / ``BFTLinear.to_linear()``, residual and bias folded in).
* :func:`optimize_for_inference`: a fused copy of the network (:mod:`butterfly.passes.fuse`: BatchNorms
  folded, activations and residual additions in the layers' epilogues), then every BFT timed
  against its dense equivalent (with the same epilogue), every fused depthwise conv's kernel
  against PyTorch's convolution, and every depthwise-separable block in one pass against its two
  layers apart, on the real device and input, and the faster kept.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .batch_chunks import BatchChunks, batch_size
from .fuse import FusedBFT, FusedConv, FusedDepthwiseBFT, FusedLayer, FusedLinear
from .fuse import dense_alternative, expose_submodules
from .fuse import merge_separable
from .fuse import fuse as _fuse
from ..nn.bft import dense_equivalent, is_bft
from ..ops.dw_bft_fused import kernel_applies
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
    epilogue: str = "-"        # what the fusion pass moved into the layer, e.g. "bn+relu"

    @property
    def speedup(self) -> float:
        """How much faster the chosen implementation is than the other one (>= 1)."""
        return max(self.bft_ms, self.dense_ms) / min(self.bft_ms, self.dense_ms)


@dataclass
class KernelChoice:
    """What :func:`optimize_for_inference` measured for one fused layer that a library kernel
    computes (a depthwise conv, a conv over few input channels, a linear layer on a few rows):
    that kernel against PyTorch's (oneDNN on CPU), epilogue included."""

    name: str
    input_shape: Tuple[int, ...]
    kernel_ms: float
    torch_ms: float
    chosen: str                # "kernel" or "torch"


DepthwiseChoice = KernelChoice   # its earlier name, when it was for depthwise convs alone


@dataclass
class SeparableChoice:
    """What :func:`optimize_for_inference` measured for one depthwise-separable block (a fused
    depthwise conv and the fused BFT after it): one ``butterfly::dw_bft_fused`` pass against the
    two layers apart."""

    name: str
    input_shape: Tuple[int, ...]
    one_pass_ms: float
    apart_ms: float
    chosen: str                # "one pass" or "apart"


@dataclass
class ChunkChoice:
    """What :func:`optimize_for_inference` measured for the example's batch: the time of the
    whole batch (ms per call) run in chunks of each size tried, the whole batch included, and
    the chunk size kept (``batch``: not split)."""

    batch: int
    ms: Dict[int, float]
    chosen: int
    refused: str = ""          # why the batch is not split, when the network cannot be


class InferenceReport(LayerReport):
    """The :class:`LayerChoice` of every BFT layer, in model order; ``str()`` gives a table.
    ``depthwise`` holds the :class:`KernelChoice` of every fused depthwise conv (``small_input``
    and ``linear`` those of the convs over few input channels and the linear layers, ``onednn``
    those of the other float32 convs: oneDNN called directly or PyTorch's conv2d), ``separable``
    the :class:`SeparableChoice` of every depthwise-separable block, ``chunks`` the
    :class:`ChunkChoice` of the batch (None when the example's batch is one sample or the model
    was not fused). Layer names are those of the returned model."""

    columns = (("layer", 28, lambda c: c.name or "<model>"),
               ("shape", 11, lambda c: f"{c.in_channels}->{c.out_channels}"),
               ("input", 18, lambda c: "x".join(map(str, c.input_shape))),
               ("bft ms", 9, lambda c: f"{c.bft_ms:.4f}"),
               ("dense ms", 9, lambda c: f"{c.dense_ms:.4f}"),
               ("chosen", 6, lambda c: c.chosen),
               ("epilogue", 14, lambda c: c.epilogue))

    def __init__(self, choices=(), device: str = "", fused: Sequence[FusedLayer] = (),
                 unfused: Sequence[Tuple[str, str]] = ()):
        super().__init__(choices)
        self.device = device
        self.fused: List[FusedLayer] = list(fused)       # every conv/BFT given an epilogue
        self.unfused: List[Tuple[str, str]] = list(unfused)   # (graph node, why it stayed)
        self.depthwise: List[KernelChoice] = []
        self.small_input: List[KernelChoice] = []   # convs over few input channels
        self.linear: List[KernelChoice] = []   # linear layers on few rows
        self.onednn: List[KernelChoice] = []   # other convs: oneDNN called directly or not
        self.separable: List[SeparableChoice] = []
        self.shuffles: List[str] = []   # concatenations + channel shuffles folded into one pass
        self.pools: List[str] = []   # max pools on the max-pool kernel
        self.chunks: Optional[ChunkChoice] = None

    def title(self) -> str:
        text = (f"optimize_for_inference on {self.device}: {len(self)} BFT layers, "
                f"{sum(c.chosen == 'dense' for c in self)} made dense")
        if self.fused or self.unfused:
            kinds = Counter(f.kind for f in self.fused)
            text += (f"; fused {len(self.fused)} layers ("
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                     + f"), {len(self.unfused)} left unfused")
        if self.depthwise:
            kernel = [c for c in self.depthwise if c.chosen == "kernel"]
            text += (f"; depthwise convs: {len(kernel)} of {len(self.depthwise)} on the "
                     f"depthwise kernel ({sum(c.kernel_ms for c in kernel):.3f} ms against "
                     f"{sum(c.torch_ms for c in kernel):.3f} ms in PyTorch), the others on "
                     "PyTorch's convolution")
        for what, kernel, choices in (("convs over few input channels", "small-input",
                                       self.small_input),
                                      ("linear layers", "few-rows", self.linear),
                                      ("other convs", "direct oneDNN", self.onednn)):
            if choices:
                text += (f"; {what}: {sum(c.chosen == 'kernel' for c in choices)} of "
                         f"{len(choices)} on the {kernel} kernel ("
                         + ", ".join(f"{c.kernel_ms:.3f} ms against {c.torch_ms:.3f} ms"
                                     for c in choices) + " in PyTorch)")
        if self.shuffles:
            text += (f"; {len(self.shuffles)} concatenation + channel shuffle pairs written in "
                     "one pass")
        if self.pools:
            text += f"; {len(self.pools)} max pools on the max-pool kernel"
        if self.separable:
            one = [c for c in self.separable if c.chosen == "one pass"]
            text += (f"; depthwise-separable blocks: {len(one)} of {len(self.separable)} in one "
                     f"pass ({sum(c.one_pass_ms for c in one):.3f} ms against "
                     f"{sum(c.apart_ms for c in one):.3f} ms apart)")
        c = self.chunks
        if c is not None and c.refused:
            text += f"; the batch of {c.batch} runs whole: {c.refused}"
        elif c is not None:
            text += (f"; the batch of {c.batch} runs "
                     + ("whole" if c.chosen == c.batch else f"in chunks of {c.chosen}")
                     + " (ms per batch: " + ", ".join(
                         f"{'whole' if k == c.batch else f'chunks of {k}'} {ms:.3f}"
                         for k, ms in sorted(c.ms.items(), reverse=True)) + ")")
        return text

    def rename(self, prefix: str) -> None:
        """Prefix every layer name with ``prefix`` (the fused network moved into a wrapper)."""
        for entry in (*self, *self.depthwise, *self.small_input, *self.linear, *self.onednn,
                      *self.separable, *self.fused):
            entry.name = prefix + entry.name

    def __str__(self) -> str:
        lines = [super().__str__()]
        lines += [f"  left unfused: {node}: {why}" for node, why in self.unfused]
        return "\n".join(lines)


def time_call(fn: Callable[..., Tensor], x, min_run_time: float = 0.05, warmup: int = 2) -> float:
    """Median seconds of one ``fn(x)`` call (``fn(*x)`` for a tuple ``x``) without autograd,
    synchronising CUDA around each call. ``warmup`` calls first (kernel compilation, caches), then
    calls until ``min_run_time`` seconds and at least 5 calls have run."""
    args = x if isinstance(x, tuple) else (x,)
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
    times: List[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        sync()
        while len(times) < 5 or sum(times) < min_run_time:
            start = time.perf_counter()
            fn(*args)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimize_for_inference(model: nn.Module, example_input, fuse: bool = True,
                           inplace: bool = False, min_run_time: float = 0.05,
                           chunk_batch: bool = True) -> Tuple[nn.Module, InferenceReport]:
    """A copy of ``model`` made faster for inference on the device, dtype and memory format of
    ``example_input`` (a tensor or a tuple of inputs), and a report of what was done.

    ``fuse=True``: the copy is fused (:func:`butterfly.passes.fuse.fuse`: eval-mode BatchNorms folded
    into the conv or BFT before them, activations and residual additions in their epilogues; the
    result is a ``torch.fx.GraphModule`` for inference only). Then, for every BFT layer the example
    reaches, the butterfly is timed against its exact dense equivalent (with the same epilogue) on
    the layer's real input, and the faster is kept. ``fuse=False`` does only the per-layer choice,
    on the model itself when ``inplace=True``. With ``fuse=True`` every fused depthwise conv is
    also timed on the library's depthwise kernel and on PyTorch's convolution, and the faster
    kept (``report.depthwise``; likewise a conv over few input channels on the library's kernel
    for them, ``report.small_input``, and a linear layer on a few rows on its kernel,
    ``report.linear``), and every depthwise conv followed by a BFT is timed as one
    ``butterfly::dw_bft_fused`` pass and as two layers (``report.separable``; channels_last
    float CPU input only). With ``fuse=True`` and ``chunk_batch=True``, an example of more than
    one sample is also run whole and in chunks of fewer samples (powers of two), and when a chunk
    size is faster the result is a :class:`~butterfly.passes.batch_chunks.BatchChunks` holding
    the fused network (``.module``) that splits every larger batch into chunks of that size;
    the layers are then timed on one chunk (``report.chunks``). ``print(report)`` shows each
    layer's times and choice, what was fused, and what was left unfused and why. The outputs
    equal the eval-mode model's up to floating-point rounding."""
    if fuse and inplace:
        raise ValueError("optimize_for_inference(fuse=True) returns a new, fused model and leaves "
                         "the original untouched: drop inplace=True, or pass fuse=False")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    fused, unfused = [], []
    if fuse:
        result = _fuse(model, args)
        model, fused, unfused = result.model, result.fused, result.unfused
    elif not inplace:
        model = copy.deepcopy(model)
    model.eval()
    epilogues = {f.name: f.epilogue for f in fused}
    layers = {name: m for name, m in model.named_modules() if is_bft(m) or isinstance(m, FusedBFT)}
    report = InferenceReport(device=str(args[0].device), fused=fused, unfused=unfused)
    report.shuffles = result.shuffles if fuse else []
    report.pools = result.pools if fuse else []
    if fuse and chunk_batch:
        report.chunks = _choose_chunk(model, args, min_run_time)
    chunk = report.chunks.chosen if report.chunks else None
    if chunk is not None and chunk < report.chunks.batch:
        args = tuple(a[:chunk] for a in args)   # the layers are chosen for the chunk's size
    for name, layer, xs in _reached(model, layers, args):
        dense = dense_alternative(layer)
        bft_s, dense_s = time_call(layer, xs, min_run_time), time_call(dense, xs, min_run_time)
        chosen = "dense" if dense_s < bft_s else "bft"
        if chosen == "dense":
            model = swap_module(model, name, dense)
        report.append(LayerChoice(name, "BFT" if isinstance(layer, FusedBFT) else
                                  type(layer).__name__, layer.plan.in_channels,
                                  layer.plan.out_channels, tuple(xs[0].shape), bft_s * 1e3,
                                  dense_s * 1e3, chosen, epilogues.get(name, "-")))
    if fuse:
        _choose_kernels(model, args, report, min_run_time)
        _choose_separable(model, args, report, min_run_time)
    if chunk is not None and chunk < report.chunks.batch:
        model = BatchChunks(model, chunk)
        report.rename("module.")
    if fuse:
        expose_submodules(model)
    return model, report


def _choose_chunk(model: nn.Module, args: tuple, min_run_time: float) -> Optional[ChunkChoice]:
    """Time ``model`` on the example's batch whole and in chunks of 1, 2, 4, ... samples, and
    choose a chunk size only where it is at least 5% faster than the whole batch (timing noise
    does not wrap the model). None for an example of one sample."""
    n = batch_size(args)
    if n is None or n < 2:
        return None
    with torch.no_grad():
        whole = model(*args)
        if not isinstance(whole, Tensor) or whole.dim() == 0 or whole.shape[0] != n:
            return ChunkChoice(n, {}, n, "the model does not return one tensor with the batch "
                               "as its first dimension")
        halves = BatchChunks(model, (n + 1) // 2)(*args)
        scale = float(whole.abs().max()) if whole.numel() and whole.is_floating_point() else 1.0
        if halves.shape != whole.shape or not torch.allclose(
                halves.double(), whole.double(), rtol=1e-3, atol=1e-4 * max(scale, 1e-30)):
            return ChunkChoice(n, {}, n, "its output on part of the batch differs from that "
                               "on the whole batch (samples are not independent)")
    sizes = sorted({n, *(1 << k for k in range(n.bit_length()) if 1 << k < n)}, reverse=True)
    ms = {c: time_call(BatchChunks(model, c), args, min_run_time) * 1e3 for c in sizes}
    best = min(ms, key=ms.get)
    return ChunkChoice(n, ms, best if ms[best] < 0.95 * ms[n] else n)


def _reached(model: nn.Module, layers: dict, args: tuple):
    """``(name, layer, its inputs)`` for each of ``layers`` that ``model(*args)`` reaches."""
    inputs = {}
    if layers:
        capture_inputs(model, layers, [args], lambda name, layer, *xs: inputs.setdefault(name, xs))
    return [(name, layer, inputs[name]) for name, layer in layers.items() if name in inputs]


def _choose_kernels(model: nn.Module, args: tuple, report: InferenceReport,
                    min_run_time: float) -> None:
    """Time every fused layer that a library kernel computes (the depthwise kernel, the kernel
    for convs over few input channels, the linear layer on few rows, oneDNN's fused convolution
    called directly for the other convs) with that kernel and with PyTorch's (each with its
    epilogue), on its real input, and keep the faster."""
    # (layer class, switch attribute, whether the kernel takes the layer's input, the choices)
    kinds = [(FusedConv, "depthwise", lambda m, x: m.kernel_geometry, report.depthwise),
             (FusedConv, "small_input", lambda m, x: m._small_input_kernel(x),
              report.small_input),
             (FusedLinear, "rows_kernel", lambda m, x: m.kernel_runs(x), report.linear),
             # after small_input: a conv that kernel runs never reaches the oneDNN call
             (FusedConv, "onednn_call",
              lambda m, x: not m.depthwise and not m.small_input and m._onednn(x),
              report.onednn)]
    classes = {cls for cls, *_ in kinds}
    layers = {name: m for name, m in model.named_modules() if type(m) in classes}
    reached = _reached(model, layers, args)   # one pass captures every layer's input
    for cls, attr, applies, choices in kinds:
        for name, layer, xs in reached:
            if type(layer) is not cls or not applies(layer, xs[0]):
                continue
            setattr(layer, attr, True)
            kernel_s = time_call(layer, xs, min_run_time)
            setattr(layer, attr, False)
            torch_s = time_call(layer, xs, min_run_time)
            setattr(layer, attr, torch_s >= kernel_s)
            choices.append(KernelChoice(name, tuple(xs[0].shape), kernel_s * 1e3, torch_s * 1e3,
                                        "kernel" if torch_s >= kernel_s else "torch"))


def _choose_separable(model: nn.Module, args: tuple, report: InferenceReport,
                      min_run_time: float) -> None:
    """Merge every depthwise-separable block of the fused graph (:func:`merge_separable`), time
    each one the example reaches in one pass and with its two layers apart, on its real input,
    and keep the faster (blocks whose input the one-pass kernel does not take stay apart)."""
    merged = merge_separable(model)
    if not merged:
        return
    # the report's names keep naming the layers, now inside the blocks
    moved = {bft: f"{bft}.pw" for bft, _ in merged}
    moved.update({dw: f"{bft}.dw" for bft, dw in merged})
    for choice in list(report) + report.depthwise:
        choice.name = moved.get(choice.name, choice.name)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedDepthwiseBFT)}
    for name, layer, xs in _reached(model, layers, args):
        layer.one_pass = False
        apart_s = time_call(layer, xs, min_run_time)
        if not kernel_applies(xs[0], layer.dw.weight, layer.dw.stride[0]):
            continue
        layer.one_pass = True
        one_s = time_call(layer, xs, min_run_time)
        layer.one_pass = one_s <= apart_s
        report.separable.append(SeparableChoice(name, tuple(xs[0].shape), one_s * 1e3,
                                                apart_s * 1e3,
                                                "one pass" if layer.one_pass else "apart"))
