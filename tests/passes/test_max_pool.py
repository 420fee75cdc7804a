"""The max-pool kernel (``butterfly_cpu::max_pool_cl``, csrc/graph/graph_ops_cpu.cpp) and the fused
layer that runs it (``FusedMaxPool``) against ``torch.nn.functional.max_pool2d``: kernel sizes
2-5, strides 1-3, every legal padding, odd sizes, channel counts below, at and past a vector
(a last vector that overlaps the one before), batch 1 and 3, float32 and float64, NaN, 1 and 2
threads; which pools fusion swaps; the fallbacks."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import butterfly
from butterfly.passes.fuse import FusedMaxPool, fuse

CL = torch.channels_last


# every test: the kernels built, one thread to start with (the count restored after it)
pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")


def _image(n, c, h, w, dtype=torch.float32):
    return torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (2, 2, 0), (3, 3, 0), (5, 2, 2),
                                   (4, 3, 1)])
def test_kernel_equals_max_pool2d(k, s, p, dtype):
    for c, (h, w), n, threads in itertools.product((1, 5, 16, 24, 37), ((7, 9), (12, 11), (5, 5)),
                                                   (1, 3), (1, 2)):
        torch.set_num_threads(threads)
        x = _image(n, c, h, w, dtype)
        got = torch.ops.butterfly_cpu.max_pool_cl(x, k, s, p)
        want = F.max_pool2d(x, k, s, p)
        assert got.is_contiguous(memory_format=CL) and got.dtype == dtype
        assert torch.equal(got, want), (k, s, p, c, h, w, n)


@pytest.mark.parametrize("c", [3, 16, 24])
def test_nan_propagates(c):
    x = _image(2, c, 8, 8)
    x[0, 1, 3, 4] = float("nan")
    x[1, c - 1, 0, 0] = float("nan")
    got = torch.ops.butterfly_cpu.max_pool_cl(x, 3, 2, 1)
    want = F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_kernel_refuses_bad_input():
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.butterfly_cpu.max_pool_cl(torch.randn(1, 4, 5, 5), 3, 2, 1)
    with pytest.raises(RuntimeError, match="padding"):
        torch.ops.butterfly_cpu.max_pool_cl(_image(1, 4, 5, 5), 3, 2, 2)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        torch.ops.butterfly_cpu.max_pool_cl(_image(1, 4, 2, 2), 5, 1, 1)


def test_fusion_swaps_the_pools_it_computes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(3, 2, 1),
                          nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(3, 1, 1, dilation=2),
                          nn.MaxPool2d((3, 2))).eval()
    x = _image(2, 3, 21, 21)
    result = fuse(model.to(memory_format=CL), x)
    kinds = [type(m) for m in result.model.children()][1:]
    assert kinds == [FusedMaxPool, nn.MaxPool2d, nn.MaxPool2d, nn.MaxPool2d]
    assert result.pools == ["1"]
    with torch.inference_mode():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_fused_pool_falls_back_to_pytorch():
    pool = FusedMaxPool(3, 2, 1)
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 2, 1))   # NCHW
    xc = x.contiguous(memory_format=CL).requires_grad_()
    y = pool(xc)   # needs gradients: PyTorch's pool, which has them
    y.sum().backward()
    torch.testing.assert_close(xc.grad, torch.func.grad(lambda t: F.max_pool2d(t, 3, 2, 1).sum())(
        x.contiguous(memory_format=CL)))
    with butterfly.use_backend("reference"), torch.no_grad():
        assert torch.equal(pool(xc), F.max_pool2d(xc, 3, 2, 1))
    compiled = torch.compile(pool, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(xc), F.max_pool2d(xc, 3, 2, 1))
