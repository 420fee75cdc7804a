"""What every benchmark records about the machine and the conditions of a run, written once."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
from pathlib import Path
from typing import Dict, Iterator, List

import torch

from butterfly.kernels.cpu import cpu_info


def cpu_model() -> str:
    return cpu_info()["model"]


def cpu_flags() -> str:
    """The vector extensions that matter here, from the CPU's flags."""
    flags = cpu_info()["flags"].split()
    if not flags:
        return "unknown"
    return ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma")
                     if f in flags) or "none of avx512f/avx2/fma"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def loadavg() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def last_level_cache_bytes() -> int:
    """Size of the largest cache level of CPU 0 (Linux sysfs; 0 where it cannot be read)."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        try:
            sizes[level] = int(text.rstrip("KMG")) * scale
        except ValueError:
            continue
    return sizes[max(sizes)] if sizes else 0


def machine(**extra) -> Dict:
    """CPU, cores, the last-level cache and versions, plus ``extra`` entries."""
    return {"cpu": cpu_model(), "flags": cpu_flags(), "logical_cpus": os.cpu_count(),
            "usable_cpus": usable_cores(), "llc_MiB": last_level_cache_bytes() / 2 ** 20,
            "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), **extra}


def keep_freed_memory() -> str:
    """Stop glibc from returning freed heap memory to the OS (``mallopt``), as jemalloc or
    tcmalloc would: otherwise whichever layer allocates after a large free faults in fresh zeroed
    pages (~1.5 ms per 6 MB), and which one that is depends on the order of the steps. Returns a
    note for the results."""
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


def one_line(err: BaseException) -> str:
    """An exception as one short line, for a results table."""
    text = str(err).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return reason if len(reason) <= 240 else reason[:237] + "..."


def write_report(path, text: str) -> None:
    """Write a results file (creating its folder), print it and say where it went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
    print(f"wrote {path}")
