"""Top-1 of BFT models against baselines of about equal multiply-adds, on Fashion-MNIST.

    python -m benchmarks.accuracy                       # MobileNetV1 0.25 vs MobileNetV1-BFT 1.0
    python -m benchmarks.accuracy --pairs mobilenetv1 shufflenetv2 --seeds 0 1 2 --epochs 5

Every model of a pair trains with the same recipe, epochs, data and seeds (``python -m train``'s
Fashion-MNIST defaults, 28x28 inputs, small-input stem). Reported per model: top-1 on the
validation images (mean and standard deviation over seeds), MACs and parameters, training
images/s, and CPU inference latency for one image. Writes a markdown table and a plot of top-1
against MACs (one line per family, baseline and BFT marked) into ``--results``.

The defaults (1 epoch on a fixed 10,000-image subset of the 60,000 training images, all 10,000 test
images, 2 seeds) keep the whole job to a few minutes on 2 CPU cores; a full epoch is
``--train-subset 60000``.

This is a smoke test (what ``quickstart.sh`` runs), not a test of the paper's claim: one epoch is
far from convergence and the pairs are not matched in multiply-adds. The reproduction is
``python -m benchmarks.reproduce`` (MAC-matched pairs, learning rates chosen on a validation split,
3 seeds, trained to convergence); its results are in benchmarks/results/reproduction_fashion_mnist.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

from train.checkpoint import CheckpointError
from train.data import DataError

PAIRS = {"mobilenetv1": ("mobilenetv1_025", "mobilenetv1_bft_100"),
         "shufflenetv2": ("shufflenetv2_050", "shufflenetv2_bft_125")}
LABELS = {"mobilenetv1": "MobileNetV1", "shufflenetv2": "ShuffleNetV2"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NOT_THE_REPRODUCTION = (
    "NOTE: this is the quick smoke test (1 epoch, pairs not matched in multiply-adds), NOT the "
    "reproduction of the paper's claim. For that, run `python -m benchmarks.reproduce` (hours of CPU; "
    "results committed in benchmarks/results/reproduction_fashion_mnist.md).")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["mobilenetv1"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-subset", type=int, default=10000, help="training images (60000: all)")
    p.add_argument("--val-subset", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="loader processes (0 suits 2 cores)")
    p.add_argument("--data-dir", default=None, help="where the Fashion-MNIST files are, if not standard")
    p.add_argument("--latency-repeats", type=int, default=200)
    p.add_argument("--results", default=RESULTS, help="folder for the markdown table and the plot")
    p.add_argument("--runs", default=None, help="keep the training runs here (default: a temp dir)")
    p.add_argument("--no-progress", action="store_true")
    opts = p.parse_args(argv)
    for name in ("epochs", "train_subset", "batch_size", "latency_repeats"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    return opts


def train_model(model: str, seed: int, opts, out_dir: str) -> Dict:
    """One ``python -m train`` run in this process; returns its final metrics."""
    from train.args import parse_args as train_args
    from train.loop import run
    argv = ["--model", model, "--seed", str(seed), "--epochs", str(opts.epochs),
            "--train-subset", str(opts.train_subset), "--batch-size", str(opts.batch_size),
            "--workers", str(opts.workers),
            "--device", "cpu", "--output", os.path.join(out_dir, f"{model}-seed{seed}")]
    if opts.val_subset:
        argv += ["--val-subset", str(opts.val_subset)]
    if opts.data_dir:
        argv += ["--data-dir", opts.data_dir]
    if opts.no_progress:
        argv.append("--no-progress")
    return run(train_args(argv))


def step_images_per_s(model_name: str, batch_size: int, steps: int = 30) -> float:
    """Training throughput from the median time of one SGD step (forward, backward, update) on a
    random batch: robust to other jobs' bursts, unlike the epoch average."""
    from butterfly import param_groups
    from train.model import create_model
    model = create_model(model_name, 10, 1, small_input=True).train()
    opt = torch.optim.SGD(param_groups(model, 5e-5), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - t)
    return batch_size / statistics.median(times)


@torch.inference_mode()
def latency_ms(model_name: str, repeats: int) -> float:
    """Median wall time of one forward pass on one 28x28 image, CPU, eval mode."""
    from train.model import create_model
    model = create_model(model_name, 10, 1, small_input=True).eval()
    x = torch.randn(1, 1, 28, 28)
    for _ in range(10):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def conditions(opts) -> Dict[str, str]:
    from benchmarks.machine import cpu_model
    cpu = cpu_model()
    from butterfly.ops import backend_for
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
            "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "BFT backend": backend_for(torch.device("cpu")).name,
            "load average before": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def summarize(runs: List[Dict]) -> Dict:
    top1 = [r["val_top1"] for r in runs]
    return {"top1": statistics.mean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else None,
            "seeds": top1, "macs": runs[0]["macs"], "params": runs[0]["params"],
            "epoch_images_per_s": statistics.mean(r["train_images_per_s"] for r in runs)}


def markdown(rows: List[Dict], cond: Dict[str, str], opts, argv: List[str]) -> str:
    n = len(opts.seeds)
    lines = [
        "# Accuracy vs multiply-adds on Fashion-MNIST: baselines and BFT models", "",
        "A smoke test, not the reproduction of the paper's claim: see "
        "[reproduction_fashion_mnist.md](reproduction_fashion_mnist.md) "
        "(`python -m benchmarks.reproduce`).", "",
        f"{opts.epochs} epoch(s) on {opts.train_subset} training images (a fixed subset), top-1 on "
        f"{opts.val_subset or 10000} test images, 28x28 input with the small-input stem, batch "
        f"{opts.batch_size}, the `fashion-mnist` recipe of `python -m train` (SGD, cosine), "
        f"seeds {' '.join(map(str, opts.seeds))}. Top-1 is the mean over the {n} seed(s) "
        "± their standard deviation. Train img/s: batch size / median time of one SGD step "
        "(forward, backward, update); epoch img/s: the training epochs' average, data loading "
        "included. Latency: median of one forward pass on one image (CPU, eval).",
        "",
        "| family | model | kind | MMACs | params (M) | top-1 % | top-1 per seed | train img/s "
        "| epoch img/s | latency ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        lines.append(
            f"| {LABELS[r['family']]} | `{r['model']}` | {r['kind']} | {r['macs'] / 1e6:.2f} | "
            f"{r['params'] / 1e6:.3f} | {r['top1']:.2f}{spread} | "
            f"{', '.join(f'{v:.2f}' for v in r['seeds'])} | {r['images_per_s']:.0f} | "
            f"{r['epoch_images_per_s']:.0f} | {r['latency_ms']:.2f} |")
    lines.append("")
    for family in dict.fromkeys(r["family"] for r in rows):
        base, bft = (next(r for r in rows if r["family"] == family and r["kind"] == k)
                     for k in ("baseline", "BFT"))
        lines.append(f"{LABELS[family]}: the BFT model executes {bft['macs'] / base['macs']:.2f}x "
                     "the baseline's multiply-adds at this one resolution (the paper pairs the "
                     "two at different resolutions to match them).")
    lines += ["", "Conditions (the machine may have been shared with other jobs; these are the "
              "numbers it measured):", ""]
    lines += [f"- {k}: {v}" for k, v in cond.items()]
    lines += ["", "Reproduce: `" + " ".join(["python -m benchmarks.accuracy", *argv]) + "`", ""]
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for family in dict.fromkeys(r["family"] for r in rows):
        pts = [r for r in rows if r["family"] == family]
        line, = ax.plot([r["macs"] / 1e6 for r in pts], [r["top1"] for r in pts], "-",
                        label=LABELS[family])
        for r in pts:
            marker = "*" if r["kind"] == "BFT" else "o"
            ax.errorbar(r["macs"] / 1e6, r["top1"], yerr=r["std"] or 0, fmt=marker,
                        color=line.get_color(), markersize=12 if marker == "*" else 7, capsize=3)
            ax.annotate(f"{r['model']} ({r['kind']})", (r["macs"] / 1e6, r["top1"]),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.plot([], [], "ko", label="baseline")
    ax.plot([], [], "k*", markersize=10, label="BFT")
    ax.set_xlabel("multiply-adds per image (millions, 28x28 input)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Fashion-MNIST: top-1 vs MACs")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.margins(x=0.25, y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    print(NOT_THE_REPRODUCTION, flush=True)
    cond = conditions(opts)
    started = time.perf_counter()
    rows = []
    jobs = [(family, kind, model) for family in opts.pairs
            for kind, model in zip(("baseline", "BFT"), PAIRS[family])]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (family, kind, model) in enumerate(jobs):
            runs = []
            for seed in opts.seeds:
                print(f"[{i * len(opts.seeds) + len(runs) + 1}/{len(jobs) * len(opts.seeds)}] "
                      f"training {model} ({kind}), seed {seed}", flush=True)
                try:
                    runs.append(train_model(model, seed, opts, opts.runs or tmp))
                except (CheckpointError, DataError) as err:
                    raise SystemExit(f"error: {err}") from err
            rows.append(dict(summarize(runs), family=family, model=model, kind=kind,
                             images_per_s=step_images_per_s(model, opts.batch_size),
                             latency_ms=latency_ms(model, opts.latency_repeats)))
    cond["load average after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    cond["wall time of the training and measurements"] = f"{time.perf_counter() - started:.0f} s"
    os.makedirs(opts.results, exist_ok=True)
    md_path = os.path.join(opts.results, "accuracy_fashion_mnist.md")
    png_path = os.path.join(opts.results, "accuracy_vs_macs.png")
    text = markdown(rows, cond, opts, argv)
    with open(md_path, "w") as f:
        f.write(text)
    plot(rows, png_path)
    print("\n" + text)
    print(f"table: {md_path}\nplot:  {png_path}")
    print("\n" + NOT_THE_REPRODUCTION)


if __name__ == "__main__":
    main()
