"""The harness every benchmark here is built on: one machine description, one interleaved timer,
one results store (JSON) and one report writer (markdown from that JSON).

A benchmark is a set of *cells*: a case (a layer shape, a model at a resolution), a runner (a way
to run it: a format, a backend, a path such as ``torch.compile``) and the conditions (threads,
batch, mode). Each cell's runner is prepared, the prepared cells are timed together by
:func:`interleave`, and :func:`measure` records one entry per cell in a :class:`Store`. The
report is drawn from the store alone, so it can be redrawn from a committed JSON.

Timing rules (:func:`interleave`):

* Rounds visit every step in a rotating order (round ``r`` starts at step ``r mod n``), so load
  from other processes, and what ran just before, fall on all variants alike. The machines these
  run on are shared; only ratios of steps timed in the same rounds are compared.
* In each round a step first runs untimed for ``settle_s`` (at least one call): it is timed in its
  steady state, as in a loop over a model. After different work the first calls of a
  memory-bound step run slower while the caches and the uncore clock catch up.
* Then each call is timed on its own, until at least ``calls`` calls and ``min_time_s`` seconds.
  A cell reports the median over all rounds, the quartiles and the fastest call.
* A step that raises is recorded as failed with a one-line reason and dropped; the others go on.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from butterfly.kernels.cpu import load_extension

RESULTS = Path(__file__).parent / "results"
FORMAT = "butterfly-bench/2"
ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma")


# --------------------------------------------------------------------------- the machine

def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load() -> List[float]:
    """The 1, 5 and 15 minute load average (every runnable process, this one's threads too)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def loaded(cell: Dict) -> bool:
    """Whether the 1-minute load before or after a cell exceeded the usable CPUs: other work ran."""
    loads = [ld[0] for ld in (cell.get("load_before"), cell.get("load_after")) if ld]
    return bool(loads) and max(loads) > cell.get("cpus", usable_cores())


def busy(limit: int = 6, interval: float = 0.5) -> List[str]:
    """The other processes that used the most CPU over ``interval`` seconds, as ``"name 97%"``
    (from /proc: utime + stime before and after)."""
    def sample() -> Dict[int, Tuple[str, int]]:
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            out[int(entry)] = (text[text.index("(") + 1:text.rindex(")")],
                               int(fields[11]) + int(fields[12]))
        return out

    try:
        first = sample()
        time.sleep(interval)
        second = sample()
    except (OSError, ValueError):
        return []
    tick = os.sysconf("SC_CLK_TCK")
    used = sorted(((second[p][1] - first[p][1]) / tick / interval, second[p][0])
                  for p in second if p in first)
    return [f"{name} {100 * share:.0f}%" for share, name in reversed(used) if share >= 0.05][:limit]


def last_level_cache_mib() -> float:
    """Size of the largest cache level of CPU 0 (Linux sysfs; 0 where it cannot be read)."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            sizes[int((index / "level").read_text())] = int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return sizes[max(sizes)] / 2 ** 20 if sizes else 0.0


def machine(**extra) -> Dict:
    """The machine a result was measured on: CPU model, the ISA flags that matter here, cores,
    torch threads, last-level cache, versions, GPU if any, and the load average now."""
    import butterfly
    import timm
    from butterfly.kernels.cpu import cpu_info
    info = cpu_info()
    flags = [f for f in ISA_FLAGS if f in info["flags"].split()]
    out = {"cpu": info["model"], "flags": ", ".join(flags) or "none of " + "/".join(ISA_FLAGS),
           "logical_cpus": os.cpu_count(), "usable_cpus": usable_cores(),
           "torch_threads": torch.get_num_threads(), "llc_MiB": last_level_cache_mib(),
           "python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "butterfly": butterfly.__version__,
           "platform": platform.platform(), "load": load()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return {**out, **extra}


def describe(m: Dict) -> str:
    """One line naming a machine description of :func:`machine` (older files lack some keys)."""
    cpus = m.get("usable_cpus", m.get("logical_cpus", "?"))
    text = (f"{m.get('cpu', '?')} ({m.get('flags', 'ISA flags not recorded')}), {cpus} of "
            f"{m.get('logical_cpus', '?')} CPUs")
    if m.get("llc_MiB"):
        text += f", {m['llc_MiB']:.0f} MiB last-level cache"
    if m.get("gpu"):
        text += f", GPU {m['gpu']}"
    return text + f"; torch {m.get('torch', '?')}, Python {m.get('python', '?')}"


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep freed memory in the process (``mallopt``), as jemalloc or
    tcmalloc do: otherwise whichever step allocates after another's large free faults in fresh
    zeroed pages, and its time depends on what ran before it. Returns a note for the results."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-1, 1 << 30) and libc.mallopt(-4, 0)  # M_TRIM_THRESHOLD, M_MMAP_MAX
    except (OSError, AttributeError):
        ok = False
    return ("glibc's malloc keeps freed memory (M_TRIM_THRESHOLD 1 GiB, M_MMAP_MAX 0)" if ok
            else "malloc defaults (mallopt unavailable)")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def one_line(err: BaseException) -> str:
    """An exception as one short line, for a results table."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return reason if len(reason) <= 240 else reason[:237] + "..."


# --------------------------------------------------------------------------- the timer

@dataclass(frozen=True)
class Timing:
    """How :func:`interleave` times (see the module docstring)."""
    rounds: int = 5
    calls: int = 3          # timed calls per step and round, at least
    min_time_s: float = 0.0  # timed seconds per step and round, at least
    settle_s: float = 0.02  # untimed seconds per step and round (at least one call)


def interleave(steps: Dict[str, Callable[[], object]], timing: Timing,
               clock: Callable[[], float] = time.perf_counter
               ) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds of every timed call of every step (by ``clock``), and the one-line reasons of the
    steps that raised (dropped from then on). The rules are in the module docstring."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    failed: Dict[str, str] = {}
    names = list(steps)
    for r in range(timing.rounds):
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            if name in failed:
                continue
            step = steps[name]
            try:
                until = time.perf_counter() + timing.settle_s
                step()
                while time.perf_counter() < until:
                    step()
                start, n = time.perf_counter(), 0
                while n < timing.calls or time.perf_counter() - start < timing.min_time_s:
                    t0 = clock()
                    step()
                    times[name].append(clock() - t0)
                    n += 1
            except Exception as err:  # a failing step is recorded, not raised
                failed[name] = one_line(err)
    return times, failed


def summary(seconds: Sequence[float]) -> Dict:
    """Median, quartiles and fastest of per-call times, in ms."""
    ms = sorted(1e3 * t for t in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else ms * 3
    return {"ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "min_ms": ms[0],
            "samples": len(ms)}


def measure(store: "Store", prepare: Dict[str, Callable[[], Tuple[Callable, Dict]]],
            timing: Timing, threads: int, clock: Callable[[], float] = time.perf_counter,
            meta: Optional[Dict[str, Dict]] = None, **fields) -> Dict[str, Dict]:
    """Prepare every cell (``key -> () -> (step, info)``), time the prepared ones together with
    :func:`interleave` at ``threads`` threads, and record each in ``store``: its timing summary,
    ``info``, ``fields``, ``meta[key]``, the threads and the load before and after. A cell whose
    preparation or timing raises is recorded as failed with the reason. Returns the cells."""
    steps, cells = {}, {}
    with torch_threads(threads):
        for key, prep in prepare.items():
            t0 = time.perf_counter()
            try:
                steps[key], info = prep()
                cells[key] = {"status": "ok", "prepare_s": round(time.perf_counter() - t0, 2),
                              **info}
            except Exception as err:  # a failing runner is recorded, not raised
                cells[key] = {"status": "failed", "reason": one_line(err)}
        before = load()
        times, failed = interleave(steps, timing, clock)
        after = load()
    for key, cell in cells.items():
        if key in failed:
            cell.update(status="failed", reason=failed[key])
        elif cell["status"] == "ok":
            cell.update(summary(times[key]))
            if "batch" in fields:
                cell["img_s"] = fields["batch"] * 1e3 / cell["ms"]
        cells[key] = cell = {**fields, **(meta or {}).get(key, {}), **cell, "threads": threads,
                             "cpus": usable_cores(), "load_before": before, "load_after": after}
        store.put(key, cell)
        print(f"   {key}: " + (f"{cell['ms']:.3f} ms" if cell["status"] == "ok"
                               else f"FAILED {cell['reason']}"), flush=True)
    return cells


# --------------------------------------------------------------------------- the store

def read_json(path) -> Optional[Dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path, obj) -> None:
    """Write ``obj`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Store:
    """One benchmark's results file: ``runs`` (command, date, note, machine, load after) and
    ``cells`` (key -> one measurement, naming its run), plus whatever the benchmark adds. A cell
    stays until it is measured again (``keep``) and a run is kept while a cell names it, so the
    file holds the latest measurement of each cell and the runs that made them; git keeps the
    history. With ``keep=False`` a run starts from an empty file."""

    def __init__(self, path, benchmark: str, keep: bool = True):
        self.path = Path(path)
        old = read_json(self.path) if keep else None
        self.data = old or {"format": FORMAT, "benchmark": benchmark, "runs": [], "cells": {}}
        self.cells: Dict[str, Dict] = self.data["cells"]
        self.run: Optional[Dict] = None

    def todo(self, keys: Iterable[str], force: bool = False, retry_failed: bool = False) -> List:
        """The keys to measure: missing ones; failed ones too with ``retry_failed``; all with
        ``force``."""
        return [k for k in keys if force or k not in self.cells
                or (retry_failed and self.cells[k].get("status") != "ok")]

    def start(self, prog: str, argv: Sequence[str], note: str = "", **extra) -> Dict:
        self.run = {"id": max((r["id"] for r in self.data["runs"]), default=0) + 1,
                    "date": now(), "command": f"python -m benchmarks.{prog} {shlex.join(argv)}".strip(),
                    "note": note, "machine": machine(), "busy": busy(), **extra}
        self.data["runs"].append(self.run)
        return self.run

    def put(self, key: str, cell: Dict) -> None:
        self.cells[key] = {**cell, "run": self.run["id"] if self.run else None, "date": now()}

    def save(self) -> None:
        if self.run is not None:
            self.run["load_after"] = load()
        used = {c.get("run") for c in self.cells.values()}
        self.data["runs"] = [r for r in self.data["runs"] if r["id"] in used]
        write_json(self.path, self.data)


# --------------------------------------------------------------------------- the report writer

def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else f"{value:{spec}}"


def table(head: Sequence[str], rows: Iterable[Sequence], align: str = "") -> List[str]:
    """A markdown table; ``align`` has one letter per column, ``r`` right-aligns it."""
    marks = [("---:" if a == "r" else "---") for a in align.ljust(len(head), "l")]
    return ["| " + " | ".join(map(str, head)) + " |", "|" + "|".join(marks) + "|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def runs_section(data: Dict) -> List[str]:
    """Who measured what: each run that owns a cell, with its machine and load."""
    rows = []
    for run in data.get("runs", []):
        m = run.get("machine", {})
        count = sum(c.get("run") == run["id"] for c in data.get("cells", {}).values())
        rows.append([run["id"], run["date"], f"`{run['command']}`", describe(m),
                     f"{m.get('load', '?')} -> {run.get('load_after', '?')}", count,
                     "; ".join(filter(None, (run.get("note"), run.get("malloc"))))])
    return ["Runs (each cell names the run that measured it; load: 1/5/15-minute load average, "
            "this benchmark's own threads included):", "",
            *table(["run", "date", "command", "machine", "load before -> after", "cells",
                    "note"], rows, "r"), ""]


def write_report(path, lines: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {path}")


def scatter(points: Sequence[Dict], path, xlabel: str, ylabel: str, title: str,
            frontier: bool = False, log_x: bool = False) -> None:
    """Accuracy against cost, one colour per family: baselines as dots, BFT models as stars.
    Each point: ``family``, ``bft``, ``x``, ``y``, ``label`` and optionally ``yerr``. The line
    joins a family's points, or with ``frontier`` steps along its baselines' Pareto front (the
    points no other baseline beats on both)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family in dict.fromkeys(p["family"] for p in points):
        pts = sorted((p for p in points if p["family"] == family), key=lambda p: p["x"])
        line_pts = [p for p in pts if not p["bft"]] if frontier else pts
        if frontier:
            line_pts = [p for i, p in enumerate(line_pts)
                        if all(q["y"] < p["y"] for q in line_pts[:i])]
        line, = ax.plot([p["x"] for p in line_pts], [p["y"] for p in line_pts], "-",
                        drawstyle="steps-post" if frontier else "default", alpha=0.6,
                        label=family)
        for p in pts:
            ax.errorbar(p["x"], p["y"], yerr=p.get("yerr") or 0, fmt="*" if p["bft"] else "o",
                        color=line.get_color(), markersize=12 if p["bft"] else 6, capsize=3)
            ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=7)
    ax.plot([], [], "ko", label="baseline")
    ax.plot([], [], "k*", markersize=10, label="BFT")
    if log_x and points:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    ax.margins(x=0.15, y=0.1)
    save_figure(fig, path)


def save_figure(fig, path) -> str:
    """Save and close a matplotlib figure atomically."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- the command line

def parser(prog: str, doc: str, threads: Sequence[int], cached: bool = False
           ) -> argparse.ArgumentParser:
    """The options every timing benchmark shares; ``cached``: the store keeps cells between runs
    (``--force``, ``--retry-failed``, ``--dry-run``)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{prog}",
                                description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a check that it "
                   "runs, not a measurement)")
    p.add_argument("--threads", type=int, nargs="+", default=list(threads),
                   help=f"thread counts, one set of results each (default {' '.join(map(str, threads))})")
    p.add_argument("--note", default="", help="free text recorded with the run")
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help="folder of the results (JSON, markdown; default benchmarks/results)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc as it is (see harness.keep_freed_memory)")
    if cached:
        p.add_argument("--force", action="store_true", help="re-measure cells already stored")
        p.add_argument("--retry-failed", action="store_true", help="re-measure failed cells")
        p.add_argument("--dry-run", action="store_true", help="print the cells to measure, exit")
        p.add_argument("--render", action="store_true",
                       help="measure nothing: redraw the report from the stored JSON")
    return p


def checked(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = p.parse_args(argv)
    if any(t < 1 for t in args.threads):
        p.error("--threads must be positive")
    return args


def kernel_run(prog: str, results: str, argv, args) -> Optional[Store]:
    """A fresh store (``results`` under ``--out-dir``) with this run started, for a benchmark of
    the C++ kernels; None, saying so, when they are unavailable."""
    if load_extension() is None:
        print("the CPU kernels are unavailable (see the warning); nothing to benchmark",
              file=sys.stderr)
        return None
    store = Store(args.out_dir / results, prog, keep=False)
    store.start(prog, argv, args.note, malloc=malloc_note(args))
    return store


def malloc_note(args) -> str:
    return "glibc's malloc defaults" if args.malloc_defaults else keep_freed_memory()
