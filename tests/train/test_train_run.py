"""What a run writes and refuses: a diverged run stops and keeps its good checkpoint, stale
temporary files go, TensorBoard curves and args.yaml, --initial-checkpoint, the thread-count
warning on resume, and ``python -m train.evaluate`` (verified checkpoints, its own options, the
results file)."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from test_train import DATA, TINY, _cli, _small_checkpoint, _train
from train import evaluate
from train.args import parse_args
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train.distributed import setup
from train.loop import Trainer, TrainingError, run
from train.model import create_model
from train.rundir import LOCK_FILE, OutputError, remove_stale_temps

pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found"),
              pytest.mark.usefixtures("one_thread")]
SHORT = ["--train-subset", "64", "--val-subset", "40", "--batch-size", "32", "--epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run (one epoch, two steps) with TensorBoard; its folder."""
    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    try:
        _train(SHORT + ["--log-tensorboard", "--output", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------- divergence
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = torch.nn.CrossEntropyLoss.forward

    def nan_from_step_4(self, *args):  # two steps per epoch: epoch 2 step 2 goes wrong
        calls["n"] += 1
        loss = forward(self, *args)
        return loss * float("nan") if calls["n"] >= 4 else loss
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_from_step_4)
    args = parse_args(TINY + SHORT[:-1] + ["3", "--output", str(tmp_path)])
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, step 2.*last good checkpoint"):
        run(args)
    state = load_checkpoint(str(tmp_path / "last.pth"))  # intact, and from the end of epoch 1
    assert state["global_step"] == 2 and len(state["history"]) == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 1


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = Trainer(parse_args(TINY + SHORT + ["--output", str(tmp_path)]), setup("cpu"))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="no longer finite"):
        trainer.save(best=True)
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "best.pth").exists()


def test_cli_huge_lr_stops_with_a_clear_error(tmp_path):
    proc = _cli([sys.executable, "-m", "train", *TINY, *SHORT, "--lr", "1e30", "--warmup-epochs",
                 "0", "--no-log-tensorboard", "--output", str(tmp_path)])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: the training loss is" in proc.stderr and "diverged" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "last.pth").exists()


# ------------------------------------------------------------------------- temporary files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_are_removed_at_start_and_on_save(tmp_path):
    start = time.time()
    stale = [f".last.pth.tmp{_dead_pid()}", f".best.pth.tmp{os.getpid()}"]
    old_live = ".metrics.json.tmp1"  # pid 1 is alive, but the file is older than the run
    fresh_live, other = ".args.yaml.tmp1", ".notes.txt.tmp1"
    for name in stale + [old_live, fresh_live, other]:
        (tmp_path / name).write_bytes(b"partial")
    os.utime(tmp_path / old_live, (start - 3600, start - 3600))
    assert sorted(remove_stale_temps(str(tmp_path), start)) == sorted(stale + [old_live])
    assert sorted(os.listdir(tmp_path)) == sorted([fresh_live, other])

    out = tmp_path / "run"
    out.mkdir()
    (out / f".last.pth.tmp{_dead_pid()}").write_bytes(b"partial")
    trainer = Trainer(parse_args(TINY + SHORT + ["--output", str(out)]), setup("cpu"))
    assert os.listdir(out) == [LOCK_FILE]  # at the start
    (out / f".last.pth.tmp{_dead_pid()}").write_bytes(b"partial")
    trainer.save()
    trainer.close()
    assert sorted(os.listdir(out)) == [LOCK_FILE, "last.pth"]  # and on saving


# ------------------------------------------------------------------------------ full disk
def _enforce_fail(state, f):
    """What torch.save raises when the disk fills: its zip writer's error, chained to ENOSPC."""
    f.write(b"PK\x03\x04 partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as err:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs "
                           "0") from err


def _dev_full(state, f, save=torch.save):
    """A real ENOSPC inside torch.save: the state goes to /dev/full."""
    with open("/dev/full", "wb") as full:
        save(state, full)


@pytest.mark.parametrize("fill", [_enforce_fail, pytest.param(_dev_full, marks=pytest.mark.skipif(
    not os.path.exists("/dev/full"), reason="no /dev/full"))])
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(tmp_path, monkeypatch,
                                                                         fill):
    from train import checkpoint
    trainer = Trainer(parse_args(TINY + SHORT + ["--output", str(tmp_path)]), setup("cpu"))
    trainer.save(best=True)
    before = (tmp_path / "last.pth").read_bytes()
    monkeypatch.setattr(checkpoint.torch, "save", fill)
    with pytest.raises(OutputError) as info:
        trainer.save(best=True)
    trainer.close()
    text = str(info.value)
    last = tmp_path / "last.pth"
    assert text.startswith(f"the disk is full: {last} could not be written"), text
    assert f"no space left on the device of {tmp_path}" in text and "free there now" in text
    assert re.search(r"the file needs about \d+\.\d (KB|MB)", text)  # its tensors' size
    assert f"The previous {last} was kept intact" in text and "--resume it" in text
    assert last.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE, "best.pth", "last.pth"]  # no partial file


def test_a_full_disk_on_any_run_file_says_so(tmp_path, monkeypatch):
    """Metrics, args.yaml, best.pth and evaluate's results go through the same writer."""
    from train import metrics, rundir
    real = rundir.os.replace

    def full(src, dst):
        if dst.endswith("metrics.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        real(src, dst)
    monkeypatch.setattr(rundir.os, "replace", full)
    with pytest.raises(OutputError, match=r"the disk is full: .*metrics.csv could not be written .*"
                                          r"No earlier metrics.csv was there"):
        metrics.write_history([{"epoch": 1, "val_top1": 50.0}], str(tmp_path))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- what a run writes
def test_run_writes_args_yaml_and_tensorboard_curves(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    saved = yaml.safe_load((trained / "args.yaml").read_text())
    assert saved["model"] == "mobilenetv1_025" and saved["epochs"] == 1 and saved["threads"] == 1
    events = [n for n in os.listdir(trained) if n.startswith("events.out.tfevents.")]
    assert len(events) == 1
    acc = EventAccumulator(str(trained))
    acc.Reload()
    metrics = json.loads((trained / "metrics.json").read_text())[0]
    for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"), ("val/top1", "val_top1"),
                     ("val/loss", "val_loss")):
        (event,) = acc.Scalars(tag)
        assert event.step == 1 and event.value == pytest.approx(metrics[key], rel=1e-6)


def test_no_log_tensorboard_writes_no_events(tmp_path):
    _train(SHORT + ["--no-log-tensorboard", "--output", str(tmp_path)])
    assert not [n for n in os.listdir(tmp_path) if n.startswith("events.")]
    assert (tmp_path / "args.yaml").exists()


# ------------------------------------------------------------------------ thread count
def test_checkpoint_records_threads_and_resume_with_others_warns(trained, tmp_path, caplog):
    import shutil
    shutil.copytree(trained, tmp_path / "run")
    last = str(tmp_path / "run" / "last.pth")
    assert load_checkpoint(last)["threads"] == 1
    caplog.set_level(logging.INFO, logger="train")
    run(parse_args(["--resume", last, "--no-log-tensorboard"]))
    assert "not be bit-exact" not in caplog.text
    run(parse_args(["--resume", last, "--threads", "2", "--no-log-tensorboard"]))
    assert "written with 1 torch threads and this run uses 2" in caplog.text
    assert "not be bit-exact" in caplog.text and "--threads 1" in caplog.text


# ---------------------------------------------------------------------- --initial-checkpoint
def _weights(seed=1):
    torch.manual_seed(seed)
    model = create_model("mobilenetv1_025", 10, 1, small_input=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def test_initial_checkpoint_loads_the_weights_only(tmp_path):
    weights = _weights()
    save_checkpoint({"args": {}, "model": weights, "epoch": 7}, str(tmp_path / "ours.pth"))
    torch.save(weights, tmp_path / "plain.pth")
    for i, name in enumerate(("ours.pth", "plain.pth")):
        args = parse_args(TINY + SHORT + ["--initial-checkpoint", str(tmp_path / name),
                                          "--output", str(tmp_path / f"run{i}")])
        trainer = Trainer(args, setup("cpu"))
        assert trainer.epoch == 0 and trainer.global_step == 0
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, weights[key]), key


def test_initial_checkpoint_that_does_not_fit_or_is_damaged_is_refused(tmp_path, capsys):
    path = str(tmp_path / "ours.pth")
    save_checkpoint({"args": {}, "model": _weights()}, path)
    args = parse_args(TINY + SHORT + ["--model", "mobilenetv1_050", "--initial-checkpoint", path,
                                      "--output", str(tmp_path / "run")])
    with pytest.raises(CheckpointError, match=r"does not fit the model \(other shape: "):
        Trainer(args, setup("cpu"))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "flipped.pth").write_bytes(bytes(data))
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--initial-checkpoint", str(tmp_path / "flipped.pth")])
    assert "SHA-256" in capsys.readouterr().err


# ---------------------------------------------------------------------------- evaluation
def test_evaluate_refuses_a_corrupted_checkpoint(tmp_path):
    good = str(tmp_path / "good.pth")
    _small_checkpoint(good)
    data = bytearray(open(good, "rb").read())
    data[len(data) // 2] ^= 0x01  # a bit of the weights
    (tmp_path / "flipped.pth").write_bytes(bytes(data))
    proc = _cli([sys.executable, "-m", "train.evaluate", "--checkpoint",
                 str(tmp_path / "flipped.pth")], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "SHA-256" in proc.stderr and "not evaluated" in proc.stderr and "loss=" not in proc.stdout


def test_evaluate_uses_its_own_options_and_writes_a_results_file(trained, tmp_path):
    checkpoint = str(trained / "best.pth")
    args = evaluate.parse_args(["--checkpoint", checkpoint, "--workers", "0", "--threads", "1"])
    assert args.val_subset is None  # the training run's --val-subset 40 is not inherited
    assert (args.model, args.dataset) == ("mobilenetv1_025", "fashion-mnist")
    results = tmp_path / "results" / "eval.json"
    args = evaluate.parse_args(["--checkpoint", checkpoint, "--workers", "0", "--threads", "1",
                                "--val-subset", "40", "--results-file", str(results)])
    result = evaluate.run(args)
    saved = json.loads(results.read_text())
    assert {"model", "checkpoint", "top1", "top5", "loss", "images", "img_size"} <= set(saved)
    assert (saved["model"], saved["images"], saved["img_size"]) == ("mobilenetv1_025", 40, 28)
    assert saved["checkpoint"] == os.path.abspath(checkpoint)
    assert saved["top1"] == pytest.approx(result["top1"], abs=1e-4)
    metrics = json.loads((trained / "metrics.json").read_text())[0]
    assert saved["top1"] == pytest.approx(metrics["val_top1"], abs=1e-4)  # the same 40 images


def test_evaluate_checks_the_results_file_before_any_work(trained, tmp_path, monkeypatch, capsys):
    from train import rundir

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the results file was checked")
    monkeypatch.setattr(evaluate, "load_checkpoint", no_work)
    checkpoint = str(trained / "best.pth")
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()

    def error(path) -> str:
        with pytest.raises(SystemExit) as info:
            evaluate.parse_args(["--checkpoint", checkpoint, "--results-file", str(path)])
        assert info.value.code == 2
        return capsys.readouterr().err
    assert "is a folder; give a file name" in error(tmp_path)
    assert "cannot be created" in error(tmp_path / "file" / "r.json")

    real = rundir.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):  # the tests may run as root: chmod would not stop it
        if dir == str(tmp_path / "folder"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", read_only)
    err = error(tmp_path / "folder" / "r.json")
    assert f"its folder {tmp_path / 'folder'} is not writable (Read-only file system)" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_evaluate_refuses_a_results_file_in_a_read_only_folder(trained, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--checkpoint", str(trained / "best.pth"), "--results-file",
                                 str(folder / "r.json")])
        assert "is not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


def test_weights_saved_before_bft_layouts_were_recorded_still_load():
    """A state_dict without the BFTs' layout record (_extra_state) loads; a different layout
    does not."""
    import butterfly
    from train.checkpoint import load_weights
    model = torch.nn.Sequential(butterfly.BFT(24, 24), torch.nn.BatchNorm2d(24))
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    fresh = torch.nn.Sequential(butterfly.BFT(24, 24), torch.nn.BatchNorm2d(24))
    load_weights(fresh, {"model": old}, "old.pth")
    assert torch.equal(fresh[0].weight, model[0].weight)
    other = torch.nn.Sequential(butterfly.BFT(24, 24, residual=False), torch.nn.BatchNorm2d(24))
    with pytest.raises(RuntimeError, match="layout"):
        load_weights(other, {"model": model.state_dict()}, "new.pth")
