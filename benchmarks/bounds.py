"""What bounds a measured time: the machine's rates, measured in the same run as the times they
explain, and the floors they put under a layer or a model.

:func:`rates` measures, at a thread count, with the harness's interleaved timer:

* ``fma_GMACs``: the FMA peak, as the multiply-add rate of a loop of independent float32 FMAs
  on the machine's widest vectors (:mod:`benchmarks.loops`; nothing here can exceed it);
* ``copy_GBs``: copy bandwidth, bytes read + written per second on a tensor larger than the
  last-level cache;
* ``dense_GMACs``, ``depthwise_GMACs``, ``bft_GMACs``: the multiply-add rates of a 1x1 conv, a
  depthwise 3x3 conv and a BFT at MobileNet-like shapes (channels_last).

:func:`layer_profile` counts, per image, the bytes a model's layers read and write and its
multiply-adds by layer kind; :func:`floors` turns profile and rates into a memory floor (least
traffic / copy bandwidth) and a compute floor (each kind's multiply-adds / its rate). They are
estimates from one shape per kind, not guarantees.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import butterfly
from benchmarks import harness, loops

KINDS = ("dense", "depthwise", "bft")
# Passes over a model's traffic and multiply-adds per image. Inference: each layer reads its input
# and writes its output once, weights once. Training: multiply-adds 3x (forward, input gradient,
# weight gradient); activations 2.5x (forward: input and output; backward: output gradient and
# input read, input gradient written); weights 8x per step (read in forward and backward,
# gradient written, the optimizer reads weight, gradient and momentum and writes two).
INFERENCE = {"macs": 1, "activations": 1, "weights": 1}
TRAINING = {"macs": 3, "activations": 2.5, "weights": 8}


def _runner(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return module(x)
    return run


def rates(threads: int, quick: bool = False, cpu_time: bool = False) -> Dict:
    """The machine's rates at ``threads`` threads (see the module docstring), timed by wall clock
    or by process CPU time."""
    batch = 8 if quick else 32
    n = (32 if quick else 128) * 2 ** 20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    x512 = torch.randn(batch, 512, 14, 14).contiguous(memory_format=torch.channels_last)
    x1024 = torch.randn(batch, 1024, 14, 14).contiguous(memory_format=torch.channels_last)
    cl = torch.channels_last
    pw = nn.Conv2d(512, 512, 1, bias=False).to(memory_format=cl).eval()
    dw = nn.Conv2d(512, 512, 3, padding=1, groups=512, bias=False).to(memory_format=cl).eval()
    bft = butterfly.BFT(1024, 1024).eval()
    fma = loops.fma_step(threads)
    steps = {**({"fma": fma[0]} if fma else {}), "copy": lambda: dst.copy_(src),
             "dense": _runner(pw, x512), "depthwise": _runner(dw, x512),
             "bft": _runner(bft, x1024)}
    timing = harness.Timing(rounds=2 if quick else 3, calls=3, min_time_s=0.05 if quick else 0.2,
                            settle_s=0.01 if quick else 0.05)
    with harness.torch_threads(threads):
        times, failed = harness.interleave(steps, timing,
                                           time.process_time if cpu_time else time.perf_counter)
    med = {k: harness.summary(v)["ms"] / 1e3 for k, v in times.items() if v}
    pixels = batch * 14 * 14
    macs = {"fma": fma[1] if fma else 0, "dense": 512 * 512 * pixels, "depthwise": 512 * 9 * pixels,
            "bft": bft.macs_per_pixel * pixels}
    out = {"threads": threads, "date": harness.now(), "quick": quick, "failed": failed,
           **({"clock": "process CPU time"} if cpu_time else {}),
           "copy_GBs": 2 * n * 4 / med["copy"] / 1e9 if "copy" in med else None}
    for kind, count in macs.items():
        out[f"{kind}_GMACs"] = count / med[kind] / 1e9 if kind in med else None
    out["shapes"] = (f"FMA: a loop of independent FMAs per thread; copy {n * 4 / 2 ** 20:.0f} MiB; dense 1x1 conv "
                     f"512->512, depthwise 3x3 512 ch, at {batch}x512x14x14; BFT 1024->1024 at "
                     f"{batch}x1024x14x14; channels_last")
    return out


def layer_profile(model: nn.Module, res: int, in_chans: int = 3) -> Dict:
    """Per image (batch 1, float32, eval mode; the model's mode is restored): the bytes every leaf
    module (a BFT counted as one) reads and writes (``act_bytes``), the same for the conv, BFT and
    linear layers alone (``act_bytes_layers``: what is left when BatchNorms and activations are
    fused into them), the weight bytes, and the multiply-adds by kind (dense: full and 1x1 convs
    and linear layers; depthwise; bft)."""
    act = [0, 0]
    macs = dict.fromkeys(KINDS, 0)

    def size(t) -> int:
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        return sum(size(v) for v in t) if isinstance(t, (list, tuple)) else 0

    def hook(module, inputs, output):
        act[0] += size(inputs) + size(output)
        if butterfly.is_bft(module) or isinstance(module, (nn.Conv2d, nn.Linear)):
            act[1] += size(inputs) + size(output)
        if butterfly.is_bft(module):
            macs["bft"] += module.macs_per_pixel * (output[0, 0].numel() if output.dim() == 4
                                                    else 1)
        elif isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            macs["depthwise" if depthwise else "dense"] += (
                output[0].numel() * module.in_channels // module.groups
                * math.prod(module.kernel_size))
        elif isinstance(module, nn.Linear):
            macs["dense"] += output[0].numel() * module.in_features

    leaves, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if butterfly.is_bft(module):
            skip.append(name)
        if butterfly.is_bft(module) or not list(module.children()):
            leaves.append(module)
    handles = [m.register_forward_hook(hook) for m in leaves]
    training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.randn(1, in_chans, res, res))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return {"act_bytes": act[0], "act_bytes_layers": act[1],
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "macs_by_kind": macs}


def floors(profile: Dict, rates_: Optional[Dict], passes: Dict, batch: int = 1
           ) -> Optional[Dict]:
    """Lower bounds of the time per image, in ms: *memory*, the layers-only activation traffic
    plus the weights (read once per batch of ``batch``) at copy bandwidth; *compute*, the
    multiply-adds at each kind's rate; *rest*, compute with the BFT layers free (what the rest of
    a BFT model costs however fast its BFT kernel gets). ``passes`` is :data:`INFERENCE` or
    :data:`TRAINING`. None without a profile or rates."""
    m = profile.get("macs_by_kind")
    if not m or not rates_ or not rates_.get("copy_GBs") \
            or not all(rates_.get(f"{k}_GMACs") for k in KINDS):
        return None
    per_kind = {k: passes["macs"] * m[k] / rates_[f"{k}_GMACs"] / 1e6 for k in KINDS}
    traffic = (passes["activations"] * profile["act_bytes_layers"]
               + passes["weights"] * profile["weight_bytes"] / batch)
    memory = traffic / rates_["copy_GBs"] / 1e6
    compute = sum(per_kind.values())
    return {"memory_ms": memory, "compute_ms": compute, "rest_ms": compute - per_kind["bft"],
            "bound_ms": max(memory, compute), "kind": "memory" if memory > compute else "compute"}


def parity(bft_macs: float, rest_ms: float, baseline_ms: float, bft_rate: Optional[float]) -> str:
    """What matching the baseline's measured time would take of the BFT layers, with the rest of
    the BFT model at its compute floor."""
    if baseline_ms <= rest_ms:
        return "no BFT kernel speed reaches parity (the rest of the model alone takes longer)"
    need = bft_macs / ((baseline_ms - rest_ms) * 1e-3) / 1e9
    return (f"parity needs the BFT layers at {need:.0f} GMAC/s or more"
            + (f" (measured {bft_rate:.0f})" if bft_rate else ""))


def rates_table(all_rates: Dict[str, Dict]) -> List[str]:
    """The machine rates of a results file (``{"t2": rates, ...}``), one row per thread count."""
    rows = [[f"{r['threads']}" + (f" ({r['clock']})" if "clock" in r else ""),
             harness.fmt(r.get("fma_GMACs"), ".0f"), harness.fmt(r.get("copy_GBs"), ".1f"),
             *(harness.fmt(r.get(f"{k}_GMACs"), ".1f") for k in KINDS), r["date"],
             r.get("shapes", "")]
            for r in sorted(all_rates.values(), key=lambda r: -r["threads"])]
    return harness.table(["threads", "FMA peak GMAC/s", "copy GB/s (read + write)",
                          "dense 1x1 GMAC/s", "depthwise 3x3 GMAC/s", "BFT GMAC/s", "measured",
                          "shapes"], rows, "rrrrrr")


def layer_section(rows: Sequence[Tuple[str, str, float, float, float, Optional[float]]],
                  rates_: Dict) -> List[str]:
    """"What bounds it" for single layers: per ``(layer, runner, ms, multiply-adds, ms of a copy
    of its output, the baseline's GMAC/s)``, the time against the copy (memory traffic) and the
    rate against the FMA peak measured in the same run (compute)."""
    peak = rates_.get("fma_GMACs")
    out = [[name, runner, f"{ms:.2f}", f"{ms / copy_ms:.1f}x", f"{macs / ms / 1e6:.0f}",
            harness.fmt(peak and 100 * macs / ms / 1e6 / peak, ".0f"), harness.fmt(base, ".0f"),
            harness.fmt(peak and base and 100 * base / peak, ".0f")]
           for name, runner, ms, macs, copy_ms, base in rows]
    return ["What bounds it: the fastest runner against a copy of its output (memory traffic: "
            "near 1x is memory-bound) and its multiply-add rate against the FMA peak measured in "
            "this run (compute: near 100% is compute-bound); the baseline's rate beside it.", "",
            *harness.table(["layer", "fastest", "ms", "x copy", "GMAC/s", "% FMA peak",
                            "baseline GMAC/s", "baseline % FMA peak"], out, "llrrrrrr"), ""]


def section(profiles: Dict[str, Dict], all_rates: Dict[str, Dict], measured: Callable,
            batches: Sequence[int], pairs: Sequence[Tuple[str, str, str]], passes: Dict,
            weight_batch: int = 1) -> List[str]:
    """"What bounds it" for whole models: per model (``profiles``: key -> layer profile with
    ``macs_by_kind``) and thread count of ``all_rates``, its floors (:func:`floors`, weights read
    once per ``weight_batch`` images) beside the measured time per image at each batch
    (``measured(key, threads, batch) -> (ms per image, path) or None``); then per pair
    ``(name, BFT key, baseline key)`` the bytes, floors, measured ratio and what parity would
    take."""
    if not all_rates:
        return []
    rows, found = [], {}
    for key, prof in profiles.items():
        m = prof["macs_by_kind"]
        for r in sorted(all_rates.values(), key=lambda r: -r["threads"]):
            f = floors(prof, r, passes, weight_batch)
            got = {b: measured(key, r["threads"], b) for b in batches}
            if f is None or not any(got.values()):
                continue
            found[(key, r["threads"])] = (f, got)
            rows.append([key, " / ".join(f"{m[k] / 1e6:.1f}" for k in KINDS),
                         f"{prof['act_bytes_layers'] / 1e6:.2f}", f"{prof['weight_bytes'] / 1e6:.2f}",
                         r["threads"], f"{f['memory_ms']:.3f}", f"{f['compute_ms']:.3f}"
                         + (f" ({f['rest_ms']:.3f})" if m["bft"] else ""),
                         *(f"{g[0]:.3f} ({g[1]}), {g[0] / f['bound_ms']:.1f}x" if g else "-"
                           for g in got.values()), f["kind"]])
    if not rows:
        return []
    lines = ["### What bounds it", "", *rates_table(all_rates), "",
             "Per image, float32. *memory floor*: "
             f"{passes['activations']:g}x the input and output bytes of every conv, BFT and "
             "linear layer (what is left to move when BatchNorms and activations are fused) plus "
             f"{passes['weights']:g}x the weights (read once per {weight_batch} image(s)), at copy "
             f"bandwidth; *compute floor*: {passes['macs']:g}x the multiply-adds of each layer "
             "kind at its measured rate (in brackets: with the BFT layers free, what the rest of a "
             "BFT model costs however fast its BFT kernel gets). Measured: the best path's time "
             "and its multiple of the larger floor; far above both is overhead (framework, small "
             "ops, layout changes). Estimates from one shape per kind, not guarantees.", "",
             *harness.table(["model", "MACs (M): dense / depthwise / BFT", "layers-only MB",
                             "weights MB", "threads", "memory floor ms", "compute floor ms",
                             *(f"measured ms, batch {b} (path), x floor" for b in batches),
                             "larger floor"], rows, "llrrrrr"), ""]
    for name, bft, base in pairs:
        for r in sorted(all_rates.values(), key=lambda r: -r["threads"]):
            if (bft, r["threads"]) not in found or (base, r["threads"]) not in found:
                continue
            (fb, gb), (fa, ga) = found[(bft, r["threads"])], found[(base, r["threads"])]
            pb, pa = profiles[bft], profiles[base]
            text = (f"* **{name}**, {r['threads']} thread(s): "
                    f"{pb['act_bytes_layers'] / pa['act_bytes_layers']:.1f}x the layers' bytes, "
                    f"{pb['macs'] / pa['macs']:.2f}x the multiply-adds; floors "
                    f"{fb['bound_ms']:.3f} vs {fa['bound_ms']:.3f} ms (ratio "
                    f"{fb['bound_ms'] / fa['bound_ms']:.2f}); with its BFT layers free the BFT "
                    f"model still computes for {fb['rest_ms']:.3f} ms")
            for b in batches:
                if gb[b] and ga[b]:
                    text += (f"; batch {b}: measured {gb[b][0]:.3f} vs {ga[b][0]:.3f} ms (ratio "
                             f"{gb[b][0] / ga[b][0]:.2f}), " + parity(
                                 passes["macs"] * pb["macs_by_kind"]["bft"], fb["rest_ms"],
                                 ga[b][0], r.get("bft_GMACs")))
            lines.append(text + ".")
    return lines + [""]
