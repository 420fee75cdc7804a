"""MobileNetV1 (Howard et al. 2017): baselines at widths 0.25/0.5/0.75, BFT at widths 1.0/2.0.

The BFT variants make every pointwise conv a BFT (BFT paper section 4.2); width 1.0 and 2.0 with
BFT cost about as much as the baselines 0.25 and 0.5.
"""
from __future__ import annotations

from timm.layers import make_divisible
from timm.models import generate_default_cfgs

from .builder import build, register, untrained_cfg
from .mobilenet import Block, MobileNet, scale_blocks

# The 13 depthwise-separable blocks (no expansion): (out channels, stride).
_V1 = [Block(3, 1, out, stride) for out, stride in (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2),
    (1024, 1))]


def _mobilenetv1(variant: str, width: float, bft: bool, pretrained: bool = False, **kwargs):
    model_args = dict(blocks=scale_blocks(_V1, width), stem_chs=make_divisible(32 * width),
                      linear_bottleneck=False, bft=bft)
    return build(MobileNet, variant, pretrained, **dict(model_args, **kwargs))


default_cfgs = generate_default_cfgs({
    name: untrained_cfg() for name in (
        "mobilenetv1_025", "mobilenetv1_050", "mobilenetv1_075",
        "mobilenetv1_bft_100", "mobilenetv1_bft_200")})


@register
def mobilenetv1_025(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv1("mobilenetv1_025", 0.25, False, pretrained, **kwargs)


@register
def mobilenetv1_050(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv1("mobilenetv1_050", 0.5, False, pretrained, **kwargs)


@register
def mobilenetv1_075(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv1("mobilenetv1_075", 0.75, False, pretrained, **kwargs)


@register
def mobilenetv1_bft_100(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv1("mobilenetv1_bft_100", 1.0, True, pretrained, **kwargs)


@register
def mobilenetv1_bft_200(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv1("mobilenetv1_bft_200", 2.0, True, pretrained, **kwargs)
