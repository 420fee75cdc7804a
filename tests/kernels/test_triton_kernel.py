"""The Triton backend against the reference, without a GPU.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which triton reads when ``@jit``
runs (at import): ``test_interpreter`` re-runs this file in a subprocess with it set, where the
``interpreted`` tests run. In the main process the ``compiled`` tests build the same kernels for
sm_90 (catching code the interpreter accepts but the compiler does not), trace the launches the
way ``torch.compile`` does, and run ``opcheck`` on the operator.
"""
import contextlib
import itertools
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from butterfly import BFT, use_backend
from butterfly.ops import bft_fused as epilogue
from butterfly.ops.bft_fused import ACTIVATIONS, Epilogue, apply_epilogue, bft_fused
from butterfly.kernels.triton import bft as triton_bft
from butterfly.plan import BFTPlan
from butterfly.ops.reference import bft_reference, bft_reference_backward, compute_dtype

INTERPRET = triton_bft.INTERPRETED
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in test_interpreter's subprocess")
compiled = pytest.mark.skipif(INTERPRET, reason="needs triton's compiler, not the interpreter")

# (name, batch, in, out, pixels, radices); pixels == 1 is the channels-last layout
CASES = [
    ("base4-square-nchw", 2, 16, 16, 6, (4, 4)),
    ("base2-square-channels_last", 9, 16, 16, 1, (2, 2, 2, 2)),
    ("base8-nchw", 2, 16, 16, 3, (8, 2)),
    ("mixed-radix-nchw", 2, 24, 24, 5, (4, 3, 2)),
    ("mixed-radix5-nchw", 2, 40, 40, 3, (4, 5, 2)),
    ("padded-channels_last", 9, 10, 10, 1, (4, 3)),
    ("expand-nchw", 2, 8, 20, 5, (4, 2)),
    ("expand-mixed-channels_last", 9, 12, 20, 1, (4, 3)),
    ("contract-mixed-nchw", 2, 20, 12, 5, (4, 3)),
    ("contract-channels_last", 9, 20, 8, 1, (4, 2)),
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(batch, cin, cout, pixels, radices, dtype):
    plan = BFTPlan(cin, cout, radices)
    x = torch.randn(batch, cin, pixels, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(plan.num_blocks, plan.weights_per_block)).requires_grad_()
    grad = torch.randn(batch, cout, pixels, dtype=dtype)
    return x, w, grad


@pytest.fixture
def fresh_launches():
    """Launches are cached per layer and shape: a test that patches a launch rule starts and
    ends with an empty cache."""
    triton_bft.clear_caches()
    yield
    triton_bft.clear_caches()


def _assert_close(got, want, tol):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(want.double().abs().max().item(), 1.0), f"max error {err}"


def _triton_and_reference(x, w, grad, radices, cout, residual=True):
    with use_backend("triton"):
        y = torch.ops.butterfly.bft(x, w, list(radices), cout, residual)
        gx, gw = torch.autograd.grad(y, (x, w), grad)
    want = bft_reference(x.detach(), w.detach(), radices, cout, residual)
    want_gx, want_gw = bft_reference_backward(grad, x.detach(), w.detach(), radices, cout, residual)
    return (y, gx, gw), (want, want_gx, want_gw)


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case):
    _, batch, cin, cout, pixels, radices = case
    x, w, grad = _inputs(batch, cin, cout, pixels, radices, torch.float32)
    got, want = _triton_and_reference(x, w, grad, radices, cout)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype and g.is_contiguous()
        _assert_close(g, r, TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_weight_load_paths(case, monkeypatch, fresh_launches):
    """A stage loads its weights in one coalesced load when it has at least as many weights as
    the program has threads, else weight by weight: with one warp (32 threads) the tiny cases
    take the coalesced path that 4 warps leave to the larger layers."""
    config = triton_bft._launch_config
    monkeypatch.setattr(triton_bft, "_launch_config",
                        lambda geo, npix, backward: (config(geo, npix, backward)[0], 1))
    _, batch, cin, cout, pixels, radices = case
    x, w, grad = _inputs(batch, cin, cout, pixels, radices, torch.float32)
    got, want = _triton_and_reference(x, w, grad, radices, cout)
    for g, r in zip(got, want):
        _assert_close(g, r, TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [CASES[3], CASES[7]], ids=[CASES[3][0], CASES[7][0]])
def test_dtypes(case, dtype):
    """Half inputs accumulate in float32 (as the reference does); float64 stays float64."""
    _, batch, cin, cout, pixels, radices = case
    x, w, grad = _inputs(batch, cin, cout, pixels, radices, dtype)
    got, want = _triton_and_reference(x, w, grad, radices, cout)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        _assert_close(g, r, TOL[dtype])


@interpreted
def test_no_residual():
    x, w, grad = _inputs(2, 20, 12, 5, (4, 3), torch.float32)
    got, want = _triton_and_reference(x, w, grad, (4, 3), 12, residual=False)
    for g, r in zip(got, want):
        _assert_close(g, r, TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("case", [CASES[3], CASES[9]], ids=[CASES[3][0], CASES[9][0]])
def test_many_programs_deterministic(case, monkeypatch, fresh_launches):
    """Small tiles: several programs, ragged last tile, two partial weight-gradient rows per
    block, one weight-gradient launch per stage (as for wide butterflies on a GPU); the
    gradients are bit-identical on repeated runs."""
    monkeypatch.setattr(triton_bft, "_launch_config", lambda geo, npix, backward: (2, 4))
    monkeypatch.setattr(triton_bft, "ACC_PER_THREAD", 0)
    _, batch, cin, cout, pixels, radices = case
    x, w, grad = _inputs(batch, cin, cout, max(pixels, 5) if pixels > 1 else 1, radices,
                         torch.float32)
    grad = torch.randn(x.shape[0], cout, x.shape[2])
    first, want = _triton_and_reference(x, w, grad, radices, cout)
    second, _ = _triton_and_reference(x, w, grad, radices, cout)
    for g, r in zip(first, want):
        _assert_close(g, r, TOL[torch.float32])
    assert torch.equal(first[2], second[2]) and torch.equal(first[1], second[1])


@interpreted
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_module_layouts(memory_format):
    """Through the BFT module: both memory formats reach the kernel without a transposing copy
    and the output keeps the input's format."""
    layer = BFT(12, 24, base=4)
    x = torch.randn(2, 12, 3, 5).to(memory_format=memory_format).requires_grad_()
    with use_backend("triton"):
        y = layer(x)
        y.square().sum().backward()
    gx, gw = x.grad, layer.weight.grad
    x.grad = layer.weight.grad = None
    with use_backend("reference"):
        want = layer(x)
        want.square().sum().backward()
    assert y.is_contiguous(memory_format=memory_format)
    _assert_close(y, want, TOL[torch.float32])
    _assert_close(gx, x.grad, TOL[torch.float32])
    _assert_close(gw, layer.weight.grad, TOL[torch.float32])


@interpreted
def test_autocast():
    """Under autocast the operator keeps the dtype it is given (the conv before it hands it
    bfloat16, the weight stays float32) and accumulates in float32."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), BFT(16, 16))
    x = torch.randn(2, 3, 4, 4)
    results = []
    for backend in ("triton", "reference"):
        net.zero_grad()
        with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
            y.float().square().sum().backward()
        results.append((y, net[1].weight.grad.clone()))
    (y, gw), (want, want_gw) = results
    assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32
    _assert_close(y, want, TOL[torch.bfloat16])
    _assert_close(gw, want_gw, TOL[torch.bfloat16])


@interpreted
def test_unsupported_plan_delegates_with_warning():
    """A radix above the kernel's limit runs the reference, and says so once."""
    x, w, grad = _inputs(2, 17, 17, 3, (17,), torch.float32)
    with pytest.warns(UserWarning, match="radix above"):
        got, want = _triton_and_reference(x, w, grad, (17,), 17)
    for g, r in zip(got, want):
        _assert_close(g, r, TOL[torch.float32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _triton_and_reference(x, w, grad, (17,), 17)


@interpreted
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[7], CASES[9]],
                         ids=[CASES[i][0] for i in (3, 5, 7, 9)])
def test_infinite_input_stays_infinite(case):
    """An infinite input gives infinite outputs, as in the reference: no stage starts its sum from
    ``x * 0`` (which is NaN for an infinite ``x``). Forward, fused forward and input gradient (the
    transposed stages), with positive weights so that no two infinities cancel."""
    _, batch, cin, cout, pixels, radices = case
    plan = BFTPlan(cin, cout, radices)
    x = torch.randn(batch, cin, pixels)
    x[0, 1, 0], x[-1, cin - 1, -1] = float("inf"), -float("inf")
    w = torch.rand(plan.num_blocks, plan.weights_per_block) + 0.1
    grad = torch.randn(batch, cout, pixels)
    grad[0, 0, 0] = float("inf")
    with use_backend("triton"):
        y = torch.ops.butterfly.bft(x, w, list(radices), cout, True)
        gx, _ = torch.ops.butterfly.bft_backward(grad, x, w, list(radices), cout, True)
        fused = torch.ops.butterfly.bft_fused(x, w, list(radices), cout, True, None, None,
                                              "relu", None)
    want = bft_reference(x, w, radices, cout, True)
    want_gx, _ = bft_reference_backward(grad, x, w, radices, cout, True)
    assert want.isinf().any() and not want.isnan().any() and not want_gx.isnan().any()
    torch.testing.assert_close(y, want, equal_nan=True)
    torch.testing.assert_close(gx, want_gx, equal_nan=True)
    torch.testing.assert_close(fused, want.relu(), equal_nan=True)


# ---------------------------------------------------------------- fused epilogue (interpreted)

FUSED_CASES = [CASES[i] for i in (0, 1, 3, 5, 6, 7, 8, 9)]


@contextlib.contextmanager
def _fused_kernel_only():
    """The triton backend's fused form must run: the unfused fallback (forward, then
    ``apply_epilogue``) raises."""
    def unfused(*args):
        raise AssertionError("bft_fused ran the unfused fallback, not the triton kernel")

    original, epilogue.apply_epilogue = epilogue.apply_epilogue, unfused
    try:
        with use_backend("triton"):
            yield
    finally:
        epilogue.apply_epilogue = original


def _fused_and_reference(case, dtype=torch.float32, scale=True, shift=True, activation="relu",
                         add=True, residual=True):
    """``bft_fused`` on the triton kernel, and ``apply_epilogue`` on the reference transform in
    the compute dtype (one rounding, at the end). Scale and shift are float32 (as BatchNorm's
    buffers stay under autocast), the add has the input's dtype."""
    _, batch, cin, cout, pixels, radices = case
    plan = BFTPlan(cin, cout, radices)
    gen = torch.Generator().manual_seed(cin * 100 + cout)
    x = torch.randn(batch, cin, pixels, generator=gen).to(dtype)
    w = 0.5 * torch.randn(plan.num_blocks, plan.weights_per_block, generator=gen)
    s = 2 * torch.randn(cout, generator=gen) if scale else None
    b = torch.randn(cout, generator=gen) if shift else None
    a = torch.randn(batch, cout, pixels, generator=gen).to(dtype) if add else None
    with _fused_kernel_only():
        got = bft_fused(x, w, plan, residual, Epilogue(s, b, activation, add), a)
    y = bft_reference(x.to(compute_dtype(x, w)), w, radices, cout, residual)
    want = apply_epilogue(y, s, b, activation, a, x.dtype)
    assert got.shape == want.shape and got.dtype == x.dtype and got.is_contiguous()
    return got, want


@interpreted
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_fused_matches_reference(case, activation):
    """Every activation with scale, shift and add, on square, padded, mixed-radix, expand (per
    block) and contract (after the sum over blocks) plans in both layouts."""
    got, want = _fused_and_reference(case, activation=activation)
    _assert_close(got, want, TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("activation", ["none", "hardsigmoid"])
@pytest.mark.parametrize("scale, shift, add", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("case", [CASES[6], CASES[9]], ids=[CASES[6][0], CASES[9][0]])
def test_fused_steps(case, scale, shift, add, activation):
    """Each step on or off; with none on, the result is the plain forward's, bit for bit."""
    got, want = _fused_and_reference(case, scale=scale, shift=shift, activation=activation,
                                     add=add)
    _assert_close(got, want, TOL[torch.float32])
    if not (scale or shift or add) and activation == "none":
        _, batch, cin, cout, pixels, radices = case
        plan = BFTPlan(cin, cout, radices)
        gen = torch.Generator().manual_seed(cin * 100 + cout)
        x = torch.randn(batch, cin, pixels, generator=gen)
        w = 0.5 * torch.randn(plan.num_blocks, plan.weights_per_block, generator=gen)
        with use_backend("triton"):
            assert torch.equal(got, torch.ops.butterfly.bft(x, w, list(radices), cout, True))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[9]],
                         ids=[CASES[3][0], CASES[7][0], CASES[9][0]])
def test_fused_dtypes(case, dtype):
    """Half inputs run the epilogue in float32 and round once at the store; float64 stays
    float64."""
    got, want = _fused_and_reference(case, dtype, activation="hardswish")
    _assert_close(got, want, TOL[dtype])


@interpreted
def test_fused_no_residual():
    got, want = _fused_and_reference(CASES[8], activation="relu6", residual=False)
    _assert_close(got, want, TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("case", [CASES[6], CASES[9]], ids=[CASES[6][0], CASES[9][0]])
def test_fused_many_programs(case, monkeypatch, fresh_launches):
    """Tiles of two pixels (rows): the epilogue's loads are masked like the store on the ragged
    last tile."""
    monkeypatch.setattr(triton_bft, "_launch_config", lambda geo, npix, backward: (2, 4))
    got, want = _fused_and_reference(case, activation="hardswish")
    _assert_close(got, want, TOL[torch.float32])


@interpreted
def test_fused_nan_propagates():
    """A NaN reaching the activation stays NaN (as in PyTorch), for every activation."""
    _, batch, cin, cout, pixels, radices = CASES[0]
    x = torch.randn(batch, cin, pixels)
    w = 0.5 * torch.randn(1, BFTPlan(cin, cout, radices).weights_per_block)
    shift = torch.zeros(cout)
    shift[3] = float("nan")
    y = bft_reference(x, w, radices, cout, True)
    for activation in ACTIVATIONS:
        with _fused_kernel_only():
            got = torch.ops.butterfly.bft_fused(x, w, list(radices), cout, True, None, shift,
                                                activation, None)
        torch.testing.assert_close(got, apply_epilogue(y, None, shift, activation, None,
                                                       x.dtype), equal_nan=True)
        assert got[:, 3].isnan().all() and not got[:, :3].isnan().any()


@interpreted
def test_fused_empty_batch():
    plan = BFTPlan(12, 20, (4, 3))
    x, w = torch.randn(0, 12, 3), torch.randn(plan.num_blocks, plan.weights_per_block)
    with _fused_kernel_only():
        y = bft_fused(x, w, plan, True, Epilogue(torch.ones(20), None, "relu", True),
                      torch.randn(0, 20, 3))
    assert y.shape == (0, 20, 3)


@interpreted
def test_fused_errors():
    """Epilogue arguments that do not fit the layer fail clearly, also when the operator is
    called directly (the kernel would read out of bounds)."""
    plan = BFTPlan(12, 20, (4, 3))
    x, w = torch.randn(2, 12, 3), torch.randn(plan.num_blocks, plan.weights_per_block)
    op, args = torch.ops.butterfly.bft_fused, (x, w, [4, 3], 20, True)
    with use_backend("triton"):
        with pytest.raises(ValueError, match=r"scale must have shape \(20,\)"):
            bft_fused(x, w, plan, True, Epilogue(scale=torch.ones(12)))
        with pytest.raises(ValueError, match=r"shift must have shape \(20,\)"):
            op(*args, None, torch.ones(1, 20), "none", None)
        with pytest.raises(ValueError, match=r"add must have the output's shape \(2, 20, 3\)"):
            bft_fused(x, w, plan, True, Epilogue(add=True), torch.randn(2, 12, 3))
        with pytest.raises(ValueError, match=r"add must have the output's shape"):
            op(*args, None, None, "none", torch.randn(2, 20, 1))
        with pytest.raises(ValueError, match="unknown epilogue activation 'gelu'"):
            Epilogue(activation="gelu")
        with pytest.raises(ValueError, match="unknown epilogue activation 'gelu'"):
            op(*args, None, None, "gelu", None)
        with pytest.raises(ValueError, match="scale is on meta but the input is on cpu"):
            op(*args, torch.ones(20, device="meta"), None, "none", None)


@compiled
def test_interpreter():
    """Runs the ``interpreted`` tests of this file in a TRITON_INTERPRET=1 subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p",
                          "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, summary
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 124, summary


# ---------------------------------------------------------------- compiled (main process)

# Builds for sm_90 of the launches the library makes (tests/kernels/test_triton_aot.py builds
# every production configuration); the interpreter accepts code that the compiler rejects.

def _build(launch):
    from butterfly.kernels.triton import aot
    return aot.compile_launch(launch, 90)


def _layer(cin, cout, radices):
    return triton_bft.layer_of(cin, cout, tuple(radices))


@compiled
@pytest.mark.parametrize("radices, channels_last", [((4, 3, 2), False), ((2, 2), True)])
def test_float64_kernels_build_for_sm90(radices, channels_last):
    """float64 compiles for sm_90: forward, fused forward and weight gradient (the interpreter
    accepted a helper that returned float64 in one constexpr branch and float32 after it)."""
    n = 24 if len(radices) == 3 else 4
    layer = _layer(n, n, radices)
    shape = (64, n, 1) if channels_last else (2, n, 49)
    f64 = torch.float64
    launches = [triton_bft.forward_launch(layer, shape, f64, f64, False, True),
                triton_bft.forward_launch(layer, shape, f64, f64, False, True,
                                          (torch.float32, torch.float32, 3, True)),
                *triton_bft.backward_launches(layer, shape, f64, f64, True, 132).weight_grad]
    for launch in launches:
        assert _build(launch).asm["cubin"]


def _instructions(kernel, signature):
    """The kernel's PTX instructions as a sorted list (order and register numbers dropped),
    parameters named by argument (``None`` pointers are constexprs, not parameters)."""
    names = [n for n, t in signature.items() if t != "constexpr"] + ["scratch"] * 8
    ptx = kernel.asm["ptx"]
    ptx = re.sub(r"_param_(\d+)", lambda m: "_" + names[int(m.group(1))],
                 ptx[ptx.index(")", ptx.index(".entry")):ptx.index("\n}")])
    ptx = re.sub(r"%[a-z]+\d+", "%", ptx)
    return sorted(line.strip() for line in ptx.splitlines()
                  if line.strip() and not line.strip().startswith((".loc", ".reg", "//", "$")))


@compiled
@pytest.mark.parametrize("cin, cout, radices, dtype, channels_last, act",
                         [(12, 20, (4, 3), torch.bfloat16, False, 3),
                          (16, 8, (2, 2, 2), torch.float32, True, 2)])
def test_fused_kernel_builds_for_sm90(cin, cout, radices, dtype, channels_last, act):
    """The forward kernel with its epilogue (float32 scale/shift, activation, add) compiles for
    sm_90, per block (expand) and after the sum over blocks (contract). With the flags off the
    epilogue compiles to nothing: the same instructions (up to order) whether its pointers are
    ``None`` (as the plain forward launches it) or real."""
    import dataclasses
    from butterfly.kernels.triton import aot
    layer = _layer(cin, cout, radices)
    shape = (64, cin, 1) if channels_last else (2, cin, 8)
    fused = triton_bft.forward_launch(layer, shape, dtype, torch.float32, False, True,
                                      (torch.float32, torch.float32, act, True))
    plain = triton_bft.forward_launch(layer, shape, dtype, torch.float32, False, True)
    unused = dataclasses.replace(plain, pointers=fused.pointers)
    builds = {name: (_build(launch), aot.source_of(launch).signature)
              for name, launch in (("fused", fused), ("plain", plain), ("unused", unused))}
    assert builds["fused"][0].asm["cubin"]
    assert _instructions(*builds["unused"]) == _instructions(*builds["plain"])
    assert len(_instructions(*builds["fused"])) > len(_instructions(*builds["plain"]))


@compiled
def test_activation_codes_cover_the_epilogue():
    """Every activation of the operator has a kernel code, and no two share one."""
    assert sorted(triton_bft.ACT_CODES) == sorted(ACTIVATIONS)
    assert sorted(triton_bft.ACT_CODES.values()) == list(range(len(ACTIVATIONS)))


@pytest.fixture
def fake_sm90(monkeypatch):
    """Triton's driver reports an sm_90 GPU (for tracing on fake CUDA tensors)."""
    from triton.backends.compiler import GPUTarget

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda self: Sm90()))


def _trace_on_fake_cuda(fn, *shapes):
    """``fn`` traced as torch.compile's AOT dispatcher does, on fake CUDA tensors of ``shapes``
    (``None``: an argument left ``None``); returns the graph and its kernel calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        args = [None if s is None else torch.empty(*s, device="cuda") for s in shapes]
    with use_backend("triton"):
        graph = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
    return graph, [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]


@compiled
def test_traced_for_torch_compile(fake_sm90, monkeypatch, fresh_launches):
    """On (fake) CUDA tensors the operator decomposes into ``wrap_triton`` kernel calls, as
    torch.compile's AOT dispatcher traces it, and triton's analysis of the kernels finds that
    they write only their outputs (so Inductor need not clone the inputs)."""
    monkeypatch.setattr(triton_bft, "_num_partials", lambda sms, tiles, blocks: 3)

    def forward_backward(x, w, grad):
        y = torch.ops.butterfly.bft(x, w, [4, 3], 20, True)
        return y, torch.ops.butterfly.bft_backward(grad, x, w, [4, 3], 20, True)

    graph, calls = _trace_on_fake_cuda(forward_backward, (2, 12, 5), (2, 84), (2, 20, 5))
    assert "butterfly" not in graph.code
    # forward, input gradient, weight gradient (two blocks: the input gradient is not fused)
    assert [n.kwargs["tensors_to_clone"] for n in calls] == [["dst_ptr"], ["dst_ptr"],
                                                             ["part_ptr"]]


@compiled
@pytest.mark.parametrize("cin, cout, radices", [(12, 20, [4, 3]), (20, 12, [4, 3])])
def test_fused_traced_for_torch_compile(fake_sm90, cin, cout, radices):
    """``butterfly::bft_fused`` decomposes into one ``wrap_triton`` call of the forward kernel
    (epilogue flags on, ``None`` for a step left off) that writes only its output."""
    def fused(x, w, scale, shift, add):
        return torch.ops.butterfly.bft_fused(x, w, radices, cout, True, scale, shift,
                                             "hardswish", add)

    blocks = -(-max(cin, cout) // min(cin, cout))
    graph, calls = _trace_on_fake_cuda(fused, (2, cin, 5), (blocks, 84), (cout,), None,
                                       (2, cout, 5))
    assert "butterfly" not in graph.code and len(calls) == 1
    assert calls[0].kwargs["tensors_to_clone"] == ["dst_ptr"]
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    kwargs = {**calls[0].kwargs["kwargs"],
              **kernel_side_table.get_constant_args(calls[0].kwargs["constant_args_idx"])}
    assert kwargs["shift_ptr"] is None and kwargs["HAS_SCALE"] and not kwargs["HAS_SHIFT"]
    assert kwargs["ACT"] == triton_bft.ACT_CODES["hardswish"] and kwargs["HAS_ADD"]


@compiled
@pytest.mark.parametrize("shape", [(3, 12, 20, 1), (2, 20, 12, 4)])
def test_opcheck_reference(shape):
    """opcheck (schema, fake tensor, autograd registration, AOT dispatch) with the CPU
    reference backend; the triton backend needs a GPU for it."""
    batch, cin, cout, pixels = shape
    plan = BFTPlan(cin, cout, (4, 3) if min(cin, cout) == 12 else (4, 4))
    x, w, grad = _inputs(batch, cin, cout, pixels, plan.radices, torch.float32)
    args = (list(plan.radices), cout, True)
    with use_backend("reference"):
        torch.library.opcheck(torch.ops.butterfly.bft, (x, w, *args))
        torch.library.opcheck(torch.ops.butterfly.bft_backward, (grad, x.detach(), w.detach(),
                                                                 *args))


@compiled
def test_cpu_without_interpreter_is_refused():
    assert not triton_bft.triton_available(torch.device("cpu"))
    x = torch.randn(1, 16, 1)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        torch.ops.butterfly.bft(x, torch.randn(1, 128), [4, 4], 16, True)
