"""``python -m train`` options: the run folder is never clobbered, ``--help`` shows what each recipe
sets, argument errors for this machine's devices and for data folders, thread and worker defaults."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from test_train import DATA, TINY, _cli, make_imagefolder
from train import args as train_args
from train.args import build_parser, parse_args
from train.distributed import setup
from train.loop import Trainer
from train.rundir import LOCK_FILE, OutputError

pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found"),
              pytest.mark.usefixtures("one_thread")]


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------ the run folder
def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pth", "best.pth", "metrics.json", "notes.txt"):
        (out / name).write_text("earlier run")
    err = _error(TINY + ["--output", str(out)], capsys)
    assert "already holds files" in err and "--overwrite" in err
    assert f"--resume {out / 'last.pth'}" in err
    assert (out / "last.pth").read_text() == "earlier run"

    args = parse_args(TINY + ["--train-subset", "64", "--val-subset", "16", "--output", str(out),
                              "--overwrite"])
    Trainer(args, setup("cpu")).close()
    # the run files went, the rest stays (and the folder's lock file came)
    assert sorted(os.listdir(out)) == [LOCK_FILE, "notes.txt"]


def test_an_empty_folder_or_one_with_only_temporary_files_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    parse_args(TINY + ["--output", str(tmp_path / "empty")])
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / f".last.pth.tmp{2 ** 22 + 1}").write_bytes(b"half")
    parse_args(TINY + ["--output", str(tmp_path / "killed")])


def test_an_output_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _error(TINY + ["--output", str(tmp_path / "file")], capsys)
    err = _error(TINY + ["--output", str(tmp_path / "file" / "run")], capsys)
    assert "cannot be created" in err and "is a file" in err


def test_an_unwritable_output_fails_before_data_loading(tmp_path, monkeypatch):
    from train import loop, rundir
    args = parse_args(TINY + ["--output", str(tmp_path / "run")])

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    def no_data(*a, **k):
        raise AssertionError("the data was read before the output folder was checked")
    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(loop, "describe", no_data)
    with pytest.raises(OutputError, match="is not writable"):
        Trainer(args, setup("cpu"))


def test_cli_output_errors_are_messages_not_tracebacks(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = _cli([sys.executable, "-m", "train", "--output", str(tmp_path / "file")], timeout=120)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_run_in_a_folder_in_use_fails_at_once(tmp_path):
    """Two processes: one holds the run folder (as a run does from its start to its end), a
    ``python -m train`` into the same folder fails with a message, writing nothing; the holder's
    death releases the folder."""
    import subprocess
    import time

    from test_train import REPO
    from train.rundir import prepare
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from train.rundir import prepare; "
         "lock = prepare(sys.argv[1], False, False, time.time()); print('locked', flush=True); "
         "sys.stdin.read()", str(out)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _cli([sys.executable, "-m", "train", *TINY, "--train-subset", "64", "--val-subset",
                     "16", "--epochs", "1", "--output", str(out)], timeout=180)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"error: --output {out} is in use by another run (process {holder.pid} on" in \
            proc.stderr and "two runs cannot share a folder" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert os.listdir(out) == [LOCK_FILE]  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait(timeout=60)
    prepare(str(out), False, False, time.time()).close()  # free again


def test_a_run_folder_is_locked_for_the_whole_run(tmp_path):
    args = parse_args(TINY + ["--train-subset", "64", "--val-subset", "16", "--output",
                              str(tmp_path)])
    trainer = Trainer(args, setup("cpu"))
    with pytest.raises(OutputError, match="is in use by another run"):
        Trainer(args, setup("cpu"))
    trainer.close()
    Trainer(args, setup("cpu")).close()


def test_leftovers_of_a_run_without_a_checkpoint_do_not_block_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.yaml").write_text("model: x\n")
    (out / "events.out.tfevents.1.host.1.0").write_bytes(b"events")
    (out / LOCK_FILE).write_text("process 1 on host\n")
    args = parse_args(TINY + ["--train-subset", "64", "--val-subset", "16", "--output", str(out)])
    Trainer(args, setup("cpu")).close()
    assert os.listdir(out) == [LOCK_FILE]  # replaced by this run's (written when it runs)

    # beside a checkpoint or metrics the same files belong to a run, which is kept
    for name in ("last.pth", "metrics.json"):
        (out / "args.yaml").write_text("model: x\n")
        (out / name).write_text("earlier run")
        with pytest.raises(SystemExit):
            parse_args(TINY + ["--output", str(out)])
        assert (out / "args.yaml").exists()
        os.unlink(out / name)


# ------------------------------------------------------------------------------------- --help
def _option_help(text: str):
    """{option: its help text} from ``--help`` output."""
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.startswith("-")}


def test_help_shows_each_recipes_values_and_no_none():
    text = build_parser().format_help()
    assert "None" not in text
    helps = _option_help(text)
    assert "fashion-mnist recipe 5, mobilenetv1 recipe 170" in helps["--epochs"]
    assert "mobilenetv3 recipe 200, shufflenetv2 recipe 300" in helps["--epochs"]
    assert "fashion-mnist recipe 32" in helps["--batch-size"]
    assert "mobilenetv1 recipe multistep" in helps["--sched"]
    assert "mobilenetv1 recipe 140 160, other recipes 90 180 270" in helps["--decay-milestones"]
    for option, help_text in helps.items():
        assert help_text.count("(default:") <= 1, (option, help_text)


# ------------------------------------------------------------------------ argument errors
@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "expected a finite number"),
    (["--hflip", "1.5"], "expected a probability"),
    (["--aa", "rand-m9-mstd0.5"], "--aa applies to --dataset imagefolder only"),
    (["--scale", "0.35", "1"], "--scale applies to --dataset imagefolder only"),
    (["--bft-backend", "fast"], "--bft-backend fast: choose one of"),
    (["--device", "tpu"], "--device tpu"),
])
def test_more_bad_arguments(argv, message, capsys):
    assert message in _error(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_or_triton_backend_without_a_gpu_are_argument_errors(capsys, monkeypatch):
    assert "torch sees no CUDA GPU" in _error(["--device", "cuda"], capsys)
    from butterfly.kernels.triton import bft as triton_bft
    monkeypatch.setattr(triton_bft, "INTERPRETED", False)
    err = _error(["--bft-backend", "triton"], capsys)
    assert "--bft-backend triton: " in err and "cpu" in err


def test_an_imagefolder_data_dir_needs_dataset_imagefolder(tmp_path, capsys):
    make_imagefolder(tmp_path / "splits", {"train": range(4), "val": range(4, 8)})
    make_imagefolder(tmp_path, {"classes": range(4)})
    for root in (tmp_path / "splits", tmp_path / "classes"):
        err = _error(["--data-dir", str(root)], capsys)
        assert "holds an ImageFolder tree" in err and "--dataset imagefolder" in err
    parse_args(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "splits")])


# ------------------------------------------------------------------ threads and loader workers
def test_threads_and_workers_defaults_follow_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    args = parse_args([])
    assert (args.workers, args.threads) == (0, 2)  # Fashion-MNIST is in memory: no loader process
    assert train_args.default_workers("imagefolder", 2) == 1
    assert train_args.default_threads(1, 2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert (parse_args([]).workers, parse_args([]).threads) == (1, 15)
    assert train_args.default_workers("imagefolder", 16) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the 16 cores
    assert train_args.available_cores() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parse_args([]).threads == 3
    assert parse_args(["--threads", "5", "--workers", "2"]).threads == 5


def test_run_sets_the_threads_and_prints_them_at_the_start(tmp_path, caplog):
    import logging

    from train.loop import run
    seen = {}
    original = Trainer.run

    def spy(self):
        seen["threads"] = torch.get_num_threads()
        return original(self)
    caplog.set_level(logging.INFO, logger="train")
    try:
        Trainer.run = spy
        run(parse_args(TINY[:-3] + ["--threads", "2", "--train-subset", "64", "--val-subset",
                                    "16", "--batch-size", "32", "--epochs", "1",
                                    "--output", str(tmp_path)]))
    finally:
        Trainer.run = original
    assert seen["threads"] == 2 and torch.get_num_threads() == 1  # restored afterwards
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run: "))
    assert "threads=2 workers=0" in start and "64 training images" in start
