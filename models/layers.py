"""Layers shared by the model zoo: the pointwise-layer factory and the conv-BN-activation unit.

Model code asks :func:`create_pointwise` for every pointwise layer and never looks at what it got,
so a baseline and its BFT variant are the same code with a different ``bft`` flag.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from torch import Tensor, nn

from butterfly.modules import BFT, is_bft

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}


def create_pointwise(in_chs: int, out_chs: int, bft: bool = False, bias: bool = False,
                     **bft_kwargs) -> nn.Module:
    """A pointwise layer ``in_chs -> out_chs``: ``nn.Conv2d(in_chs, out_chs, 1)`` or, with
    ``bft=True``, a :class:`butterfly.BFT` (``bft_kwargs``: ``base``, ``residual``, ``init``).
    Every model in :mod:`butterfly.models` builds its pointwise layers through this function."""
    if bft:
        return BFT(in_chs, out_chs, bias=bias, **bft_kwargs)
    if bft_kwargs:
        raise TypeError(f"BFT options {sorted(bft_kwargs)} given for a conv pointwise layer; "
                        "pass bft=True or drop them")
    return nn.Conv2d(in_chs, out_chs, 1, bias=bias)


def pointwise_factory(bft: bool, bft_kwargs: Optional[dict] = None) -> Callable[..., nn.Module]:
    """``create_pointwise`` with the model-wide choice bound; call it as ``pw(in_chs, out_chs)``."""
    return partial(create_pointwise, bft=bft, **(bft_kwargs or {}))


def act_layer(name: Optional[str]) -> nn.Module:
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name](inplace=True)


class ConvBnAct(nn.Sequential):
    """``conv`` (any module producing ``out_chs`` channels), BatchNorm, activation (or none)."""

    def __init__(self, conv: nn.Module, out_chs: int, act: Optional[str] = "relu"):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer(act)


def conv_bn_act(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1,
                act: Optional[str] = "relu") -> ConvBnAct:
    """A ``kernel x kernel`` conv (``groups=in_chs`` for depthwise), BN, activation."""
    conv = nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False)
    return ConvBnAct(conv, out_chs, act)


def init_weights(module: nn.Module) -> None:
    """The one initialisation of every model: He-normal convs, unit BN, small-normal classifier.
    BFT layers keep the initialisation they were built with (see :mod:`butterfly.init`)."""
    if is_bft(module):
        return
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)


class ZooModel(nn.Module):
    """Base of every zoo model: timm's classifier interface around the subclass's
    ``forward_features`` and ``pool`` (features -> ``(N, num_features)``): dropout, then a linear
    classifier (none for ``num_classes=0``). Subclasses call ``init_classifier`` last."""

    def init_classifier(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.classifier = self._classifier(num_classes)
        self.apply(init_weights)

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.classifier = self._classifier(num_classes)
        self.classifier.apply(init_weights)

    def pool(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        if pre_logits:
            return x
        return self.classifier(nn.functional.dropout(x, self.drop_rate, self.training))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def check_global_pool(global_pool: str) -> None:
    if global_pool != "avg":
        raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
