"""MobileNetV3-Small (Howard et al. 2019): baseline at width 0.35, BFT at width 0.5.

timm registers MobileNetV3-Small at widths 0.5/0.75/1.0 only; ``mobilenetv3_small_035`` is the BFT
paper's baseline (13 MFLOPs). Both variants here are built by the same code, so the comparison is
fair; in ``mobilenetv3_small_bft_050`` every pointwise layer is a BFT (BFT paper section 4.4),
squeeze-excite and the 1024-wide head layer included.
"""
from __future__ import annotations

from timm.layers import make_divisible
from timm.models import generate_default_cfgs

from .builder import build, register, untrained_cfg
from .mobilenet import Block, MobileNet, scale_blocks

# MobileNetV3 paper, table 2, with expansions as ratios of the block input as in the reference
# implementation: (kernel, expansion, out, stride, squeeze-excite, activation).
_SMALL = [Block(3, 1, 16, 2, True, "relu"),
          Block(3, 72 / 16, 24, 2, False, "relu"), Block(3, 88 / 24, 24, 1, False, "relu"),
          Block(5, 4, 40, 2, True, "hswish"), Block(5, 6, 40, 1, True, "hswish"),
          Block(5, 6, 40, 1, True, "hswish"), Block(5, 3, 48, 1, True, "hswish"),
          Block(5, 3, 48, 1, True, "hswish"), Block(5, 6, 96, 2, True, "hswish"),
          Block(5, 6, 96, 1, True, "hswish"), Block(5, 6, 96, 1, True, "hswish")]


def _mobilenetv3_small(variant: str, width: float, bft: bool, pretrained: bool = False, **kwargs):
    # Every layer scales with the width except the 1024-wide head (as in the MobileNetV3 paper).
    model_args = dict(blocks=scale_blocks(_SMALL, width), stem_chs=make_divisible(16 * width),
                      pre_pool_chs=make_divisible(576 * width), head_chs=1024, act="hswish",
                      bft=bft)
    return build(MobileNet, variant, pretrained, **dict(model_args, **kwargs))


default_cfgs = generate_default_cfgs({
    name: untrained_cfg() for name in ("mobilenetv3_small_035", "mobilenetv3_small_bft_050")})


@register
def mobilenetv3_small_035(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv3_small("mobilenetv3_small_035", 0.35, False, pretrained, **kwargs)


@register
def mobilenetv3_small_bft_050(pretrained: bool = False, **kwargs) -> MobileNet:
    return _mobilenetv3_small("mobilenetv3_small_bft_050", 0.5, True, pretrained, **kwargs)
