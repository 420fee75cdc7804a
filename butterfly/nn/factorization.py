"""Fitting butterfly weights to a dense matrix: the maths behind ``BFT.from_dense`` and
:func:`butterfly.convert`.

The fit has two steps, both in float64:

1. **Hierarchical factorisation** (closed form). Write a channel index in the mixed radix of the
   butterfly, split its digits into an upper part ``u`` (the digits stages ``0..h-1`` mix) and a lower
   part ``l``. Then ``B = Left @ Right`` with ``B[(u_o, l_o), (u_i, l_i)] = Left[u_o][l_o, l_i] *
   Right[l_i][u_o, u_i]``: for each pair ``(u_o, l_i)`` the ``(l_o, u_i)`` sub-matrix is rank one, and
   the pairs use disjoint weights. The best rank-one approximation of each (an SVD) is therefore the
   best two-factor fit; ``Left[u]`` and ``Right[l]`` are smaller butterflies, fitted the same way,
   recursively. A matrix that is a butterfly is recovered exactly. (This is the hierarchical
   algorithm of Zheng, Riccietti and Gribonval, "Efficient identification of butterfly sparse
   matrix factorizations", 2023, written here for this project's mixed-radix layout.)
2. **Refinement** (L-BFGS) of the whole layer (every block, residual, padding and tiling as the
   layer computes them) on the squared error of the matrix, or, with calibration activations ``X``,
   of the layer's outputs: ``||(B - W) X||^2`` (least squares on the outputs).

Residual: a BFT with ``residual=True`` computes ``B + I`` per block, so its butterflies are fitted to
``W - I``; with ``residual=False`` to ``W``. A trained ``W`` is rarely close to the identity, and on
the pointwise convs of a small CNN trained on Fashion-MNIST ``residual=False`` fitted with about
0.1 less relative error; the default ``"auto"`` fits both and keeps the better one per layer (it also
recovers a BFT of either kind exactly).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..plan import BFTPlan
from ..ops.reference import apply_stage, bft_reference, stage_weights


def _split_point(radices: Tuple[int, ...]) -> int:
    """Index ``h`` that splits the stages into two parts of the most similar sizes."""
    best, up = None, 1
    for h in range(1, len(radices)):
        up *= radices[h - 1]
        score = abs(math.log(up) - math.log(math.prod(radices) / up))
        if best is None or score < best[0]:
            best = (score, h)
    return best[1]


def factor_butterfly(matrices: Tensor, radices: Tuple[int, ...]) -> List[Tensor]:
    """Hierarchical butterfly fit of ``matrices`` ``(*batch, n, n)``: the stage weights
    ``(*batch, n / k_s, k_s, k_s)`` (binding layout) whose product approximates each matrix."""
    *batch, n, _ = matrices.shape
    if len(radices) == 1:
        return [matrices.reshape(*batch, 1, n, n)]
    h = _split_point(radices)
    n_up = math.prod(radices[:h])
    n_low = n // n_up
    # (..., u_o, l_o, u_i, l_i) -> one (l_o, u_i) sub-matrix per (u_o, l_i)
    sub = matrices.reshape(*batch, n_up, n_low, n_up, n_low).movedim(-1, -3)
    U, S, Vh = torch.linalg.svd(sub, full_matrices=False)
    scale = S[..., :1].sqrt()
    left = (U[..., :, 0] * scale).transpose(-1, -2)       # (..., u_o, l_o, l_i)
    right = (Vh[..., 0, :] * scale).movedim(-2, -3)       # (..., l_i, u_o, u_i)
    d = len(batch)
    stages = []
    for w in factor_butterfly(right, radices[:h]):        # group g = g_up * n_low + l_i
        stages.append(w.movedim(d, d + 1).reshape(*batch, n // w.shape[-1], w.shape[-1], w.shape[-1]))
    for w in factor_butterfly(left, radices[h:]):         # group g = u_o * (n_low / k) + g_low
        stages.append(w.reshape(*batch, n // w.shape[-1], w.shape[-1], w.shape[-1]))
    return stages


def butterfly_matrices(weight: Tensor, plan: BFTPlan) -> Tensor:
    """The ``(T, n, n)`` matrix of every square block of a ``(T, W)`` weight (no residual)."""
    T, n = weight.shape[0], plan.size
    square = BFTPlan(n, n, plan.radices)
    z = torch.eye(n, dtype=weight.dtype, device=weight.device).view(n, 1, n, 1).expand(n, T, n, 1)
    for s, w in enumerate(stage_weights(weight, plan)):
        z = apply_stage(z, w, square, s)
    return z.squeeze(-1).permute(1, 2, 0)


def block_targets(weight: Tensor, plan: BFTPlan, residual: bool) -> Tuple[Tensor, Tensor]:
    """What each square block must equal for the layer to compute ``weight`` ``(out, in)``:
    ``(targets, known)``, both ``(T, n, n)``; entries outside ``known`` (padding, truncated rows,
    columns of absent channels) do not reach the output. With the residual, blocks target ``W - I``."""
    m, n, T = plan.block, plan.size, plan.num_blocks
    targets = weight.new_zeros(T, n, n)
    known = torch.zeros(T, n, n, dtype=torch.bool, device=weight.device)
    eye = torch.eye(n, dtype=weight.dtype, device=weight.device)
    for t in range(T):
        part = weight[t * m:(t + 1) * m] if plan.expand else weight[:, t * m:(t + 1) * m]
        rows, cols = part.shape
        targets[t, :rows, :cols] = part - (eye[:rows, :cols] if residual else 0)
        known[t, :rows, :cols] = True
    return targets, known


def _dense(flat: Tensor, plan: BFTPlan, residual: bool) -> Tensor:
    """The ``(out, in)`` matrix of the layer with weights ``flat`` (differentiable)."""
    eye = torch.eye(plan.in_channels, dtype=flat.dtype, device=flat.device).unsqueeze(-1)
    return bft_reference(eye, flat, plan.radices, plan.out_channels, residual).squeeze(-1).t()


def output_metric(cov: Optional[Tensor]) -> Optional[Tensor]:
    """``R`` with ``R @ R.T == cov`` (numerically null directions dropped), or None."""
    if cov is None:
        return None
    vals, vecs = torch.linalg.eigh(cov)
    keep = vals > vals.max().clamp_min(0) * 1e-12
    return vecs[:, keep] * vals[keep].sqrt()


def _sq_error(flat: Tensor, weight: Tensor, plan: BFTPlan, residual: bool,
              metric: Optional[Tensor]) -> Tensor:
    err = _dense(flat, plan, residual) - weight
    return (err if metric is None else err @ metric).pow(2).sum()


def fit_weights(weight: Tensor, plan: BFTPlan, residual: bool = True, cov: Optional[Tensor] = None,
                steps: int = 100, impute_rounds: int = 3) -> Tuple[Tensor, float]:
    """Fit the ``(T, W)`` weights of a BFT of ``plan`` to a dense ``(out, in)`` matrix.

    ``cov``: ``(in, in)`` second moment ``X^T X`` of calibration inputs; the fit then minimises the
    output error ``||(B - W) X||`` instead of ``||B - W||``. ``steps``: L-BFGS iterations after the
    hierarchical fit (0 to skip). ``impute_rounds``: hierarchical refits in which entries that do not
    reach the output take the previous fit's values (only for padded or truncated blocks).
    Returns ``(weights in float64, relative error)`` (see :func:`relative_error`)."""
    weight = weight.detach().to(torch.float64)
    expected = (plan.out_channels, plan.in_channels)
    if tuple(weight.shape) != expected:
        raise ValueError(f"expected a dense weight of shape {expected} for {plan}, "
                         f"got {tuple(weight.shape)}")
    targets, known = block_targets(weight, plan, residual)

    def hierarchical(matrices: Tensor) -> Tensor:
        return torch.cat([w.reshape(plan.num_blocks, -1) for w in
                          factor_butterfly(matrices, plan.radices)], dim=1)

    if not plan.radices:  # one channel per block: the layer has no weights
        flat = weight.new_zeros(plan.num_blocks, 0)
    else:
        flat = hierarchical(targets)
    if plan.radices and not known.all():
        for _ in range(impute_rounds):
            flat = hierarchical(torch.where(known, targets, butterfly_matrices(flat, plan)))
    metric = output_metric(None if cov is None else cov.detach().to(torch.float64))
    norm = (weight if metric is None else weight @ metric).pow(2).sum().clamp_min(1e-300)
    with torch.no_grad():
        error = math.sqrt(_sq_error(flat, weight, plan, residual, metric) / norm)
    if steps > 0 and plan.radices and error > 1e-7:  # below that: exact up to float32 rounding
        flat = _refine(flat, weight, plan, residual, metric, norm, steps)
        with torch.no_grad():
            error = min(error, math.sqrt(_sq_error(flat, weight, plan, residual, metric) / norm))
    return flat, error


def _refine(flat: Tensor, weight: Tensor, plan: BFTPlan, residual: bool, metric: Optional[Tensor],
            norm: Tensor, steps: int) -> Tensor:
    """``steps`` L-BFGS iterations on the normalised squared error; never returns worse weights."""
    start, flat = flat, flat.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([flat], lr=1, max_iter=steps, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _sq_error(flat, weight, plan, residual, metric) / norm
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    flat = flat.detach()
    with torch.no_grad():
        worse = _sq_error(flat, weight, plan, residual, metric) > _sq_error(start, weight, plan,
                                                                            residual, metric)
    return start if worse else flat


def input_covariance(x: Tensor, linear: bool) -> Tensor:
    """``X^T X`` in float64 of a layer's inputs: ``(N, C, H, W)`` for a conv, ``(..., C)`` for a
    linear layer."""
    if linear:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    else:
        if x.dim() != 4:
            raise ValueError(f"conv calibration inputs must be (N, C, H, W), "
                             f"got shape {tuple(x.shape)}")
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).t().to(torch.float64)
    return flat.t() @ flat


