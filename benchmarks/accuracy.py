"""Top-1 of BFT models against baselines of about equal multiply-adds, on Fashion-MNIST.

    python -m benchmarks.accuracy                       # MobileNetV1 0.25 vs MobileNetV1-BFT 1.0
    python -m benchmarks.accuracy --pairs mobilenetv1 shufflenetv2 --seeds 0 1 2 --epochs 5

Every model of a pair trains with the same recipe, epochs, data and seeds (``python -m train``'s
Fashion-MNIST defaults, 28x28 inputs, small-input stem). Reported per model: top-1 on the
validation images (mean and standard deviation over seeds), MACs and parameters, training img/s
(batch / median SGD step on a random batch) and the epochs' img/s (data loading included), and
the median latency of one image (CPU, eval); steps and latencies of all models are timed together
by the harness. Writes ``accuracy_fashion_mnist.{json,md}`` and a plot of top-1 against MACs
(``accuracy_vs_macs.png``) into ``--results``.

The defaults (1 epoch on a fixed 10,000-image subset of the 60,000 training images, all 10,000
test images, 2 seeds) keep the job to a few minutes on 2 CPU cores. This is a smoke test (what
``quickstart.sh`` runs), not a test of the paper's claim: one epoch is far from convergence and
the pairs are not matched in multiply-adds. The reproduction is ``python -m benchmarks.reproduce``;
its results are in benchmarks/results/reproduction_fashion_mnist.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Dict, List

import torch

from benchmarks import harness
from train.checkpoint import CheckpointError
from train.data import DataError

PAIRS = {"mobilenetv1": ("mobilenetv1_025", "mobilenetv1_bft_100"),
         "shufflenetv2": ("shufflenetv2_050", "shufflenetv2_bft_125")}
LABELS = {"mobilenetv1": "MobileNetV1", "shufflenetv2": "ShuffleNetV2"}
NOT_THE_REPRODUCTION = (
    "NOTE: this is the quick smoke test (1 epoch, pairs not matched in multiply-adds), NOT the "
    "reproduction of the paper's claim. For that, run `python -m benchmarks.reproduce` (hours of "
    "CPU; results committed in benchmarks/results/reproduction_fashion_mnist.md).")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                description=__doc__.split("\n")[0],
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
    p.add_argument("--results", default=str(harness.RESULTS),
                   help="folder for the JSON, the markdown table and the plot")
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
            "--workers", str(opts.workers), "--device", "cpu",
            "--output", os.path.join(out_dir, f"{model}-seed{seed}")]
    argv += ["--val-subset", str(opts.val_subset)] if opts.val_subset else []
    argv += ["--data-dir", opts.data_dir] if opts.data_dir else []
    argv += ["--no-progress"] if opts.no_progress else []
    return run(train_args(argv))


def speeds(models: List[str], batch_size: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Per model: training img/s (batch / median SGD step on a random batch, robust to other
    jobs' bursts) and the median latency of one image, all models timed together."""
    from butterfly import param_groups
    from train.model import create_model
    steps = {}
    for name in models:
        train_net = create_model(name, 10, 1, small_input=True).train()
        opt = torch.optim.SGD(param_groups(train_net, 5e-5), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))

        def step(net=train_net, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        eval_net, one = create_model(name, 10, 1, small_input=True).eval(), torch.randn(1, 1, 28, 28)
        steps[(name, "train")] = step
        steps[(name, "latency")] = torch.inference_mode()(lambda net=eval_net, x=one: net(x))
    times, failed = harness.interleave(
        {k: v for k, v in steps.items() if k[1] == "train"}, harness.Timing(1, 30, 0, 0.05))
    lat, failed2 = harness.interleave(
        {k: v for k, v in steps.items() if k[1] == "latency"}, harness.Timing(1, repeats, 0, 0.01))
    if failed or failed2:
        raise SystemExit(f"error: {failed or failed2}")
    return {name: {"images_per_s": batch_size / statistics.median(times[(name, "train")]),
                   "latency_ms": harness.summary(lat[(name, "latency")])["ms"]}
            for name in models}


def markdown(data: Dict) -> List[str]:
    o = data["options"]
    rows = []
    for r in data["cells"].values():
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        rows.append([LABELS[r["family"]], f"`{r['model']}`", r["kind"], f"{r['macs'] / 1e6:.2f}",
                     f"{r['params'] / 1e6:.3f}", f"{r['top1']:.2f}{spread}",
                     ", ".join(f"{v:.2f}" for v in r["seeds"]), f"{r['images_per_s']:.0f}",
                     f"{r['epoch_images_per_s']:.0f}", f"{r['latency_ms']:.2f}"])
    lines = ["# Accuracy vs multiply-adds on Fashion-MNIST: baselines and BFT models", "",
             "A smoke test, not the reproduction of the paper's claim: see "
             "[reproduction_fashion_mnist.md](reproduction_fashion_mnist.md) "
             "(`python -m benchmarks.reproduce`).", "",
             f"{o['epochs']} epoch(s) on {o['train_subset']} training images (a fixed subset), "
             f"top-1 on {o['val_subset'] or 10000} test images, 28x28 input with the small-input "
             f"stem, batch {o['batch_size']}, the `fashion-mnist` recipe of `python -m train` "
             f"(SGD, cosine), seeds {' '.join(map(str, o['seeds']))}. Top-1: mean over the seeds "
             "± their standard deviation. Train img/s: batch size / median SGD step; epoch "
             "img/s: the training epochs' average, data loading included. Latency: median of "
             "one forward pass on one image (CPU, eval).", "",
             *harness.table(["family", "model", "kind", "MMACs", "params (M)", "top-1 %",
                             "top-1 per seed", "train img/s", "epoch img/s", "latency ms"], rows),
             ""]
    cells = list(data["cells"].values())
    for family in dict.fromkeys(r["family"] for r in cells):
        base, bft = (next(r for r in cells if r["family"] == family and r["kind"] == k)
                     for k in ("baseline", "BFT"))
        lines.append(f"{LABELS[family]}: the BFT model executes {bft['macs'] / base['macs']:.2f}x "
                     "the baseline's multiply-adds at this one resolution (the paper pairs the "
                     "two at different resolutions to match them).")
    return lines + ["", *harness.runs_section(data)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    print(NOT_THE_REPRODUCTION, flush=True)
    store = harness.Store(os.path.join(opts.results, "accuracy_fashion_mnist.json"), "accuracy",
                          keep=False)
    store.start("accuracy", argv)
    store.data["options"] = {k: getattr(opts, k) for k in ("epochs", "seeds", "train_subset",
                                                          "val_subset", "batch_size")}
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
            top1 = [r["val_top1"] for r in runs]
            store.put(model, {"family": family, "model": model, "kind": kind, "status": "ok",
                              "top1": statistics.mean(top1), "seeds": top1,
                              "std": statistics.stdev(top1) if len(top1) > 1 else None,
                              "macs": runs[0]["macs"], "params": runs[0]["params"],
                              "epoch_images_per_s": statistics.mean(
                                  r["train_images_per_s"] for r in runs)})
    for model, speed in speeds([m for _, _, m in jobs], opts.batch_size,
                               opts.latency_repeats).items():
        store.cells[model].update(speed)
    store.save()
    lines = markdown(store.data)
    harness.write_report(os.path.join(opts.results, "accuracy_fashion_mnist.md"), lines)
    cells = list(store.cells.values())
    harness.scatter([{"family": LABELS[r["family"]], "bft": r["kind"] == "BFT", "x": r["macs"] / 1e6,
                      "y": r["top1"], "yerr": r["std"], "label": f"{r['model']} ({r['kind']})"}
                     for r in cells], os.path.join(opts.results, "accuracy_vs_macs.png"),
                    "multiply-adds per image (millions, 28x28 input)", "top-1 accuracy (%)",
                    "Fashion-MNIST: top-1 vs MACs")
    print("\n" + "\n".join(lines) + "\n\n" + NOT_THE_REPRODUCTION)


if __name__ == "__main__":
    main()
