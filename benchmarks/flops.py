"""Multiply-adds and parameters of every model in butterfly's zoo, beside the papers' figures.

    python -m benchmarks.flops            # writes benchmarks/results/flops.{json,md}

"MFLOPs" in the papers are millions of multiply-adds of conv, linear (and BFT) layers at batch 1,
which is what ``butterfly.flops.count_macs`` counts. The "paper-style" column recounts every BFT
block the way the BFT paper did, ``4 * m * ceil(log4 m)`` for an ``m``-channel block, instead of
the ``n * sum(radices)`` the mixed-radix layer executes: the difference explains the BFT gaps.
A count more than 10% (MobileNetV3: 15%) from the paper's is flagged.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List

import timm
import torch

import butterfly
from benchmarks import harness
from butterfly.flops import count_macs
from butterfly.models import registered_models

# MFLOPs by model and resolution: the BFT paper's tables (section 4); the architectures' own
# papers (MobileNetV1 table 6, ShuffleNetV2 table 8) for widths the BFT paper does not list.
PAPER = {
    "mobilenetv1_025": {128: 14, 160: 21, 192: 34, 224: 41},
    "mobilenetv1_050": {128: 49, 192: 110, 224: 150},
    "mobilenetv1_075": {224: 325},
    "mobilenetv1_bft_100": {96: 14, 128: 23, 160: 35, 192: 51},
    "mobilenetv1_bft_200": {128: 52, 192: 112, 224: 150},
    "shufflenetv2_050": {128: 14, 160: 21, 224: 41},
    "shufflenetv2_100": {224: 146},
    "shufflenetv2_150": {224: 299},
    "shufflenetv2_200": {224: 591},
    "shufflenetv2_bft_125": {128: 14, 160: 21, 224: 41},
    "mobilenetv3_small_035": {224: 13},
    "mobilenetv3_small_bft_050": {224: 15},
}
NOT_IN_BFT_PAPER = {"mobilenetv1_075", "shufflenetv2_100", "shufflenetv2_150", "shufflenetv2_200"}
TOLERANCE = {"mobilenetv3": 0.15}  # by name prefix; 10% otherwise


def paper_style_macs(model: torch.nn.Module, res: int, macs: int) -> int:
    """``macs`` with every BFT block recounted as ``4 * m * ceil(log4 m)`` per pixel."""
    extra = []

    def hook(module, inputs, output):
        m = module.plan.block
        stages = math.ceil(math.log(m, 4) - 1e-9) if m > 1 else 0
        extra.append((module.plan.num_blocks * 4 * m * stages - module.macs_per_pixel)
                     * output[0, 0].numel())

    handles = [mod.register_forward_hook(hook) for mod in model.modules() if butterfly.is_bft(mod)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, res, res))
    finally:
        for h in handles:
            h.remove()
    return macs + sum(extra)


def within_tolerance(row: Dict) -> bool:
    tol = next((t for prefix, t in TOLERANCE.items() if row["model"].startswith(prefix)), 0.10)
    return row.get("diff") is None or abs(row["diff"]) <= 100 * tol


def measure(store: harness.Store) -> None:
    for name in registered_models():
        model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        figures, has_bft = PAPER.get(name, {}), any(map(butterfly.is_bft, model.modules()))
        for res in sorted(set(figures) | {224}):
            count = count_macs(model, (3, res, res))
            row = {"model": name, "res": res, "macs": count / 1e6, "params": params,
                   "paper": figures.get(res), "status": "ok"}
            if row["paper"] is not None:
                row["diff"] = 100 * (row["macs"] / row["paper"] - 1)
                if has_bft:
                    style = paper_style_macs(model, res, count) / 1e6
                    row["paper_style"], row["style_diff"] = style, 100 * (style / row["paper"] - 1)
            store.put(f"{name}@{res}", row)


def report(data: Dict) -> List[str]:
    rows = list(data["cells"].values())
    lines = []
    for r in rows:
        source = " (arch. paper)" if r["paper"] and r["model"] in NOT_IN_BFT_PAPER else ""
        lines.append([r["model"], r["res"], f"{r['macs']:.2f}", f"{r['params']:.3f}",
                      harness.fmt(r["paper"], "d", "") + source,
                      harness.fmt(r.get("diff"), "+.1f", "") + ("%" if "diff" in r else "")
                      + ("" if within_tolerance(r) else " **"),
                      harness.fmt(r.get("paper_style"), ".2f", ""),
                      harness.fmt(r.get("style_diff"), "+.1f", "") + ("%" if "style_diff" in r else "")])
    outside = [f"{r['model']}@{r['res']}" for r in rows if not within_tolerance(r)]

    def span(values) -> str:
        return f"{min(values):+.1f}% to {max(values):+.1f}%" if values else "none"

    gaps = [f"* Baselines within the tolerance: "
            f"{span([r['diff'] for r in rows if 'diff' in r and 'paper_style' not in r and within_tolerance(r)])}."]
    for family in sorted({r["model"].split("_bft")[0] for r in rows if "paper_style" in r}):
        bft = [r for r in rows if "paper_style" in r and r["model"].startswith(family)]
        gaps.append(f"* {family} BFT models: {span([r['diff'] for r in bft])} with our count "
                    f"(MACs executed), {span([r['style_diff'] for r in bft])} counted the "
                    "paper's way (`4 * m * ceil(log4 m)` per block).")
    return ["# Multiply-adds of the model zoo", "",
            "Batch 1, 1000 classes; MACs = multiply-adds of conv, linear and BFT layers (BN, "
            "activations, pooling not counted); `diff` = ours / paper - 1; ** = outside the "
            "tolerance (10%; 15% for MobileNetV3).", "", *harness.runs_section(data),
            *harness.table(["model", "res", "MACs (M)", "params (M)", "paper MFLOPs", "diff",
                            "paper-style BFT count (M)", "diff"], lines, "lrrrrrrr"), "",
            f"Outside the tolerance: {', '.join(outside) or 'none'}.", "",
            "## Differences from the paper", "", *gaps, "",
            "Why: docs/models.md, \"Differences from the papers' counts\"."]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = harness.parser("flops", __doc__, threads=[1])
    args = harness.checked(p, argv)
    store = harness.Store(args.out_dir / "flops.json", "flops", keep=False)
    store.start("flops", argv, args.note)
    measure(store)
    store.save()
    lines = report(store.data)
    print("\n".join(lines))
    harness.write_report(args.out_dir / "flops.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
