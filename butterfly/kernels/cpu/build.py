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
import shutil
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

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
    base = ["-O3", "-ffp-contract=fast"]
    return [base + native + ["-fopenmp"], base + ["-fopenmp"], base]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Lines of a failed build that state its cause (the compiler's diagnostics, the shell's), as
# opposed to the command lines ninja echoes.
_CAUSES = ("error:", "fatal error", "not found", "no such file", "cannot find", "undefined reference",
           "unrecognized", "unknown argument", "permission denied")


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
    """The cache entry of a build: a digest of the host CPU, the flags and the sources' names and
    contents (not their paths: identical checkouts share an entry)."""
    digest = hashlib.sha1(cpu_info()["flags"].encode() + " ".join(flags).encode())
    for p in sources:
        digest.update(p.relative_to(_source_dir()).as_posix().encode() + p.read_bytes())
    return f"butterfly_cpu_{digest.hexdigest()[:12]}"


def _announce(build_dir: Path) -> None:
    """Say once per process that the kernel is being compiled, and where it is cached."""
    if not _state.get("announced"):
        _state["announced"] = True
        print(f"butterfly: compiling the fused CPU kernel (first use; about a minute), cached in "
              f"{build_dir}", file=sys.stderr, flush=True)


def _build_one(flags: List[str], sources: Sequence[Path], cpp_extension) -> str:
    """Build (or load from the cache) the extension for one flag set; returns its name.

    A library is loaded only if its SHA-256 is the one recorded when it was built: a truncated or
    foreign file (loading one can kill the process with SIGBUS) is deleted and relinked from the
    entry's objects, and if that fails the entry is rebuilt from scratch."""
    name = _entry_name(flags, sources)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    library, record = build_dir / f"{name}.so", build_dir / "library.sha256"
    if library.exists() and not (record.exists() and record.read_text() == _file_digest(library)):
        library.unlink()
        record.unlink(missing_ok=True)
    # Build from a copy inside the cache entry: the same paths for every checkout, so identical
    # sources share one build instead of rebuilding whenever another checkout used the entry.
    src_copy = build_dir / "src"
    src_copy.mkdir(exist_ok=True)
    root = _source_dir()
    for p in sources:
        dst = src_copy / p.relative_to(root)
        if not dst.exists() or dst.read_bytes() != p.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
    rebuilt = not library.exists()
    if rebuilt:
        _announce(build_dir)

    def load() -> None:
        cpp_extension.load(name, [str(src_copy / p.relative_to(root)) for p in sources
                                 if p.suffix == ".cpp"],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"] if "-fopenmp" in flags
                           else [], extra_include_paths=[str(src_copy)],
                           build_directory=str(build_dir), is_python_module=False, verbose=False)

    try:
        load()
    except Exception:  # e.g. a damaged object file: start the entry afresh
        if not rebuilt or not any(build_dir.glob("*.o")):
            raise
        for path in build_dir.iterdir():
            if path.is_file() and path.name != "lock":
                path.unlink()
        load()
    if rebuilt or not record.exists():
        record.write_text(_file_digest(library))
    return name


def _build() -> str:
    sources = _sources()
    with _quiet_cpp_extension() as cpp_extension:
        problem = _toolchain_problem(cpp_extension)
        if problem:
            raise RuntimeError(problem)
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
                    f"with OpenMP and ninja (docs/kernel_cpu.md), or set {DISABLE_ENV}=1")
        return _state.get("library")


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
