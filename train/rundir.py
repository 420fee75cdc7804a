"""The run folder (``--output``): refused when it would clobber an earlier run, checked for
writability before any work, held by one run at a time, and kept free of the temporary files a
killed run leaves behind.

Every file of a run is written to ``.<name>.tmp<pid>`` in the same folder and renamed over
``<name>`` (:func:`write_atomic`); a kill between the two leaves the temporary file, which the next
run removes, and a full disk leaves the previous file and an error that says so.

A run holds an exclusive lock (``flock``) on ``.train.lock`` in its folder from its start to its
end; the kernel drops it when the process ends, however it ends. A second run in the same folder
fails at once instead of writing over the first one's files.

The files a run writes before its first checkpoint (``args.yaml``, TensorBoard events) do not make
the folder "hold a run" when no checkpoint or metrics file is beside them: such a run stopped
before it had anything to resume or report (a bad image, a kill in the first epoch), so the next
run may use the folder and replaces them.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import IO, Callable, List, Optional

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "metrics.json", "args.yaml")
LOCK_FILE = ".train.lock"
# Written only once a checkpoint is: their presence means the folder holds a run.
CHECKPOINTED = ("last.pth", "best.pth", "metrics.csv", "metrics.json")
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_log = logging.getLogger("train")


class OutputError(RuntimeError):
    """The output folder cannot be used: a file, not writable, holding or used by another run, or
    its disk is full."""


def temp_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _early_file(name: str) -> bool:
    return name == "args.yaml" or name.startswith("events.out.tfevents.")


def leftovers(path: str) -> List[str]:
    """The files in ``path`` of a run that stopped before its first checkpoint: ``args.yaml`` and
    TensorBoard events with no checkpoint or metrics file beside them (else none)."""
    try:
        entries = os.listdir(path)
    except OSError:
        return []
    if any(name in CHECKPOINTED for name in entries):
        return []
    return sorted(name for name in entries if _early_file(name))


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
        # A killed run's temporary files, its lock file and what a run that stopped before its
        # first checkpoint wrote do not make a run.
        ignored = set(leftovers(path)) | {LOCK_FILE}
        entries = sorted(e for e in os.listdir(path) if not _TEMP.match(e) and e not in ignored)
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


def lock(path: str) -> Optional[IO]:
    """Take the exclusive lock of the run folder ``path`` (it exists) for this process, or raise
    :class:`OutputError` naming the run that holds it. Returns the open lock file: the lock lasts
    until it is closed or the process ends. None where the file system has no locks."""
    if fcntl is None:
        return None
    name = os.path.join(path, LOCK_FILE)
    try:
        f = open(name, "a+")
    except OSError as err:
        raise OutputError(f"--output {path}: cannot create its lock file {LOCK_FILE} "
                          f"({err.strerror or err}); choose another --output") from err
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        busy = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        holder = ""
        if busy:
            f.seek(0)
            holder = f.read().strip()
        f.close()
        if not busy:  # e.g. a network file system without locks
            _log.warning("warning: --output %s cannot be locked (%s): nothing stops another run "
                         "from using it at the same time", path, err.strerror or err)
            return None
        raise OutputError(f"--output {path} is in use by another run ({holder or 'a process'} "
                          "holds its lock): two runs cannot share a folder. Wait for that run to "
                          "end, or choose another --output") from err
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def prepare(path: str, reuse: bool, overwrite: bool, since: float) -> Optional[IO]:
    """Create the run folder, prove it writable and lock it (before any data is read); then,
    under the lock, check again that it holds no other run (one may have ended meanwhile); with
    ``overwrite`` remove the earlier run's files (TensorBoard logs included); remove the leftovers
    of a run that stopped before its first checkpoint and stale temporary files. Returns the lock
    (see :func:`lock`), to be closed when the run ends."""
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
    held = lock(path)
    try:
        problem = output_problem(path, reuse)
        if problem:
            raise OutputError(problem)
        if overwrite:
            for entry in os.scandir(path):
                if entry.name in RUN_FILES or entry.name.startswith("events.out.tfevents."):
                    os.unlink(entry.path)
        early = leftovers(path)
        for name in early:
            os.unlink(os.path.join(path, name))
        if early:
            _log.info("removed %s, left in %s by a run that stopped before its first checkpoint",
                      ", ".join(early), path)
        remove_stale_temps(path, since)
    except BaseException:
        if held is not None:
            held.close()
        raise
    return held


# ------------------------------------------------------------------------------ writing files
def file_problem(path: str, option: str) -> Optional[str]:
    """Why the file ``path`` (given as ``option``) could not be written, or None: checked before
    any work, so that a long evaluation does not end in a failed write."""
    if os.path.isdir(path):
        return f"{option} {path} is a folder; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        return f"{option} {path} cannot be created: {existing} is a file, not a folder"
    if existing != folder:  # created when the file is written
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{option} {path} cannot be created: {existing} is not writable"
        return None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return (f"{option} {path}: its folder {folder} is not writable ({err.strerror or err}); "
                "choose another path")
    return None


def disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is a full disk or quota (ENOSPC, EDQUOT):
    torch.save reports one as a RuntimeError of its zip writer, chained to the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def no_space_message(path: str, needed: Optional[int] = None) -> str:
    """The message for a write of ``path`` that failed on a full disk."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free there now"
    except OSError:
        free = "free space unknown"
    need = f"; the file needs about {_size(needed)}" if needed else ""
    kept = (f"The previous {path} was kept intact" if os.path.exists(path)
            else f"No earlier {os.path.basename(path)} was there")
    if os.path.exists(path) and path.endswith(".pth"):
        kept += " (the last good checkpoint: --resume it once there is space)"
    return (f"the disk is full: {path} could not be written (no space left on the device of "
            f"{folder}, {free}{need}). {kept}. Free some space or choose another --output")


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False,
                 durable: bool = False, needed: Optional[int] = None) -> None:
    """Write ``path`` through ``write(file)`` into its temporary file, renamed over ``path`` at the
    end: a failure or kill leaves the previous file. ``durable``: fsync the file and the rename.
    A full disk is an :class:`OutputError` that says so (``needed``: the file's expected size)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if disk_full(err):
            raise OutputError(no_space_message(path, needed)) from err
        raise
    if durable:  # make the rename itself durable
        try:
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
