"""``python -m benchmarks.accuracy``, the quickstart's job: its defaults, and a tiny end-to-end run
on synthetic Fashion-MNIST files (the JSON it writes, the table and the plot)."""
import json
import os

import pytest
import torch

from benchmarks import accuracy, harness


def test_defaults_are_the_quickstarts():
    opts = accuracy.parse_args([])
    assert opts.pairs == ["mobilenetv1"] and opts.epochs == 1 and opts.seeds == [0, 1]
    assert opts.train_subset == 10000 and opts.val_subset is None and opts.batch_size == 32
    assert opts.results == str(harness.RESULTS)
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--epochs", "0"])


@pytest.mark.slow
def test_tiny_run(tiny_data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy.main(["--data-dir", tiny_data, "--train-subset", "64", "--seeds", "0", "1",
                       "--latency-repeats", "2", "--results", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "accuracy_fashion_mnist.json").read_text())
    assert set(data["cells"]) == set(accuracy.PAIRS["mobilenetv1"])
    for model, cell in data["cells"].items():
        assert len(cell["seeds"]) == 2 and cell["top1"] == pytest.approx(sum(cell["seeds"]) / 2)
        assert 0 <= cell["top1"] <= 100 and cell["std"] is not None
        assert cell["macs"] > 0 and cell["latency_ms"] > 0 and cell["images_per_s"] > 0
    assert data["cells"]["mobilenetv1_bft_100"]["kind"] == "BFT"
    assert data["options"]["train_subset"] == 64 and data["runs"][0]["machine"]["flags"]
    assert os.path.getsize(tmp_path / "accuracy_vs_macs.png") > 0
    assert (tmp_path / "accuracy_fashion_mnist.md").exists()
