"""The fused CPU kernel: BFT against the 1x1 convolution it replaces, one layer at a time.

    python -m benchmarks.kernel                 # writes benchmarks/results/kernel_cpu.{json,md}
    python -m benchmarks.kernel --quick         # three shapes, fewer rounds
    python -m benchmarks.kernel --threads 2 1   # one set of tables per thread count
    python -m benchmarks.kernel --cpu-time      # also: 1 thread, timed by process CPU time

At batch 32 and every shape of :data:`SHAPES`, for inference (forward under ``no_grad``) and
training (forward + backward, input and weight gradients), these runners are timed together by
the harness (interleaved rounds; each step settled for 20 ms, then 3 timed calls):
``nn.Conv2d(in, out, 1, bias=False)`` on NCHW and channels_last input (the faster is the
baseline); ``BFT(in, out, base)`` for bases 4 and 2 on the "cpu" backend, both formats; the
stage-by-stage reference (base 4, NCHW); a copy of an output-sized tensor (the least memory
traffic of any layer of the shape). At batch 1 (mode ``inference, batch 1``), where the fixed cost
per call counts, each side runs as a fused inference layer runs it: the BFT as
:class:`butterfly.passes.fuse.FusedBFT` (the prepared C++ layer, no dispatcher call) and the conv
as :class:`~butterfly.passes.fuse.FusedConv` (oneDNN called directly), both with an empty
epilogue. GMAC/s count useful multiply-adds (BFT: ``macs_per_pixel``
per pixel; conv: in x out); training counts 3x the forward. What bounds it: the machine's FMA peak
and copy bandwidth (:func:`benchmarks.bounds.rates`) are measured in the same run, once per
thread count. ``--cpu-time`` adds one thread timed by process CPU time, which time spent
descheduled on a shared machine does not inflate. The kernels' own ceiling, each timed alone on
data in L1 (:func:`benchmarks.loops.stage_rates`), closes the report. With CUDA, the GPU section of
:mod:`benchmarks.kernel_gpu` is added.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from benchmarks import bounds, harness, loops
from butterfly import BFT, use_backend
from butterfly.ops.bft_fused import Epilogue
from butterfly.passes.fuse import FusedBFT, FusedConv

BATCH = 32
SHAPES = [("square 64", 64, 64, 56), ("square 128", 128, 128, 28), ("square 256", 256, 256, 14),
          ("square 512", 512, 512, 14), ("square 1024", 1024, 1024, 7),
          ("ShuffleNetV2 116", 116, 116, 28), ("ShuffleNetV2 232", 232, 232, 14),
          ("ShuffleNetV2 464", 464, 464, 7),
          ("MobileNetV1 32->64", 32, 64, 112), ("MobileNetV1 512->1024", 512, 1024, 14)]
QUICK_SHAPES = [SHAPES[0], SHAPES[4], SHAPES[6]]
RUNNERS = ("conv NCHW", "conv CL", "BFT-4 NCHW", "BFT-4 CL", "BFT-2 NCHW", "BFT-2 CL",
           "reference", "copy")
BFTS = RUNNERS[2:6]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
MODES = {"inference": 32, "training": 32, "inference, batch 1": 1}   # mode -> batch
# Speed goals of the kernel, best conv / best base-4 BFT, by channels: (inference, training).
TARGETS = {64: (2.0, 1.5), 128: (2.0, 1.5), 256: (4.0, 2.5), 512: (6.0, 2.5), 1024: (10.0, 2.5)}


def make_step(module: nn.Module, x: torch.Tensor, backend: str, train: bool) -> Callable:
    """One inference (no grad) or training (forward + backward) call of ``module`` on ``x``."""
    if not train:
        def step():
            with torch.no_grad(), use_backend(backend):
                module(x)
        return step
    x = x.detach().requires_grad_()
    with torch.no_grad():
        grad = torch.randn_like(module(x))

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        with use_backend(backend):
            module(x).backward(grad)
    return step


def prepare(cin: int, cout: int, hw: int, mode: str) -> Dict[str, Callable]:
    """Runner name -> preparation of its step (info: the forward's useful multiply-adds)."""
    batch, train = MODES[mode], mode == "training"
    x = torch.randn(batch, cin, hw, hw)
    xl = x.contiguous(memory_format=torch.channels_last)
    pixels = batch * hw * hw
    conv = nn.Conv2d(cin, cout, 1, bias=False)
    conv_cl = nn.Conv2d(cin, cout, 1, bias=False).to(memory_format=torch.channels_last)
    bft = {4: BFT(cin, cout, base=4), 2: BFT(cin, cout, base=2)}
    out, src = torch.empty(batch, cout, hw, hw), torch.randn(batch, cout, hw, hw)

    def runner(module, inp, backend, macs):
        return lambda: (make_step(module, inp, backend, train), {"macs": macs})

    if batch == 1:   # the fused inference layers, as a fused network runs them
        conv, conv_cl = FusedConv(conv), FusedConv(conv_cl)
        bft = {base: FusedBFT(layer, Epilogue()) for base, layer in bft.items()}
    preps = {"conv NCHW": runner(conv, x, "auto", cin * cout * pixels),
             "conv CL": runner(conv_cl, xl, "auto", cin * cout * pixels)}
    for base in (4, 2):
        for fmt, inp in (("NCHW", x), ("CL", xl)):
            preps[f"BFT-{base} {fmt}"] = runner(bft[base], inp, "cpu",
                                                bft[base].plan.macs_per_pixel * pixels)
    if batch > 1:
        preps["reference"] = runner(bft[4], x, "reference", bft[4].macs_per_pixel * pixels)
    preps["copy"] = lambda: (lambda: out.copy_(src), {"bytes": 2 * out.numel() * 4})
    return preps


def rates_key(clock: str, threads: int) -> str:
    return f"t{threads}" if clock == "wall" else f"{clock}|t{threads}"


def key(clock: str, threads: int, mode: str, shape: str, runner: str) -> str:
    return f"{clock}|t{threads}|{mode}|{shape}|{runner}"


def sections(data: Dict) -> List[str]:
    """The tables of a results file: per clock, thread count and mode, then what bounds it."""
    cells = {k: c for k, c in data["cells"].items() if "timed_by" in c}  # not the GPU's
    combos = list(dict.fromkeys((c["timed_by"], c["threads"], c["mode"]) for c in cells.values()))
    out = []
    for clock, threads, mode in combos:
        factor = 3 if mode == "training" else 1
        rows, limits, goals, rates = [], [], [], []
        for shape in dict.fromkeys(c["shape"] for c in cells.values()):
            r = {n: cells.get(key(clock, threads, mode, shape, n)) for n in RUNNERS}
            ok = {n: c for n, c in r.items() if c and c["status"] == "ok"}
            if not ok:
                continue
            any_cell = next(iter(ok.values()))
            best = min((ok[n]["ms"] for n in ("conv NCHW", "conv CL") if n in ok), default=None)

            def cell(n):
                c = r[n]
                if c is None or c["status"] != "ok":
                    return "-" if c is None else f"failed: {c['reason']}"
                text = f"{c['ms']:.2f} ms"
                if "macs" in c:
                    text += f", {factor * c['macs'] / c['ms'] / 1e6:.1f} GMAC/s"
                if best and n != "copy":
                    text += f", **{best / c['ms']:.2f}x**"
                return text
            rows.append([shape, any_cell["hw"], *map(cell, RUNNERS)])
            c0 = ok[next(iter(ok))]
            if c0["cin"] == c0["cout"] in TARGETS and all(n in ok for n in RUNNERS[:4]):
                target = TARGETS[c0["cin"]][mode == "training"]
                ratio, fastest_calls = (min(ok[n][k] for n in RUNNERS[:2])
                                        / min(ok[n][k] for n in RUNNERS[2:4])
                                        for k in ("ms", "min_ms"))
                goals.append([c0["cin"], f">= {target}x", f"{ratio:.2f}x", f"{fastest_calls:.2f}x",
                              "met" if ratio >= target else "missed"])
            if c0["cin"] == c0["cout"] in TARGETS and all(n in ok for n in RUNNERS[:4]):
                conv = max(factor * ok[n]["macs"] / ok[n]["ms"] / 1e6 for n in RUNNERS[:2])
                bft = [factor * ok[n]["macs"] / ok[n]["ms"] / 1e6 for n in RUNNERS[2:4]]
                peak = data.get("rates", {}).get(rates_key(clock, threads), {}).get("fma_GMACs")
                rates.append([c0["cin"], any_cell["hw"], f"{conv:.0f}",
                              *(f"{b:.0f} ({b / conv:.2f})" for b in bft),
                              f"{100 * max(bft) / peak:.0f}%" if peak else "-"])
            fastest = min((n for n in BFTS if n in ok), key=lambda n: ok[n]["ms"], default=None)
            if mode != "training" and fastest and "copy" in ok:
                limits.append((shape, fastest, ok[fastest]["ms"], ok[fastest]["macs"],
                               ok["copy"]["ms"], max((ok[n]["macs"] / ok[n]["ms"] / 1e6 for n in
                                                      ("conv NCHW", "conv CL") if n in ok),
                                                     default=None)))
        title = {"training": "Training (forward + backward)",
                 "inference": "Inference (forward, no grad)",
                 "inference, batch 1": "Inference at batch 1 (fused layers)"}[mode]
        out += [f"## {title}, {threads} thread{'s' * (threads > 1)}, "
                f"{'process CPU time' if clock == 'cpu' else 'wall clock'}", "",
                *harness.table(["layer", "H=W", *RUNNERS], rows), ""]
        if goals:
            out += ["Speed goals (best conv / best base-4 BFT, from medians and from the fastest "
                    "calls):", "", *harness.table(["C", "goal", "medians", "fastest calls", ""],
                                                  goals, "rrrr"), ""]
        if rates:
            out += ["Multiply-add rate of the base-4 BFT against the faster convolution's (in "
                    "brackets: BFT GMAC/s / conv GMAC/s; 1 would make a BFT multiply-add as cheap "
                    "as a dense one) and the faster BFT's fraction of the FMA peak measured in "
                    "this run:", "",
                    *harness.table(["C", "H=W", "conv GMAC/s", "BFT-4 NCHW GMAC/s",
                                    "BFT-4 CL GMAC/s", "% FMA peak"], rates, "rrrrrr"), ""]
        if limits:
            out += bounds.layer_section(limits, data["rates"].get(rates_key(clock, threads), {}))
    if data.get("rates"):
        out += ["Machine rates measured in this run (`benchmarks.bounds.rates`):", "",
                *bounds.rates_table(data["rates"]), ""]
    if data.get("stages"):
        peak = data.get("rates", {}).get("t1", {}).get("fma_GMACs")
        out += ["## The kernels in L1, 1 thread", "",
                "Each kernel timed alone on data that stays in L1 (`benchmarks.loops.stage_rates`"
                "): the rate it reaches before any memory traffic, against the FMA peak.", "",
                *harness.table(["kernel", "step", "kind", "GMAC/s", "% FMA peak (1 thread)"],
                               [[r["kernel"], r["step"], r["kind"], f"{r['GMACs']:.0f}",
                                 f"{100 * r['GMACs'] / peak:.0f}%" if peak else "-"]
                                for r in data["stages"]], "lllrr"), ""]
    return out


def report(data: Dict) -> List[str]:
    return ["# BFT CPU kernel vs 1x1 convolution", "",
            f"Batch {BATCH} (and a batch-1 inference section), float32, residual on; method: `benchmarks/kernel.py`'s docstring. "
            "Each cell: median time, achieved GMAC/s (training counts 3x the forward) and, in "
            "bold, best conv time / time (> 1: faster than the faster convolution). *copy*: "
            "copying an output-sized tensor.", "", *harness.runs_section(data), *sections(data)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = harness.parser("kernel", __doc__, threads=[harness.usable_cores()])
    p.add_argument("--cpu-time", action="store_true",
                   help="also run with 1 thread, timed by the process's CPU time")
    args = harness.checked(p, argv)
    store = harness.kernel_run("kernel", "kernel_cpu.json", argv, args)
    if store is None:
        return 1
    store.data["rates"] = {}
    store.data["stages"] = loops.stage_rates(args.quick)
    timing = harness.Timing(rounds=3 if args.quick else 6, calls=3, settle_s=0.02)
    configs = [(t, "wall") for t in args.threads] + [(1, "cpu")] * args.cpu_time
    for threads, clock in configs:
        if rates_key(clock, threads) not in store.data["rates"]:
            store.data["rates"][rates_key(clock, threads)] = bounds.rates(threads, args.quick,
                                                                          clock == "cpu")
        for mode in MODES:
            for shape, cin, cout, hw in QUICK_SHAPES if args.quick else SHAPES:
                preps = prepare(cin, cout, hw, mode)
                harness.measure(store, {key(clock, threads, mode, shape, n): f
                                        for n, f in preps.items()},
                                timing, threads, CLOCKS[clock], timed_by=clock, mode=mode,
                                shape=shape, cin=cin, cout=cout, hw=hw)
        store.save()
    lines = report(store.data)
    if torch.cuda.is_available():
        from benchmarks import kernel_gpu
        kernel_gpu.measure(store, args.quick)
        store.save()
        lines += kernel_gpu.section(store.data)
    harness.write_report(args.out_dir / "kernel_cpu.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
