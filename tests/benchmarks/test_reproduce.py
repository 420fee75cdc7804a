"""``python -m benchmarks.reproduce``: end to end on a tiny budget, the computed MAC matching, a
killed-and-restarted reproduction giving the numbers of an uninterrupted one, and a family
trained alone keeping the others' results.

The runs use a tiny synthetic Fashion-MNIST (IDX files written here: 192 training images, 32 of
them held out for validation, 64 test images), one epoch, one seed, one learning rate.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import reproduce

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_argv(data: str, runs: str, results: str, *extra: str) -> list:
    return ["--families", "mobilenetv1", "--epochs", "1", "--seeds", "0", "--lrs", "0.1",
            "--val-holdout", "32", "--batch-size", "32", "--checkpoint-every", "2",
            "--data-dir", data, "--runs", runs, "--results", results, "--speed-seconds", "0",
            "--latency-repeats", "2", "--no-plots", *extra]


def numbers(doc: dict) -> list:
    """What a reproduction measured, without its timings."""
    keep = ("model", "seeds", "top1", "test_loss", "val_top1", "val_curves", "train_loss_curves",
            "lr", "lr_sweep", "macs", "params")
    return [{k: r[k] for k in keep} for r in doc["runs"]]


def run_one_thread(argv: list) -> None:
    """The command in this process with one torch thread, as its runs use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert reproduce.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    results = str(root / "results")
    run_one_thread(tiny_argv(tiny_data, str(root / "runs"), results))
    with open(os.path.join(results, "reproduction_fashion_mnist.json")) as f:
        return results, json.load(f)


@pytest.mark.slow
def test_end_to_end_writes_md_and_json(uninterrupted, tmp_path):
    results, doc = uninterrupted
    assert doc["format"] == reproduce.FORMAT
    assert [r["model"] for r in doc["runs"]] == ["mobilenetv1_025", "mobilenetv1_bft_100"]
    for r in doc["runs"]:
        assert {"family", "model", "kind", "macs", "params", "epochs", "train_images", "seeds",
                "top1", "lr"} <= set(r)
        assert r["family"] == "mobilenetv1" and r["kind"] in ("baseline", "bft")
        assert r["epochs"] == 1 and r["train_images"] == 160 and r["seeds"] == [0]
        assert len(r["top1"]) == 1 and 0 <= r["top1"][0] <= 100 and r["lr"] == 0.1
        assert r["lr_sweep"] == [{"lr": 0.1, "seed": 0, "val_top1": r["val_top1"][0]}]
        assert r["latency_ms"] > 0 and r["complete"]
        assert set(r["latency_paths_ms"]) == set(reproduce.LATENCY_PATHS)
        assert r["latency_ms"] == min(r["latency_paths_ms"].values())
        assert r["latency_paths_ms"][r["latency_path"]] == r["latency_ms"]
        assert len(r["val_curves"]["0"]) == 1
    macs = {r["model"]: r["macs"] for r in doc["runs"]}
    pair = doc["pairs"][0]
    assert macs == {"mobilenetv1_025": pair["baseline_macs"], "mobilenetv1_bft_100": pair["bft_macs"]}
    cmp = doc["comparisons"][0]
    assert cmp["n"] == 1 and cmp["diff"] == [doc["runs"][1]["top1"][0] - doc["runs"][0]["top1"][0]]
    text = open(os.path.join(results, "reproduction_fashion_mnist.md")).read()
    assert "Status: complete" in text and "python -m benchmarks.reproduce" in text
    assert "mobilenetv1_bft_100" in text and "## Verdict" in text
    written = reproduce.plots(doc, str(tmp_path))
    assert {os.path.basename(p) for p in written} == {
        "reproduction_val_curves.png", "reproduction_lr_sweep.png", "reproduction_top1_vs_macs.png",
        "reproduction_top1_vs_latency.png"}


def test_mac_matching_is_computed_and_enforced(tiny_data, tmp_path):
    info = reproduce.match_pair("mobilenetv1_025", 28, "mobilenetv1_bft_100", 24)
    assert abs(info["macs_ratio"] - 1) <= 0.05
    assert info["bft_macs"] == reproduce.model_cost("mobilenetv1_bft_100", 24)[0]
    with pytest.raises(reproduce.PairMismatch, match="outside"):
        reproduce.match_pair("mobilenetv1_025", 28, "mobilenetv1_bft_100", 28)  # +38%
    with pytest.raises(reproduce.PairMismatch):
        reproduce.match_pair("shufflenetv2_050", 32, "shufflenetv2_bft_125", 28)  # -9.9%
    # The command refuses a mismatched pair before it trains anything.
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match="pair refused"):
        reproduce.main(tiny_argv(tiny_data, str(runs), str(tmp_path / "res"),
                                 "--img-size", "mobilenetv1_bft_100=28"))
    assert not any(p.name != "driver.lock" for p in runs.iterdir())


@pytest.mark.slow
def test_killed_and_restarted_gives_the_same_numbers(uninterrupted, tiny_data, tmp_path):
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    argv = tiny_argv(tiny_data, runs, results, "--parallel", "1")
    # The second run is killed after 3 of its 5 steps (a checkpoint was written after step 2),
    # and the command kills itself with it: the first run is finished, the second is not.
    killed = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", *argv, "--debug-kill", "1:3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    folders = sorted(os.listdir(runs))
    first, second = [f for f in folders if f.startswith("mobilenetv1_")]
    assert os.path.isfile(os.path.join(runs, first, "result.json"))
    assert not os.path.isfile(os.path.join(runs, second, "result.json"))
    assert os.path.isfile(os.path.join(runs, second, "train", "last.pth"))
    partial = json.load(open(os.path.join(results, "reproduction_fashion_mnist.json")))
    assert not partial["progress"]["main_complete"] and partial["runs"][0]["top1"]

    before = os.path.getmtime(os.path.join(runs, first, "result.json"))
    run_one_thread(argv)
    assert os.path.getmtime(os.path.join(runs, first, "result.json")) == before  # skipped
    log = open(os.path.join(runs, second, "worker.log")).read()
    assert "resumed from epoch 1 step 2" in log
    resumed = json.load(open(os.path.join(results, "reproduction_fashion_mnist.json")))
    assert numbers(resumed) == numbers(uninterrupted[1])


@pytest.mark.slow
def test_a_family_trained_alone_keeps_the_others(uninterrupted, tiny_data, tmp_path):
    """--families shufflenetv2 into a results folder holding mobilenetv1: both end up in the
    file, mobilenetv1's numbers untouched and its provenance recorded; with other training
    settings the old family is dropped instead of being mixed in."""
    import shutil
    plain_results, plain = uninterrupted
    results = str(tmp_path / "results")
    shutil.copytree(plain_results, results)
    argv = tiny_argv(tiny_data, str(tmp_path / "runs"), results)
    argv[argv.index("mobilenetv1")] = "shufflenetv2"
    run_one_thread(argv)
    doc = json.load(open(os.path.join(results, "reproduction_fashion_mnist.json")))
    assert [c["family"] for c in doc["comparisons"]] == ["mobilenetv1", "shufflenetv2"]
    assert [r["model"] for r in doc["runs"]] == [
        "mobilenetv1_025", "mobilenetv1_bft_100", "shufflenetv2_050", "shufflenetv2_bft_125"]
    assert numbers({"runs": doc["runs"][:2]}) == numbers(plain)
    assert doc["comparisons"][0] == plain["comparisons"][0]
    assert [p["baseline"] for p in doc["pairs"]] == ["mobilenetv1_025", "shufflenetv2_050"]
    assert doc["kept"]["mobilenetv1"]["command"] == plain["command"]
    assert doc["progress"]["main_runs_finished"] == doc["progress"]["main_runs_planned"] == 4
    assert doc["progress"]["main_complete"]
    # the kept family's latency is measured again with the new one's (every path)
    for r in doc["runs"]:
        assert set(r["latency_paths_ms"]) == set(reproduce.LATENCY_PATHS), r["model"]
    text = open(os.path.join(results, "reproduction_fashion_mnist.md")).read()
    assert "kept because this run's --families left it out" in text
    assert "Status: complete" in text

    # other training settings: the earlier families are not kept
    config = reproduce.run_config(reproduce.parse_args(argv + ["--epochs", "2"]), 160, 64)
    assert reproduce.earlier_families(reproduce.parse_args(argv), config) == {}
    same = reproduce.run_config(reproduce.parse_args(argv), 160, 64)
    assert set(reproduce.earlier_families(reproduce.parse_args(argv), same)) == {"mobilenetv1"}


def test_variants_register_bft_options():
    spec = reproduce.canonical_variant("residual=0,init=ortho")
    assert spec == "init=ortho,residual=false"
    name = reproduce.register_variant("mobilenetv1_bft_100", spec)
    from butterfly import is_bft
    from train.model import create_model
    bfts = [m for m in create_model(name, 10, 1, small_input=True).modules() if is_bft(m)]
    assert bfts and all(m.init == "ortho" and not m.residual for m in bfts)
    assert reproduce.variant_model_name("mobilenetv1_bft_100", "wd=0.0") == "mobilenetv1_bft_100"
    with pytest.raises(ValueError):
        reproduce.canonical_variant("init=xavier")


def test_training_variants_reach_the_trainer_and_leave_main_runs_alone():
    """``bft_wd`` / ``bft_lr`` add their ``python -m train`` options to an ablation's run only:
    a main run's options, and so its folder's digest, are those it always had."""
    opts = reproduce.parse_args([])
    spec = reproduce.canonical_variant("bft_lr=0.5,bft_wd=1e-4")
    main = reproduce.Job("mobilenetv1", "bft", "mobilenetv1_bft_100", 24, 0.1, 0)
    ablation = reproduce.Job("mobilenetv1", "bft", "mobilenetv1_bft_100", 24, 0.1, 0, spec)
    argv = ablation.train_argv(opts, None)
    assert argv[argv.index("--bft-weight-decay") + 1] == "0.0001"
    assert argv[argv.index("--bft-lr-scale") + 1] == "0.5"
    assert "--eval-test" not in argv
    main_argv = main.train_argv(opts, None)
    assert "--bft-weight-decay" not in main_argv and "--bft-lr-scale" not in main_argv
    from train.args import parse_args as train_args
    parsed = train_args(argv)
    assert parsed.bft_weight_decay == 1e-4 and parsed.bft_lr_scale == 0.5


def test_render_redraws_the_committed_results(tmp_path):
    """--render draws the md from the JSON alone: every model's test top-1 and latency, and
    every family's paired difference, as the JSON holds them."""
    import shutil
    committed = os.path.join(REPO, "benchmarks", "results", "reproduction_fashion_mnist.json")
    shutil.copy(committed, tmp_path)
    assert reproduce.main(["--render", str(tmp_path / os.path.basename(committed))]) == 0
    doc = json.load(open(committed))
    text = open(tmp_path / "reproduction_fashion_mnist.md").read()
    assert not list(tmp_path.glob("*.png"))  # another file than --results': no plots
    for r in doc["runs"]:
        row = next(ln for ln in text.splitlines() if ln.startswith(
            f"| {reproduce.FAMILIES[r['family']].label} | `{r['model']}` |"))
        assert reproduce._pm(r["top1"]) in row and f"{r['latency_ms']:.2f}" in row
    for c in doc["comparisons"]:
        assert f"paired difference {c['mean']:+.2f}" in text
    with pytest.raises(SystemExit):
        reproduce.main(["--render", str(tmp_path / "missing.json")])
