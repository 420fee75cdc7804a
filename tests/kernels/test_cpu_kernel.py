"""The fused C++ CPU kernel ("cpu" backend) against the pure-PyTorch reference.

The oracle is autograd through ``bft_reference``: outputs, input gradients and weight gradients
must match for every shape class of the layer (square power, mixed radix, padded, expand,
contract), both layouts (NCHW: P > 1; channels-last and linear: P == 1), odd spatial sizes, and
float64 / float32 / bfloat16. The first test to run compiles the kernel (cached afterwards).
"""
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from butterfly import BFT, BFTLinear, use_backend
from butterfly.kernels.cpu import build as cpu
from butterfly.ops import backend_for
from butterfly.plan import BFTPlan, make_plan
from butterfly.ops.reference import bft_reference
from checks import double_backward_check


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if cpu.load_extension() is None:
        pytest.fail("the CPU kernel did not build; see the warning above")


def oracle(x, w, radices, out_channels, residual, grad):
    """(y, grad_x, grad_w) by autograd through the reference."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = bft_reference(x, w, radices, out_channels, residual)
    y.backward(grad)
    return y.detach(), x.grad, w.grad if w.grad is not None else torch.zeros_like(w)  # no stages


def kernel(x, w, radices, out_channels, residual, grad):
    """(y, grad_x, grad_w) through the butterfly::bft operator on the "cpu" backend."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    with use_backend("cpu"):
        y = torch.ops.butterfly.bft(x, w, list(radices), out_channels, residual)
        y.backward(grad)
    return y.detach(), x.grad, w.grad


def assert_close(got, want, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = r.double().abs().max().item() if r.numel() else 0.0
        err = (g.double() - r.double()).abs().max().item() if r.numel() else 0.0
        assert err <= tol * (1 + scale), f"max error {err} (scale {scale})"


# (name, in, out, radices): every shape class of the layer, and radices the planner never picks
SHAPES = [
    ("square-base4", 16, 16, (4, 4)),
    ("square-base2", 16, 16, (2, 2, 2, 2)),
    ("square-base3", 27, 27, (3, 3, 3)),
    ("square-base8", 64, 64, (8, 8)),
    ("mixed-radix", 120, 120, (4, 5, 3, 2)),
    ("mixed-radix-base2", 24, 24, (2, 2, 2, 3)),
    ("padded", 13, 13, (4, 4)),
    ("padded-planned", 37, 37, (4, 5, 2)),
    ("expand", 12, 40, (4, 3)),
    ("expand-padded", 5, 23, (2, 3)),
    ("contract", 40, 12, (4, 3)),
    ("contract-padded", 23, 5, (2, 3)),
    ("single-radix", 3, 3, (3,)),
    ("large-prime-radix", 11, 11, (13,)),
    ("radix-7", 7, 7, (7,)),
    ("identity-size-1", 1, 3, ()),
]
# (batch, pixels): 1x1, 7x7, 13x17 images, and channels-last / linear rows (pixels == 1)
LAYOUTS = [(1, 1), (2, 49), (1, 221), (37, 1), (3, 4)]


@pytest.mark.parametrize("name,cin,cout,radices", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("residual", [True, False])
def test_operator_matches_reference(name, cin, cout, radices, residual):
    plan = BFTPlan(cin, cout, radices)
    for batch, pixels in LAYOUTS:
        x = torch.randn(batch, cin, pixels, dtype=torch.float64)
        w = torch.randn(plan.num_blocks, plan.weights_per_block, dtype=torch.float64) / 2
        g = torch.randn(batch, cout, pixels, dtype=torch.float64)
        assert_close(kernel(x, w, radices, cout, residual, g),
                     oracle(x, w, radices, cout, residual, g), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,cin,cout,radices", [SHAPES[0], SHAPES[4], SHAPES[8], SHAPES[10]],
                         ids=["square", "mixed-radix", "expand", "contract"])
def test_low_precision(dtype, name, cin, cout, radices):
    """float32 runs in float32; bfloat16 / float16 accumulate in float32 like the reference."""
    plan = BFTPlan(cin, cout, radices)
    for batch, pixels in [(2, 49), (40, 1)]:
        x = torch.randn(batch, cin, pixels).to(dtype)
        w = (torch.randn(plan.num_blocks, plan.weights_per_block) / 2).to(dtype)
        g = torch.randn(batch, cout, pixels).to(dtype)
        got = kernel(x, w, radices, cout, True, g)
        want = oracle(x, w, radices, cout, True, g)
        assert_close(got, want, torch.bfloat16 if dtype != torch.float32 else dtype)


@pytest.mark.parametrize("cin,cout", [(32, 64), (64, 32), (48, 80), (64, 64), (256, 256)])
def test_float32_whole_vector_blocks(cin, cout):
    """float32 with blocks of whole 16-channel vectors: the in-register transposes of the
    channels-last path (including blocks narrower than the output), and the expanding blocks
    that share one loaded input tile."""
    radices = make_plan(cin, cout, 4).radices
    plan = BFTPlan(cin, cout, radices)
    for batch, pixels in [(70, 1), (3, 49), (2, 256)]:
        x = torch.randn(batch, cin, pixels)
        w = torch.randn(plan.num_blocks, plan.weights_per_block) / 2
        g = torch.randn(batch, cout, pixels)
        assert_close(kernel(x, w, radices, cout, True, g), oracle(x, w, radices, cout, True, g),
                     torch.float32)


# Rows of channels (P == 1) in float32 run the channels-as-lanes kernel (csrc/bft/lanes.h) when
# n is a multiple of the vector length and every radix is 2 or 4, or 3 or 5 at a stride of whole
# vectors: its three kinds of stage (members in one lane of several vectors, in one vector,
# across a few vectors), every radix at every stride, padded inputs, expanding and contracting
# blocks, tiles of every fill.
LANE_SHAPES = [
    ("base4-64", 64, 64, (4, 4, 4)),
    ("base4-256", 256, 256, (4, 4, 4, 4)),
    ("base4-1024", 1024, 1024, (4, 4, 4, 4, 4)),
    ("radix2-last-512", 512, 512, (4, 4, 4, 4, 2)),
    ("base2-32", 32, 32, (2, 2, 2, 2, 2)),
    ("both-radices-128", 128, 128, (2, 4, 4, 2, 2)),
    ("radix2-first-64", 64, 64, (2, 2, 4, 4)),
    ("padded-48", 48, 48, (4, 4, 4)),
    ("expand-64-128", 64, 128, (4, 4, 4)),
    ("expand-48-160", 48, 160, (4, 4, 4)),
    ("contract-160-48", 160, 48, (4, 4, 4)),
    ("radix5-first-80", 80, 80, (5, 4, 4)),
    ("radix3-first-144", 144, 144, (3, 3, 4, 4)),
    ("odd-first-240", 240, 240, (5, 3, 4, 4)),
    ("odd-first-padded-90", 90, 90, (3, 4, 4, 2)),
    ("expand-80-320", 80, 320, (5, 4, 4)),
    ("contract-288-48", 288, 48, (3, 4, 4)),
]


@pytest.mark.parametrize("name,cin,cout,radices", LANE_SHAPES, ids=[s[0] for s in LANE_SHAPES])
@pytest.mark.parametrize("residual", [True, False])
def test_rows_of_channels_lanes_kernel(name, cin, cout, radices, residual, one_thread):
    plan = BFTPlan(cin, cout, radices)
    w = torch.randn(plan.num_blocks, plan.weights_per_block) / 2
    for rows in (1, 5, 31, 300):  # a partial tile, one tile, several with a partial last one
        x = torch.randn(rows, cin, 1)
        g = torch.randn(rows, cout, 1)
        assert_close(kernel(x, w, radices, cout, residual, g),
                     oracle(x, w, radices, cout, residual, g), torch.float32)
    # rows of x at a larger stride (a channel slice of a channels-last tensor), read in place
    wide = torch.randn(40, cin + 24, 1)
    x = wide[:, 8:8 + cin]
    got = torch.ops.butterfly_cpu.forward(x, w, list(radices), cout, residual)
    want = bft_reference(x.contiguous(), w, radices, cout, residual)
    assert_close([got], [want], torch.float32)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), log_n=st.integers(4, 8), rows=st.integers(1, 200),
       residual=st.booleans())
def test_lanes_kernel_fuzz(data, log_n, rows, residual):
    """Property: for random rows of channels that the channels-as-lanes kernels run (radices 2
    and 4 in any order, n = 16 .. 256, after up to two radices 3 or 5; square, padded, expanding
    or contracting), the forward and both gradients match the reference."""
    radices = data.draw(st.lists(st.sampled_from([3, 5]), max_size=2))
    n = 1
    while n < 2 ** log_n:
        k = data.draw(st.sampled_from([2, 4] if n * 4 <= 2 ** log_n else [2]))
        radices.append(k)
        n *= k
    n = math.prod(radices)
    m = data.draw(st.integers(n // 2 + 1, n))  # the smaller side: its block is n channels
    other = data.draw(st.sampled_from([m, 2 * m, m + 8, 3 * m]))
    cin, cout = data.draw(st.sampled_from([(m, other), (other, m)]))
    plan = BFTPlan(cin, cout, tuple(radices))
    w = torch.randn(plan.num_blocks, plan.weights_per_block) / 2
    x = torch.randn(rows, cin, 1)
    g = torch.randn(rows, cout, 1)
    assert_close(kernel(x, w, radices, cout, residual, g),
                 oracle(x, w, radices, cout, residual, g), torch.float32)


@pytest.mark.parametrize("cin,cout,pixels",
                         [(64, 64, 1), (64, 64, 196), (64, 64, 256), (16, 32, 1)])
def test_outputs_large_enough_to_stream(cin, cout, pixels):
    """Outputs of 8 MB or more are written with streaming stores (vector-aligned NCHW rows,
    channels-last rows transposed in registers, gathered expanding blocks) and so are input
    gradients; unaligned NCHW rows (196 pixels) are written in place by the last run instead."""
    radices = make_plan(cin, cout, 4).radices
    plan = BFTPlan(cin, cout, radices)
    batch = (8 << 20) // (4 * cout * pixels) + 3
    x = torch.randn(batch, cin, pixels)
    w = torch.randn(plan.num_blocks, plan.weights_per_block) / 2
    g = torch.randn(batch, cout, pixels)
    want = oracle(x, w, radices, cout, True, g)
    # streaming needs output pages already in memory (fresh ones are written through the cache):
    # the allocator hands later calls the memory earlier ones freed
    for _ in range(4):
        assert_close(kernel(x, w, radices, cout, True, g), want, torch.float32)


@pytest.mark.parametrize("base", [2, 3, 4, 8])
@pytest.mark.parametrize("cin,cout", [(32, 32), (24, 40), (40, 24)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_matches_reference(base, cin, cout, channels_last):
    layer = BFT(cin, cout, base=base).double()
    for batch, (h, w) in [(1, (1, 1)), (2, (7, 7)), (1, (13, 17))]:
        x = torch.randn(batch, cin, h, w, dtype=torch.float64)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        results = []
        for backend in ("cpu", "reference"):
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            with use_backend(backend):
                y = layer(xi)
                y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
            results.append((y.detach(), xi.grad, layer.weight.grad.clone()))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert results[0][0].is_contiguous(memory_format=fmt)
        assert_close(results[0], results[1], torch.float64)


def test_non_contiguous_input():
    layer = BFT(24, 24, base=4).double()
    x = torch.randn(2, 24, 9, 14, dtype=torch.float64)[:, :, :, ::2]  # strided view
    lin = BFTLinear(24, 40).double()
    z = torch.randn(24, 5, dtype=torch.float64).t()  # (5, 24), transposed
    for module, inp in ((layer, x), (lin, z)):
        assert not inp.is_contiguous()
        with use_backend("cpu"):
            got = module(inp)
        with use_backend("reference"):
            want = module(inp)
        assert_close([got], [want], torch.float64)
    w = torch.randn(1, BFTPlan(24, 24, (4, 3, 2)).weights_per_block, dtype=torch.float64)
    xt = torch.randn(24, 3, 5, dtype=torch.float64).transpose(0, 1)  # (3, 24, 5), strided
    got = torch.ops.butterfly_cpu.forward(xt, w, [4, 3, 2], 24, True)
    assert_close([got], [bft_reference(xt, w, (4, 3, 2), 24, True)], torch.float64)


@pytest.mark.parametrize("batch,channels,pixels", [(16, 64, 400), (200, 48, 1), (3000, 64, 1)],
                         ids=["nchw", "rows", "rows-lanes"])
def test_weight_gradient_is_deterministic(batch, channels, pixels):
    """Bit-identical weight gradients over repeated runs and for any thread count (the tiles, and
    so the partial sums, do not depend on it)."""
    plan = make_plan(channels, channels, 4)
    x = torch.randn(batch, channels, pixels)
    w = torch.randn(1, plan.weights_per_block)
    g = torch.randn(batch, channels, pixels)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (2, 2, 2, 1):
            torch.set_num_threads(n)
            grads.append(torch.ops.butterfly_cpu.backward(g, x, w, list(plan.radices), channels,
                                                          True)[1])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert torch.equal(grads[0], other)


def test_auto_picks_the_kernel_for_cpu_tensors():
    assert backend_for(torch.device("cpu")).name == "cpu"


def test_other_dtypes_run_the_reference():
    """A float64 weight with float32 input computes in float64, like the reference."""
    plan = BFTPlan(16, 16, (4, 4))
    x = torch.randn(2, 16, 5)
    w = torch.randn(1, plan.weights_per_block, dtype=torch.float64)
    with use_backend("cpu"):
        got = torch.ops.butterfly.bft(x, w, [4, 4], 16, True)
    assert torch.equal(got, bft_reference(x, w, (4, 4), 16, True))


def test_bad_arguments_say_what_is_expected():
    w = torch.randn(1, 100)
    with pytest.raises(RuntimeError, match="expected weight of shape"):
        torch.ops.butterfly_cpu.forward(torch.randn(2, 16, 3), w, [4, 4], 16, True)
    with pytest.raises(RuntimeError, match="product of the radices"):
        torch.ops.butterfly_cpu.forward(torch.randn(2, 16, 3), w, [2, 2], 16, True)


def test_fake_tensor_registration():
    plan = BFTPlan(12, 20, (4, 3))
    x = torch.randn(2, 12, 5)
    w = torch.randn(plan.num_blocks, plan.weights_per_block)
    g = torch.randn(2, 20, 5)
    torch.library.opcheck(torch.ops.butterfly_cpu.forward.default, (x, w, [4, 3], 20, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.butterfly_cpu.backward.default, (g, x, w, [4, 3], 20, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_unavailable_kernel_warns_once_and_falls_back(monkeypatch):
    layer = BFT(24, 24, base=4)
    x = torch.randn(2, 24, 5, 5)
    with use_backend("reference"):
        want = layer(x)
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    cpu.reset()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable.*BUTTERFLY_DISABLE"):
            with use_backend("cpu"):
                got = layer(x)
        assert torch.equal(got, want)
        assert backend_for(torch.device("cpu")).name == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with use_backend("cpu"):
                layer(x)
    finally:
        monkeypatch.delenv(cpu.DISABLE_ENV)
        cpu.reset()
    assert backend_for(torch.device("cpu")).name == "cpu"


def test_empty_batch_and_image():
    plan = BFTPlan(16, 16, (4, 4))
    w = torch.randn(1, plan.weights_per_block)
    for shape in ((0, 16, 5), (3, 16, 0)):
        x = torch.randn(shape)
        assert torch.ops.butterfly_cpu.forward(x, w, [4, 4], 16, True).shape == shape
        gx, gw = torch.ops.butterfly_cpu.backward(x, x, w, [4, 4], 16, True)
        assert gx.shape == shape and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("cin,cout,base", [(16, 16, 4), (6, 10, 2), (12, 5, 4), (24, 24, 4)],
                         ids=["square", "expand", "contract", "mixed-radix"])
@pytest.mark.parametrize("residual", [True, False])
def test_double_backward(cin, cout, base, residual):
    """The backward of the backward runs the kernel too (gradient penalties)."""
    assert backend_for(torch.device("cpu")).name == "cpu"
    double_backward_check(cin, cout, base, residual, "cpu")



# -- building and caching, each in a fresh process with its own TORCH_EXTENSIONS_DIR -------------

ROOT = Path(__file__).resolve().parents[2]
# Runs the kernel (a fallback to the reference would be an error), checks it against the
# reference, and prints the cache entry it loaded and the one of the best (native) flags.
USE_KERNEL = """
import warnings, torch, butterfly
from butterfly.kernels.cpu import build as cpu
{setup}
warnings.simplefilter("error", butterfly.ops.BackendFallbackWarning)
layer = butterfly.BFT(24, 40)
x = torch.randn(2, 24, 3, 3)
with butterfly.use_backend("cpu"):
    y = layer(x)
with butterfly.use_backend("reference"):
    torch.testing.assert_close(y, layer(x))
print("loaded", cpu._state["library"])
print("native", cpu._entry_name(cpu._compile_flags()[0], cpu._sources()))
"""


def _python(code: str, extensions: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CXX", cpu.DISABLE_ENV)}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(extensions))
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, cwd=extensions.parent, timeout=600)


def _entries(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split() for line in proc.stdout.splitlines())


def _compiling(proc: subprocess.CompletedProcess) -> int:
    return proc.stderr.count("butterfly: compiling the CPU kernels")


def _only_build_messages(stderr: str) -> bool:
    """Nothing but the loader's own lines: one 'compiling', progress, one 'ready'."""
    lines = stderr.strip().splitlines()
    return (all(line.startswith("butterfly: ") for line in lines)
            and sum("compiling the CPU kernels" in line for line in lines) == 1
            and sum("CPU kernels ready" in line for line in lines) == 1)


def _use_sources(folder: Path) -> str:
    return f"from pathlib import Path\ncpu._source_dir = lambda: Path({str(folder)!r})"


BFT_SOURCES = ("common", "bft", "depthwise")  # bft/prepared.cpp runs the depthwise layers too


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache built once for this module by a fresh process, from a snapshot of the BFT's files of
    csrc/ (immune to edits of the checkout while the tests run): the cache folder, that process and the setup line
    that points a process at the snapshot. The tests below use this folder in turn (a copy
    elsewhere would rebuild: ninja's records hold the entry's absolute paths)."""
    root = tmp_path_factory.mktemp("cache")
    (root / "csrc").mkdir()
    for folder in BFT_SOURCES:  # not batchnorm/ and graph/: a shorter build
        shutil.copytree(cpu._source_dir() / folder, root / "csrc" / folder)
    setup = _use_sources(root / "csrc")
    proc = _python(USE_KERNEL.format(setup=setup), root / "extensions")
    return root / "extensions", proc, setup


def test_first_use_compiles_with_one_message_and_then_is_silent(built_cache):
    extensions, first, setup = built_cache
    entries = _entries(first)
    assert entries["loaded"] == entries["native"]  # the best flags built here
    assert _compiling(first) == 1 and str(extensions / entries["native"]) in first.stderr
    assert _only_build_messages(first.stderr), first.stderr
    again = _python(USE_KERNEL.format(setup=setup), extensions)
    assert _entries(again) == entries and again.stderr == ""


@pytest.mark.parametrize("size", ["half", "empty"])
def test_damaged_library_is_rebuilt_not_loaded(built_cache, size):
    """A truncated library used to kill the next process (SIGBUS), a 0-byte one to make it fall
    back to a build without -march=native: both are now rebuilt (relinked from the entry's
    objects), with the native flags."""
    extensions = built_cache[0]
    name = _entries(built_cache[1])["native"]
    library = extensions / name / f"{name}.so"
    data = library.read_bytes()
    library.write_bytes(data[:len(data) // 2] if size == "half" else b"")
    proc = _python(USE_KERNEL.format(setup=built_cache[2]), extensions)
    entries = _entries(proc)
    assert entries["loaded"] == entries["native"] == name
    assert _compiling(proc) == 1
    assert [p.name for p in extensions.iterdir()] == [name]  # no entry with other flags
    assert (extensions / name / "library.sha256").read_text() == cpu._file_digest(library)


def test_identical_checkouts_share_one_build(built_cache, tmp_path):
    """Two copies of csrc/ in different folders, used in turn: no process rebuilds."""
    extensions = built_cache[0]
    folders = []
    for copy in ("a", "b"):
        shutil.copytree(Path(built_cache[0]).parent / "csrc", tmp_path / copy / "csrc")
        folders.append(tmp_path / copy / "csrc")
    names = set()
    for folder in folders + folders[:1]:
        proc = _python(USE_KERNEL.format(setup=_use_sources(folder)), extensions)
        names.add(_entries(proc)["loaded"])
        assert _compiling(proc) == 0 and proc.stderr == "", proc.stderr
    assert names == {_entries(built_cache[1])["native"]}


def _fake_ninja(folder: Path) -> str:
    """``PATH`` with a ``ninja`` first that records that it ran and fails: a build step that
    reaches it shows (as another environment's ninja, first on PATH, used to)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ninja").write_text(f"#!/bin/sh\ntouch {folder / 'ran'}\nexit 1\n")
    (folder / "ninja").chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_finished_entry_loads_without_running_ninja(built_cache, tmp_path):
    """The rebuild loop: a process whose PATH had another ninja first (a virtual environment's
    python run without activating it) reran ninja on a finished entry, and the two ninjas'
    logs made it recompile everything. A finished entry now loads with no build step at all."""
    extensions, first, setup = built_cache
    path = _fake_ninja(tmp_path / "bin")
    proc = _python(USE_KERNEL.format(setup=setup), extensions, PATH=path)
    assert _entries(proc) == _entries(first) and proc.stderr == "", proc.stderr
    assert not (tmp_path / "bin" / "ran").exists()


def test_interrupted_build_is_finished_by_the_next_process(built_cache, tmp_path):
    """A build killed midway leaves a ``lock`` file (older torch versions waited for it
    forever) and no library. The next process finishes the entry (relinks its objects), with
    this environment's ninja even when another one is first on PATH."""
    extensions, first, setup = built_cache
    name = _entries(first)["native"]
    entry = extensions / name
    (entry / f"{name}.so").unlink()
    (entry / "lock").write_text("")
    path = _fake_ninja(tmp_path / "bin")
    proc = _python(USE_KERNEL.format(setup=setup), extensions, PATH=path)
    assert _entries(proc)["loaded"] == name and _compiling(proc) == 1, proc.stderr
    assert not (tmp_path / "bin" / "ran").exists()
    assert (entry / "library.sha256").read_text() == cpu._file_digest(entry / f"{name}.so")


def test_two_processes_build_an_entry_once(built_cache):
    """Two processes started together on an unfinished entry: one builds, the other waits for
    it (or finds it finished) and loads the same library; nothing is built twice."""
    extensions, first, setup = built_cache
    name = _entries(first)["native"]
    (extensions / name / f"{name}.so").unlink()
    environ = {k: v for k, v in os.environ.items() if k not in ("CXX", cpu.DISABLE_ENV)}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(extensions))
    procs = [subprocess.Popen([sys.executable, "-c", USE_KERNEL.format(setup=setup)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=environ, cwd=extensions.parent) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert [_entries(r)["loaded"] for r in results] == [name, name]
    assert sum(_compiling(r) for r in results) == 1, [r.stderr for r in results]


def test_import_prints_nothing(tmp_path):
    proc = _python("import butterfly, butterfly.kernels.cpu", tmp_path / "extensions")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


WARN = """
import warnings, torch, butterfly
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = butterfly.BFT(8, 8)(torch.randn(1, 8, 2, 2))
    butterfly.BFT(8, 8)(torch.randn(1, 8, 2, 2))
for w in caught:
    print(w.category.__name__, w.message)
"""


@pytest.mark.parametrize("how", ["CXX", "PATH"])
def test_missing_compiler_is_one_short_warning(tmp_path, how):
    """The cause in one line, not the build's command lines; the layer still runs."""
    if how == "CXX":
        proc = _python(WARN, tmp_path / "extensions", CXX="/nonexistent")
        cause = "no C++ compiler: CXX='/nonexistent' is not an executable"
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
        proc = _python(WARN, tmp_path / "extensions", PATH=str(bin_dir))
        cause = "no C++ compiler: 'c++' is not on PATH"
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("BackendFallbackWarning") and cause in lines[0]
    assert len(lines[0]) < 400 and "-MMD" not in lines[0] and "compiling" not in lines[0]
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").iterdir())


def test_disable_variable_values(built_cache):
    """0/false/no/off/empty keep the kernel, 1/true/yes/on disable it, anything else is an
    error naming the variable."""
    code = """
import os
from butterfly.kernels.cpu import build as cpu
{setup}
for value in ["", "0", "false", "False", " off ", "no", "1", "true", "YES", "on", "maybe"]:
    os.environ[cpu.DISABLE_ENV] = value
    cpu.reset()
    try:
        print(repr(value), "|", "kernel" if cpu.load_extension() else "reference")
    except ValueError as err:
        print(repr(value), "|", "error", err)
"""
    proc = _python(code.format(setup=built_cache[2]), built_cache[0])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = dict(line.split(" | ", 1) for line in proc.stdout.splitlines())
    for value in ("''", "'0'", "'false'", "'False'", "' off '", "'no'"):
        assert got[value] == "kernel", (value, got)
    for value in ("'1'", "'true'", "'YES'", "'on'"):
        assert got[value] == "reference", (value, got)
    assert got["'maybe'"].startswith("error BUTTERFLY_DISABLE_CPU_KERNEL='maybe' is not understood")
