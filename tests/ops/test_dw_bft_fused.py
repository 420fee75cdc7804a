"""The depthwise-separable block in one pass: butterfly::dw_bft_fused and FusedDepthwiseBFT.

The oracle is independent of every kernel: ``F.conv2d(groups=C)`` for the depthwise conv and the
dense matrix the paper's definition gives for the BFT (tests/oracle.py), in float64."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import butterfly
from butterfly.ops.bft_fused import ACTIVATIONS, Epilogue, activate
from butterfly.passes.fuse import FusedConv, FusedDepthwiseBFT, fuse, merge_separable
from butterfly.ops.dw_bft_fused import dw_bft_fused, kernel_applies
from oracle import paper_layer_matrix

pytestmark = pytest.mark.usefixtures("one_thread")
CL = torch.channels_last


def _oracle(x, dw, db, stride, dw_act, layer, ep, add):
    """The block in float64 from F.conv2d and the paper's matrix."""
    h = F.conv2d(x.double(), dw.double(), db.double(), stride, dw.shape[-1] // 2,
                 groups=x.shape[1])
    h = activate(h, dw_act)
    y = torch.einsum("oc,nchw->nohw", paper_layer_matrix(layer), h)
    y = y * ep.scale.double().view(1, -1, 1, 1) + ep.shift.double().view(1, -1, 1, 1)
    y = activate(y, ep.activation)
    return y if add is None else y + add.double()


def _case(N, C, out, H, W, k, stride, residual, act, dw_act, adds, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = butterfly.BFT(C, out, residual=residual, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=dtype) * 0.4)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype).contiguous(memory_format=CL)
    dw = torch.randn(C, 1, k, k, generator=g, dtype=dtype)
    db = torch.randn(C, generator=g, dtype=dtype)
    ep = Epilogue(torch.rand(out, generator=g, dtype=dtype) + 0.5,
                  torch.randn(out, generator=g, dtype=dtype), act, adds)
    Ho, Wo = (H + 2 * (k // 2) - k) // stride + 1, (W + 2 * (k // 2) - k) // stride + 1
    add = torch.randn(N, out, Ho, Wo, generator=g, dtype=dtype).contiguous(memory_format=CL) \
        if adds else None
    return layer, x, dw, db, ep, add


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# (N, C, out, H, W, k, stride, residual, activation, depthwise activation, adds)
CASES = [
    (1, 32, 64, 9, 7, 3, 1, True, "relu", "relu6", False),       # expanding, batch 1, odd sizes
    (2, 64, 64, 10, 10, 3, 2, True, "none", "relu", True),       # square, stride 2, skip
    (3, 24, 48, 5, 13, 3, 1, False, "hardswish", "hardswish", False),
    (2, 128, 64, 7, 7, 5, 2, True, "relu6", "none", False),      # contracting, k = 5
    (1, 16, 16, 1, 1, 3, 1, True, "relu", "relu", True),          # a single pixel
    (2, 17, 40, 6, 5, 3, 1, True, "hardsigmoid", "relu", False),  # channels not a vector
    (2, 96, 200, 15, 15, 7, 2, True, "relu", "relu6", False),     # k = 7, several tiles
    (1, 32, 32, 3, 21, 3, 1, True, "relu", "none", False),        # interior register blocks
    (2, 16, 32, 4, 37, 3, 2, False, "relu6", "relu", True),       # the same at stride 2
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_one_pass_equals_the_oracle(case, dtype, tol):
    *shape, adds = case
    layer, x, dw, db, ep, add = _case(*shape, adds, dtype)
    assert kernel_applies(x, dw, shape[6])
    with torch.inference_mode():
        got = dw_bft_fused(x, dw, db, shape[6], shape[9], layer.weight, layer.plan, shape[7], ep,
                           add)
        with butterfly.use_backend("reference"):
            ref = dw_bft_fused(x, dw, db, shape[6], shape[9], layer.weight, layer.plan, shape[7],
                               ep, add)
    want = _oracle(x, dw, db, shape[6], shape[9], layer, ep, add)
    assert got.dtype == dtype and got.is_contiguous(memory_format=CL)
    assert got.shape == want.shape == ref.shape
    assert _rel(got, want) < tol
    assert _rel(ref, want) < tol          # the reference composition is the oracle too


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_on_both_sides(activation):
    layer, x, dw, db, ep, add = _case(2, 32, 32, 6, 6, 3, 1, True, activation, activation, False,
                                      torch.float64)
    with torch.inference_mode():
        got = dw_bft_fused(x, dw, db, 1, activation, layer.weight, layer.plan, True, ep)
    assert _rel(got, _oracle(x, dw, db, 1, activation, layer, ep, None)) < 1e-12


def test_nan_propagates():
    layer, x, dw, db, ep, _ = _case(1, 16, 16, 4, 4, 3, 1, True, "relu", "relu", False,
                                    torch.float32)
    x[0, 3, 1, 1] = float("nan")
    with torch.inference_mode():
        y = dw_bft_fused(x, dw, db, 1, "relu", layer.weight, layer.plan, True, ep)
    assert torch.isnan(y).any()


def test_inputs_the_kernel_does_not_take_run_the_reference():
    layer, x, dw, db, ep, _ = _case(2, 16, 32, 5, 5, 3, 1, True, "relu", "relu", False,
                                    torch.float32)
    want = _oracle(x, dw, db, 1, "relu", layer, ep, None)
    for other in (x.contiguous(), x.to(torch.bfloat16)):   # NCHW; a dtype the pass lacks
        assert not kernel_applies(other, dw, 1)
        with torch.inference_mode():
            got = dw_bft_fused(other, dw, db, 1, "relu", layer.weight, layer.plan, True, ep)
        assert _rel(got.float(), want) < (5e-2 if other.dtype == torch.bfloat16 else 1e-5)
    with butterfly.use_backend("reference"):
        assert not kernel_applies(x, dw, 1)


def test_clear_errors():
    layer, x, dw, db, ep, _ = _case(1, 16, 32, 5, 5, 3, 1, True, "relu", "relu", False,
                                    torch.float32)
    with pytest.raises(ValueError, match=r"weight of shape \(16, 1, k, k\)"):
        dw_bft_fused(x, dw[:8], db, 1, "relu", layer.weight, layer.plan, True, ep)
    with pytest.raises(ValueError, match="unknown activation"):
        dw_bft_fused(x, dw, db, 1, "gelu", layer.weight, layer.plan, True, ep)
    with pytest.raises(ValueError, match="stride 1 or 2"):
        dw_bft_fused(x, dw, db, 3, "relu", layer.weight, layer.plan, True, ep)
    with pytest.raises(ValueError, match="takes 8 channels"):
        other = butterfly.BFT(8, 32)
        dw_bft_fused(x, dw, db, 1, "relu", other.weight, other.plan, True, ep)
    with pytest.raises(ValueError, match="pass add="):
        dw_bft_fused(x, dw, db, 1, "relu", layer.weight, layer.plan, True,
                     Epilogue(ep.scale, ep.shift, "relu", True))
    with pytest.raises(ValueError, match=r"output's shape \(1, 32, 5, 5\)"):
        dw_bft_fused(x, dw, db, 1, "relu", layer.weight, layer.plan, True,
                     Epilogue(ep.scale, ep.shift, "relu", True), torch.randn(1, 32, 4, 4))
    # the C++ operator itself refuses what it cannot lay out
    w2 = layer.weight.detach().view(layer.plan.num_blocks, -1)
    with pytest.raises(RuntimeError, match="expected a channels_last"):
        torch.ops.butterfly_cpu.dw_bft_fused(x.contiguous(), dw, db, 1, "relu", w2,
                                             list(layer.plan.radices), 32, True, None, None,
                                             "none", None)
    with pytest.raises(RuntimeError, match="no gradient"):
        with torch.enable_grad():
            y = dw_bft_fused(x.requires_grad_(), dw, db, 1, "relu", layer.weight, layer.plan,
                             True, ep)
            y.sum().backward()


def test_opcheck():
    layer, x, dw, db, ep, add = _case(2, 16, 32, 5, 5, 3, 2, True, "relu6", "relu", True,
                                      torch.float32)
    w2 = layer.weight.detach().view(layer.plan.num_blocks, -1)
    torch.library.opcheck(torch.ops.butterfly.dw_bft_fused,
                          (x, dw, db, 2, "relu", w2, list(layer.plan.radices), 32, True,
                           ep.scale, ep.shift, "relu6", add),
                          test_utils=("test_schema", "test_faketensor"))


def _randomized(name: str) -> nn.Module:
    model = timm.create_model(name, num_classes=10)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("name,dtype,tol", [
    ("mobilenetv1_bft_100", torch.float32, 1e-5), ("mobilenetv1_bft_100", torch.float64, 1e-11),
    ("mobilenetv2_bft_100", torch.float32, 1e-5), ("shufflenetv2_bft_125", torch.float32, 1e-5)])
def test_merged_zoo_models_equal_the_original(name, dtype, tol):
    model = _randomized(name).to(dtype=dtype, memory_format=CL)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 45, 37, dtype=dtype).contiguous(memory_format=CL)
    gm = fuse(model, x).model
    merged = merge_separable(gm)
    blocks = [m for m in gm.modules() if isinstance(m, FusedDepthwiseBFT)]
    assert merged and len(blocks) == len(merged)
    assert all(isinstance(gm.get_submodule(f"{name}.dw"), FusedConv) for name, _ in merged)
    assert not any(isinstance(m, FusedConv) and m.kernel_geometry and not m.adds
                   for m in gm.children())   # every depthwise conv before a BFT was merged
    with torch.inference_mode():
        want = model(x)
        got = gm(x)
        for block in blocks:
            block.one_pass = False
        apart = gm(x)
    assert _rel(got, want.double()) < tol and _rel(apart, want.double()) < tol
    for k, v in model.state_dict().items():   # the original is untouched
        assert torch.equal(v, before[k]), k


def test_optimize_for_inference_times_and_reports_the_blocks(capsys):
    model = _randomized("mobilenetv1_bft_100").to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    out, report = butterfly.optimize_for_inference(model, x, min_run_time=0.001)
    blocks = {n: m for n, m in out.named_modules() if isinstance(m, FusedDepthwiseBFT)}
    assert blocks and sorted(c.name for c in report.separable) == sorted(blocks)
    for c in report.separable:
        assert blocks[c.name].one_pass == (c.chosen == "one pass")
        assert c.chosen == ("one pass" if c.one_pass_ms <= c.apart_ms else "apart")
    with torch.inference_mode():
        assert _rel(out(x), model(x).double()) < 1e-5
    print(report)
    assert "depthwise-separable blocks:" in capsys.readouterr().out
    # NCHW input: the one-pass kernel does not apply, so only blocks on 1x1 maps (where both
    # layouts are the same) are timed and reported
    _, nchw = butterfly.optimize_for_inference(model.to(memory_format=torch.contiguous_format),
                                               x.contiguous(), min_run_time=0.001)
    assert len(nchw.separable) < len(report.separable)
    assert all(c.input_shape[2:] == (1, 1) for c in nchw.separable)


def test_merged_blocks_refuse_training_and_compile():
    model = _randomized("mobilenetv1_bft_100").to(memory_format=CL)
    x = torch.randn(2, 3, 28, 28).contiguous(memory_format=CL)
    gm = fuse(model, x).model
    merge_separable(gm)
    block = next(m for m in gm.modules() if isinstance(m, FusedDepthwiseBFT))
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        block.train()(torch.randn(1, block.dw.weight.shape[0], 4, 4))
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm)(x), model(x), rtol=1e-4, atol=1e-4)


def test_layers_call_the_kernels_directly_after_one_checked_call():
    """The first eager call of a fused layer prepares it for the kernel (its arguments checked
    once); later calls with the same backend choice and dtype call the prepared form directly, and
    a different choice (the reference) is decided afresh."""
    from butterfly.passes.fuse import FusedBFT
    model = _randomized("mobilenetv1_bft_100").to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    gm = fuse(model, x).model
    merge_separable(gm)
    with torch.inference_mode():
        want = model(x)
        first, second = gm(x), gm(x)
        with butterfly.use_backend("reference"):
            ref = gm(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert _rel(second, want.double()) < 1e-5 and _rel(ref, want.double()) < 1e-5
    blocks = [m for m in gm.modules() if isinstance(m, FusedDepthwiseBFT)]
    assert blocks and all(("auto", torch.float32) in b._prepared for b in blocks)
    # under the reference each block ran its two layers, and its BFT recorded "no kernel"
    assert all(isinstance(b.pw, FusedBFT) and b.pw._prepared == {
        ("reference", torch.float32): None} for b in blocks)
    assert all(b._prepared[("auto", torch.float32)] is not None for b in blocks)
    assert all(b._prepared[("reference", torch.float32)] is None for b in blocks)
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        blocks[0].train()(torch.randn(1, blocks[0].dw.weight.shape[0], 4, 4).contiguous(
            memory_format=CL))
