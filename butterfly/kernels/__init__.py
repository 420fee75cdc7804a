"""The backends: each registers itself with the operators of :mod:`butterfly.ops` on import."""
from . import cpu  # noqa: F401
try:  # triton is optional: without it there is no "triton" backend
    from . import triton  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != "triton":
        raise
