"""``torch.compile`` traces BFT networks without graph breaks and matches eager.

The operator is a ``torch.library.triton_op``: the compiler traces into the backend chosen for the
tensors' device (on CPU: the C++ kernel's custom ops, or the reference's PyTorch operators), so
the fake (shape-only) kernels must give every output the strides the real kernels give it, for
any input layout, or compiled code fails its stride assertions.

Compiling takes tens of seconds per graph on a small machine: each test uses few shapes.

A note on ``torch._inductor.config.layout_optimization``: on CPU, Inductor turns the input of every
convolution of a training graph channels-last, and with dynamic shapes (``dynamic=True``, or the
automatic recompile after a second input size) torch 2.14 compiles the backward with the
concrete strides of the example it saw, so the third input size fails its stride assertion in a
plain ``nn.Conv2d`` network too, with no BFT in it. Tests with a convolution switch that
optimisation off (``TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0`` does the same for a whole run).
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import butterfly
from butterfly import BFT, ops, use_backend
from butterfly.ops import dispatch
from butterfly.kernels.cpu import build as cpu
from butterfly.plan import make_plan
from butterfly.ops.reference import bft_reference, bft_reference_backward

CL, NCHW = torch.channels_last, torch.contiguous_format


def _net():
    torch.manual_seed(0)
    # expand (two blocks of 16), BN + ReLU, contract with a mixed-radix (4, 3) butterfly
    return nn.Sequential(BFT(16, 24, base=4), nn.BatchNorm2d(24), nn.ReLU(), BFT(24, 12, base=4))


def _run(net, x):
    x = x.clone().requires_grad_()
    for p in net.parameters():
        p.grad = None
    y = net(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    return y.detach(), x.grad, grads


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _train_like_eager(eager, compiled, inputs):
    for x in inputs:
        got, want = _run(compiled, x), _run(eager, x)
        _assert_same(got, want)
        assert got[0].is_contiguous(memory_format=torch.channels_last) == \
            want[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend, memory_format", [
    ("auto", torch.contiguous_format),
    ("reference", torch.channels_last),
])
def test_compiled_matches_eager(backend, memory_format):
    eager = _net()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(4, 16, 5, 5).to(memory_format=memory_format)
    torch._dynamo.reset()
    with use_backend(backend):
        _assert_same(_run(compiled, x), _run(eager, x))


def test_training_over_sizes_and_memory_formats():
    """Default ``torch.compile``: three input sizes (the second recompiles with dynamic shapes),
    NCHW and channels-last inputs alternating, forward and backward as eager."""
    torch._dynamo.reset()
    eager = _net()
    compiled = torch.compile(copy.deepcopy(eager))
    # 1x1 images in a batch of 8: BatchNorm's statistics over 2 values would make its gradient so
    # ill-conditioned that float32 eager and compiled both land far from float64
    sizes = [((3, 16, 7, 5), NCHW), ((2, 16, 9, 9), CL), ((2, 16, 6, 6), NCHW), ((8, 16, 1, 1), CL),
             ((3, 16, 6, 4), CL)]
    _train_like_eager(eager, compiled, [torch.randn(s).to(memory_format=f) for s, f in sizes])


def test_dynamic_training_after_a_convolution():
    """The reported network (a 3x3 conv, then a BFT), ``dynamic=True``, three sizes and both
    memory formats; layout optimisation off (see the module's docstring)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), BFT(12, 24), nn.ReLU())
    compiled = torch.compile(copy.deepcopy(eager), dynamic=True)
    sizes = [((3, 3, 7, 5), NCHW), ((2, 3, 9, 9), CL), ((2, 3, 6, 6), NCHW), ((2, 3, 6, 6), CL)]
    with torch._inductor.config.patch(layout_optimization=False):
        _train_like_eager(eager, compiled, [torch.randn(s).to(memory_format=f) for s, f in sizes])


# -- fake kernels against the real ones ---------------------------------------------------------

def _layouts(channels):
    """``(B, C, P)`` operator inputs as BFT.forward makes them, with the strides they arrive with:
    NCHW images; channels-last images (P == 1); 1x1 images whose size-1 dimension has a stride
    of C (a channels-last 1x1 image seen as NCHW); a strided view."""
    nchw = torch.randn(2, channels, 5, 7)
    cl = torch.randn(3, channels, 4, 2).to(memory_format=torch.channels_last)
    one = torch.randn(4, channels, 1, 1).to(memory_format=torch.channels_last)
    return {
        "nchw": nchw.reshape(2, channels, 35),
        "channels-last": cl.permute(0, 2, 3, 1).reshape(24, channels, 1),
        "1x1, stride C on the size-1 dim": one.reshape(4, channels, 1),
        "strided": torch.randn(channels, 3, 5).transpose(0, 1),
    }


def _fake_outputs(op, *args):
    with FakeTensorMode() as mode:
        out = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cin,cout", [(12, 24), (24, 12)])
def test_fake_kernels_give_the_real_strides(backend, cin, cout):
    plan = make_plan(cin, cout, 4)
    radices = list(plan.radices)
    w = torch.randn(plan.num_blocks, plan.weights_per_block)
    ops_to_check = [torch.ops.butterfly.bft, torch.ops.butterfly.bft_backward]
    if backend == "cpu":
        assert cpu.load_extension() is not None, "the CPU kernel did not build"
        ops_to_check += [torch.ops.butterfly_cpu.forward, torch.ops.butterfly_cpu.backward]
    with use_backend(backend):
        for name, x in _layouts(cin).items():
            g = torch.randn(x.shape[0], cout, x.shape[2])
            for op in ops_to_check:
                is_backward = "backward" in str(op)
                args = (g, x, w) if is_backward else (x, w)
                args = args + (radices, cout, True)
                real = op(*args)
                real = real if isinstance(real, tuple) else (real,)
                for r, f in zip(real, _fake_outputs(op, *args)):
                    assert (r.shape, r.stride()) == (f.shape, f.stride()), (op, name)
                    assert r.is_contiguous()
                if op is torch.ops.butterfly.bft:
                    torch.testing.assert_close(real[0], bft_reference(x, w, radices, cout, True))
                elif op is torch.ops.butterfly.bft_backward:
                    for r, e in zip(real, bft_reference_backward(g, x, w, radices, cout, True)):
                        torch.testing.assert_close(r, e, rtol=1e-4, atol=1e-5)


# -- the backend choice ---------------------------------------------------------------------------

@pytest.fixture
def spy_backend():
    """A backend whose forward adds 1 to the reference's: which one a compiled graph runs shows."""
    ops.register_backend(ops.Backend(
        "spy", lambda x, w, r, o, res: bft_reference(x, w, r, o, res) + 1, bft_reference_backward))
    yield "spy"
    del dispatch._BACKENDS["spy"]


def test_compiled_graphs_follow_use_backend(spy_backend):
    """The compiler decomposes the operator into the chosen backend's kernels; the graph is
    guarded on the choice, so under another use_backend() it is traced again, not reused."""
    torch._dynamo.reset()
    layer = BFT(8, 8)
    x = torch.randn(2, 8, 3, 3)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        with use_backend("reference"):
            want = layer(x)
            torch.testing.assert_close(compiled(x), want)
        with use_backend(spy_backend):
            torch.testing.assert_close(compiled(x), want + 1)
        with use_backend("reference"):
            torch.testing.assert_close(compiled(x), want)
        assert butterfly.current_backend() == "auto"
