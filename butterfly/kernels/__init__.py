"""Fast implementations of the BFT operator (imported for their backend registration)."""
from . import cpu  # noqa: F401
from . import cpu_fused  # noqa: F401
try:  # triton is optional: without it there is no "triton" backend
    from . import triton_bft  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != "triton":
        raise
