"""The layers: :class:`BFT` and :class:`BFTLinear` (:mod:`.bft`; their inits in :mod:`.init`, their
fit to a dense layer in :mod:`.factorization`) and :class:`DepthwiseConv2d` (:mod:`.depthwise`)."""
from .bft import BFT, BFTLinear, dense_equivalent, is_bft
from .depthwise import DepthwiseConv2d

__all__ = ["BFT", "BFTLinear", "DepthwiseConv2d", "dense_equivalent", "is_bft"]
