"""The fused training-mode BatchNorm + activation (butterfly.ops.batch_norm_act) against PyTorch's
``activation(nn.BatchNorm2d(x))`` in training mode, the oracle: outputs, gradients, running
statistics and their bookkeeping, memory formats, determinism, the custom ops and compile."""
import copy

import pytest
import torch
from torch import nn

import butterfly
from butterfly.ops.batch_norm_act import batch_norm_act, kernel_runs
from butterfly.ops.bft_fused import ACTIVATIONS, activate
from butterfly.ops.depthwise import kernel_available
from butterfly.models.layers import ConvBnAct

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernel_available(), reason="the C++ kernels did not build")]

FORMATS = [torch.contiguous_format, torch.channels_last]
SHAPES = [(3, 5, 7, 6), (2, 70, 3, 3), (1, 16, 9, 5), (4, 300, 1, 2)]


def _rel(got, want, floor=1e-30):
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def _layer(C, dtype, **kwargs):
    bn = nn.BatchNorm2d(C, **kwargs).to(dtype).train()
    if bn.affine:
        g = torch.Generator().manual_seed(C)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
            bn.bias.copy_(torch.rand(C, generator=g, dtype=dtype) - 0.5)
    return bn


def _both(shape, fmt, dtype, activation, steps=1, **kwargs):
    """(kernel layer, PyTorch layer, [(y, grad_x) per step] for each)."""
    bn = _layer(shape[1], dtype, **kwargs)
    ref = copy.deepcopy(bn)
    g = torch.Generator().manual_seed(0)
    outs = ([], [])
    for _ in range(steps):
        x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.7).contiguous(memory_format=fmt)
        grad = torch.randn(shape, generator=g, dtype=dtype)
        for layer, run, out in ((bn, batch_norm_act, outs[0]),
                                (ref, lambda x, m, a: activate(m(x), a), outs[1])):
            xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            y = run(xi, layer, activation)
            y.backward(grad)
            out.append((y.detach(), xi.grad))
    return bn, ref, outs


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pytorch(dtype, fmt, activation):
    # PyTorch's hardsigmoid backward multiplies by 1/6 rounded to float32 even in float64
    tol = (1e-12 if activation != "hardsigmoid" else 1e-7) if dtype == torch.float64 else 1e-5
    for shape in SHAPES:
        bn, ref, (got, want) = _both(shape, fmt, dtype, activation, steps=2)
        assert kernel_runs(got[0][0], bn)
        for (y, gx), (y_ref, gx_ref) in zip(got, want):
            assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
            assert _rel(y, y_ref) < tol, shape
            # the input gradient is zero up to rounding where a channel is nearly constant
            assert _rel(gx, gx_ref, 1e-6 * gx_ref.abs().max().item() + 1e-30) < tol * 10, shape
        for name in ("weight", "bias"):
            assert _rel(getattr(bn, name).grad, getattr(ref, name).grad) < tol * 10, name
        for name in ("running_mean", "running_var"):
            assert _rel(getattr(bn, name), getattr(ref, name)) < tol, name
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(momentum=0.3), dict(affine=False),
                                    dict(track_running_stats=False), dict(eps=1e-3)])
def test_running_statistics_follow_batchnorm2d(kwargs):
    """Several steps: the running statistics and their count are nn.BatchNorm2d's, with
    momentum=None (the cumulative average) too; without running statistics, none are made."""
    bn, ref, (got, want) = _both((4, 12, 5, 5), torch.channels_last, torch.float64, "relu",
                                 steps=4, **kwargs)
    for (y, gx), (y_ref, gx_ref) in zip(got, want):
        assert _rel(y, y_ref) < 1e-12 and _rel(gx, gx_ref) < 1e-10
    for (name, a), b in zip(bn.named_buffers(), ref.buffers()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), name
    if not kwargs.get("track_running_stats", True):
        assert bn.running_mean is None


def test_gradcheck():
    for activation in ("relu", "hardswish", "none"):
        for fmt in FORMATS:
            x = (torch.randn(3, 4, 3, 5, dtype=torch.float64) + 0.3).contiguous(memory_format=fmt)
            bn = _layer(4, torch.float64)
            w, b = bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()

            def f(x, w, b, activation=activation):
                return torch.ops.butterfly.batch_norm_act(x, w, b, 1e-5, activation)[0]
            assert torch.autograd.gradcheck(f, (x.requires_grad_(), w, b))


def test_opcheck():
    x = torch.randn(2, 6, 4, 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(6) + 0.5, torch.rand(6)
    torch.library.opcheck(torch.ops.butterfly.batch_norm_act, (x, w, b, 1e-5, "relu6"))
    torch.library.opcheck(torch.ops.butterfly.batch_norm_act, (x.contiguous(), None, None, 1e-5,
                                                                "none"))
    y, mean, invstd, _ = torch.ops.butterfly.batch_norm_act(x, w, b, 1e-5, "relu")
    torch.library.opcheck(torch.ops.butterfly.batch_norm_act_backward,
                          (torch.randn_like(y), x, y, w, b, mean, invstd, "relu",
                           [True, True, True]))


def test_statistics_are_deterministic_across_threads():
    x = torch.randn(8, 96, 17, 13).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        bn = _layer(96, torch.float32)
        xi = x.clone().requires_grad_()
        batch_norm_act(xi, bn, "relu").backward(grad)
        results.append((bn.running_mean.clone(), bn.running_var.clone(), bn.weight.grad.clone(),
                        xi.grad.clone()))
    torch.set_num_threads(1)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_compile_matches_eager():
    """torch.compile of a zoo conv-BN-ReLU unit in training mode equals the reference path
    (output, gradients, running statistics): inductor gets PyTorch's BatchNorm to fuse itself.
    The operator compiles too, called directly: forward and backward equal eager."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    block = ConvBnAct(nn.Conv2d(3, 8, 3, padding=1, bias=False), 8, "relu").double().train()
    reference = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=record)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    y = compiled(x)
    y.square().sum().backward()
    with butterfly.use_backend("reference"):
        y_ref = reference(x)
        y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(block.conv.weight.grad, reference.conv.weight.grad)
    torch.testing.assert_close(block.bn.running_var, reference.bn.running_var)
    assert block.bn.num_batches_tracked.item() == 1
    assert graphs and "batch_norm_act" not in graphs[0] and "batch_norm" in graphs[0]

    def f(x, w, b):
        return torch.ops.butterfly.batch_norm_act(x, w, b, 1e-5, "hardswish")[0].square().sum()
    x = torch.randn(3, 5, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (torch.rand(5) + 0.5).requires_grad_(), torch.rand(5).requires_grad_()
    grads = [torch.autograd.grad(fn(x, w, b), (x, w, b)) for fn in (f, torch.compile(f))]
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_)


def test_fallbacks_and_errors():
    bn = _layer(4, torch.float32)
    x = torch.randn(2, 4, 3, 3)
    with butterfly.use_backend("reference"):
        assert not kernel_runs(x, bn)
    assert not kernel_runs(x.bfloat16(), bn)
    # bfloat16 runs PyTorch's BatchNorm (and its rules) instead
    bf = copy.deepcopy(bn).bfloat16()
    assert batch_norm_act(x.bfloat16(), bf, "relu").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 4, 1, 1), bn, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        batch_norm_act(x, bn, "gelu")
    with pytest.raises(ValueError, match="expected input with 4 channels"):
        batch_norm_act(torch.randn(2, 5, 3, 3), bn, "relu")
    # eval mode: running statistics, PyTorch's path
    bn.eval()
    torch.testing.assert_close(batch_norm_act(x, bn, "relu6"), bn(x).clamp(0, 6))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_as_in_pytorch(activation):
    """A NaN in a channel makes its statistics NaN; the outputs and gradients are NaN where
    PyTorch's are (a diverged run must not look finite)."""
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    grad = torch.randn_like(x)
    bn, ref = _layer(3, torch.float32), _layer(3, torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = batch_norm_act(xa, bn, activation), activate(ref(xb), activation)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y[:, 1].isnan().any()
    assert torch.equal(xa.grad.isnan(), xb.grad.isnan())
    assert torch.equal(bn.running_mean.isnan(), ref.running_mean.isnan())


def test_double_backward():
    """Second derivatives (gradient penalties) go through PyTorch's differentiable BatchNorm:
    gradgradcheck on the operator, and a create_graph gradient through the eager path equals
    PyTorch's."""
    for activation in ("relu", "hardswish"):
        x = (torch.randn(3, 4, 3, 5, dtype=torch.float64) + 0.3).requires_grad_()
        bn = _layer(4, torch.float64)
        w, b = bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: torch.ops.butterfly.batch_norm_act(x, w, b, 1e-5, activation)[0],
            (x, w, b))
        ref = copy.deepcopy(bn)
        g, = torch.autograd.grad(batch_norm_act(x, bn, activation).square().sum(), x,
                                 create_graph=True)
        g_ref, = torch.autograd.grad(activate(ref(x), activation).square().sum(), x,
                                     create_graph=True)
        torch.testing.assert_close(g, g_ref)
        ww, = torch.autograd.grad(g.square().sum(), bn.weight)
        ww_ref, = torch.autograd.grad(g_ref.square().sum(), ref.weight)
        torch.testing.assert_close(ww, ww_ref)
