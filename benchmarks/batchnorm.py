"""Training-mode BatchNorm + activation on CPU: the fused kernel against PyTorch.

    python -m benchmarks.batchnorm                 # 1 and 2 threads; benchmarks/results/batchnorm_cpu.{json,md}
    python -m benchmarks.batchnorm --threads 2 --quick

Both runners of a row are timed together by the harness:

* layers: ``batch_norm_act(x, bn, "relu")`` (``butterfly.ops.batch_norm_act``) forward + backward
  against ``relu(bn(x))`` (PyTorch's BatchNorm), for the BatchNorm shapes of
  ``mobilenetv1_bft_100`` at 24x24 (batch 32) and two 224-scale shapes, NCHW and channels_last;
* steps: whole training steps (forward, cross-entropy, backward, SGD) of the Fashion-MNIST-shaped
  zoo models (batch 32, channels_last) with the zoo's fused conv-BN-activation unit against the
  same unit running ``act(bn(conv(x)))`` in PyTorch: the share of a step the fused BatchNorm saves.
"""
from __future__ import annotations

import sys
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness
from butterfly.models import layers as zoo_layers
from butterfly.ops.batch_norm_act import batch_norm_act, kernel_runs

LAYER_SHAPES = [(32, 32, 24, 24), (32, 64, 12, 12), (32, 128, 12, 12), (32, 256, 6, 6),
                (32, 512, 3, 3), (32, 1024, 2, 2), (32, 64, 112, 112), (32, 256, 28, 28)]
STEP_MODELS = [("mobilenetv1_bft_100", 24), ("mobilenetv1_025", 28),
               ("shufflenetv2_bft_125", 29), ("shufflenetv2_050", 29),
               ("mobilenetv3_small_bft_050", 28), ("mobilenetv3_small_035", 24)]
FORMATS = {"NCHW": torch.contiguous_format, "CL": torch.channels_last}


def layer_preps(shape, fmt) -> Dict:
    x = torch.randn(shape).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    grad = torch.randn(shape).contiguous(memory_format=FORMATS[fmt])
    bn = nn.BatchNorm2d(shape[1]).train()
    if not kernel_runs(x, bn):
        raise RuntimeError(f"the fused kernel does not take {shape} {fmt}")
    return {"torch": lambda: (lambda: torch.relu(bn(x)).backward(grad), {}),
            "fused": lambda: (lambda: batch_norm_act(x, bn, "relu").backward(grad), {})}


def _plain_forward(self, x):
    return self.act(self.bn(self.conv(x)))


def step_preps(name: str, res: int) -> Dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=1, small_input=True)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(32, 1, res, res).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fused_forward = zoo_layers.ConvBnAct.forward

    def step(forward) -> None:
        zoo_layers.ConvBnAct.forward = forward
        try:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            zoo_layers.ConvBnAct.forward = fused_forward
    return {"torch": lambda: (lambda: step(_plain_forward), {}),
            "fused": lambda: (lambda: step(fused_forward), {})}


def report(data: Dict) -> List[str]:
    cells = data["cells"]
    out = ["# Training-mode BatchNorm + activation on CPU: fused kernel vs PyTorch", "",
           "Medians over interleaved rounds: the two runners of a row alternate, each settled "
           "before it is timed, so load from other processes falls on both alike.", "",
           *harness.runs_section(data)]
    for threads in sorted({c["threads"] for c in cells.values()}):
        layers, steps = [], []
        for row in dict.fromkeys(k.rsplit("|", 1)[0] for k in cells if k.startswith(f"t{threads}|")):
            t, f = cells[f"{row}|torch"], cells[f"{row}|fused"]
            if "failed" in (t["status"], f["status"]):
                cols = [t.get("reason") or f.get("reason"), "", ""]
            else:
                cols = [f"{t['ms']:.3f}", f"{f['ms']:.3f}", f"{t['ms'] / f['ms']:.2f}x"
                        if t["kind"] == "layer" else f"{100 * (1 - f['ms'] / t['ms']):.0f}%"]
            if t["kind"] == "layer":
                layers.append([tuple(t["shape"]), t["format"], *cols])
            else:
                steps.append([f"`{t['model']}` @{t['res']}", *cols])
        out += [f"## {threads} thread{'s' * (threads > 1)}", "",
                "Layers, forward + backward, ReLU:", "",
                *harness.table(["shape (N, C, H, W)", "format", "PyTorch ms", "fused ms",
                                "speed-up"], layers, "llrrr"), "",
                "Whole training steps, batch 32, channels_last:", "",
                *harness.table(["model @ input", "PyTorch BatchNorm ms/step", "fused ms/step",
                                "step saved"], steps, "lrrr"), ""]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = harness.checked(harness.parser("batchnorm", __doc__, threads=[1, 2]), argv)
    if not kernel_runs(torch.randn(2, 2, 2, 2), nn.BatchNorm2d(2)):
        print("the fused CPU kernel is unavailable; nothing to compare", file=sys.stderr)
        return 1
    store = harness.Store(args.out_dir / "batchnorm_cpu.json", "batchnorm", keep=False)
    store.start("batchnorm", argv, args.note, malloc=harness.malloc_note(args))
    rounds = 3 if args.quick else 7
    for threads in args.threads:
        for shape in LAYER_SHAPES:
            timing = harness.Timing(rounds, calls=max(1, int(2e6 // torch.Size(shape).numel())))
            for fmt in FORMATS:
                row = f"t{threads}|layer|{shape}|{fmt}"
                harness.measure(store, {f"{row}|{n}": p for n, p in layer_preps(shape, fmt).items()},
                                timing, threads, kind="layer", shape=shape, format=fmt)
        for name, res in STEP_MODELS:
            row = f"t{threads}|step|{name}@{res}"
            harness.measure(store, {f"{row}|{n}": p for n, p in step_preps(name, res).items()},
                            harness.Timing(rounds, calls=5), threads, kind="step", model=name,
                            res=res)
        store.save()
    harness.write_report(args.out_dir / "batchnorm_cpu.md", report(store.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
