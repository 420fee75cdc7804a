"""Dense equivalents (to_conv2d, to_linear, densify) and optimize_for_inference."""
import pytest
import torch
from torch import nn

import butterfly
from oracle import SHAPE_CLASSES
from butterfly.passes.optimize import time_call
from butterfly.nn.bft import dense_equivalent

# a BFT refuses one input or output channel (see test_layer.py), so that class has no dense form
SHAPES = {name: shape for name, shape in SHAPE_CLASSES.items() if min(shape[:2]) > 1}
F64 = {"dtype": torch.float64}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_to_conv2d_is_exact(shape, residual, bias):
    c_in, c_out, base = shape
    layer = butterfly.BFT(c_in, c_out, base=base, residual=residual, bias=bias, **F64)
    if bias:
        nn.init.normal_(layer.bias)
    conv = layer.to_conv2d()
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert conv.weight.dtype == torch.float64 and (conv.bias is not None) == bias
    x = torch.randn(2, c_in, 3, 5, **F64)
    torch.testing.assert_close(conv(x), layer(x), rtol=0, atol=1e-12)
    cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(conv(cl), layer(cl), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [SHAPES["mixed-radix"], SHAPES["expand-padded"],
                                   SHAPES["contract-padded"]])
def test_to_linear_is_exact(shape):
    c_in, c_out, base = shape
    layer = butterfly.BFTLinear(c_in, c_out, base=base, bias=True, **F64)
    nn.init.normal_(layer.bias)
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (c_in, c_out)
    x = torch.randn(3, 4, c_in, **F64)
    torch.testing.assert_close(lin(x), layer(x), rtol=0, atol=1e-12)


def _bft_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), butterfly.BFT(16, 40, bias=True), nn.ReLU(),
        nn.Sequential(butterfly.BFT(40, 24), nn.BatchNorm2d(24), butterfly.BFT(24, 13)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), butterfly.BFTLinear(13, 10, bias=True))


def test_densify_replaces_every_bft_and_keeps_outputs():
    net = _bft_net().double().eval()
    x = torch.randn(2, 3, 8, 8, **F64)
    want = net(x)
    copy = butterfly.densify(net, inplace=False)
    assert sum(butterfly.is_bft(m) for m in net.modules()) == 4  # original untouched
    same = butterfly.densify(net)
    assert same is net and copy is not net
    for model in (net, copy):
        assert not any(butterfly.is_bft(m) for m in model.modules())
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    assert isinstance(net[-1], nn.Linear) and isinstance(net[3][2], nn.Conv2d)


def test_densify_a_bare_layer_returns_the_dense_layer():
    layer = butterfly.BFT(8, 8)
    assert isinstance(butterfly.densify(layer), nn.Conv2d)
    with pytest.raises(TypeError, match="BFT or BFTLinear"):
        dense_equivalent(nn.Conv2d(8, 8, 1))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _bft_net()
        self.unused = butterfly.BFT(4, 4)  # never called: stays a BFT, not in the report

    def forward(self, x):
        return self.body(x)


def test_optimize_for_inference_keeps_outputs_and_reports_times(capsys):
    net = _WithUnused()
    net.train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = net.eval()(x)
    out, report = butterfly.optimize_for_inference(net, x, fuse=False, inplace=False,
                                                   min_run_time=0.002)
    assert not out.training
    assert sum(butterfly.is_bft(m) for m in net.modules()) == 5  # inplace=False
    assert [c.name for c in report] == ["body.1", "body.3.0", "body.3.2", "body.6"]
    for c in report:
        assert c.bft_ms > 0 and c.dense_ms > 0 and c.speedup >= 1
        assert c.chosen == ("dense" if c.dense_ms < c.bft_ms else "bft")
        assert butterfly.is_bft(out.get_submodule(c.name)) == (c.chosen == "bft")
    assert report[0].input_shape == (4, 16, 8, 8) and report[-1].input_shape == (4, 13)
    assert butterfly.is_bft(out.unused)
    with torch.no_grad():
        torch.testing.assert_close(out(x), want, rtol=1e-5, atol=1e-5)
    print(report)
    text = capsys.readouterr().out
    assert "body.3.2" in text and "24->13" in text and "dense ms" in text


def test_optimize_for_inference_picks_the_faster(monkeypatch):
    """The choice follows the measured times: pretend dense is always faster, then slower."""
    import butterfly.passes.optimize as deploy
    x = torch.randn(2, 16, 4, 4)
    for dense_faster in (True, False):
        def fake_time(fn, inp, min_run_time=0.0, warmup=0):
            return 1.0 if butterfly.is_bft(fn) != dense_faster else 2.0
        monkeypatch.setattr(deploy, "time_call", fake_time)
        net = nn.Sequential(butterfly.BFT(16, 16))
        out, report = butterfly.optimize_for_inference(net, x, fuse=False)
        assert isinstance(out[0], nn.Conv2d) == dense_faster
        assert report[0].chosen == ("dense" if dense_faster else "bft")


def test_time_call_measures():
    x = torch.randn(8, 8)
    t = time_call(torch.relu, x, min_run_time=0.001)
    assert 0 < t < float("inf")


def test_optimized_layers_are_plain_attributes_and_stay_replaceable():
    """optimize_for_inference exposes the fused graph's submodules as ordinary attributes (its
    forward skips nn.Module.__getattr__); assignment still replaces them, and pickling keeps the
    outputs."""
    import io
    import timm
    model = timm.create_model("mobilenetv1_bft_100", num_classes=5, small_input=True).eval()
    x = torch.randn(1, 3, 32, 32)
    out, _ = butterfly.optimize_for_inference(model, x, min_run_time=1e-4)
    for module in out.modules():
        for name, child in module._modules.items():
            assert module.__dict__[name] is child
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(out(x), want, rtol=1e-4, atol=1e-4)
        buffer = io.BytesIO()
        torch.save(out, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), out(x))
        ones = nn.Linear(out.classifier.in_features, 5)
        nn.init.zeros_(ones.weight)
        nn.init.ones_(ones.bias)
        out.set_submodule("classifier", ones)
        assert out.classifier is ones and torch.equal(out(x), torch.ones(1, 5))
