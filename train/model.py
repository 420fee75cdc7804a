"""Building a timm model for a dataset, and its cost (multiply-adds, parameters)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

import butterfly  # (registers the project's models with timm)

_log = logging.getLogger(__name__)


def create_model(name: str, num_classes: int, in_chans: int, small_input: bool = False,
                 drop_rate: Optional[float] = None) -> nn.Module:
    """``timm.create_model`` with the dataset's classes and channels. ``small_input=True`` asks for
    the small-input stem (the zoo's ``small_input`` option); a model that has no such option is
    built without it (its constructor rejects the keyword) and a log line says so."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if small_input:
        try:
            return timm.create_model(name, pretrained=False, small_input=True, **kwargs)
        except TypeError as err:
            if "small_input" not in str(err):
                raise
            _log.info("%s has no small-input stem; building it with its usual stem", name)
    return timm.create_model(name, pretrained=False, **kwargs)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one image (``input_size`` = (C, H, W)), counted as the papers count them."""
    from butterfly.flops import count_macs as _count
    return _count(model, input_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- --convert
def _layout(record: Any) -> Optional[Tuple[int, int, bool, Tuple[int, ...]]]:
    """``(in, out, residual, radices)`` from a BFT's saved layout ``[1, in, out, residual,
    *radices]`` (see ``butterfly.BFT.get_extra_state``), or None."""
    values = record.tolist() if isinstance(record, torch.Tensor) else record
    if not isinstance(values, (list, tuple)) or len(values) < 4 or values[0] != 1:
        return None
    cin, cout, residual, *radices = (int(v) for v in values[1:])
    return cin, cout, bool(residual), tuple(radices)


def converted_layouts(model: nn.Module, weights: Optional[Dict[str, Any]]
                      ) -> Dict[str, Tuple[int, int, bool, Tuple[int, ...]]]:
    """The dense layers of ``model`` that ``weights`` hold as BFTs (a network converted by
    ``butterfly.convert``), by name, with the layout each BFT was saved with."""
    if not weights:
        return {}
    modules = dict(model.named_modules())
    found = {}
    for key, value in weights.items():
        if not key.endswith("._extra_state"):
            continue
        name = key[:-len("._extra_state")]
        module = modules.get(name)
        layout = _layout(value)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not butterfly.is_bft(module) and layout:
            found[name] = layout
    return found


def _base_for(layout: Tuple[int, int, bool, Tuple[int, ...]], preferred: int) -> int:
    """A base for which ``butterfly.make_plan`` gives the saved radices (``preferred`` first)."""
    cin, cout, _, radices = layout
    for base in [preferred] + list(range(2, max(radices, default=2) + 1)):
        try:
            if tuple(butterfly.make_plan(cin, cout, base).radices) == radices:
                return base
        except ValueError:
            pass
    return preferred


def convert_model(model: nn.Module, weights: Optional[Dict[str, Any]] = None, base: int = 4,
                  residual: Any = "auto", linear: bool = False) -> nn.Module:
    """``--convert``: ``model`` with its pointwise layers replaced by BFTs.

    When ``weights`` hold a converted network (see :func:`converted_layouts`), exactly the layers
    they hold as BFTs become BFTs of the saved layouts (residual or not, radices), unfitted, so
    that ``weights`` load, whatever ``base`` and ``residual`` the conversion used. Otherwise
    ``butterfly.convert(model, base=base, residual=residual, linear=linear)`` fits a BFT to every
    pointwise layer of ``model``'s current weights (load dense weights first)."""
    layouts = converted_layouts(model, weights)
    if layouts:
        groups: Dict[Tuple[bool, int], List[str]] = {}
        for name, layout in layouts.items():
            groups.setdefault((layout[2], _base_for(layout, base)), []).append(name)
        for (res, b), names in groups.items():
            chosen = set(names)
            model, _ = butterfly.replace_pointwise(model, lambda n, m: n in chosen, linear=True,
                                                   base=b, residual=res)
        _log.info("--convert: %d layers rebuilt as the BFTs the weights hold", len(layouts))
        return model
    model, report = butterfly.convert(model, base=base, residual=residual, linear=linear)
    if len(report):
        errors = sorted(fit.rel_error for fit in report)
        _log.info("%s; relative error of the fits: median %.3f, max %.3f", report.title(),
                  errors[len(errors) // 2], errors[-1])
    else:
        _log.warning("warning: --convert found no pointwise layer to convert in this model")
    return model


def residual_option(text: str) -> Any:
    """``--convert-residual`` as ``butterfly.convert`` takes it."""
    return {"true": True, "false": False}.get(text, text)


def build_weights(model: nn.Module, args, state: Any, source: str, ema: bool = False,
                  load: bool = True) -> nn.Module:
    """``model`` with the weights of ``state`` (a checkpoint, its EMA weights with ``ema``, or a
    ``state_dict``; None: the model's own) loaded, converted first where ``args.convert`` says so:
    dense weights of ``model`` are loaded and then converted, the weights of a converted network
    get BFTs of their layouts and are loaded into them. ``load=False``: only the structure (a
    resume loads its whole state itself). ``source`` names ``state`` in errors."""
    from .checkpoint import load_weights, model_weights
    if not getattr(args, "convert", False):
        if state is not None and load:
            load_weights(model, state, source, ema)
        return model
    options = {"base": args.convert_base, "residual": residual_option(args.convert_residual),
               "linear": args.convert_linear}
    weights = model_weights(state, ema) if state is not None else None
    if weights is not None and not converted_layouts(model, weights):
        if load:  # dense weights of the model: load them, then fit the BFTs to them
            load_weights(model, state, source, ema)
        return convert_model(model, None, **options)
    model = convert_model(model, weights, **options)
    if state is not None and load:
        load_weights(model, state, source, ema)
    return model
