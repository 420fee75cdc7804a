"""The Triton backend against the reference, without a GPU.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which triton reads when ``@jit``
runs (at import): ``test_interpreter`` re-runs this file in a subprocess with it set, where the
``interpreted`` tests run. In the main process the ``compiled`` tests build the same kernels for
sm_90 (catching code the interpreter accepts but the compiler does not), trace the launches the
way ``torch.compile`` does, and run ``opcheck`` on the operator.
"""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from butterfly import BFT, use_backend
from butterfly.kernels import triton_bft
from butterfly.plan import BFTPlan
from butterfly.reference import bft_reference, bft_reference_backward

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
def test_many_programs_deterministic(case, monkeypatch):
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


@compiled
def test_interpreter():
    """Runs the ``interpreted`` tests of this file in a TRITON_INTERPRET=1 subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p",
                          "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, summary
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 20, summary


# ---------------------------------------------------------------- compiled (main process)

def _sm90_compile(kernel, signature, constexprs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@compiled
@pytest.mark.parametrize("radices, dtype, channels_last", [((4, 3), "bf16", False),
                                                           ((2, 2, 2), "fp32", True)])
def test_kernels_build_for_sm90(radices, dtype, channels_last):
    """The kernels compile to a cubin for sm_90 (the interpreter accepts code that the compiler
    rejects, e.g. reassigned constexprs), including the padded mixed-radix path."""
    from butterfly.kernels.triton_kernels import bft_kernel, bft_wgrad_kernel
    geo = triton_bft.Geometry.of(radices).constexprs()
    flags = dict(BP=8, CHANNELS_LAST=channels_last, RESIDUAL=True, F64=False)
    ints = {name: "i32" for name in ("NPIX", "TILES_PER_IMG", "C_SRC", "C_DST", "M", "T", "W")}
    fwd = _sm90_compile(bft_kernel, {"src_ptr": "*" + dtype, "w_ptr": "*fp32",
                                     "dst_ptr": "*" + dtype, **ints},
                        {**geo, **flags, "EXPAND": False, "TRANSPOSE": True})
    ints = {name: "i32" for name in ("NPIX", "TILES_PER_IMG", "NUM_TILES", "C_IN", "C_OUT", "M",
                                     "W")}
    wgrad = _sm90_compile(bft_wgrad_kernel, {"x_ptr": "*" + dtype, "g_ptr": "*" + dtype,
                                             "w_ptr": "*fp32", "part_ptr": "*fp32",
                                             "dx_ptr": "*" + dtype, **ints},
                          {**geo, **flags, "EXPAND": True, "LO": int(channels_last),
                           "HI": len(radices), "FUSE_DX": not channels_last})
    for kernel in (fwd, wgrad):
        assert kernel.asm["cubin"]


@compiled
def test_traced_for_torch_compile(monkeypatch):
    """On (fake) CUDA tensors the operator decomposes into ``wrap_triton`` kernel calls, as
    torch.compile's AOT dispatcher traces it, and triton's analysis of the kernels finds that
    they write only their outputs (so Inductor need not clone the inputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from triton.backends.compiler import GPUTarget

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda self: Sm90()))
    monkeypatch.setattr(triton_bft, "_num_partials", lambda x, tiles, blocks: 3)

    def forward_backward(x, w, grad):
        y = torch.ops.butterfly.bft(x, w, [4, 3], 20, True)
        return y, torch.ops.butterfly.bft_backward(grad, x, w, [4, 3], 20, True)

    with FakeTensorMode():
        args = (torch.empty(2, 12, 5, device="cuda"), torch.empty(2, 84, device="cuda"),
                torch.empty(2, 20, 5, device="cuda"))
    with use_backend("triton"):
        graph = make_fx(dispatch_functionalize(forward_backward), tracing_mode="fake")(*args)
    calls = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert "butterfly" not in graph.code
    # forward, input gradient, weight gradient (two blocks: the input gradient is not fused)
    assert [n.kwargs["tensors_to_clone"] for n in calls] == [["dst_ptr"], ["dst_ptr"],
                                                             ["part_ptr"]]


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
