"""Conversion: fit BFT weights to trained dense pointwise layers, so a dense network becomes a BFT
network to fine-tune.

The fit has two steps, both in float64:

1. **Hierarchical factorisation** (closed form). Write a channel index in the mixed radix of the
   butterfly, split its digits into an upper part ``u`` (the digits stages ``0..h-1`` mix) and a lower
   part ``l``. Then ``B = Left @ Right`` with ``B[(u_o, l_o), (u_i, l_i)] = Left[u_o][l_o, l_i] *
   Right[l_i][u_o, u_i]``: for each pair ``(u_o, l_i)`` the ``(l_o, u_i)`` sub-matrix is rank one, and
   the pairs use disjoint weights. The best rank-one approximation of each (an SVD) is therefore the
   best two-factor fit; ``Left[u]`` and ``Right[l]`` are smaller butterflies, fitted the same way,
   recursively. A matrix that is a butterfly is recovered exactly. (This is the hierarchical
   algorithm of Zheng, Riccietti and Gribonval, "Efficient identification of butterfly sparse
   matrix factorizations", 2023, written here for this project's mixed-radix layout.)
2. **Refinement** (L-BFGS) of the whole layer (every block, residual, padding and tiling as the
   layer computes them) on the squared error of the matrix, or, with calibration activations ``X``,
   of the layer's outputs: ``||(B - W) X||^2`` (least squares on the outputs).

Residual: a BFT with ``residual=True`` computes ``B + I`` per block, so its butterflies are fitted to
``W - I``; with ``residual=False`` to ``W``. A trained ``W`` is rarely close to the identity, and on
the pointwise convs of a small CNN trained on Fashion-MNIST ``residual=False`` fitted with about
0.1 less relative error; the default ``"auto"`` fits both and keeps the better one per layer (it also
recovers a BFT of either kind exactly).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .modules import BFT, BFTLinear
from .plan import BFTPlan
from .reference import apply_stage, bft_reference, stage_weights
from .surgery import is_pointwise_conv


def _split_point(radices: Tuple[int, ...]) -> int:
    """Index ``h`` that splits the stages into two parts of the most similar sizes."""
    best, up = None, 1
    for h in range(1, len(radices)):
        up *= radices[h - 1]
        score = abs(math.log(up) - math.log(math.prod(radices) / up))
        if best is None or score < best[0]:
            best = (score, h)
    return best[1]


def factor_butterfly(matrices: Tensor, radices: Tuple[int, ...]) -> List[Tensor]:
    """Hierarchical butterfly fit of ``matrices`` ``(*batch, n, n)``: the stage weights
    ``(*batch, n / k_s, k_s, k_s)`` (binding layout) whose product approximates each matrix."""
    *batch, n, _ = matrices.shape
    if len(radices) == 1:
        return [matrices.reshape(*batch, 1, n, n)]
    h = _split_point(radices)
    n_up = math.prod(radices[:h])
    n_low = n // n_up
    # (..., u_o, l_o, u_i, l_i) -> one (l_o, u_i) sub-matrix per (u_o, l_i)
    sub = matrices.reshape(*batch, n_up, n_low, n_up, n_low).movedim(-1, -3)
    U, S, Vh = torch.linalg.svd(sub, full_matrices=False)
    scale = S[..., :1].sqrt()
    left = (U[..., :, 0] * scale).transpose(-1, -2)       # (..., u_o, l_o, l_i)
    right = (Vh[..., 0, :] * scale).movedim(-2, -3)       # (..., l_i, u_o, u_i)
    d = len(batch)
    stages = []
    for w in factor_butterfly(right, radices[:h]):        # group g = g_up * n_low + l_i
        stages.append(w.movedim(d, d + 1).reshape(*batch, n // w.shape[-1], w.shape[-1], w.shape[-1]))
    for w in factor_butterfly(left, radices[h:]):         # group g = u_o * (n_low / k) + g_low
        stages.append(w.reshape(*batch, n // w.shape[-1], w.shape[-1], w.shape[-1]))
    return stages


def butterfly_matrices(weight: Tensor, plan: BFTPlan) -> Tensor:
    """The ``(T, n, n)`` matrix of every square block of a ``(T, W)`` weight (no residual)."""
    T, n = weight.shape[0], plan.size
    square = BFTPlan(n, n, plan.radices)
    z = torch.eye(n, dtype=weight.dtype, device=weight.device).view(n, 1, n, 1).expand(n, T, n, 1)
    for s, w in enumerate(stage_weights(weight, plan)):
        z = apply_stage(z, w, square, s)
    return z.squeeze(-1).permute(1, 2, 0)


def block_targets(weight: Tensor, plan: BFTPlan, residual: bool) -> Tuple[Tensor, Tensor]:
    """What each square block must equal for the layer to compute ``weight`` ``(out, in)``:
    ``(targets, known)``, both ``(T, n, n)``; entries outside ``known`` (padding, truncated rows,
    columns of absent channels) do not reach the output. With the residual, blocks target ``W - I``."""
    m, n, T = plan.block, plan.size, plan.num_blocks
    targets = weight.new_zeros(T, n, n)
    known = torch.zeros(T, n, n, dtype=torch.bool, device=weight.device)
    eye = torch.eye(n, dtype=weight.dtype, device=weight.device)
    for t in range(T):
        part = weight[t * m:(t + 1) * m] if plan.expand else weight[:, t * m:(t + 1) * m]
        rows, cols = part.shape
        targets[t, :rows, :cols] = part - (eye[:rows, :cols] if residual else 0)
        known[t, :rows, :cols] = True
    return targets, known


def _dense(flat: Tensor, plan: BFTPlan, residual: bool) -> Tensor:
    """The ``(out, in)`` matrix of the layer with weights ``flat`` (differentiable)."""
    eye = torch.eye(plan.in_channels, dtype=flat.dtype, device=flat.device).unsqueeze(-1)
    return bft_reference(eye, flat, plan.radices, plan.out_channels, residual).squeeze(-1).t()


def _metric(cov: Optional[Tensor]) -> Optional[Tensor]:
    """``R`` with ``R @ R.T == cov`` (numerically null directions dropped), or None."""
    if cov is None:
        return None
    vals, vecs = torch.linalg.eigh(cov)
    keep = vals > vals.max().clamp_min(0) * 1e-12
    return vecs[:, keep] * vals[keep].sqrt()


def _sq_error(flat: Tensor, weight: Tensor, plan: BFTPlan, residual: bool,
              metric: Optional[Tensor]) -> Tensor:
    err = _dense(flat, plan, residual) - weight
    return (err if metric is None else err @ metric).pow(2).sum()


def fit_weights(weight: Tensor, plan: BFTPlan, residual: bool = True, cov: Optional[Tensor] = None,
                steps: int = 100, impute_rounds: int = 3) -> Tuple[Tensor, float]:
    """Fit the ``(T, W)`` weights of a BFT of ``plan`` to a dense ``(out, in)`` matrix.

    ``cov``: ``(in, in)`` second moment ``X^T X`` of calibration inputs; the fit then minimises the
    output error ``||(B - W) X||`` instead of ``||B - W||``. ``steps``: L-BFGS iterations after the
    hierarchical fit (0 to skip). ``impute_rounds``: hierarchical refits in which entries that do not
    reach the output take the previous fit's values (only for padded or truncated blocks).
    Returns ``(weights in float64, relative error)`` (see :func:`relative_error`)."""
    weight = weight.detach().to(torch.float64)
    expected = (plan.out_channels, plan.in_channels)
    if tuple(weight.shape) != expected:
        raise ValueError(f"expected a dense weight of shape {expected} for {plan}, "
                         f"got {tuple(weight.shape)}")
    targets, known = block_targets(weight, plan, residual)

    def hierarchical(matrices: Tensor) -> Tensor:
        return torch.cat([w.reshape(plan.num_blocks, -1) for w in
                          factor_butterfly(matrices, plan.radices)], dim=1)

    if not plan.radices:  # one channel per block: the layer has no weights
        flat = weight.new_zeros(plan.num_blocks, 0)
    else:
        flat = hierarchical(targets)
    if plan.radices and not known.all():
        for _ in range(impute_rounds):
            flat = hierarchical(torch.where(known, targets, butterfly_matrices(flat, plan)))
    metric = _metric(None if cov is None else cov.detach().to(torch.float64))
    norm = (weight if metric is None else weight @ metric).pow(2).sum().clamp_min(1e-300)
    with torch.no_grad():
        error = math.sqrt(_sq_error(flat, weight, plan, residual, metric) / norm)
    if steps > 0 and plan.radices and error > 1e-7:  # below that: exact up to float32 rounding
        flat = _refine(flat, weight, plan, residual, metric, norm, steps)
        with torch.no_grad():
            error = min(error, math.sqrt(_sq_error(flat, weight, plan, residual, metric) / norm))
    return flat, error


def _refine(flat: Tensor, weight: Tensor, plan: BFTPlan, residual: bool, metric: Optional[Tensor],
            norm: Tensor, steps: int) -> Tensor:
    """``steps`` L-BFGS iterations on the normalised squared error; never returns worse weights."""
    start, flat = flat, flat.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([flat], lr=1, max_iter=steps, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _sq_error(flat, weight, plan, residual, metric) / norm
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    flat = flat.detach()
    with torch.no_grad():
        worse = _sq_error(flat, weight, plan, residual, metric) > _sq_error(start, weight, plan,
                                                                            residual, metric)
    return start if worse else flat


def input_covariance(x: Tensor, linear: bool) -> Tensor:
    """``X^T X`` in float64 of a layer's inputs: ``(N, C, H, W)`` for a conv, ``(..., C)`` for a
    linear layer."""
    if linear:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    else:
        if x.dim() != 4:
            raise ValueError(f"conv calibration inputs must be (N, C, H, W), "
                             f"got shape {tuple(x.shape)}")
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).t().to(torch.float64)
    return flat.t() @ flat


def _dense_weight(weight: Union[Tensor, nn.Module], bias: Optional[Tensor]):
    if isinstance(weight, nn.Module):
        if not (is_pointwise_conv(weight) or isinstance(weight, nn.Linear)):
            raise TypeError(f"from_dense takes a weight tensor, a pointwise nn.Conv2d (1x1, stride 1, "
                            f"no padding/groups/dilation) or an nn.Linear, got {weight}")
        weight, bias = weight.weight, weight.bias if bias is None else bias
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2:
        raise ValueError(f"expected an (out, in) or (out, in, 1, 1) weight, "
                         f"got shape {tuple(weight.shape)}")
    return weight.detach(), bias


def _fit_layer(weight: Tensor, bias: Optional[Tensor], linear: bool, base: int,
               residual: Union[bool, str], cov: Optional[Tensor], steps: int) -> Union[BFT, BFTLinear]:
    if residual not in (True, False, "auto"):
        raise ValueError(f"residual must be True, False or 'auto', got {residual!r}")
    out_channels, in_channels = weight.shape
    cls = BFTLinear if linear else BFT
    best = None
    for res in ((False, True) if residual == "auto" else (residual,)):
        layer = cls(in_channels, out_channels, base=base, residual=res, bias=bias is not None,
                    init="identity", device=weight.device, dtype=weight.dtype)
        flat, error = fit_weights(weight, layer.plan, res, cov, steps)
        if best is None or error < best[2]:
            best = (layer, flat, error)
    layer, flat, layer.fit_error = best
    with torch.no_grad():
        layer.weight.copy_(flat.view(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def from_dense(weight: Union[Tensor, nn.Module], bias: Optional[Tensor] = None, *,
               linear: Optional[bool] = None, base: int = 4, residual: Union[bool, str] = "auto",
               calib: Optional[Tensor] = None, steps: int = 100) -> Union[BFT, BFTLinear]:
    """A ``BFT`` (or a ``BFTLinear`` with ``linear=True``, the default for an ``nn.Linear``) fitted
    to a dense pointwise layer.

    ``weight``: ``(out, in)`` or ``(out, in, 1, 1)`` tensor, or the ``nn.Conv2d``/``nn.Linear``
    itself (its bias is copied). ``calib``: inputs of that layer (``(N, C, H, W)`` or ``(..., C)``)
    for a least-squares fit of its outputs. ``residual``: ``True`` fits ``W - I`` (a BFT computing
    ``Bx + x``), ``False`` fits ``W``, ``"auto"`` fits both and keeps the smaller error. The layer
    has the weight's device and dtype; the relative error of the fit is in ``layer.fit_error``
    (see :func:`fit_weights`)."""
    if linear is None:
        linear = isinstance(weight, nn.Linear)
    weight, bias = _dense_weight(weight, bias)
    cov = None if calib is None else input_covariance(calib.to(weight.device), linear)
    return _fit_layer(weight, bias, linear, base, residual, cov, steps)


@dataclass
class LayerFit:
    """What :func:`convert` did to one dense layer."""

    name: str
    in_channels: int
    out_channels: int
    dense_macs: int            # per pixel (or per row for linear layers)
    bft_macs: int
    rel_error: float           # ||B - W|| / ||W||, or ||(B - W) X|| / ||W X|| with calibration
    calibrated: bool
    residual: bool


class ConversionReport(list):
    """The :class:`LayerFit` of every converted layer; ``str()`` gives a table."""

    def __str__(self) -> str:
        dense = sum(f.dense_macs for f in self)
        bft = sum(f.bft_macs for f in self)
        rows = [f"convert: {len(self)} layers, pointwise MACs per pixel {dense} -> {bft}",
                f"{'layer':<28} {'shape':>11} {'dense MACs':>10} {'BFT MACs':>9} {'residual':>8} "
                f"{'rel. error':>10}"]
        for f in self:
            rows.append(f"{f.name:<28} {f'{f.in_channels}->{f.out_channels}':>11} "
                        f"{f.dense_macs:>10} {f.bft_macs:>9} {str(f.residual):>8} {f.rel_error:>10.4f}"
                        + ("  (outputs)" if f.calibrated else ""))
        return "\n".join(rows)


def _batches(calib_data) -> Iterable:
    if isinstance(calib_data, Tensor):
        return [calib_data]
    return calib_data


def _calibrate(model: nn.Module, layers: dict, calib_data) -> dict:
    """``X^T X`` of every named layer's inputs while the model runs (eval mode) on ``calib_data``."""
    covs, handles = {}, []
    for name, module in layers.items():
        def hook(mod, args, name=name):
            cov = input_covariance(args[0], isinstance(mod, nn.Linear))
            covs[name] = cov if name not in covs else covs[name] + cov
        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in _batches(calib_data):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return covs


def convert(model: nn.Module, calib_data=None, *, base: int = 4, residual: Union[bool, str] = "auto",
            linear: bool = False, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
            steps: int = 100, inplace: bool = True) -> Tuple[nn.Module, ConversionReport]:
    """Replace every pointwise ``nn.Conv2d`` (and with ``linear=True`` every ``nn.Linear``) of a
    trained model by a BFT fitted to it, ready to fine-tune.

    ``calib_data``: a batch of model inputs, or an iterable of batches (tensors, or tuples whose first
    element is the input, like a DataLoader); the fit then minimises each layer's output error on
    the activations the dense model produces. ``residual``: as in :func:`from_dense`.
    ``filter_fn(name, module)`` may veto a layer. Changes
    ``model`` in place unless ``inplace=False``. Returns ``(model, report)``."""
    from .deploy import _replace  # noqa: PLC0415 (deploy imports modules; avoid a cycle at import)
    if not inplace:
        model = copy.deepcopy(model)
    layers = {name: m for name, m in model.named_modules()
              if (is_pointwise_conv(m) or (linear and isinstance(m, nn.Linear)))
              and (filter_fn is None or filter_fn(name, m))}
    covs = _calibrate(model, layers, calib_data) if calib_data is not None and layers else {}
    report = ConversionReport()
    for name, dense in layers.items():
        weight, bias = _dense_weight(dense, None)
        layer = _fit_layer(weight, bias, isinstance(dense, nn.Linear), base, residual,
                           covs.get(name), steps)
        layer.train(dense.training)
        model = _replace(model, name, layer)
        report.append(LayerFit(name, layer.plan.in_channels, layer.plan.out_channels,
                               weight.numel(), layer.macs_per_pixel, layer.fit_error, name in covs,
                               layer.residual))
    return model, report


def relative_error(layer: nn.Module, weight: Tensor, calib: Optional[Tensor] = None) -> float:
    """``||B - W|| / ||W||`` of a BFT layer against a dense ``(out, in)`` weight, or with calibration
    inputs ``X`` the relative output error ``||(B - W) X|| / ||W X||`` (biases excluded)."""
    weight, _ = _dense_weight(weight, None)
    with torch.no_grad():
        err = (layer.to_dense().to(torch.float64) - weight.to(torch.float64))
        ref = weight.to(torch.float64)
        if calib is not None:
            metric = _metric(input_covariance(calib, isinstance(layer, BFTLinear)))
            err, ref = err @ metric, ref @ metric
    return (err.norm() / ref.norm()).item()
