"""Whole models of the zoo on CPU, on every path a user can run them, each BFT model timed side by
side with its MAC-matched baseline (the BFT paper's Table 1).

    python -m benchmarks.models                    # every configuration of the paper (~1.5 h)
    python -m benchmarks.models --dry-run          # the cells a run would measure
    python -m benchmarks.models --configs mobilenetv1_bft_100@160 mobilenetv1_025@224 --quick
    python -m benchmarks.models --paths eager fused --threads 1 --batch 1 --note "idle machine"

Configurations: the rows of Table 1 (:data:`PAPER`), ``--models``/``--res`` or ``--configs``.
Models: random weights (seed 0), 1000 classes, eval mode, float32. Paths (:data:`PATHS`):
``eager`` (NCHW, ``inference_mode``), ``eager_cl`` (channels_last), ``compile`` (inductor,
``freezing=True``, channels_last, compiled per thread count and batch, called until two calls
agree within 20%), ``ort`` / ``ort_structured`` (onnxruntime on the dense / structured
``butterfly.export_onnx``; structured: BFT models only), ``fused`` / ``fused_cl``
(``butterfly.optimize_for_inference`` for the batch and threads timed). Each output is checked
against eager's. The two models of a Table-1 row are one unit (:func:`measurement_units`): their
paths are timed together by the harness (5 rounds, settle 50 ms, at least 0.25 s of calls per
round; ``--quick``: 2 short rounds). With :data:`BOUNDS_PAIR` the machine's rates are measured
too. Batch 1 is reported as latency, other batches as images per second.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
from torch import nn

import butterfly
from benchmarks import bounds, flops, harness
from butterfly.flops import count_macs

JSON_NAME, MD_NAME, PLOT_NAME = "models_cpu.json", "models_cpu.md", "accuracy_vs_latency.png"

# ImageNet top-1 (%) of every configuration of the BFT paper (Alizadeh Vahid et al., CVPR 2020),
# Table 1: (a) ShuffleNetV2 (the baselines are the paper's own runs), (b) MobileNetV3-Small,
# (c) MobileNetV1; its MFLOPs are benchmarks.flops.PAPER's.
TOP1 = {"mobilenetv1_025": ("1c", {128: 41.50, 160: 45.50, 192: 47.70, 224: 50.60}),
        "mobilenetv1_050": ("1c", {128: 56.30, 192: 61.70, 224: 63.30}),
        "mobilenetv1_bft_100": ("1c", {96: 46.58, 128: 52.26, 160: 54.30, 192: 57.56}),
        "mobilenetv1_bft_200": ("1c", {128: 58.35, 192: 63.03, 224: 64.32}),
        "shufflenetv2_050": ("1a", {128: 50.86, 160: 55.21, 224: 59.70}),
        "shufflenetv2_bft_125": ("1a", {128: 55.26, 160: 57.83, 224: 61.33}),
        "mobilenetv3_small_035": ("1b", {224: 49.8}),
        "mobilenetv3_small_bft_050": ("1b", {224: 55.21})}
PAPER = {(m, res): {"mflops": flops.PAPER[m][res], "top1": top1, "table": f"Table {table}"}
         for m, (table, rows) in TOP1.items() for res, top1 in rows.items()}
MODELS = list(dict.fromkeys(m for m, _ in PAPER))
LABELS = {
    "mobilenetv1_025": "MobileNetV1 0.25", "mobilenetv1_050": "MobileNetV1 0.5",
    "mobilenetv1_bft_100": "MobileNetV1+BFT 1.0", "mobilenetv1_bft_200": "MobileNetV1+BFT 2.0",
    "shufflenetv2_050": "ShuffleNetV2 0.5", "shufflenetv2_bft_125": "ShuffleNetV2+BFT 1.25",
    "mobilenetv3_small_035": "MobileNetV3-Small 0.35",
    "mobilenetv3_small_bft_050": "MobileNetV3-Small+BFT 0.5"}
FAMILIES = {"mobilenetv1": "MobileNetV1", "shufflenetv2": "ShuffleNetV2",
            "mobilenetv3": "MobileNetV3-Small"}
BASELINE_OF = {"mobilenetv1_bft_100": "mobilenetv1_025", "mobilenetv1_bft_200": "mobilenetv1_050",
               "shufflenetv2_bft_125": "shufflenetv2_050",
               "mobilenetv3_small_bft_050": "mobilenetv3_small_035"}
# The rows of Table 1: (BFT model, res, baseline, res, headline); headline: the largest matched
# budget of each family.
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
BOUNDS_PAIR = (("mobilenetv1_bft_200", 224), ("mobilenetv1_050", 224))
PATHS = ("eager", "eager_cl", "compile", "ort", "ort_structured", "fused", "fused_cl")
BFT_ONLY = {"ort_structured"}
TIMING = {"full": harness.Timing(rounds=5, calls=1, min_time_s=0.25, settle_s=0.05),
          "quick": harness.Timing(rounds=2, calls=1, min_time_s=0.05, settle_s=0.01)}


def cell_key(model: str, res: int, path: str, threads: int, batch: int) -> str:
    return f"{model}@{res}|{path}|t{threads}|b{batch}"


def config_key(model: str, res: int) -> str:
    return f"{model}@{res}"


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=1000).eval()


def model_meta(name: str, res: int, model: nn.Module) -> Dict:
    return {"model": name, "res": res, "label": LABELS.get(name, name),
            "bft": any(butterfly.is_bft(m) for m in model.modules()),
            "macs": count_macs(model, (3, res, res)),
            "params": sum(p.numel() for p in model.parameters()),
            "paper": PAPER.get((name, res)), **bounds.layer_profile(model, res)}


# --------------------------------------------------------------------------- runners (paths)

def torch_runner(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.inference_mode():
            return module(x)
    return run


def channels_last(model: nn.Module, x: torch.Tensor):
    return (copy.deepcopy(model).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last))


def prep_compile(model, x, threads, onnx) -> Tuple[Callable, Dict]:
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    model, x = channels_last(model, x)
    with inductor_config.patch(freezing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = torch_runner(torch.compile(model, backend="inductor", dynamic=False), x)
        t0 = time.perf_counter()
        run()
        compile_s, times = time.perf_counter() - t0, []
        while len(times) < 20 and not (len(times) >= 2 and abs(times[-1] - times[-2])
                                       <= 0.2 * min(times[-2:])):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return run, {"compile_s": round(compile_s, 2), "warmup_calls": len(times) + 1}


def prep_ort(model, x, threads, onnx, structured: bool = False) -> Tuple[Callable, Dict]:
    """onnxruntime on the export at this batch (made once per model and batch: ``onnx``)."""
    import onnxruntime as ort
    key = (structured, x.shape[0])
    if key not in onnx:
        path = os.path.join(onnx["dir"], f"{'s' if structured else 'd'}_b{x.shape[0]}.onnx")
        t0, log = time.perf_counter(), io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            butterfly.export_onnx(model, x, path, structured=structured)
        onnx[key] = (path, time.perf_counter() - t0)
    path, export_s = onnx[key]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's default: its threads spin between parallel sections instead of sleeping
    # (without it every section waits for a thread to wake). Their spinning stops before the
    # next step of a round is timed: that step's untimed settle calls come first.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return (lambda: torch.from_numpy(session.run(None, feed)[0])), {
        "export_s": round(export_s, 2), "onnx_mb": round(os.path.getsize(path) / 1e6, 2)}


def report_summary(report) -> List[str]:
    """The lines of ``str(report)`` before its table header (a line starting with "layer"), at
    most five; the first line when there is no such header."""
    lines = [line.rstrip() for line in str(report).splitlines()]
    head = next((i for i, ln in enumerate(lines) if ln.lstrip().lower().startswith("layer")), None)
    return ([ln for ln in lines[:head] if ln.strip()] if head else lines[:1])[:5]


def prep_fused(model, x, threads, onnx, cl: bool = False) -> Tuple[Callable, Dict]:
    model, x = channels_last(model, x) if cl else (copy.deepcopy(model), x)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = butterfly.optimize_for_inference(model, x)
    return torch_runner(model, x), {"optimize_s": round(time.perf_counter() - t0, 2),
                                    "report_summary": report_summary(report)}


PREPARE: Dict[str, Callable] = {
    "eager": lambda model, x, threads, onnx: (torch_runner(model, x), {}),
    "eager_cl": lambda model, x, threads, onnx: (torch_runner(*channels_last(model, x)), {}),
    "compile": prep_compile,
    "ort": prep_ort,
    "ort_structured": lambda *a: prep_ort(*a, structured=True),
    "fused": prep_fused,
    "fused_cl": lambda *a: prep_fused(*a, cl=True),
}


def checked_runner(path, model, x, want, threads, onnx):
    """The preparation of one path, its output checked against eager's (``want``)."""
    def prep():
        if isinstance(want, Exception):
            raise RuntimeError(f"eager forward: {harness.one_line(want)}")
        run, info = PREPARE[path](model, x, threads, onnx)
        got = run().detach().float().reshape(want.shape)
        diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        return run, {**info, "max_rel_diff": diff}
    return prep


# --------------------------------------------------------------------------- the run

def configs_of(args) -> List[Tuple[str, int]]:
    if args.configs:
        return list(args.configs)
    return [(name, r) for name in args.models
            for r in (args.res or [r for (m, r) in PAPER if m == name] or [224])]


def plan(args, store: harness.Store) -> List[Tuple[str, int, str, int, int]]:
    """(model, res, path, threads, batch) of the cells to measure."""
    cells = [(name, res, path, t, b) for name, res in configs_of(args)
             for t in args.threads for b in args.batch for path in args.paths
             if path not in BFT_ONLY or store.data["configs"].get(
                 config_key(name, res), {}).get("bft", "_bft_" in name)]
    todo = set(store.todo([cell_key(*c) for c in cells], args.force, args.retry_failed))
    return [c for c in cells if cell_key(*c) in todo]


def measurement_units(configs: List[Tuple[str, int]]) -> List[List[Tuple[str, int]]]:
    """What is timed together: every Table-1 row (headline rows first) whose two configurations
    are both requested, then each BFT model with its baseline at the same resolution, then each
    remaining configuration alone. A ratio is only comparable when both models were timed in the
    same rounds (on a shared machine one model's time drifted 2x between runs minutes apart)."""
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


def run_unit(unit, todo, args, store: harness.Store) -> None:
    """Measure the cells of ``todo`` of one unit (one configuration, or a pair side by side)."""
    models = {}
    for name, res in unit:
        key = config_key(name, res)
        try:
            models[(name, res)] = build(name)
            store.data["configs"][key] = model_meta(name, res, models[(name, res)])
        except Exception as err:  # the model itself fails: so does every cell of it
            reason = f"model: {harness.one_line(err)}"
            store.data["configs"][key] = {"model": name, "res": res, "bft": "_bft_" in name,
                                          "label": LABELS.get(name, name), "macs": 0,
                                          "params": 0, "paper": PAPER.get((name, res)),
                                          "act_bytes": 0, "error": reason}
            for c in todo:
                if c[:2] == (name, res):
                    store.put(cell_key(*c), {"model": name, "res": res, "path": c[2],
                                             "threads": c[3], "batch": c[4],
                                             "status": "failed", "reason": reason})
    timed_with = [config_key(*c) for c in unit]
    with tempfile.TemporaryDirectory(prefix="bft_models_") as tmp:
        onnx = {c: {"dir": tempfile.mkdtemp(dir=tmp)} for c in models}
        for threads in args.threads:
            for batch in args.batch:
                preps, meta = {}, {}
                with harness.torch_threads(threads):
                    for (name, res), model in models.items():
                        torch.manual_seed(1)
                        x = torch.randn(batch, 3, res, res)
                        try:
                            with torch.inference_mode():
                                want = model(x).float()
                        except Exception as err:  # every path of this model fails with it
                            want = err
                        for c in todo:
                            if c == (name, res, c[2], threads, batch):
                                preps[cell_key(*c)] = checked_runner(c[2], model, x, want,
                                                                     threads, onnx[(name, res)])
                                meta[cell_key(*c)] = {"model": name, "res": res, "path": c[2]}
                if preps:
                    harness.measure(store, preps, TIMING["quick" if args.quick else "full"],
                                    threads, meta=meta, batch=batch, quick=args.quick,
                                    timed_with=timed_with)
                    store.save()


# --------------------------------------------------------------------------- the report

def cells_of(data: Dict, key: str) -> List[Dict]:
    name, res = key.rsplit("@", 1)
    return [c for c in data["cells"].values() if c["model"] == name and c["res"] == int(res)]


def best(data: Dict, key: str, threads: int, batch: int) -> Optional[Dict]:
    """The fastest ok cell of a configuration at (threads, batch)."""
    cells = [c for c in cells_of(data, key) if c["threads"] == threads and c["batch"] == batch
             and c["status"] == "ok"]
    return min(cells, key=lambda c: c["ms"]) if cells else None


def marks(cell: Dict) -> str:
    """q: measured with --quick; L: the machine was loaded (see harness.loaded)."""
    text = ("q" if cell.get("quick") else "") + ("L" if harness.loaded(cell) else "")
    return f" {text}" if text else ""


def fmt_cell(c: Optional[Dict]) -> str:
    if c is None:
        return ""
    if c["status"] != "ok":
        return "failed"
    if c["batch"] == 1:
        return f"{c['ms']:.2f} ({c['q1_ms']:.2f}-{c['q3_ms']:.2f}){marks(c)}"
    return (f"{c['img_s']:.0f} ({c['batch'] / c['q3_ms'] * 1e3:.0f}-"
            f"{c['batch'] / c['q1_ms'] * 1e3:.0f}){marks(c)}")


def combos(data: Dict) -> Tuple[List[int], List[int]]:
    cells = data["cells"].values()
    return (sorted({c["threads"] for c in cells}, reverse=True),
            sorted({c["batch"] for c in cells}))


def sorted_configs(data: Dict) -> List[str]:
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(data["configs"], key=lambda k: (order.get(k.rsplit("@", 1)[0], len(order)),
                                                  k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])))


def top1(meta: Optional[Dict]) -> str:
    return f"{meta['paper']['top1']:.2f}" if meta and meta.get("paper") else "-"


def ratio_table(data: Dict, pairs, title: str, intro: str) -> List[str]:
    threads_list, batches = combos(data)
    rows = []
    for bft, bres, base, rres, headline in pairs:
        kb, kr = config_key(bft, bres), config_key(base, rres)
        mb, mr = data["configs"].get(kb), data["configs"].get(kr)
        if mb is None or mr is None:
            continue
        for threads in threads_list:
            cols = []
            for batch in batches:
                cb, cr = best(data, kb, threads, batch), best(data, kr, threads, batch)
                if cb is None or cr is None:
                    cols.append("-")
                    continue
                mark = (" L" if harness.loaded(cb) or harness.loaded(cr) else "") + (
                    "" if kr in cb.get("timed_with", ()) else " apart")
                cols.append(f"**{cb['ms'] / cr['ms']:.2f}** ({cb['ms'] / batch:.2f} {cb['path']} / "
                            f"{cr['ms'] / batch:.2f} {cr['path']}){mark}")
            if any(c != "-" for c in cols):
                rows.append([f"{LABELS.get(bft, bft)} @{bres}{' *' * headline}",
                             f"{mb['macs'] / 1e6:.1f}", top1(mb), f"{LABELS.get(base, base)} @{rres}",
                             f"{mr['macs'] / 1e6:.1f}", top1(mr), threads, *cols])
    if not rows:
        return []
    return [f"## {title}", "", intro, "", *harness.table(
        ["BFT model", "MMACs", "top-1", "baseline", "MMACs", "top-1", "threads",
         *(f"batch {b}: BFT / baseline, ms per image (best paths)" for b in batches)],
        rows, "lrrlrrr"), ""]


def dominated(data: Dict, threads: int = 2, batch: int = 1) -> List[str]:
    """Per BFT configuration of the paper measured at (threads, batch): the baselines of its
    family that are both faster (best path) and, by the paper's top-1, more accurate."""
    configs = [(k, data["configs"][k]) for k in sorted_configs(data)
               if data["configs"][k].get("paper") and best(data, k, threads, batch)]
    lines = []
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


def bounds_section(data: Dict) -> List[str]:
    """What bounds the headline pairs (the rates come with :data:`BOUNDS_PAIR`)."""
    pairs = sorted(((config_key(b, br), config_key(r, rr)) for b, br, r, rr, head in PAIRS
                    if head), key=lambda p: p != tuple(config_key(*k) for k in BOUNDS_PAIR))
    pairs = [p for p in pairs if all("macs_by_kind" in data["configs"].get(k, {}) for k in p)]

    def measured(key, threads, batch):
        c = best(data, key, threads, batch)
        return (c["ms"] / batch, c["path"]) if c else None
    return bounds.section({k: data["configs"][k] for p in pairs for k in p},
                          data.get("rates", {}), measured, [1, 32],
                          [(f"{b} vs {r}", b, r) for b, r in pairs], bounds.INFERENCE)


def model_section(data: Dict, key: str) -> List[str]:
    meta = data["configs"][key]
    cells = {(c["path"], c["threads"], c["batch"]): c for c in cells_of(data, key)}
    threads_list, batches = combos(data)
    cols = [(t, b) for t in threads_list for b in batches]
    paper = meta.get("paper")
    lines = [f"### {meta['label']} @{meta['res']} (`{meta['model']}`)", "",
             f"{meta['macs'] / 1e6:.2f} M MACs, {meta['params'] / 1e6:.3f} M params, "
             f"{meta['act_bytes'] / 1e6:.1f} MB activations per image; " +
             (f"paper: {paper['mflops']} MFLOPs, ImageNet top-1 {paper['top1']:.2f}% "
              f"({paper['table']})." if paper else "not in the paper's tables."), ""]
    if meta.get("error"):
        lines += [f"The model failed: {meta['error']}", ""]
    rows = [[path, *(fmt_cell(cells.get((path, t, b))) for t, b in cols)] for path in PATHS
            if any((path, t, b) in cells for t, b in cols)]
    lines += [*harness.table(["path", *(f"{t} thr, batch {b}: " + ("ms (IQR)" if b == 1 else
                                                                   "img/s (IQR)")
                                        for t, b in cols)], rows, "l" + "r" * len(cols)), ""]
    bests = [f"{t} thr batch {b}: **{c['path']}** ("
             + (f"{c['ms']:.2f} ms" if b == 1 else f"{c['img_s']:.0f} img/s") + ")"
             for t, b in cols for c in [best(data, key, t, b)] if c]
    if bests:
        lines += ["Best: " + "; ".join(bests) + ".", ""]
    for (path, t, b), c in sorted(cells.items(), key=lambda kv: (PATHS.index(kv[0][0]),
                                                                 -kv[0][1], kv[0][2])):
        notes = [f"failed: {c['reason']}"] if c["status"] != "ok" else []
        if c.get("max_rel_diff", 0) > 1e-3:
            notes.append(f"output differs from eager by {c['max_rel_diff']:.1e} (relative)")
        if "compile_s" in c:
            notes.append(f"first call (compile) {c['compile_s']} s")
        if "export_s" in c:
            notes.append(f"export {c['export_s']} s, {c['onnx_mb']} MB")
        if c.get("report_summary"):
            notes.append("report: " + " / ".join(c["report_summary"]))
        if notes:
            lines.append(f"- {path}, {t} thr, batch {b}: " + "; ".join(notes))
    return lines + [""]


def report(data: Dict) -> List[str]:
    same_res = [(b, res, base, res, False) for b, base in BASELINE_OF.items()
                for res in sorted({int(k.rsplit("@", 1)[1]) for k in data["configs"]})
                if config_key(b, res) in data["configs"] and config_key(base, res) in data["configs"]]
    lines = ["# Model-level CPU benchmark: every path, every configuration of the paper", "",
             "Random weights, eval mode, float32, 1000 classes, `torch.inference_mode()`; paths "
             "and timing: `benchmarks/models.py`'s docstring and docs/benchmarks.md. Top-1 "
             "accuracies are the BFT paper's ImageNet figures (Table 1), not measured here.", "",
             *harness.runs_section(data)]
    lines += ratio_table(
        data, PAIRS, "BFT vs its MAC-matched baseline (the paper's Table 1 rows)",
        "Ratio = BFT time per image / baseline time per image, each on its fastest path: **< 1 "
        "means the BFT model is faster**. * = a family's headline pair; L = measured under load; "
        "apart = the two were not timed side by side (such ratios carry the drift between runs).")
    lines += ratio_table(data, same_res, "BFT vs baseline at the same resolution",
                         "The same ratio at resolutions where both were measured (not "
                         "MAC-matched).")
    front = dominated(data)
    if front:
        lines += ["## Accuracy at a given latency: is a BFT configuration beaten on both?", "",
                  "Baselines of its family that run faster (batch 1, 2 threads, best paths, as in "
                  f"`{PLOT_NAME}`) and are more accurate by the paper's top-1:", "", *front, ""]
    lines += ["## The headline pairs", ""] + bounds_section(data)
    lines += ["## Per model", "", "Batch 1: median ms per call (quartiles); other batches: images "
              "per second (quartiles as throughputs); q = `--quick`; L = measured under load "
              "(do not trust it).", ""]
    for key in sorted_configs(data):
        lines += model_section(data, key)
    return lines


def plot(data: Dict, path) -> None:
    """Paper top-1 against the measured batch-1 latency (best path) at 2 threads (else the most
    threads measured), each family's baselines with their Pareto frontier."""
    threads_list, _ = combos(data)
    if not threads_list:
        return
    threads = 2 if 2 in threads_list else threads_list[0]
    points = []
    for key in sorted_configs(data):
        meta, c = data["configs"][key], best(data, key, threads, 1)
        if c and meta.get("paper"):
            points.append({"family": next((f for p, f in FAMILIES.items()
                                           if meta["model"].startswith(p)), "other"),
                           "bft": meta["bft"], "x": c["ms"], "y": meta["paper"]["top1"],
                           "label": f"{meta['label'].split()[-1]}@{meta['res']} ({c['path']})"})
    harness.scatter(points, path, f"measured batch-1 latency, ms (best path, {threads} thread"
                    f"{'s' * (threads > 1)}, CPU)", "ImageNet top-1, % (BFT paper, Table 1)",
                    "Paper accuracy vs measured CPU latency", frontier=True, log_x=True)


def write_outputs(store: harness.Store, out) -> None:
    store.save()
    harness.write_report(out / MD_NAME, report(store.data))
    plot(store.data, out / PLOT_NAME)


def parse_args(argv):
    p = harness.parser("models", __doc__, threads=[2, 1], cached=True)
    p.add_argument("--models", nargs="+", default=MODELS, metavar="NAME",
                   help="zoo names (default: the eight models of the paper's Table 1)")
    p.add_argument("--res", nargs="+", type=int, default=None,
                   help="input resolutions for every model (default: the paper's)")
    p.add_argument("--configs", nargs="+", default=None, metavar="MODEL@RES",
                   help="exactly these configurations (instead of --models and --res)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    args = harness.checked(p, argv)
    if args.configs:
        if args.res or "--models" in argv:
            p.error("--configs replaces --models and --res: give one or the other")
        parsed = []
        for item in args.configs:
            name, _, res = item.partition("@")
            if not res.isdigit() or int(res) < 8:
                p.error(f"--configs {item}: expected MODEL@RES, e.g. mobilenetv1_bft_100@160")
            parsed.append((name, int(res)))
        args.configs = list(dict.fromkeys(parsed))
        args.models = [name for name, _ in args.configs]
    unknown = [m for m in args.models if m not in set(timm.list_models())]
    if unknown:
        p.error(f"unknown model(s) {unknown}; butterfly's: "
                f"{', '.join(butterfly.models.registered_models())}")
    if any(b < 1 for b in args.batch):
        p.error("--batch must be positive")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    store = harness.Store(args.out_dir / JSON_NAME, "models")
    store.data.setdefault("configs", {})
    store.data.setdefault("rates", {})
    todo = [] if args.render else plan(args, store)
    if args.dry_run:
        print("\n".join(cell_key(*c) for c in todo))
        print(f"{len(todo)} cells to measure")
        return 0
    if todo:
        store.start("models", argv, args.note, malloc=harness.malloc_note(args))
    if any(c[:2] in BOUNDS_PAIR for c in todo):
        for threads in args.threads:
            if args.force or f"t{threads}" not in store.data["rates"]:
                print(f"== machine rates, {threads} thread(s)", flush=True)
                store.data["rates"][f"t{threads}"] = bounds.rates(threads, args.quick)
    for unit in measurement_units(configs_of(args)):
        cells = [c for c in todo if c[:2] in unit]
        if cells:
            print(f"== {', '.join(config_key(*c) for c in unit)}: {len(cells)} cells", flush=True)
            run_unit(unit, cells, args, store)
    write_outputs(store, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
