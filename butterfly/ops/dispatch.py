"""The backend registry and the one policy that picks an implementation for every operator.

A :class:`Backend` implements the BFT operator and says what it cannot run; other operators
(depthwise, fused BatchNorm, the fused forms) ask :func:`backend_for` which backend runs a call and
use that backend's kernels. :func:`use_backend` chooses; ``"auto"`` picks the fastest available for
the tensor's device. Backends register themselves (``butterfly/kernels/``); operators never import
one. A backend may also register prepared forms of the fused inference layers
(:func:`register_prepared`): objects built once per layer that run its operator's computation
without the dispatcher, for the eager calls of ``butterfly.passes.fuse``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor


Forward = Callable[[Tensor, Tensor, List[int], int, bool], Tensor]
Backward = Callable[[Tensor, Tensor, Tensor, List[int], int, bool], Tuple[Tensor, Tensor]]


class BackendFallbackWarning(RuntimeWarning, UserWarning):
    """A chosen backend could not run a call, so the reference ran it (same result, slower)."""


def _runs_anywhere(*args) -> str:
    return ""


@dataclass
class Backend:
    """An implementation of the operator, and what it cannot run.

    ``unavailable(device)`` says why the backend cannot run on tensors of that device at all
    (``""`` when it can): a missing compiler, a device it has no kernels for. ``unsupported(x,
    weight, radices)`` says why it cannot run one call (a dtype, a plan). :func:`backend_for` alone
    acts on these answers. ``degrades``: when the backend is unavailable but was chosen
    explicitly, run the reference with a warning instead of raising (for a backend whose absence
    is an installation problem, not a user error). "auto" considers the backends whose
    ``auto_devices`` name the device type, highest ``auto_priority`` first."""

    name: str
    forward: Forward
    backward: Backward
    unavailable: Callable[[torch.device], str] = _runs_anywhere
    unsupported: Callable[[Tensor, Tensor, Sequence[int]], str] = _runs_anywhere
    degrades: bool = True
    auto_devices: Tuple[str, ...] = ()
    auto_priority: int = 0


_BACKENDS: Dict[str, Backend] = {}
_selected: contextvars.ContextVar[str] = contextvars.ContextVar("butterfly_backend", default="auto")
_warned: Set[Tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> List[str]:
    return ["auto", *_BACKENDS]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the BFT operator with one implementation inside the ``with`` block.

    ``"reference"`` (pure PyTorch), ``"cpu"`` (fused C++ kernel), ``"triton"`` (GPU kernel, or CPU
    under ``TRITON_INTERPRET=1``) or ``"auto"`` (the fastest available for the tensor's device).

    ``torch.compile`` bakes the chosen backend's kernels into the graph it traces, and guards the
    graph on this choice: under another choice the function is traced again (a recompile), so a
    compiled model runs the backend selected around each call, like an eager one."""
    if name not in available_backends():
        raise ValueError(f"unknown BFT backend {name!r}; choose one of {available_backends()}")
    token = _selected.set(name)
    try:
        yield
    finally:
        _selected.reset(token)


def current_backend() -> str:
    return _selected.get()


_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             os.path.dirname(torch.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside butterfly and torch (the line of the user's
    code that ran the layer), for a warning raised by the caller of this function."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _warn_once(backend: Backend, reason: str) -> None:
    if (backend.name, reason) not in _warned:
        _warned.add((backend.name, reason))
        warnings.warn(f"butterfly: the {backend.name!r} BFT backend cannot run this: {reason}. "
                      "Running the pure-PyTorch reference instead: the same results, slower.",
                      BackendFallbackWarning, stacklevel=_user_stacklevel())


def forget_warnings() -> None:
    """Let every fallback warn again (after the environment changed, e.g. a kernel was rebuilt)."""
    _warned.clear()


def backend_for(device: torch.device, x: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                radices: Sequence[int] = ()) -> Backend:
    """The backend that runs on ``device`` (and, given ``x`` and ``weight``, that call) under the
    current :func:`use_backend` choice; the one place that decides fallbacks.

    "auto" takes the first backend in its ranking that can run, skipping silently those with no
    kernels for the device. Otherwise each fallback to the reference warns once per reason; an
    explicitly chosen backend with no kernels for the device (``degrades=False``) raises."""
    name, reference = _selected.get(), _BACKENDS["reference"]
    if name == "auto":
        candidates = sorted((b for b in _BACKENDS.values() if device.type in b.auto_devices),
                            key=lambda b: -b.auto_priority)
    else:
        candidates = [_BACKENDS[name]]
    for backend in candidates:
        reason = backend.unavailable(device)
        if reason and not backend.degrades:
            if name == "auto":
                continue
            raise RuntimeError(f"the {name!r} BFT backend cannot run here: {reason}")
        if not reason and x is not None:
            reason = backend.unsupported(x, weight, radices)
        if not reason:
            return backend
        _warn_once(backend, reason)
    return reference




def kernels_loaded(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` is registered and can run on ``device`` (builds or loads its
    kernels on first use)."""
    backend = _BACKENDS.get(name)
    return backend is not None and not backend.unavailable(device)


_PREPARED: Dict[Tuple[str, str], Callable] = {}


def register_prepared(backend: str, operator: str, prepare: Callable) -> None:
    """Give backend ``backend`` a prepared form of fused inference layers of operator
    ``operator`` (``"bft_fused"``, ``"depthwise_conv"``, ``"dw_bft_fused"``): ``prepare(...)``
    checks a layer's arguments once and returns a callable that computes what the operator
    computes (the fused layers of :mod:`butterfly.passes.fuse` say what they pass)."""
    _PREPARED[(backend, operator)] = prepare


def prepared(backend: str, operator: str) -> Optional[Callable]:
    """The ``prepare`` that backend ``backend`` registered for ``operator``, or None."""
    return _PREPARED.get((backend, operator))
