"""``MobileNet``: the network behind MobileNetV1, V2 and V3, described by a list of blocks.

Every block is depthwise ``k x k`` conv -> optional squeeze-excite -> pointwise projection, with a
pointwise expansion in front when the expansion width differs from the input width. V1 activates
the projection and has no skip; V2/V3 keep it linear and add the skip (``linear_bottleneck``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from timm.layers import make_divisible
from torch import Tensor, nn

from .layers import (ConvBnAct, ZooModel, act_layer, check_global_pool, conv_bn_act,
                     feature_taps, pointwise_factory)


class Block(NamedTuple):
    """One block: depthwise ``kernel`` on ``expand`` x the input channels (rounded to a multiple of
    8; 1 means no expansion layer), ``out`` channels out."""

    kernel: int
    expand: float
    out: int
    stride: int
    se: bool = False
    act: str = "relu"


def scale_blocks(blocks: Sequence[Block], width: float) -> list[Block]:
    """Multiply every block's output channels by ``width``, rounded to a multiple of 8 (at least
    8); expansions stay ratios of the (scaled) input, as in the reference implementations."""
    return [b._replace(out=make_divisible(b.out * width)) for b in blocks]


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excite: pool, reduce + ReLU, expand, hard-sigmoid gate. Its two
    pointwise layers (with bias) come from the model's factory like every other one."""

    def __init__(self, chs: int, reduced: int, pw):
        super().__init__()
        self.reduce = pw(chs, reduced, bias=True)
        self.expand = pw(reduced, chs, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.expand(s))


class MobileBlock(nn.Module):
    def __init__(self, in_chs: int, b: Block, pw, linear_bottleneck: bool):
        super().__init__()
        exp = in_chs if b.expand == 1 else make_divisible(in_chs * b.expand)
        self.expand = ConvBnAct(pw(in_chs, exp), exp, b.act) if exp != in_chs else nn.Identity()
        self.dw = conv_bn_act(exp, exp, b.kernel, b.stride, groups=exp, act=b.act)
        self.se = SqueezeExcite(exp, make_divisible(exp / 4), pw) if b.se else nn.Identity()
        self.project = ConvBnAct(pw(exp, b.out), b.out, None if linear_bottleneck else b.act)
        self.skip = linear_bottleneck and b.stride == 1 and in_chs == b.out

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.skip else y


class MobileNet(ZooModel):
    """Stem conv, ``blocks``, an optional pointwise conv before pooling (``pre_pool_chs``, V2/V3),
    global average pooling, an optional pointwise layer + activation after pooling
    (``head_chs``, V3), dropout, linear classifier.

    ``bft=True`` makes every pointwise layer a BFT (``bft_kwargs`` go to it); ``small_input=True``
    gives the stem stride 1 (total stride 16 instead of 32) for 28x28 and 32x32 images.

    Feature maps (``feature_info``): the stem or last block at every output stride, as in timm's
    MobileNets. With a post-pooling head (V3) the pre-pool conv ends the features, as in timm's
    MobileNetV3 (where it is the last stage); without one (V2) it is the head conv, as timm's
    EfficientNet ``conv_head``, and the last block ends them."""

    def __init__(self, blocks: Sequence[Block], stem_chs: int, pre_pool_chs: int = 0,
                 head_chs: int = 0, act: str = "relu", linear_bottleneck: bool = True,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 small_input: bool = False, bft: bool = False, bft_kwargs: Optional[dict] = None,
                 global_pool: str = "avg"):
        super().__init__()
        check_global_pool(global_pool)
        pw = pointwise_factory(bft, bft_kwargs)
        stem_stride = 1 if small_input else 2
        self.stem = conv_bn_act(in_chans, stem_chs, 3, stem_stride, act=act)
        layers, chs, taps = [], stem_chs, [("stem", stem_chs, stem_stride)]
        for i, b in enumerate(blocks):
            layers.append(MobileBlock(chs, b, pw, linear_bottleneck))
            chs = b.out
            taps.append((f"blocks.{i}", chs, b.stride))
        self.blocks = nn.Sequential(*layers)
        if pre_pool_chs:
            self.pre_pool, chs = ConvBnAct(pw(chs, pre_pool_chs), pre_pool_chs, act), pre_pool_chs
            if head_chs:
                taps.append(("pre_pool", chs, 1))
        else:
            self.pre_pool = nn.Identity()
        self.feature_info = feature_taps(taps)
        if head_chs:
            self.head, chs = nn.Sequential(pw(chs, head_chs, bias=True), act_layer(act)), head_chs
        else:
            self.head = nn.Identity()
        self.init_classifier(chs, num_classes, drop_rate)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pre_pool(self.blocks(self.stem(x)))

    def stage_names(self) -> list[str]:
        return ["stem", *(f"blocks.{i}" for i in range(len(self.blocks))), "pre_pool"]

    def _prune_head(self) -> None:
        self.head = nn.Identity()

    def pool(self, x: Tensor) -> Tensor:
        return self.head(x.mean((2, 3), keepdim=True)).flatten(1)
