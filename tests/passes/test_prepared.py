"""The CPU backend's prepared fused inference layers (``csrc/bft/prepared.cpp``): the eager paths
of :class:`butterfly.passes.fuse.FusedBFT` (``PreparedBFT``), of ``FusedConv`` on the depthwise
kernel (``PreparedDepthwise``) and of ``FusedDepthwiseBFT`` (``PreparedDepthwiseBFT``), called
without the dispatcher.

Each must compute what its operator computes on the reference backend (the oracle: the
stage-by-stage BFT, the reference epilogue, the reference depthwise conv) in every layout it
takes (NCHW, channels-last pixels, a channel slice of them), keep the input's memory format, see
in-place weight updates, and refuse inputs it was not prepared for with a clear error."""
import pytest
import torch

import butterfly
from butterfly.kernels.cpu import load_extension
from butterfly.ops.bft_fused import Epilogue, bft_fused_image
from butterfly.ops.dispatch import prepared
from butterfly.ops.dw_bft_fused import separable_reference
from butterfly.passes.fuse import FusedBFT, FusedConv, FusedDepthwiseBFT

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(load_extension() is None, reason="the CPU kernels are unavailable")]

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def _layer(cin, cout, dtype, activation="relu", scale=True, shift=True, residual=True, adds=False):
    g = torch.Generator().manual_seed(cin * 1000 + cout)
    layer = butterfly.BFT(cin, cout, residual=residual,
                          dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype)
                           / 2)
    wdt = layer.weight.dtype
    epilogue = Epilogue(torch.rand(cout, generator=g, dtype=wdt) + 0.5 if scale else None,
                        torch.randn(cout, generator=g, dtype=wdt) if shift else None,
                        activation, adds)
    return FusedBFT(layer, epilogue)


def _oracle(fused: FusedBFT, x: torch.Tensor, add=None) -> torch.Tensor:
    with butterfly.use_backend("reference"):
        return bft_fused_image(x, fused.weight, fused.plan, fused.residual,
                               Epilogue(fused.scale, fused.shift, fused.activation,
                                        add is not None), add)


def _images(n, c, h, w, dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("cin,cout,activation", [
    (64, 64, "relu"), (256, 256, "hardswish"), (24, 144, "relu6"),   # radix 3: tile kernels
    (144, 24, "none"), (48, 160, "hardsigmoid"), (160, 48, "relu")])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 1), (1, 7, 7), (3, 5, 3)])
def test_prepared_layer_equals_the_reference(dtype, fmt, cin, cout, activation, shape):
    fused = _layer(cin, cout, dtype, activation)
    x = _images(shape[0], cin, shape[1], shape[2], dtype, fmt)
    with torch.no_grad():
        assert fused._prepared_for(x) is not None   # the prepared path runs
        got = fused(x)
        want = _oracle(fused, x)
    assert got.dtype == dtype and got.shape == want.shape
    if fmt == torch.channels_last and shape[1] * shape[2] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_layer_adds_in_its_epilogue(fmt, dtype):
    fused = _layer(64, 128, dtype, "relu", adds=True)
    x = _images(2, 64, 6, 5, dtype, fmt, seed=1)
    # an add in the other memory format is laid out like the output first
    for add_fmt in (torch.contiguous_format, torch.channels_last):
        add = _images(2, 128, 6, 5, dtype, add_fmt, seed=2)
        with torch.no_grad():
            got = fused(x, add)
        torch.testing.assert_close(got, _oracle(fused, x, add), rtol=TOL[dtype],
                                   atol=TOL[dtype])


def test_prepared_layer_reads_a_channel_slice_in_place():
    """ShuffleNetV2's split: rows of channels at a stride larger than C."""
    fused = _layer(40, 40, torch.float32, "relu")
    full = _images(3, 80, 5, 7, torch.float32, torch.channels_last, seed=3)
    for x in (full[:, 40:], full[:, :40]):
        with torch.no_grad():
            got = fused(x)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, _oracle(fused, x.contiguous()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [4, 1])   # 1x1 images: rows of channels in either format
def test_prepared_layer_sees_in_place_weight_updates(hw):
    """The float32 weights are packed once for the channels-as-lanes kernel; an in-place update
    (load_state_dict) moves the tensor's version counter and they are packed again."""
    fused = _layer(64, 64, torch.float32, "relu").eval()
    x = _images(2, 64, hw, hw, torch.float32, torch.channels_last, seed=4)
    with torch.no_grad():
        before = fused(x)
        state = {k: v.clone() for k, v in fused.state_dict().items()}
        state["weight"].mul_(-1)
        fused.load_state_dict(state)
        after = fused(x)
    torch.testing.assert_close(after, _oracle(fused, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_prepared_layer_built_under_inference_mode():
    """Inference tensors have no version counter: the weights are packed once."""
    with torch.inference_mode():
        fused = _layer(64, 64, torch.float32, "hardswish")
        x = _images(1, 64, 7, 7, torch.float32, torch.channels_last, seed=5)
        got = fused(x)
        torch.testing.assert_close(got, _oracle(fused, x), rtol=1e-5, atol=1e-5)


def test_prepared_layer_refuses_other_inputs():
    fused = _layer(64, 64, torch.float32)
    prepare = prepared("cpu", "bft_fused")
    layer = prepare(fused.weight, fused.plan, True, fused.scale, fused.shift, "relu",
                    torch.float32)
    with pytest.raises(RuntimeError, match=r"shape \(N, 64, H, W\)"):
        layer(torch.randn(1, 32, 4, 4), None)
    with pytest.raises(RuntimeError, match="Double"):
        layer(torch.randn(1, 64, 4, 4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="expected add of shape"):
        layer(torch.randn(1, 64, 4, 4), torch.randn(1, 64, 4, 5))
    with pytest.raises(RuntimeError, match="unknown epilogue activation 'gelu'"):
        prepare(fused.weight, fused.plan, True, None, None, "gelu", torch.float32)


def _depthwise(c, k, stride, dtype, activation):
    g = torch.Generator().manual_seed(c * 10 + k)
    conv = torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=True, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=dtype) / k)
        conv.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    return FusedConv(conv, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1)])
@pytest.mark.parametrize("activation", ["relu", "hardswish", "none"])
def test_prepared_depthwise_equals_the_reference(dtype, fmt, k, stride, activation):
    layer = _depthwise(24, k, stride, dtype, activation)
    x = _images(2, 24, 9, 7, dtype, fmt, seed=6)
    with torch.no_grad():
        assert layer._prepared_for(x) is not None
        got = layer(x)
        with butterfly.use_backend("reference"):
            want = layer(x)
    assert got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,stride,cin,cout", [(3, 1, 64, 64), (3, 2, 32, 64), (5, 1, 48, 96),
                                               (7, 2, 64, 32)])
@pytest.mark.parametrize("adds", [False, True])
@pytest.mark.parametrize("one_pass", [True, False])
def test_prepared_depthwise_bft_equals_the_two_layers(dtype, k, stride, cin, cout, adds, one_pass):
    """The prepared block, in one pass or apart (one call running both layers)."""
    block = FusedDepthwiseBFT(_depthwise(cin, k, stride, dtype, "relu6"),
                              _layer(cin, cout, dtype, "hardswish", adds=adds)).eval()
    block.one_pass = one_pass
    x = _images(2, cin, 11, 10, dtype, torch.channels_last, seed=7)
    ho, wo = (11 - 1) // stride + 1, (10 - 1) // stride + 1
    add = _images(2, cout, ho, wo, dtype, torch.channels_last, seed=8) if adds else None
    with torch.no_grad():
        assert block._prepared_for(x) is not None
        got = block(x, add)
        dw, pw = block.dw, block.pw
        with butterfly.use_backend("reference"):
            want = separable_reference(x, dw.weight, dw.bias, stride, "relu6", pw.weight,
                                       list(pw.plan.radices), cout, pw.residual, pw.scale,
                                       pw.shift, "hardswish", add)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_prepared_depthwise_layers_refuse_other_inputs():
    dw = prepared("cpu", "depthwise_conv")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        dw(torch.randn(8, 1, 3, 3), None, 1, "relu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="k in 3, 5, 7"):
        dw(torch.randn(8, 1, 4, 4), None, 1, "relu", torch.float32)
    layer = dw(torch.randn(8, 1, 3, 3), torch.randn(8), 2, "relu", torch.float32)
    with pytest.raises(RuntimeError, match=r"shape \(N, 8, H, W\)"):
        layer(torch.randn(1, 9, 5, 5))
    fused = _layer(8, 16, torch.float32)
    block = prepared("cpu", "dw_bft_fused")(layer, fused.weight, fused.plan, True, None, None,
                                            "relu")
    with pytest.raises(RuntimeError, match="channels_last"):
        block(torch.randn(1, 8, 5, 5), None)   # NCHW: the one-pass block takes channels_last
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert block(x, None).shape == (1, 16, 3, 3)
