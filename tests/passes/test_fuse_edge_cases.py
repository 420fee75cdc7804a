"""Fused inference on what a hostile tester feeds it: non-finite values, broadcast additions,
'same' padding, 1x1 images, shared layers, pickling, counting and export. Every fused result is
compared with the eval-mode model on the pure-PyTorch reference."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import butterfly
from butterfly.models import registered_models
from butterfly.passes.fuse import FusedConv, FusedDepthwiseBFT, fuse, merge_separable

ROOT = Path(__file__).resolve().parents[2]
ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6,
               "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid}


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _block(act: str, positive: bool) -> nn.Module:
    """A dense conv, a depthwise conv and a BFT, each with BatchNorm and ``act``: the oneDNN, the
    depthwise kernel's, the BFT epilogue's and the one-pass block's activations. ``positive``
    weights carry an infinity through every layer with its sign (random signs meet as NaN)."""
    a = ACTIVATIONS[act]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), a(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), a(),
        butterfly.BFT(16, 16), nn.BatchNorm2d(16), a())
    if positive:
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
    return _randomize_batchnorms(model)


def _non_finite_input(fmt, positive: bool) -> torch.Tensor:
    x = torch.randn(2, 8, 9, 9)
    x[1, 5, 4, 4] = -float("inf")
    x[1, 0, 0, 8] = float("inf")
    if not positive:
        x[0, 1, 2, 2] = float("nan")
        x[0, 3, 6, 6] = float("inf")
    return x.contiguous(memory_format=fmt)


def _same_non_finite(got: torch.Tensor, want: torch.Tensor) -> None:
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(got), kind(want)), f"{kind.__name__}: " \
            f"{int(kind(got).sum())} against {int(kind(want).sum())}"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positive", [False, True], ids=["nan", "signed-inf"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_fused_layers_keep_nan_and_inf(act, fmt, positive):
    """Every fused path propagates NaN and Inf as the eval-mode model does: oneDNN's convolution
    (whose relu, relu6 and hardsigmoid post-ops turned NaN into numbers), the depthwise kernel,
    the BFT kernel's epilogue, the one-pass block, and the reference backend."""
    model = _block(act, positive)
    x = _non_finite_input(fmt, positive)
    with torch.no_grad(), butterfly.use_backend("reference"):
        want = model(x)
    assert torch.isinf(want).any() if positive and act in ("none", "relu") else \
        torch.isnan(want).any() or positive
    gm = fuse(model, x).model
    with torch.no_grad():
        for backend in ("cpu", "reference"):
            with butterfly.use_backend(backend):
                _same_non_finite(gm(x), want)
        for m in gm.modules():   # the depthwise conv on PyTorch's (oneDNN's) convolution
            if isinstance(m, FusedConv) and m.depthwise:
                m.depthwise = False
        _same_non_finite(gm(x), want)
        assert merge_separable(gm) or fmt == torch.contiguous_format
        for m in gm.modules():
            if isinstance(m, FusedDepthwiseBFT):
                m.dw.depthwise = True
        _same_non_finite(gm(x), want)


class _Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.bft = butterfly.BFT(16, 16)
        self.pos = nn.Parameter(torch.randn(1, 16, 8, 8))

    def forward(self, x):
        return self.bft(x) + self.pos


def test_a_broadcast_add_fused_from_a_batch_of_one_runs_at_any_batch():
    model = _Positional().eval()
    fused, _ = butterfly.optimize_for_inference(model, torch.randn(1, 16, 8, 8),
                                                min_run_time=1e-4)
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_bft", [True, False])
@pytest.mark.parametrize("groups", [1, 16], ids=["dense", "depthwise"])
def test_same_padding(with_bft, groups):
    layers = [nn.Conv2d(16, 16, 3, padding="same", groups=groups), nn.ReLU()]
    model = nn.Sequential(*layers, *([butterfly.BFT(16, 16)] if with_bft else [])).eval()
    x = torch.randn(2, 16, 7, 7)
    fused, _ = butterfly.optimize_for_inference(model, x, min_run_time=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 1)
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x))


def test_a_layer_shared_under_two_names_is_replaced_under_both():
    model, names = butterfly.replace_pointwise(_Shared())
    assert names == ["a", "b"] and model.a is model.b and butterfly.is_bft(model.a)
    converted, _ = butterfly.convert(_Shared(), inplace=False)
    assert converted.a is converted.b and butterfly.is_bft(converted.a)
    dense = butterfly.densify(model, inplace=False)
    assert dense.a is dense.b and isinstance(dense.a, nn.Conv2d)


def test_non_finite_weights_or_calibration_data_are_named():
    conv = nn.Conv2d(16, 16, 1)
    with torch.no_grad():
        conv.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight holds NaN or Inf"):
        butterfly.from_dense(conv)
    calib = torch.randn(4, 16, 5, 5)
    calib[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration data"):
        butterfly.convert(nn.Sequential(nn.Conv2d(16, 16, 1)), calib_data=calib)


def test_backward_runs_on_the_forwards_backend():
    """A forward under use_backend("reference") with backward() outside the block gets the
    reference's gradients, not the kernel's."""
    layer = butterfly.BFT(16, 16).double()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    spy = []
    original = butterfly.ops.dispatch.backend_for

    def recording(device, *args, **kwargs):
        backend = original(device, *args, **kwargs)
        spy.append(backend.name)
        return backend

    butterfly.ops.bft.backend_for = recording
    try:
        with butterfly.use_backend("reference"):
            y = layer(x)
        spy.clear()
        y.sum().backward()
    finally:
        butterfly.ops.bft.backend_for = original
    assert spy == ["reference"]


def test_fused_models_are_counted_or_refused():
    """FlopCounterMode counts a fused model's operators (BFT layers fused, not made dense by a
    timing choice, so the count must equal the model's; the one-pass blocks too)."""
    model = timm.create_model("mobilenetv1_bft_100", num_classes=10, small_input=True).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused = fuse(model, x).model
    assert merge_separable(fused)
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            model(x)
        with FlopCounterMode(display=False) as counted:
            fused(x)
    assert counted.get_total_flops() == plain.get_total_flops()
    with pytest.raises(TypeError, match="before optimize_for_inference"):
        butterfly.flops.count_macs(fused, (3, 32, 32))
    with pytest.raises(TypeError, match="before optimize_for_inference"):
        butterfly.export_onnx(fused, x, "fused.onnx")


def test_a_saved_fused_model_runs_in_a_fresh_process(tmp_path):
    model = timm.create_model("mobilenetv1_bft_100", num_classes=10, small_input=True).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused, _ = butterfly.optimize_for_inference(model, x, min_run_time=1e-4)
    with torch.no_grad():
        want = fused(x)
    torch.save({"model": fused, "x": x, "want": want}, tmp_path / "fused.pt")
    pickle.dumps(fused)   # the kernel-argument cache is not part of the pickle
    code = ("import torch\n"
            f"d = torch.load({str(tmp_path / 'fused.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n"
            "    torch.testing.assert_close(d['model'](d['x']), d['want'])\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                            "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# Every zoo model, optimised at small sizes with random weights, both formats; then called at
# another batch size and resolution than the example's.
# 33 px reaches 1x1 images in every family (33, 17, 9, 5, 3, 2, 1); 17 and 32 are slow.
SIZES = [pytest.param(17, marks=pytest.mark.slow), pytest.param(32, marks=pytest.mark.slow), 33]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("name", registered_models())
def test_every_zoo_model_optimises_and_runs_at_other_shapes(name, fmt, size):
    torch.manual_seed(0)
    model = _randomize_batchnorms(timm.create_model(name, num_classes=10))
    x = torch.randn(1, 3, size, size).contiguous(memory_format=fmt)
    fused, _ = butterfly.optimize_for_inference(model, x, min_run_time=1e-5)
    with torch.no_grad():
        for batch, other in ((1, size), (3, size), (3, 28)):
            y = torch.randn(batch, 3, other, other).contiguous(memory_format=fmt)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-3, atol=1e-3,
                                       msg=f"{name} optimised at {size}, run at {batch}x{other}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenetv2_bft_125", "mobilenetv3_small_bft_050"])
def test_zoo_models_at_224(name):
    torch.manual_seed(0)
    model = _randomize_batchnorms(timm.create_model(name, num_classes=10))
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 3, 224, 224).contiguous(memory_format=fmt)
        fused, _ = butterfly.optimize_for_inference(model, x, min_run_time=1e-4)
        with torch.no_grad():
            for y in (x, torch.randn(3, 3, 64, 64).contiguous(memory_format=fmt)):
                torch.testing.assert_close(fused(y), model(y), rtol=1e-3, atol=1e-3)
