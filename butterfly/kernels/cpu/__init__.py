"""The "cpu" backend: C++ kernels (``csrc/``) built on first use (:mod:`.build`), their fake
implementations (:mod:`.fakes`), their registration with the operators (:mod:`.bft`), and the
prepared inference layers of the extension's Python module (:func:`native`)."""
from . import bft  # noqa: F401  (registers the backend and its fused form)
from .build import (DISABLE_ENV, KERNEL_DTYPES, cpu_info, load_extension, native, reset,
                    unavailable)

__all__ = ["DISABLE_ENV", "KERNEL_DTYPES", "cpu_info", "load_extension", "native", "reset", "unavailable"]
