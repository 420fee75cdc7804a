"""The backends: each registers itself with the operators of :mod:`butterfly.ops` on import.
The "triton" backend's import never fails: without a usable Triton it registers as unavailable."""
from . import cpu  # noqa: F401
from . import triton  # noqa: F401
