"""Optimizer parameter groups for networks with BFT layers."""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from .nn.bft import is_bft


def param_groups(model: nn.Module, weight_decay: float, bft_weight_decay: float = 0.0,
                 bft_lr_scale: float = 1.0) -> List[Dict]:
    """Optimizer groups: every conv/linear weight with ``weight_decay``; norms and biases without;
    BFT weights without by default (the paper, section 3.3, found that decay hurts BFT).

    ``bft_weight_decay`` and ``bft_lr_scale`` give the BFT weights their own group (decay, and a
    learning-rate multiplier as ``lr_scale``, which timm's schedulers apply at every update):
    a BFT is a product of log n factors, so its effective step differs from a dense layer's.
    With the defaults there are two groups (``[decay, no_decay]``, BFT weights in the second);
    otherwise three (``[decay, no_decay, bft]``)."""
    bft_ids = {id(m.weight) for m in model.modules() if is_bft(m)}
    own_group = bft_weight_decay != 0.0 or bft_lr_scale != 1.0
    decay, no_decay, bft = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in bft_ids:
            (bft if own_group else no_decay).append(p)
        else:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if own_group:
        groups.append({"params": bft, "weight_decay": bft_weight_decay, "lr_scale": bft_lr_scale})
    return groups
