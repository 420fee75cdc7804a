"""The "cpu" backend: the fused C++ kernel of ``csrc/bft_cpu.cpp``.

The kernel is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, ``-O3
-march=native -fopenmp``) and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``); later processes only load the cached library. If it cannot be
built (no C++ compiler, no OpenMP, ...) or ``BUTTERFLY_DISABLE_CPU_KERNEL=1`` is set, the library
warns once and the operator runs the pure-PyTorch reference instead: the same results, slower.

The kernel computes float32 (bfloat16 and float16 inputs accumulate in float32) and float64; any
other input dtype, and a float64 weight with a non-float64 input, run the reference explicitly.
The kernel registers the operators ``butterfly_cpu::forward`` and ``butterfly_cpu::backward``
(C++, ``TORCH_LIBRARY``); this module adds their fake implementations, so ``torch.compile`` can
trace them. The backend calls them directly: a Python ``custom_op`` wrapper in between cost
50-90 us per call, 10% of a 256-channel layer's time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..ops import Backend, register_backend
from ..reference import bft_reference, bft_reference_backward

DISABLE_ENV = "BUTTERFLY_DISABLE_CPU_KERNEL"
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_state: dict = {}  # "library": name of the loaded extension, or "error": why there is none


def _source_dir() -> Path:
    """``csrc/``: the ``butterfly.csrc`` package data of an install, or the checkout's folder."""
    try:
        spec = importlib.util.find_spec("butterfly.csrc")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "bft_cpu.cpp").is_file():
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


def _cpu_fingerprint() -> str:
    """Identifies the host CPU, so a shared extension cache never serves a binary built for
    instructions this CPU lacks (``-march=native``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> str:
    from torch.utils import cpp_extension

    src = _source_dir()
    sources = sorted(src.glob("*.cpp")) + sorted(src.glob("*.h"))
    if not any(p.name == "bft_cpu.cpp" for p in sources):
        raise FileNotFoundError(f"bft_cpu.cpp is missing from {src}; reinstall butterfly-transform")
    errors = []
    for flags in _compile_flags():
        digest = hashlib.sha1(_cpu_fingerprint().encode() + " ".join(flags).encode())
        for p in sources:
            digest.update(p.read_bytes())
        name = f"butterfly_cpu_{digest.hexdigest()[:10]}"
        ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
        try:
            cpp_extension.load(name, [str(src / "bft_cpu.cpp")], extra_cflags=flags,
                               extra_ldflags=ldflags, extra_include_paths=[str(src)],
                               is_python_module=False, verbose=False)
            return name
        except Exception as exc:  # noqa: BLE001 - any build failure means: try the next flags
            lines = str(exc).strip().splitlines()
            # the compiler's own diagnostic ("file:line: error: ...") says most; else any error line
            why = next((ln.strip() for ln in lines if "error:" in ln),
                       next((ln.strip() for ln in lines if "error" in ln.lower()),
                            lines[-1] if lines else ""))
            errors.append(f"with flags {' '.join(flags)}: {why}")
    raise RuntimeError("; ".join(errors))


def load_extension() -> Optional[str]:
    """Build (first call only) and load the kernel; the extension's name, or ``None`` if it is
    unavailable, in which case a warning has said why (once per process)."""
    with _lock:
        if "library" in _state or "error" in _state:
            return _state.get("library")
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            _state["error"] = f"disabled by the environment variable {DISABLE_ENV}"
        else:
            try:
                _state["library"] = _build()
                _register_fake_kernels()
            except Exception as exc:  # noqa: BLE001
                _state["error"] = f"could not be built: {exc}"
        if "error" in _state:
            fix = (f"unset {DISABLE_ENV}" if "environment" in _state["error"] else
                   "install a C++20 compiler with OpenMP (e.g. `apt install g++`; on macOS the Xcode "
                   "command line tools and `brew install libomp`) and ninja (`pip install ninja`)")
            warnings.warn(
                f"butterfly: the fused CPU kernel is unavailable ({_state['error']}). BFT layers "
                "fall back to the pure-PyTorch reference: the same results, several times slower. "
                f"To use the kernel, {fix}.", RuntimeWarning, stacklevel=3)
        return _state.get("library")


def reset() -> None:
    """Forget the load attempt, so the next use builds or loads again (and may warn again)."""
    with _lock:
        _state.clear()


def _available(device: torch.device) -> bool:
    return device.type == "cpu" and load_extension() is not None


_fakes_registered = False


def _register_fake_kernels() -> None:
    """Output shapes of the C++ operators for FakeTensor tracing (``torch.compile``); once per
    process, after the library has registered the operators."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("butterfly_cpu::forward")
    def _(x, weight, radices, out_channels, residual):
        return x.new_empty(x.shape[0], out_channels, x.shape[2])

    @torch.library.register_fake("butterfly_cpu::backward")
    def _(grad, x, weight, radices, out_channels, residual):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    _fakes_registered = True


def _kernel_weight(x: Tensor, weight: Tensor) -> Optional[Tensor]:
    """The weight in the kernel's compute dtype, or ``None`` when the kernel does not take this
    dtype combination (the reference runs instead)."""
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        return None
    if x.dtype == torch.float64:
        return weight.to(torch.float64)
    if weight.dtype == torch.float64:  # the reference would compute in float64
        return None
    return weight.to(torch.float32)


def _forward(x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
             residual: bool) -> Tensor:
    w = _kernel_weight(x, weight)
    if w is None:
        return bft_reference(x, weight, radices, out_channels, residual)
    return torch.ops.butterfly_cpu.forward(x.contiguous(), w, radices, out_channels, residual)


def _backward(grad: Tensor, x: Tensor, weight: Tensor, radices: List[int], out_channels: int,
              residual: bool) -> Tuple[Tensor, Tensor]:
    w = _kernel_weight(x, weight)
    if w is None:
        return bft_reference_backward(grad, x, weight, radices, out_channels, residual)
    grad_x, grad_w = torch.ops.butterfly_cpu.backward(
        grad.to(x.dtype).contiguous(), x.contiguous(), w, radices, out_channels, residual)
    return grad_x, grad_w.to(weight.dtype)


register_backend(Backend("cpu", _forward, _backward, _available, auto_devices=("cpu",),
                         auto_priority=10))
