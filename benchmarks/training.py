"""CPU training-step benchmark: each BFT model next to its MAC-matched baseline, in one run.

    python -m benchmarks.training                        # every pair, every path (an hour or more)
    python -m benchmarks.training --dry-run              # list the cells a run would measure
    python -m benchmarks.training --pairs fmnist-mobilenetv3 --paths eager eager_cl --quick
    python -m benchmarks.training --threads 2 1 --note "idle machine"
    python -m benchmarks.training --force                # re-measure cells already in the JSON

A step is what ``python -m train`` does per batch (see ``train/loop.py``): forward, cross-entropy
against random labels, backward, the optimizer step and ``zero_grad``, the model in training mode
(BatchNorm in training mode, updating its running statistics). The optimizer is timm's
``create_optimizer_v2(butterfly.param_groups(model, 1e-5), "sgd", momentum=0.9)`` (timm's "sgd":
SGD with Nesterov momentum 0.9), the learning rate the paper's recipe gives batch 32. Models are
built with seed 0 and random weights; the input is a fixed random batch. Batch 32, float32.

Pairs (:data:`PAIRS`; ``--pairs`` picks them by name, or ``fmnist`` / ``paper`` / ``all``):

* Fashion-MNIST shapes, 1 input channel, 10 classes, the zoo's small-input stem
  (``small_input=True``), at the resolutions :mod:`benchmarks.reproduce` matches their MACs with:
  ``mobilenetv1_bft_100`` @28 and @24 against ``mobilenetv1_025`` @28 (28/28 is the quickstart's
  pair), ``shufflenetv2_bft_125`` against ``shufflenetv2_050`` both @29,
  ``mobilenetv3_small_bft_050`` @28 against ``mobilenetv3_small_035`` @24;
* the paper's ImageNet pairs, 3 channels, 1000 classes: ``mobilenetv1_bft_100`` @160 against
  ``mobilenetv1_025`` @224, ``shufflenetv2_bft_125`` against ``shufflenetv2_050`` @224,
  ``mobilenetv1_bft_200`` against ``mobilenetv1_050`` @224.

MACs are counted by :func:`butterfly.flops.count_macs` (one image, forward), not typed in.

Paths (``--paths``), each its own copy of the model and its own optimizer:

* ``eager``: NCHW model and input;
* ``eager_cl``: model and input in ``channels_last``;
* ``compile``: ``torch.compile(model, dynamic=False)`` (inductor, CPU) of the NCHW model in
  training mode; the loss, backward call and optimizer step stay outside the compiled module. The
  first step's seconds are recorded as the compile time; steps follow until two consecutive ones
  are within 20% of each other. Dynamo's caches are reset at the start of every group of models.

A path that fails (compile errors, a runtime error, a non-finite loss) is recorded with a
one-line reason and the run goes on.

Timing: the cells of a group (the models of the selected pairs that share a model, on all paths)
are timed interleaved, in rounds of a rotating order, so that load from other processes hits
them alike. Every cell runs warm-up steps first (compile: until compiled and steady); in each
round it runs one untimed step and then at least ``block`` timed steps (and more until
``min_round_s`` has passed); a cell reports the median ms per step over all rounds (at least 10
steps; ``--quick``: 6, marked "quick"), its quartiles, and images/s. Threads:
``torch.set_num_threads`` for each of ``--threads`` (default 2). glibc's malloc is told to keep
freed memory (as in :mod:`benchmarks.kernel`; ``--malloc-defaults`` measures without), so that
page faults of fresh activations do not land on whichever step follows a large free.

Per pair the ratio is BFT / baseline of the best path's time per image (< 1: BFT faster).

The training-step split (``--no-split`` skips it): one step (``--profile-steps``) after the
timing, under ``torch.profiler`` (CPU activities), for eager NCHW and, when it is faster, eager
channels_last. Every event's self CPU time goes to one of: BFT, 1x1 conv (dense pointwise
``nn.Conv2d``, what BFT replaces), depthwise conv (``nn.Conv2d`` with ``groups == in_channels >
1``; a 1-channel stem is not depthwise), BatchNorm, other (the stem and other convs, the
classifier, activations, pooling, the loss, gradient accumulation, the optimizer, the framework).
How (see :func:`attribute`): during the profiled step the forward of each such module is wrapped in
``torch.profiler.record_function("bench::<category>")``, so forward ops fall under their module's
label. Backward events run in the autograd engine, outside any label; every node's
``autograd::engine::evaluate_function: <Node>`` event carries the sequence number of the forward
op that created the node (``sequence_nr``, with ``fwd_thread``). The creating op is the last
forward op that recorded that sequence number (an op records the autograd counter on entry, and
the counter moves on when a node is created), so the node and everything under it (e.g.
``aten::convolution_backward``, ``butterfly::bft_backward``) take the category of the label that
op ran under. The library's operators count by what they are wherever they run: the depthwise
ones (``butterfly::depthwise_conv``, ``butterfly_cpu::dw_*``) as depthwise conv, the fused
BatchNorm ones (``butterfly::batch_norm_act``, ``butterfly_cpu::bn_act_*``) as BatchNorm, every
other op whose name contains "butterfly" as BFT; the share of the BFT ops alone is reported too
("butterfly ops"). ``torch::autograd::AccumulateGrad`` has no
sequence number and counts as other. The shares of a step sum to 100% by construction; they are
shares of the profiled step, whose small ops the profiler slows down most.

What bounds it (:func:`step_bounds`, :func:`bounds_lines`): the run measures the machine's rates
once per thread count (:func:`benchmarks.models.machine_rates`: copy bandwidth and the dense,
depthwise and BFT multiply-add rates, cached in the JSON under ``rates``), and every model's
layer profile (:func:`benchmarks.models.layer_profile`: activation bytes with BatchNorms and
activations fused away, weight bytes, multiply-adds by layer kind). From them each section gives
a memory floor (the least traffic of a step, :data:`STEP_PASSES`, at copy bandwidth) and a
compute floor (the step's multiply-adds at each kind's rate) per model, the measured step against
the larger floor, and per pair the bytes ratio and the floor ratio next to the measured ratio:
when both models run near their floors, no fusion that applies to both can move their ratio.

Results are cached per cell in ``training_cpu.json`` (under ``--out-dir``, default
``benchmarks/results``): a rerun skips cells already there unless ``--force``; the JSON is saved
after every group. ``training_cpu.md`` is regenerated from the whole JSON at the end of each run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

import butterfly
from benchmarks.machine import (keep_freed_memory, loadavg, now, one_line, torch_threads,
                                usable_cores)
from benchmarks.machine import machine as describe_machine
from benchmarks.models import layer_profile, machine_rates
from butterfly.flops import count_macs

RESULTS = Path(__file__).parent / "results"
JSON_NAME, MD_NAME = "training_cpu.json", "training_cpu.md"
BATCH = 32
WEIGHT_DECAY = 1e-5
LR = 0.5 * BATCH / 1024  # the paper's recipe (lr 0.5 per 1024 images), as train/ scales it
MOMENTUM = 0.9

SETTINGS = {
    "fmnist": {"in_chans": 1, "num_classes": 10, "small_input": True,
               "label": "Fashion-MNIST shapes: 1 channel, 10 classes, small-input stem"},
    "paper": {"in_chans": 3, "num_classes": 1000, "small_input": False,
              "label": "the paper's ImageNet pairs: 3 channels, 1000 classes"},
}


@dataclass(frozen=True)
class Pair:
    name: str
    setting: str
    bft: Tuple[str, int]
    baseline: Tuple[str, int]
    why: str


PAIRS: Dict[str, Pair] = {p.name: p for p in [
    Pair("fmnist-mobilenetv1", "fmnist", ("mobilenetv1_bft_100", 28), ("mobilenetv1_025", 28),
         "the quickstart's pair"),
    Pair("fmnist-mobilenetv1-24", "fmnist", ("mobilenetv1_bft_100", 24), ("mobilenetv1_025", 28),
         "MAC-matched by input size"),
    Pair("fmnist-shufflenetv2", "fmnist", ("shufflenetv2_bft_125", 29), ("shufflenetv2_050", 29),
         "MAC-matched by input size"),
    Pair("fmnist-mobilenetv3", "fmnist", ("mobilenetv3_small_bft_050", 28),
         ("mobilenetv3_small_035", 24), "MAC-matched by input size"),
    Pair("paper-mobilenetv1-025", "paper", ("mobilenetv1_bft_100", 160), ("mobilenetv1_025", 224),
         "paper Table 1c"),
    Pair("paper-shufflenetv2", "paper", ("shufflenetv2_bft_125", 224), ("shufflenetv2_050", 224),
         "paper Table 1a"),
    Pair("paper-mobilenetv1-050", "paper", ("mobilenetv1_bft_200", 224), ("mobilenetv1_050", 224),
         "paper Table 1c"),
]}
PAIR_ALIASES = {"all": list(PAIRS), "fmnist": [n for n in PAIRS if n.startswith("fmnist-")],
                "paper": [n for n in PAIRS if n.startswith("paper-")]}
PATHS = ("eager", "eager_cl", "compile")
THREADS = [2]
# warm-up steps, rounds, timed steps per round (at least), seconds per round (at least),
# most warm-up steps of a compiled model after its first (compiling) step
TIMING = {"full": {"warmup": 2, "rounds": 5, "block": 2, "min_round_s": 1.0, "compile_warmup": 8},
          "quick": {"warmup": 1, "rounds": 2, "block": 3, "min_round_s": 0.0, "compile_warmup": 3}}
CATEGORIES = ("bft", "pointwise", "depthwise", "batchnorm", "other")
CATEGORY_LABELS = {"bft": "BFT", "pointwise": "1x1 conv", "depthwise": "depthwise conv",
                   "batchnorm": "BatchNorm", "other": "other"}
LABEL_PREFIX = "bench::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


# --------------------------------------------------------------------------- the machine

def machine() -> Dict:
    return describe_machine(timm=timm.__version__, butterfly=butterfly.__version__,
                            backend=butterfly.current_backend())


# --------------------------------------------------------------------------- models and steps

def config_key(setting: str, model: str, res: int) -> str:
    return f"{setting}/{model}@{res}"


def cell_key(config: str, path: str, threads: int, batch: int) -> str:
    return f"{config}|{path}|t{threads}|b{batch}"


def parse_config(config: str) -> Tuple[str, str, int]:
    setting, rest = config.split("/", 1)
    model, res = rest.rsplit("@", 1)
    return setting, model, int(res)


def pair_configs(pair: Pair) -> List[str]:
    return [config_key(pair.setting, *pair.bft), config_key(pair.setting, *pair.baseline)]


def build(config: str) -> nn.Module:
    setting, model, _ = parse_config(config)
    s = SETTINGS[setting]
    kwargs = {"small_input": True} if s["small_input"] else {}
    torch.manual_seed(0)
    return timm.create_model(model, pretrained=False, num_classes=s["num_classes"],
                             in_chans=s["in_chans"], **kwargs)


def config_meta(config: str, model: nn.Module) -> Dict:
    setting, name, res = parse_config(config)
    s = SETTINGS[setting]
    return {"setting": setting, "model": name, "res": res, "in_chans": s["in_chans"],
            "num_classes": s["num_classes"], "small_input": s["small_input"],
            "macs": int(count_macs(model, (s["in_chans"], res, res))),
            "params": sum(p.numel() for p in model.parameters()),
            "bft_layers": sum(1 for m in model.modules() if butterfly.is_bft(m)),
            **layer_profile(model, res, s["in_chans"])}


def make_batch(config: str, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    setting, _, res = parse_config(config)
    s = SETTINGS[setting]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, s["in_chans"], res, res, generator=g)
    y = torch.randint(0, s["num_classes"], (batch,), generator=g)
    return x, y


class Runner:
    """One training step of one model copy on one path: ``step()`` returns the loss."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 forward: Optional[Callable] = None):
        self.model, self.x, self.y = model.train(), x, y
        self.forward = model if forward is None else forward
        self.optimizer = create_optimizer_v2(butterfly.param_groups(model, WEIGHT_DECAY),
                                             opt="sgd", lr=LR, momentum=MOMENTUM,
                                             weight_decay=WEIGHT_DECAY)
        self.loss: Optional[torch.Tensor] = None

    def step(self) -> torch.Tensor:
        loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = loss.detach()
        return self.loss

    def check(self) -> None:
        if self.loss is not None and not bool(torch.isfinite(self.loss)):
            raise FloatingPointError(f"non-finite loss {float(self.loss)}")


def prep_eager(model: nn.Module, x, y, timing: Dict) -> Tuple[Runner, Dict]:
    runner = Runner(copy.deepcopy(model), x, y)
    for _ in range(timing["warmup"]):
        runner.step()
    runner.check()
    return runner, {"warmup_steps": timing["warmup"]}


def prep_eager_cl(model: nn.Module, x, y, timing: Dict) -> Tuple[Runner, Dict]:
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    runner = Runner(cl, x.contiguous(memory_format=torch.channels_last), y)
    for _ in range(timing["warmup"]):
        runner.step()
    runner.check()
    return runner, {"warmup_steps": timing["warmup"]}


def prep_compile(model: nn.Module, x, y, timing: Dict) -> Tuple[Runner, Dict]:
    """torch.compile (inductor, static shapes) of an NCHW copy in training mode; the first step
    compiles forward and backward; then steps until two in a row are within 20%."""
    import torch._dynamo.utils
    m = copy.deepcopy(model).train()
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(m, backend="inductor", dynamic=False)
        runner = Runner(m, x, y, forward=compiled)
        t0 = time.perf_counter()
        runner.step()
        compile_s = time.perf_counter() - t0
        times: List[float] = []
        while len(times) < timing["compile_warmup"]:
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
            if len(times) >= 2 and abs(times[-1] - times[-2]) <= 0.2 * min(times[-2:]):
                break
    runner.check()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks_before
    return runner, {"compile_s": round(compile_s, 2), "warmup_steps": len(times) + 1,
                    "graph_breaks": breaks}


PREPARE: Dict[str, Callable[..., Tuple[Runner, Dict]]] = {
    "eager": prep_eager, "eager_cl": prep_eager_cl, "compile": prep_compile}


def time_interleaved(runners: Dict[str, Runner], timing: Dict
                     ) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds of every timed step of every runner, and the reasons of the runners that raised
    (dropped from then on). Rounds in a rotating order; in each, a runner takes one untimed step,
    then ``block`` timed steps and more until ``min_round_s`` has passed."""
    times: Dict[str, List[float]] = {name: [] for name in runners}
    failed: Dict[str, str] = {}
    names = list(runners)
    for r in range(timing["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name in failed:
                continue
            runner = runners[name]
            try:
                runner.step()
                start = time.perf_counter()
                n = 0
                while n < timing["block"] or time.perf_counter() - start < timing["min_round_s"]:
                    t0 = time.perf_counter()
                    runner.step()
                    times[name].append(time.perf_counter() - t0)
                    n += 1
                runner.check()
            except Exception as err:  # a failing path is recorded, not raised
                failed[name] = one_line(err)
    return times, failed


def quartiles(values: List[float]) -> Tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


# --------------------------------------------------------------------------- the split

def categorize_modules(model: nn.Module) -> Iterable[Tuple[nn.Module, str]]:
    for m in model.modules():
        if butterfly.is_bft(m):
            yield m, "bft"
        elif isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            yield m, "depthwise"
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) == (1, 1):
            yield m, "pointwise"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield m, "batchnorm"


@contextlib.contextmanager
def labelled(model: nn.Module):
    """Wrap the forward of every BFT, depthwise conv, 1x1 conv and BatchNorm module of ``model``
    in ``record_function("bench::<category>")`` (an instance attribute, removed on exit)."""
    wrapped = []
    for module, category in categorize_modules(model):
        forward = module.forward

        def labelled_forward(*args, _forward=forward, _label=LABEL_PREFIX + category, **kwargs):
            with torch.profiler.record_function(_label):
                return _forward(*args, **kwargs)
        module.forward = labelled_forward
        wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward


def _parents(event):
    e = event
    while e is not None:
        yield e
        e = e.cpu_parent


def op_category(name: str) -> Optional[str]:
    """The category of one of the library's operators wherever it runs (None for any other op):
    the depthwise operators count as depthwise, the fused BatchNorm ones as BatchNorm, every
    other butterfly op as BFT."""
    if "butterfly" not in name:
        return None
    if "depthwise" in name or "dw_" in name:
        return "depthwise"
    return "batchnorm" if "batch_norm" in name or "bn_act" in name else "bft"


def attribute(events) -> List[Tuple[object, str, str]]:
    """(event, category, phase) for every profiler event of a step; phase is "forward",
    "backward" (under an autograd engine node) or "optimizer" (under ``Optimizer.*``). See the
    module docstring for the method."""
    events = sorted(events, key=lambda e: e.time_range.start)

    def scope(event):
        """The innermost label or backward node above (or at) ``event``."""
        for e in _parents(event):
            if e.name.startswith(LABEL_PREFIX):
                return "label", e
            if e.name.startswith(BACKWARD_PREFIX):
                return "backward", e
        return None, None

    # the op that created autograd node (thread, seq): the last forward op that recorded seq
    creator: Dict[Tuple[int, int], object] = {}
    for e in events:
        if e.sequence_nr is not None and e.sequence_nr >= 0 and scope(e)[0] != "backward":
            creator[(e.thread, e.sequence_nr)] = e

    def forward_category(event) -> str:
        kind, e = scope(event)
        return e.name[len(LABEL_PREFIX):] if kind == "label" else "other"

    out = []
    for e in events:
        kind, s = scope(e)
        if kind == "backward":
            phase = "backward"
            key = (s.fwd_thread, s.sequence_nr)
            made_by = creator.get(key) if s.sequence_nr is not None and s.sequence_nr >= 0 else None
            category = forward_category(made_by) if made_by is not None else "other"
        else:
            phase = "optimizer" if any(p.name.startswith("Optimizer.") for p in _parents(e)) \
                else "forward"
            category = s.name[len(LABEL_PREFIX):] if kind == "label" else "other"
        category = op_category(e.name) or category
        out.append((e, category, phase))
    return out


def split_of(events, steps: int) -> Dict:
    """Self CPU time (us per step) by category and phase, the shares of the step in %."""
    total = 0.0
    us = {c: {"forward": 0.0, "backward": 0.0, "optimizer": 0.0} for c in CATEGORIES}
    butterfly_ops = 0.0
    for e, category, phase in attribute(events):
        t = float(e.self_cpu_time_total)
        total += t
        us[category][phase] += t
        if op_category(e.name) == "bft":
            butterfly_ops += t
    total = total or 1.0
    shares = {c: 100.0 * sum(v.values()) / total for c, v in us.items()}
    return {"total_self_cpu_ms": total / 1e3 / steps, "share": shares,
            "backward_share": {c: 100.0 * v["backward"] / total for c, v in us.items()},
            "butterfly_ops_share": 100.0 * butterfly_ops / total,
            "self_cpu_us": {c: {k: round(t / steps, 1) for k, t in v.items()}
                            for c, v in us.items()}}


def profile_split(runner: Runner, steps: int = 1) -> Dict:
    from torch.profiler import ProfilerActivity, profile
    with labelled(runner.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        wall = time.perf_counter() - t0
    runner.check()
    out = split_of(prof.events(), steps)
    out["profiled_step_ms"] = wall * 1e3 / steps
    out["steps"] = steps
    return out


# --------------------------------------------------------------------------- the run

def load_results(path: Path) -> Dict:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("version", 1)
    for key in ("runs", "configs", "cells", "splits", "rates"):
        data.setdefault(key, [] if key == "runs" else {})
    return data


def save_results(data: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def selected_pairs(names: List[str]) -> List[Pair]:
    out: List[str] = []
    for n in names:
        out.extend(PAIR_ALIASES.get(n, [n]))
    return [PAIRS[n] for n in dict.fromkeys(out)]


def groups_of(pairs: List[Pair]) -> List[List[str]]:
    """The configs of the pairs, merged into groups of pairs that share a model."""
    groups: List[List[str]] = []
    for pair in pairs:
        configs = pair_configs(pair)
        joined = [g for g in groups if set(g) & set(configs)]
        merged = [c for g in joined for c in g] + configs
        groups = [g for g in groups if g not in joined] + [list(dict.fromkeys(merged))]
    return groups


def split_formats(paths: List[str]) -> List[str]:
    return [p for p in ("eager", "eager_cl") if p in paths]


def nchw_is_faster(data: Dict, key: str) -> bool:
    """Whether the cached cells say eager NCHW beats eager channels_last (so the channels_last
    split ``key`` is not wanted)."""
    config, path, threads, batch = key.split("|")
    if path != "eager_cl":
        return False
    cl = data["cells"].get(key, {})
    nchw = data["cells"].get("|".join([config, "eager", threads, batch]), {})
    return cl.get("status") != "ok" or (nchw.get("status") == "ok" and nchw["ms"] <= cl["ms"])


def plan(args, data: Dict) -> List[Tuple[int, List[str], List[str], List[str]]]:
    """(threads, group, cell keys to time, split keys to maybe profile) for what is missing."""
    todo = []
    for threads in args.threads:
        for group in groups_of(selected_pairs(args.pairs)):
            cells = [cell_key(c, p, threads, args.batch) for c in group for p in args.paths]
            cells = [k for k in cells if args.force or k not in data["cells"]]
            splits = [] if args.no_split else [
                cell_key(c, p, threads, args.batch) for c in group
                for p in split_formats(args.paths)]
            splits = [k for k in splits if args.force or k not in data["splits"]]
            splits = [k for k in splits if k in cells or not nchw_is_faster(data, k)]
            if cells or splits:
                todo.append((threads, group, cells, splits))
    return todo


def run_group(threads: int, group: List[str], cells: List[str], splits: List[str], args,
              data: Dict, run_id: int, save: Callable[[], None]) -> None:
    timing = TIMING["quick" if args.quick else "full"]
    import torch._dynamo
    torch._dynamo.reset()
    with torch_threads(threads):
        load_before = loadavg()
        models: Dict[str, nn.Module] = {}
        batches = {}
        needed = {k.split("|")[0] for k in cells + splits}
        for config in group:
            if config not in needed:
                continue
            models[config] = build(config)
            data["configs"][config] = config_meta(config, models[config])
            batches[config] = make_batch(config, args.batch)
        runners: Dict[str, Runner] = {}
        results: Dict[str, Dict] = {}
        for key in cells:
            config, path = key.split("|")[:2]
            base = {"config": config, "path": path, "threads": threads, "batch": args.batch,
                    "quick": args.quick, "run": run_id, "date": now()}
            t0 = time.perf_counter()
            try:
                runner, extra = PREPARE[path](models[config], *batches[config], timing)
            except Exception as err:  # a failing path is recorded, not raised
                results[key] = {**base, "status": "failed", "reason": one_line(err)}
                print(f"   {key}: failed: {results[key]['reason']}", flush=True)
                continue
            runners[key] = runner
            results[key] = {**base, "status": "ok", "prep_s": round(time.perf_counter() - t0, 2),
                            **extra}
        if runners:
            print(f"   timing {len(runners)} cells, {threads} thread(s)", flush=True)
        times, failed = time_interleaved(runners, timing)
        load_after = loadavg()
        for key, runner in runners.items():
            cell = results[key]
            if key in failed or not times[key]:
                cell.update(status="failed", reason=failed.get(key, "no timed step"))
                continue
            ms = [t * 1e3 for t in times[key]]
            med = statistics.median(ms)
            q1, q3 = quartiles(ms)
            cell.update(ms=round(med, 3), q1=round(q1, 3), q3=round(q3, 3),
                        min=round(min(ms), 3), steps=len(ms),
                        img_s=round(args.batch * 1e3 / med, 2),
                        loss=round(float(runner.loss), 4))
        for key, cell in results.items():
            cell.update(load_before=load_before, load_after=load_after)
            data["cells"][key] = cell
            if cell["status"] == "ok":
                print(f"   {key}: {cell['ms']:.1f} ms/step, {cell['img_s']:.0f} img/s", flush=True)
        save()
        # the split: eager NCHW, and eager channels_last where it is the faster eager format
        for key in splits:
            config, path = key.split("|")[:2]
            if nchw_is_faster(data, key):
                data["splits"].pop(key, None)  # not the best eager format (any more)
                continue
            base = {"config": config, "path": path, "threads": threads, "batch": args.batch,
                    "run": run_id, "date": now(), "load": loadavg()}
            try:
                runner = runners.get(key)
                if runner is None or key in failed:
                    runner = PREPARE[path](models[config], *batches[config], timing)[0]
                data["splits"][key] = {**base, "status": "ok",
                                       **profile_split(runner, args.profile_steps)}
                s = data["splits"][key]["share"]
                print(f"   split {key}: " + ", ".join(f"{c} {s[c]:.0f}%" for c in CATEGORIES),
                      flush=True)
            except Exception as err:  # recorded, not raised
                data["splits"][key] = {**base, "status": "failed", "reason": one_line(err)}
        save()
        runners.clear()
        models.clear()
        gc.collect()


# --------------------------------------------------------------------------- the report

# Passes of one training step, per image: multiply-adds 3x the forward's (forward, input
# gradient, weight gradient); activation bytes 2.5x the forward's layers-only count (forward:
# each layer reads its input and writes its output; backward: it reads its output's gradient and
# its input, and writes its input's gradient); weights 8x per step (read in forward and backward,
# gradient written, the optimizer reads weight, gradient and momentum and writes two).
STEP_PASSES = {"macs": 3, "activations": 2.5, "weights": 8}


def step_bounds(meta: Dict, rates: Dict, batch: int) -> Optional[Dict]:
    """Lower bounds of a training step's time per image, in ms, from the model's layer profile
    (:func:`benchmarks.models.layer_profile`) and the measured machine rates
    (:func:`benchmarks.models.machine_rates`): *memory*, the step's least traffic
    (:data:`STEP_PASSES`) at copy bandwidth; *compute*, its multiply-adds at each layer kind's
    rate; *rest*, the compute bound with the BFT layers free. None without a profile or rates."""
    m = meta.get("macs_by_kind")
    if not m or not rates or not all(rates.get(f"{k}_GMACs") for k in m) \
            or not rates.get("copy_GBs"):
        return None
    per_kind = {k: STEP_PASSES["macs"] * m[k] / (rates[f"{k}_GMACs"] * 1e9) * 1e3 for k in m}
    traffic = (STEP_PASSES["activations"] * meta["act_bytes_layers"]
               + STEP_PASSES["weights"] * meta["weight_bytes"] / batch)
    memory = traffic / (rates["copy_GBs"] * 1e9) * 1e3
    compute = sum(per_kind.values())
    return {"memory_ms": memory, "compute_ms": compute, "rest_ms": compute - per_kind["bft"],
            "bound_ms": max(memory, compute), "kind": "memory" if memory > compute else "compute",
            "working_set_MB": meta["act_bytes"] * batch / 1e6}


def bounds_lines(data: Dict, threads: int, batch: int) -> List[str]:
    """The "what bounds it" part of a (threads, batch) section: every profiled model's lower
    bounds next to its best measured step, then each pair's ratios."""
    rates = data["rates"].get(f"t{threads}")
    rows, bounds = [], {}
    for config in sorted(data["configs"]):
        meta = data["configs"][config]
        b, cell = step_bounds(meta, rates, batch), best_cell(data, config, threads, batch)
        if b is None or cell is None:
            continue
        bounds[config] = b
        measured = cell["ms"] / batch
        m = meta["macs_by_kind"]
        rest = f" ({b['rest_ms']:.2f})" if m["bft"] else ""
        rows.append(f"| {parse_config(config)[0]} | {label(config)} | {m['dense'] / 1e6:.1f} / "
                    f"{m['depthwise'] / 1e6:.1f} / {m['bft'] / 1e6:.1f} | "
                    f"{meta['act_bytes_layers'] / 1e6:.2f} | {b['working_set_MB']:.0f} | "
                    f"{b['memory_ms']:.3f} | {b['compute_ms']:.3f}{rest} | {measured:.3f} "
                    f"({cell['path']}) | {measured / b['bound_ms']:.1f}x ({b['kind']}) |")
    if not rows:
        return []
    llc = (data["runs"][-1].get("machine", {}).get("llc_MiB") if data["runs"] else None)
    lines = ["", "### What bounds it", "",
             f"Machine rates ({threads} thread{'s' if threads > 1 else ''}, measured by this "
             f"benchmark with `benchmarks.models.machine_rates`, {rates['date']}): copy "
             f"{rates['copy_GBs']:.1f} GB/s (read + write), dense 1x1 conv "
             f"{rates['dense_GMACs']:.0f}, depthwise 3x3 {rates['depthwise_GMACs']:.0f}, BFT "
             f"{rates['bft_GMACs']:.0f} GMAC/s (inference kernels: {rates['shapes']}).", "",
             "Per image. *layers-only activations*: the input and output bytes of every conv, BFT "
             "and linear layer in one forward (what is left to move when BatchNorms and "
             "activations are fused into the layers); *working set*: every leaf module's input "
             "and output over the batch (what eager training keeps for backward, roughly)"
             + (f", against a last-level cache of {llc:.0f} MiB (shared with the machine's other "
                "tenants)" if llc else "") + ". *memory floor*: "
             f"{STEP_PASSES['activations']:g}x the layers-only activations plus "
             f"{STEP_PASSES['weights']}x the weights per step, at copy bandwidth (a step cannot "
             "move less if its working set does not stay in cache); *compute floor*: "
             f"{STEP_PASSES['macs']}x the forward's multiply-adds at each layer kind's measured "
             "rate (in brackets, with the BFT layers free). Both are estimates from one shape per "
             "kind, not guarantees. *measured / floor*: how far the best path is from the larger "
             "floor.", "",
             "| setting | model | MACs (M): dense / depthwise / BFT | layers-only activations MB "
             "| working set MB | memory floor ms | compute floor ms | measured ms (path) | "
             "measured / floor |", "|---|---|---|---:|---:|---:|---|---|---|"] + rows + [""]
    for pair in PAIRS.values():
        bft, base = pair_configs(pair)
        if bft not in bounds or base not in bounds:
            continue
        b, a = bounds[bft], bounds[base]
        mb = best_cell(data, bft, threads, batch)["ms"] / batch
        ma = best_cell(data, base, threads, batch)["ms"] / batch
        mem_ratio = data["configs"][bft]["act_bytes_layers"] / data["configs"][base]["act_bytes_layers"]
        verdict = (
            f"at its floor the BFT model would take {b['bound_ms'] / ma:.2f}x the baseline's "
            "measured step" + (" (parity needs faster kernels than these rates)"
                               if b["bound_ms"] > ma else "")
            + f"; its memory floor alone is {b['memory_ms'] / ma:.2f}x it")
        lines.append(f"* **{pair.name}**: {mem_ratio:.1f}x the layers-only activation bytes; "
                     f"floors {b['bound_ms']:.3f} vs {a['bound_ms']:.3f} ms (ratio "
                     f"{b['bound_ms'] / a['bound_ms']:.2f}), measured {mb:.3f} vs {ma:.3f} ms "
                     f"(ratio {mb / ma:.2f}); {verdict}.")
    return lines



def best_cell(data: Dict, config: str, threads: int, batch: int) -> Optional[Dict]:
    cells = [data["cells"].get(cell_key(config, p, threads, batch)) for p in PATHS]
    cells = [c for c in cells if c and c.get("status") == "ok"]
    return min(cells, key=lambda c: c["ms"]) if cells else None


def fmt_cell(cell: Optional[Dict]) -> str:
    if cell is None:
        return "-"
    if cell.get("status") != "ok":
        return f"failed: {cell.get('reason', '?').replace('|', '/')}"
    q = " (quick)" if cell.get("quick") else ""
    text = f"{cell['ms']:.1f} ms, {cell['img_s']:.0f} img/s{q}"
    if "compile_s" in cell:
        text += f"; compile {cell['compile_s']:.0f} s"
    return text


def label(config: str) -> str:
    _, model, res = parse_config(config)
    return f"`{model}`@{res}"


def mmacs(data: Dict, config: str) -> str:
    meta = data["configs"].get(config)
    return f"{meta['macs'] / 1e6:.1f}" if meta else "?"


def combos(data: Dict) -> List[Tuple[int, int]]:
    return sorted({(c["threads"], c["batch"]) for c in data["cells"].values()},
                  key=lambda tb: (-tb[0], tb[1]))


def report(data: Dict) -> str:
    runs = data["runs"]
    last = runs[-1] if runs else {}
    m = last.get("machine", {})
    lines = ["# Training step on CPU: BFT models next to their MAC-matched baselines", "",
             "Generated by `python -m benchmarks.training` from `training_cpu.json` (method: the "
             "module docstring of `benchmarks/training.py`).", "",
             f"- machine: {m.get('cpu', '?')}, {m.get('usable_cpus', '?')} usable of "
             f"{m.get('logical_cpus', '?')} logical CPUs; torch {m.get('torch', '?')}, timm "
             f"{m.get('timm', '?')}, butterfly {m.get('butterfly', '?')} (backend "
             f"{m.get('backend', '?')}); {m.get('platform', '?')}",
             f"- date: {last.get('date', '?')} (last run)",
             f"- command: `{last.get('command', '?')}`",
             f"- load average (1, 5, 15 min) before / after: {last.get('load_before')} / "
             f"{last.get('load_after')}",
             f"- note: {last.get('note') or '-'}",
             f"- step: forward, cross-entropy, backward, timm SGD (Nesterov momentum {MOMENTUM}, "
             f"`butterfly.param_groups(model, {WEIGHT_DECAY:g})`, lr {LR:g}), zero_grad; train "
             "mode; float32; random input and labels; median ms per step over the timed steps",
             ""]
    if len(runs) > 1:
        lines += ["Runs in this file:", "", "| run | date | command | load before / after | "
                  "note |", "|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['id']} | {r['date']} | `{r['command']}` | {r.get('load_before')}"
                         f" / {r.get('load_after')} | {r.get('note') or '-'} |")
        lines.append("")
    for threads, batch in combos(data):
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}, batch {batch}", "",
                  "### BFT / baseline", "",
                  "Ratio of time per image, the best path of each (< 1: BFT trains faster).", "",
                  "| pair | BFT | MMACs | baseline | MMACs | BFT best | baseline best | "
                  "ratio |", "|---|---|---|---|---|---|---|---|"]
        for pair in PAIRS.values():
            bft, base = pair_configs(pair)
            b, a = best_cell(data, bft, threads, batch), best_cell(data, base, threads, batch)
            if b is None and a is None:
                continue
            ratio = f"**{b['ms'] / a['ms']:.2f}**" if a and b else "-"
            lines.append(f"| {pair.name} ({pair.why}) | {label(bft)} | {mmacs(data, bft)} | "
                         f"{label(base)} | {mmacs(data, base)} | "
                         f"{b['path'] + ': ' + fmt_cell(b) if b else '-'} | "
                         f"{a['path'] + ': ' + fmt_cell(a) if a else '-'} | {ratio} |")
        lines += ["", "### Every model and path", "",
                  "| setting | model | MMACs | params | " + " | ".join(PATHS) + " |",
                  "|---|---|---|---|" + "---|" * len(PATHS)]
        configs = sorted({c["config"] for c in data["cells"].values()
                          if c["threads"] == threads and c["batch"] == batch})
        for config in configs:
            meta = data["configs"].get(config, {})
            row = [fmt_cell(data["cells"].get(cell_key(config, p, threads, batch)))
                   for p in PATHS]
            lines.append(f"| {parse_config(config)[0]} | {label(config)} | {mmacs(data, config)} | "
                         f"{meta.get('params', 0) / 1e6:.2f}M | " + " | ".join(row) + " |")
        splits = [s for s in data["splits"].values()
                  if s["threads"] == threads and s["batch"] == batch]
        if splits:
            lines += ["", "### Training-step split", "",
                      "Share of the profiled step's self CPU time (forward + backward + "
                      "optimizer; in brackets the backward part). 1x1 conv: dense pointwise "
                      "convs (what BFT replaces); butterfly ops: the BFT operators alone (ops "
                      "named `butterfly*` other than the depthwise and BatchNorm ones).",
                      "", "| model | format | profiled step | " +
                      " | ".join(CATEGORY_LABELS[c] for c in CATEGORIES) + " | butterfly ops |",
                      "|---|---|---|" + "---|" * (len(CATEGORIES) + 1)]
            for s in sorted(splits, key=lambda s: (s["config"], s["path"])):
                fmt = "NCHW" if s["path"] == "eager" else "channels_last"
                if s.get("status") != "ok":
                    lines.append(f"| {label(s['config'])} | {fmt} | failed: "
                                 f"{s.get('reason', '?').replace('|', '/')} |" +
                                 " |" * (len(CATEGORIES) + 1))
                    continue
                shares = [f"{s['share'][c]:.1f}% ({s['backward_share'][c]:.1f}%)"
                          for c in CATEGORIES]
                lines.append(f"| {label(s['config'])} | {fmt} | {s['profiled_step_ms']:.0f} ms | "
                             + " | ".join(shares) + f" | {s['butterfly_ops_share']:.1f}% |")
        lines += bounds_lines(data, threads, batch)
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def parse_args(argv):
    names = list(PAIRS) + list(PAIR_ALIASES)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["all"], choices=names, metavar="PAIR",
                        help="pairs to time: " + ", ".join(names) + " (default: all)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--threads", nargs="+", type=int, default=THREADS,
                        help="torch.set_num_threads for each table (default: 2)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"default {BATCH}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer warm-up and timed steps (a check, not a result)")
    parser.add_argument("--force", action="store_true", help="re-measure cached cells")
    parser.add_argument("--no-split", action="store_true", help="skip the profiled split")
    parser.add_argument("--profile-steps", type=int, default=1,
                        help="steps profiled for the split (default 1)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc settings alone")
    parser.add_argument("--note", default="", help="free text recorded with the run")
    parser.add_argument("--out-dir", default=str(RESULTS),
                        help=f"where {JSON_NAME} and {MD_NAME} go (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cells that would be measured and exit")
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.threads) or args.batch < 1 or args.profile_steps < 1:
        parser.error("--threads, --batch and --profile-steps must be positive")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.out_dir)
    data = load_results(out / JSON_NAME)
    todo = plan(args, data)
    if args.dry_run:
        for threads, group, cells, splits in todo:
            for key in cells:
                print(key)
            for key in splits:
                print(key + " (split)")
        print(f"{sum(len(t[2]) for t in todo)} cells to time"
              f" ({'--force' if args.force else 'cached cells skipped'})")
        return 0
    malloc = "malloc defaults" if args.malloc_defaults else keep_freed_memory()
    load = loadavg()
    if load and load[0] > usable_cores() - 0.5:
        print(f"warning: load average {load} on {usable_cores()} usable CPUs: other work will "
              "distort the timings", file=sys.stderr)
    run_id = max((r["id"] for r in data["runs"]), default=0) + 1
    run = {"id": run_id, "date": now(),
           "command": " ".join(["python -m benchmarks.training", *map(shlex.quote, argv)]),
           "note": args.note, "quick": args.quick, "threads": args.threads, "malloc": malloc,
           "load_before": load, "load_after": None, "machine": machine()}
    data["runs"].append(run)
    path = out / JSON_NAME

    def save():
        run["load_after"] = loadavg()
        save_results(data, path)
        (out / MD_NAME).write_text(report(data))

    start = time.perf_counter()
    for threads in args.threads if todo else []:
        if args.force or f"t{threads}" not in data["rates"]:
            print(f"== machine rates: {threads} thread(s)", flush=True)
            data["rates"][f"t{threads}"] = machine_rates(threads, args.quick)
    for threads, group, cells, splits in todo:
        print(f"== {', '.join(group)}: {threads} thread(s)", flush=True)
        run_group(threads, group, cells, splits, args, data, run_id, save)
    run["seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(f"wrote {path} and {out / MD_NAME} ({run['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
