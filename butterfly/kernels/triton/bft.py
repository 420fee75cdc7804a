"""The "triton" backend of the BFT operator: launch code for :mod:`.kernels`.

One launch computes every stage of every block for the forward pass and for the input gradient;
the weight gradient is one launch of per-program partial sums and a ``sum`` over programs (fused
with the input gradient when the layer is a single square block). The fused forward of
``butterfly::bft_fused`` is the forward launch with its epilogue (per-channel scale and shift,
activation, add) applied in registers before the store. Kernels are launched through
``torch.library.wrap_triton`` so that ``torch.compile`` traces them inside ``butterfly::bft``
and ``butterfly::bft_fused``.

On CPU tensors the backend runs only under ``TRITON_INTERPRET=1``, which must be set before
``butterfly`` (and so triton's ``@jit``) is imported; that is how the tests check the kernels.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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
        logs = [(k - 1).bit_length() for k in radices]
        return Geometry(rad=sum(k << (5 * s) for s, k in enumerate(radices)),
                        klog=sum(lg << (3 * s) for s, lg in enumerate(logs)),
                        stages=len(radices), padded_size=1 << sum(logs), size=math.prod(radices),
                        padded=any(k & (k - 1) for k in radices),
                        padded_radices=tuple(1 << lg for lg in logs))

    def constexprs(self) -> dict:
        return dict(RAD=self.rad, KLOG=self.klog, L=self.stages, NP=self.padded_size, N=self.size,
                    PADDED=self.padded)


def triton_unsupported(x: Tensor, weight: Tensor, radices: Sequence[int]) -> str:
    """Why the kernels do not take this plan ('' when they do)."""
    radices = tuple(radices)
    geo = Geometry.of(radices)
    if any(k > MAX_RADIX for k in geo.padded_radices):
        return (f"radices {radices} contain a radix above {MAX_RADIX} (a stage unrolls radix^2 "
                f"terms); choose a plan with smaller radices (base 2 or 4)")
    if geo.padded_size > MAX_TILE:
        return (f"a butterfly of {geo.padded_size} (padded) channels does not fit on chip "
                f"(limit {MAX_TILE})")
    return ""


def _launch_config(geo: Geometry, npix: int, backward: bool) -> Tuple[int, int]:
    """(pixels per program, warps). A program keeps ``BP x NP`` float32 values per live tile:
    about 16 per thread for the forward pass and 4 for the weight gradient (which also keeps
    every stage's input), from register counts of sm_90 builds (not tuned on a GPU). Under the
    interpreter (serial programs, vectorised numpy) bigger tiles are faster."""
    warps = 8 if geo.padded_size >= 512 else 4
    per_thread = 4 if backward else 16
    elems = 1 << 16 if INTERPRETED else per_thread * 32 * warps
    bp = max(1, elems // geo.padded_size)
    return min(triton.next_power_of_2(max(npix, 1)), bp, 256), warps


def _layout(x: Tensor) -> Tuple[bool, int, int]:
    """(channels_last, pixels per image (or rows), images): ``P == 1`` means channels are
    contiguous, so a tile is ``BP`` rows of channels; otherwise ``BP`` contiguous pixels."""
    B, _, P = x.shape
    return (True, B, 1) if P == 1 else (False, P, B)


@dataclass(frozen=True)
class KernelEpilogue:
    """A forward launch's epilogue: ``act(y * scale + shift) + add`` (``None``: step off)."""

    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    act: int = 0
    add: Optional[Tensor] = None

    def flags(self) -> dict:
        return dict(HAS_SCALE=self.scale is not None, HAS_SHIFT=self.shift is not None,
                    ACT=self.act, HAS_ADD=self.add is not None)


NO_EPILOGUE = KernelEpilogue()


def _launch_bft(src: Tensor, weight: Tensor, dst: Tensor, plan: BFTPlan, geo: Geometry,
                expand: bool, transpose: bool, residual: bool,
                epilogue: KernelEpilogue = NO_EPILOGUE) -> None:
    channels_last, npix, images = _layout(src)
    bp, warps = _launch_config(geo, npix, backward=False)
    tiles_per_img = triton.cdiv(npix, bp)
    wrap_triton(bft_kernel)[(tiles_per_img * images,)](
        src, weight, dst, epilogue.scale, epilogue.shift, epilogue.add, npix, tiles_per_img,
        src.shape[1], dst.shape[1], plan.block, plan.num_blocks, weight.shape[1], BP=bp,
        CHANNELS_LAST=channels_last, EXPAND=expand, TRANSPOSE=transpose, RESIDUAL=residual,
        F64=dst.dtype == torch.float64 or weight.dtype == torch.float64, num_warps=warps,
        **epilogue.flags(), **geo.constexprs())


def _num_partials(x: Tensor, tiles: int, blocks: int) -> int:
    """Programs per block of the weight gradient: enough to fill the device, no more (each
    writes a full partial weight row)."""
    if INTERPRETED:
        return min(tiles, 2)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(tiles, -(-2 * sms // blocks)))


def _stage_groups(geo: Geometry, warps: int) -> List[Tuple[int, int]]:
    """Consecutive stage ranges ``[lo, hi)`` whose weight-gradient accumulators (``NP * K`` per
    stage) fit in ``ACC_PER_THREAD`` registers per thread: one weight-gradient launch each."""
    budget = ACC_PER_THREAD * 32 * warps
    groups, lo, used = [], 0, 0
    for s, k in enumerate(geo.padded_radices):
        cost = geo.padded_size * k
        if s > lo and used + cost > budget:
            groups.append((lo, s))
            lo, used = s, 0
        used += cost
    return groups + [(lo, geo.stages)]


def _device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``x``'s (when tracing, the compiler
    places the kernels itself)."""
    if INTERPRETED and is_fake(x):
        raise RuntimeError(
            "the 'triton' BFT backend under TRITON_INTERPRET=1 runs the kernels eagerly and "
            "cannot be traced (torch.compile, opcheck, make_fx); trace with "
            "use_backend('reference') or on a GPU without TRITON_INTERPRET")
    if x.is_cuda and not is_fake(x):
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _forward(x: Tensor, weight: Tensor, radices: List[int], out_channels: int, residual: bool,
             epilogue: KernelEpilogue) -> Tensor:
    device = _device_of(x)
    plan, geo = BFTPlan.of(x.shape[1], out_channels, radices), Geometry.of(tuple(radices))
    y = torch.empty(x.shape[0], out_channels, x.shape[2], dtype=x.dtype, device=x.device)
    if y.numel():
        with device:
            _launch_bft(x.contiguous(), weight.contiguous(), y, plan, geo, plan.expand, False,
                        residual, epilogue)
    return y


def triton_forward(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
                   residual: bool) -> Tensor:
    return _forward(x, weight, radices, out_channels, residual, NO_EPILOGUE)


def triton_fused(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
                 residual: bool, scale: Optional[Tensor], shift: Optional[Tensor],
                 activation: str, add: Optional[Tensor]) -> Tensor:
    """``butterfly::bft_fused`` in one launch: the forward kernel with its epilogue flags on."""
    check_epilogue(x, out_channels, scale, shift, activation, add)
    for name, t in (("scale", scale), ("shift", shift), ("add", add)):
        if t is not None and t.device != x.device:
            raise ValueError(f"epilogue {name} is on {t.device} but the input is on {x.device}")
    scale, shift, add = (None if t is None else t.contiguous() for t in (scale, shift, add))
    return _forward(x, weight, radices, out_channels, residual,
                    KernelEpilogue(scale, shift, ACT_CODES[activation], add))


def triton_backward(grad: Tensor, x: Tensor, weight: Tensor, radices: List[int],
                    out_channels: int, residual: bool) -> Tuple[Tensor, Tensor]:
    device = _device_of(x)
    plan, geo = BFTPlan.of(x.shape[1], out_channels, radices), Geometry.of(tuple(radices))
    grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()
    f64 = x.dtype == torch.float64 or weight.dtype == torch.float64
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(weight)
    with device:
        partial = _backward_launches(grad, x, weight, grad_x, plan, geo, residual, f64)
    return grad_x, partial.sum(0).to(weight.dtype)


def _backward_launches(grad: Tensor, x: Tensor, weight: Tensor, grad_x: Tensor, plan: BFTPlan,
                       geo: Geometry, residual: bool, f64: bool) -> Tensor:
    """Writes ``grad_x``; returns the per-program partial weight gradients."""
    channels_last, npix, images = _layout(x)
    fuse_dx = plan.num_blocks == 1
    if not fuse_dx:  # the transposed butterfly maps output-grad blocks the other way round
        _launch_bft(grad, weight, grad_x, plan, geo, not plan.expand, True, residual)
    bp, warps = _launch_config(geo, npix, backward=True)
    tiles_per_img = triton.cdiv(npix, bp)
    tiles = tiles_per_img * images
    programs = _num_partials(x, tiles, plan.num_blocks)
    partial = torch.empty(programs, plan.num_blocks, weight.shape[1], device=x.device,
                          dtype=torch.float64 if f64 else torch.float32)
    for lo, hi in _stage_groups(geo, warps):
        wrap_triton(bft_wgrad_kernel)[(programs, plan.num_blocks)](
            x, grad, weight, partial, grad_x, npix, tiles_per_img, tiles, x.shape[1],
            plan.out_channels, plan.block, weight.shape[1], BP=bp, CHANNELS_LAST=channels_last,
            EXPAND=plan.expand, RESIDUAL=residual, LO=lo, HI=hi, FUSE_DX=fuse_dx and lo == 0,
            F64=f64, num_warps=warps, **geo.constexprs())
    return partial


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
