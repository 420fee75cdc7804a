"""Multiply-add counting: hand-derived totals, fvcore vs FlopCounterMode vs the layers' own
``macs_per_pixel``, and no fvcore noise about the BFT operator."""
import logging
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import butterfly
from butterfly.flops import FlopCountAnalysis, count_macs
from butterfly.models import registered_models

BFT_MODELS = [n for n in registered_models() if "_bft_" in n]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dw_pw(blocks, pw):
    """Depthwise 3x3 (9*cin per output pixel) + pointwise (``pw(cin, cout)`` per pixel)."""
    return sum(side * side * (9 * cin + pw(cin, cout)) for cin, cout, side in blocks)


# MobileNetV1 blocks at 224 as (in, out, output side); width 1.0 channels, scaled by ``w``.
def _v1_blocks(w):
    c = lambda x: int(x * w)
    spec = [(32, 64, 112), (64, 128, 56), (128, 128, 56), (128, 256, 28), (256, 256, 28),
            (256, 512, 14), *[(512, 512, 14)] * 5, (512, 1024, 7), (1024, 1024, 7)]
    return [(c(i), c(o), s) for i, o, s in spec]


def test_mobilenetv1_025_by_hand():
    # stem: 3x3 conv 3 -> 8, stride 2: 112*112 outputs x 27*8
    stem = 112 * 112 * 27 * 8                                  # 2,709,504
    body = _dw_pw(_v1_blocks(0.25), lambda i, o: i * o)        # dw 4,346,496 + pw 33,718,272
    fc = 256 * 1000
    assert stem + body + fc == 41_030_272                              # the paper: 41 MFLOPs
    assert count_macs(timm.create_model("mobilenetv1_025"), (3, 224, 224)) == 41_030_272


def test_mobilenetv1_bft_100_by_hand():
    # One square butterfly of n = prod(radices) costs n * sum(radices) per pixel; a layer
    # in -> out uses T = max/min blocks of size min (here all powers of two: no padding).
    square = {32: 32 * (4 + 4 + 2), 64: 64 * (4 + 4 + 4), 128: 128 * (4 + 4 + 4 + 2),
              256: 256 * 16, 512: 512 * (4 * 4 + 2), 1024: 1024 * 20}
    bft = lambda i, o: (max(i, o) // min(i, o)) * square[min(i, o)]
    stem = 112 * 112 * 27 * 32
    body = _dw_pw(_v1_blocks(1.0), bft)
    fc = 1024 * 1000
    assert stem + body + fc == 66_277_888                              # (no paper figure at 224)
    assert count_macs(timm.create_model("mobilenetv1_bft_100"), (3, 224, 224)) == 66_277_888


def test_shufflenetv2_050_by_hand():
    stem = 112 * 112 * 27 * 24                         # 8,128,512: 3x3 conv 3 -> 24, stride 2
    total, cin, side = stem, 24, 56                                    # after the 3x3/2 max-pool
    for width, repeats in ((48, 4), (96, 8), (192, 4)):
        mid, side = width // 2, side // 2
        # stride-2 block: branch1 = dw(cin) + pw cin->mid at the new side;
        # branch2 = pw cin->mid at the old side, dw(mid) + pw mid->mid at the new side
        total += side ** 2 * (9 * cin + cin * mid) + (2 * side) ** 2 * cin * mid
        total += side ** 2 * (9 * mid + mid * mid)
        # stride-1 blocks transform half the channels: pw, dw, pw
        total += (repeats - 1) * side ** 2 * (2 * mid * mid + 9 * mid)
        cin = width
    # stages: 6,265,728 + 9,793,728 + 5,630,688
    total += 7 * 7 * 192 * 1024 + 1024 * 1000                          # conv5 9,633,792 + fc
    assert total == 40_476_448                                         # the paper: 41 MFLOPs
    assert count_macs(timm.create_model("shufflenetv2_050"), (3, 224, 224)) == total


def _layer_sum(model, x):
    """Sum over layers of their own cost x output pixels: conv by its kernel, BFT by
    ``macs_per_pixel``, linear by in*out."""
    total, handles = [], []

    def hook(m, inputs, out):
        if butterfly.is_bft(m):
            total.append(m.macs_per_pixel * out.numel() // m.out_channels)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total.append(out.numel() * m.in_channels // m.groups * kh * kw)
        elif isinstance(m, nn.Linear):
            total.append(out.numel() * m.in_features)

    for m in model.modules():
        handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("name", BFT_MODELS)
def test_counters_agree_on_bft_models(name, caplog):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING):
        macs = count_macs(model, (3, 64, 64))
    assert not [r for r in caplog.records if "nsupported" in r.getMessage()]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == 2 * macs
    assert _layer_sum(model, x) == macs


@pytest.mark.parametrize("cin,cout,channels_last", [(24, 58, False), (100, 36, True),
                                                     (148, 148, False), (64, 64, True)])
def test_bft_layer_counts(cin, cout, channels_last):
    layer = butterfly.BFT(cin, cout)
    x = torch.randn(2, cin, 5, 3, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    expected = layer.macs_per_pixel * 2 * 5 * 3
    analysis = FlopCountAnalysis(layer, (x,))
    assert analysis.total() == analysis.by_operator()["bft"] == expected
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    # FlopCounterMode's unit is 2 x MACs; the backward (input and weight gradients) is two passes
    assert counts == {"butterfly.bft": 2 * expected, "butterfly.bft_backward": 4 * expected}


def test_bn_and_pooling_not_counted_but_unknown_ops_still_warn(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.Softplus())
    with caplog.at_level(logging.WARNING):
        assert count_macs(model, (3, 10, 10)) == 8 * 8 * 27 * 8 + 8 * 4
    assert any("aten::softplus" in r.getMessage() for r in caplog.records)


def test_count_macs_keeps_mode_and_checks_input():
    model = timm.create_model("mobilenetv1_025", small_input=True, in_chans=1, num_classes=10)
    assert count_macs(model, (2, 1, 28, 28)) == 2 * count_macs(model, (1, 28, 28))
    assert model.training
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
        count_macs(model, (28, 28))


def test_import_without_fvcore_and_counting_says_why():
    """An environment without fvcore (the GPU image) imports butterfly and runs its layers;
    counting multiply-adds there raises ImportError naming the fix."""
    code = textwrap.dedent("""
        import sys
        sys.modules["fvcore"] = None  # import fvcore now raises ImportError
        import torch, butterfly
        from butterfly.flops import count_macs
        butterfly.BFT(16, 16)(torch.randn(1, 16, 2, 2))
        try:
            count_macs(torch.nn.Conv2d(3, 3, 1), (3, 4, 4))
        except ImportError as error:
            assert "pip install fvcore" in str(error), error
            print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
