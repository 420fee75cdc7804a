"""Model zoo: MobileNetV1/V2/V3 and ShuffleNetV2, baselines and BFT, in timm's registry.

Importing ``butterfly`` registers the models; build them with ``timm.create_model(name, ...)``.
``small_input=True`` adapts any of them to 28x28 / 32x32 images (stride-1 stem).
"""
# importing a family registers its models with timm
from . import mobilenetv1, mobilenetv2, mobilenetv3, shufflenetv2  # noqa: F401
from .builder import registered_models
from .layers import create_pointwise

__all__ = ["create_pointwise", "registered_models"]
