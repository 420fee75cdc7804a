"""The run folder (``--output``): refused when it would clobber an earlier run, checked for
writability before any work, and kept free of the temporary files a killed run leaves behind.

Every file of a run is written to ``.<name>.tmp<pid>`` in the same folder and renamed over
``<name>``; a kill between the two leaves the temporary file, which the next run removes.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import List, Optional

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "metrics.json", "args.yaml")
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


class OutputError(RuntimeError):
    """The output folder cannot be used: a file, not writable, or holding another run."""


def temp_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def output_problem(path: str, reuse: bool) -> Optional[str]:
    """Why ``path`` cannot be this run's folder, or None. ``reuse``: ``--resume``/``--overwrite``
    were given, so a folder holding files is fine."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--output {path} is a file, not a folder: choose another --output"
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        return f"--output {path} cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output {path}: {existing} is not writable; choose another --output"
    if existing == os.path.abspath(path) and not reuse:
        # A killed run's temporary files alone do not make a run.
        entries = sorted(e for e in os.listdir(path) if not _TEMP.match(e))
        if entries:
            hint = (f"pass --resume {os.path.join(path, 'last.pth')} to continue that run, "
                    if "last.pth" in entries else "")
            return (f"--output {path} already holds files ({', '.join(entries[:5])}"
                    f"{', ...' if len(entries) > 5 else ''}): {hint}pass --overwrite to replace "
                    "its run files, or choose another --output")
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str, since: float) -> List[str]:
    """Remove the temporary files of run files in ``folder`` left by a killed writer: those of a
    dead process, of this process (none is being written when this is called) or older than
    ``since`` (a reused process id). Returns the names removed."""
    removed = []
    for entry in os.scandir(folder):
        match = _TEMP.match(entry.name)
        if not match or match["name"] not in RUN_FILES:
            continue
        pid = int(match["pid"])
        try:
            stale = (pid == os.getpid() or not _pid_alive(pid)
                     or entry.stat().st_mtime < since)
            if stale:
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:  # removed by someone else meanwhile
            pass
    return removed


def prepare(path: str, reuse: bool, overwrite: bool, since: float) -> None:
    """Create the run folder and prove it writable (before any data is read); with ``overwrite``
    remove the earlier run's files (TensorBoard logs included); remove stale temporary files."""
    problem = output_problem(path, reuse)
    if problem:
        raise OutputError(problem)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputError(f"--output {path} is not writable ({err.strerror or err}); choose "
                          "another --output") from err
    if overwrite:
        for entry in os.scandir(path):
            if entry.name in RUN_FILES or entry.name.startswith("events.out.tfevents."):
                os.unlink(entry.path)
    remove_stale_temps(path, since)
