"""butterfly: the Butterfly Transform (BFT) as a fast, drop-in PyTorch layer.

Packages, dependencies running one way: ``plan`` <- ``ops`` (the operators and the dispatch policy)
<- ``kernels`` (backends that register themselves with ``ops``) ; ``ops`` <- ``nn`` (the layers)
<- ``passes`` (network rewrites) ; ``flops`` and ``optim`` on top. ``butterfly.models`` is the zoo.
"""
from pathlib import Path as _Path

# A source checkout used without installing it (e.g. a snapshot a long run works from):
# ``butterfly.models`` and ``butterfly.csrc`` are the checkout's ``models/`` and ``csrc/``, as
# the install maps them (pyproject.toml). Searched before any installed copy's mapping.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "models" / "builder.py").is_file():
    __path__.append(str(_checkout))

from . import kernels  # noqa: F401  (registers the compiled backends with the operators)
from . import flops  # noqa: F401
from .nn import BFT, BFTLinear, is_bft
from .ops import available_backends, current_backend, use_backend
from .ops.bft import bft
from .optim import param_groups
from .passes import convert, densify, export_onnx, from_dense, optimize_for_inference
from .passes import replace_pointwise
from .plan import BFTPlan, make_plan

__all__ = ["BFT", "BFTLinear", "BFTPlan", "available_backends", "bft", "convert", "current_backend",
           "densify", "export_onnx", "from_dense", "is_bft", "make_plan", "optimize_for_inference",
           "param_groups", "replace_pointwise", "use_backend"]
__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the timm models; they use the names above)
