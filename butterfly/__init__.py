"""butterfly: the Butterfly Transform (BFT) as a fast, drop-in PyTorch layer."""
from .conversion import convert, from_dense
from .deploy import densify, optimize_for_inference
from .export import export_onnx
from .modules import BFT, BFTLinear, is_bft
from .ops import available_backends, bft, current_backend, use_backend
from .plan import BFTPlan, make_plan
from .surgery import param_groups, replace_pointwise

__all__ = ["BFT", "BFTLinear", "BFTPlan", "available_backends", "bft", "convert", "current_backend",
           "densify", "export_onnx", "from_dense", "is_bft", "make_plan", "optimize_for_inference",
           "param_groups", "replace_pointwise", "use_backend"]
__version__ = "0.1.0"

from . import kernels  # noqa: E402,F401  (registers the compiled backends with the operator)
from . import models  # noqa: E402,F401  (registers the timm models)
