"""``--resume`` continues a run exactly: an option that would change what the checkpoint fixes is
refused with both values; ``--extend`` rebuilds the schedule from the new options on purpose;
``args.yaml`` holds the values in effect."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from test_train import DATA, TINY, _train
from train.args import parse_args
from train.checkpoint import load_checkpoint
from train.loop import run

pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found"),
              pytest.mark.usefixtures("one_thread")]
# Two steps per epoch, two epochs: a finished run.
DATA_ARGS = ["--train-subset", "64", "--val-subset", "40", "--batch-size", "32",
             "--no-log-tensorboard"]
SHORT = DATA_ARGS + ["--epochs", "2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    try:
        _train(SHORT + ["--output", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("extra, expected", [
    (["--epochs", "4"], "--epochs is 2 in the checkpoint, 4 on the command line"),
    (["--lr", "0.5"], "--lr is unset (lr from --lr-base) in the checkpoint, 0.5 on the command line"),
    (["--sched", "step"], "--sched is cosine in the checkpoint, step on the command line"),
    (["--seed", "3"], "--seed is 0 in the checkpoint, 3 on the command line"),
    (["--model-ema"], "--model-ema is off in the checkpoint, on on the command line"),
    (["--val-subset", "20"], "--val-subset is 40 in the checkpoint, 20 on the command line"),
])
def test_resume_refuses_options_that_the_checkpoint_fixes(finished, extra, expected, capsys):
    last = str(finished / "last.pth")
    err = _error(["--resume", last] + extra, capsys)
    assert expected in err, err
    assert "leave these options out" in err and f"--initial-checkpoint {last}" in err
    schedule = extra[0] in ("--epochs", "--lr", "--sched")
    assert ("add --extend" in err) == schedule, err


def test_resume_accepts_the_checkpoints_values_and_how_to_run_options(finished):
    last = str(finished / "last.pth")
    args = parse_args(["--resume", last, "--epochs", "2", "--seed", "0", "--workers", "0",
                       "--threads", "1", "--eval-batch-size", "7", "--no-progress"])
    assert (args.epochs, args.eval_batch_size) == (2, 7)


def test_extend_needs_resume_and_more_epochs(finished, tmp_path, capsys):
    assert "needs --resume" in _error(TINY + ["--extend", "--output", str(tmp_path)], capsys)
    err = _error(["--resume", str(finished / "last.pth"), "--extend", "--epochs", "2"], capsys)
    assert "finished 2 epochs" in err and "larger than 2" in err
    # --extend opens the schedule only: the data or the model stay fixed
    err = _error(["--resume", str(finished / "last.pth"), "--extend", "--epochs", "4",
                  "--train-subset", "32"], capsys)
    assert "--train-subset is 64 in the checkpoint, 32 on the command line" in err


def test_extend_trains_the_new_epochs_on_the_schedule_of_the_new_options(finished, tmp_path):
    run_dir = tmp_path / "extended"
    shutil.copytree(finished, run_dir)
    run(parse_args(["--resume", str(run_dir / "last.pth"), "--extend", "--epochs", "4"]))
    extended = load_checkpoint(str(run_dir / "last.pth"))
    assert [h["epoch"] for h in extended["history"]] == [1, 2, 3, 4]
    assert extended["global_step"] == 8 and extended["args"]["epochs"] == 4

    # As if the run had been planned for 4 epochs from the start: the same lr at every step after
    # the checkpoint (before the fix: the old 2-epoch schedule, lr 0 from epoch 3 on).
    planned = _train(DATA_ARGS + ["--epochs", "4", "--output", str(tmp_path / "planned")])
    lrs = [h["lr"] for h in extended["history"]]
    assert lrs[2] > 0 and lrs[3] > 0
    assert lrs[2:] == pytest.approx([h["lr"] for h in planned["history"]][2:], rel=1e-12)

    saved = yaml.safe_load((run_dir / "args.yaml").read_text())  # what was in effect
    assert saved["epochs"] == 4 and saved["extend"] is True
    assert saved["resume"] == str(run_dir / "last.pth")

    # A plain resume of the extended run continues its 4-epoch schedule, --extend is not inherited.
    args = parse_args(["--resume", str(run_dir / "last.pth")])
    assert args.epochs == 4 and not args.extend


def test_extend_with_a_new_lr_trains_at_that_lr(finished, tmp_path):
    run_dir = tmp_path / "lr"
    shutil.copytree(finished, run_dir)
    run(parse_args(["--resume", str(run_dir / "last.pth"), "--extend", "--epochs", "3",
                    "--lr", "0.05", "--sched", "constant", "--warmup-epochs", "0"]))
    history = load_checkpoint(str(run_dir / "last.pth"))["history"]
    assert history[2]["lr"] == pytest.approx(0.05)
    saved = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert (saved["lr"], saved["sched"], saved["epochs"]) == (0.05, "constant", 3)
