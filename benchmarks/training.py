"""CPU training steps: each BFT model next to its MAC-matched baseline, in one run.

    python -m benchmarks.training                        # every pair, every path (an hour or more)
    python -m benchmarks.training --dry-run              # the cells a run would measure
    python -m benchmarks.training --pairs fmnist-mobilenetv3 --paths eager eager_cl --quick

A step is what ``python -m train`` does per batch: forward, cross-entropy against random labels,
backward, timm's SGD (Nesterov, ``butterfly.param_groups(model, 1e-5)``, the paper's learning
rate for batch 32) and ``zero_grad``, in training mode; seed 0, a fixed random batch, float32; a
non-finite loss fails the step. Pairs (:data:`PAIRS`; ``--pairs`` names, ``fmnist``, ``paper``
or ``all``): Fashion-MNIST shapes (1 channel, 10 classes, small-input stem) at the resolutions
:mod:`benchmarks.reproduce` matches MACs with, and the paper's ImageNet pairs at 224. Paths:
``eager`` (NCHW), ``eager_cl`` (channels_last), ``compile`` (inductor on the NCHW model; the
loss, backward and optimizer outside; first step = compile time, then steps until two agree
within 20%). The cells of pairs that share a model are timed together by the harness (5 rounds,
one untimed step, then at least 2 steps and 1 s; ``--quick``: 2 rounds of 3 steps).

The split (``--no-split`` skips it): one step under ``torch.profiler`` for eager NCHW and (when
faster) channels_last; each event's self CPU time goes to BFT, 1x1 conv, depthwise conv,
BatchNorm or other. Forward ops fall under a ``record_function`` label put around each such
module; a backward node's ``evaluate_function`` event carries the sequence number of the forward
op that created it (the last forward op that recorded it), so it and everything under it take
that op's label. The library's depthwise and BatchNorm operators count as such wherever they run,
every other ``butterfly`` op as BFT. What bounds each step: :func:`benchmarks.bounds.section`
with the :data:`benchmarks.bounds.TRAINING` passes.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

import butterfly
from benchmarks import bounds, harness
from butterfly.flops import count_macs

JSON_NAME, MD_NAME = "training_cpu.json", "training_cpu.md"
BATCH = 32
WEIGHT_DECAY = 1e-5
LR = 0.5 * BATCH / 1024  # the paper's recipe (lr 0.5 per 1024 images), as train/ scales it
MOMENTUM = 0.9
SETTINGS = {
    "fmnist": {"in_chans": 1, "num_classes": 10, "small_input": True},
    "paper": {"in_chans": 3, "num_classes": 1000, "small_input": False},
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
TIMING = {"full": harness.Timing(rounds=5, calls=2, min_time_s=1.0, settle_s=0.0),
          "quick": harness.Timing(rounds=2, calls=3, min_time_s=0.0, settle_s=0.0)}
WARMUP = {"full": 2, "quick": 1}
CATEGORIES = {"bft": "BFT", "pointwise": "1x1 conv", "depthwise": "depthwise conv",
              "batchnorm": "BatchNorm", "other": "other"}
LABEL_PREFIX = "bench::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


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


def build(config: str) -> Tuple[nn.Module, Dict]:
    """The model of a configuration and its metadata (MACs, parameters, layer profile)."""
    setting, name, res = parse_config(config)
    s = SETTINGS[setting]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=s["num_classes"],
                              in_chans=s["in_chans"],
                              **({"small_input": True} if s["small_input"] else {}))
    return model, {"setting": setting, "model": name, "res": res, **s,
                   "macs": int(count_macs(model, (s["in_chans"], res, res))),
                   "params": sum(p.numel() for p in model.parameters()),
                   "bft_layers": sum(1 for m in model.modules() if butterfly.is_bft(m)),
                   **bounds.layer_profile(model, res, s["in_chans"])}


def make_batch(config: str, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    setting, _, res = parse_config(config)
    s = SETTINGS[setting]
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, s["in_chans"], res, res, generator=g),
            torch.randint(0, s["num_classes"], (batch,), generator=g))


class Runner:
    """One training step of one model copy on one path per call; a non-finite loss raises."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 forward: Optional[Callable] = None):
        self.model, self.x, self.y = model.train(), x, y
        self.forward = model if forward is None else forward
        self.optimizer = create_optimizer_v2(butterfly.param_groups(model, WEIGHT_DECAY),
                                             opt="sgd", lr=LR, momentum=MOMENTUM,
                                             weight_decay=WEIGHT_DECAY)

    def __call__(self) -> None:
        loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"non-finite loss {loss.item()}")


def prep_eager(model, x, y, warmup: int, cl: bool = False) -> Tuple[Runner, Dict]:
    model = copy.deepcopy(model)
    if cl:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    runner = Runner(model, x, y)
    for _ in range(warmup):
        runner()
    return runner, {"warmup_steps": warmup}


def prep_compile(model, x, y, warmup: int) -> Tuple[Runner, Dict]:
    import torch._dynamo.utils
    m = copy.deepcopy(model).train()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = Runner(m, x, y, forward=torch.compile(m, backend="inductor", dynamic=False))
        t0 = time.perf_counter()
        runner()
        compile_s, times = time.perf_counter() - t0, []
        while len(times) < (8 if warmup > 1 else 3) and not (
                len(times) >= 2 and abs(times[-1] - times[-2]) <= 0.2 * min(times[-2:])):
            t0 = time.perf_counter()
            runner()
            times.append(time.perf_counter() - t0)
    return runner, {"compile_s": round(compile_s, 2), "warmup_steps": len(times) + 1,
                    "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())
                    - breaks}


PREPARE: Dict[str, Callable[..., Tuple[Runner, Dict]]] = {
    "eager": prep_eager, "eager_cl": lambda *a: prep_eager(*a, cl=True), "compile": prep_compile}


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
    """Wrap the forward of every BFT, depthwise conv, 1x1 conv and BatchNorm of ``model`` in
    ``record_function("bench::<category>")`` (an instance attribute, removed on exit)."""
    wrapped = []
    for module, category in categorize_modules(model):
        def forward(*args, _forward=module.forward, _label=LABEL_PREFIX + category, **kwargs):
            with torch.profiler.record_function(_label):
                return _forward(*args, **kwargs)
        module.forward = forward
        wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward


def _parents(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def op_category(name: str) -> Optional[str]:
    """The category of one of the library's operators wherever it runs (None for other ops)."""
    if "butterfly" not in name:
        return None
    if "depthwise" in name or "dw_" in name:
        return "depthwise"
    return "batchnorm" if "batch_norm" in name or "bn_act" in name else "bft"


def attribute(events) -> List[Tuple[object, str, str]]:
    """(event, category, phase) for every profiler event of a step; phase is "forward",
    "backward" (under an autograd engine node) or "optimizer" (the method: the module docstring)."""
    events = sorted(events, key=lambda e: e.time_range.start)

    def scope(event):
        for e in _parents(event):
            if e.name.startswith(LABEL_PREFIX):
                return "label", e
            if e.name.startswith(BACKWARD_PREFIX):
                return "backward", e
        return None, None

    creator: Dict[Tuple[int, int], object] = {}  # (thread, seq) -> the last forward op with it
    for e in events:
        if e.sequence_nr is not None and e.sequence_nr >= 0 and scope(e)[0] != "backward":
            creator[(e.thread, e.sequence_nr)] = e
    out = []
    for e in events:
        kind, s = scope(e)
        if kind == "backward":
            phase = "backward"
            made_by = creator.get((s.fwd_thread, s.sequence_nr)) \
                if s.sequence_nr is not None and s.sequence_nr >= 0 else None
            kind2, s2 = scope(made_by) if made_by is not None else (None, None)
            category = s2.name[len(LABEL_PREFIX):] if kind2 == "label" else "other"
        else:
            phase = "optimizer" if any(p.name.startswith("Optimizer.") for p in _parents(e)) \
                else "forward"
            category = s.name[len(LABEL_PREFIX):] if kind == "label" else "other"
        out.append((e, op_category(e.name) or category, phase))
    return out


def split_of(events, steps: int) -> Dict:
    """Self CPU time (us per step) by category and phase, and the shares of the step in %."""
    us = {c: {"forward": 0.0, "backward": 0.0, "optimizer": 0.0} for c in CATEGORIES}
    total = butterfly_ops = 0.0
    for e, category, phase in attribute(events):
        t = float(e.self_cpu_time_total)
        total += t
        us[category][phase] += t
        butterfly_ops += t * (op_category(e.name) == "bft")
    total = total or 1.0
    return {"total_self_cpu_ms": total / 1e3 / steps,
            "share": {c: 100.0 * sum(v.values()) / total for c, v in us.items()},
            "backward_share": {c: 100.0 * v["backward"] / total for c, v in us.items()},
            "butterfly_ops_share": 100.0 * butterfly_ops / total,
            "self_cpu_us": {c: {k: round(t / steps, 1) for k, t in v.items()}
                            for c, v in us.items()}}


def profile_split(runner: Runner, steps: int = 1) -> Dict:
    from torch.profiler import ProfilerActivity, profile
    with labelled(runner.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner()
        wall = time.perf_counter() - t0
    return {**split_of(prof.events(), steps), "profiled_step_ms": wall * 1e3 / steps,
            "steps": steps}


# --------------------------------------------------------------------------- the run

def selected_pairs(names: List[str]) -> List[Pair]:
    return [PAIRS[n] for n in dict.fromkeys(m for n in names for m in PAIR_ALIASES.get(n, [n]))]


def groups_of(pairs: List[Pair]) -> List[List[str]]:
    """The configs of the pairs, merged into groups of pairs that share a model."""
    groups: List[List[str]] = []
    for pair in pairs:
        configs = pair_configs(pair)
        joined = [g for g in groups if set(g) & set(configs)]
        groups = [g for g in groups if g not in joined] + [
            list(dict.fromkeys([c for g in joined for c in g] + configs))]
    return groups


def nchw_is_faster(data: Dict, key: str) -> bool:
    """Whether the stored cells say eager NCHW beats eager channels_last (so the channels_last
    split ``key`` is not wanted)."""
    config, path, threads, batch = key.split("|")
    if path != "eager_cl":
        return False
    cl = data["cells"].get(key, {})
    nchw = data["cells"].get("|".join([config, "eager", threads, batch]), {})
    return cl.get("status") != "ok" or (nchw.get("status") == "ok" and nchw["ms"] <= cl["ms"])


def plan(args, store: harness.Store) -> List[Tuple[int, List[str], List[str], List[str]]]:
    """(threads, group, cell keys to time, split keys to maybe profile) of what is missing."""
    todo = []
    for threads in args.threads:
        for group in groups_of(selected_pairs(args.pairs)):
            cells = store.todo([cell_key(c, p, threads, args.batch) for c in group
                                for p in args.paths], args.force, args.retry_failed)
            splits = [] if args.no_split else [
                k for k in (cell_key(c, p, threads, args.batch) for c in group
                            for p in ("eager", "eager_cl") if p in args.paths)
                if (args.force or k not in store.data["splits"])
                and (k in cells or not nchw_is_faster(store.data, k))]
            if cells or splits:
                todo.append((threads, group, cells, splits))
    return todo


def run_group(threads: int, group: List[str], cells: List[str], splits: List[str], args,
              store: harness.Store) -> None:
    import torch._dynamo
    torch._dynamo.reset()
    mode = "quick" if args.quick else "full"
    models, batches, runners = {}, {}, {}
    for config in dict.fromkeys(k.split("|")[0] for k in cells + splits):
        models[config], store.data["configs"][config] = build(config)
        batches[config] = make_batch(config, args.batch)

    def prep(key):
        config, path = key.split("|")[:2]

        def run():
            runners[key], info = PREPARE[path](models[config], *batches[config], WARMUP[mode])
            return runners[key], info
        return run

    with harness.torch_threads(threads):
        harness.measure(store, {k: prep(k) for k in cells}, TIMING[mode], threads,
                        meta={k: dict(zip(("config", "path"), k.split("|")[:2])) for k in cells},
                        batch=args.batch, quick=args.quick)
        store.save()
        for key in splits:  # eager NCHW, and channels_last where it is the faster eager format
            if nchw_is_faster(store.data, key):
                store.data["splits"].pop(key, None)
                continue
            config, path = key.split("|")[:2]
            base = {"config": config, "path": path, "threads": threads, "batch": args.batch,
                    "date": harness.now(), "load": harness.load()}
            try:
                runner = runners.get(key) or PREPARE[path](models[config], *batches[config], 0)[0]
                store.data["splits"][key] = {**base, "status": "ok",
                                             **profile_split(runner, args.profile_steps)}
            except Exception as err:  # recorded, not raised
                store.data["splits"][key] = {**base, "status": "failed",
                                             "reason": harness.one_line(err)}
    store.save()
    gc.collect()


# --------------------------------------------------------------------------- the report

def best_cell(data: Dict, config: str, threads: int, batch: int) -> Optional[Dict]:
    cells = [data["cells"].get(cell_key(config, p, threads, batch)) for p in PATHS]
    cells = [c for c in cells if c and c.get("status") == "ok"]
    return min(cells, key=lambda c: c["ms"]) if cells else None


def fmt_cell(cell: Optional[Dict]) -> str:
    if cell is None:
        return "-"
    if cell.get("status") != "ok":
        return f"failed: {cell.get('reason', '?')}"
    return (f"{cell['ms']:.1f} ms, {cell['img_s']:.0f} img/s" + " (quick)" * bool(cell.get("quick"))
            + (f"; compile {cell['compile_s']:.0f} s" if "compile_s" in cell else ""))


def label(config: str) -> str:
    _, model, res = parse_config(config)
    return f"`{model}`@{res}"


def mmacs(data: Dict, config: str) -> str:
    meta = data["configs"].get(config)
    return f"{meta['macs'] / 1e6:.1f}" if meta else "?"


def bounds_lines(data: Dict, threads: int, batch: int) -> List[str]:
    """What bounds each model's step and each pair's ratio at (threads, batch)."""
    rates = data["rates"].get(f"t{threads}")

    def measured(config, t, b):
        c = best_cell(data, config, t, b)
        return (c["ms"] / b, c["path"]) if c else None
    return bounds.section({c: data["configs"][c] for c in sorted(data["configs"])},
                          {f"t{threads}": rates} if rates else {}, measured, [batch],
                          [(p.name, *pair_configs(p)) for p in PAIRS.values()], bounds.TRAINING,
                          batch)


def report(data: Dict) -> List[str]:
    lines = ["# Training step on CPU: BFT models next to their MAC-matched baselines", "",
             f"Step: forward, cross-entropy, backward, timm SGD (Nesterov momentum {MOMENTUM}, "
             f"`butterfly.param_groups(model, {WEIGHT_DECAY:g})`, lr {LR:g}), zero_grad; train "
             "mode; float32; random input and labels; median ms per step. Method: "
             "`benchmarks/training.py`'s docstring.", "", *harness.runs_section(data)]
    combos = sorted({(c["threads"], c["batch"]) for c in data["cells"].values()},
                    key=lambda tb: (-tb[0], tb[1]))
    for threads, batch in combos:
        rows = []
        for pair in PAIRS.values():
            bft, base = pair_configs(pair)
            b, a = best_cell(data, bft, threads, batch), best_cell(data, base, threads, batch)
            if b or a:
                rows.append([f"{pair.name} ({pair.why})", label(bft), mmacs(data, bft), label(base),
                             mmacs(data, base), f"{b['path']}: {fmt_cell(b)}" if b else "-",
                             f"{a['path']}: {fmt_cell(a)}" if a else "-",
                             f"**{b['ms'] / a['ms']:.2f}**" if a and b else "-"])
        configs = sorted({c["config"] for c in data["cells"].values()
                          if (c["threads"], c["batch"]) == (threads, batch)})
        every = [[parse_config(c)[0], label(c), mmacs(data, c),
                  f"{data['configs'].get(c, {}).get('params', 0) / 1e6:.2f}M",
                  *(fmt_cell(data["cells"].get(cell_key(c, p, threads, batch))) for p in PATHS)]
                 for c in configs]
        lines += [f"## {threads} thread{'s' * (threads > 1)}, batch {batch}", "",
                  "### BFT / baseline", "",
                  "Ratio of time per image, the best path of each (< 1: BFT trains faster).", "",
                  *harness.table(["pair", "BFT", "MMACs", "baseline", "MMACs", "BFT best",
                                  "baseline best", "ratio"], rows), "",
                  "### Every model and path", "",
                  *harness.table(["setting", "model", "MMACs", "params", *PATHS], every), ""]
        splits = sorted((s for s in data["splits"].values()
                         if (s["threads"], s["batch"]) == (threads, batch)),
                        key=lambda s: (s["config"], s["path"]))
        if splits:
            rows = [[label(s["config"]), "NCHW" if s["path"] == "eager" else "channels_last",
                     *([f"failed: {s.get('reason')}"] + [""] * (len(CATEGORIES) + 1)
                       if s.get("status") != "ok" else
                       [f"{s['profiled_step_ms']:.0f} ms",
                        *(f"{s['share'][c]:.1f}% ({s['backward_share'][c]:.1f}%)"
                          for c in CATEGORIES), f"{s['butterfly_ops_share']:.1f}%"])]
                    for s in splits]
            lines += ["### Training-step split", "",
                      "Share of the profiled step's self CPU time (in brackets its backward "
                      "part). 1x1 conv: dense pointwise convs (what BFT replaces); butterfly "
                      "ops: the BFT operators alone.", "",
                      *harness.table(["model", "format", "profiled step", *CATEGORIES.values(),
                                      "butterfly ops"], rows), ""]
        lines += bounds_lines(data, threads, batch) + [""]
    return lines


def parse_args(argv):
    names = list(PAIRS) + list(PAIR_ALIASES)
    p = harness.parser("training", __doc__, threads=[2], cached=True)
    p.add_argument("--pairs", nargs="+", default=["all"], choices=names, metavar="PAIR",
                   help="pairs to time: " + ", ".join(names) + " (default: all)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--batch", type=int, default=BATCH, help=f"default {BATCH}")
    p.add_argument("--no-split", action="store_true", help="skip the profiled split")
    p.add_argument("--profile-steps", type=int, default=1, help="steps profiled for the split")
    args = harness.checked(p, argv)
    if args.batch < 1 or args.profile_steps < 1:
        p.error("--batch and --profile-steps must be positive")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    store = harness.Store(args.out_dir / JSON_NAME, "training")
    for key in ("configs", "splits", "rates"):
        store.data.setdefault(key, {})
    todo = [] if args.render else plan(args, store)
    if args.dry_run:
        for _, _, cells, splits in todo:
            print("\n".join(cells + [k + " (split)" for k in splits]))
        print(f"{sum(len(t[2]) for t in todo)} cells to time")
        return 0
    if todo:
        store.start("training", argv, args.note, malloc=harness.malloc_note(args))
        for threads in args.threads:
            if args.force or f"t{threads}" not in store.data["rates"]:
                print(f"== machine rates: {threads} thread(s)", flush=True)
                store.data["rates"][f"t{threads}"] = bounds.rates(threads, args.quick)
    for threads, group, cells, splits in todo:
        print(f"== {', '.join(group)}: {threads} thread(s)", flush=True)
        run_group(threads, group, cells, splits, args, store)
    store.save()
    harness.write_report(args.out_dir / MD_NAME, report(store.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
