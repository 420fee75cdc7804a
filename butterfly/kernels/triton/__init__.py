"""The "triton" backend: the GPU kernels (:mod:`.kernels`) and their launch code (:mod:`.bft`)."""
from . import bft  # noqa: F401  (registers the backend and its fused form)
