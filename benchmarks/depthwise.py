"""Benchmark of the fused depthwise convolution against PyTorch's (oneDNN) depthwise conv.

    python -m benchmarks.depthwise                 # writes benchmarks/results/depthwise_cpu.md
    python -m benchmarks.depthwise --quick         # fewer rounds, the 28x28 network only
    python -m benchmarks.depthwise --threads 1     # one set of tables per thread count (1 2)
    python -m benchmarks.depthwise --out FILE.md
    python -m benchmarks.depthwise --malloc-defaults   # glibc frees large blocks to the OS

Shapes, batch 32, float32, k = 3, no bias (as in the zoo):

* every depthwise layer of ``mobilenetv1_bft_100`` at 28x28 (``small_input=True``), read off
  the model with forward hooks (13 layers, 32 to 1024 channels at 28 down to 2 pixels), and
  their total: one training or inference step's depthwise work;
* 224x224-scale shapes: 64 channels at 112x112, 128 at 56, 256 at 28, 512 at 14, 1024 at 7.

Per shape and thread count it times, interleaved round by round (``benchmarks.kernel``'s
``time_interleaved``: each step in its steady state after 20 ms of untimed calls, medians), four
layers on the same weights: ``nn.Conv2d(C, C, 3, s, 1, groups=C)`` on NCHW and channels_last
input, and :class:`butterfly.depthwise.DepthwiseConv2d` (the ``butterfly::depthwise_conv``
operator, "cpu" backend, called through the module as a model calls it) on both formats.
Inference is the forward pass under ``torch.no_grad()``; training is forward + backward with
input and weight gradients. For the 28x28 network it also times fused inference: a conv with
bias and ReLU6 (as after folding an eval BatchNorm), oneDNN's convolution with a post-op (what
``butterfly.fusion`` runs today) against the kernel's epilogue. The ratio is the faster PyTorch format over the faster kernel format.

Without ``--quick`` it also times the depthwise -> BFT blocks of :data:`BLOCK_MODELS` (batch 1
and 32, channels_last) in one pass against their two layers apart (:func:`block_tables`).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch
from torch import nn

import butterfly  # also registers the zoo models in timm
from benchmarks.kernel import make_step, time_interleaved
from benchmarks.machine import cpu_flags, keep_freed_memory, write_report
from butterfly.depthwise import DepthwiseConv2d, depthwise_conv, kernel_available
from butterfly.fusion import FusedDepthwiseBFT
from butterfly.kernels import cpu
from butterfly.separable import kernel_applies

BATCH = 32
NETWORK = "mobilenetv1_bft_100"
# (C, H = W, stride) at 224x224 scale
LARGE = [(64, 112, 1), (128, 56, 1), (256, 28, 1), (512, 14, 1), (1024, 7, 1)]
STEPS = ("torch NCHW", "torch CL", "kernel NCHW", "kernel CL")
# The depthwise -> BFT blocks of these (model, resolution), channels_last, batch 1 and BATCH.
BLOCK_MODELS = [("mobilenetv1_bft_100", 160), ("shufflenetv2_bft_125", 224)]


def network_layers(name: str = NETWORK, size: int = 28) -> List[Tuple[int, int, int]]:
    """(C, H, stride) of every depthwise conv of the model at ``size`` x ``size`` input."""
    model = timm.create_model(name, small_input=True, num_classes=10).eval()
    found: List[Tuple[int, int, int]] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            m.register_forward_hook(
                lambda mod, inputs, out: found.append((mod.in_channels, inputs[0].shape[-1],
                                                       mod.stride[0])))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return found


class _Fused(nn.Module):
    """The kernel with its epilogue: bias and ReLU6 before the store (a folded BatchNorm)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return depthwise_conv(x, self.conv.weight, self.conv.bias, self.conv.stride[0], "relu6")


class _OneDNNFused(nn.Module):
    """PyTorch's fused form (what ``butterfly.fusion.FusedConv`` runs): oneDNN's convolution
    with ReLU6 as a post-op, else the conv and an in-place ReLU6."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)

    def forward(self, x):
        c = self.conv
        if self.op is None:
            return torch.relu6_(c(x)) if hasattr(torch, "relu6_") else c(x).clamp_(0, 6)
        return self.op(x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation),
                       c.groups, "hardtanh", [0.0, 6.0], "")


def measure(C: int, hw: int, stride: int, train: bool, rounds: int, block: int,
            settle_s: float, epilogue: bool = False) -> Dict[str, float]:
    """Median milliseconds of the four steps at one shape. With ``epilogue``: a conv with bias,
    then ReLU6, fused (PyTorch: oneDNN's post-op, :class:`_OneDNNFused`; the kernel: its
    epilogue)."""
    conv = nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=epilogue)
    conv_cl = nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=epilogue).to(
        memory_format=torch.channels_last)
    conv_cl.load_state_dict(conv.state_dict())
    ours = _Fused(conv) if epilogue else DepthwiseConv2d.from_conv(conv)
    if epilogue:
        conv, conv_cl = (_OneDNNFused(c) for c in (conv, conv_cl))
    x = torch.randn(BATCH, C, hw, hw)
    xl = x.contiguous(memory_format=torch.channels_last)
    steps = {"torch NCHW": make_step(conv, x, "auto", train),
             "torch CL": make_step(conv_cl, xl, "auto", train),
             "kernel NCHW": make_step(ours, x, "cpu", train),
             "kernel CL": make_step(ours, xl, "cpu", train)}
    times = time_interleaved(steps, rounds, warmup=2, budget_s=10.0, clock=time.perf_counter,
                             block=block, settle_s=settle_s)
    return {k: statistics.median(v) for k, v in times.items()}


def ratio(ms: Dict[str, float]) -> float:
    return min(ms["torch NCHW"], ms["torch CL"]) / min(ms["kernel NCHW"], ms["kernel CL"])


def table(rows: List[Tuple[str, Dict[str, float]]]) -> str:
    head = "| shape | " + " | ".join(STEPS) + " | ratio | NCHW / NCHW | CL / CL |"
    lines = [head, "|" + "---|" * (len(STEPS) + 4)]
    for label, ms in rows:
        cells = " | ".join(f"{ms[k]:.3f}" for k in STEPS)
        same = (f"{ms['torch NCHW'] / ms['kernel NCHW']:.2f}x | "
                f"{ms['torch CL'] / ms['kernel CL']:.2f}x")
        lines.append(f"| {label} | {cells} | {ratio(ms):.2f}x | {same} |")
    return "\n".join(lines)


def load_note() -> str:
    """The load average and the other processes using the CPUs (Linux ``ps``)."""
    la = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True,
                            text=True, timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        ps = []
    me = str(os.getpid())
    busy = [ln.strip()[:110] for ln in ps if ln.strip() and float(ln.split()[0]) >= 5.0
            and me not in ln and "ps -eo" not in ln][:8]
    return f"load average {la}" + ("; other processes using CPU:\n\n" + "\n".join(
        f"    {b}" for b in busy) if busy else "")


def separable_blocks(name: str, res: int, batch: int) -> List[Tuple[str, FusedDepthwiseBFT, torch.Tensor]]:
    """The depthwise -> BFT blocks of ``optimize_for_inference(model, x)`` (channels_last) that
    the one-pass kernel takes, each with its input in the model."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
    fused, _ = butterfly.optimize_for_inference(model, x)
    blocks = {n: m for n, m in fused.named_modules() if isinstance(m, FusedDepthwiseBFT)}
    inputs: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0]))
             for n, m in blocks.items()]
    with torch.inference_mode():
        fused(x)
    for h in hooks:
        h.remove()
    return [(n, m, inputs[n]) for n, m in blocks.items()
            if n in inputs and kernel_applies(inputs[n], m.dw.weight, m.dw.stride[0])]


def block_steps(blk: FusedDepthwiseBFT, x: torch.Tensor) -> Dict[str, object]:
    """The block in one pass (``butterfly::dw_bft_fused``) and with its two layers apart."""
    def step(one_pass: bool):
        def run():
            blk.one_pass = one_pass
            with torch.inference_mode():
                blk(x)
        return run
    return {"one pass": step(True), "apart": step(False)}


def block_tables(threads: int, rounds: int, block: int, settle_s: float) -> str:
    """Per block and in total: one pass against apart, for BLOCK_MODELS at batch 1 and BATCH."""
    torch.set_num_threads(threads)
    out = []
    for name, res in BLOCK_MODELS:
        for batch in (1, BATCH):
            rows, total = [], {"one pass": 0.0, "apart": 0.0}
            for bname, blk, x in separable_blocks(name, res, batch):
                times = time_interleaved(block_steps(blk, x), rounds, warmup=2, budget_s=10.0,
                                         clock=time.perf_counter, block=block, settle_s=settle_s)
                ms = {k: statistics.median(v) for k, v in times.items()}
                for k in total:
                    total[k] += ms[k]
                shape = "x".join(map(str, x.shape[1:]))
                rows.append(f"| {bname} | {shape} -> {blk.pw.plan.out_channels} | {ms['one pass']:.3f} | "
                            f"{ms['apart']:.3f} | {ms['apart'] / ms['one pass']:.2f}x |")
            rows.append(f"| **all {len(rows)} blocks** | | {total['one pass']:.3f} | "
                        f"{total['apart']:.3f} | {total['apart'] / total['one pass']:.2f}x |")
            print(f"  {threads}t blocks {name}@{res} batch {batch}: "
                  f"{total['apart'] / total['one pass']:.2f}x", flush=True)
            out += [f"\n`{name}` @{res}, batch {batch}, channels_last, ms per call:\n",
                    "| block | input (C x H x W) -> out | one pass | apart | speed-up |",
                    "|---|---|---:|---:|---:|", *rows]
    return "\n".join(out)


def run_tables(threads: int, quick: bool, rounds: int, block: int, settle_s: float) -> str:
    torch.set_num_threads(threads)
    out = [f"### {threads} thread{'s' if threads > 1 else ''}"]
    layers = network_layers()
    shapes = sorted(set(layers), key=layers.index)
    for train in (False, True):
        kind = "training (forward + backward)" if train else "inference (forward)"
        rows, total = [], {k: 0.0 for k in STEPS}
        for C, hw, s in shapes:
            ms = measure(C, hw, s, train, rounds, block, settle_s)
            count = layers.count((C, hw, s))
            for k in STEPS:
                total[k] += count * ms[k]
            rows.append((f"{C}, {hw}x{hw}, s{s}" + (f" (x{count})" if count > 1 else ""), ms))
            print(f"  {threads}t {kind[:9]} {rows[-1][0]}: {ratio(ms):.2f}x", flush=True)
        rows.append((f"**{NETWORK} at 28x28, all {len(layers)} layers**", total))
        out += [f"\n{NETWORK} at 28x28 (small_input), batch {BATCH}, {kind}, ms:\n", table(rows)]
        if not train:  # fused inference: bias (a folded BatchNorm) and ReLU6 in the epilogue
            rows, total = [], {k: 0.0 for k in STEPS}
            for C, hw, s in shapes:
                ms = measure(C, hw, s, False, rounds, block, settle_s, epilogue=True)
                count = layers.count((C, hw, s))
                for k in STEPS:
                    total[k] += count * ms[k]
                rows.append((f"{C}, {hw}x{hw}, s{s}" + (f" (x{count})" if count > 1 else ""),
                             ms))
            rows.append((f"**{NETWORK} at 28x28, all {len(layers)} layers**", total))
            out += [f"\n{NETWORK} at 28x28, batch {BATCH}, fused inference, bias + ReLU6: "
                    "oneDNN's convolution with a ReLU6 post-op (as butterfly.fusion runs it) vs "
                    "the kernel's epilogue, ms:\n", table(rows)]
        if not quick:
            rows = []
            for C, hw, s in LARGE:
                ms = measure(C, hw, s, train, max(3, rounds // 2), block, settle_s)
                rows.append((f"{C}, {hw}x{hw}, s{s}", ms))
                print(f"  {threads}t {kind[:9]} {rows[-1][0]}: {ratio(ms):.2f}x", flush=True)
            out += [f"\n224x224-scale shapes, batch {BATCH}, {kind}, ms:\n", table(rows)]
    if not quick:
        out += ["\nThe depthwise-separable block in one pass (`butterfly::dw_bft_fused`: the "
                "depthwise output of each tile stays in cache and the BFT reads it there) against "
                "its two fused layers apart (`FusedConv` on the depthwise kernel, then "
                "`FusedBFT`), each block of `butterfly.optimize_for_inference(model, x)` on its "
                "input in the model, inference:",
                block_tables(threads, max(3, rounds // 2), block, settle_s)]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc as it is (freed memory returns to the OS, so "
                             "large temporaries are page-faulted in again on every call)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "depthwise_cpu.md"))
    args = parser.parse_args(argv)
    if not kernel_available():
        print("the fused CPU kernel is unavailable; nothing to compare", file=sys.stderr)
        return 1
    malloc = "glibc's malloc defaults." if args.malloc_defaults else keep_freed_memory()
    rounds, block, settle = (4, 2, 0.01) if args.quick else (8, 3, 0.02)
    before = load_note()
    started = time.time()
    sections = [run_tables(t, args.quick, rounds, block, settle) for t in args.threads]
    after = load_note()
    command = "python -m benchmarks.depthwise " + " ".join(argv if argv is not None else
                                                            sys.argv[1:])
    text = "\n".join([
        "## Depthwise convolution on CPU: fused kernel vs PyTorch",
        "",
        f"Command: `{command.strip()}` ({time.time() - started:.0f} s, "
        f"{time.strftime('%Y-%m-%d %H:%M')}).",
        f"Machine: {cpu.cpu_info()['model']} ({cpu_flags()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}. {malloc}",
        "",
        "Times are medians of steady-state calls, the four steps of a shape interleaved round by "
        "round; ratio = faster PyTorch format / faster kernel format (> 1: the kernel is faster); "
        "NCHW / NCHW and CL / CL compare the same format (the zoo's models run NCHW). "
        "The kernel is called through `DepthwiseConv2d` (the `butterfly::depthwise_conv` "
        "custom op, Python dispatch included). The machine was shared while this ran, so "
        "the times are indicative; ratios of steps timed in the same rounds are the figures to "
        "compare. With 2 threads on a 2-core machine that other jobs share, a call waits for "
        "its slower thread whenever the OS runs something else on the other core: those "
        "times come in multiples of the scheduler's 4 ms tick and measure the scheduler, not "
        "the kernels.",
        "",
        f"Before: {before}",
        "",
        f"After: {after}",
        "",
        *sections,
        "",
    ])
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
