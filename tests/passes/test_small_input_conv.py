"""The kernel for dense convs over few input channels (``butterfly_cpu::small_input_conv_cl``,
csrc/graph/small_input_conv.h) and the fused conv that runs it, against ``F.conv2d`` followed
by the activation: 1-4 input channels; output channels below, at and past a vector and past a
register block; kernel sizes 1-7; strides 1-3; paddings 0 to k (taps outside the image on every
side, rows and columns with no tap inside); odd sizes; bias or none; every activation; NaN;
float32 and float64; 1 and 2 threads; the choice by measurement; the fallbacks."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import butterfly
import butterfly.passes.optimize as optimize
from butterfly.ops.bft_fused import ACTIVATIONS, activate
from butterfly.passes.fuse import FusedConv, is_small_input_conv

CL = torch.channels_last


# every test: the kernels built, one thread to start with (the count restored after it)
pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")


def op(*args):
    return torch.ops.butterfly_cpu.small_input_conv_cl(*args)


def _want(x, w, b, stride, padding, activation):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    return activate(y, activation).to(x.dtype)


def _check(n, c, h, wd, co, k, stride, padding, activation="relu", bias=True,
           dtype=torch.float32):
    x = torch.randn(n, c, h, wd, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(co, c, k, k, dtype=dtype)
    b = torch.randn(co, dtype=dtype) if bias else None
    got = op(x, w, b, stride, padding, activation)
    assert got.is_contiguous(memory_format=CL) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, _want(x, w, b, stride, padding, activation), rtol=tol,
                               atol=tol, msg=lambda m: f"{(n, c, h, wd, co, k, stride, padding)}"
                               f" {activation}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (3, 1, 1), (1, 1, 0), (5, 2, 2),
                                              (7, 2, 3), (3, 3, 0), (4, 2, 1), (3, 2, 3)])
def test_kernel_equals_conv2d(k, stride, padding, dtype):
    for c, co, (h, w) in itertools.product((1, 3, 4), (1, 8, 16, 24, 33, 64, 72),
                                           ((5, 5), (9, 14), (23, 17))):
        if h + 2 * padding >= k and w + 2 * padding >= k:
            _check(2, c, h, w, co, k, stride, padding, dtype=dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_activation_and_bias(activation, bias):
    for co in (16, 24, 40):
        _check(1, 3, 19, 21, co, 3, 2, 1, activation, bias)


def test_two_threads_and_a_wide_image():
    torch.set_num_threads(2)
    _check(3, 3, 64, 67, 32, 3, 2, 1)
    _check(1, 3, 224, 224, 24, 3, 2, 1)


def test_nan_reaches_the_outputs_that_read_it():
    x = torch.randn(1, 3, 9, 9).contiguous(memory_format=CL)
    x[0, 1, 4, 4] = float("nan")
    w, b = torch.randn(16, 3, 3, 3), torch.randn(16)
    for activation in ("relu", "relu6", "hardswish"):
        got, want = op(x, w, b, 1, 1, activation), _want(x, w, b, 1, 1, activation)
        assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 16 * 9
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_kernel_refuses_bad_input():
    x, w = torch.randn(1, 3, 8, 8).contiguous(memory_format=CL), torch.randn(8, 3, 3, 3)
    with pytest.raises(RuntimeError, match="channels_last"):
        op(torch.randn(1, 3, 8, 8), w, None, 1, 1, "relu")
    with pytest.raises(RuntimeError, match=r"weight \(out_channels, 3, k, k\)"):
        op(x, torch.randn(8, 4, 3, 3), None, 1, 1, "relu")
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, w.double(), None, 1, 1, "relu")
    with pytest.raises(RuntimeError, match="bias of 8 values"):
        op(x, w, torch.randn(7), 1, 1, "relu")
    with pytest.raises(RuntimeError, match="unknown activation 'gelu'"):
        op(x, w, None, 1, 1, "gelu")
    with pytest.raises(RuntimeError, match="stride >= 1"):
        op(x, w, None, 0, 1, "relu")
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        op(x[:, :, :2, :2].contiguous(memory_format=CL), torch.randn(8, 3, 5, 5), None, 1, 0,
           "relu")


def test_which_convs_it_computes():
    assert is_small_input_conv(nn.Conv2d(3, 32, 3, 2, 1))
    assert is_small_input_conv(nn.Conv2d(4, 8, 7, 2, 3, bias=False))
    for conv in (nn.Conv2d(5, 8, 3), nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(3, 8, (3, 5)),
                 nn.Conv2d(3, 8, 3, stride=(1, 2)), nn.Conv2d(3, 8, 3, padding=(1, 0)),
                 nn.Conv2d(3, 8, 3, dilation=2), nn.Conv2d(3, 8, 3, padding="same"),
                 nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")):
        assert not is_small_input_conv(conv), conv


def _stem(activation="relu"):
    conv = nn.Conv2d(3, 24, 3, 2, 1)
    return FusedConv(conv, activation), conv


def test_fused_conv_runs_the_kernel_only_where_it_applies(monkeypatch):
    layer, conv = _stem()
    calls = []
    real = torch.ops.butterfly_cpu.small_input_conv_cl

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)
    monkeypatch.setattr(torch.ops.butterfly_cpu, "small_input_conv_cl", Spy())
    x = torch.randn(2, 3, 15, 15)
    want = F.relu(conv(x))
    with torch.no_grad():
        layer.small_input = True
        torch.testing.assert_close(layer(x.contiguous(memory_format=CL)), want, rtol=1e-5,
                                   atol=1e-5)
        assert len(calls) == 1
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)   # NCHW: oneDNN
        with butterfly.use_backend("reference"):
            torch.testing.assert_close(layer(x.contiguous(memory_format=CL)), want, rtol=1e-5,
                                       atol=1e-5)
        layer.small_input = False
        layer(x.contiguous(memory_format=CL))
        assert len(calls) == 1
    compiled = torch.compile(layer.eval(), backend="eager", fullgraph=True)
    layer.small_input = True
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.contiguous(memory_format=CL)), want, rtol=1e-5,
                                   atol=1e-5)


def test_the_fake_kernel_matches():
    x = torch.randn(2, 3, 11, 12).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.butterfly_cpu.small_input_conv_cl.default,
                          (x, torch.randn(20, 3, 3, 3), torch.randn(20), 2, 1, "hardswish"))
    torch.library.opcheck(torch.ops.butterfly_cpu.max_pool_cl.default, (x, 3, 2, 1))


@pytest.mark.parametrize("kernel_faster", [True, False])
def test_optimize_keeps_the_faster_and_reports_it(monkeypatch, kernel_faster):
    def fake_time(fn, inp, min_run_time=0.0, warmup=0):
        if isinstance(fn, FusedConv) and fn.small_input_geometry:
            return 1.0 if fn.small_input == kernel_faster else 2.0
        return 1.0
    monkeypatch.setattr(optimize, "time_call", fake_time)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          butterfly.BFT(16, 16)).eval()
    x = torch.randn(1, 3, 17, 17).contiguous(memory_format=CL)
    out, report = butterfly.optimize_for_inference(model, x)
    (choice,) = report.small_input
    assert choice.chosen == ("kernel" if kernel_faster else "torch")
    assert out.get_submodule(choice.name).small_input == kernel_faster
    assert "convs over few input channels: " + ("1" if kernel_faster else "0") + " of 1" \
        in str(report)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    # NCHW input: the kernel does not apply, nothing is timed
    _, nchw = butterfly.optimize_for_inference(model, x.contiguous())
    assert nchw.small_input == []
