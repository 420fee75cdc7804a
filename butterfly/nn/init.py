"""Initialisations of BFT weights, selected by name with ``BFT(..., init=NAME)``.

* ``"paper"``: eq. 8-9 of the paper. With the Xavier bound ``x = sqrt(6 / (in + out))`` and ``L``
  stages, every weight is drawn from ``U(-y, y)``, ``y = x**(1/L) * 2**((L-1)/L)``, so that each entry
  of the product has ``E|B_uv| = x / 2``, like a Xavier-initialised dense layer.
* ``"identity"``: the layer starts as the identity map (for ``in != out``: every block is the
  identity, so the input is repeated or its chunks summed). With ``residual=True`` the last stage
  is zero (``B = 0``, so ``Bx + x = x``) and the others are the identity, which keeps the first
  gradient step non-zero; without the residual every stage is the identity.
* ``"ortho"``: every ``k x k`` block is a random orthogonal matrix, so the butterfly ``B`` of each
  square block is orthogonal (it preserves norms before the residual is added).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..plan import BFTPlan
from ..ops.reference import stage_weights

INITS = ("paper", "identity", "ortho")


@torch.no_grad()
def init_bft_(weight: Tensor, plan: BFTPlan, init: str, residual: bool) -> Tensor:
    """Fill a ``(T, W)`` view of a BFT weight in place."""
    if init not in INITS:
        raise ValueError(f"unknown BFT init {init!r}; choose one of {INITS}")
    stages = stage_weights(weight, plan)
    L = len(stages)
    if init == "paper":
        xavier = math.sqrt(6.0 / (plan.in_channels + plan.out_channels))
        bound = xavier ** (1.0 / max(L, 1)) * 2.0 ** ((L - 1) / max(L, 1))
        for w in stages:
            w.uniform_(-bound, bound)
    elif init == "identity":
        for s, w in enumerate(stages):
            w.copy_(torch.eye(w.shape[-1], dtype=w.dtype, device=w.device).expand_as(w))
        if residual and stages:
            stages[-1].zero_()
    else:
        for w in stages:
            gauss = torch.randn(w.shape, dtype=torch.float64, device=w.device)
            q, r = torch.linalg.qr(gauss)
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            w.copy_(q)
    return weight
