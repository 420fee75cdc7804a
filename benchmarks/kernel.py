"""Benchmark of the fused CPU kernel: BFT against the 1x1 convolution it replaces.

    python -m benchmarks.kernel                 # full run; writes benchmarks/results/kernel_cpu.md
    python -m benchmarks.kernel --quick         # three shapes, fewer repetitions
    python -m benchmarks.kernel --out FILE.md   # write the results elsewhere
    python -m benchmarks.kernel --threads 2 1   # one set of tables per thread count
    python -m benchmarks.kernel --cpu-time      # also: 1 thread, timed by process CPU time

For batch 32 at every shape it times, interleaved round by round (so load from other processes
hits all variants alike), and reports the median of each step's steady state, called back to back
after at least 20 ms of untimed calls (see :func:`time_interleaved` for why):

* ``nn.Conv2d(in, out, 1, bias=False)`` on NCHW and on channels_last input; the faster of the two
  is the baseline;
* ``BFT(in, out, base)`` for bases 4 and 2 on the "cpu" backend (the fused kernel), NCHW and
  channels_last;
* the stage-by-stage pure-PyTorch reference (base 4, NCHW);
* a copy of an output-sized tensor: the memory traffic every layer of this shape needs at least.

Inference is the forward pass under ``torch.no_grad()``; training is forward + backward with
gradients for the input and the weights. GMAC/s count the layer's useful multiply-adds: for BFT
``macs_per_pixel * pixels`` per forward (the MACs it executes), for the conv ``in * out * pixels``;
training counts three times the forward (forward, input gradient, weight gradient). Threads =
cores unless ``--threads`` says otherwise. glibc's malloc is told to keep freed memory (see
:func:`keep_freed_memory`; ``--malloc-defaults`` measures without). On a machine shared with other
work, wall-clock times of short multi-threaded calls mostly measure the scheduler (a call waits
for its slowest thread); ``--cpu-time`` adds tables timed by the process's CPU time with one
thread, which time spent descheduled does not inflate. When CUDA is present, the GPU section of
``benchmarks/kernel_gpu.py`` is appended.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import butterfly
from butterfly import BFT, use_backend
from benchmarks.kernel_gpu import run_gpu_section
from benchmarks.machine import cpu_flags, keep_freed_memory, usable_cores, write_report
from butterfly.kernels import cpu

BATCH = 32
# (name, in, out, H = W)
SHAPES: List[Tuple[str, int, int, int]] = [
    ("square 64", 64, 64, 56), ("square 128", 128, 128, 28), ("square 256", 256, 256, 14),
    ("square 512", 512, 512, 14), ("square 1024", 1024, 1024, 7),
    ("ShuffleNetV2 116", 116, 116, 28), ("ShuffleNetV2 232", 232, 232, 14),
    ("ShuffleNetV2 464", 464, 464, 7),
    ("MobileNetV1 32->64", 32, 64, 112), ("MobileNetV1 512->1024", 512, 1024, 14),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[4], SHAPES[6]]
# speed goals set for the kernel, as ratios to the fastest conv (base 4, best BFT format):
# inference, training
TARGETS = {64: (2.0, 1.5), 128: (2.0, 1.5), 256: (4.0, 2.5), 512: (6.0, 2.5), 1024: (10.0, 2.5)}


def make_step(module: nn.Module, x: torch.Tensor, backend: str, train: bool) -> Callable[[], None]:
    """One inference (no grad) or training (forward + backward) step of ``module`` on ``x``."""
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


def time_interleaved(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int,
                     budget_s: float, clock: Callable[[], float], block: int,
                     settle_s: float) -> Dict[str, List[float]]:
    """Milliseconds of the timed calls of every step: the step's steady state when called back to
    back, as in a loop over a model. Each round runs every step untimed for at least ``settle_s``
    seconds and then times ``block`` calls. The settling matters on this machine: after a
    different kind of work (a compute-bound convolution, an idle pause) the first calls of a
    memory-bound step run up to 2x slower for several milliseconds while the caches and the
    uncore clock (L3, memory) catch up, which would charge one step for what the step before it
    did. Rounds interleave the steps in a rotating order, so load from other processes and what
    runs before whom hit all alike. A step slower than ``budget_s`` per call (the reference) gets
    one timed call per round, in the first three rounds only."""
    times: Dict[str, List[float]] = {k: [] for k in steps}
    warm: Dict[str, float] = {}
    for name, step in steps.items():
        for _ in range(warmup):
            t0 = clock()
            step()
            warm[name] = (clock() - t0) * 1e3
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps[name]
            slow = statistics.median(times[name] or [warm[name]]) > budget_s * 1e3
            if r >= 3 and slow:
                continue
            if not slow:
                until = time.perf_counter() + settle_s
                while True:
                    step()
                    if time.perf_counter() >= until:
                        break
            for _ in range(1 if slow else block):
                t0 = clock()
                step()
                times[name].append((clock() - t0) * 1e3)
    return times


def measure(cin: int, cout: int, hw: int, train: bool, rounds: int, block: int, settle_s: float,
            clock: Callable[[], float]) -> Dict[str, float]:
    x = torch.randn(BATCH, cin, hw, hw)
    xl = x.contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(cin, cout, 1, bias=False)
    conv_cl = nn.Conv2d(cin, cout, 1, bias=False).to(memory_format=torch.channels_last)
    bft4, bft2 = BFT(cin, cout, base=4), BFT(cin, cout, base=2)
    steps = {
        "conv NCHW": make_step(conv, x, "auto", train),
        "conv CL": make_step(conv_cl, xl, "auto", train),
        "BFT-4 NCHW": make_step(bft4, x, "cpu", train),
        "BFT-4 CL": make_step(bft4, xl, "cpu", train),
        "BFT-2 NCHW": make_step(bft2, x, "cpu", train),
        "BFT-2 CL": make_step(bft2, xl, "cpu", train),
        "reference": make_step(bft4, x, "reference", train),
    }
    out, src = torch.empty(BATCH, cout, hw, hw), torch.randn(BATCH, cout, hw, hw)
    steps["copy"] = lambda: out.copy_(src)
    times = time_interleaved(steps, rounds, warmup=2, budget_s=0.25, clock=clock, block=block,
                             settle_s=settle_s)
    ms = {k: statistics.median(v) for k, v in times.items()}
    ms.update({"_min " + k: min(v) for k, v in times.items()})
    pixels = BATCH * hw * hw
    ms["_macs_conv"] = cin * cout * pixels
    ms["_macs_bft4"], ms["_macs_bft2"] = bft4.macs_per_pixel * pixels, bft2.macs_per_pixel * pixels
    return ms


def table(results: List[Tuple[Tuple[str, int, int, int], Dict[str, float]]], train: bool) -> str:
    factor = 3 if train else 1  # training: forward, input gradient, weight gradient

    def cell(ms: float, macs: float, best: float) -> str:
        return f"{ms:.2f} ms, {factor * macs / ms / 1e6:.1f} GMAC/s, **{best / ms:.2f}x**"

    lines = ["| layer | H=W | conv NCHW | conv channels_last | BFT base 4, NCHW | "
             "BFT base 4, channels_last | BFT base 2, NCHW | BFT base 2, channels_last | "
             "reference (base 4) | copy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, cin, cout, hw), r in results:
        best = min(r["conv NCHW"], r["conv CL"])
        conv = [f"{r[k]:.2f} ms, {factor * r['_macs_conv'] / r[k] / 1e6:.1f} GMAC/s"
                for k in ("conv NCHW", "conv CL")]
        bft = [cell(r[f"BFT-{b} {f}"], r[f"_macs_bft{b}"], best)
               for b in (4, 2) for f in ("NCHW", "CL")]
        lines.append(f"| {name} | {hw} | {conv[0]} | {conv[1]} | {' | '.join(bft)} | "
                     f"{r['reference']:.1f} ms, {best / r['reference']:.2f}x | {r['copy']:.2f} ms |")
    return "\n".join(lines)


def targets(results, train: bool) -> str:
    lines = ["| C | target | reached: medians | reached: fastest calls | |", "|---|---|---|---|---|"]
    for (name, cin, cout, hw), r in results:
        if cin != cout or cin not in TARGETS:
            continue
        target = TARGETS[cin][1 if train else 0]
        ratio = min(r["conv NCHW"], r["conv CL"]) / min(r["BFT-4 NCHW"], r["BFT-4 CL"])
        best = min(r["_min conv NCHW"], r["_min conv CL"]) / min(r["_min BFT-4 NCHW"],
                                                                 r["_min BFT-4 CL"])
        verdict = "met" if ratio >= target else "missed"
        lines.append(f"| {cin} | >= {target}x | {ratio:.2f}x | {best:.2f}x | {verdict} |")
    return "\n".join(lines)


def limits(results, label: str) -> str:
    """What bounds the kernel in this run, from the measured times (inference)."""
    rows, small, large, conv = [], [], [], []
    for (name, cin, cout, hw), r in results:
        fastest = min(("BFT-4 NCHW", "BFT-4 CL", "BFT-2 NCHW", "BFT-2 CL"), key=lambda k: r[k])
        macs = r["_macs_bft4" if "4" in fastest else "_macs_bft2"]
        copies, gmacs = r[fastest] / r["copy"], macs / r[fastest] / 1e6
        rows.append(f"{name}: {r[fastest]:.2f} ms ({fastest}) = {copies:.1f}x the copy, "
                    f"{gmacs:.0f} GMAC/s")
        (small if max(cin, cout) <= 128 else large).append((copies, gmacs))
        conv.append(r["_macs_conv"] / min(r["conv NCHW"], r["conv CL"]) / 1e6)

    def span(values, fmt):
        if not values:
            return "n/a"
        low, high = f"{min(values):{fmt}}", f"{max(values):{fmt}}"
        return low if low == high else f"{low}-{high}"

    small_copies = [c for c, _ in small]
    memory_bound = bool(small_copies) and max(small_copies) <= 2.0
    return (f"What limits it ({label}, inference; fastest BFT variant per shape vs the copy of its "
            "output): " + "; ".join(rows) + ". A BFT moves as many bytes as the convolution it "
            "replaces (it reads the input once and writes the output once) but executes 5-50x "
            f"fewer multiply-adds. Up to 128 channels it takes {span(small_copies, '.1f')}x "
            "the time of a plain copy" + (
                ": memory bandwidth bounds it (the copy reads and writes through the cache; the "
                "kernel streams large outputs past it, so it can beat the copy)" if memory_bound
                else ": near the copy (memory-bound) only where the maps are largest") +
            f". From 232 channels on it takes {span([c for c, _ in large], '.1f')}x the copy "
            f"(which then runs from cache) and reaches {span([g for _, g in large], '.0f')} GMAC/s, "
            "far below the FMA peak (2 x 16 lanes per cycle per core): every fused run of stages "
            "reads and writes 16 rows at once from L2 or memory, and channels-last tiles are "
            "transposed in registers on the way in and out. The convolution, by contrast, is "
            f"bound by its FMAs ({span(conv, '.0f')} GMAC/s here), so the ratio grows with the "
            "channel count.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three shapes, fewer repetitions")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6, quick 3)")
    parser.add_argument("--block", type=int, default=3,
                        help="timed calls of each step per round (default 3)")
    parser.add_argument("--settle-ms", type=float, default=20.0,
                        help="untimed calls of a step, in milliseconds, before its timed calls in "
                             "each round (default 20; 0: one untimed call)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_cpu.md"),
                        help="markdown file to write")
    parser.add_argument("--threads", type=int, nargs="+", default=[usable_cores()],
                        help="thread counts to run, one set of tables each (default: cores)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also run with 1 thread, timed by the process's CPU time")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's malloc settings (freed memory returned to the OS)")
    args = parser.parse_args(argv)
    malloc_note = "glibc's malloc defaults." if args.malloc_defaults else keep_freed_memory()
    rounds = args.rounds or (3 if args.quick else 6)
    if cpu.load_extension() is None:
        print("the CPU kernel is unavailable (see the warning); nothing to benchmark", file=sys.stderr)
        return 1
    command = " ".join(["python -m benchmarks.kernel"] + (argv if argv is not None else sys.argv[1:]))
    sections = [
        "# BFT CPU kernel vs 1x1 convolution",
        "",
        f"CPU: {cpu.cpu_info()['model']}, {usable_cores()} cores ({cpu_flags()}); torch {torch.__version__}, "
        f"butterfly {butterfly.__version__}. Batch {BATCH}, residual on, float32. "
        + f"{rounds} rounds, steps interleaved in a rotating order; in each round a step runs "
        f"untimed for {args.settle_ms:g} ms and then {args.block} timed calls (medians of those: "
        "the time of a step called back to back; steps slower than 0.25 s: one timed call in "
        "each of the first 3 rounds).",
        f"Reproduce: `{command}`. Memory: {malloc_note}",
        "",
        "Each cell: median time, achieved GMAC/s (useful multiply-adds; training counts 3x the "
        "forward) and, in bold, the ratio best-conv-time / time (> 1: faster than the faster of "
        "the two convolutions). *copy*: copying an output-sized tensor, the least memory traffic "
        "of any layer of this shape; a BFT time close to it is memory-bound. The target tables "
        "compare the best BFT format (base 4) with the best conv, from medians and from the "
        "fastest call of each (the latter is less affected by other processes on the machine).",
    ]
    configs = [(n, time.perf_counter, f"{n} thread{'s' * (n > 1)}, wall clock")
               for n in args.threads]
    if args.cpu_time:
        configs.append((1, time.process_time, "1 thread, process CPU time"))
    for threads, clock, label in configs:
        torch.set_num_threads(threads)
        for train in (False, True):
            results = []
            for shape in (QUICK_SHAPES if args.quick else SHAPES):
                r = measure(*shape[1:], train=train, rounds=rounds, block=args.block,
                            settle_s=args.settle_ms / 1e3, clock=clock)
                results.append((shape, r))
                print(f"{label}, {'training' if train else 'inference'} {shape[0]}: " +
                      ", ".join(f"{k} {v:.2f} ms" for k, v in r.items() if not k.startswith("_")),
                      flush=True)
            title = "Training (forward + backward)" if train else "Inference (forward, no grad)"
            sections += ["", f"## {title}, {label}", "", table(results, train), "",
                         "Speed goals (time of the fastest conv / time of the BFT):", "", targets(results, train)]
            if not train:
                sections += ["", limits(results, label)]
    text = "\n".join(sections) + "\n"
    if torch.cuda.is_available():
        text += "\n" + run_gpu_section(args)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
