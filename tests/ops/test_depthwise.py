"""The depthwise convolution operator (butterfly/depthwise.py) and its fused CPU kernel
(csrc/dw_cpu.cpp) against the oracle: autograd through ``F.conv2d(groups=C)`` and
``butterfly.ops.bft_fused.activate``, in float64.

Covered: stride 1 and 2, NCHW and channels_last, odd sizes (7x5, 1x1, 2x3, and sizes with
interior row and pixel blocks), batch 1 and 3, 1 and 2 threads (the image split into strips of
rows), C in {1, 8, 16, 24, 37, 64}, every activation,
with and without bias, k = 3, 5, 7; gradcheck; the output's memory format; deterministic weight
gradients (1 and 2 threads, repeated calls); opcheck of the operators; torch.compile.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from butterfly import use_backend
from butterfly.nn.depthwise import DepthwiseConv2d
from butterfly.ops.depthwise import (_use_kernel, depthwise_conv,
                                 depthwise_reference, kernel_available, output_format)
from butterfly.ops.bft_fused import ACTIVATIONS, activate

CHANNELS = (1, 8, 16, 24, 37, 64)
# (9, 12): full row blocks and pixel blocks; (5, 37): channels-last rows with interior register
# blocks between the checked ones at the edges, and every shorter block for the rest
SIZES = ((7, 5), (1, 1), (2, 3), (9, 12), (5, 37))
FORMATS = ("nchw", "cl")


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if not kernel_available():
        pytest.fail("the CPU kernel did not build; see the warning above")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Every test runs with one thread unless it sets another count itself."""


def make(n, c, h, w, k=3, fmt="nchw", bias=True, dtype=torch.float32):
    x = torch.randn(n, c, h, w, dtype=dtype)
    if fmt == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, dtype=dtype)
    b = torch.randn(c, dtype=dtype) if bias else None
    return x, weight, b


def oracle(x, weight, bias, stride, activation, grad):
    """(y, grad_x, grad_w, grad_b) by float64 autograd through F.conv2d and activate."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    k = weight.shape[-1]
    y = activate(F.conv2d(leaves[0], leaves[1], leaves[2], stride, k // 2, groups=x.shape[1]),
                 activation)
    y.backward(grad.double())
    return y.detach(), *(t.grad if t is not None else None for t in leaves)


def operator(x, weight, bias, stride, activation, grad):
    """(y, grad_x, grad_w, grad_b) through butterfly::depthwise_conv on the "cpu" backend."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    leaves[0] = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    with use_backend("cpu"):
        y = depthwise_conv(leaves[0], leaves[1], leaves[2], stride, activation)
        y.backward(grad)
    return y.detach(), *(t.grad if t is not None else None for t in leaves)


def assert_close(got, want, tol):
    """max |got - want| <= tol * max |want| (and dtype and shape as the operator promises)."""
    assert got.shape == want.shape
    scale = max(want.abs().max().item(), 1e-12) if want.numel() else 1.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"max error {err} (scale {scale})"


def check(x, weight, bias, stride, activation, tol, grads=True):
    y0 = depthwise_reference(x.double(), weight.double(),
                             None if bias is None else bias.double(), stride, activation)
    grad = torch.randn(y0.shape, dtype=x.dtype)
    want = oracle(x, weight, bias, stride, activation, grad)
    got = operator(x, weight, bias, stride, activation, grad)
    assert got[0].dtype == x.dtype
    assert_close(got[0], want[0], tol)
    if grads:
        for g, w in zip(got[1:], want[1:]):
            if w is not None:
                assert g.dtype == x.dtype
                assert_close(g, w, tol)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_forward_and_gradients(channels, fmt, stride):
    """float32 output, input, weight and bias gradients within 1e-5 of the float64 oracle."""
    for (h, w), n, bias in itertools.product(SIZES, (1, 3), (True, False)):
        x, weight, b = make(n, channels, h, w, fmt=fmt, bias=bias)
        check(x, weight, b, stride, "none", 1e-5)


def test_forward_by_output_row():
    """A batch of 8 MB or more, an image over 2 MB, or pixels a page apart (1024 float channels)
    run a task per output row (all channel blocks), not per channel block."""
    for n, c, h, w in ((2, 40, 150, 190), (1, 24, 160, 150), (2, 1024, 6, 7)):   # 9.1, 2.3 MB
        x, weight, b = make(n, c, h, w, fmt="cl")
        for stride in (1, 2):
            check(x, weight, b, stride, "relu6", 1e-5, grads=False)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_two_threads(fmt, stride):
    """Two threads: an image of few channel blocks is cut into strips of rows, one per task."""
    torch.set_num_threads(2)
    for c, (h, w), n in itertools.product((8, 37), ((5, 37), (9, 12), (1, 1)), (1, 2)):
        x, weight, b = make(n, c, h, w, fmt=fmt)
        check(x, weight, b, stride, "relu", 1e-5, grads=False)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_activations_forward(activation, fmt):
    for (h, w), stride, c in itertools.product(((7, 5), (9, 12)), (1, 2), (8, 37)):
        x, weight, b = make(3, c, h, w, fmt=fmt)
        x = x * 3  # reach both sides of every kink
        check(x, weight, b, stride, activation, 1e-5, grads=False)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_activations_backward_float64(activation, fmt):
    # PyTorch's hardsigmoid backward multiplies by 1.0f / 6.0f, a float32 constant, even in
    # float64; the operator multiplies by 1 / 6 in the compute dtype
    tol = 1e-7 if activation == "hardsigmoid" else 1e-10
    for stride, c in itertools.product((1, 2), (8, 37)):
        x, weight, b = make(2, c, 7, 5, fmt=fmt, dtype=torch.float64)
        check(x * 3, weight, b, stride, activation, tol)


@pytest.mark.parametrize("k", (5, 7))
@pytest.mark.parametrize("fmt", FORMATS)
def test_larger_kernels(k, fmt):
    for (h, w), stride, c in itertools.product(((7, 5), (2, 3), (11, 13)), (1, 2), (8, 24)):
        x, weight, b = make(2, c, h, w, k=k, fmt=fmt)
        check(x, weight, b, stride, "relu", 1e-5, grads=False)
        check(x, weight, b, stride, "none", 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reduced_precision(fmt):
    """bfloat16 input computes in float32 and rounds once."""
    x, weight, b = make(2, 24, 7, 5, fmt=fmt)
    y = depthwise_conv(x.bfloat16(), weight, b, 1, "relu6")
    want = depthwise_reference(x.bfloat16().float(), weight, b, 1, "relu6")
    assert y.dtype == torch.bfloat16
    assert_close(y, want, 1e-2)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck(fmt, stride):
    x, weight, b = make(1, 3, 5, 4, fmt=fmt, dtype=torch.float64)
    for activation in ("none", "hardswish"):
        inputs = (x.requires_grad_(), weight.requires_grad_(), b.requires_grad_())
        with use_backend("cpu"):
            assert torch.autograd.gradcheck(
                lambda *t: depthwise_conv(*t, stride, activation), inputs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_format(fmt):
    """The output and the input gradient keep the input's format (also the reference)."""
    for stride, backend in itertools.product((1, 2), ("cpu", "reference")):
        x, weight, b = make(2, 16, 7, 5, fmt=fmt)
        x.requires_grad_()
        with use_backend(backend):
            y = depthwise_conv(x, weight, b, stride)
            y.backward(torch.randn_like(y))
        cl = fmt == "cl"
        assert output_format(x) == (torch.channels_last if cl else torch.contiguous_format)
        for t in (y, x.grad):
            assert t.is_contiguous(memory_format=torch.channels_last if cl else
                                   torch.contiguous_format)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_gradient_deterministic(fmt):
    """Bit-identical weight and bias gradients for 1 and 2 threads and repeated calls."""
    x, weight, b = make(3, 37, 20, 18, fmt=fmt)
    y = depthwise_conv(x, weight, b, 1)
    grad = torch.randn_like(y)
    results = []
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        for stride in (1, 2):
            g = grad if stride == 1 else torch.randn(depthwise_conv(x, weight, b, 2).shape,
                                                     generator=torch.Generator().manual_seed(1))
            g = g.contiguous(memory_format=output_format(x))
            _, gw, gb = torch.ops.butterfly.depthwise_conv_backward(g, x, weight, stride,
                                                                    [False, True, True])
            results.append((stride, gw, gb))
    for stride, gw, gb in results:
        first = next(r for r in results if r[0] == stride)
        assert torch.equal(gw, first[1]) and torch.equal(gb, first[2])


@pytest.mark.parametrize("activation", ("none", "relu", "hardswish"))
def test_eager_path_matches_operator(activation):
    """Eager calls skip the custom-op machinery; they give exactly what the operator gives."""
    x, weight, b = make(2, 24, 7, 5, fmt="cl")
    results = []
    for call in (lambda *t: depthwise_conv(*t, 2, activation),
                 lambda *t: torch.ops.butterfly.depthwise_conv(*t, 2, activation)):
        leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                  for t in (x, weight, b)]
        y = call(*leaves)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), *(t.grad for t in leaves)))
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_output_mask():
    x, weight, _ = make(2, 8, 7, 5)
    g = torch.randn(2, 8, 7, 5)
    full = torch.ops.butterfly.depthwise_conv_backward(g, x, weight, 1, [True, True, True])
    for mask in itertools.product((False, True), repeat=3):
        got = torch.ops.butterfly.depthwise_conv_backward(g, x, weight, 1, list(mask))
        for on, a, b in zip(mask, got, full):
            assert torch.equal(a, b) if on else a.numel() == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    """Schema, fake kernels (shapes, dtypes, strides) and autograd registration of the Python
    operators, and schema and fake kernels of the C++ ones."""
    x, weight, b = make(2, 24, 7, 5, fmt=fmt)
    for stride in (1, 2):
        y = depthwise_conv(x, weight, b, stride)
        g = torch.randn_like(y)
        with use_backend("cpu"):
            torch.library.opcheck(torch.ops.butterfly.depthwise_conv,
                                  (x.requires_grad_(), weight.requires_grad_(), b, stride, "relu"))
            torch.library.opcheck(torch.ops.butterfly.depthwise_conv_backward,
                                  (g, x.detach(), weight.detach(), stride, [True, True, True]))
        utils = ("test_schema", "test_faketensor")
        torch.library.opcheck(torch.ops.butterfly_cpu.dw_forward,
                              (x.detach(), weight.detach(), b, stride, "hardswish"),
                              test_utils=utils)
        torch.library.opcheck(torch.ops.butterfly_cpu.dw_backward,
                              (g, x.detach(), weight.detach(), stride, [True, False, True]),
                              test_utils=utils)


def test_compile_matches_eager():
    """torch.compile of DW conv + ReLU (forward and backward) equals eager, both formats."""
    net = nn.Sequential(DepthwiseConv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU())
    compiled = torch.compile(net, fullgraph=True)
    for fmt in FORMATS:
        x = make(2, 16, 7, 5, fmt=fmt)[0]
        outs = []
        for model in (net, compiled):
            xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            net.zero_grad()
            y = model(xi)
            y.square().sum().backward()
            outs.append((y.detach(), xi.grad, net[0].weight.grad.clone(), net[0].bias.grad.clone()))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)
        assert outs[1][0].is_contiguous(memory_format=output_format(x))


def test_compile_keeps_the_operator_for_training_only():
    """Under torch.compile the layer runs the operator when gradients are needed (its backward
    is faster) and PyTorch's convolution in inference (inductor optimises that one better)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    net = nn.Sequential(DepthwiseConv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.ReLU())
    x = make(2, 16, 7, 5)[0]
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=record)
    compiled(x).sum().backward()
    with torch.no_grad():
        y = compiled(x)
    torch.testing.assert_close(y, net(x))
    assert len(graphs) == 2
    assert "depthwise_conv" in graphs[0] and "conv2d" not in graphs[0]
    assert "depthwise_conv" not in graphs[1] and "conv2d" in graphs[1]


def test_module_is_a_conv():
    """Same parameters, state_dict and results as nn.Conv2d; other configurations fall back."""
    conv = nn.Conv2d(24, 24, 3, 2, 1, groups=24, bias=True)
    layer = DepthwiseConv2d(24, 24, 3, 2, 1, groups=24, bias=True)
    assert layer.state_dict().keys() == conv.state_dict().keys()
    layer.load_state_dict(conv.state_dict())
    assert layer.runs_operator()
    for fmt in FORMATS:
        x = make(3, 24, 9, 12, fmt=fmt)[0]
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    wrapped = DepthwiseConv2d.from_conv(conv)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    for args, kwargs in (((24, 24, 3, 1, 1), {}), ((24, 24, 3, 1, 2), {"groups": 24}),
                         ((24, 24, 3, 1, 2), {"groups": 24, "dilation": 2}),
                         ((24, 24, 4, 1, 2), {"groups": 24}), ((24, 24, 3, 3, 1), {"groups": 24}),
                         ((24, 48, 3, 1, 1), {"groups": 24})):
        layer, conv = DepthwiseConv2d(*args, **kwargs), nn.Conv2d(*args, **kwargs)
        layer.load_state_dict(conv.state_dict())
        assert not layer.runs_operator()
        x = torch.randn(1, 24, 9, 8)
        torch.testing.assert_close(layer(x), conv(x))


def test_fx_trace():
    """torch.fx traces the layer (one call node for the operator), as timm's FX feature
    extractors need."""
    net = nn.Sequential(DepthwiseConv2d(8, 8, 3, 2, 1, groups=8), nn.ReLU())
    gm = torch.fx.symbolic_trace(net)
    x = make(2, 8, 7, 5, fmt="cl")[0]
    torch.testing.assert_close(gm(x), net(x))
    assert torch.equal(net[0](x[0]), F.conv2d(x[0], net[0].weight, net[0].bias, 2, 1, 1, 8))


def test_backend_choice():
    x, weight, _ = make(1, 8, 5, 5)
    assert _use_kernel(x, weight, 1)
    with use_backend("cpu"):
        assert _use_kernel(x, weight, 2)
    with use_backend("reference"):
        assert not _use_kernel(x, weight, 1)
    w9 = torch.randn(8, 1, 9, 9)
    assert not _use_kernel(x, w9, 1)  # k = 9: the reference runs it
    torch.testing.assert_close(depthwise_conv(x, w9), F.conv2d(x, w9, None, 1, 4, groups=8))


def test_errors():
    x, weight, _ = make(1, 8, 5, 5)
    with pytest.raises(ValueError, match="weight of shape"):
        depthwise_conv(x, torch.randn(8, 1, 2, 2))
    with pytest.raises(ValueError, match="stride"):
        depthwise_conv(x, weight, stride=3)
    with pytest.raises(ValueError, match="activation"):
        depthwise_conv(x, weight, activation="gelu")


def test_flop_count():
    x, weight, b = make(2, 8, 7, 5)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        depthwise_conv(x, weight, b, 2)
    assert counter.get_total_flops() == 2 * 2 * 8 * 4 * 3 * 9


def test_double_backward():
    """Second derivatives (gradient penalties) through the layer and the operator: the backward
    switches to PyTorch's differentiable convolution_backward."""
    layer = DepthwiseConv2d(4, 4, 3, 2, 1, groups=4).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: depthwise_conv(x, w, b, 2, "relu"),
                                        (x, layer.weight, layer.bias))
    g, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    g_ref, = torch.autograd.grad(F.conv2d(x, layer.weight, layer.bias, 2, 1, groups=4)
                                 .square().sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_ref)
    w_grad, = torch.autograd.grad(g.square().sum(), layer.weight)
    w_ref, = torch.autograd.grad(g_ref.square().sum(), layer.weight)
    torch.testing.assert_close(w_grad, w_ref)
