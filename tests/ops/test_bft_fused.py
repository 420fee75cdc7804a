"""The CPU kernel's fused epilogue (``butterfly_cpu::forward_fused``, and ``bft_fused`` on the
"cpu" backend) against the oracle ``apply_epilogue(bft_reference(...))``.

The kernel applies the epilogue where each output tile is stored, and a tile is stored by one of
several paths: the last run writing NCHW rows of y in place (P a multiple of 16), the buffered
tile (image tails, padded and partial blocks, bfloat16/float16), the last run transposing
channels-last rows (P == 1) straight into y (16, 64, 256 channels at base 4), the transposing
store of a buffered channels-last tile (24, 116 channels), the sum of contracting blocks and the
gathered blocks of an expanding layer, each with streaming stores when the output is 8 MB or
more. The shapes and layouts below reach every one of them.
"""
import itertools

import pytest
import torch

from butterfly import use_backend
from butterfly.ops.bft_fused import ACTIVATIONS, Epilogue, apply_epilogue, bft_fused
from butterfly.kernels.cpu import build as cpu_fused
from butterfly.plan import BFTPlan, make_plan
from butterfly.ops.reference import bft_reference


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if cpu_fused.load_extension() is None:
        pytest.fail("the CPU kernel did not build; see the warning above")


def compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def oracle(x, w, radices, cout, residual, scale, shift, act, add):
    """The reference in the compute dtype, the reference epilogue, rounded once to x's dtype."""
    dt = compute(x.dtype)
    y = bft_reference(x.to(dt), w.to(dt), radices, cout, residual)
    return apply_epilogue(y, scale, shift, act, add, x.dtype)


def fused_op(x, w, radices, cout, residual, scale, shift, act, add):
    """The C++ operator, with the weight and epilogue in the compute dtype."""
    dt = compute(x.dtype)
    as_dt = (lambda t: None if t is None else t.to(dt))
    return torch.ops.butterfly_cpu.forward_fused(x, w.to(dt), list(radices), cout, residual,
                                                 as_dt(scale), as_dt(shift), act, add)


def fused(x, w, radices, cout, residual, scale, shift, act, add):
    """butterfly.ops.bft_fused.bft_fused on the "cpu" backend."""
    plan = BFTPlan(x.shape[1], cout, radices)
    with use_backend("cpu"):
        return bft_fused(x, w, plan, residual, Epilogue(scale, shift, act, add is not None), add)


TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    if not want.numel():
        return
    scale = want.double().abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[want.dtype] * (1 + scale), f"max error {err} (scale {scale})"


def arguments(cin, cout, radices, batch, pixels, dtype, steps="affine+add", scale_dtype=None):
    """x, weight, scale, shift, add for a layer; `steps` names the optional steps present."""
    plan = BFTPlan(cin, cout, radices)
    x = torch.randn(batch, cin, pixels).to(dtype)
    w = (torch.randn(plan.num_blocks, plan.weights_per_block) / 2).to(dtype)
    sd = scale_dtype or compute(dtype)
    # scale of both signs and away from 1, shift large enough to move values across the clamps
    scale = (torch.randn(cout) * 1.5).to(sd) if "scale" in steps or "affine" in steps else None
    shift = (torch.randn(cout) * 2).to(sd) if "shift" in steps or "affine" in steps else None
    add = torch.randn(batch, cout, pixels).to(dtype) if "add" in steps else None
    return x, w, scale, shift, add


def check(cin, cout, radices, batch, pixels, dtype, act, steps="affine+add", residual=True,
          both=True):
    x, w, scale, shift, add = arguments(cin, cout, radices, batch, pixels, dtype, steps)
    want = oracle(x, w, radices, cout, residual, scale, shift, act, add)
    assert_close(fused_op(x, w, radices, cout, residual, scale, shift, act, add), want)
    if both:
        assert_close(fused(x, w, radices, cout, residual, scale, shift, act, add), want)


# (name, in, out, radices)
SHAPES = [
    ("square-16", 16, 16, (4, 4)),
    ("power-of-4-64", 64, 64, (4, 4, 4)),
    ("power-of-4-256", 256, 256, (4, 4, 4, 4)),
    ("base-2-16", 16, 16, (2, 2, 2, 2)),
    ("base-8-64", 64, 64, (8, 8)),
    ("mixed-radix-24", 24, 24, (4, 3, 2)),
    ("padded-116", 116, 116, make_plan(116, 116, 4).radices),
    ("expand-24-40", 24, 40, (4, 3, 2)),
    ("expand-32-64", 32, 64, (4, 4, 2)),
    ("contract-64-24", 64, 24, (4, 3, 2)),
    ("contract-40-24", 40, 24, (4, 3, 2)),
    ("large-prime-radix", 11, 11, (13,)),
    ("radix-7-last", 14, 14, (2, 7)),
    ("identity-blocks", 1, 3, ()),
]
# (batch, pixels): NCHW with P a multiple of 16 (rows written in place), P not a multiple of 16
# (image tails packed into one tile), P < 16, and channels-last / linear rows (P == 1)
LAYOUTS = [(2, 256), (2, 49), (1, 221), (5, 20), (3, 5), (37, 1), (70, 1), (1, 1)]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("steps", ["", "scale", "shift", "add", "affine", "affine+add",
                                   "scale+add", "shift+add"])
def test_every_step_on_and_off(act, steps, one_thread):
    for (_, cin, cout, radices), (batch, pixels) in itertools.product(
            [SHAPES[0], SHAPES[7], SHAPES[9]], [(2, 64), (2, 49), (40, 1)]):
        check(cin, cout, radices, batch, pixels, torch.float32, act, steps)
        check(cin, cout, radices, batch, pixels, torch.float64, act, steps, both=False)


@pytest.mark.parametrize("name,cin,cout,radices", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_shape_and_layout(name, cin, cout, radices, dtype, one_thread):
    for k, (batch, pixels) in enumerate(LAYOUTS):
        act = ACTIVATIONS[k % len(ACTIVATIONS)]
        check(cin, cout, radices, batch, pixels, dtype, act, both=k < 2)
    check(cin, cout, radices, 3, 49, dtype, "hardswish", residual=False, both=False)
    check(cin, cout, radices, 37, 1, dtype, "relu", residual=False, both=False)


# the channels-as-lanes kernel's last stage applies the epilogue in registers (rows of
# channels, float32, radices 2 and 4, n a multiple of the vector length); padded, expanding and
# contracting plans apply it in their store instead
LANE_SHAPES = [("base4-256", 256, 256, (4, 4, 4, 4)), ("base2-64", 64, 64, (2,) * 6),
               ("radix2-last-128", 128, 128, (4, 4, 4, 2)), ("expand-64-128", 64, 128, (4, 4, 4)),
               ("expand-48-160", 48, 160, (4, 4, 4)), ("contract-160-48", 160, 48, (4, 4, 4))]


@pytest.mark.parametrize("name,cin,cout,radices", LANE_SHAPES, ids=[s[0] for s in LANE_SHAPES])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_rows_of_channels_lanes_kernel(name, cin, cout, radices, act, one_thread):
    for rows, steps in ((1, "affine+add"), (33, "affine"), (300, "shift+add")):
        check(cin, cout, radices, rows, 1, torch.float32, act, steps, both=rows == 33)
    check(cin, cout, radices, 70, 1, torch.float32, act, "affine+add", residual=False,
          both=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,cin,cout,radices", [SHAPES[0], SHAPES[5], SHAPES[7], SHAPES[9]],
                         ids=["square", "mixed-radix", "expand", "contract"])
def test_low_precision(dtype, name, cin, cout, radices, one_thread):
    """bfloat16 / float16 compute in float32 and round once, like the reference in float32."""
    for act, (batch, pixels) in zip(ACTIVATIONS, [(2, 64), (2, 49), (40, 1), (1, 1), (3, 20)]):
        check(cin, cout, radices, batch, pixels, dtype, act)


@pytest.mark.parametrize("cin,cout,pixels", [(64, 64, 256), (64, 64, 196), (64, 64, 1),
                                             (24, 24, 1), (64, 24, 1), (16, 32, 1),
                                             (32, 64, 196)])
def test_outputs_large_enough_to_stream(cin, cout, pixels):
    """Outputs of 8 MB or more go out with streaming stores: NCHW rows from the last run (P = 256)
    or from the tile buffer (P = 196: rows not vector-aligned), channels-last rows transposed in
    registers (64), staged whole pixel rows (24, the contracting sum, the gathered expanding
    blocks)."""
    radices = make_plan(cin, cout, 4).radices
    batch = (8 << 20) // (4 * cout * pixels) + 3
    x, w, scale, shift, add = arguments(cin, cout, radices, batch, pixels, torch.float32)
    want = oracle(x, w, radices, cout, True, scale, shift, "relu6", add)
    # streaming needs output pages already in memory (fresh ones are written through the cache):
    # the allocator hands later calls the memory earlier ones freed
    for _ in range(3):
        assert_close(fused_op(x, w, radices, cout, True, scale, shift, "relu6", add), want)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (_, cin, cout, radices), (batch, pixels) in itertools.product(
                [SHAPES[1], SHAPES[5], SHAPES[8], SHAPES[9]], [(4, 196), (3, 49), (300, 1)]):
            check(cin, cout, radices, batch, pixels, torch.float32, "hardswish", both=False)
    finally:
        torch.set_num_threads(before)


def test_batch_of_one_and_empty(one_thread):
    for pixels in (1, 49, 256):
        check(24, 40, (4, 3, 2), 1, pixels, torch.float32, "relu")
    for batch, pixels in ((0, 49), (0, 1), (3, 0)):
        x, w, scale, shift, add = arguments(24, 40, (4, 3, 2), batch, pixels, torch.float32)
        for fn in (fused_op, fused):
            y = fn(x, w, (4, 3, 2), 40, True, scale, shift, "relu", add)
            assert y.shape == (batch, 40, pixels) and y.dtype == torch.float32


def test_empty_epilogue_is_the_plain_forward(one_thread):
    """No step, or steps that change nothing (scale 1, shift 0), give the plain forward's bits."""
    for cin, cout, radices in [(64, 64, (4, 4, 4)), (24, 40, (4, 3, 2)), (64, 24, (4, 3, 2))]:
        for batch, pixels in [(2, 49), (2, 256), (37, 1)]:
            x, w, _, _, _ = arguments(cin, cout, radices, batch, pixels, torch.float32)
            plain = torch.ops.butterfly_cpu.forward(x, w, list(radices), cout, True)
            none = torch.ops.butterfly_cpu.forward_fused(x, w, list(radices), cout, True, None,
                                                         None, "none", None)
            unit = torch.ops.butterfly_cpu.forward_fused(x, w, list(radices), cout, True,
                                                         torch.ones(cout), torch.zeros(cout),
                                                         "none", None)
            assert torch.equal(plain, none) and torch.equal(plain, unit)


def test_activation_edges(one_thread):
    """Values at and across the clamps, infinities and NaN (from the shift), as PyTorch's
    activations give them, in NCHW rows and channels-last rows."""
    w = torch.zeros(1, BFTPlan(16, 16, (4, 4)).weights_per_block)  # with the residual: y = x
    x = torch.tensor([-7.0, -6.0, -3.0, -1.0, -0.0, 0.0, 1.0, 3.0, 5.9, 6.0, 7.0, 2.5, -2.5, 1e30,
                      -1e30, 0.5]).repeat(4, 16, 1)
    shift = torch.zeros(16)
    shift[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    for xs in (x, x.transpose(1, 2).reshape(64, 16, 1)):
        for act in ACTIVATIONS:
            got = torch.ops.butterfly_cpu.forward_fused(xs, w, [4, 4], 16, True, None, shift, act,
                                                        None)
            want = apply_epilogue(xs, None, shift, act, None, torch.float32)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_bad_arguments_say_what_is_expected():
    x, w, scale, shift, add = arguments(24, 40, (4, 3, 2), 2, 9, torch.float32)
    op = torch.ops.butterfly_cpu.forward_fused

    def call(scale=scale, shift=shift, act="relu", add=add, x=x):
        return op(x, w, [4, 3, 2], 40, True, scale, shift, act, add)

    with pytest.raises(RuntimeError, match=r"scale must have shape \(40,\).*got \[24\]"):
        call(scale=torch.ones(24))
    with pytest.raises(RuntimeError, match=r"shift must have shape \(40,\)"):
        call(shift=torch.ones(1, 40))
    with pytest.raises(RuntimeError, match=r"add must have the output's shape \(2, 40, 9\)"):
        call(add=torch.ones(2, 24, 9))
    with pytest.raises(RuntimeError, match="add must be a CPU tensor of x's dtype"):
        call(add=add.double())
    with pytest.raises(RuntimeError, match="unknown epilogue activation 'gelu'.*hardswish"):
        call(act="gelu")
    with pytest.raises(RuntimeError, match="expected weight of shape"):
        op(x, w[:, 1:], [4, 3, 2], 40, True, scale, shift, "relu", add)
    plan = BFTPlan(24, 40, (4, 3, 2))
    with use_backend("cpu"):
        with pytest.raises(ValueError, match=r"scale must have shape \(40,\)"):
            bft_fused(x, w, plan, True, Epilogue(torch.ones(24), None, "relu"))
        with pytest.raises(ValueError, match="add must have the output's shape"):
            bft_fused(x, w, plan, True, Epilogue(None, None, "relu", True), torch.ones(2, 24, 9))
    with pytest.raises(ValueError, match="unknown epilogue activation"):
        Epilogue(None, None, "gelu")


def test_scale_and_shift_of_another_dtype_are_converted(one_thread):
    x, w, scale, shift, add = arguments(24, 40, (4, 3, 2), 2, 49, torch.float32,
                                        scale_dtype=torch.float64)
    want = oracle(x, w, (4, 3, 2), 40, True, scale.float(), shift.float(), "relu", add)
    assert_close(fused(x, w, (4, 3, 2), 40, True, scale, shift, "relu", add), want)
    assert_close(fused_op(x, w, (4, 3, 2), 40, True, scale, shift, "relu", add), want)


def test_bft_fused_runs_the_kernel_and_compiles(one_thread):
    """On the "cpu" backend bft_fused is the kernel's fused form (the same bits as the C++
    operator, not the plain forward followed by PyTorch ops), and torch.compile traces it whole."""
    x, w, scale, shift, add = arguments(24, 40, (4, 3, 2), 3, 49, torch.float32)
    want = fused_op(x, w, (4, 3, 2), 40, True, scale, shift, "hardswish", add)
    assert torch.equal(fused(x, w, (4, 3, 2), 40, True, scale, shift, "hardswish", add), want)
    plan, epilogue = BFTPlan(24, 40, (4, 3, 2)), Epilogue(scale, shift, "hardswish", True)
    with use_backend("cpu"):
        compiled = torch.compile(lambda x, add: bft_fused(x, w, plan, True, epilogue, add),
                                 fullgraph=True)
        assert_close(compiled(x, add), want)


def test_fake_tensor_registration():
    x, w, scale, shift, add = arguments(12, 20, (4, 3), 2, 5, torch.float32)
    op = torch.ops.butterfly_cpu.forward_fused.default
    for args in ((x, w, [4, 3], 20, True, scale, shift, "hardswish", add),
                 (x, w, [4, 3], 20, False, None, None, "none", None)):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
