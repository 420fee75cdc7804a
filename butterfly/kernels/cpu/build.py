"""The "cpu" backend: the fused C++ kernel of ``csrc/bft_cpu.cpp``.

The kernel is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, ``-O3
-march=native -fopenmp``), which says once on stderr that it is compiling and where it caches. The
cache is torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); an entry is named by a digest of the sources, the flags and the
host CPU, and built from a copy of the sources inside it, so identical checkouts share one build.
A cached library is checked against the digest recorded when it was built before it is loaded (a
truncated or foreign file is relinked or rebuilt, never loaded). If the kernel cannot be built (no C++
compiler, no OpenMP, ...) or ``BUTTERFLY_DISABLE_CPU_KERNEL=1`` is set, the backend says why and the
operator runs the pure-PyTorch reference instead (:func:`butterfly.ops.backend_for` warns once):
the same results, slower.

The kernel computes float32 (bfloat16 and float16 inputs accumulate in float32) and float64; other
dtype combinations (a float64 weight with a non-float64 input) run the reference. The kernel
registers the operators ``butterfly_cpu::forward`` and ``butterfly_cpu::backward`` (C++,
``TORCH_LIBRARY``); this module adds their fake implementations, so ``torch.compile`` can trace
them. The backend calls them directly, without a Python ``custom_op`` wrapper in between (which
costs tens of microseconds per call).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

try:
    import fcntl
except ImportError:  # Windows: no OS file lock; torch's own build lock still applies
    fcntl = None

from ...ops.dispatch import forget_warnings
from .fakes import register_fake_kernels

DISABLE_ENV = "BUTTERFLY_DISABLE_CPU_KERNEL"
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

_lock = threading.Lock()
_state: dict = {}  # "library": name of the loaded extension, or "error": why there is none


def cpu_info() -> Dict[str, str]:
    """The host CPU from ``/proc/cpuinfo`` (Linux), else from :mod:`platform`: ``model`` and the
    ``flags`` line (empty when unknown)."""
    info = {"model": platform.processor() or platform.machine(), "flags": ""}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and "model name" not in info:
                    info["model name"] = info["model"] = value.strip()
                elif key == "flags" and not info["flags"]:
                    info["flags"] = value.strip()
    except OSError:
        pass
    info.pop("model name", None)
    return info


def _disabled() -> bool:
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        raise ValueError(f"{DISABLE_ENV}={os.environ[DISABLE_ENV]!r} is not understood: set it to 1 "
                         "(use the pure-PyTorch reference) or 0 / unset it (use the kernel)")
    return False


def _source_dir() -> Path:
    """``csrc/``: the ``butterfly.csrc`` package data of an install, or the checkout's folder."""
    try:
        spec = importlib.util.find_spec("butterfly.csrc")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if any(Path(location).rglob("*.cpp")):
            return Path(location)
    return Path(__file__).resolve().parents[2] / "csrc"  # an editable install made before csrc/


def _compile_flags() -> List[List[str]]:
    """Flag sets to try, best first: a compiler or platform that rejects one gets the next."""
    if sys.platform == "win32":
        return [["/O2", "/openmp"], ["/O2"]]
    native = ["-march=native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        native.append("-mprefer-vector-width=512")
    base, omp = ["-O3", "-ffp-contract=fast"], ["-fopenmp"]
    # OpenMP and -march=native are each optional: a compiler without one still gets the other
    return [base + native + omp, base + native, base + omp, base]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Lines of a failed build that state its cause (the compiler's diagnostics, the shell's), as
# opposed to the command lines ninja echoes.
_CAUSES = ("error:", "fatal error", "not found", "no such file", "cannot find", "undefined reference",
           "unrecognized", "unknown argument", "permission denied")


# A compiler's diagnostic of an error in one of the sources (``file.cpp:12:3: error: ...``).
_SOURCE_ERROR = re.compile(r"\.(?:cpp|h):\d+:(?:\d+:)? (?:fatal )?error:")


def _first_error_line(text: str, limit: int = 240) -> str:
    """The cause of a failed build in one line (at most ``limit`` characters): the compiler's or
    the shell's own diagnostic (``file:line: error: ...``, ``/bin/sh: 1: g++: not found``), not
    the command lines the build echoes; else the last short line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    short = [ln for ln in lines if len(ln) < 2 * limit and not ln.startswith(("[", "FAILED:"))]
    why = next((ln for ln in short if any(c in ln.lower() for c in _CAUSES)),
               short[-1] if short else lines[-1] if lines else "unknown error")
    return why if len(why) <= limit else why[:limit] + " ..."


@contextlib.contextmanager
def _quiet_cpp_extension():
    """``torch.utils.cpp_extension`` without its log warnings ("No CUDA runtime is found" on import;
    a compiler other than the one PyTorch was built with): this backend builds for the CPU only
    and states its own errors."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension  # noqa: PLC0415  (imported quietly, on first use)
        yield cpp_extension
    finally:
        logger.setLevel(level)


def _toolchain_problem(cpp_extension) -> str:
    """Why no build can start ('' when one can): a missing C++ compiler or ninja."""
    cxx = os.environ.get("CXX", "").strip()
    compiler = cxx or cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        where = f"CXX={cxx!r} is not an executable" if cxx else f"{compiler!r} is not on PATH"
        return f"no C++ compiler: {where}"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return ""


def _sources() -> List[Path]:
    """Every ``.cpp`` and ``.h`` under ``csrc/`` (recursively), sorted; one extension of them all."""
    src = _source_dir()
    sources = sorted(p for p in src.rglob("*") if p.suffix in (".cpp", ".h"))
    if not any(p.suffix == ".cpp" for p in sources):
        raise FileNotFoundError(f"no C++ sources in {src}; reinstall butterfly-transform")
    return sources


def _entry_name(flags: Sequence[str], sources: Sequence[Path]) -> str:
    """The cache entry of a build: a digest of the host CPU, the flags, the torch build it links
    against, and the sources' names and contents (not their paths: identical checkouts share an
    entry)."""
    torch_build = f"{torch.__version__} {torch.version.git_version}"
    digest = hashlib.sha1(cpu_info()["flags"].encode() + " ".join(flags).encode() +
                          torch_build.encode())
    for p in sources:
        digest.update(p.relative_to(_source_dir()).as_posix().encode() + p.read_bytes())
    return f"butterfly_cpu_{digest.hexdigest()[:12]}"


def _verified(library: Path, record: Path) -> bool:
    """Whether ``library`` is the finished build its entry recorded (its SHA-256 in ``record``)."""
    try:
        return library.is_file() and record.read_text() == _file_digest(library)
    except OSError:
        return False


@contextlib.contextmanager
def _entry_lock(build_dir: Path) -> Iterator[None]:
    """Hold the cache entry for this process while it builds: other processes wait (and say so).

    An OS file lock, released when the holder exits however it exits; so a build that was killed
    leaves no lock behind, and the ``lock`` file that torch's own build step leaves then is stale
    and removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "butterfly.lock", "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"butterfly: another process is compiling the CPU kernels in {build_dir}; "
                      "waiting for it", file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _ninja_dir() -> Optional[str]:
    """The folder of the ninja that belongs to this Python environment (pip's ``ninja``), if any.

    Every build of an entry must run the same ninja: two ninja versions read each other's
    ``.ninja_log`` as "command line changed" and recompile everything."""
    candidates = []
    try:
        import ninja  # noqa: PLC0415  (optional: only to find its binary)
        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    candidates.append(Path(sys.executable).parent)
    for folder in candidates:
        if any((folder / exe).is_file() for exe in ("ninja", "ninja.exe")):
            return str(folder)
    return None


@contextlib.contextmanager
def _environment_ninja() -> Iterator[None]:
    """``PATH`` with this environment's ninja first, for the duration of a build."""
    folder, path = _ninja_dir(), os.environ.get("PATH", "")
    if folder is not None:
        os.environ["PATH"] = folder + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


class _Progress:
    """Says on stderr that the kernels are being compiled, one line per finished file, and the
    total time: a first build takes minutes, and a silent one looks like a hang."""

    def __init__(self, build_dir: Path, sources: Sequence[Path]):
        self.build_dir, self.total = build_dir, len(sources)
        self.done: set = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _say(self, text: str) -> None:
        print(f"butterfly: {text}", file=sys.stderr, flush=True)

    def _finished(self) -> set:
        return {p.name for p in self.build_dir.glob("*.o") if p.stat().st_mtime >= self.start}

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            for name in sorted(self._finished() - self.done):
                self.done.add(name)
                self._say(f"[{len(self.done)}/{self.total}] {name} "
                          f"({time.monotonic() - self.clock:.0f} s)")

    def __enter__(self) -> "_Progress":
        self.start, self.clock = time.time() - 1, time.monotonic()
        self._say(f"compiling the CPU kernels ({self.total} files; first use only, cached in "
                  f"{self.build_dir})")
        self.thread.start()
        return self

    def __exit__(self, kind, *rest) -> None:
        self.stop.set()
        self.thread.join()
        if kind is None:
            self._say(f"CPU kernels ready ({time.monotonic() - self.clock:.0f} s)")


def _build_one(flags: List[str], sources: Sequence[Path], cpp_extension) -> str:
    """Load the extension for one flag set from its cache entry, building it first if needed;
    returns its name.

    A finished entry is loaded directly, without running ninja: the entry's name is already the
    digest of everything the build depends on, and the library is loaded only if its SHA-256 is
    the one recorded when it was built (a truncated or foreign file, which can kill the process
    with SIGBUS, is relinked from the entry's objects, or the entry rebuilt)."""
    name = _entry_name(flags, sources)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    library, record = build_dir / f"{name}.so", build_dir / "library.sha256"
    if _verified(library, record):
        _load_library(name, library)
        return name
    with _environment_ninja():
        problem = _toolchain_problem(cpp_extension)
    if problem:   # leave no empty entry behind
        with contextlib.suppress(OSError):
            build_dir.rmdir()
        raise RuntimeError(problem)
    with _entry_lock(build_dir):
        if _verified(library, record):  # another process finished it while we waited
            _load_library(name, library)
            return name
        library.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        # Build from a copy inside the cache entry: the same paths for every checkout, so
        # identical sources share one build.
        root, src_copy = _source_dir(), build_dir / "src"
        for p in sources:
            dst = src_copy / p.relative_to(root)
            if not dst.exists() or dst.read_bytes() != p.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
        cpp = [src_copy / p.relative_to(root) for p in sources if p.suffix == ".cpp"]

        def load() -> None:
            cpp_extension.load(name, [str(p) for p in cpp], extra_cflags=flags,
                               extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                               extra_include_paths=[str(src_copy)],
                               build_directory=str(build_dir), is_python_module=False,
                               verbose=False)

        with _environment_ninja(), _Progress(build_dir, cpp):
            try:
                load()
            except Exception as exc:  # e.g. a damaged object file: start the entry afresh
                # a source that does not compile fails again: its diagnostic is the cause
                if not any(build_dir.glob("*.o")) or _SOURCE_ERROR.search(str(exc)):
                    raise
                for path in build_dir.iterdir():
                    if path.is_file() and path.name not in ("lock", "butterfly.lock"):
                        path.unlink()
                load()
        staged = record.with_suffix(".tmp")
        staged.write_text(_file_digest(library))
        os.replace(staged, record)
        _load_library(name, library)
    return name


def _load_library(name: str, library: Path) -> None:
    """Loads the library as the Python module ``name`` (which also registers its operators) and
    keeps the module (:func:`native`)."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    _state["module"] = module


def _build() -> str:
    sources = _sources()
    with _quiet_cpp_extension() as cpp_extension:
        errors: Dict[str, List[str]] = {}
        for flags in _compile_flags():
            try:
                return _build_one(flags, sources, cpp_extension)
            except Exception as exc:  # any build failure means: try the next flags
                errors.setdefault(_first_error_line(str(exc)), []).append(" ".join(flags))
    if len(errors) == 1:  # the same cause for every flag set
        raise RuntimeError(next(iter(errors)))
    raise RuntimeError("; ".join(f"with {' or '.join(f)}: {why}" for why, f in errors.items()))


def load_extension() -> Optional[str]:
    """Build (first call only) and load the kernel; the extension's name, or ``None`` if it is
    unavailable (:func:`unavailable` says why)."""
    with _lock:
        if "library" in _state or "error" in _state:
            return _state.get("library")
        if _disabled():
            _state["error"] = (f"the fused CPU kernel is unavailable (disabled by the environment "
                               f"variable {DISABLE_ENV}); to use it, unset {DISABLE_ENV}")
        else:
            try:
                _state["library"] = _build()
                register_fake_kernels()
            except Exception as exc:
                _state["error"] = (
                    f"the fused CPU kernel could not be built ({exc}); install a C++20 compiler "
                    f"and ninja (docs/kernel_cpu.md), or set {DISABLE_ENV}=1")
        return _state.get("library")


def native():
    """The extension's Python module (its prepared inference layers, ``csrc/bft/prepared.cpp``),
    or ``None`` when the kernels are unavailable."""
    load_extension()
    return _state.get("module")


def reset() -> None:
    """Forget the load attempt, so the next use builds or loads again (and may warn again)."""
    with _lock:
        _state.clear()
    forget_warnings()


def unavailable(device: torch.device) -> str:
    """Why the kernel cannot run on ``device`` ('' when it can)."""
    if device.type != "cpu":
        return f"it has no kernels for {device.type} tensors"
    load_extension()
    return _state.get("error", "")
