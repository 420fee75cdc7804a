"""The fused depthwise convolution against PyTorch's (oneDNN) depthwise conv, and the
depthwise -> BFT block in one pass against its two layers apart.

    python -m benchmarks.depthwise                 # writes benchmarks/results/depthwise_cpu.{json,md}
    python -m benchmarks.depthwise --quick         # fewer rounds, the 28x28 network only
    python -m benchmarks.depthwise --threads 1     # one set of tables per thread count (1 2)

Batch 32, float32, k = 3, no bias (as in the zoo). Shapes: every depthwise layer of
``mobilenetv1_bft_100`` at 28x28 (``small_input=True``, read off the model with forward hooks; the
network total is one step's depthwise work) and, without ``--quick``, 224-scale shapes. Runners,
timed together by the harness on the same weights: ``nn.Conv2d(C, C, 3, s, 1, groups=C)`` on
NCHW and channels_last input, and ``DepthwiseConv2d`` (the ``butterfly::depthwise_conv``
operator, "cpu" backend, called as a model calls it) on both formats; inference (no grad) and
training (forward + backward). *fused* is inference of a conv with bias and ReLU6 (a folded
BatchNorm): oneDNN's convolution with a post-op (what ``butterfly.passes.fuse`` runs) against the
kernel's epilogue. Without ``--quick``, the depthwise -> BFT blocks that
``butterfly.optimize_for_inference`` builds for :data:`BLOCK_MODELS` (channels_last, batch 1 and
32) are timed in one pass (``butterfly::dw_bft_fused``) against apart.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import timm
import torch
from torch import nn

import butterfly
from benchmarks import harness
from benchmarks.kernel import make_step
from butterfly.nn.depthwise import DepthwiseConv2d
from butterfly.ops.depthwise import depthwise_conv, kernel_available
from butterfly.ops.dw_bft_fused import kernel_applies
from butterfly.passes.fuse import FusedDepthwiseBFT

BATCH = 32
NETWORK = "mobilenetv1_bft_100"
LARGE = [(64, 112, 1), (128, 56, 1), (256, 28, 1), (512, 14, 1), (1024, 7, 1)]  # C, H=W, stride
RUNNERS = ("torch NCHW", "torch CL", "kernel NCHW", "kernel CL")
BLOCK_MODELS = [("mobilenetv1_bft_100", 160), ("shufflenetv2_bft_125", 224)]
MODES = ("inference", "training", "fused")


def network_layers(name: str = NETWORK, size: int = 28) -> List[Tuple[int, int, int]]:
    """(C, H, stride) of every depthwise conv of the model at ``size`` x ``size`` input."""
    model = timm.create_model(name, small_input=True, num_classes=10).eval()
    found: List[Tuple[int, int, int]] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            m.register_forward_hook(lambda mod, inputs, out: found.append(
                (mod.in_channels, inputs[0].shape[-1], mod.stride[0])))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return found


class Epilogue(nn.Module):
    """The kernel with bias and ReLU6 in its epilogue (``fused=True``) or oneDNN's convolution
    with ReLU6 as a post-op (what ``butterfly.passes.fuse.FusedConv`` runs)."""

    def __init__(self, conv: nn.Conv2d, kernel: bool):
        super().__init__()
        self.conv, self.kernel = conv, kernel

    def forward(self, x):
        c = self.conv
        if self.kernel:
            return depthwise_conv(x, c.weight, c.bias, c.stride[0], "relu6")
        return torch.ops.mkldnn._convolution_pointwise(
            x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
            "hardtanh", [0.0, 6.0], "")


def prepare(C: int, hw: int, stride: int, mode: str) -> Dict:
    """Runner name -> preparation of its step, the four on the same weights."""
    fused, train = mode == "fused", mode == "training"
    conv = nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=fused)
    conv_cl = nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=fused).to(
        memory_format=torch.channels_last)
    conv_cl.load_state_dict(conv.state_dict())
    ours = Epilogue(conv, True) if fused else DepthwiseConv2d.from_conv(conv)
    if fused:
        conv, conv_cl = Epilogue(conv, False), Epilogue(conv_cl, False)
    x = torch.randn(BATCH, C, hw, hw)
    xl = x.contiguous(memory_format=torch.channels_last)
    pairs = {"torch NCHW": (conv, x, "auto"), "torch CL": (conv_cl, xl, "auto"),
             "kernel NCHW": (ours, x, "cpu"), "kernel CL": (ours, xl, "cpu")}
    return {n: (lambda m=m, i=i, b=b: (make_step(m, i, b, train), {}))
            for n, (m, i, b) in pairs.items()}


def separable_blocks(name: str, res: int, batch: int):
    """(name, block, its input in the model) of every depthwise -> BFT block of
    ``optimize_for_inference(model, x)`` (channels_last, the batch whole) that the one-pass
    kernel takes."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
    fused, _ = butterfly.optimize_for_inference(model, x, chunk_batch=False)
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


def block_prep(blk: FusedDepthwiseBFT, x: torch.Tensor, one_pass: bool):
    def run():
        blk.one_pass = one_pass
        with torch.inference_mode():
            blk(x)
    shape = "x".join(map(str, x.shape[1:])) + f" -> {blk.pw.plan.out_channels}"
    return lambda: (run, {"input": shape, "runner": "one pass" if one_pass else "apart"})


def ratio_cells(cells: Dict[str, Dict]) -> List[str]:
    """ms of the four runners, then faster torch / faster kernel, NCHW / NCHW and CL / CL."""
    ms = {n: (c["ms"] if c and c["status"] == "ok" else None) for n, c in cells.items()}
    if None in ms.values():
        return [harness.fmt(ms[n], ".3f", "failed") for n in RUNNERS] + ["-"] * 3
    return ([f"{ms[n]:.3f}" for n in RUNNERS]
            + [f"{min(ms['torch NCHW'], ms['torch CL']) / min(ms['kernel NCHW'], ms['kernel CL']):.2f}x",
               f"{ms['torch NCHW'] / ms['kernel NCHW']:.2f}x", f"{ms['torch CL'] / ms['kernel CL']:.2f}x"])


def report(data: Dict) -> List[str]:
    cells = data["cells"]
    out = ["# Depthwise convolution on CPU: fused kernel vs PyTorch", "",
           "Medians of steady-state calls, the four runners of a row timed together; ratio = "
           "faster PyTorch format / faster kernel format (> 1: the kernel is faster); NCHW / "
           "NCHW and CL / CL compare one format (the zoo's models run NCHW). With 2 threads on a "
           "shared 2-core machine a call waits for its slower thread: compare ratios of one row, "
           "not times across rows or runs.", "", *harness.runs_section(data)]
    head = ["shape", *RUNNERS, "ratio", "NCHW / NCHW", "CL / CL"]
    for threads in sorted({c["threads"] for c in cells.values()}):
        out += [f"## {threads} thread{'s' * (threads > 1)}", ""]
        for mode in MODES:
            for group in ("net", "large"):
                rows = {k.rsplit("|", 1)[0]: None for k, c in cells.items()
                        if (c["threads"], c.get("mode"), c.get("group")) == (threads, mode, group)}
                if not rows:
                    continue
                lines, total = [], dict.fromkeys(RUNNERS, 0.0)
                for row in rows:
                    r = {n: cells.get(f"{row}|{n}") for n in RUNNERS}
                    c0 = next(iter(r.values()))
                    for n in RUNNERS:
                        total[n] += c0["count"] * (r[n]["ms"] if r[n] and r[n]["status"] == "ok"
                                                   else float("nan"))
                    label = f"{c0['C']}, {c0['hw']}x{c0['hw']}, s{c0['stride']}" + (
                        f" (x{c0['count']})" if c0["count"] > 1 else "")
                    lines.append([label, *ratio_cells(r)])
                if group == "net":
                    n_layers = sum(cells[f"{row}|{RUNNERS[0]}"]["count"] for row in rows)
                    lines.append([f"**all {n_layers} layers**", *ratio_cells(
                        {n: {"status": "ok", "ms": v} for n, v in total.items()})])
                what = (f"`{NETWORK}` at 28x28 (small_input)" if group == "net"
                        else "224-scale shapes")
                out += [f"{what}, batch {BATCH}, {mode}"
                        + (" (bias + ReLU6: oneDNN post-op vs the kernel's epilogue)"
                           if mode == "fused" else "") + ", ms:", "", *harness.table(head, lines),
                        ""]
        blocks = [c for c in cells.values() if c["threads"] == threads and c.get("mode") == "blocks"]
        for model, batch in dict.fromkeys((c["model"], c["batch"]) for c in blocks):
            mine = {c["block"]: {} for c in blocks if (c["model"], c["batch"]) == (model, batch)}
            for c in blocks:
                if (c["model"], c["batch"]) == (model, batch):
                    mine[c["block"]][c["runner"]] = c
            rows, total = [], [0.0, 0.0]
            for name, r in mine.items():
                one, apart = (r[k]["ms"] if r[k]["status"] == "ok" else float("nan")
                              for k in ("one pass", "apart"))
                total = [total[0] + one, total[1] + apart]
                rows.append([name, r["one pass"].get("input", ""), f"{one:.3f}", f"{apart:.3f}",
                             f"{apart / one:.2f}x"])
            rows.append([f"**all {len(mine)} blocks**", "", f"{total[0]:.3f}", f"{total[1]:.3f}",
                         f"{total[1] / total[0]:.2f}x"])
            out += [f"Depthwise -> BFT blocks of `{model}`, batch {batch}, channels_last, "
                    "inference: one pass (`butterfly::dw_bft_fused`) vs the two fused layers "
                    "apart, ms:", "", *harness.table(["block", "input (C x H x W) -> out",
                                                      "one pass", "apart", "speed-up"], rows,
                                                     "llrrr"), ""]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = harness.checked(harness.parser("depthwise", __doc__, threads=[1, 2]), argv)
    if not kernel_available():
        print("the fused CPU kernel is unavailable; nothing to compare", file=sys.stderr)
        return 1
    store = harness.Store(args.out_dir / "depthwise_cpu.json", "depthwise", keep=False)
    store.start("depthwise", argv, args.note, malloc=harness.malloc_note(args))
    timing = (harness.Timing(rounds=4, calls=2, settle_s=0.01) if args.quick
              else harness.Timing(rounds=8, calls=3, settle_s=0.02))
    large_timing = harness.Timing(max(3, timing.rounds // 2), timing.calls, 0, timing.settle_s)
    layers = network_layers()
    for threads in args.threads:
        for mode in MODES:
            shapes = [("net", s, layers.count(s), timing) for s in dict.fromkeys(layers)]
            if not args.quick and mode != "fused":
                shapes += [("large", s, 1, large_timing) for s in LARGE]
            for group, (C, hw, stride), count, t in shapes:
                row = f"t{threads}|{mode}|{group}|{C},{hw},s{stride}"
                harness.measure(store, {f"{row}|{n}": p for n, p in
                                        prepare(C, hw, stride, mode).items()},
                                t, threads, mode=mode, group=group, C=C, hw=hw, stride=stride,
                                count=count)
        for model, res in [] if args.quick else BLOCK_MODELS:
            for batch in (1, BATCH):
                for name, blk, x in separable_blocks(model, res, batch):
                    row = f"t{threads}|blocks|{model}@{res}|b{batch}|{name}"
                    harness.measure(store, {f"{row}|{r}": block_prep(blk, x, r == "one pass")
                                            for r in ("one pass", "apart")},
                                    large_timing, threads, mode="blocks", model=f"{model}@{res}",
                                    batch=batch, block=name)
        store.save()
    harness.write_report(args.out_dir / "depthwise_cpu.md", report(store.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
