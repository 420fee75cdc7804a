"""The "triton" backend of the BFT operator: launch code for :mod:`.kernels`.

One launch computes every stage of every block for the forward pass and for the input gradient;
the weight gradient is one launch of per-program partial sums and a ``sum`` over programs (fused
with the input gradient when the layer is a single square block). The fused forward of
``butterfly::bft_fused`` is the forward launch with its epilogue (per-channel scale and shift,
activation, add) applied in registers before the store. Kernels are launched through
``torch.library.wrap_triton`` so that ``torch.compile`` traces them inside ``butterfly::bft``
and ``butterfly::bft_fused``.

Every launch is described by a :class:`Launch` (kernel, grid, integer arguments, constexprs,
warps) that depends only on the layer and the call's shapes and dtypes: :func:`forward_launch`
and :func:`backward_launches` build them once per such key and cache them, so a call does no
planning work; :mod:`.aot` compiles the same descriptions for a GPU target without a GPU.

On CPU tensors the backend runs only under ``TRITON_INTERPRET=1``, which must be set before
``butterfly`` (and so triton's ``@jit``) is imported; that is how the tests check the kernels.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from ...ops.bft_fused import check_epilogue, register_fused
from ...ops.dispatch import Backend, register_backend
from ...plan import BFTPlan
from .kernels import bft_kernel, bft_wgrad_kernel

# Decided when triton's @jit ran (at import): interpreted kernels run on CPU tensors.
INTERPRETED = not isinstance(bft_kernel, JITFunction)

MAX_RADIX = 16      # padded radix: a stage unrolls K * K weight terms
MAX_TILE = 1 << 14  # padded channels a program keeps on chip
ACC_PER_THREAD = 64  # float32 weight-gradient accumulators per thread and launch
# the kernel's ACT codes (see kernels._epilogue) for butterfly.ops.bft_fused.ACTIVATIONS
ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "hardswish": 3, "hardsigmoid": 4}


@dataclass(frozen=True)
class Geometry:
    """The plan in the kernels' terms (see :mod:`.kernels`)."""

    rad: int     # real radices, 5 bits each
    klog: int    # log2 of the padded radices, 3 bits each
    stages: int
    padded_size: int
    size: int
    padded: bool
    padded_radices: Tuple[int, ...]

    @staticmethod
    def of(radices: Tuple[int, ...]) -> "Geometry":
        return _geometry(tuple(int(k) for k in radices))

    def constexprs(self) -> dict:
        return dict(RAD=self.rad, KLOG=self.klog, L=self.stages, NP=self.padded_size, N=self.size,
                    PADDED=self.padded)


@lru_cache(maxsize=None)
def _geometry(radices: Tuple[int, ...]) -> Geometry:
    logs = [(k - 1).bit_length() for k in radices]
    return Geometry(rad=sum(k << (5 * s) for s, k in enumerate(radices)),
                    klog=sum(lg << (3 * s) for s, lg in enumerate(logs)),
                    stages=len(radices), padded_size=1 << sum(logs), size=math.prod(radices),
                    padded=any(k & (k - 1) for k in radices),
                    padded_radices=tuple(1 << lg for lg in logs))


@lru_cache(maxsize=None)
def _unsupported_radices(radices: Tuple[int, ...]) -> str:
    geo = _geometry(radices)
    if any(k > MAX_RADIX for k in geo.padded_radices):
        return (f"radices {radices} contain a radix above {MAX_RADIX} (a stage unrolls radix^2 "
                f"terms); choose a plan with smaller radices (base 2 or 4)")
    if geo.padded_size > MAX_TILE:
        return (f"a butterfly of {geo.padded_size} (padded) channels does not fit on chip "
                f"(limit {MAX_TILE})")
    return ""


def triton_unsupported(x: Tensor, weight: Tensor, radices: Sequence[int]) -> str:
    """Why the kernels do not take this plan ('' when they do)."""
    return _unsupported_radices(tuple(int(k) for k in radices))


@dataclass(frozen=True, eq=False)
class Layer:
    """What a call needs that depends only on the layer: its plan and geometry (one object per
    layer shape, from :func:`layer_of`: hashed by identity, so cache look-ups keyed on it are
    cheap)."""

    plan: BFTPlan
    geo: Geometry


@lru_cache(maxsize=4096)
def layer_of(in_channels: int, out_channels: int, radices: Tuple[int, ...]) -> Layer:
    return Layer(BFTPlan(in_channels, out_channels, radices), _geometry(radices))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*pointers, *ints, num_warps=..., **constexprs)``.

    ``pointers`` gives the dtype of each pointer argument (``None``: the launch passes ``None``,
    a step of the epilogue that is off), for :mod:`.aot`, which compiles the launch without
    tensors; the launch code passes the tensors themselves."""

    kernel: Any
    grid: Tuple[int, ...]
    pointers: Tuple[Optional[torch.dtype], ...]
    ints: Tuple[int, ...]
    constexprs: Tuple[Tuple[str, Any], ...]
    num_warps: int
    kwargs: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    wrapped: Any = field(default=None, compare=False, hash=False, repr=False)

    @staticmethod
    def make(kernel, grid, pointers, ints, num_warps, **constexprs) -> "Launch":
        return Launch(kernel, tuple(grid), tuple(pointers), tuple(int(i) for i in ints),
                      tuple(sorted(constexprs.items())), num_warps,
                      {**constexprs, "num_warps": num_warps}, _WRAPPED[kernel])

    def __call__(self, *tensors) -> None:
        self.wrapped[self.grid](*tensors, *self.ints, **self.kwargs)


_WRAPPED = {kernel: wrap_triton(kernel) for kernel in (bft_kernel, bft_wgrad_kernel)}


def _launch_config(geo: Geometry, npix: int, backward: bool) -> Tuple[int, int]:
    """(pixels per program, warps). A program keeps ``BP x NP`` float32 values per live tile:
    16 per thread for the forward pass and 4 for the weight gradient (which also keeps every
    stage's input). Under the interpreter (serial programs, vectorised numpy) bigger tiles are
    faster."""
    warps = 8 if geo.padded_size >= 512 else 4
    per_thread = 4 if backward else 16
    elems = 1 << 16 if INTERPRETED else per_thread * 32 * warps
    bp = max(1, elems // geo.padded_size)
    return min(triton.next_power_of_2(max(npix, 1)), bp, 256), warps


def _align(*strides: int) -> int:
    """The largest power of two up to 16 that divides every stride (the kernels' ``ALIGN``)."""
    a = 16
    while a > 1 and any(s % a for s in strides):
        a //= 2
    return a


def _layout(shape: Tuple[int, ...]) -> Tuple[bool, int, int]:
    """(channels_last, pixels per image (or rows), images) of a ``(B, C, P)`` operand: ``P == 1``
    means channels are contiguous, so a tile is ``BP`` rows of channels; otherwise ``BP``
    contiguous pixels."""
    B, _, P = shape
    return (True, B, 1) if P == 1 else (False, P, B)


def _f64(*dtypes: torch.dtype) -> bool:
    return torch.float64 in dtypes


@lru_cache(maxsize=4096)
def forward_launch(layer: Layer, shape: Tuple[int, int, int], dtype: torch.dtype,
                   wdtype: torch.dtype, transpose: bool, residual: bool,
                   epilogue: Tuple[Optional[torch.dtype], Optional[torch.dtype], int, bool] =
                   (None, None, 0, False)) -> Launch:
    """The forward launch (or, with ``transpose``, the input gradient's) of ``layer`` on a
    ``(B, C, P)`` source of ``shape``. ``epilogue``: (scale dtype, shift dtype, ACT, add) with
    ``None`` for a step that is off."""
    plan, geo = layer.plan, layer.geo
    src_channels = plan.out_channels if transpose else plan.in_channels
    dst_channels = plan.in_channels if transpose else plan.out_channels
    expand = plan.expand != transpose  # the transposed butterfly maps blocks the other way
    channels_last, npix, images = _layout(shape)
    bp, warps = _launch_config(geo, npix, backward=False)
    tiles_per_img = triton.cdiv(npix, bp)
    scale, shift, act, add = epilogue
    align = _align(src_channels, dst_channels) if channels_last else _align(npix)
    return Launch.make(
        bft_kernel, (tiles_per_img * images,), (dtype, wdtype, dtype, scale, shift,
                                                dtype if add else None),
        (npix, tiles_per_img, src_channels, dst_channels, plan.block, plan.num_blocks,
         plan.weights_per_block), warps, BP=bp, CHANNELS_LAST=channels_last, EXPAND=expand,
        TRANSPOSE=transpose, RESIDUAL=residual, F64=_f64(dtype, wdtype),
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=act, HAS_ADD=add,
        ALIGN=align, THREADS=32 * warps, **geo.constexprs())


def _num_partials(sms: int, tiles: int, blocks: int) -> int:
    """Programs per block of the weight gradient: enough to fill the device's ``sms``
    multiprocessors twice, no more (each writes a full partial weight row)."""
    if INTERPRETED:
        return min(tiles, 2)
    return max(1, min(tiles, -(-2 * sms // blocks)))


DEFAULT_SMS = 132  # an H100's: for launches built without a GPU (tracing, AOT builds)


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _stage_groups(geo: Geometry, warps: int, bp: int) -> List[Tuple[int, int]]:
    """Consecutive stage ranges ``[lo, hi)`` whose weight-gradient accumulators (``BP * NP * K``
    per stage: one per pixel row, summed after the last tile) fit in ``ACC_PER_THREAD``
    registers per thread: one weight-gradient launch each. A tile of more than 4 values per
    thread (one pixel of 2048 channels) keeps more live tensors of its size (stage inputs,
    gradients, weight pieces), so its accumulators get half the budget."""
    tile = bp * geo.padded_size // (32 * warps)
    budget = (ACC_PER_THREAD if tile <= 4 else ACC_PER_THREAD // 2) * 32 * warps
    groups, lo, used = [], 0, 0
    for s, k in enumerate(geo.padded_radices):
        cost = bp * geo.padded_size * k
        if s > lo and used + cost > budget:
            groups.append((lo, s))
            lo, used = s, 0
        used += cost
    return groups + [(lo, geo.stages)]


@dataclass(frozen=True)
class Backward:
    """The launches of one backward call: the input gradient's own launch (``None`` when the
    weight-gradient launch of the first stages writes it), then the weight-gradient launches,
    which write ``partials`` rows of partial sums per block."""

    grad_input: Optional[Launch]
    weight_grad: Tuple[Launch, ...]
    partials: int
    partial_dtype: torch.dtype


@lru_cache(maxsize=4096)
def backward_launches(layer: Layer, shape: Tuple[int, int, int], dtype: torch.dtype,
                      wdtype: torch.dtype, residual: bool, sms: int) -> Backward:
    """The launches of the backward of ``layer`` for an input of ``shape`` ``(B, C_in, P)`` on a
    device with ``sms`` multiprocessors."""
    plan, geo = layer.plan, layer.geo
    channels_last, npix, images = _layout(shape)
    fuse_dx = plan.num_blocks == 1
    grad_shape = (shape[0], plan.out_channels, shape[2])
    grad_input = None if fuse_dx else forward_launch(layer, grad_shape, dtype, wdtype, True,
                                                     residual)
    bp, warps = _launch_config(geo, npix, backward=True)
    tiles_per_img = triton.cdiv(npix, bp)
    tiles = tiles_per_img * images
    programs = _num_partials(sms, tiles, plan.num_blocks)
    f64 = _f64(dtype, wdtype)
    partial = torch.float64 if f64 else torch.float32
    align = _align(plan.in_channels, plan.out_channels) if channels_last else _align(npix)
    launches = tuple(
        Launch.make(bft_wgrad_kernel, (programs, plan.num_blocks),
                    (dtype, dtype, wdtype, partial, dtype),
                    (npix, tiles_per_img, tiles, plan.in_channels, plan.out_channels, plan.block,
                     plan.weights_per_block), warps,
                    BP=bp, CHANNELS_LAST=channels_last, EXPAND=plan.expand, RESIDUAL=residual,
                    LO=lo, HI=hi, FUSE_DX=fuse_dx and lo == 0, F64=f64, ALIGN=align,
                    THREADS=32 * warps,
                    **geo.constexprs())
        for lo, hi in _stage_groups(geo, warps, bp))
    return Backward(grad_input, launches, programs, partial)


def clear_caches() -> None:
    """Forget the cached launches (after changing a launch rule, e.g. in a test)."""
    for cached in (forward_launch, backward_launches, sm_count):
        cached.cache_clear()


@dataclass(frozen=True)
class KernelEpilogue:
    """A forward launch's epilogue: ``act(y * scale + shift) + add`` (``None``: step off)."""

    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    act: int = 0
    add: Optional[Tensor] = None

    def key(self) -> Tuple[Optional[torch.dtype], Optional[torch.dtype], int, bool]:
        return (None if self.scale is None else self.scale.dtype,
                None if self.shift is None else self.shift.dtype, self.act, self.add is not None)


NO_EPILOGUE = KernelEpilogue()


def _device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``x``'s (when tracing, the compiler
    places the kernels itself)."""
    if INTERPRETED and is_fake(x):
        raise RuntimeError(
            "the 'triton' BFT backend under TRITON_INTERPRET=1 runs the kernels eagerly and "
            "cannot be traced (torch.compile, opcheck, make_fx); trace with "
            "use_backend('reference') or on a GPU without TRITON_INTERPRET")
    if x.is_cuda and not is_fake(x) and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _shape(x: Tensor) -> Tuple[int, int, int]:
    """``x``'s shape as ints (a traced symbolic shape is specialised: tiles depend on it)."""
    return tuple(int(s) for s in x.shape)


def _forward(x: Tensor, weight: Tensor, radices: List[int], out_channels: int, residual: bool,
             epilogue: KernelEpilogue) -> Tensor:
    device = _device_of(x)
    layer = layer_of(x.shape[1], out_channels, tuple(radices))
    y = torch.empty(x.shape[0], out_channels, x.shape[2], dtype=x.dtype, device=x.device)
    if y.numel():
        x, weight = x.contiguous(), weight.contiguous()
        launch = forward_launch(layer, _shape(x), x.dtype, weight.dtype, False, residual,
                                epilogue.key())
        with device:
            launch(x, weight, y, epilogue.scale, epilogue.shift, epilogue.add)
    return y


def triton_forward(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
                   residual: bool) -> Tensor:
    return _forward(x, weight, radices, out_channels, residual, NO_EPILOGUE)


def triton_fused(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
                 residual: bool, scale: Optional[Tensor], shift: Optional[Tensor],
                 activation: str, add: Optional[Tensor]) -> Tensor:
    """``butterfly::bft_fused`` in one launch: the forward kernel with its epilogue flags on."""
    check_epilogue(x, out_channels, scale, shift, activation, add)
    scale, shift, add = (None if t is None else t.contiguous() for t in (scale, shift, add))
    return _forward(x, weight, radices, out_channels, residual,
                    KernelEpilogue(scale, shift, ACT_CODES[activation], add))


def triton_backward(grad: Tensor, x: Tensor, weight: Tensor, radices: List[int],
                    out_channels: int, residual: bool) -> Tuple[Tensor, Tensor]:
    device = _device_of(x)
    layer = layer_of(x.shape[1], out_channels, tuple(radices))
    grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(weight)
    launches = backward_launches(layer, _shape(x), x.dtype, weight.dtype, residual,
                                 sm_count(x.device))
    partial = torch.empty(launches.partials, layer.plan.num_blocks, weight.shape[1],
                          device=x.device, dtype=launches.partial_dtype)
    with device:
        if launches.grad_input is not None:
            launches.grad_input(grad, weight, grad_x, None, None, None)
        for launch in launches.weight_grad:
            launch(x, grad, weight, partial, grad_x)
    return grad_x, partial.sum(0).to(weight.dtype)


def triton_unavailable(device: torch.device) -> str:
    # The interpreter runs the same kernels on host tensors (tests on machines without a GPU).
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return ""
    return (f"it has no kernels for {device.type} tensors: use CUDA tensors, set "
            "TRITON_INTERPRET=1 before importing triton (slow, for tests), or pick "
            "use_backend('auto')")


def triton_available(device: torch.device) -> bool:
    return not triton_unavailable(device)


register_backend(Backend("triton", triton_forward, triton_backward, triton_unavailable,
                         triton_unsupported, degrades=False, auto_devices=("cuda",),
                         auto_priority=20))
register_fused("triton", triton_fused)
