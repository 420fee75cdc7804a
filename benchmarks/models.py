"""Model-level CPU benchmark of the zoo: every way a user can run a model, each BFT model timed
side by side with its MAC-matched baseline.

    python -m benchmarks.models                    # all of the paper's configurations (~1.5 h)
    python -m benchmarks.models --dry-run          # list the cells a run would measure, and exit
    python -m benchmarks.models --models mobilenetv3_small_035 mobilenetv3_small_bft_050 --quick
    python -m benchmarks.models --configs mobilenetv1_bft_100@160 mobilenetv1_025@224 --quick
    python -m benchmarks.models --paths eager fused --threads 1 --batch 1 --note "idle machine"
    python -m benchmarks.models --force            # re-measure cells already in the JSON
    python -m benchmarks.models --retry-failed     # re-measure only the cells that failed

Configurations are the rows of the BFT paper's Table 1 (model, input resolution, paper MFLOPs and
ImageNet top-1 in :data:`PAPER`); ``--res`` replaces the resolutions. Every model is built with
random weights (seed 0), 1000 classes, eval mode, float32, and timed on these paths (each one a
separate cell, see :data:`PATHS`):

* ``eager``: the model in PyTorch, NCHW input, under ``torch.inference_mode()``;
* ``eager_cl``: model and input in ``channels_last``;
* ``compile``: ``torch.compile`` (inductor, ``freezing=True``, static shapes) of the
  ``channels_last`` model, compiled afresh for every thread count and batch size under
  ``inference_mode`` and called until its call time is steady;
* ``ort``: onnxruntime (CPU) on ``butterfly.export_onnx(model, x, path, structured=False)``, the
  dense export, for every model; ``ort_structured``: the structured export (BFT models only);
  exported with the batch size timed;
* ``fused``: ``butterfly.optimize_for_inference(model, x)`` for the batch size and thread count
  timed, then the returned model in eager with NCHW input; ``fused_cl``: the same with a
  ``channels_last`` model and input. The first lines of ``str(report)`` are recorded.

The two models of a row of Table 1 (:data:`PAIRS`: a BFT model and its MAC-matched baseline) are
timed side by side when both are requested (:func:`measurement_units`): for each thread count
(``torch.set_num_threads``; onnxruntime ``intra_op_num_threads``) and batch size, the paths of
both models (of one model, for a configuration without its pair) are timed interleaved: rounds in
a rotating order, in each round a path runs
untimed for ``settle`` seconds (at least one call) and is then timed by
``torch.utils.benchmark.Timer.blocked_autorange``; a cell reports the median over the timed blocks
of all rounds (batch 1: latency in ms; batch 32: images per second), with the quartiles. Each output is also
compared with the eager output (max relative difference). The load average is recorded before and
after each model and each group of cells. With the "what bounds it" pair (mobilenetv1_bft_200 and
mobilenetv1_050 at 224), the machine's copy bandwidth and conv / depthwise / BFT multiply-add rates
are measured too, once per thread count.

By default glibc's malloc is told to keep freed memory (``mallopt``, as jemalloc or tcmalloc
do; ``--malloc-defaults`` measures without): with glibc's defaults, whichever model or path
allocates after another one's large free faults in fresh zeroed pages, and timing two models side
by side made the BFT model's batch-32 times vary by 2x with what ran before it.

Results are cached per cell in ``models_cpu.json`` (under ``--out-dir``, default
``benchmarks/results``); a rerun skips cells already there unless ``--force``, and the JSON is
saved after every group, so an interrupted run loses at most one group. ``models_cpu.md`` and
``accuracy_vs_latency.png`` are regenerated from the whole JSON at the end of every run. A path
that fails (export, compile, a runtime error) is recorded as failed with a one-line reason.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
from torch import nn
from torch.utils.benchmark import Timer

import butterfly
from benchmarks.machine import (keep_freed_memory, loadavg, now, one_line, torch_threads,
                                usable_cores)
from benchmarks.machine import machine as describe_machine
from butterfly.flops import count_macs

RESULTS = Path(__file__).parent / "results"
JSON_NAME, MD_NAME, PLOT_NAME = "models_cpu.json", "models_cpu.md", "accuracy_vs_latency.png"

# ImageNet top-1 (%) and MFLOPs (millions of multiply-adds, as the paper counts them) of every
# configuration in the BFT paper (Alizadeh Vahid et al., CVPR 2020), Table 1: (a) ShuffleNetV2
# (the baseline numbers are the paper's own runs), (b) MobileNetV3-Small, (c) MobileNetV1.
PAPER: Dict[Tuple[str, int], Dict] = {}
for _model, _table, _rows in [
    ("mobilenetv1_025", "1c", [(128, 14, 41.50), (160, 21, 45.50), (192, 34, 47.70),
                               (224, 41, 50.60)]),
    ("mobilenetv1_050", "1c", [(128, 49, 56.30), (192, 110, 61.70), (224, 150, 63.30)]),
    ("mobilenetv1_bft_100", "1c", [(96, 14, 46.58), (128, 23, 52.26), (160, 35, 54.30),
                                   (192, 51, 57.56)]),
    ("mobilenetv1_bft_200", "1c", [(128, 52, 58.35), (192, 112, 63.03), (224, 150, 64.32)]),
    ("shufflenetv2_050", "1a", [(128, 14, 50.86), (160, 21, 55.21), (224, 41, 59.70)]),
    ("shufflenetv2_bft_125", "1a", [(128, 14, 55.26), (160, 21, 57.83), (224, 41, 61.33)]),
    ("mobilenetv3_small_035", "1b", [(224, 13, 49.8)]),
    ("mobilenetv3_small_bft_050", "1b", [(224, 15, 55.21)]),
]:
    for _res, _mflops, _top1 in _rows:
        PAPER[(_model, _res)] = {"mflops": _mflops, "top1": _top1, "table": f"Table {_table}"}

MODELS = list(dict.fromkeys(m for m, _ in PAPER))
LABELS = {
    "mobilenetv1_025": "MobileNetV1 0.25", "mobilenetv1_050": "MobileNetV1 0.5",
    "mobilenetv1_bft_100": "MobileNetV1+BFT 1.0", "mobilenetv1_bft_200": "MobileNetV1+BFT 2.0",
    "shufflenetv2_050": "ShuffleNetV2 0.5", "shufflenetv2_bft_125": "ShuffleNetV2+BFT 1.25",
    "mobilenetv3_small_035": "MobileNetV3-Small 0.35",
    "mobilenetv3_small_bft_050": "MobileNetV3-Small+BFT 0.5",
}
FAMILIES = {"mobilenetv1": "MobileNetV1", "shufflenetv2": "ShuffleNetV2",
            "mobilenetv3": "MobileNetV3-Small"}
# Each BFT model and the baseline the paper matches it with.
BASELINE_OF = {"mobilenetv1_bft_100": "mobilenetv1_025", "mobilenetv1_bft_200": "mobilenetv1_050",
               "shufflenetv2_bft_125": "shufflenetv2_050",
               "mobilenetv3_small_bft_050": "mobilenetv3_small_035"}
# The rows of Table 1: (BFT model, res, baseline, res, headline). The headline pairs are the
# ones at the largest matched budget of each family.
PAIRS = [
    ("mobilenetv1_bft_100", 96, "mobilenetv1_025", 128, False),
    ("mobilenetv1_bft_100", 128, "mobilenetv1_025", 160, False),
    ("mobilenetv1_bft_100", 160, "mobilenetv1_025", 192, False),
    ("mobilenetv1_bft_100", 160, "mobilenetv1_025", 224, True),
    ("mobilenetv1_bft_100", 192, "mobilenetv1_050", 128, False),
    ("mobilenetv1_bft_200", 128, "mobilenetv1_050", 128, False),
    ("mobilenetv1_bft_200", 192, "mobilenetv1_050", 192, False),
    ("mobilenetv1_bft_200", 224, "mobilenetv1_050", 224, True),
    ("shufflenetv2_bft_125", 128, "shufflenetv2_050", 128, False),
    ("shufflenetv2_bft_125", 160, "shufflenetv2_050", 160, False),
    ("shufflenetv2_bft_125", 224, "shufflenetv2_050", 224, True),
    ("mobilenetv3_small_bft_050", 224, "mobilenetv3_small_035", 224, True),
]
# "What bounds it": the MAC-matched MobileNetV1 pair at 150 MFLOPs.
BOUNDS_PAIR = (("mobilenetv1_bft_200", 224), ("mobilenetv1_050", 224))

PATHS = ("eager", "eager_cl", "compile", "ort", "ort_structured", "fused", "fused_cl")
BFT_ONLY = {"ort_structured"}
THREADS, BATCHES = [2, 1], [1, 32]
# rounds, seconds of timed calls per round (blocked_autorange's min_run_time), untimed seconds
# before them
TIMING = {"full": (5, 0.25, 0.05), "quick": (2, 0.05, 0.01)}


# --------------------------------------------------------------------------- the machine

def machine() -> Dict:
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return describe_machine(timm=timm.__version__, onnxruntime=ort_version,
                            butterfly=butterfly.__version__)


# --------------------------------------------------------------------------- models

def cell_key(model: str, res: int, path: str, threads: int, batch: int) -> str:
    return f"{model}@{res}|{path}|t{threads}|b{batch}"


def config_key(model: str, res: int) -> str:
    return f"{model}@{res}"


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=1000).eval()


def has_bft(model: nn.Module) -> bool:
    return any(butterfly.is_bft(m) for m in model.modules())


def applicable(path: str, bft: bool) -> bool:
    return bft or path not in BFT_ONLY


def layer_profile(model: nn.Module, res: int, in_chans: int = 3) -> Dict:
    """Per image (batch 1, float32, the model run in eval mode): the activation bytes every leaf
    module (a BFT counted as one layer) reads and writes (its input and output tensors), the same
    for the conv, BFT and linear layers alone (what remains when BatchNorms and activations are
    fused into them), and the multiply-adds by layer kind (dense: 1x1 / full convs and linear
    layers; depthwise; bft)."""
    act = [0, 0]
    macs = {"dense": 0, "depthwise": 0, "bft": 0}

    def size(t) -> int:
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, (list, tuple)):
            return sum(size(v) for v in t)
        return 0

    def hook(module, inputs, output):
        act[0] += size(inputs) + size(output)
        if butterfly.is_bft(module) or isinstance(module, (nn.Conv2d, nn.Linear)):
            act[1] += size(inputs) + size(output)
        if butterfly.is_bft(module):
            pixels = output[0, 0].numel() if output.dim() == 4 else 1
            macs["bft"] += module.macs_per_pixel * pixels
        elif isinstance(module, nn.Conv2d):
            per = output[0].numel() * module.in_channels // module.groups * math.prod(
                module.kernel_size)
            depthwise = module.groups > 1 and module.groups == module.in_channels
            macs["depthwise" if depthwise else "dense"] += per
        elif isinstance(module, nn.Linear):
            macs["dense"] += output[0].numel() * module.in_features

    leaves, skip = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if butterfly.is_bft(module):
            skip.add(name)
            leaves.append(module)
        elif not list(module.children()):
            leaves.append(module)
    handles = [m.register_forward_hook(hook) for m in leaves]
    training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.randn(1, in_chans, res, res))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"act_bytes": act[0], "act_bytes_layers": act[1], "weight_bytes": weights,
            "macs_by_kind": macs}


def model_meta(name: str, res: int, model: nn.Module) -> Dict:
    meta = {"model": name, "res": res, "label": LABELS.get(name, name), "bft": has_bft(model),
            "macs": count_macs(model, (3, res, res)),
            "params": sum(p.numel() for p in model.parameters()),
            "paper": PAPER.get((name, res))}
    meta.update(layer_profile(model, res))
    return meta


# --------------------------------------------------------------------------- paths

class Context:
    """What the paths of one (model, threads, batch) group share."""

    def __init__(self, model: nn.Module, x: torch.Tensor, threads: int, tmp: str, name: str,
                 onnx_files: Optional[Dict] = None):
        self.model, self.x, self.threads, self.tmp, self.name = model, x, threads, tmp, name
        self.x_cl = x.contiguous(memory_format=torch.channels_last)
        self._onnx: Dict[Tuple[bool, int], Tuple[str, float]] = \
            {} if onnx_files is None else onnx_files

    def onnx(self, structured: bool) -> Tuple[str, float]:
        """The ONNX file of the model at this batch size (exported once per model and batch, and
        shared by the thread counts through ``onnx_files``); returns (path, export seconds)."""
        key = (structured, self.x.shape[0])
        if key not in self._onnx:
            path = os.path.join(self.tmp, f"{self.name}_{'s' if structured else 'd'}_"
                                          f"b{self.x.shape[0]}.onnx")
            t0 = time.perf_counter()
            log = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                warnings.simplefilter("ignore")
                butterfly.export_onnx(self.model, self.x, path, structured=structured)
            self._onnx[key] = (path, time.perf_counter() - t0)
        return self._onnx[key]


Runner = Callable[[], torch.Tensor]


def torch_runner(module: nn.Module, x: torch.Tensor) -> Runner:
    def run():
        with torch.inference_mode():
            return module(x)
    return run


def prep_eager(ctx: Context) -> Tuple[Runner, Dict]:
    return torch_runner(ctx.model, ctx.x), {}


def prep_eager_cl(ctx: Context) -> Tuple[Runner, Dict]:
    model = copy.deepcopy(ctx.model).to(memory_format=torch.channels_last)
    return torch_runner(model, ctx.x_cl), {}


def prep_compile(ctx: Context, max_warmup: int = 20) -> Tuple[Runner, Dict]:
    """torch.compile (inductor, freezing) of a channels_last copy, compiled for this thread count
    and input shape; called until two consecutive calls are within 20% of each other."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    model = copy.deepcopy(ctx.model).to(memory_format=torch.channels_last)
    with inductor_config.patch(freezing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend="inductor", dynamic=False)
        run = torch_runner(compiled, ctx.x_cl)
        t0 = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t0
        times: List[float] = []
        while len(times) < max_warmup:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
            if len(times) >= 2 and abs(times[-1] - times[-2]) <= 0.2 * min(times[-2:]):
                break
    return run, {"compile_s": round(compile_s, 2), "warmup_calls": len(times) + 1}


def prep_ort(ctx: Context, structured: bool = False) -> Tuple[Runner, Dict]:
    import onnxruntime as ort
    path, export_s = ctx.onnx(structured)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads spin-wait after each run by default; the paths take turns in one
    # process, so spinning threads would steal the cores from the next path's (measured: eager
    # PyTorch 100x slower right after an onnxruntime run).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: ctx.x.numpy()}

    def run():
        return torch.from_numpy(session.run(None, feed)[0])
    return run, {"export_s": round(export_s, 2), "onnx_mb": round(os.path.getsize(path) / 1e6, 2)}


def report_summary(report) -> List[str]:
    """The summary lines of ``str(report)``: those before its table header (a line starting with
    "layer"), at most five; the first line when there is no such header."""
    lines = [line.rstrip() for line in str(report).splitlines()]
    head = next((i for i, line in enumerate(lines) if line.lstrip().lower().startswith("layer")),
                None)
    summary = [line for line in lines[:head] if line.strip()] if head else lines[:1]
    return summary[:5]


def prep_fused(ctx: Context, channels_last: bool = False) -> Tuple[Runner, Dict]:
    model, x = copy.deepcopy(ctx.model), ctx.x
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), ctx.x_cl
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = butterfly.optimize_for_inference(model, x)
    info = {"optimize_s": round(time.perf_counter() - t0, 2), "report_summary": report_summary(report),
            "report": str(report)}
    return torch_runner(model, x), info


PREPARE: Dict[str, Callable[[Context], Tuple[Runner, Dict]]] = {
    "eager": prep_eager,
    "eager_cl": prep_eager_cl,
    "compile": prep_compile,
    "ort": lambda ctx: prep_ort(ctx, structured=False),
    "ort_structured": lambda ctx: prep_ort(ctx, structured=True),
    "fused": lambda ctx: prep_fused(ctx, channels_last=False),
    "fused_cl": lambda ctx: prep_fused(ctx, channels_last=True),
}


# --------------------------------------------------------------------------- timing

def time_interleaved(runners: Dict[str, Runner], threads: int, rounds: int, min_run_time: float,
                     settle_s: float) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds per call of every runner: ``rounds`` rounds in a rotating order; in each, a runner
    is called untimed for ``settle_s`` (at least once: caches, the other runtime's spinning
    threads) and then timed with ``Timer.blocked_autorange(min_run_time)``, which times blocks of
    ``number_per_run`` calls (1 for calls long against the timer's overhead, else 10 or more).
    Returns, per runner, the seconds per call of every block of all rounds and the number of
    timed calls, and, for runners that raised, the reason (they are dropped)."""
    times: Dict[str, List[float]] = {name: [] for name in runners}
    calls = dict.fromkeys(runners, 0)
    failed: Dict[str, str] = {}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name in failed:
                continue
            run = runners[name]
            try:
                until = time.perf_counter() + settle_s
                run()
                while time.perf_counter() < until:
                    run()
                timer = Timer(stmt="run()", globals={"run": run}, num_threads=threads)
                m = timer.blocked_autorange(min_run_time=min_run_time)
                times[name].extend(m.times)
                calls[name] += m.number_per_run * len(m.times)
            except Exception as err:  # a failing path is recorded, not raised
                failed[name] = one_line(err)
    return times, calls, failed


def quartiles(values: List[float]) -> Tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().float().reshape(want.shape)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


# --------------------------------------------------------------------------- machine rates

def machine_rates(threads: int, quick: bool) -> Dict:
    """Measured with ``threads`` threads: copy bandwidth (bytes read + written per second, a tensor
    far larger than the caches) and the multiply-add rates of a dense 1x1 conv, a depthwise 3x3
    conv and a BFT, at MobileNetV1-like shapes (batch 32; 8 with ``quick``)."""
    batch = 8 if quick else 32
    n = (32 if quick else 128) * 2 ** 20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    steps = {"copy": lambda: dst.copy_(src)}
    x512 = torch.randn(batch, 512, 14, 14).contiguous(memory_format=torch.channels_last)
    x1024 = torch.randn(batch, 1024, 14, 14).contiguous(memory_format=torch.channels_last)
    pw = nn.Conv2d(512, 512, 1, bias=False).to(memory_format=torch.channels_last).eval()
    dw = nn.Conv2d(512, 512, 3, padding=1, groups=512, bias=False).to(
        memory_format=torch.channels_last).eval()
    bft = butterfly.BFT(1024, 1024).eval()
    steps["dense"] = torch_runner(pw, x512)
    steps["depthwise"] = torch_runner(dw, x512)
    steps["bft"] = torch_runner(bft, x1024)
    with torch_threads(threads):
        times, _, failed = time_interleaved(steps, threads, 2 if quick else 3,
                                         0.05 if quick else 0.2, 0.01 if quick else 0.05)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    pixels = batch * 14 * 14
    out = {"threads": threads, "date": now(), "quick": quick, "failed": failed,
           "copy_GBs": 2 * n * 4 / med["copy"] / 1e9 if "copy" in med else None}
    for kind, macs in (("dense", 512 * 512 * pixels), ("depthwise", 512 * 9 * pixels),
                       ("bft", bft.macs_per_pixel * pixels)):
        out[f"{kind}_GMACs"] = macs / med[kind] / 1e9 if kind in med else None
    out["shapes"] = (f"copy {n * 4 / 2 ** 20:.0f} MiB; dense 1x1 conv 512->512, depthwise 3x3 "
                     f"512 ch, at {batch}x512x14x14; BFT 1024->1024 at {batch}x1024x14x14; "
                     "channels_last")
    return out


# --------------------------------------------------------------------------- the run

def load_results(path: Path) -> Dict:
    if path.exists():
        data = json.loads(path.read_text())
        for key in ("runs", "configs", "cells", "rates"):
            data.setdefault(key, [] if key == "runs" else {})
        return data
    return {"version": 1, "runs": [], "configs": {}, "cells": {}, "rates": {}}


def save_results(data: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def configs_of(args) -> List[Tuple[str, int]]:
    if args.configs:
        return list(args.configs)
    configs = []
    for name in args.models:
        resolutions = args.res or [r for (m, r) in PAPER if m == name] or [224]
        configs += [(name, r) for r in resolutions]
    return configs


def plan_cells(args, data: Dict) -> List[Tuple[str, int, str, int, int]]:
    """The cells this run measures: (model, res, path, threads, batch): those not in the JSON, the
    failed ones too with --retry-failed, every one with --force."""
    todo = []
    for name, res in configs_of(args):
        bft = data["configs"].get(config_key(name, res), {}).get("bft")
        if bft is None:
            bft = "_bft_" in name
        for threads in args.threads:
            for batch in args.batch:
                for path in args.paths:
                    if not applicable(path, bft):
                        continue
                    cell = data["cells"].get(cell_key(name, res, path, threads, batch))
                    if args.force or cell is None or (args.retry_failed
                                                      and cell["status"] != "ok"):
                        todo.append((name, res, path, threads, batch))
    return todo


def measurement_units(configs: List[Tuple[str, int]]) -> List[List[Tuple[str, int]]]:
    """The configurations grouped into what is timed together: every row of Table 1 (a BFT model
    and its MAC-matched baseline, :data:`PAIRS`, headline rows first) whose two configurations
    are both requested, then each BFT model with its baseline at the same resolution, then each
    remaining configuration alone. The two models of a row are
    timed in the same interleaved rounds, so that their ratio is taken under the same machine
    conditions (on this shared machine a model's time drifted by up to 2x between runs a few
    minutes apart)."""
    left, units = list(configs), []
    rows = [(b, br, r, rr) for b, br, r, rr, _ in sorted(PAIRS, key=lambda p: not p[4])]
    rows += [(b, res, BASELINE_OF[b], res) for b, res in configs if b in BASELINE_OF]
    for bft, bres, base, rres in rows:
        pair = [(bft, bres), (base, rres)]
        if all(c in left for c in pair):
            units.append(pair)
            for c in pair:
                left.remove(c)
    return units + [[c] for c in left]


def _build_config(name: str, res: int, todo: List, args, data: Dict, run_id: int,
                  out: Path) -> Optional[nn.Module]:
    """The model of one configuration, its metadata in ``data``; None (every cell of ``todo``
    recorded as failed) when the model itself fails."""
    key = config_key(name, res)
    try:
        model = build(name)
        if args.force or "error" in data["configs"].get(key, {"error": None}):
            data["configs"][key] = model_meta(name, res, model)
        return model
    except Exception as err:  # the model itself fails: every cell of it is recorded as failed
        reason = f"model: {one_line(err)}"
        print(f"== {key}: FAILED {reason}", flush=True)
        meta = data["configs"].get(key) or {
            "model": name, "res": res, "label": LABELS.get(name, name), "bft": "_bft_" in name,
            "macs": 0, "params": 0, "paper": PAPER.get((name, res)), "act_bytes": 0,
            "weight_bytes": 0}
        data["configs"][key] = {**meta, "error": reason}
        for _, _, path, threads, batch in todo:
            data["cells"][cell_key(name, res, path, threads, batch)] = {
                "model": name, "res": res, "path": path, "threads": threads, "batch": batch,
                "date": now(), "run": run_id, "status": "failed", "reason": reason}
        save_results(data, out / JSON_NAME)
        return None


def run_unit(unit: List[Tuple[str, int]], todo: List, args, data: Dict, run_id: int,
             out: Path) -> int:
    """Measure the cells of ``todo`` for the configurations of one measurement unit (one, or a
    Table-1 pair timed side by side); returns how many cells were measured."""
    timing = TIMING["quick" if args.quick else "full"]
    measured, members = 0, []
    for name, res in unit:
        cells = [c for c in todo if c[0] == name and c[1] == res]
        model = _build_config(name, res, cells, args, data, run_id, out)
        if model is None:
            measured += len(cells)
            continue
        meta = data["configs"][config_key(name, res)]
        cells = [c for c in cells if applicable(c[2], meta["bft"])]
        loads = {"before": loadavg(), "date": now(), "run": run_id}
        print(f"== {config_key(name, res)}: {meta['macs'] / 1e6:.1f} M MACs, {len(cells)} cells, "
              f"load {loads['before']}" + (" (timed side by side with "
                                             f"{', '.join(config_key(*c) for c in unit if c != (name, res))})"
                                             if len(unit) > 1 else ""), flush=True)
        members.append((name, res, model, cells, loads))
    onnx_files: Dict = {}   # exports shared by the thread counts
    with tempfile.TemporaryDirectory(prefix="bft_models_") as tmp:
        for threads in args.threads:
            for batch in args.batch:
                groups = [(name, res, model, [c[2] for c in cells
                                              if c[3] == threads and c[4] == batch])
                          for name, res, model, cells, _ in members]
                groups = [g for g in groups if g[3]]
                if groups:
                    measured += run_group(groups, threads, batch, timing, tmp, data, run_id,
                                          onnx_files)
                    save_results(data, out / JSON_NAME)
    for name, res, _, _, loads in members:
        loads["after"] = loadavg()
        data["configs"][config_key(name, res)].setdefault("loads", []).append(loads)
    save_results(data, out / JSON_NAME)
    return measured


def _prepare(name: str, model: nn.Module, x: torch.Tensor, paths: List[str], threads: int,
             tmp: str, onnx_files: Dict) -> Tuple[Dict, Dict, Dict, Dict, Dict]:
    """Runners of one model's paths: (runners, infos, failed, max diffs, preparation seconds)."""
    runners, infos, failed, diffs, prep_s = {}, {}, {}, {}, {}
    try:
        with torch.inference_mode():
            want = model(x).float()
    except Exception as err:  # the eager reference fails: so does every path
        return {}, {}, {path: f"eager forward: {one_line(err)}" for path in paths}, {}, {}
    ctx = Context(model, x, threads, tmp, name, onnx_files)
    for path in paths:
        t0 = time.perf_counter()
        try:
            run, info = PREPARE[path](ctx)
            diffs[path] = max_rel_diff(run(), want)
            runners[path], infos[path] = run, info
        except Exception as err:  # a failing path is recorded, not raised
            failed[path] = one_line(err)
        prep_s[path] = round(time.perf_counter() - t0, 2)
    return runners, infos, failed, diffs, prep_s


def run_group(groups: List[Tuple[str, int, nn.Module, List[str]]], threads: int, batch: int,
              timing: Tuple[int, float, float], tmp: str, data: Dict, run_id: int,
              onnx_files: Optional[Dict] = None) -> int:
    """Times the paths of one or more models (``(name, res, model, paths)``) at one thread count
    and batch size, all interleaved in the same rounds, and records a cell per path."""
    rounds, min_run_time, settle_s = timing
    start, load_before = time.perf_counter(), loadavg()
    onnx_files = {} if onnx_files is None else onnx_files
    prepared, runners = {}, {}
    with torch_threads(threads):
        for name, res, model, paths in groups:
            torch.manual_seed(1)
            x = torch.randn(batch, 3, res, res)
            files = onnx_files.setdefault(config_key(name, res), {})
            prepared[(name, res)] = _prepare(name, model, x, paths, threads, tmp, files)
            for path, run in prepared[(name, res)][0].items():
                runners[cell_key(name, res, path, threads, batch)] = run
        times, calls, timing_failed = time_interleaved(runners, threads, rounds, min_run_time,
                                                       settle_s)
    load_after, date = loadavg(), now()
    group_s = round(time.perf_counter() - start, 1)
    side_by_side = [config_key(name, res) for name, res, _, _ in groups]
    measured = 0
    for name, res, _, paths in groups:
        _, infos, failed, diffs, prep_s = prepared[(name, res)]
        for path in paths:
            key = cell_key(name, res, path, threads, batch)
            cell = {"model": name, "res": res, "path": path, "threads": threads, "batch": batch,
                    "date": date, "run": run_id, "load_before": load_before,
                    "load_after": load_after, "prepare_s": prep_s.get(path), "group_s": group_s,
                    "quick": timing is TIMING["quick"], "cpus": usable_cores(),
                    "timed_with": side_by_side}
            reason = failed.get(path) or timing_failed.get(key)
            if reason:
                cell.update(status="failed", reason=reason)
                print(f"   {name}@{res} {path:<15} t{threads} b{batch}: FAILED {reason}", flush=True)
            else:
                t = times[key]
                q1, q3 = quartiles(t)
                median = statistics.median(t)
                cell.update(status="ok", ms=median * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
                            min_ms=min(t) * 1e3, samples=len(t), calls=calls[key],
                            img_s=batch / median, max_rel_diff=diffs[path], **infos[path])
                print(f"   {name}@{res} {path:<15} t{threads} b{batch}: {median * 1e3:9.2f} ms "
                      f"({batch / median:8.1f} img/s, IQR {q1 * 1e3:.2f}-{q3 * 1e3:.2f}, "
                      f"{calls[key]} calls, diff {diffs[path]:.1e})", flush=True)
            data["cells"][key] = cell
            measured += 1
    return measured


# --------------------------------------------------------------------------- the report

def fmt_ms(cell: Optional[Dict]) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return "failed"
    return f"{cell['ms']:.2f} ({cell['q1_ms']:.2f}-{cell['q3_ms']:.2f}){marks(cell)}"


def fmt_img_s(cell: Optional[Dict]) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return "failed"
    # the quartiles of the call time, as throughputs
    return f"{cell['img_s']:.0f} ({cell['batch'] / cell['q3_ms'] * 1e3:.0f}-" \
           f"{cell['batch'] / cell['q1_ms'] * 1e3:.0f}){marks(cell)}"


def marks(cell: Dict) -> str:
    """The cell's marks: q = measured with --quick; L = the 1-minute load average before or after
    the cell's group exceeded the usable CPUs (other work was running: not trustworthy)."""
    text = ("q" if cell.get("quick") else "") + ("L" if loaded(cell) else "")
    return f" {text}" if text else ""


def loaded(cell: Dict) -> bool:
    loads = [ld[0] for ld in (cell.get("load_before"), cell.get("load_after")) if ld]
    return bool(loads) and max(loads) > cell.get("cpus", usable_cores())


def cells_of(data: Dict, key: str) -> List[Dict]:
    name, res = key.rsplit("@", 1)
    return [c for c in data["cells"].values() if c["model"] == name and c["res"] == int(res)]


def best(data: Dict, key: str, threads: int, batch: int) -> Optional[Dict]:
    """The fastest ok cell of a configuration at (threads, batch)."""
    cells = [c for c in cells_of(data, key) if c["threads"] == threads and c["batch"] == batch
             and c["status"] == "ok"]
    return min(cells, key=lambda c: c["ms"] / c["batch"]) if cells else None


def paper_text(meta: Dict) -> str:
    p = meta.get("paper")
    if not p:
        return "not in the paper's tables"
    return f"paper: {p['mflops']} MFLOPs, ImageNet top-1 {p['top1']:.2f}% (BFT paper, {p['table']})"


def top1(meta: Optional[Dict]) -> str:
    return f"{meta['paper']['top1']:.2f}" if meta and meta.get("paper") else "-"


def thread_counts(data: Dict) -> List[int]:
    return sorted({c["threads"] for c in data["cells"].values()}, reverse=True)


def batches(data: Dict) -> List[int]:
    return sorted({c["batch"] for c in data["cells"].values()})


def sorted_configs(data: Dict) -> List[str]:
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(data["configs"], key=lambda k: (order.get(k.rsplit("@", 1)[0], len(order)),
                                                  k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])))


def ratio_rows(data: Dict, pairs) -> List[str]:
    rows = []
    for bft, bres, base, rres, headline in pairs:
        kb, kr = config_key(bft, bres), config_key(base, rres)
        mb, mr = data["configs"].get(kb), data["configs"].get(kr)
        if mb is None or mr is None:
            continue
        for threads in thread_counts(data):
            cols = []
            for batch in batches(data):
                cb, cr = best(data, kb, threads, batch), best(data, kr, threads, batch)
                if cb is None or cr is None:
                    cols.append("-")
                    continue
                ratio = (cb["ms"] / cb["batch"]) / (cr["ms"] / cr["batch"])
                mark = (" L" if loaded(cb) or loaded(cr) else "") + \
                    ("" if kr in cb.get("timed_with", ()) else " apart")
                cols.append(f"**{ratio:.2f}** ({cb['ms'] / cb['batch']:.2f} {cb['path']} / "
                            f"{cr['ms'] / cr['batch']:.2f} {cr['path']}){mark}")
            if all(c == "-" for c in cols):
                continue
            star = " *" if headline else ""
            rows.append(f"| {LABELS.get(bft, bft)} @{bres}{star} | {mb['macs'] / 1e6:.1f} | "
                        f"{top1(mb)} | {LABELS.get(base, base)} @{rres} | {mr['macs'] / 1e6:.1f} | "
                        f"{top1(mr)} | {threads} | " + " | ".join(cols) + " |")
    return rows


def ratio_table(data: Dict, pairs, title: str, intro: str) -> List[str]:
    rows = ratio_rows(data, pairs)
    if not rows:
        return []
    head = ("| BFT model | MMACs | top-1 | baseline | MMACs | top-1 | threads | "
            + " | ".join(f"batch {b}: BFT / baseline, ms per image (best paths)"
                         for b in batches(data)) + " |")
    return ([f"## {title}", "", intro, "", head,
             "|---|---:|---:|---|---:|---:|---:|" + "---|" * len(batches(data))] + rows + [""])


def same_res_pairs(data: Dict) -> List[Tuple]:
    pairs = []
    for bft, base in BASELINE_OF.items():
        for res in sorted({int(k.rsplit("@", 1)[1]) for k in data["configs"]}):
            if config_key(bft, res) in data["configs"] and config_key(base, res) in data["configs"]:
                pairs.append((bft, res, base, res, False))
    return pairs


def headline_pairs() -> List[Tuple[Tuple[str, int], Tuple[str, int]]]:
    """The README's pairs ((BFT model, res), (baseline, res)), the "what bounds it" pair first."""
    pairs = [((b, br), (r, rr)) for b, br, r, rr, headline in PAIRS if headline]
    return sorted(pairs, key=lambda p: p != BOUNDS_PAIR)


def bounds_section(data: Dict) -> List[str]:
    bft, base = BOUNDS_PAIR
    lines = ["## What bounds it: the headline pairs", ""]
    rates = data.get("rates", {})
    if not rates:
        return lines + [f"Not measured yet: the machine rates are measured with `{bft[0]}` at "
                        f"{bft[1]} or `{base[0]}` at {base[1]}.", ""]
    lines += ["Machine rates, measured by this benchmark (medians):", "",
              "| threads | copy GB/s (read + write) | dense 1x1 conv GMAC/s | depthwise 3x3 GMAC/s "
              "| BFT GMAC/s | shapes |", "|---:|---:|---:|---:|---:|---|"]

    def g(v, spec=".1f"):
        return "-" if v is None else f"{v:{spec}}"

    thread_keys = sorted(rates, key=lambda k: -int(k[1:]))
    for t in thread_keys:
        r = rates[t]
        lines.append(f"| {r['threads']} | {g(r['copy_GBs'])} | {g(r['dense_GMACs'])} | "
                     f"{g(r['depthwise_GMACs'])} | {g(r['bft_GMACs'])} | {r['shapes']} |")
    lines.append("")
    pairs = [p for p in headline_pairs()
             if all("macs_by_kind" in data["configs"].get(config_key(*k), {}) for k in p)]
    if not pairs:
        return lines + [f"Run `{bft[0]}` at {bft[1]} and `{base[0]}` at {base[1]} (or another "
                        "headline pair) for the model rows.", ""]
    lines += [
        "Per image, float32. *activations*: the input and output tensors of every leaf module "
        "(a BFT counted as one layer), summed: what eager PyTorch reads and writes at least once "
        "if nothing stays in cache; *layers only*: the same for the conv, BFT and linear layers "
        "alone, what is left when BatchNorms and activations are fused into them (the least any "
        "path moves). *memory time* = (bytes + weights) / copy bandwidth, for both counts. "
        "*compute time* = sum over layer kinds of MACs / that kind's measured rate; *without "
        "BFT*: the same with the BFT layers free (what the rest of a BFT model costs however fast "
        "its BFT kernel gets). *measured*: the best path's time per image. The larger of the two "
        "lower bounds (memory time with layers only, compute time) is the nearer wall; a measured "
        "time far above both is overhead (framework, small ops, cache misses) rather than either "
        "limit. The rates are those of one shape per kind, so the bounds are estimates, not "
        "guarantees: a layer kind runs slower at other shapes (small maps, few channels).", "",
        "| model | MACs (M): dense / depthwise / BFT | activations MB: all / layers only "
        "| weights MB | threads | memory time ms: all / layers only | compute time ms "
        "(without BFT) | measured ms, batch 1 (path) | measured ms/image, batch 32 (path) "
        "| nearer bound |",
        "|---|---|---|---:|---:|---|---:|---|---|---|"]
    summary = {}
    for (name, res) in dict.fromkeys(k for p in pairs for k in p):
        meta = data["configs"][config_key(name, res)]
        m = meta["macs_by_kind"]
        layers_bytes = meta.get("act_bytes_layers", meta["act_bytes"])
        for t in thread_keys:
            r = rates[t]
            threads = r["threads"]
            mem_ms = mem_layers_ms = compute_ms = rest_ms = None
            if r.get("copy_GBs"):
                bw = r["copy_GBs"] * 1e9
                mem_ms = (meta["act_bytes"] + meta["weight_bytes"]) / bw * 1e3
                mem_layers_ms = (layers_bytes + meta["weight_bytes"]) / bw * 1e3
            if all(r.get(f"{k}_GMACs") for k in ("dense", "depthwise", "bft")):
                per_kind = {k: m[k] / (r[f"{k}_GMACs"] * 1e9) * 1e3 for k in m}
                compute_ms = sum(per_kind.values())
                rest_ms = compute_ms - per_kind["bft"]
            cols, measured = [], {}
            for batch in (1, 32):
                c = best(data, config_key(name, res), threads, batch)
                if c is not None:
                    measured[batch] = c["ms"] / batch
                cols.append("-" if c is None else f"{c['ms'] / batch:.2f} ({c['path']})")
            nearer = "-"
            if mem_layers_ms is not None and compute_ms is not None:
                bound = max(mem_layers_ms, compute_ms)
                nearer = "memory" if mem_layers_ms > compute_ms else "compute"
                nearer += f" ({bound / min(mem_layers_ms, compute_ms):.1f}x the other)"
                summary[(name, res, threads)] = (bound, nearer.split()[0], measured, rest_ms)
            rest = f" ({rest_ms:.2f})" if rest_ms is not None and m["bft"] else ""
            lines.append(
                f"| {name} @{res} | {m['dense'] / 1e6:.1f} / {m['depthwise'] / 1e6:.1f} / "
                f"{m['bft'] / 1e6:.1f} | {meta['act_bytes'] / 1e6:.1f} / {layers_bytes / 1e6:.1f} | "
                f"{meta['weight_bytes'] / 1e6:.1f} | {threads} | {g(mem_ms, '.2f')} / "
                f"{g(mem_layers_ms, '.2f')} | {g(compute_ms, '.2f')}{rest} | {cols[0]} | "
                f"{cols[1]} | {nearer} |")
    lines.append("")
    for (bname, bres), (rname, rres) in pairs:
        mb = data["configs"][config_key(bname, bres)]
        mr = data["configs"][config_key(rname, rres)]
        lines.append(
            f"**{bname} @{bres} vs {rname} @{rres}**: {mb['act_bytes'] / mr['act_bytes']:.1f}x the "
            f"activation bytes ({mb.get('act_bytes_layers', 0) / max(mr.get('act_bytes_layers', 1), 1):.1f}x "
            f"counting the layers only) and "
            f"{mb['macs_by_kind']['depthwise'] / max(mr['macs_by_kind']['depthwise'], 1):.1f}x the "
            f"depthwise multiply-adds, for {mb['macs'] / mr['macs']:.2f}x the multiply-adds: the BFT "
            "model is wider at equal MACs (the paper's section 5 notes its larger working memory).")
        for t in thread_keys:
            threads = rates[t]["threads"]
            if (bname, bres, threads) not in summary or (rname, rres, threads) not in summary:
                continue
            (b_bound, b_kind, b_meas, b_rest), (r_bound, r_kind, r_meas, _) = \
                summary[(bname, bres, threads)], summary[(rname, rres, threads)]
            text = (f"{threads} thread{'s' if threads > 1 else ''}: lower bounds {b_bound:.2f} ms "
                    f"({b_kind}) and {r_bound:.2f} ms ({r_kind}), ratio {b_bound / r_bound:.2f}; "
                    f"with its BFT layers free the BFT model still computes for {b_rest:.2f} ms "
                    f"({b_rest / r_bound:.2f}x the baseline's bound)")
            bft_macs = mb["macs_by_kind"]["bft"]
            for batch in (32, 1):
                if batch in b_meas and batch in r_meas:
                    text += (f"; measured at batch {batch}: {b_meas[batch]:.2f} vs "
                             f"{r_meas[batch]:.2f} ms per image (ratio "
                             f"{b_meas[batch] / r_meas[batch]:.2f}), "
                             f"{b_meas[batch] / b_bound:.1f}x and {r_meas[batch] / r_bound:.1f}x "
                             "their bounds, " + parity_text(bft_macs, b_rest, r_meas[batch],
                                                            rates[t].get("bft_GMACs")))
            lines.append("* " + text + ".")
        lines.append("")
    return lines


def parity_text(bft_macs: float, rest_ms: float, baseline_ms: float,
                bft_rate: Optional[float]) -> str:
    """What matching the baseline's measured time would take of the BFT layers, with the rest of
    the BFT model at its compute bound: the multiply-add rate they would need, or that no rate is
    enough (the rest alone takes the baseline's time)."""
    if baseline_ms <= rest_ms:
        return "so no BFT kernel speed reaches parity (the rest of the model alone takes longer)"
    need = bft_macs / ((baseline_ms - rest_ms) * 1e-3) / 1e9
    have = f", measured {bft_rate:.0f}" if bft_rate else ""
    return (f"so parity needs the BFT layers at {need:.0f} GMAC/s or more{have}, with the rest "
            "of the model at its bound")


def model_section(data: Dict, key: str) -> List[str]:
    meta = data["configs"][key]
    cells = {(c["path"], c["threads"], c["batch"]): c for c in cells_of(data, key)}
    threads, bs = thread_counts(data), batches(data)
    lines = [f"### {meta['label']} @{meta['res']} (`{meta['model']}`)", "",
             f"{meta['macs'] / 1e6:.2f} M MACs (count_macs), {meta['params'] / 1e6:.3f} M params, "
             f"{meta['act_bytes'] / 1e6:.1f} MB activations per image; {paper_text(meta)}.", ""]
    if meta.get("error"):
        lines += [f"The model failed: {meta['error']}", ""]
    cols = [(t, b) for t in threads for b in bs]
    head = "| path | " + " | ".join(
        f"{t} thr, batch {b}: " + ("ms (IQR)" if b == 1 else "img/s (IQR)") for t, b in cols) + " |"
    lines += [head, "|---|" + "---:|" * len(cols)]
    for path in PATHS:
        if not any((path, t, b) in cells for t, b in cols):
            continue
        row = []
        for t, b in cols:
            c = cells.get((path, t, b))
            row.append(fmt_ms(c) if b == 1 else fmt_img_s(c))
        lines.append(f"| {path} | " + " | ".join(row) + " |")
    lines.append("")
    bests = []
    for t, b in cols:
        c = best(data, key, t, b)
        if c:
            value = f"{c['ms']:.2f} ms" if b == 1 else f"{c['img_s']:.0f} img/s"
            bests.append(f"{t} thr batch {b}: **{c['path']}** ({value})")
    if bests:
        lines += ["Best: " + "; ".join(bests) + ".", ""]
    notes = []
    for (path, t, b), c in sorted(cells.items(), key=lambda kv: (PATHS.index(kv[0][0]),
                                                                 -kv[0][1], kv[0][2])):
        if c["status"] != "ok":
            notes.append(f"- {path}, {t} thr, batch {b}: failed: {c['reason']}")
            continue
        extra = []
        if c.get("max_rel_diff", 0) > 1e-3:
            extra.append(f"output differs from eager by {c['max_rel_diff']:.1e} (relative)")
        if "compile_s" in c:
            extra.append(f"first call (compile) {c['compile_s']} s")
        if "export_s" in c:
            extra.append(f"export {c['export_s']} s, {c['onnx_mb']} MB")
        if c.get("report_summary"):
            extra.append("report: " + " / ".join(c["report_summary"]))
        if extra:
            notes.append(f"- {path}, {t} thr, batch {b}: " + "; ".join(extra))
    if notes:
        lines += notes + [""]
    loads = meta.get("loads", [])
    if loads:
        lines += ["Load average (1/5/15 min) before -> after measuring this model: " + "; ".join(
            f"{ld['before']} -> {ld.get('after', '?')} (run {ld['run']})" for ld in loads) + ".",
            ""]
    return lines


def report(data: Dict) -> str:
    runs = data["runs"]
    m = runs[-1]["machine"] if runs else machine()
    lines = ["# Model-level CPU benchmark: every path, every configuration of the paper", "",
             f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['usable_cpus']} usable; "
             f"{m['flags']}); torch {m['torch']}, onnxruntime {m['onnxruntime']}, timm "
             f"{m['timm']}, butterfly {m['butterfly']}, Python {m['python']}, {m['platform']}.", "",
             "Runs (each cell names the run that measured it; the load average is the 1/5/15 "
             "minute one at start and end; it counts every runnable process on the machine, "
             "this benchmark's own threads included):", "",
             "| run | date | command | load start -> end | cells | note |",
             "|---:|---|---|---|---:|---|"]
    for run in runs:
        count = sum(c["run"] == run["id"] for c in data["cells"].values())
        lines.append(f"| {run['id']} | {run['date']} | `{run['command']}` | "
                     f"{run['load_start']} -> {run.get('load_end', '?')} | {count} | "
                     f"{'; '.join(filter(None, (run.get('note'), run.get('malloc'))))} |")
    lines += ["", "Random weights (seed 0), eval mode, float32, 1000 classes, "
              "`torch.inference_mode()`. Paths: `eager` (NCHW), `eager_cl` (channels_last model "
              "and input), `compile` (torch.compile, inductor, freezing, channels_last, compiled "
              "per thread count and batch), `ort` (onnxruntime CPU on the dense ONNX export), "
              "`ort_structured` (the structured export; BFT models only), `fused` / `fused_cl` "
              "(`butterfly.optimize_for_inference` on the input timed, NCHW / channels_last). "
              "Threads: `torch.set_num_threads`, onnxruntime `intra_op_num_threads`. Each cell: "
              "the median over interleaved rounds of `torch.utils.benchmark.Timer."
              "blocked_autorange` calls, with the quartiles; batch 1 in ms per call, batch 32 in "
              "images per second. MACs from `butterfly.flops.count_macs`; top-1 accuracies are "
              "ImageNet figures from the BFT paper (Alizadeh Vahid et al., CVPR 2020, Table 1), "
              "not measured here.", ""]
    lines += ratio_table(
        data, PAIRS, "BFT vs its MAC-matched baseline (the paper's Table 1 rows)",
        "Ratio = BFT time per image / baseline time per image, each with its fastest path at that "
        "thread count and batch: **< 1 means the BFT model is faster**. * = the headline pair of "
        "each family; L = one of the two was measured under load (see the per-model tables); "
        "apart = the two were not timed side by side (the benchmark times both models of a row "
        "in the same interleaved rounds when both are requested; times of one model drift by up "
        "to 2x between runs minutes apart on this shared machine, so only side-by-side ratios "
        "are comparable).")
    lines += ratio_table(
        data, same_res_pairs(data), "BFT vs baseline at the same resolution",
        "The same ratio for every resolution at which both models of a family pair were measured "
        "(not MAC-matched: the BFT model of a pair is matched at another resolution in Table 1).")
    front = dominated(data)
    if front:
        lines += ["## Accuracy at a given latency: is a BFT configuration beaten on both?", "",
                  "For each BFT configuration: the baselines of its family that run faster (batch "
                  "1, 2 threads, best path of each, as in `accuracy_vs_latency.png`) and are more "
                  "accurate by the paper's ImageNet top-1. Latencies of configurations timed in "
                  "different groups carry the drift described above.", ""] + front + [""]
    lines += bounds_section(data)
    lines += ["## Per model", "",
              "Batch 1: median ms per call (quartiles); batch 32: images per second (from the "
              "median call, quartiles); q: measured with `--quick` (fewer, shorter rounds); L: "
              "the 1-minute load average exceeded the number of usable CPUs before or after the "
              "cell (other work was running; do not trust the number). `failed`: see the notes "
              "below the table.", ""]
    for key in sorted_configs(data):
        lines += model_section(data, key)
    return "\n".join(lines).rstrip() + "\n"


def pareto(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (latency, accuracy) points that no other point beats on both, by latency: the
    frontier a model has to be above and to the left of."""
    front: List[Tuple[float, float]] = []
    for ms, top in sorted(points):
        if not front or top > front[-1][1]:
            front.append((ms, top))
    return front


def dominated(data: Dict, threads: int = 2, batch: int = 1) -> List[str]:
    """One line per BFT configuration (of the paper's tables, measured at ``threads`` and
    ``batch``): the baseline configurations of its family that are both faster (best path) and,
    by the paper's ImageNet top-1, more accurate."""
    lines = []
    configs = [(k, data["configs"][k]) for k in sorted_configs(data)
               if data["configs"][k].get("paper") and best(data, k, threads, batch)]
    for key, meta in configs:
        if not meta["bft"]:
            continue
        family = next((p for p in FAMILIES if meta["model"].startswith(p)), None)
        ms = best(data, key, threads, batch)["ms"]
        beaten = [(k, m) for k, m in configs if not m["bft"] and family and
                  m["model"].startswith(family) and best(data, k, threads, batch)["ms"] < ms and
                  m["paper"]["top1"] > meta["paper"]["top1"]]
        lines.append(f"- {meta['label']} @{meta['res']} ({meta['paper']['top1']:.2f}%, {ms:.2f} ms): "
                     + (", ".join(f"{m['label']} @{m['res']} ({m['paper']['top1']:.2f}%, "
                                  f"{best(data, k, threads, batch)['ms']:.2f} ms)"
                                  for k, m in beaten) + " beat it on both" if beaten
                        else "no baseline is both faster and more accurate"))
    return lines


def plot(data: Dict, path: Path) -> Optional[str]:
    """Paper top-1 vs measured batch-1 latency (best path) at 2 threads (or the largest thread
    count measured), each family's baselines with their Pareto frontier. Returns the thread count
    plotted, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter
    counts = thread_counts(data)
    if not counts:
        return None
    threads = 2 if 2 in counts else counts[0]
    points = []
    for key in sorted_configs(data):
        meta = data["configs"][key]
        c = best(data, key, threads, 1)
        if c is None or not meta.get("paper"):
            continue
        family = next((f for p, f in FAMILIES.items() if meta["model"].startswith(p)), "other")
        points.append((family, meta, c))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {}
    for family in dict.fromkeys(p[0] for p in points):
        base = sorted([p for p in points if p[0] == family and not p[1]["bft"]],
                      key=lambda p: p[2]["ms"])
        bft = [p for p in points if p[0] == family and p[1]["bft"]]
        line, = ax.plot([p[2]["ms"] for p in base], [p[1]["paper"]["top1"] for p in base], "o",
                        label=f"{family} baseline")
        colors[family] = line.get_color()
        front = pareto([(p[2]["ms"], p[1]["paper"]["top1"]) for p in base])
        ax.step([ms for ms, _ in front], [top for _, top in front], where="post",
                color=colors[family], alpha=0.6)
        ax.plot([p[2]["ms"] for p in bft], [p[1]["paper"]["top1"] for p in bft], "*",
                color=colors[family], markersize=14, label=f"{family}+BFT")
        for _, meta, c in base + bft:
            width = meta["label"].split()[-1]
            ax.annotate(f"{width}@{meta['res']} ({c['path']})", (c["ms"], meta["paper"]["top1"]),
                        textcoords="offset points", xytext=(5, -11), fontsize=7)
    if points:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        latencies = [c["ms"] for _, _, c in points]
        if max(latencies) / min(latencies) < 10:  # less than a decade: label the minor ticks
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.margins(x=0.15, y=0.08)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no configuration of the paper measured yet", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel(f"measured batch-1 latency, ms (best path, {threads} thread"
                  f"{'s' if threads > 1 else ''}, CPU)")
    ax.set_ylabel("ImageNet top-1, % (BFT paper, Table 1)")
    ax.set_title("Paper accuracy vs measured CPU latency")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(threads)


def write_outputs(data: Dict, out: Path) -> None:
    (out / MD_NAME).write_text(report(data))
    plot(data, out / PLOT_NAME)


# --------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="NAME",
                        help="zoo names (default: the eight models of the paper's Table 1)")
    parser.add_argument("--res", nargs="+", type=int, default=None,
                        help="input resolutions for every model (default: the paper's)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="MODEL@RES",
                        help="exactly these configurations, e.g. mobilenetv1_bft_100@160 "
                             "mobilenetv1_025@224 (instead of --models and --res)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--threads", nargs="+", type=int, default=THREADS)
    parser.add_argument("--batch", nargs="+", type=int, default=BATCHES)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter timing rounds")
    parser.add_argument("--force", action="store_true", help="re-measure cached cells")
    parser.add_argument("--retry-failed", action="store_true",
                        help="re-measure the cached cells that failed (the others stay cached)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's malloc settings (by default freed memory stays in the "
                             "process, as with jemalloc or tcmalloc: otherwise a model that "
                             "allocates after another one's large free faults in fresh pages)")
    parser.add_argument("--note", default="", help="free text recorded with the run (what else "
                        "was running, ...)")
    parser.add_argument("--out-dir", default=str(RESULTS),
                        help=f"where {JSON_NAME}, {MD_NAME} and {PLOT_NAME} go")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cells that would be measured and exit")
    args = parser.parse_args(argv)
    if args.configs:
        if args.res or "--models" in (argv or []):
            parser.error("--configs replaces --models and --res: give one or the other")
        parsed = []
        for item in args.configs:
            name, _, res = item.partition("@")
            if not res.isdigit() or int(res) < 8:
                parser.error(f"--configs {item}: expected MODEL@RES, e.g. mobilenetv1_bft_100@160")
            parsed.append((name, int(res)))
        args.configs = list(dict.fromkeys(parsed))
        args.models = [name for name, _ in args.configs]
    known = set(timm.list_models())
    unknown = [m for m in args.models if m not in known]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; butterfly's: "
                     f"{', '.join(butterfly.models.registered_models())}")
    if any(t < 1 for t in args.threads) or any(b < 1 for b in args.batch):
        parser.error("--threads and --batch must be positive")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.out_dir)
    data = load_results(out / JSON_NAME)
    todo = plan_cells(args, data)
    if args.dry_run:
        for cell in todo:
            print(cell_key(*cell))
        print(f"{len(todo)} cells to measure ({'--force' if args.force else 'cached cells skipped'})")
        return 0
    if max(args.threads) > usable_cores():
        print(f"warning: {max(args.threads)} threads on {usable_cores()} usable CPUs",
              file=sys.stderr)
    load = loadavg()
    if load and load[0] > usable_cores() - 0.5:
        print(f"warning: load average {load} on {usable_cores()} usable CPUs: other work is "
              "running and will distort the timings (cells measured under load are marked L)",
              file=sys.stderr)
    run_id = max((r["id"] for r in data["runs"]), default=0) + 1
    command = " ".join(["python -m benchmarks.models", *map(shlex.quote, argv)])
    malloc = "glibc's malloc defaults" if args.malloc_defaults else keep_freed_memory()
    run = {"id": run_id, "date": now(), "command": command, "note": args.note, "malloc": malloc,
           "load_start": loadavg(), "machine": machine()}
    data["runs"].append(run)
    start = time.perf_counter()
    measured = 0
    if any((name, res) in BOUNDS_PAIR for name, res, *_ in todo):  # for "what bounds it"
        for threads in args.threads:
            if args.force or f"t{threads}" not in data["rates"]:
                print(f"== machine rates, {threads} thread(s)", flush=True)
                data["rates"][f"t{threads}"] = machine_rates(threads, args.quick)
    for unit in measurement_units(configs_of(args)):
        cells = [c for c in todo if (c[0], c[1]) in unit]
        if not cells:
            continue
        measured += run_unit(unit, cells, args, data, run_id, out)
    run["load_end"], run["elapsed_s"] = loadavg(), round(time.perf_counter() - start, 1)
    if not measured:
        data["runs"].remove(run)
    save_results(data, out / JSON_NAME)
    write_outputs(data, out)
    print(f"measured {measured} cells, skipped {len(plan_cells_all(args, data)) - measured} cached, in "
          f"{time.perf_counter() - start:.0f} s; wrote {out / JSON_NAME}, {out / MD_NAME}, "
          f"{out / PLOT_NAME}")
    return 0


def plan_cells_all(args, data: Dict) -> List:
    """Every requested cell, cached or not."""
    return plan_cells(argparse.Namespace(**{**vars(args), "force": True}), data)


if __name__ == "__main__":
    sys.exit(main())
