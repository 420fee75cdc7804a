"""Multiply-adds and parameters of every model in butterfly's zoo, beside the papers' figures.

    python -m benchmarks.flops            # prints the table, writes benchmarks/results/flops.md

"MFLOPs" in the papers are millions of multiply-adds of conv, linear (and BFT) layers at batch 1,
which is what ``butterfly.flops.count_macs`` counts. The "paper-style" column recounts every BFT
block the way the BFT paper did, ``4 * m * ceil(log4 m)`` for an ``m``-channel block, instead of
the ``n * sum(radices)`` the mixed-radix layer executes: the difference explains the BFT gaps.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import timm
import torch

import butterfly
from butterfly.flops import count_macs
from butterfly.models import registered_models

# (MFLOPs, source) by model and resolution. the BFT paper's tables (section 4); the others are the
# architectures' own papers (MobileNetV1 table 6, ShuffleNetV2 table 8) for widths the BFT paper
# does not list.
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

def gap_summary(rows: list[dict]) -> str:
    """The differences from the paper, summarised from the table (why they arise:
    docs/models.md, "Differences from the papers' counts")."""
    def span(values) -> str:
        return f"{min(values):+.1f}% to {max(values):+.1f}%" if values else "none"

    with_paper = [r for r in rows if r["paper"] is not None]
    baselines = [r["diff"] for r in with_paper if "paper_style" not in r and within_tolerance(r)]
    lines = ["## Differences from the paper", "",
             f"* Baselines within the tolerance: {span(baselines)}."]
    for family in sorted({r["model"].split("_bft")[0] for r in with_paper if "paper_style" in r}):
        bft = [r for r in with_paper if "paper_style" in r and r["model"].startswith(family)]
        lines.append(f"* {family} BFT models: {span([r['diff'] for r in bft])} with our count "
                     f"(MACs executed), {span([r['style_diff'] for r in bft])} counted the "
                     "paper's way (`4 * m * ceil(log4 m)` per block).")
    lines += ["", "Why: docs/models.md, \"Differences from the papers' counts\"."]
    return "\n".join(lines) + "\n"


def paper_style_macs(model: torch.nn.Module, res: int, macs: int) -> int:
    """``macs`` (from ``count_macs``) with every BFT block recounted as ``4 * m * ceil(log4 m)``
    multiply-adds per pixel, the paper's way."""
    extra = []

    def hook(module, inputs, output):
        m = module.plan.block
        stages = math.ceil(math.log(m, 4) - 1e-9) if m > 1 else 0
        paper = module.plan.num_blocks * 4 * m * stages
        extra.append((paper - module.macs_per_pixel) * output[0, 0].numel())

    handles = [mod.register_forward_hook(hook) for mod in model.modules() if butterfly.is_bft(mod)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, res, res))
    finally:
        for h in handles:
            h.remove()
    return macs + sum(extra)


def measure() -> list[dict]:
    rows = []
    for name in registered_models():
        model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        figures, has_bft = PAPER.get(name, {}), any(map(butterfly.is_bft, model.modules()))
        for res in sorted(set(figures) | {224}):
            count = count_macs(model, (3, res, res))
            macs = count / 1e6
            paper = figures.get(res)
            row = dict(model=name, res=res, macs=macs, params=params, paper=paper)
            if paper is not None:
                row["diff"] = 100 * (macs / paper - 1)
                if has_bft:
                    style = paper_style_macs(model, res, count) / 1e6
                    row["paper_style"], row["style_diff"] = style, 100 * (style / paper - 1)
            rows.append(row)
    return rows


def within_tolerance(row: dict) -> bool:
    tol = next((t for prefix, t in TOLERANCE.items() if row["model"].startswith(prefix)), 0.10)
    return abs(row["diff"]) <= 100 * tol


def fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict]) -> str:
    lines = ["| model | res | MACs (M) | params (M) | paper MFLOPs | diff "
             "| paper-style BFT count (M) | diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = r["paper"]
        source = "" if paper is None or r["model"] not in NOT_IN_BFT_PAPER else " (arch. paper)"
        flag = "" if paper is None or within_tolerance(r) else " **"
        lines.append(
            f"| {r['model']} | {r['res']} | {r['macs']:.2f} | {r['params']:.3f} | "
            f"{fmt(paper, 'd')}{source} | {fmt(r.get('diff'), '+.1f', '%')}{flag} | "
            f"{fmt(r.get('paper_style'), '.2f')} | {fmt(r.get('style_diff'), '+.1f', '%')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "flops.md"))
    args = parser.parse_args()
    rows = measure()
    text = table(rows)
    print(text)
    outside = [f"{r['model']}@{r['res']}" for r in rows
               if r["paper"] is not None and not within_tolerance(r)]
    header = ("# Multiply-adds of the model zoo\n\nMeasured with `python -m benchmarks.flops` "
              f"(torch {torch.__version__}, timm {timm.__version__}); batch 1, 1000 classes, "
              "MACs = multiply-adds of conv, linear and BFT layers (BN, activations, pooling not "
              "counted), `diff` = ours / paper - 1, ** = outside the tolerance (10%; 15% for "
              "MobileNetV3).\n\n")
    footer = f"\n\nOutside the tolerance: {', '.join(outside) or 'none'}.\n\n{gap_summary(rows)}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + text + footer)
    print(f"\noutside the tolerance: {outside or 'none'}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
