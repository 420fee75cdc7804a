"""The fused inference path: butterfly.passes.fuse.fuse and optimize_for_inference(fuse=True).

Every fused model is compared with the eval-mode original (the oracle), with random BatchNorm
statistics so that a fold that ignored them would show."""
import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import butterfly
from butterfly.ops.bft_fused import ACTIVATIONS, Epilogue, apply_epilogue, bft_fused
from butterfly.passes.fuse import FusedBFT, FusedConv, fuse
from butterfly.ops.reference import bft_reference

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = ["mobilenetv1_025", "mobilenetv1_bft_100", "mobilenetv2_bft_100", "mobilenetv3_small_035",
       "mobilenetv3_small_bft_050", "shufflenetv2_050", "shufflenetv2_bft_125"]


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(model: nn.Module, x: torch.Tensor, tol: float) -> "butterfly.passes.fuse.FusionResult":
    model = _randomize_bn(model)
    before = copy.deepcopy(model.state_dict())
    result = fuse(model, x)
    with torch.no_grad():
        want = model(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = result.model(x.contiguous(memory_format=fmt))
            assert got.shape == want.shape
            assert _rel(got, want) < tol, fmt
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    return result


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_fuse_exactly_in_float32(name):
    model = timm.create_model(name, num_classes=10)
    result = _check(model, torch.randn(1, 3, 45, 37), 1e-5)   # batch 1, odd sizes, stride 2
    kinds = {f.kind for f in result.fused}
    assert ("BFT" in kinds) == ("_bft_" in name) and "conv" in kinds
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert result.unfused == []
    # every depthwise conv runs the depthwise kernel with its BatchNorm and activation folded in
    depthwise = [m for m in result.model.modules() if isinstance(m, FusedConv) and m.groups > 1]
    assert depthwise and all(m.depthwise for m in depthwise)
    if "mobilenetv2" in name or "mobilenetv3" in name:   # inverted residuals: the skip fuses
        assert any(f.epilogue.endswith("add") for f in result.fused)


@pytest.mark.parametrize("name", ["mobilenetv1_bft_100", "mobilenetv3_small_bft_050",
                                  "shufflenetv2_bft_125"])
def test_zoo_models_fuse_tightly_in_float64(name):
    model = timm.create_model(name, num_classes=10, small_input=True).double()
    _check(model, torch.randn(2, 3, 29, 31, dtype=torch.float64), 1e-12)


def test_torchvision_model_after_replace_pointwise():
    model, replaced = butterfly.replace_pointwise(torchvision.models.mobilenet_v2(num_classes=10))
    result = _check(model, torch.randn(1, 3, 40, 40), 1e-5)
    assert sorted(f.name for f in result.fused if f.kind == "BFT") == sorted(replaced)
    assert any(f.epilogue == "bn+add" for f in result.fused)
    # torchvision's depthwise nn.Conv2d layers run the depthwise kernel once fused
    assert any(isinstance(m, FusedConv) and m.depthwise for m in result.model.modules())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_and_bias(activation):
    act = {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(),
           "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid()}[activation]
    net = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), copy.deepcopy(act),
                        butterfly.BFT(24, 40, bias=True), nn.BatchNorm2d(40), act)
    result = _check(net, torch.randn(2, 3, 11, 9), 1e-5)
    assert [f.kind for f in result.fused] == ["conv", "BFT"]


class _Odd(nn.Module):
    """BatchNorms the fuser must leave alone, and one it may fold without affine parameters."""

    def __init__(self):
        super().__init__()
        self.pw = butterfly.BFT(8, 8)
        self.bn_plain = nn.BatchNorm2d(8, affine=False)             # foldable
        self.pw2 = butterfly.BFT(8, 8)
        self.bn_batch = nn.BatchNorm2d(8, track_running_stats=False)  # batch statistics
        self.pool = nn.AvgPool2d(2)
        self.bn_after_pool = nn.BatchNorm2d(8)                        # nothing to fold into

    def forward(self, x):
        y = self.bn_batch(self.pw2(torch.relu(self.bn_plain(self.pw(x)))))
        return self.bn_after_pool(self.pool(y))


def test_unfusable_batchnorms_are_left_and_reported():
    result = _check(_Odd(), torch.randn(3, 8, 6, 6), 1e-5)
    assert [f.epilogue for f in result.fused] == ["bn+relu"]
    reasons = dict(result.unfused)
    assert "batch statistics" in reasons["bn_batch"]
    assert "not a conv or BFT" in reasons["bn_after_pool"]
    assert isinstance(result.model.pw2, butterfly.BFT)   # left as it was


def test_fused_layers_refuse_training_and_gradients():
    net = nn.Sequential(butterfly.BFT(8, 8), nn.BatchNorm2d(8), nn.ReLU())
    fused = fuse(_randomize_bn(net), torch.randn(1, 8, 4, 4)).model
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no gradient"):
        fused(x)
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        fused.train()(x.detach())
    assert isinstance(fused.get_submodule("0"), FusedBFT)


def test_bft_fused_operator_matches_the_oracle_on_every_backend_choice():
    layer = butterfly.BFT(24, 40)
    plan = layer.plan
    x, add = torch.randn(3, 24, 5), torch.randn(3, 40, 5)
    scale, shift = torch.rand(40) + 0.5, torch.randn(40)
    w = layer.weight.detach().view(plan.num_blocks, -1)
    want = apply_epilogue(bft_reference(x, w, plan.radices, 40, True), scale, shift, "relu6", add,
                          x.dtype)
    for backend in ("reference", "auto"):
        with butterfly.use_backend(backend):
            got = bft_fused(x, layer.weight, plan, True, Epilogue(scale, shift, "relu6", True), add)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one value per output channel"):
        bft_fused(x, layer.weight, plan, True, Epilogue(torch.ones(24)))
    with pytest.raises(ValueError, match="unknown epilogue activation"):
        Epilogue(activation="gelu")
    with pytest.raises(ValueError, match="pass add="):
        bft_fused(x, layer.weight, plan, True, Epilogue(add=True))


def test_optimize_for_inference_fuses_and_keeps_the_measured_choice(capsys):
    model = _randomize_bn(timm.create_model("mobilenetv3_small_bft_050", num_classes=10,
                                            small_input=True))
    x = torch.randn(2, 3, 32, 32)
    out, report = butterfly.optimize_for_inference(model, x, min_run_time=0.001)
    with torch.no_grad():
        assert _rel(out(x), model(x)) < 1e-5
    assert report.fused and len(report) == sum(f.kind == "BFT" for f in report.fused)
    for c in report:
        chosen = out.get_submodule(c.name)
        assert isinstance(chosen, FusedBFT if c.chosen == "bft" else FusedConv)
        assert c.epilogue != "-"
    # every fused depthwise conv was timed both ways and runs on the choice
    depthwise = [n for n, m in out.named_modules() if isinstance(m, FusedConv) and m.groups > 1]
    assert sorted(c.name for c in report.depthwise) == sorted(depthwise)
    for c in report.depthwise:
        assert out.get_submodule(c.name).depthwise == (c.chosen == "kernel")
        assert c.chosen == ("kernel" if c.kernel_ms <= c.torch_ms else "torch")
    print(report)
    text = capsys.readouterr().out
    assert "fused" in text and "epilogue" in text and "depthwise convs:" in text
    with pytest.raises(ValueError, match="leaves the original untouched"):
        butterfly.optimize_for_inference(model, x, inplace=True)


def test_torch_compile_over_a_fused_model():
    model = _randomize_bn(timm.create_model("mobilenetv1_bft_100", num_classes=10,
                                            small_input=True))
    x = torch.randn(2, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    fused = fuse(model, x).model
    compiled = torch.compile(fused)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bft_reads_a_channel_slice_of_a_channels_last_tensor_in_place(dtype):
    """ShuffleNetV2's split: rows of channels at a stride larger than C go to the kernel as they
    are (no copy) and the output stays channels_last."""
    from butterfly.ops.bft_fused import bft_fused_image, pixel_rows
    layer = butterfly.BFT(40, 64, dtype=dtype)
    full = torch.randn(3, 80, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    epilogue = Epilogue(torch.rand(64, dtype=dtype) + 0.5, torch.randn(64, dtype=dtype), "relu")
    for x in (full[:, 40:], full[:, :40]):
        assert pixel_rows(x) is not None and pixel_rows(x).stride(0) == 80
        with torch.no_grad():
            got = bft_fused_image(x, layer.weight, layer.plan, True, epilogue)
            want = bft_fused_image(x.contiguous(memory_format=torch.channels_last), layer.weight,
                                   layer.plan, True, epilogue)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert pixel_rows(full.contiguous()) is None   # NCHW stays NCHW


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_concat_shuffle_equals_the_models_cat_and_shuffle(fmt, dtype, backend):
    from butterfly.passes.fuse import concat_shuffle
    full = torch.randn(2, 34, 5, 3).to(dtype).contiguous(memory_format=fmt)
    a, b = full[:, 17:], torch.randn(2, 17, 5, 3).to(dtype).contiguous(memory_format=fmt)
    cat = torch.cat((a, b), 1)
    want = cat.view(2, 2, 17, 5, 3).transpose(1, 2).reshape(2, 34, 5, 3)
    with butterfly.use_backend(backend):   # auto, channels_last: interleave_channels
        got = concat_shuffle(a, b)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("n,c,h,w", [(2, 17, 5, 3), (3, 8, 1, 1), (1, 6, 4, 1), (1, 5, 1, 7)])
def test_interleave_channels_equals_the_stack_in_every_layout(n, c, h, w):
    """The kernel on channels-last images, channel slices of them and 1x1 images; PyTorch's stack
    on the layouts whose pixels are not rows of channels (NCHW, mixed)."""
    butterfly.kernels.cpu.load_extension()
    cl = torch.channels_last
    full = torch.randn(n, 2 * c, h, w).contiguous(memory_format=cl)
    images = {"cl": torch.randn(n, c, h, w).contiguous(memory_format=cl), "slice": full[:, c:],
              "nchw": torch.randn(n, c, h, w)}
    for a in images.values():
        for b in images.values():
            got = torch.ops.butterfly_cpu.interleave_channels(a, b)
            assert torch.equal(got, torch.stack((a, b), 2).reshape(n, 2 * c, h, w))
            if h * w == 1 or (a is not images["nchw"] and b is not images["nchw"]):
                assert got.is_contiguous(memory_format=cl)


def test_interleave_channels_refuses_what_it_cannot_take():
    butterfly.kernels.cpu.load_extension()
    a = torch.randn(1, 6, 2, 2).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.butterfly_cpu.interleave_channels(a, torch.randn(1, 5, 2, 2))
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.butterfly_cpu.interleave_channels(a[0], a[0])
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.butterfly_cpu.interleave_channels(a, a.double())


def test_shufflenet_shuffles_fold_and_keep_channels_last():
    model = _randomize_bn(timm.create_model("shufflenetv2_bft_125", num_classes=10))
    x = torch.randn(1, 3, 45, 37).contiguous(memory_format=torch.channels_last)
    result = fuse(model.to(memory_format=torch.channels_last), x)
    assert len(result.shuffles) == sum(len(s) for s in model.stages)   # one per block
    code = result.model.code
    assert "concat_shuffle" in code and "transpose" not in code
    with torch.no_grad():
        got, want = result.model(x), model(x)
        assert _rel(got, want) < 1e-5
        # every layer's input stays channels_last (nothing falls back to NCHW copies)
        formats = []
        hooks = [m.register_forward_pre_hook(
            lambda m, args: formats.append(args[0].stride(1) == 1))
            for m in result.model.modules() if isinstance(m, (FusedBFT, FusedConv))]
        result.model(x)
        for h in hooks:
            h.remove()
    assert formats and all(formats)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_conv_gives_the_same_result_through_onednn_and_conv2d(monkeypatch, memory_format):
    """The two ways a float32 FusedConv runs (oneDNN's fused convolution called directly, and
    PyTorch's conv2d with the epilogue after it), with and without the added input."""
    from butterfly.passes import fuse as fuse_module
    calls = []
    onednn = fuse_module._MKLDNN

    class Spy:
        def __call__(self, *args):
            calls.append("conv")
            return onednn(*args)

        def binary(self, *args):
            calls.append("binary")
            return onednn.binary(*args)
    monkeypatch.setattr(fuse_module, "_MKLDNN", Spy())
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1)
    x = torch.randn(2, 24, 9, 7).contiguous(memory_format=memory_format)
    add = torch.randn(2, 40, 9, 7).contiguous(memory_format=memory_format)
    for activation, adds in (("relu6", False), ("hardswish", False), ("none", True)):
        layer = FusedConv(conv, activation, adds)
        with torch.no_grad():
            y = conv(x)
            want = torch.clamp(y, 0, 6) if activation == "relu6" else \
                torch.nn.functional.hardswish(y) if activation == "hardswish" else y + add
            got = []
            for direct in (True, False):
                layer.onednn_call = direct
                calls.clear()
                got.append(layer(x, add) if adds else layer(x))
                assert len(calls) == direct   # one oneDNN call, or none
                torch.testing.assert_close(got[-1], want, rtol=1e-5, atol=1e-5)
            assert got[0].is_contiguous(memory_format=memory_format)
            assert got[1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("direct_faster", [True, False])
def test_optimize_keeps_the_faster_way_to_run_a_dense_conv(monkeypatch, direct_faster):
    from butterfly.passes import optimize

    def fake_time(fn, inp, min_run_time=0.0, warmup=0):
        if isinstance(fn, FusedConv) and not fn.depthwise:
            return 1.0 if fn.onednn_call == direct_faster else 2.0
        return 1.0
    monkeypatch.setattr(optimize, "time_call", fake_time)
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          butterfly.BFT(32, 32)).eval()
    x = torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    out, report = butterfly.optimize_for_inference(model, x)
    (choice,) = report.onednn
    assert choice.chosen == ("kernel" if direct_faster else "torch")
    assert out.get_submodule(choice.name).onednn_call == direct_faster
    assert "other convs: " + ("1" if direct_faster else "0") + " of 1" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    # float64: oneDNN's call does not apply, nothing is timed
    _, f64 = butterfly.optimize_for_inference(copy.deepcopy(model).double(), x.double())
    assert f64.onednn == []
