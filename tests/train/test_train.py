"""``python -m train`` / ``python -m train.evaluate`` on real Fashion-MNIST images: it learns, the
ImageFolder path works end to end, two gloo ranks agree, a killed run resumes exactly, damaged
checkpoints and bad arguments fail with a clear message before any work."""
from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from butterfly import is_bft
from train.args import parse_args
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import FashionMNIST, find_fashion_mnist
from train.loop import Trainer, run
from train.distributed import setup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = find_fashion_mnist(None)
pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found: apt-get install "
                                                      "dataset-fashion-mnist"),
              pytest.mark.usefixtures("one_thread")]
TINY = ["--model", "mobilenetv1_025", "--device", "cpu", "--workers", "0", "--threads", "1",
        "--no-progress"]


def _cli(args, timeout=240, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(argv):
    return run(parse_args(TINY + argv))


def test_short_training_lowers_loss_and_beats_chance(tmp_path):
    result = _train(["--train-subset", "2048", "--val-subset", "1000", "--batch-size", "32",
                     "--epochs", "2", "--output", str(tmp_path)])
    history = load_checkpoint(str(tmp_path / "last.pth"))["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"] < math.log(10)
    assert result["val_loss"] < math.log(10) - 0.5
    assert result["val_top1"] > 50, result  # chance is 10%
    assert 0 < result["macs"] < 10e6 and result["params"] > 0
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 3
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "best.pth").exists()


def make_imagefolder(root, splits):
    """An ImageFolder tree of Fashion-MNIST t10k images: ``splits`` maps a split to its indices."""
    from PIL import Image
    val = FashionMNIST(DATA, "val")
    for split, indices in splits.items():
        for i in indices:
            folder = root / split / val.classes[int(val.targets[i])].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(val.images[i].numpy()).save(folder / f"{i}.png")
    return root


def test_imagefolder_end_to_end(tmp_path):
    make_imagefolder(tmp_path / "data", {"train": range(0, 256), "val": range(256, 356)})
    out = tmp_path / "run"
    result = _train(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                     "--img-size", "28", "--small-input", "--batch-size", "32", "--epochs", "1",
                     "--output", str(out)])
    assert math.isfinite(result["train_loss"]) and result["val_top1"] >= 0

    from train import evaluate
    args = evaluate.parse_args(["--checkpoint", str(out / "best.pth"), "--workers", "0"])
    assert (args.model, args.dataset, args.img_size) == ("mobilenetv1_025", "imagefolder", 28)
    again = evaluate.run(args)
    assert again["images"] == 100  # the val folder, read back through timm's eval transform
    assert again["top1"] == pytest.approx(result["val_top1"])
    assert again["loss"] == pytest.approx(result["val_loss"], rel=1e-5)


def test_torchrun_two_gloo_ranks_agree_on_weights(tmp_path):
    proc = _cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", str(_free_port()), "-m", "train", *TINY, "--train-subset", "256",
                 "--val-subset", "64", "--batch-size", "16", "--epochs", "1", "--print-digest",
                 "--output", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = dict(re.findall(r"digest rank=(\d) ([0-9a-f]{64})", proc.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], proc.stdout
    assert proc.stdout.count("summary model=") == 1  # only rank 0 reports
    state = load_checkpoint(str(tmp_path / "last.pth"))
    assert state["world_size"] == 2 and state["global_step"] == 256 // (16 * 2)


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    # Dropout, mixup and EMA all draw random numbers or carry state across steps.
    common = ["--train-subset", "256", "--val-subset", "64", "--batch-size", "32", "--epochs", "2",
              "--drop", "0.2", "--mixup", "0.2", "--model-ema", "--checkpoint-every", "3"]
    _train(common + ["--output", str(tmp_path / "whole")])

    killed = tmp_path / "killed"
    argv = [a for a in TINY + common if a not in ("--workers", "0")]
    proc = _cli([sys.executable, "-m", "train", *argv, "--workers", "2", "--stop-after-steps", "5",
                 "--output", str(killed)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(str(killed / "last.pth"))["global_step"] == 3  # mid-epoch 1 of 8 steps
    run(parse_args(["--resume", str(killed / "last.pth"), "--workers", "0"]))

    a = load_checkpoint(str(tmp_path / "whole" / "last.pth"))
    b = load_checkpoint(str(killed / "last.pth"))
    assert a["global_step"] == b["global_step"] == 16
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for ha, hb in zip(a["history"], b["history"]):  # all but the throughput agree exactly
        assert {k: v for k, v in ha.items() if "per_s" not in k} == \
               {k: v for k, v in hb.items() if "per_s" not in k}


def _small_checkpoint(path):
    save_checkpoint({"args": {"model": "mobilenetv1_025"}, "model": {"w": torch.randn(1000)}}, path)


def test_truncated_or_corrupted_checkpoint_raises_clear_error(tmp_path, capsys):
    good = str(tmp_path / "good.pth")
    _small_checkpoint(good)
    assert load_checkpoint(good)["args"]["model"] == "mobilenetv1_025"
    data = open(good, "rb").read()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    (tmp_path / "flipped.pth").write_bytes(bytes(flipped))
    for name, message in (("truncated.pth", "truncated or corrupted"), ("flipped.pth", "SHA-256")):
        with pytest.raises(SystemExit) as info:
            parse_args(["--resume", str(tmp_path / name)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "not resumed" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--batch-size", "0"], "expected a positive integer, got 0"),
    (["--data-dir", "/no/such/folder"], "does not exist"),
    (["--dataset", "imagefolder"], "needs --data-dir"),
    (["--resume", "/no/such/last.pth"], "does not exist"),
])
def test_bad_arguments_fail_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv + ["--output", str(tmp_path / "out")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_arguments(tmp_path):
    (tmp_path / "val").mkdir()
    proc = _cli([sys.executable, "-m", "train", "--dataset", "imagefolder", "--data-dir",
                 str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "train is missing" in proc.stderr, proc.stderr


def test_recipes_are_defaults_that_options_override():
    args = parse_args(["--recipe", "mobilenetv1"])
    assert (args.epochs, args.sched, args.decay_milestones, args.weight_decay, args.lr_base) == \
           (170, "multistep", [140, 160], 1e-5, 0.5)
    args = parse_args(["--recipe", "shufflenetv2", "--epochs", "3", "--lr", "0.1"])
    assert (args.epochs, args.sched, args.lr, args.lr_explicit) == (3, "poly", 0.1, True)
    args = parse_args(["--recipe", "mobilenetv3"])
    assert (args.warmup_epochs, args.warmup_lr, args.warmup_prefix, args.epochs) == (5, 0.1, True, 200)


def test_bft_weights_get_no_weight_decay(tmp_path):
    args = parse_args(TINY + ["--model", "mobilenetv1_bft_100", "--train-subset", "64",
                              "--val-subset", "16", "--batch-size", "32", "--weight-decay", "0.1",
                              "--output", str(tmp_path)])
    trainer = Trainer(args, setup("cpu"))
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    bft = [m.weight for m in trainer.model.modules() if is_bft(m)]
    assert bft and all(decay[id(w)] == 0.0 for w in bft)
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(decay[id(w)] == 0.1 for w in convs)
    # The recipe's lr is for a batch of 32; it scales with the global batch.
    assert trainer.lr == pytest.approx(0.1 * 32 / 32)


def test_fashion_mnist_lookup_order_and_missing_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    from train import data
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout inside --data-dir
    raw.mkdir(parents=True)
    for pair in data.FASHION_MNIST_FILES.values():
        for name in pair:
            (raw / f"{name}.gz").symlink_to(os.path.join(DATA, f"{name}.gz"))
    assert data.find_fashion_mnist(str(tmp_path)) == str(tmp_path)
    assert data.find_fashion_mnist(str(tmp_path / "FashionMNIST")) == DATA  # falls back

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    args = parse_args(["--data-dir", str(tmp_path / "FashionMNIST")])
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.describe(args)
