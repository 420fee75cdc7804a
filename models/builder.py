"""The one builder and registration guard behind every ``@register_model`` function of the zoo."""
from __future__ import annotations

import warnings
from typing import Callable, Type

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, is_model, register_model
from torch import nn

_REGISTERED: list = []


def untrained_cfg(**overrides) -> dict:
    """timm pretrained-cfg for a model without published weights (ImageNet input pipeline)."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv", "classifier": "classifier",
            "license": "mit", **overrides}


def build(model_cls: Type[nn.Module], variant: str, pretrained: bool = False,
          **kwargs) -> nn.Module:
    """Build ``variant`` with timm's ``build_model_with_cfg``; ``kwargs`` go to ``model_cls``.

    ``features_only=True`` (with ``out_indices``, default all five maps, and ``feature_cls``) is
    timm's: the model is wrapped in ``FeatureListNet`` by default, which runs the model's
    top-level modules with its ``nn.Sequential`` containers (``blocks``, ``stages``) flattened,
    up to the last ``feature_info`` module selected; ``feature_cls`` ``"dict"``, ``"hook"``,
    ``"getter"`` (``forward_intermediates``) and ``"fx"`` work as well."""
    if pretrained:
        raise RuntimeError(
            f"no pretrained weights are published for {variant!r}: create it with pretrained=False "
            "and train it (see train/), or load your own checkpoint with model.load_state_dict()")
    return build_model_with_cfg(model_cls, variant, pretrained=False,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


def register(fn: Callable) -> Callable:
    """timm's ``register_model``, except that a name timm already owns is never overwritten:
    the existing model keeps the name and a warning says ours was skipped."""
    if is_model(fn.__name__):
        warnings.warn(f"timm already registers a model named {fn.__name__!r}; butterfly keeps "
                      f"timm's and does not register its own", stacklevel=2)
        return fn
    _REGISTERED.append(fn.__name__)
    return register_model(fn)


def registered_models() -> list:
    """Names of the models butterfly registered with timm, in registration order."""
    return list(_REGISTERED)
