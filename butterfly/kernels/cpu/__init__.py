"""The "cpu" backend: C++ kernels (``csrc/``) built on first use (:mod:`.build`), their fake
implementations (:mod:`.fakes`) and their registration with the operators (:mod:`.bft`)."""
from . import bft  # noqa: F401  (registers the backend and its fused form)
from .build import DISABLE_ENV, KERNEL_DTYPES, cpu_info, load_extension, reset, unavailable

__all__ = ["DISABLE_ENV", "KERNEL_DTYPES", "cpu_info", "load_extension", "reset", "unavailable"]
