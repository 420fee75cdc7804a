"""``--convert``: fine-tuning a network converted with ``butterfly.convert`` from the command line
(its state_dict loads into BFTs of the layouts it holds), converting dense weights before training,
and resuming and evaluating such a run."""
from __future__ import annotations

import pytest
import torch

import butterfly
from test_train import DATA, TINY, _train
from train import evaluate
from train.args import parse_args
from train.checkpoint import CheckpointError, load_checkpoint
from train.distributed import setup
from train.loop import Trainer
from train.model import create_model

pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found"),
              pytest.mark.usefixtures("one_thread")]
SHORT = ["--train-subset", "64", "--val-subset", "40", "--batch-size", "32", "--epochs", "1",
         "--no-log-tensorboard"]


def _dense(seed=1):
    torch.manual_seed(seed)
    return create_model("mobilenetv1_025", 10, 1, small_input=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A mobilenetv1_025 converted as a user would in Python, with layers of both residual kinds
    and two bases (no refinement steps, to be quick); its plain state_dict file and weights."""
    model = _dense()
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    half = set(names[::2])
    model, _ = butterfly.convert(model, residual=True, filter_fn=lambda n, m: n in half, steps=0)
    model, _ = butterfly.convert(model, residual=False, base=2, steps=0)
    weights = model.state_dict()
    layers = [m for m in model.modules() if butterfly.is_bft(m)]
    assert {m.residual for m in layers} == {True, False} and {m.base for m in layers} == {2, 4}
    path = tmp_path_factory.mktemp("converted") / "converted.pth"
    torch.save(weights, path)
    return path, weights


def test_a_converted_state_dict_loads_with_convert(converted, tmp_path):
    path, weights = converted
    args = parse_args(TINY + SHORT + ["--initial-checkpoint", str(path), "--output",
                                      str(tmp_path / "plain")])
    with pytest.raises(CheckpointError, match="load with --model <the dense model> --convert"):
        Trainer(args, setup("cpu"))
    args = parse_args(TINY + SHORT + ["--convert", "--initial-checkpoint", str(path), "--output",
                                      str(tmp_path / "convert")])
    trainer = Trainer(args, setup("cpu"))
    trainer.close()
    state = trainer.model.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def test_convert_trains_resumes_and_evaluates(converted, tmp_path):
    path, weights = converted
    out = tmp_path / "run"
    result = _train(SHORT + ["--convert", "--initial-checkpoint", str(path), "--output", str(out)])
    state = load_checkpoint(str(out / "last.pth"))
    assert state["model"].keys() == weights.keys() and state["args"]["convert"] is True

    # the resume rebuilds the same BFTs from the checkpoint (no --convert needed: it is fixed)
    trainer = Trainer(parse_args(["--resume", str(out / "last.pth"), "--workers", "0"]),
                      setup("cpu"))
    trainer.close()
    assert trainer.global_step == 2

    # evaluate inherits --convert from the checkpoint; a plain converted state_dict needs it
    args = evaluate.parse_args(["--checkpoint", str(out / "best.pth"), "--workers", "0",
                                "--threads", "1", "--val-subset", "40"])
    assert args.convert
    assert evaluate.run(args)["top1"] == pytest.approx(result["val_top1"], abs=1e-4)
    args = evaluate.parse_args(["--checkpoint", str(path), "--model", "mobilenetv1_025",
                                "--convert", "--workers", "0", "--threads", "1", "--val-subset",
                                "40"])
    assert evaluate.run(args)["images"] == 40


@pytest.mark.slow  # two conversions with the fit's refinement steps: about 10 s
def test_convert_fits_bfts_to_dense_weights_before_training(tmp_path):
    dense = _dense(2)
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    args = parse_args(TINY + SHORT + ["--convert", "--convert-residual", "false",
                                      "--convert-base", "2", "--initial-checkpoint",
                                      str(tmp_path / "dense.pth"), "--output", str(tmp_path / "r")])
    trainer = Trainer(args, setup("cpu"))
    trainer.close()
    expected, report = butterfly.convert(dense, residual=False, base=2)
    assert len(report) == 13
    state = trainer.model.state_dict()
    assert state.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.allclose(state[key], value, atol=1e-6), key
