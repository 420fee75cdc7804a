"""``torch.compile(fullgraph=True)`` traces a BFT network without graph breaks and matches eager.

The operator is a ``torch.library.triton_op``: the compiler traces into the backend chosen for the
tensors' device (on CPU: the C++ kernel's custom ops, or the reference's PyTorch operators).
"""
import copy

import pytest
import torch
from torch import nn

from butterfly import BFT, use_backend


def _net():
    torch.manual_seed(0)
    # expand (two blocks of 16), BN + ReLU, contract with a mixed-radix (4, 3) butterfly
    return nn.Sequential(BFT(16, 24, base=4), nn.BatchNorm2d(24), nn.ReLU(), BFT(24, 12, base=4))


def _run(net, x):
    x = x.clone().requires_grad_()
    y = net(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    return y.detach(), x.grad, grads


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
        want = _run(eager, x)
        got = _run(compiled, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
