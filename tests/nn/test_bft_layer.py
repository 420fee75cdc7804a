"""The BFT layer against the paper's definition, autograd, and its structural promises."""
import math

import pytest
import torch
from torch import nn

import butterfly
from butterfly import BFT, BFTLinear, use_backend
from butterfly.plan import BFTPlan, choose_radices, make_plan
from butterfly.ops.reference import bft_reference, bft_reference_backward
from checks import double_backward_check
from oracle import hadamard, paper_layer_matrix

# (in, out, base): square powers, mixed radix, padded, expand, contract, tiny and odd shapes
SHAPES = [(16, 16, 2), (64, 64, 4), (27, 27, 3), (64, 64, 8), (24, 24, 4), (116, 116, 4),
          (12, 40, 4), (3, 10, 4), (40, 12, 4), (100, 24, 2), (7, 5, 3), (5, 5, 4), (2, 9, 4)]


def _layer(cin, cout, base, residual=True, bias=False):
    return BFT(cin, cout, base=base, residual=residual, bias=bias).double()


@pytest.mark.parametrize("cin,cout,base", SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_dense_matrix_matches_paper_definition(cin, cout, base, residual):
    layer = _layer(cin, cout, base, residual)
    torch.testing.assert_close(layer.to_dense(), paper_layer_matrix(layer), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin,cout,base", SHAPES)
def test_forward_equals_dense_matrix(cin, cout, base):
    layer = _layer(cin, cout, base, bias=True)
    nn.init.normal_(layer.bias)
    x = torch.randn(2, cin, 5, 3, dtype=torch.float64)
    expected = torch.einsum("oi,nihw->nohw", paper_layer_matrix(layer), x) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    xcl = x.contiguous(memory_format=torch.channels_last)
    y = layer(xcl)
    if not xcl.is_contiguous():  # unambiguously channels-last: the output keeps the format
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_binding_weight_layout():
    """Stage s mixes channels seg*k*t + j*t + r with weight[s, seg*t + r] (the paper, eq. 3 and 5, unrolled)."""
    n, k = 64, 4
    layer = BFT(n, n, base=k, residual=False, bias=False).double()
    assert layer.weight.shape == (3, n // k, k, k)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :, range(k), range(k)] = 1.0  # every stage the identity
        s, seg, r, i, j = 1, 2, 3, 1, 3
        t = n // k ** (s + 1)
        layer.weight[s, seg * t + r, i, i] = 0.0
        layer.weight[s, seg * t + r, i, j] = 5.0
    dense = layer.to_dense()
    out_c, in_c = seg * k * t + i * t + r, seg * k * t + j * t + r
    expected = torch.eye(n, dtype=torch.float64)
    expected[out_c, out_c] = 0.0
    expected[out_c, in_c] = 5.0
    torch.testing.assert_close(dense, expected)


@pytest.mark.parametrize("cin,cout,base", [(16, 16, 2), (16, 16, 4), (12, 20, 4), (20, 6, 3), (10, 10, 4)])
@pytest.mark.parametrize("residual", [True, False])
def test_gradcheck(cin, cout, base, residual):
    layer = _layer(cin, cout, base, residual)
    x = torch.randn(2, cin, 2, 3, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    plan = layer.plan

    def f(x, w):
        return butterfly.bft(x.reshape(2, cin, 6), w, plan, residual)

    with use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x, w))


# square, expand (in < out), contract (in > out), mixed radix (4*3*2, 2*3), padded (5 -> 6)
DOUBLE_BACKWARD_SHAPES = [(16, 16, 4), (6, 10, 2), (12, 5, 4), (24, 24, 4), (5, 5, 2)]


@pytest.mark.parametrize("cin,cout,base", DOUBLE_BACKWARD_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_double_backward_reference(cin, cout, base, residual):
    double_backward_check(cin, cout, base, residual, "reference")


def test_gradient_penalty_on_the_input():
    """R1 / WGAN-GP: the norm of d(output)/d(input), differentiated again, equals the same
    penalty on the layer's exact dense matrix."""
    layer = BFT(12, 20, base=4, bias=True).double()
    x = torch.randn(3, 12, 4, 4, dtype=torch.float64, requires_grad=True)
    dense = layer.to_conv2d()
    grads = []
    for net in (layer, dense):
        net.zero_grad()
        out = torch.tanh(net(x)).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        gx.square().sum().backward()
        grads.append(net.weight.grad.clone())
    # the BFT's weight gradient through the dense matrix it defines
    layer.zero_grad()
    matrix = layer.to_dense()
    d_matrix = grads[1].view_as(matrix)
    matrix.backward(d_matrix)
    torch.testing.assert_close(grads[0], layer.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cin,cout,base", SHAPES)
def test_hand_written_backward_equals_autograd(cin, cout, base):
    plan = make_plan(cin, cout, base)
    x = torch.randn(3, cin, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(plan.num_blocks, plan.weights_per_block, dtype=torch.float64, requires_grad=True)
    y = bft_reference(x, w, plan.radices, cout, True)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g, allow_unused=True, materialize_grads=True)
    hx, hw = bft_reference_backward(g, x.detach(), w.detach(), plan.radices, cout, True)
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hw, gw)


@pytest.mark.parametrize("n,k", [(16, 2), (64, 4), (81, 3), (512, 8), (1024, 4)])
def test_structure_of_square_power(n, k):
    layer = BFT(n, n, base=k, residual=False)
    L = round(math.log(n, k))
    assert layer.weight.shape == (L, n // k, k, k)
    assert layer.weight.numel() == k * n * L
    assert layer.macs_per_pixel == k * n * L
    if n <= 128:  # exactly one path joins every input to every output: no zero entry
        assert (layer.to_dense() != 0).all()


def test_macs_for_every_shape_class():
    assert make_plan(1024, 1024, 4).macs_per_pixel == 20480  # n * k * log_k(n) = 1024 * 4 * 5
    assert make_plan(24, 24, 4).macs_per_pixel == 24 * (4 + 3 + 2)  # mixed radix 4*3*2
    # 116 pads to 128 = 4*4*4*2 (120 = 5*3*4*2 costs 1/15 less but is no multiple of 16), 2 blocks
    plan = make_plan(116, 232, 4)
    assert (plan.size, plan.num_blocks, plan.macs_per_pixel) == (128, 2, 2 * 128 * 14)
    plan = make_plan(1024, 116, 4)  # contract: 9 chunks of 116
    assert (plan.num_blocks, plan.macs_per_pixel) == (9, 9 * 128 * 14)
    assert make_plan(3, 1000, 4).macs_per_pixel == 334 * 9


def test_padding_only_when_cheaper():
    assert choose_radices(64, 4) == (4, 4, 4)
    assert choose_radices(24, 4) == (3, 4, 2)  # 216 MACs; padding to 32 would cost 320
    assert choose_radices(37, 4) == (5, 4, 2)  # a prime: pads to 40, 440 MACs (48 would cost 528)


def test_whole_vectors_within_the_tolerance_and_odd_radices_first():
    """A multiple of 16 channels wins at up to 10% more multiply-adds (80: 1040 against 972 for
    81 = 3^4); odd radices lead, so that every stage's stride is a whole number of vectors."""
    assert choose_radices(80, 4) == (5, 4, 4)
    assert choose_radices(29, 4) == (4, 4, 2)  # 320 MACs against 300 for 30 = (5, 3, 2)
    assert choose_radices(144, 4) == (3, 3, 4, 4)
    assert choose_radices(160, 4) == (5, 4, 4, 2)
    assert choose_radices(24, 2) == (3, 2, 2, 2)
    assert choose_radices(1000, 4) == (4,) * 5  # 1024: no multiple of 16 within 10% is cheaper


def test_walsh_hadamard_is_a_base2_bft():
    n = 32
    layer = BFT(n, n, base=2, residual=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]).expand_as(layer.weight))
    torch.testing.assert_close(layer.to_dense(), hadamard(n))
    x = torch.randn(4, n, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(layer(x).flatten(1), x.flatten(1) @ hadamard(n).t())


def test_paper_init_statistics():
    n, L = 256, 4
    layer = BFT(n, n, base=4, residual=False, init="paper").double()
    xavier = math.sqrt(6 / (2 * n))
    bound = xavier ** (1 / L) * 2 ** ((L - 1) / L)
    assert layer.weight.abs().max() <= bound
    assert layer.weight.abs().max() > 0.9 * bound
    mean_abs = layer.to_dense().abs().mean().item()
    assert abs(mean_abs - xavier / 2) / (xavier / 2) < 0.1


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("cin,cout,base", [(64, 64, 4), (24, 24, 4), (12, 12, 4)])
def test_identity_init(cin, cout, base, residual):
    layer = BFT(cin, cout, base=base, residual=residual, init="identity").double()
    torch.testing.assert_close(layer.to_dense(), torch.eye(cin, dtype=torch.float64))
    if residual:  # the last stage is zero but still receives gradient
        layer(torch.randn(2, cin, 3, 3, dtype=torch.float64)).square().sum().backward()
        assert layer.weight.grad.abs().sum() > 0


def test_identity_init_repeats_input_when_expanding():
    layer = BFT(8, 20, base=2, init="identity").double()
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(layer.to_dense(), torch.cat([eye, eye, eye])[:20])


@pytest.mark.parametrize("n,k", [(64, 4), (24, 4), (16, 2)])
def test_ortho_init_gives_orthogonal_butterfly(n, k):
    layer = BFT(n, n, base=k, residual=False, init="ortho").double()
    d = layer.to_dense()
    torch.testing.assert_close(d @ d.t(), torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    layer = BFT(32, 48, base=4)
    x = torch.randn(2, 32, 3, 3)
    expected = layer(x)
    layer_d = layer.to(dtype)
    y = layer_d(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


def test_reduced_precision_input_with_float32_weights_accumulates_in_float32():
    layer = BFT(64, 64, base=4)
    x = torch.randn(2, 64, 4, 4)
    y = layer(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), layer(x.half().float()), rtol=2e-3, atol=2e-3)


def test_non_contiguous_input():
    layer = BFT(16, 16, base=4).double()
    x = torch.randn(2, 16, 6, 8, dtype=torch.float64)
    sliced = x[:, :, ::2, 1::2]
    transposed = x.transpose(2, 3)
    for view in (sliced, transposed):
        assert not view.is_contiguous()
        torch.testing.assert_close(layer(view), layer(view.contiguous()))


def test_bft_linear_matches_dense_and_replaces_linear():
    layer = BFTLinear(24, 40, base=4, bias=True).double()
    nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (3, 5, 40)
    torch.testing.assert_close(y, x @ paper_layer_matrix(layer).t() + layer.bias)
    assert (layer.in_features, layer.out_features) == (24, 40)
    assert layer(torch.randn(24, dtype=torch.float64)).shape == (40,)


def test_repr_and_attributes():
    layer = BFT(116, 232)
    assert (layer.in_channels, layer.out_channels) == (116, 232)
    assert "116, 232, base=4, radices=(4, 4, 4, 2), blocks=2, padded=116->128" in repr(layer)


@pytest.mark.parametrize("make,match,exc", [
    (lambda: BFT(16, 16)(torch.randn(1, 8, 2, 2)), "expects 16 input channels, got 8", ValueError),
    (lambda: BFT(16, 16)(torch.randn(16, 2)), "4-D", ValueError),
    (lambda: BFT(16, 16)(torch.ones(1, 16, 2, 2, dtype=torch.int64)), "floating-point", TypeError),
    (lambda: BFT(16, 16, base=1), "base must be an integer >= 2", ValueError),
    (lambda: BFT(0, 16), "at least one input and one output channel", ValueError),
    (lambda: BFT(1, 4096), r"BFT\(1, 4096\): a BFT needs at least 2 input .* keep the dense", ValueError),
    (lambda: BFTLinear(16, 1), "needs at least 2 input and 2 output channels", ValueError),
    (lambda: BFT(16, 16.0), "must be an int", TypeError),
    (lambda: BFT(16, 16, init="xavier"), "unknown BFT init", ValueError),
    (lambda: BFT(16, 16)(torch.randn(1, 16, 2, 2, device="meta")), "move one of them", ValueError),
    (lambda: BFTLinear(16, 4)(torch.randn(3, 15)), "expects 16 input channels, got 15", ValueError),
])
def test_bad_input_gets_clear_error(make, match, exc):
    with pytest.raises(exc, match=match):
        make()


def test_use_backend_selects_and_restores():
    assert butterfly.current_backend() == "auto"
    with use_backend("reference"):
        assert butterfly.current_backend() == "reference"
    assert butterfly.current_backend() == "auto"
    with pytest.raises(ValueError, match="unknown BFT backend"):
        with use_backend("fpga"):
            pass


from hypothesis import given, settings, strategies as st


@settings(max_examples=40, deadline=None)
@given(cin=st.integers(2, 70), cout=st.integers(2, 70), base=st.integers(2, 9),
       residual=st.booleans())
def test_any_shape_matches_paper_tiling(cin, cout, base, residual):
    """Property: for any channel counts and base, the layer is the paper's tiled butterfly."""
    layer = _layer(cin, cout, base, residual)
    x = torch.randn(2, cin, 3, 1, dtype=torch.float64)
    expected = torch.einsum("oi,nihw->nohw", paper_layer_matrix(layer), x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
    assert layer.weight.numel() == layer.macs_per_pixel  # every edge has its own weight


def test_module_memory_format_conversion_keeps_weight_layout():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), BFT(16, 40), BFT(40, 40, base=4))  # 5-D and 4-D weights
    model(torch.randn(1, 3, 6, 6)).sum().backward()
    shapes = [m.weight.shape for m in model[1:]]
    model.to(memory_format=torch.channels_last).double()
    assert [m.weight.shape for m in model[1:]] == shapes
    assert all(m.weight.is_contiguous() and m.weight.grad.shape == m.weight.shape for m in model[1:])
    assert model[1].weight.dtype == torch.float64
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert model(x).is_contiguous(memory_format=torch.channels_last)


def test_one_channel_layers_are_refused_not_weightless():
    """With one channel on a side every block would be a 1x1 butterfly without weights (the layer
    would compute 2 * x repeated, or 2 * sum(x)): refused, pointing at the dense layer."""
    for cin, cout in [(1, 4096), (16, 1), (1, 1)]:
        for cls in (BFT, BFTLinear):
            with pytest.raises(ValueError, match=r"keep the dense layer \(nn.Conv2d / nn.Linear"):
                cls(cin, cout)
    with pytest.raises(ValueError, match="at least 2 input"):
        BFT.from_dense(nn.Conv2d(16, 1, 1))
    assert BFT(2, 4096).weight.numel() > 0 and BFT(16, 2).weight.numel() > 0


# -- the layout in the state_dict -------------------------------------------------------------

def test_state_dict_records_the_layout_and_refuses_another():
    """Mixed-radix weights are flat: BFT(24, 24) with and without the residual both have 216
    weights but compute different functions; other channels do too."""
    a, c = BFT(24, 24, base=4), BFT(24, 24, base=4, residual=False)
    assert a.weight.shape == c.weight.shape == (216,)
    state = a.state_dict()
    assert state["_extra_state"].tolist() == [1, 24, 24, 1, 3, 4, 2]
    before = c.weight.detach().clone()
    with pytest.raises(RuntimeError, match="layout mismatch for _extra_state: .*residual=True, "
                                           "but this layer is 24 -> 24, .* residual=False"):
        c.load_state_dict(state)
    with pytest.raises(RuntimeError, match="layout mismatch"):
        c.load_state_dict(state, strict=False)
    assert torch.equal(c.weight, before)  # nothing was loaded
    same = BFT(24, 24, base=4)
    same.load_state_dict(state)
    assert torch.equal(same.weight, a.weight)
    lin = BFTLinear(24, 40, base=4)
    with pytest.raises(RuntimeError, match="BFTLinear is 24 -> 40"):
        BFTLinear(24, 48, base=4).load_state_dict(lin.state_dict())


@pytest.mark.parametrize("saved", [(3, 3, 3, 3), (4, 4, 5), (2, 2, 2, 2, 5)])
def test_a_checkpoint_with_other_radices_loads_with_them(saved):
    """Weights saved under another plan of the same channels (an older choose_radices, another
    base) keep their function: the layer takes the checkpoint's radices."""
    old = BFT(80, 80, bias=True)
    old.plan = BFTPlan(80, 80, saved)
    old.weight = nn.Parameter(torch.randn(old._weight_shape()) * 0.3)
    state = old.state_dict()
    assert state["_extra_state"].tolist()[4:] == list(saved)
    new = BFT(80, 80, bias=True)
    assert new.radices == (5, 4, 4)
    new.load_state_dict(state)
    assert new.radices == saved and new.weight.shape == old.weight.shape
    x = torch.randn(2, 80, 3, 3)
    torch.testing.assert_close(new(x), old(x))
    torch.testing.assert_close(new.to_dense(), old.to_dense())


def test_checkpoints_without_the_layout_still_load():
    """A state_dict written before the layout was stored (no ``_extra_state``) loads, strictly."""
    net = nn.Sequential(BFT(24, 24, base=4), nn.BatchNorm2d(24), BFTLinear(24, 10, bias=True))
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
    assert len(old) < len(net.state_dict())
    fresh = nn.Sequential(BFT(24, 24, base=4), nn.BatchNorm2d(24), BFTLinear(24, 10, bias=True))
    result = fresh.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in old.items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_layout_survives_copies_saves_and_ema(tmp_path):
    import copy

    from timm.utils import ModelEmaV3

    net = nn.Sequential(BFT(24, 24, base=4), nn.ReLU(), BFT(24, 40, base=2))
    x = torch.randn(2, 24, 3, 3)
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin(x), net(x))
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), net(x))
    torch.save(net.state_dict(), tmp_path / "sd.pt")  # a plain state_dict: tensors only
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    twin.load_state_dict(state)
    ema = ModelEmaV3(net, decay=0.9)  # treats every state_dict entry as a tensor
    ema.update(net, step=1)
    assert ema.module[2].state_dict()["_extra_state"].tolist() == net[2].get_extra_state().tolist()
    with pytest.raises(RuntimeError, match="layout mismatch"):
        nn.Sequential(BFT(24, 24, residual=False), nn.ReLU(), BFT(24, 40, base=2)).load_state_dict(
            state)


# -- torch.fx ---------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bft = BFT(16, 24, bias=True)
        self.head = BFTLinear(24, 10)

    def forward(self, x):
        y = torch.relu(self.bft(self.conv(x)))
        return self.head(y.mean((2, 3)))


def test_fx_symbolic_trace_has_one_node_per_bft_and_matches_eager():
    net = _Net().eval()
    graph = torch.fx.symbolic_trace(net)
    calls = [n.target.__name__ for n in graph.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", "").startswith("bft_")]
    assert calls == ["bft_conv2d", "bft_linear"]
    for shape in [(2, 3, 8, 8), (1, 3, 5, 7)]:  # nothing about the input's shape is baked in
        x = torch.randn(shape)
        torch.testing.assert_close(graph(x), net(x), rtol=0, atol=0)
        xcl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(graph(xcl), net(xcl), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects 16 input channels, got 8"):  # checks still run
        torch.fx.symbolic_trace(nn.Sequential(BFT(16, 16)))(torch.randn(1, 8, 2, 2))


@pytest.mark.parametrize("cin,cout,base", [(24, 24, 4), (12, 40, 4), (64, 64, 4)])
def test_stage_weights_reads_the_layer_weight_as_documented(cin, cout, base):
    """``butterfly.ops.reference.stage_weights`` takes a layer's weight as it is (flat ``(W,)`` for
    mixed radices, ``(T, W)``, or the ``(L, n/k, k, k)`` binding layout): views, not copies."""
    from butterfly.ops.reference import stage_weights

    layer = BFT(cin, cout, base=base)
    plan = layer.plan
    views = stage_weights(layer.weight, plan)
    assert [tuple(v.shape) for v in views] == [(plan.num_blocks, plan.size // k, k, k)
                                               for k in plan.radices]
    flat = torch.cat([v.reshape(plan.num_blocks, -1) for v in views], dim=1)
    assert torch.equal(flat.reshape(-1), layer.weight.detach().reshape(-1))
    with torch.no_grad():
        views[0].zero_()
    assert (layer.weight.reshape(plan.num_blocks, -1)[:, :plan.size * plan.radices[0]] == 0).all()
    with pytest.raises(ValueError, match="elements, got shape"):
        stage_weights(torch.zeros(7), plan)


def test_fx_traces_a_zoo_model_and_the_feature_extractors():
    """A zoo model's traced graph equals the model, and torchvision's and timm's FX feature
    extractors (built on torch.fx) work over its BFT layers."""
    import timm
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv1_bft_100", num_classes=10).eval()
    graph = torch.fx.symbolic_trace(model)
    bft_nodes = [n for n in graph.graph.nodes if n.op == "call_function"
                 and getattr(n.target, "__name__", "") == "bft_conv2d"]
    assert len(bft_nodes) == sum(isinstance(m, BFT) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
        nodes = [info["module"] for info in model.feature_info][-2:]
        feats = create_feature_extractor(model, return_nodes=nodes)(x)
        assert [f.shape[1] for f in feats.values()] == [i["num_chs"] for i in model.feature_info][-2:]
        torch.manual_seed(0)
        fx = timm.create_model("mobilenetv1_bft_100", features_only=True, feature_cls="fx",
                               out_indices=(3, 4)).eval()
        torch.manual_seed(0)
        listed = timm.create_model("mobilenetv1_bft_100", features_only=True,
                                   out_indices=(3, 4)).eval()
        for a, b in zip(fx(x), listed(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
