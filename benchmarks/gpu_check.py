"""One prepared check of the Triton BFT backend on a GPU (run by ``benchmarks/gpu_check.sh``).

    python -m benchmarks.gpu_check OUT                  # on a CUDA machine
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check OUT --tiny   # CPU, tiny shapes (the test)

Sections, each a table in ``OUT/gpu_check.md`` and ``OUT/gpu_check.json``:

* **correctness**: forward, input gradient and weight gradient of the "triton" backend against a
  float64 reference, on every zoo layer shape and the extremes (2048 channels, odd and padded
  counts, expand and contract), in bfloat16, float16, float32 and float64, NCHW and
  channels-last; the fused forward (BatchNorm scale/shift, hardswish, add) too;
* **big tensors**: inputs of more than 2^31 elements in both layouts (forward and input gradient
  checked on the last images or rows, the weight gradient against the sum over chunks);
* **launches**: kernel launches per forward, fused forward and backward, from the profiler;
* **compile**: ``torch.library.opcheck`` of the operators on the backend, and
  ``torch.compile(fullgraph=True)`` against eager, forward and backward;
* **timings**: per layer, the BFT against cuDNN's 1x1 convolution and the reference backend,
  with the fraction of the device's memory bandwidth the BFT reaches, and the host time per
  call;
* **model pair**: mobilenetv1_bft_100 against mobilenetv1_025 at batch 256, channels_last,
  bfloat16 autocast: inference forward and a training step.

Any mismatch is collected, reported in the tables and makes the run exit 1 (after writing every
table). ``--tiny`` runs the correctness section on tiny shapes (and the other sections where
they can run without a GPU), for the fast test that keeps this script from rotting.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from butterfly import BFT, use_backend
from butterfly.ops.bft_fused import apply_epilogue
from butterfly.ops.reference import bft_reference, bft_reference_backward
from butterfly.plan import BFTPlan, choose_radices

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# largest error allowed, relative to the largest reference value (at least 1)
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4, torch.float64: 1e-9}


class Mismatch(AssertionError):
    pass


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(max |want|, 1), with infinities and NaNs compared by position."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise Mismatch(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite) or \
            not torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num()):
        return math.inf
    if not finite.any():
        return 0.0
    scale = max(want[finite].abs().max().item(), 1.0)
    return (got[finite] - want[finite]).abs().max().item() / scale


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """The relative error; raises :class:`Mismatch` above ``tol``."""
    err = relative_error(got, want)
    if not err <= tol:
        raise Mismatch(f"{name}: relative error {err:.3g} > {tol:.1g}")
    return err


@dataclass
class Section:
    title: str
    columns: List[str]
    rows: List[List[object]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class Report:
    sections: List[Section] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)

    def section(self, title: str, columns: Sequence[str]) -> Section:
        self.sections.append(Section(title, list(columns)))
        return self.sections[-1]

    def fail(self, what: str) -> None:
        print(f"MISMATCH: {what}", file=sys.stderr, flush=True)
        self.failures.append(what)

    def write(self, out: Path, meta: Dict[str, object]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        lines = ["# Triton BFT backend: GPU check", ""]
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
        for s in self.sections:
            lines += [f"## {s.title}", ""] + [f"{n}" for n in s.notes] + ([""] if s.notes else [])
            lines += ["| " + " | ".join(s.columns) + " |",
                      "|" + "|".join("---" for _ in s.columns) + "|"]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in s.rows]
            lines.append("")
        lines += ["## Failures", ""] + ([f"- {f}" for f in self.failures] or ["none"]) + [""]
        (out / "gpu_check.md").write_text("\n".join(lines))
        (out / "gpu_check.json").write_text(json.dumps(
            {"meta": meta, "failures": self.failures,
             "sections": [{"title": s.title, "columns": s.columns, "rows": s.rows,
                           "notes": s.notes} for s in self.sections]}, indent=1, default=str))


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v == v and abs(v) not in (math.inf,) else str(v)
    return str(v)


class Budget:
    """Seconds left for a section: it stops starting new cases when they run out (and says how
    many it covered)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.end


# ------------------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class Case:
    cin: int
    cout: int
    radices: Tuple[int, ...]
    pixels: int      # H * W (1: a pooled feature map, which runs as rows)
    label: str = ""


def extremes(tiny: bool) -> List[Case]:
    if tiny:
        return [Case(16, 16, (4, 4), 6, "square"), Case(10, 10, (4, 3), 5, "padded odd"),
                Case(8, 20, (4, 2), 7, "expand"), Case(20, 12, (4, 3), 9, "contract"),
                Case(40, 40, (4, 5, 2), 3, "radix 5"), Case(16, 16, (2,) * 4, 1, "base 2, P=1")]
    return [Case(2048, 2048, choose_radices(2048, 4), 49, "2048"),
            Case(3072, 3072, choose_radices(3072, 4), 49, "4096 padded"),
            Case(1001, 1001, choose_radices(1001, 4), 49, "odd"),
            Case(243, 243, (3,) * 5, 196, "radix 3"), Case(125, 125, (5, 5, 5), 196, "radix 5"),
            Case(343, 343, (7, 7, 7), 49, "radix 7"),
            Case(256, 256, (2,) * 8, 196, "base 2"), Case(512, 512, (8, 8, 8), 196, "base 8"),
            Case(256, 256, (16, 16), 196, "base 16"),
            Case(128, 512, choose_radices(128, 4), 784, "expand"),
            Case(512, 128, choose_radices(128, 4), 784, "contract"),
            Case(64, 64, (4, 4, 4), 3136, "64")]


def zoo_cases() -> List[Case]:
    from butterfly.kernels.triton.aot import zoo_layers
    return [Case(s.in_channels, s.out_channels, tuple(s.radices), s.pixels, s.label)
            for s in zoo_layers()]


def _operands(case: Case, batch: int, layout: str, dtype: torch.dtype, device, seed: int):
    """x ``(B, C, P)`` (rows ``(B*P, C, 1)`` for channels-last), weight, output gradient."""
    plan = BFTPlan(case.cin, case.cout, case.radices)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch * case.pixels, case.cin, 1) if layout == "nhwc" or case.pixels == 1 \
        else (batch, case.cin, case.pixels)
    x = torch.randn(*shape, generator=gen)
    # weights scaled so that outputs stay O(1) through every stage
    w = torch.randn(plan.num_blocks, plan.weights_per_block, generator=gen)
    w = w / math.sqrt(max(case.radices)) if case.radices else w
    g = torch.randn(shape[0], case.cout, shape[2], generator=gen)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(device, dtype), w.to(device, wdtype), g.to(device, dtype))


def check_case(case: Case, batch: int, layout: str, dtype: torch.dtype, device,
               fused: bool = True) -> Dict[str, float]:
    """Forward, both gradients and (``fused``) the fused forward of the triton backend against
    the float64 reference on the same (rounded) operands; raises :class:`Mismatch`."""
    x, w, g = _operands(case, batch, layout, dtype, device, seed=case.cin * 7 + case.cout)
    radices, cout = list(case.radices), case.cout
    with use_backend("triton"):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = torch.ops.butterfly.bft(xg, wg, radices, cout, True)
        gx, gw = torch.autograd.grad(y, (xg, wg), g)
    xd, wd, gd = x.double(), w.double(), g.double()
    want = bft_reference(xd, wd, case.radices, cout, True)
    want_gx, want_gw = bft_reference_backward(gd, xd, wd, case.radices, cout, True)
    tol = TOL[dtype]
    name = f"{case.cin}->{case.cout} {case.radices} {layout} {DTYPE_NAMES[dtype]}"
    errors = {"y": check_close(f"{name} forward", y, want, tol),
              "gx": check_close(f"{name} input grad", gx, want_gx, tol),
              "gw": check_close(f"{name} weight grad", gw, want_gw, tol)}
    if fused:
        gen = torch.Generator().manual_seed(case.cout)
        scale = (1 + torch.rand(cout, generator=gen)).to(device)
        shift = torch.randn(cout, generator=gen).to(device)
        add = torch.randn(y.shape, generator=gen).to(device, dtype)
        with use_backend("triton"), torch.no_grad():
            fz = torch.ops.butterfly.bft_fused(x, w, radices, cout, True, scale, shift,
                                               "hardswish", add)
        fwant = apply_epilogue(want, scale.double(), shift.double(), "hardswish", add.double(),
                               torch.float64)
        errors["fused"] = check_close(f"{name} fused", fz, fwant, tol)
    return errors



def correctness(report: Report, cases: Sequence[Case], batch: int, device, budget: Budget,
                dtypes: Sequence[torch.dtype]) -> None:
    s = report.section("Correctness against a float64 reference",
                       ["layer", "label", "layout", "dtype", "forward", "input grad",
                        "weight grad", "fused", "status"])
    combos = [(layout, dtype) for layout in ("nchw", "nhwc") for dtype in dtypes]
    # every case once first (layouts and dtypes rotating), then the remaining combinations:
    # a budget that runs out still covers every layer
    runs = [(c, *combos[(i + r) % len(combos)]) for r in range(len(combos))
            for i, c in enumerate(cases)]
    runs = [(c, layout, dtype) for c, layout, dtype in runs
            if not (layout == "nchw" and c.pixels == 1)]
    done = 0
    for case, layout, dtype in runs:
        if not budget.left():
            break
        row = [f"{case.cin}->{case.cout} {case.radices} P={case.pixels}", case.label, layout,
               DTYPE_NAMES[dtype]]
        try:
            errors = check_case(case, batch, layout, dtype, device)
            row += [errors["y"], errors["gx"], errors["gw"], errors.get("fused", ""), "ok"]
        except Mismatch as error:
            row += ["", "", "", "", f"MISMATCH {error}"]
            report.fail(str(error))
        except Exception as error:  # a crash is a failure too, with what crashed
            row += ["", "", "", "", f"ERROR {type(error).__name__}: {str(error)[:200]}"]
            report.fail(f"{row[0]} {layout} {DTYPE_NAMES[dtype]}: {type(error).__name__}: "
                        f"{str(error)[:300]}")
        s.rows.append(row)
        done += 1
    s.notes.append(f"Covered {done} of {len(runs)} (layer, layout, dtype) runs in the time "
                   f"budget; errors are max |triton - ref| / max(max |ref|, 1); tolerances "
                   f"{ {DTYPE_NAMES[k]: v for k, v in TOL.items()} }.")
    if done < len(runs):
        print(f"correctness: covered {done} of {len(runs)} runs in the time budget",
              file=sys.stderr)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def big_tensors(report: Report, device) -> None:
    """Inputs over 2^31 elements: the last images (rows) against the reference on them, the
    weight gradient against the sum of the backward over chunks of under 2^31 elements."""
    s = report.section("Tensors over 2^31 elements",
                       ["layout", "shape", "elements", "forward", "input grad", "weight grad",
                        "status"])
    case = Case(64, 64, (4, 4, 4), 3136)
    for layout, shape in (("nchw", (10700, 64, 3136)), ("nhwc", (10700 * 3136, 64, 1))):
        row = [layout, shape, math.prod(shape)]
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
            g = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
            w = torch.randn(1, BFTPlan(64, 64, case.radices).weights_per_block, device=device,
                            generator=gen) / 2
            with use_backend("triton"):
                y = torch.ops.butterfly.bft(x, w, list(case.radices), 64, True)
                gx, gw = torch.ops.butterfly.bft_backward(g, x, w, list(case.radices), 64, True)
            tail = slice(shape[0] - (2 if layout == "nchw" else 4096), shape[0])
            want = bft_reference(x[tail].double(), w.double(), case.radices, 64, True)
            want_gx, _ = bft_reference_backward(g[tail].double(), x[tail].double(), w.double(),
                                                case.radices, 64, True)
            part = torch.zeros_like(gw)
            step = (2 ** 31 - 1) // (shape[1] * shape[2])
            with use_backend("triton"):
                for sl in _chunks(shape[0], step):
                    part += torch.ops.butterfly.bft_backward(g[sl], x[sl], w,
                                                             list(case.radices), 64, True)[1]
            row += [check_close(f"big {layout} forward", y[tail], want, TOL[torch.bfloat16]),
                    check_close(f"big {layout} input grad", gx[tail], want_gx,
                                TOL[torch.bfloat16]),
                    check_close(f"big {layout} weight grad", gw, part, 1e-4), "ok"]
            del x, g, y, gx
        except Mismatch as error:
            row += ["", "", "", f"MISMATCH {error}"]
            report.fail(str(error))
        except Exception as error:
            row += ["", "", "", f"ERROR {type(error).__name__}: {str(error)[:200]}"]
            report.fail(f"big tensors {layout}: {type(error).__name__}: {str(error)[:300]}")
        torch.cuda.empty_cache()
        s.rows.append(row)


def _kernel_launches(fn: Callable[[], object]) -> List[str]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.lower().startswith(("memcpy", "memset"))]


def launches(report: Report, device) -> None:
    s = report.section("Kernel launches per call (profiler)",
                       ["layer", "call", "launches", "kernels", "status"])
    for case in (Case(256, 256, (4, 4, 4, 4), 196), Case(128, 512, (4, 4, 4, 2), 784),
                 Case(512, 128, (4, 4, 4, 2), 784)):
        x, w, g = _operands(case, 32, "nchw", torch.bfloat16, device, 0)
        r, c = list(case.radices), case.cout
        scale = torch.ones(c, device=device)
        calls = {
            "forward": (lambda: torch.ops.butterfly.bft(x, w, r, c, True), 1),
            "fused forward": (lambda: torch.ops.butterfly.bft_fused(x, w, r, c, True, scale,
                                                                   None, "relu", None), 1),
            "backward": (lambda: torch.ops.butterfly.bft_backward(g, x, w, r, c, True), None),
        }
        for name, (fn, expected) in calls.items():
            with use_backend("triton"), torch.no_grad():
                kernels = _kernel_launches(fn)
            ok = expected is None or len(kernels) == expected
            if not ok:
                report.fail(f"{case.cin}->{case.cout} {name}: {len(kernels)} launches, "
                            f"expected {expected}")
            s.rows.append([f"{case.cin}->{case.cout}", name, len(kernels),
                           ", ".join(sorted(set(kernels)))[:120], "ok" if ok else "MISMATCH"])
    s.notes.append("The backward: the input gradient (its own launch for several blocks), one "
                   "weight-gradient launch per stage group and the sum over partial rows.")


def compile_checks(report: Report, device) -> None:
    s = report.section("opcheck and torch.compile(fullgraph=True)", ["check", "status"])
    case = Case(12, 20, (4, 3), 5)

    def run(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            s.rows.append([name, "ok"])
        except Exception as error:
            s.rows.append([name, f"FAILED {type(error).__name__}: {str(error)[:200]}"])
            report.fail(f"{name}: {type(error).__name__}: {str(error)[:500]}")

    for layout in ("nchw", "nhwc"):
        x, w, g = _operands(case, 3, layout, torch.float32, device, 1)
        args = ([4, 3], 20, True)
        with use_backend("triton"):
            run(f"opcheck bft {layout}", lambda: torch.library.opcheck(
                torch.ops.butterfly.bft, (x.requires_grad_(), w.requires_grad_(), *args)))
            run(f"opcheck bft_backward {layout}", lambda: torch.library.opcheck(
                torch.ops.butterfly.bft_backward, (g, x.detach(), w.detach(), *args)))
            run(f"opcheck bft_fused {layout}", lambda: torch.library.opcheck(
                torch.ops.butterfly.bft_fused,
                (x.detach(), w.detach(), *args, torch.ones(20, device=device), None, "relu6",
                 torch.randn(g.shape, device=device))))

    def compiled() -> None:
        torch._dynamo.reset()
        model = torch.nn.Sequential(BFT(24, 48, base=4), torch.nn.ReLU(),
                                    BFT(48, 24, base=4)).to(device)
        x = torch.randn(4, 24, 7, 7, device=device, requires_grad=True)
        with use_backend("triton"):
            eager = model(x)
            (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
            fn = torch.compile(model, fullgraph=True)
            out = fn(x)
            (gx,) = torch.autograd.grad(out.square().sum(), x)
        check_close("compiled forward", out, eager, 1e-5)
        check_close("compiled input grad", gx, gx_eager, 1e-5)

    run("torch.compile(fullgraph=True) forward and backward vs eager", compiled)


def _bench(fn: Callable[[], object], rep_ms: int) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")


def timings(report: Report, device, budget: Budget, rep_ms: int) -> None:
    from benchmarks.kernel_gpu import peak_bandwidth
    peak, source = peak_bandwidth()
    s = report.section("Timings per layer (batch 32, bfloat16)",
                       ["layer", "layout", "pass", "BFT ms", "reference ms", "conv1x1 ms",
                        "conv/BFT", "BFT %HBM", "host us/call"])
    s.notes.append(f"Peak bandwidth {peak} B/s ({source}). %HBM: the bytes the pass must move "
                   "(input, output, weights; backward adds the output gradient, the input "
                   "gradient, weights and their gradient) / time / peak. Host us/call: wall "
                   "time of back-to-back eager forward calls on a 1-pixel batch (the GPU idle).")
    shapes = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 14), (1024, 1024, 7),
              (116, 116, 28), (232, 232, 14), (464, 464, 7), (32, 64, 56), (512, 1024, 7),
              (2048, 2048, 7)]
    for cin, cout, hw in shapes:
        for layout in ("nchw", "nhwc"):
            if not budget.left():
                s.notes.append("(time budget reached: later shapes not timed)")
                return
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            bft = BFT(cin, cout, base=4).to(device)
            conv = torch.nn.Conv2d(cin, cout, 1, bias=False).to(device, memory_format=fmt)
            x = torch.randn(32, cin, hw, hw, device=device).to(memory_format=fmt)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = bft(x)
            xb = x.to(torch.bfloat16)
            moved = {"fwd": (xb.numel() + y.numel()) * 2 + bft.weight.numel() * 4}
            moved["fwd+bwd"] = moved["fwd"] + (y.numel() + 2 * xb.numel()) * 2 + \
                bft.weight.numel() * 8
            xg = xb.detach().requires_grad_()
            for pass_name in ("fwd", "fwd+bwd"):
                times = {}
                for runner in ("triton", "reference", "conv"):
                    def call(runner=runner, pass_name=pass_name):
                        layer = conv if runner == "conv" else bft
                        with use_backend("triton" if runner == "conv" else runner), \
                                torch.autocast("cuda", dtype=torch.bfloat16):
                            if pass_name == "fwd":
                                with torch.no_grad():
                                    return layer(xb)
                            out = layer(xg)
                            return torch.autograd.grad(out, [xg, layer.weight],
                                                       torch.ones_like(out))
                    try:
                        times[runner] = _bench(call, rep_ms)
                    except Exception as error:
                        times[runner] = math.nan
                        report.fail(f"timing {cin}->{cout}@{hw} {layout} {pass_name} {runner}: "
                                    f"{type(error).__name__}: {str(error)[:200]}")
                host = host_time(bft, cin, device) if pass_name == "fwd" else ""
                share = moved[pass_name] / (times["triton"] * 1e-3) / peak if peak else math.nan
                s.rows.append([f"{cin}->{cout}@{hw}", layout, pass_name, times["triton"],
                               times["reference"], times["conv"],
                               times["conv"] / times["triton"], share, host])


def host_time(layer: BFT, cin: int, device, calls: int = 300) -> float:
    """Microseconds of host time per eager forward call (a tiny input: the GPU waits)."""
    x = torch.randn(1, cin, 1, 1, device=device)
    with use_backend("triton"), torch.no_grad():
        for _ in range(20):
            layer(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def model_pair(report: Report, device, rep_ms: int) -> None:
    import timm
    s = report.section("Whole models: batch 256, channels_last, bfloat16 autocast",
                       ["model", "forward ms", "images/s", "train step ms", "images/s (train)"])
    x = torch.randn(256, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (256,), device=device)
    for name in ("mobilenetv1_bft_100", "mobilenetv1_025"):
        try:
            model = timm.create_model(name).to(device, memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def forward():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(x)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            with use_backend("auto"):
                model.eval()
                fwd = _bench(forward, rep_ms)
                model.train()
                train = _bench(step, rep_ms)
            s.rows.append([name, fwd, 256e3 / fwd, train, 256e3 / train])
        except Exception as error:
            s.rows.append([name, "", "", "", f"ERROR {type(error).__name__}: {error}"[:200]])
            report.fail(f"model {name}: {type(error).__name__}: {str(error)[:300]}")
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu_check_out",
                        help="folder for gpu_check.md and gpu_check.json (default: $OUT)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, correctness only where there is no GPU (tests)")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="seconds for the whole run; each section gets a share")
    parser.add_argument("--rep-ms", type=int, default=25, help="do_bench repetition time")
    parser.add_argument("--sections", default="correctness,big,launches,compile,timings,models",
                        help="comma-separated sections to run")
    args = parser.parse_args(argv)
    args.out = Path(args.out)
    args.sections = set(args.sections.split(","))
    unknown = args.sections - {"correctness", "big", "launches", "compile", "timings", "models"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run on a GPU, or with TRITON_INTERPRET=1 --tiny on CPU",
              file=sys.stderr)
        return 2
    from butterfly.kernels.triton import IMPORT_ERROR
    import triton
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
            "torch": torch.__version__, "triton": triton.__version__,
            "triton backend": IMPORT_ERROR or "available", "tiny": args.tiny,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report = Report()
    if IMPORT_ERROR:
        report.fail(f"the triton backend is unavailable: {IMPORT_ERROR}")
        report.write(args.out, meta)
        return 1
    total = args.budget
    shares = {"correctness": 0.4, "timings": 0.25}
    sections: List[Tuple[str, Callable[[], None]]] = []
    if args.tiny:
        cases = extremes(True)
        sections.append(("correctness", lambda: correctness(
            report, cases, 2, device, Budget(total), list(DTYPES.values()))))
        if cuda:
            sections.append(("launches", lambda: launches(report, device)))
            sections.append(("compile", lambda: compile_checks(report, device)))
    else:
        cases = extremes(False) + zoo_cases()
        sections += [
            ("correctness", lambda: correctness(report, cases, 4, device,
                                                Budget(total * shares["correctness"]),
                                                list(DTYPES.values()))),
            ("big", lambda: big_tensors(report, device)),
            ("launches", lambda: launches(report, device)),
            ("compile", lambda: compile_checks(report, device)),
            ("timings", lambda: timings(report, device, Budget(total * shares["timings"]),
                                        args.rep_ms)),
            ("models", lambda: model_pair(report, device, args.rep_ms)),
        ]
    for name, run in sections:
        if name not in args.sections:
            continue
        start = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            run()
        except Exception as error:  # a section that crashes is reported, the others still run
            traceback.print_exc()
            report.fail(f"section {name} crashed: {type(error).__name__}: {str(error)[:500]}")
        meta[f"seconds {name}"] = round(time.monotonic() - start, 1)
        report.write(args.out, meta)
    report.write(args.out, meta)
    print(f"tables in {args.out / 'gpu_check.md'}; {len(report.failures)} failure(s)",
          file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
