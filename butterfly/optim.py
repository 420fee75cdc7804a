"""Optimizer parameter groups for networks with BFT layers."""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from .modules import is_bft


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two optimizer groups: BFT weights, norms and biases without weight decay (the paper, section
    3.3, found that decay hurts BFT), every other parameter with ``weight_decay``."""
    no_decay_ids = {id(m.weight) for m in model.modules() if is_bft(m)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
