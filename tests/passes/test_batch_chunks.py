"""Inference batches run in chunks: BatchChunks and optimize_for_inference's choice of the chunk."""
import pytest
import timm
import torch
from torch import nn

import butterfly
import butterfly.passes.optimize as optimize
from butterfly.passes.batch_chunks import BatchChunks, batch_size
from butterfly.passes.fuse import FusedBFT, FusedConv


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, y):
        self.calls.append(x.shape[0])
        return x * 2 + y.sum(dim=1, keepdim=True)


class _BatchMixing(nn.Module):
    """Not per sample: every output depends on the whole batch."""

    def __init__(self):
        super().__init__()
        self.bft = butterfly.BFT(8, 8)

    def forward(self, x):
        y = self.bft(x)
        return y - y.mean(dim=0, keepdim=True)


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         butterfly.BFT(16, 32), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


@pytest.mark.parametrize("batch,chunk", [(7, 3), (6, 3), (5, 1), (3, 4), (1, 1)])
def test_chunks_give_the_whole_batch_result(batch, chunk):
    module = _TwoInputs()
    x, y = torch.randn(batch, 4, 3), torch.randn(batch, 2, 3)
    out = BatchChunks(module, chunk)(x, y)
    torch.testing.assert_close(out, x * 2 + y.sum(dim=1, keepdim=True), rtol=0, atol=0)
    want = [min(chunk, batch - i) for i in range(0, batch, chunk)] if batch > chunk else [batch]
    assert module.calls == want


def test_calls_that_are_not_one_batch_run_unchanged():
    assert batch_size((torch.randn(3, 2), torch.randn(4, 2))) is None
    assert batch_size((torch.randn(3, 2), 1.0)) is None
    assert batch_size((torch.tensor(1.0),)) is None and batch_size(()) is None
    assert batch_size((torch.randn(3, 2), torch.randn(3))) == 3
    module = _TwoInputs()
    x, y = torch.randn(6, 4, 3), torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError):   # the module's own error, from one unsplit call
        BatchChunks(module, 2)(x, y)
    assert module.calls == [6]


def test_bad_chunk_and_bad_outputs_are_refused():
    with pytest.raises(ValueError, match="positive number of samples"):
        BatchChunks(nn.Identity(), 0)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x
    with pytest.raises(TypeError, match="not one tensor per chunk"):
        BatchChunks(Pair(), 2)(torch.randn(5, 3))


def _fake_times(fast_chunk):
    """time_call that makes chunks of ``fast_chunk`` the fastest of the batch choices (and keeps
    every layer choice's two candidates equal)."""
    def fake(fn, inp, min_run_time=0.0, warmup=0):
        if isinstance(fn, BatchChunks):
            return 1.0 if fn.chunk == fast_chunk else 2.0
        return 1.0
    return fake


def test_optimize_wraps_in_the_faster_chunks_and_names_layers_of_the_result(monkeypatch):
    monkeypatch.setattr(optimize, "time_call", _fake_times(2))
    torch.manual_seed(0)
    model, x = _small_net(), torch.randn(8, 3, 9, 9)
    out, report = butterfly.optimize_for_inference(model, x)
    assert isinstance(out, BatchChunks) and out.chunk == 2
    c = report.chunks
    assert (c.batch, c.chosen, c.refused) == (8, 2, "") and sorted(c.ms) == [1, 2, 4, 8]
    assert "the batch of 8 runs in chunks of 2" in str(report)
    for choice in report:   # the layers were timed on one chunk, and are named in the result
        assert choice.input_shape[0] == 2 and choice.name.startswith("module.")
        assert isinstance(out.get_submodule(choice.name), (FusedBFT, FusedConv))
    assert all(f.name.startswith("module.") for f in report.fused)
    with torch.no_grad():
        for batch in (8, 5, 1):
            y = torch.randn(batch, 3, 9, 9)
            torch.testing.assert_close(out(y), model(y), rtol=1e-4, atol=1e-5)


def test_optimize_keeps_the_whole_batch_unless_a_chunk_is_clearly_faster(monkeypatch):
    def fake(fn, inp, min_run_time=0.0, warmup=0):
        if isinstance(fn, BatchChunks):
            return 0.97 if fn.chunk == 1 else 1.0   # within the 5% margin
        return 1.0
    monkeypatch.setattr(optimize, "time_call", fake)
    out, report = butterfly.optimize_for_inference(_small_net(), torch.randn(4, 3, 9, 9))
    assert not isinstance(out, BatchChunks) and report.chunks.chosen == 4
    assert "the batch of 4 runs whole" in str(report)
    # one sample, chunk_batch=False, fuse=False: nothing to choose
    four = torch.randn(4, 3, 9, 9)
    for kwargs, x in (({}, four[:1]), ({"chunk_batch": False}, four), ({"fuse": False}, four)):
        out, report = butterfly.optimize_for_inference(_small_net(), x, **kwargs)
        assert not isinstance(out, BatchChunks) and report.chunks is None


def test_a_network_that_mixes_samples_is_not_split(monkeypatch):
    monkeypatch.setattr(optimize, "time_call", _fake_times(1))
    model, x = _BatchMixing().eval(), torch.randn(4, 8, 3, 3)
    out, report = butterfly.optimize_for_inference(model, x)
    assert not isinstance(out, BatchChunks) and report.chunks.chosen == 4
    assert "samples are not independent" in report.chunks.refused
    assert "runs whole: its output on part of the batch differs" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_zoo_model_measured_for_real_runs_any_batch():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv1_bft_100", num_classes=10, small_input=True).eval()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out, report = butterfly.optimize_for_inference(model, x, min_run_time=1e-3)
    c = report.chunks
    assert sorted(c.ms) == [1, 2, 4] and c.chosen in c.ms and all(t > 0 for t in c.ms.values())
    assert isinstance(out, BatchChunks) == (c.chosen < 4)
    with torch.no_grad():
        for batch in (4, 7, 1):
            y = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out(y), model(y), rtol=1e-3, atol=1e-3)
