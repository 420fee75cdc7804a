"""Module surgery: put BFTs where a network has pointwise layers, and optimizer groups for them."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .modules import BFT, BFTLinear, is_bft


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 ``nn.Conv2d`` that a BFT replaces exactly: stride 1, no padding, no groups/dilation."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1) and module.groups == 1
            and tuple(module.dilation) == (1, 1)
            and (module.padding in ("valid", (0, 0)) or tuple(module.padding) == (0, 0)))


def replace_pointwise(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                      linear: bool = False, **bft_kwargs) -> Tuple[nn.Module, List[str]]:
    """Swap every pointwise ``nn.Conv2d`` (and, with ``linear=True``, every ``nn.Linear``) for a BFT
    with the same channels, bias, device and dtype. ``filter_fn(name, module)`` may veto a layer.

    Returns ``(model, names)``: the model, changed in place, and the names of the replaced layers."""
    replaced = []
    for name, module in list(model.named_modules()):
        if is_bft(module) or (filter_fn is not None and not filter_fn(name, module)):
            continue
        if is_pointwise_conv(module):
            new = BFT(module.in_channels, module.out_channels, bias=module.bias is not None,
                      device=module.weight.device, dtype=module.weight.dtype, **bft_kwargs)
        elif linear and isinstance(module, nn.Linear):
            new = BFTLinear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype, **bft_kwargs)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    return model, replaced


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two optimizer groups: BFT weights, norms and biases without weight decay (the paper found
    decay hurts BFT), every other parameter with ``weight_decay``."""
    no_decay_ids = {id(m.weight) for m in model.modules() if is_bft(m)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
