"""Pure-PyTorch reference of the BFT operator: stage by stage, never the dense matrix.

This is the oracle every fast kernel is tested against. ``bft_reference`` is differentiated by
autograd; ``bft_reference_backward`` is the same backward written out by hand (the transposed
stages in reverse order), which is what the operator's "reference" backend runs.

Tensors follow the operator's layout: ``x`` is ``(B, C, P)`` with the channels on dim 1 (``P`` is the
number of pixels for NCHW input and 1 for channels-last and linear input), and ``weight`` is
``(T, W)``: one flat row of stage weights per square block (see :mod:`butterfly.plan`).
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import BFTPlan


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def stage_weights(weight: Tensor, plan: BFTPlan) -> List[Tensor]:
    """Views ``(T, n / k_s, k_s, k_s)`` of each stage's weights in a ``(T, W)`` weight (a layer's
    flat ``(W,)`` weight, or any shape with ``T * W`` elements, is read as ``(T, W)``)."""
    if weight.numel() != plan.num_blocks * plan.weights_per_block:
        raise ValueError(f"a weight for {plan} has {plan.num_blocks} x {plan.weights_per_block} "
                         f"elements, got shape {tuple(weight.shape)}")
    weight = weight.reshape(plan.num_blocks, plan.weights_per_block)
    n, views = plan.size, []
    for offset, k in zip(plan.stage_offsets(), plan.radices):
        views.append(weight[:, offset:offset + n * k].reshape(weight.shape[0], n // k, k, k))
    return views


def stage_shape(plan: BFTPlan, s: int) -> Tuple[int, int, int]:
    """(segments a, radix k, stride t) of stage ``s``: channel = (seg * k + j) * t + r."""
    a = 1
    for k in plan.radices[:s]:
        a *= k
    k = plan.radices[s]
    return a, k, plan.size // (a * k)


def split_blocks(x: Tensor, channels: int, plan: BFTPlan, broadcast: bool) -> Tensor:
    """``(B, channels, P) -> (B, T, n, P)``: the zero-padded input of every square block.

    ``broadcast``: every block reads the same ``m`` channels; otherwise block ``t`` reads channels
    ``t*m .. t*m + m`` (zero beyond ``channels``)."""
    B, _, P = x.shape
    m, T, n = plan.block, plan.num_blocks, plan.size
    if broadcast:
        u = F.pad(x, (0, 0, 0, n - m)).unsqueeze(1).expand(B, T, n, P)
    else:
        u = F.pad(x, (0, 0, 0, T * m - channels)).reshape(B, T, m, P)
        u = F.pad(u, (0, 0, 0, n - m))
    return u


def merge_blocks(z: Tensor, channels: int, plan: BFTPlan, reduce: bool) -> Tensor:
    """``(B, T, n, P) -> (B, channels, P)``, the adjoint of :func:`split_blocks`: keep the first
    ``m`` rows of each block, then sum the blocks (``reduce``) or concatenate and truncate."""
    B, T, _, P = z.shape
    z = z[:, :, :plan.block]
    if reduce:
        return z.sum(1)
    return z.reshape(B, T * plan.block, P)[:, :channels]


def apply_stage(u: Tensor, w: Tensor, plan: BFTPlan, s: int) -> Tensor:
    """One stage on ``u`` of shape ``(B, T, n, P)``: ``out[c_i] = sum_j w[g, i, j] * u[c_j]``."""
    B, T, n, P = u.shape
    a, k, t = stage_shape(plan, s)
    out = torch.einsum("garij,bgajrp->bgairp", w.reshape(T, a, t, k, k), u.reshape(B, T, a, k, t, P))
    return out.reshape(B, T, n, P)


def matmul_stage(u: Tensor, w: Tensor, plan: BFTPlan, s: int) -> Tensor:
    """:func:`apply_stage` as one batched MatMul (``(T, a, t)`` batches of ``k x k`` blocks times
    ``k x (B * P)`` inputs): the form ONNX exports, since every ONNX runtime has MatMul and runs it
    faster than Einsum."""
    B, T, n, P = u.shape
    a, k, t = stage_shape(plan, s)
    u = u.reshape(B, T, a, k, t, P).permute(1, 2, 4, 3, 0, 5).reshape(T, a, t, k, B * P)
    out = torch.matmul(w.reshape(T, a, t, k, k), u)
    return out.reshape(T, a, t, k, B, P).permute(4, 0, 1, 3, 2, 5).reshape(B, T, n, P)


def apply_stage_transposed(g: Tensor, w: Tensor, plan: BFTPlan, s: int) -> Tensor:
    B, T, n, P = g.shape
    a, k, t = stage_shape(plan, s)
    out = torch.einsum("garij,bgairp->bgajrp", w.reshape(T, a, t, k, k), g.reshape(B, T, a, k, t, P))
    return out.reshape(B, T, n, P)


def stage_weight_grad(g: Tensor, u: Tensor, plan: BFTPlan, s: int) -> Tensor:
    """Gradient of stage ``s``'s weights, ``(T, n/k, k, k)``, from its output grad and input."""
    B, T, n, P = g.shape
    a, k, t = stage_shape(plan, s)
    gw = torch.einsum("bgairp,bgajrp->garij", g.reshape(B, T, a, k, t, P), u.reshape(B, T, a, k, t, P))
    return gw.reshape(T, n // k, k, k)


def bft_reference(x: Tensor, weight: Tensor, radices: Sequence[int], out_channels: int,
                  residual: bool, stage: Callable = apply_stage) -> Tensor:
    """``(B, C_in, P) -> (B, C_out, P)``; differentiable by autograd. ``stage`` computes one stage
    (the ONNX export passes one written with ops that export well)."""
    plan = BFTPlan.of(x.shape[1], out_channels, radices)
    dtype = compute_dtype(x, weight)
    w = weight.to(dtype)
    u = split_blocks(x.to(dtype), plan.in_channels, plan, broadcast=plan.expand)
    z = u
    for s, ws in enumerate(stage_weights(w, plan)):
        z = stage(z, ws, plan, s)
    if residual:
        z = z + u
    return merge_blocks(z, out_channels, plan, reduce=not plan.expand).to(x.dtype).contiguous()


def bft_matmul(x: Tensor, weight: Tensor, radices: Sequence[int], out_channels: int,
               residual: bool) -> Tensor:
    """:func:`bft_reference` with :func:`matmul_stage`: what ``torch.onnx.export`` traces, so a
    structured ONNX graph has standard ops and keeps the O(n log n) cost."""
    return bft_reference(x, weight, radices, out_channels, residual, stage=matmul_stage)


def bft_reference_backward(grad: Tensor, x: Tensor, weight: Tensor, radices: Sequence[int],
                           out_channels: int, residual: bool) -> Tuple[Tensor, Tensor]:
    """Hand-written backward of :func:`bft_reference`: ``(grad_x, grad_weight)``."""
    plan = BFTPlan.of(x.shape[1], out_channels, radices)
    dtype = compute_dtype(x, weight)
    w = weight.to(dtype)
    stages = stage_weights(w, plan)
    acts = [split_blocks(x.to(dtype), plan.in_channels, plan, broadcast=plan.expand)]
    for s, ws in enumerate(stages[:-1]):
        acts.append(apply_stage(acts[-1], ws, plan, s))
    g = split_blocks(grad.to(dtype), out_channels, plan, broadcast=not plan.expand)
    g_u = g if residual else None
    grad_stages = [None] * len(stages)
    for s in reversed(range(len(stages))):
        grad_stages[s] = stage_weight_grad(g, acts[s], plan, s)
        g = apply_stage_transposed(g, stages[s], plan, s)
    g_u = g if g_u is None else g_u + g
    grad_x = merge_blocks(g_u, plan.in_channels, plan, reduce=plan.expand)
    grad_w = torch.cat([gs.reshape(gs.shape[0], -1) for gs in grad_stages], dim=1) if stages \
        else torch.zeros_like(w)
    return grad_x.to(x.dtype).contiguous(), grad_w.to(weight.dtype).contiguous()
