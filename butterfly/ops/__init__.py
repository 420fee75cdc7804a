"""The operators, one file each with its schema, fake, autograd, FLOP formula and reference, and
:mod:`.dispatch`, the one policy that picks their implementation.

* :mod:`.bft`: ``butterfly::bft``, the transform (reference: :mod:`.reference`);
* :mod:`.bft_fused`: ``butterfly::bft_fused``, the BFT with a fixed epilogue (scale, shift,
  activation, add), and the one activation list;
* :mod:`.depthwise`: ``butterfly::depthwise_conv``;
* :mod:`.batch_norm_act`: ``butterfly::batch_norm_act``, training BatchNorm + activation;
* :mod:`.dw_bft_fused`: ``butterfly::dw_bft_fused``, a depthwise conv then a BFT in one pass.
"""
from . import batch_norm_act, bft, bft_fused, depthwise, dw_bft_fused, reference  # noqa: F401
from .dispatch import (Backend, BackendFallbackWarning, available_backends, backend_for,
                       current_backend, register_backend, use_backend)

__all__ = ["Backend", "BackendFallbackWarning", "available_backends", "backend_for",
           "current_backend", "register_backend", "use_backend"]
