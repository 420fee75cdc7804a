"""``--val-holdout N`` (validation on images held out of the training split) and ``--eval-test``
(one evaluation of the final model on the test split)."""
from __future__ import annotations

import json

import pytest
from torch.utils.data import Subset

from test_train import DATA, TINY, _train, make_imagefolder
from train import data
from train.args import parse_args
from train.distributed import setup
from train.loop import Trainer

pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found"),
              pytest.mark.usefixtures("one_thread")]


def _indices(dataset):
    """The indices into the underlying split that a chain of Subsets selects."""
    if isinstance(dataset, data.SeededSamples):
        return _indices(dataset.dataset)
    if isinstance(dataset, Subset):
        inner = _indices(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(range(len(dataset)))


def _splits_loaded(monkeypatch):
    """Record the Fashion-MNIST splits ("train", "val") that get loaded."""
    loaded = []
    init = data.FashionMNIST.__init__

    def spy(self, folder, split, *args, **kwargs):
        loaded.append(split)
        init(self, folder, split, *args, **kwargs)
    monkeypatch.setattr(data.FashionMNIST, "__init__", spy)
    return loaded


def test_holdout_is_fixed_disjoint_and_keeps_the_test_split_untouched(tmp_path, monkeypatch):
    loaded = _splits_loaded(monkeypatch)
    sets = {}
    for seed in (0, 1):
        args = parse_args(TINY + ["--val-holdout", "100", "--train-subset", "500", "--seed",
                                  str(seed), "--output", str(tmp_path / str(seed))])
        trainer = Trainer(args, setup("cpu"))
        held, train = _indices(trainer.val_loader.dataset), _indices(trainer.loader.dataset)
        assert len(held) == 100 and len(train) == 500 and not set(held) & set(train)
        assert not trainer.val_loader.dataset.dataset.train  # the evaluation transform
        sets[seed] = held, train
    assert sets[0] == sets[1]  # the same split (and the same training subset) for every seed
    assert "val" not in loaded  # t10k is never read without --eval-test
    held, rest = data.holdout_split(60000, 100)
    assert held == sets[0][0] and len(rest) == 59900 and not set(held) & set(rest)


def test_holdout_validates_on_the_holdout_and_eval_test_runs_once_at_the_end(tmp_path, monkeypatch):
    loaded = _splits_loaded(monkeypatch)
    result = _train(["--val-holdout", "64", "--train-subset", "128", "--val-subset", "50",
                     "--batch-size", "32", "--epochs", "2", "--eval-test",
                     "--output", str(tmp_path)])
    assert loaded.count("val") == 1 and loaded[-1] == "val"  # after training, once
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for h in result["history"]:
        assert {"val_top1", "val_loss", "train_loss", "lr"} <= set(h)
        assert (h["val_top1"] * 64 / 100) == pytest.approx(round(h["val_top1"] * 64 / 100))
    assert result["val_top1"] == result["history"][-1]["val_top1"]
    assert result["test_images"] == 50 and 0 <= result["test_top1"] <= 100
    assert result["test_loss"] > 0
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert rows[-1]["test_top1"] == result["test_top1"] and "test_top1" not in rows[0]


def test_without_holdout_validation_is_the_test_split(tmp_path):
    args = parse_args(TINY + ["--train-subset", "64", "--val-subset", "40", "--output",
                              str(tmp_path)])
    trainer = Trainer(args, setup("cpu"))
    assert len(trainer.val_loader.dataset) == 40 and len(trainer.loader.dataset) == 64
    assert _indices(trainer.val_loader.dataset)[-1] < 10000  # t10k


def test_holdout_with_imagefolder_needs_no_test_folder(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": range(0, 160)})
    result = _train(["--dataset", "imagefolder", "--data-dir", str(root), "--img-size", "28",
                     "--small-input", "--batch-size", "32", "--epochs", "1", "--val-holdout",
                     "32", "--output", str(tmp_path / "run")])
    assert len(result["history"]) == 1 and 0 <= result["val_top1"] <= 100


def test_holdout_larger_than_the_training_split_is_refused(tmp_path):
    args = parse_args(TINY + ["--val-holdout", "60000", "--output", str(tmp_path)])
    with pytest.raises(data.DataError, match="--val-holdout 60000"):
        Trainer(args, setup("cpu"))
