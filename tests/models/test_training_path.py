"""The zoo's training path: depthwise convs run ``butterfly::depthwise_conv`` (the C++ kernels on
CPU) and BFT layers the BFT kernel, and both give the gradients, BatchNorm statistics and loss
curve of the pure-PyTorch reference path (``use_backend("reference")``, the oracle)."""
import copy

import pytest
import timm
import torch
from torch import nn

import butterfly
from butterfly.nn.depthwise import DepthwiseConv2d
from butterfly.ops.depthwise import kernel_available

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernel_available(), reason="the C++ kernels did not build")]

FAMILIES = ["mobilenetv1_bft_100", "mobilenetv2_bft_100", "mobilenetv3_small_bft_050",
            "shufflenetv2_bft_125", "mobilenetv1_025", "shufflenetv2_050"]


def _rel(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, small_input=True, in_chans=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_depthwise_convs_run_the_operator(name):
    model = _model(name)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(isinstance(m, DepthwiseConv2d) and m.runs_operator()
                             for m in depthwise)
    # the state_dict is the one an nn.Conv2d model has: old checkpoints load
    plain = copy.deepcopy(model)
    for m in plain.modules():
        for child_name, child in m.named_children():
            if isinstance(child, DepthwiseConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 child.stride, child.padding, groups=child.groups, bias=False)
                setattr(m, child_name, conv)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 29, 27)
    with torch.no_grad():
        assert _rel(model.eval()(x), plain.eval()(x)) < 1e-5


def _step_grads(name: str, fmt, dtype, backend: str, x: torch.Tensor):
    """Parameter gradients and buffers after one training-mode forward and backward."""
    model = _model(name).to(dtype=dtype, memory_format=fmt).train()
    with butterfly.use_backend(backend):
        out = model(x.to(dtype).contiguous(memory_format=fmt))
        (out * torch.linspace(-1, 1, 10, dtype=dtype)).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    buffers = {n: b.double() for n, b in model.named_buffers() if b.is_floating_point()}
    return grads, buffers


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_equal_the_reference_path(name, fmt):
    """One training-mode step, batch 1 at an odd size (stride-2 blocks round up), through the
    kernels and through the reference. float64: equal to 1e-9. float32: a batch-1 BatchNorm
    network amplifies rounding, and a gradient that is tiny next to the others (near zero in
    exact arithmetic) is all rounding in either path, so float32 errors are measured in the
    scale of the largest gradient (the size an update sees). There the kernels must be within
    1e-3 of float64, or within twice the float32 reference's own error where rounding makes that
    larger (a ReLU that flips: the reference is up to ~1e-2 off on some families). A float32
    kernel bug (a wrong tail, a wrong accumulator) shows as errors of order 1e-1 and more, on
    every input; a flip (an activation within rounding of a ReLU's kink: one of ~10^5 takes the
    other side in one path and not in the other) shows on few, so the float32 check holds for
    at least two of three inputs."""
    x = torch.randn(1, 1, 45, 37)
    want, want_buffers = _step_grads(name, fmt, torch.float64, "reference", x)
    got, got_buffers = _step_grads(name, fmt, torch.float64, "auto", x)
    # some gradients are zero up to rounding (a BatchNorm bias followed by a linear layer and a
    # training-mode BatchNorm, which removes any constant): relative to 1e-6 of the largest
    largest = max(g.abs().max().item() for g in want.values())
    floor = 1e-6 * largest
    for n in want:
        assert _rel(got[n], want[n], floor) < 1e-9, n
    for n in want_buffers:   # running means can be zero up to rounding too (after a BatchNorm)
        assert _rel(got_buffers[n], want_buffers[n], 1e-6) < 1e-9, n
    errors = []  # (float32 kernels' error, float32 reference's error) against float64
    for x in (x, torch.randn(1, 1, 45, 37), torch.randn(1, 1, 45, 37)):
        want, _ = _step_grads(name, fmt, torch.float64, "reference", x)
        largest = max(g.abs().max().item() for g in want.values())
        got32, _ = _step_grads(name, fmt, torch.float32, "auto", x)
        ref32, _ = _step_grads(name, fmt, torch.float32, "reference", x)
        errors.append((max(_rel(got32[n], want[n], 1e-3 * largest) for n in want),
                       max(_rel(ref32[n], want[n], 1e-3 * largest) for n in want)))
    assert sum(err <= max(2 * ref_err, 1e-3) for err, ref_err in errors) >= 2, errors


def test_a_few_steps_follow_the_reference_loss_curve():
    """Five SGD steps (momentum, weight decay, BatchNorm updating its running statistics) through
    the kernels and through the reference give the same losses and running statistics, in
    float64 (in float32 random-label steps at this rate are chaotic: rounding grows step by
    step whichever path runs)."""
    curves, models = [], []
    for backend in ("auto", "reference"):
        model = _model("mobilenetv1_bft_100").double().train()
        opt = torch.optim.SGD(butterfly.param_groups(model, 1e-5), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        losses = []
        with butterfly.use_backend(backend):
            for _ in range(5):
                x = torch.randn(8, 1, 28, 28, generator=g, dtype=torch.float64)
                y = torch.randint(0, 10, (8,), generator=g)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        curves.append(losses)
        models.append(model)
    assert curves[0] == pytest.approx(curves[1], rel=1e-9)
    for m_got, m_want in zip(models[0].modules(), models[1].modules()):
        if isinstance(m_got, nn.BatchNorm2d):
            assert _rel(m_got.running_mean, m_want.running_mean, 1e-6) < 1e-8
            assert _rel(m_got.running_var, m_want.running_var) < 1e-8
            assert m_got.num_batches_tracked == m_want.num_batches_tracked == 5


def test_double_backward_equals_the_reference_path():
    """A gradient penalty (create_graph=True, then backward) through a zoo model in training
    mode: the kernels have no second derivative, so their backward switches to PyTorch's
    differentiable formulas and the result equals the reference path's (float64)."""
    results = []
    for backend in ("auto", "reference"):
        model = _model("mobilenetv1_bft_100").double().train()
        x = torch.randn(2, 1, 21, 19, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3)).requires_grad_()
        with butterfly.use_backend(backend):
            out = model(x)
            g, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
            g.square().sum().backward()
        results.append({n: p.grad for n, p in model.named_parameters()})
    got, want = results
    floor = 1e-6 * max(v.abs().max().item() for v in want.values())
    for n in want:
        assert _rel(got[n], want[n], floor) < 1e-8, n
