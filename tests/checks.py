"""Checks shared by several test files (they run our operator; the oracles are in oracle.py)."""
import torch

from butterfly import use_backend
from butterfly.plan import make_plan


def double_backward_check(cin, cout, base, residual, backend):
    """gradcheck and gradgradcheck of the operator in float64: the backward of the backward
    (``butterfly::bft_backward`` is differentiable) in every input and weight direction."""
    plan = make_plan(cin, cout, base)
    x = torch.randn(2, cin, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(plan.num_blocks, plan.weights_per_block, dtype=torch.float64) / 2)
    w.requires_grad_()

    def f(x, w):
        return torch.ops.butterfly.bft(x, w, list(plan.radices), cout, residual)

    with use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, w))
        assert torch.autograd.gradgradcheck(f, (x, w))
