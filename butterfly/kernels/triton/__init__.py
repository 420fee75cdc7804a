"""The "triton" backend: the GPU kernels (:mod:`.kernels`) and their launch code (:mod:`.bft`).

Importing this package never fails because of the installed Triton: when Triton is missing, too
old, or breaks while the kernels are defined, the "triton" backend is registered as unavailable
and its ``unavailable(device)`` says why (``use_backend("auto")`` then skips it; choosing it
explicitly raises that reason). ``IMPORT_ERROR`` holds the reason ('' when the kernels loaded).
"""
import torch

from ...ops.dispatch import Backend, register_backend

# The oldest releases the kernels and their launch code are built and tested with (see
# docs/kernel_gpu.md): Triton's frontend features (constexpr_function, tuples of tensors,
# split/join/permute) and torch.library.wrap_triton / triton_op.
MIN_TRITON = (3, 4)
MIN_TORCH = (2, 6)

IMPORT_ERROR = ""


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _why_not(triton) -> str:
    """Why the installed Triton cannot run the kernels, checked before they are defined ('' when
    it can)."""
    version = getattr(triton, "__version__", "unknown")
    if version == "unknown" or _version(version) < MIN_TRITON:
        return (f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest "
                "release the kernels build with; upgrade it (pip install -U triton)")
    if not hasattr(triton, "constexpr_function") and \
            not hasattr(getattr(triton, "language", None), "constexpr_function"):
        return f"triton {version} has no constexpr_function, which the kernels use"
    if not hasattr(torch.library, "wrap_triton"):
        return (f"torch {torch.__version__} has no torch.library.wrap_triton (torch >= "
                f"{'.'.join(map(str, MIN_TORCH))} launches Triton kernels inside operators)")
    return ""


def _register_unavailable(reason: str) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError(f"the 'triton' BFT backend cannot run: {reason}")

    register_backend(Backend("triton", refuse, refuse, lambda device: reason, degrades=False,
                             auto_devices=("cuda",), auto_priority=20))


try:
    import triton as _triton
    IMPORT_ERROR = _why_not(_triton)
except Exception as _error:  # not installed, or broken at import
    IMPORT_ERROR = (f"triton cannot be imported ({type(_error).__name__}: {_error}); "
                    "pip install triton")
if not IMPORT_ERROR:
    try:
        from . import bft  # noqa: F401  (registers the backend and its fused form)
    except Exception as error:  # a Triton whose frontend rejects the kernels at definition
        IMPORT_ERROR = (f"the kernels failed to load with this triton "
                        f"({type(error).__name__}: {error})")
if IMPORT_ERROR:
    _register_unavailable(IMPORT_ERROR)
