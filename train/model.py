"""Building a timm model for a dataset, and its cost (multiply-adds, parameters)."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import timm
from torch import nn

import butterfly  # noqa: F401  (registers the project's models with timm)

_log = logging.getLogger(__name__)


def create_model(name: str, num_classes: int, in_chans: int, small_input: bool = False,
                 drop_rate: Optional[float] = None) -> nn.Module:
    """``timm.create_model`` with the dataset's classes and channels. ``small_input=True`` asks for
    the small-input stem (the zoo's ``small_input`` option); a model that has no such option is
    built without it (its constructor rejects the keyword) and a log line says so."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if small_input:
        try:
            return timm.create_model(name, pretrained=False, small_input=True, **kwargs)
        except TypeError as err:
            if "small_input" not in str(err):
                raise
            _log.info("%s has no small-input stem; building it with its usual stem", name)
    return timm.create_model(name, pretrained=False, **kwargs)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one image (``input_size`` = (C, H, W)), counted as the papers count them."""
    from butterfly.flops import count_macs as _count
    return _count(model, input_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
