"""``python -m butterfly.kernels.cpu``: build (or load from the cache) the CPU kernels now, and say
where they are or why they cannot be built. Exits 1 when they are unavailable."""
import sys

from .build import _state, load_extension

name = load_extension()
if name is None:
    print(f"butterfly: {_state['error']}", file=sys.stderr)
    sys.exit(1)
print(f"butterfly: CPU kernels loaded ({name})")
