"""Training-mode BatchNorm + activation on CPU: the fused kernel (butterfly.batchnorm) vs PyTorch.

    python -m benchmarks.batchnorm                 # 1 and 2 threads
    python -m benchmarks.batchnorm --threads 2 --quick

Two tables per thread count, both with the two variants timed in the same interleaved rounds:

* layers: ``batch_norm_act(x, bn, "relu")`` forward + backward against ``relu(bn(x))`` (PyTorch's
  BatchNorm, the oracle), for the BatchNorm shapes of ``mobilenetv1_bft_100`` at 24x24 (the
  reproduction's size; batch 32) and a few 224-scale shapes, in NCHW and channels_last;
* whole training steps (forward, cross-entropy, backward, SGD) of the Fashion-MNIST-shaped zoo
  models (batch 32, channels_last, their faster format) with the zoo's fused conv-BN-activation
  unit against the same model with that unit running ``act(bn(conv(x)))`` in PyTorch: the share
  of the step the fused BatchNorm saves.

Results: ``benchmarks/results/batchnorm_cpu.md``. Medians over rounds; the load average before
and after says what else ran.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.kernel import time_interleaved
from benchmarks.machine import keep_freed_memory, loadavg, machine, now, write_report
from butterfly.batchnorm import batch_norm_act, kernel_runs
from butterfly.models import layers as zoo_layers

LAYER_SHAPES = [(32, 32, 24, 24), (32, 64, 12, 12), (32, 128, 12, 12), (32, 256, 6, 6),
                (32, 512, 3, 3), (32, 1024, 2, 2), (32, 64, 112, 112), (32, 256, 28, 28)]
STEP_MODELS = [("mobilenetv1_bft_100", 24), ("mobilenetv1_025", 28),
               ("shufflenetv2_bft_125", 29), ("shufflenetv2_050", 29),
               ("mobilenetv3_small_bft_050", 28), ("mobilenetv3_small_035", 24)]
FORMATS = {"NCHW": torch.contiguous_format, "CL": torch.channels_last}


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, calls: int) -> Dict[str, float]:
    """Median ms per call of each function: :func:`benchmarks.kernel.time_interleaved` (rotating
    rounds, each step settled before ``calls`` timed calls)."""
    times = time_interleaved(fns, rounds, warmup=1, budget_s=10.0, clock=time.perf_counter,
                             block=calls, settle_s=0.02)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_table(rounds: int) -> List[str]:
    rows = ["| shape (N, C, H, W) | format | PyTorch ms | fused ms | speed-up |",
            "|---|---|---:|---:|---:|"]
    for shape in LAYER_SHAPES:
        for fmt_name, fmt in FORMATS.items():
            x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
            grad = torch.randn(shape).contiguous(memory_format=fmt)
            bn = nn.BatchNorm2d(shape[1]).train()
            assert kernel_runs(x, bn)
            calls = max(1, int(2e6 // x.numel()))
            ms = interleaved({
                "torch": lambda: torch.relu(bn(x)).backward(grad),
                "fused": lambda: batch_norm_act(x, bn, "relu").backward(grad),
            }, rounds, calls)
            rows.append(f"| {shape} | {fmt_name} | {ms['torch']:.3f} | {ms['fused']:.3f} | "
                        f"{ms['torch'] / ms['fused']:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def _plain_forward(self, x):
    return self.act(self.bn(self.conv(x)))


def step_table(rounds: int) -> List[str]:
    rows = ["| model @ input | PyTorch BatchNorm ms/step | fused ms/step | step saved |",
            "|---|---:|---:|---:|"]
    fused_forward = zoo_layers.ConvBnAct.forward
    for name, res in STEP_MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, in_chans=1, small_input=True)
        model = model.to(memory_format=torch.channels_last).train()
        x = torch.randn(32, 1, res, res).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (32,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(forward) -> None:
            zoo_layers.ConvBnAct.forward = forward
            try:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                zoo_layers.ConvBnAct.forward = fused_forward

        ms = interleaved({"torch": lambda: step(_plain_forward),
                          "fused": lambda: step(fused_forward)}, rounds, 5)
        rows.append(f"| `{name}` @{res} | {ms['torch']:.2f} | {ms['fused']:.2f} | "
                    f"{100 * (1 - ms['fused'] / ms['torch']):.0f}% |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "batchnorm_cpu.md"))
    args = parser.parse_args(argv)
    probe = torch.randn(2, 2, 2, 2)
    if not kernel_runs(probe, nn.BatchNorm2d(2)):
        print("the fused CPU kernel is unavailable; nothing to compare", file=sys.stderr)
        return 1
    malloc = keep_freed_memory()
    rounds = 3 if args.quick else 7
    before, started = loadavg(), time.time()
    sections: List[str] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        sections += [f"\n### {threads} thread{'s' if threads > 1 else ''}\n",
                     "Layers, forward + backward, ReLU:\n", *layer_table(rounds),
                     "\nWhole training steps, batch 32, channels_last:\n", *step_table(rounds)]
    info = ", ".join(f"{k} {v}" for k, v in machine(timm=timm.__version__).items())
    command = "python -m benchmarks.batchnorm " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "## Training-mode BatchNorm + activation on CPU: fused kernel vs PyTorch", "",
        f"Command: `{command.strip()}` ({time.time() - started:.0f} s, {now()}).",
        f"Machine: {info}. {malloc}",
        f"Load average before / after: {before} / {loadavg()}.", "",
        "Medians over interleaved rounds (`benchmarks.kernel.time_interleaved`: the two "
        "variants of a row alternate, each settled before it is timed), so load from other "
        "processes falls on both alike.",
        *sections, ""])
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
