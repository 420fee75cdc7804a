"""ShuffleNetV2 (Ma et al. 2018): baselines at widths 0.5/1.0/1.5/2.0 and the BFT paper's "1.25".

In ``shufflenetv2_bft_125`` every pointwise conv is a BFT, conv5 included, except those reading
the 24-channel stem (BFT paper section 4.3). Its stage widths 160/320/640 with a 1024-channel
conv5 meet the paper's 41/21/14 MFLOPs at 224/160/128 (see benchmarks/results/flops.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from .builder import build, register, untrained_cfg
from .layers import (ConvBnAct, ZooModel, check_global_pool, conv_bn_act, feature_taps,
                     pointwise_factory)

STEM_CHS = 24
REPEATS = (4, 8, 4)


class ShuffleBlock(nn.Module):
    """Stride 1: split the channels, transform one half, concatenate, shuffle.
    Stride 2: both branches see the whole input and halve the resolution.
    ``first_pw`` builds the pointwise layers that read the block's input (default: ``pw``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, pw, first_pw=None):
        super().__init__()
        mid, first_pw = out_chs // 2, first_pw or pw
        if stride == 2:
            self.branch1 = nn.Sequential(conv_bn_act(in_chs, in_chs, 3, 2, groups=in_chs, act=None),
                                         ConvBnAct(first_pw(in_chs, mid), mid))
        else:
            self.branch1 = None
            in_chs = mid
        self.branch2 = nn.Sequential(ConvBnAct(first_pw(in_chs, mid), mid),
                                     conv_bn_act(mid, mid, 3, stride, groups=mid, act=None),
                                     ConvBnAct(pw(mid, mid), mid))

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            keep, x = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(x)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        n, c, h, w = out.shape  # shuffle: interleave the two halves (exports to ONNX as reshapes)
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetV2(ZooModel):
    """Stem (3x3 conv, max-pool), three stages of ``REPEATS`` blocks with ``widths`` channels,
    pointwise conv5 to ``num_features``, global average pooling, dropout, linear classifier.

    ``bft=True`` makes every pointwise conv a BFT except those reading the stem (``bft_kwargs`` go
    to them); ``small_input=True`` gives the stem conv stride 1 (total stride 16 instead of 32).

    Feature maps (``feature_info``): the stem conv, the max-pool, the first two stages and conv5
    (which ends the last stage's resolution, as the pre-pool conv ends timm's MobileNetV3)."""

    def __init__(self, widths: Sequence[int], num_features: int = 1024, num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.0, small_input: bool = False,
                 bft: bool = False, bft_kwargs: Optional[dict] = None, global_pool: str = "avg"):
        super().__init__()
        check_global_pool(global_pool)
        if any(w % 2 for w in widths):
            raise ValueError(f"ShuffleNetV2 stage widths must be even (two branches), got {widths}")
        pw, dense = pointwise_factory(bft, bft_kwargs), pointwise_factory(False)
        stem_stride = 1 if small_input else 2
        self.stem = nn.Sequential(conv_bn_act(in_chans, STEM_CHS, 3, stem_stride),
                                  nn.MaxPool2d(3, 2, 1))
        stages, chs = [], STEM_CHS
        taps = [("stem.0", STEM_CHS, stem_stride), ("stem.1", STEM_CHS, 2)]
        for i, (width, repeats) in enumerate(zip(widths, REPEATS)):
            blocks = [ShuffleBlock(chs, width, 2, pw, first_pw=dense if i == 0 else None)]
            blocks += [ShuffleBlock(width, width, 1, pw) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*blocks))
            chs = width
            taps.append((f"stages.{i}", chs, 2))
        self.stages = nn.Sequential(*stages)
        self.conv5 = ConvBnAct(pw(chs, num_features), num_features)
        self.feature_info = feature_taps(taps + [("conv5", num_features, 1)])
        self.init_classifier(num_features, num_classes, drop_rate)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv5(self.stages(self.stem(x)))

    def stage_names(self) -> list[str]:
        return ["stem.0", "stem.1", *(f"stages.{i}" for i in range(len(self.stages))), "conv5"]


def _shufflenetv2(variant: str, widths, num_features: int = 1024, bft: bool = False,
                  pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    model_args = dict(widths=widths, num_features=num_features, bft=bft)
    return build(ShuffleNetV2, variant, pretrained, **dict(model_args, **kwargs))


default_cfgs = generate_default_cfgs({
    name: untrained_cfg(first_conv="stem.0.conv") for name in (
        "shufflenetv2_050", "shufflenetv2_100", "shufflenetv2_150", "shufflenetv2_200",
        "shufflenetv2_bft_125")})


@register
def shufflenetv2_050(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _shufflenetv2("shufflenetv2_050", (48, 96, 192), pretrained=pretrained, **kwargs)


@register
def shufflenetv2_100(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _shufflenetv2("shufflenetv2_100", (116, 232, 464), pretrained=pretrained, **kwargs)


@register
def shufflenetv2_150(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _shufflenetv2("shufflenetv2_150", (176, 352, 704), pretrained=pretrained, **kwargs)


@register
def shufflenetv2_200(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _shufflenetv2("shufflenetv2_200", (244, 488, 976), 2048, pretrained=pretrained, **kwargs)


@register
def shufflenetv2_bft_125(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return _shufflenetv2("shufflenetv2_bft_125", (160, 320, 640), bft=True, pretrained=pretrained,
                         **kwargs)
