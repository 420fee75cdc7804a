"""MobileNetV2 (Sandler et al. 2018) with every pointwise conv a BFT.

timm registers the MobileNetV2 baselines (``mobilenetv2_100`` ...); ``mobilenetv2_bft_100`` has no
figure in the BFT paper. Its own baseline, built by the same code, is
``MobileNet(**mobilenetv2_args(1.0, bft=False))``.
"""
from __future__ import annotations

from timm.layers import make_divisible
from timm.models import generate_default_cfgs

from .builder import build, register, untrained_cfg
from .mobilenet import Block, MobileNet, scale_blocks

# MobileNetV2 paper, table 2: (expansion t, out c, repeats n, first stride s).
_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
       (6, 320, 1, 1)]


def mobilenetv2_args(width: float, bft: bool) -> dict:
    """``MobileNet`` arguments of MobileNetV2 at ``width`` (the last conv stays >= 1280 wide)."""
    blocks = [Block(3, t, out, stride if i == 0 else 1, act="relu6")
              for t, out, repeats, stride in _V2 for i in range(repeats)]
    return dict(blocks=scale_blocks(blocks, width), stem_chs=make_divisible(32 * width),
                pre_pool_chs=max(1280, make_divisible(1280 * width)), act="relu6", bft=bft)


default_cfgs = generate_default_cfgs({"mobilenetv2_bft_100": untrained_cfg()})


@register
def mobilenetv2_bft_100(pretrained: bool = False, **kwargs) -> MobileNet:
    return build(MobileNet, "mobilenetv2_bft_100", pretrained,
                 **dict(mobilenetv2_args(1.0, bft=True), **kwargs))
