"""Fast implementations of the BFT operator (imported for their backend registration)."""
from . import cpu  # noqa: F401
