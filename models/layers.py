"""Layers shared by the model zoo: the pointwise-layer factory and the conv-BN-activation unit.

Model code asks :func:`create_pointwise` for every pointwise layer and never looks at what it got,
so a baseline and its BFT variant are the same code with a different ``bft`` flag.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from timm.models._features import feature_take_indices
from torch import Tensor, fx, nn

from butterfly.ops.batch_norm_act import batch_norm_act
from butterfly.nn.depthwise import DepthwiseConv2d
from butterfly.ops.bft_fused import activation_of
from butterfly.nn.bft import BFT, is_bft

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


class ConvBnAct(nn.Module):
    """``conv`` (any module producing ``out_chs`` channels), BatchNorm, activation (or none).
    In training mode the BatchNorm and the activation run as one fused operator
    (:func:`butterfly.ops.batch_norm_act.batch_norm_act`; ``use_backend("reference")``: PyTorch's).

    A plain module, not an ``nn.Sequential``, so that timm's feature extractors, which flatten the
    model's top-level ``nn.Sequential`` containers, keep it whole (``stem``, ``conv5``)."""

    def __init__(self, conv: nn.Module, out_chs: int, act: Optional[str] = "relu"):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.training and type(self.bn) is nn.BatchNorm2d and not isinstance(x, fx.Proxy) \
                and not torch.jit.is_tracing():
            # training: BatchNorm and activation in one fused kernel on CPU (PyTorch elsewhere)
            activation = "none" if isinstance(self.act, nn.Identity) else activation_of(self.act)
            if activation is not None:
                return batch_norm_act(x, self.bn, activation)
        return self.act(self.bn(x))


def conv_bn_act(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1,
                act: Optional[str] = "relu") -> ConvBnAct:
    """A ``kernel x kernel`` conv (``groups=in_chs`` for depthwise), BN, activation. A depthwise
    conv is a :class:`butterfly.nn.DepthwiseConv2d`: an ``nn.Conv2d`` with the same
    parameters and state_dict that runs the library's depthwise kernel (forward and backward)."""
    depthwise = groups > 1 and groups == in_chs == out_chs
    conv_cls = DepthwiseConv2d if depthwise else nn.Conv2d
    conv = conv_cls(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False)
    return ConvBnAct(conv, out_chs, act)


def init_weights(module: nn.Module) -> None:
    """The one initialisation of every model: He-normal convs, unit BN, small-normal classifier.
    BFT layers keep the initialisation they were built with (see :mod:`butterfly.nn.init`)."""
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
    classifier (none for ``num_classes=0``). Subclasses call ``init_classifier`` last.

    Feature maps, as timm's MobileNet family has them: ``feature_info`` lists one tap per output
    stride (dicts with ``num_chs``, ``reduction``, ``module``), each tap the output of one of the
    modules that ``forward_features`` applies in turn (``stage_names()``, the subclass's).
    ``timm.create_model(..., features_only=True)`` wraps the model in timm's ``FeatureListNet``
    (see ``builder.build``); ``forward_intermediates`` and ``prune_intermediate_layers`` serve
    timm's ``feature_cls="getter"``."""

    feature_info: List[dict]

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

    def stage_names(self) -> List[str]:
        """Names of the modules ``forward_features`` applies, in order (one input, one output
        each); every ``feature_info`` module is one of them."""
        raise NotImplementedError

    def _prune_head(self) -> None:
        """Drop what sits between the features and the classifier (the subclass's, if any)."""

    def forward_intermediates(
            self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's ``forward_intermediates``: the ``feature_info`` maps selected by ``indices``
        (None: all, int: the last n, sequence: those) in order of depth, and, unless
        ``intermediates_only``, the ``forward_features`` output. ``norm`` has nothing to act on
        (no final norm layer); ``stop_early`` stops after the last selected map."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if stop_early and not intermediates_only:
            raise ValueError("stop_early needs intermediates_only=True")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        names = self.stage_names()
        taps = {names.index(self.feature_info[i]["module"]) for i in take_indices}
        if stop_early:
            names = names[:names.index(self.feature_info[max_index]["module"]) + 1]
        intermediates = []
        for i, name in enumerate(names):
            x = self.get_submodule(name)(x)
            if i in taps:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """timm's ``prune_intermediate_layers``: replace the modules after the last map that
        ``indices`` selects with ``nn.Identity`` (the kept ones keep their names, so a
        classification ``state_dict`` loads with ``strict=False``); drop the head and classifier
        when anything was cut or ``prune_head``. Returns the selected indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        names = self.stage_names()
        last = names.index(self.feature_info[max_index]["module"])
        prune_end = last < len(names) - 1
        for name in names[last + 1:]:
            self.set_submodule(name, nn.Identity())
        if prune_end or prune_head:
            self._prune_head()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0)
        return take_indices


def feature_taps(stages: Sequence[Tuple[str, int, int]]) -> List[dict]:
    """timm ``feature_info`` from ``(module name, out channels, stride)`` of the modules that
    ``forward_features`` applies, in order: at every output stride, the last module producing it
    (as timm's MobileNet family taps the end of every stage)."""
    info, reduction = [], 1
    for name, chs, stride in stages:
        reduction *= stride
        tap = dict(num_chs=chs, reduction=reduction, module=name)
        if info and info[-1]["reduction"] == reduction:
            info[-1] = tap
        else:
            info.append(tap)
    return info


def check_global_pool(global_pool: str) -> None:
    if global_pool != "avg":
        raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
