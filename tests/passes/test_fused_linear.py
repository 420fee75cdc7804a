"""The linear layer on a few rows (``butterfly_cpu::linear_rows``, csrc/graph/graph_ops_cpu.cpp)
and the fused layer that runs it (``FusedLinear``) against ``F.linear``: input features below,
at and past a vector (a masked last vector), output features below, at and past a block, 1-8
rows (pairs and a last single row), bias or none, float32 and float64, 1 and 2 threads; which
layers fusion swaps; the fallbacks; the choice by measurement."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import butterfly
import butterfly.passes.optimize as optimize
from butterfly.passes.fuse import FusedLinear, fuse


# every test: the kernels built, one thread to start with (the count restored after it)
pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")


def op(*args):
    return torch.ops.butterfly_cpu.linear_rows(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_linear(dtype, threads):
    torch.set_num_threads(threads)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for i, o, r, bias in itertools.product((1, 7, 16, 17, 40, 1024), (1, 7, 8, 9, 100),
                                           (1, 2, 3, 8), (True, False)):
        x, w = torch.randn(r, i, dtype=dtype), torch.randn(o, i, dtype=dtype)
        b = torch.randn(o, dtype=dtype) if bias else None
        got = op(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=tol, atol=tol * i ** 0.5,
                                   msg=lambda m: f"{(i, o, r, bias)}: {m}")


def test_nan_and_empty_inputs():
    x, w, b = torch.randn(2, 20), torch.randn(9, 20), torch.randn(9)
    x[1, 3] = float("nan")
    got = op(x, w, b)
    assert got[1].isnan().all() and not got[0].isnan().any()
    assert op(torch.randn(0, 20), w, b).shape == (0, 9)
    torch.testing.assert_close(op(torch.randn(3, 0), torch.randn(9, 0), b), b.expand(3, 9))
    assert torch.equal(op(torch.randn(3, 0), torch.randn(9, 0), None), torch.zeros(3, 9))


def test_kernel_refuses_bad_input():
    x, w = torch.randn(2, 20), torch.randn(9, 20)
    with pytest.raises(RuntimeError, match=r"\(rows, in_features\)"):
        op(torch.randn(2, 3, 20), w, None)
    with pytest.raises(RuntimeError, match=r"weight \(out_features, 20\)"):
        op(x, torch.randn(9, 21), None)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, w.double(), None)
    with pytest.raises(RuntimeError, match="bias of 9 values"):
        op(x, w, torch.randn(8))
    torch.library.opcheck(torch.ops.butterfly_cpu.linear_rows.default, (x, w, torch.randn(9)))


def test_fusion_swaps_linears_on_two_dimensional_inputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    x = torch.randn(2, 3, 9, 9)
    result = fuse(model, x)
    assert result.linears == ["3", "5"]
    assert all(type(result.model.get_submodule(n)) is FusedLinear for n in result.linears)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)   # kernel off
    tokens = nn.Sequential(nn.Linear(8, 4)).eval()   # a 3-d input stays nn.Linear
    assert fuse(tokens, torch.randn(2, 5, 8)).linears == []


def test_fused_linear_falls_back_to_pytorch(monkeypatch):
    layer = FusedLinear.of(nn.Linear(32, 10))
    calls = []
    real = torch.ops.butterfly_cpu.linear_rows
    monkeypatch.setattr(torch.ops.butterfly_cpu, "linear_rows",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    layer.rows_kernel = True
    with torch.no_grad():
        x = torch.randn(4, 32)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert calls == [(4, 32)]
        for other in (torch.randn(9, 32), torch.randn(2, 3, 32)):   # too many rows, 3-d
            torch.testing.assert_close(layer(other), F.linear(other, layer.weight, layer.bias))
        with butterfly.use_backend("reference"):
            layer(x)
        assert len(calls) == 1
    y = layer(x.requires_grad_())   # gradients: PyTorch's, which has them
    y.sum().backward()
    assert x.grad is not None and len(calls) == 1
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.detach()), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kernel_faster", [True, False])
def test_optimize_keeps_the_faster_and_reports_it(monkeypatch, kernel_faster):
    def fake_time(fn, inp, min_run_time=0.0, warmup=0):
        if isinstance(fn, FusedLinear):
            return 1.0 if fn.rows_kernel == kernel_faster else 2.0
        return 1.0
    monkeypatch.setattr(optimize, "time_call", fake_time)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    out, report = butterfly.optimize_for_inference(model, x)
    (choice,) = report.linear
    assert choice.chosen == ("kernel" if kernel_faster else "torch")
    assert out.get_submodule(choice.name).rows_kernel == kernel_faster
    assert f"linear layers: {int(kernel_faster)} of 1 on the few-rows kernel" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)
