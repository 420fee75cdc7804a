"""ONNX export in both forms, checked with onnxruntime; the structured graph's cost is O(n log n)."""
import sys

import pytest
import torch
from torch import nn

import butterfly
from butterfly.passes.export import check_onnx, export_onnx, onnx_macs
from butterfly.ops.reference import bft_matmul
from butterfly.ops.reference import bft_reference

import onnx


def _net():
    """Every shape class: expand with bias, padded mixed radix, contract, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), butterfly.BFT(16, 40, bias=True), nn.ReLU(),
        butterfly.BFT(40, 24), nn.BatchNorm2d(24), butterfly.BFT(24, 13, residual=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), butterfly.BFTLinear(13, 10, bias=True))


def _ops(path):
    graph = onnx.load(str(path)).graph
    return {(node.domain or "", node.op_type) for node in graph.node}


@pytest.mark.parametrize("shape", [(64, 64, 4), (24, 24, 4), (13, 40, 4), (60, 31, 4), (96, 96, 2)])
@pytest.mark.parametrize("residual", [True, False])
def test_export_form_matches_the_reference(shape, residual):
    """``bft_matmul`` (what structured exports trace) computes what the reference computes."""
    c_in, c_out, base = shape
    plan = butterfly.make_plan(c_in, c_out, base)
    x = torch.randn(3, c_in, 5, dtype=torch.float64)
    w = torch.randn(plan.num_blocks, plan.weights_per_block, dtype=torch.float64)
    torch.testing.assert_close(bft_matmul(x, w, list(plan.radices), c_out, residual),
                               bft_reference(x, w, plan.radices, c_out, residual),
                               rtol=0, atol=1e-12)


def test_structured_export_runs_in_onnxruntime(tmp_path):
    net = _net().train()
    path = export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "net.onnx", dynamic_batch=True)
    assert net.training  # mode restored
    ops = _ops(path)
    assert all(domain == "" for domain, _ in ops), f"non-standard ops in the graph: {ops}"
    assert ("", "MatMul") in ops and ("", "Conv") in ops  # the stem; BFTs are MatMul stages
    for batch in (2, 5):
        assert check_onnx(path, net, torch.randn(batch, 3, 8, 8)) < 1e-5
    onnx.checker.check_model(str(path))


def test_dense_export_runs_in_onnxruntime(tmp_path):
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    path = export_onnx(net, x, tmp_path / "dense.onnx", structured=False)
    assert sum(butterfly.is_bft(m) for m in net.modules()) == 4  # the model is not changed
    ops = {op for _, op in _ops(path)}
    assert "MatMul" not in ops and "Conv" in ops
    assert check_onnx(path, net, x) < 1e-5


def test_structured_graph_cost_grows_like_n_log_n(tmp_path):
    """MACs counted from the ONNX graphs: the structured one executes exactly the layer's
    ``macs_per_pixel`` (k n log_k n) and the dense one n^2."""
    sizes = (64, 256, 1024)
    structured, dense = [], []
    for n in sizes:
        layer = butterfly.BFT(n, n)
        x = torch.randn(1, n, 1, 1)
        macs = onnx_macs(export_onnx(layer, x, tmp_path / f"s{n}.onnx"))
        assert set(macs) == {"MatMul"} and macs["MatMul"] == layer.macs_per_pixel
        structured.append(macs["MatMul"])
        dense_macs = onnx_macs(export_onnx(layer, x, tmp_path / f"d{n}.onnx", structured=False))
        dense.append(sum(dense_macs.values()))
    assert dense == [n * n for n in sizes]
    growth = structured[-1] / structured[0]                 # 20480 / 768 = 26.7
    n_log_n = (1024 * 5) / (64 * 3)                          # log4: 5 vs 3 stages
    assert growth == pytest.approx(n_log_n, rel=0.01)
    assert growth < (dense[-1] / dense[0]) / 9               # n^2 grows 256x


def test_missing_onnxscript_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match="pip install onnxscript"):
        export_onnx(butterfly.BFT(8, 8), torch.randn(1, 8, 2, 2), tmp_path / "x.onnx")


def test_dynamic_batch_from_a_batch_of_one(tmp_path):
    """torch.export specialises size-1 dimensions: a batch-1 example still exports a symbolic
    batch, which onnxruntime runs at batch 1 and 3."""
    import onnxruntime as ort

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), butterfly.BFT(8, 16), nn.ReLU(),
                        nn.Flatten(), butterfly.BFTLinear(16 * 4 * 4, 10))
    example = torch.randn(1, 3, 4, 4)
    path = export_onnx(net, example, tmp_path / "b1.onnx", dynamic_batch=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic
    for batch in (1, 3):
        x = torch.randn(batch, 3, 4, 4)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), net.eval()(x), rtol=1e-5, atol=1e-6)
        assert check_onnx(path, net, x) < 1e-5
    assert example.shape == (1, 3, 4, 4)
    fixed = export_onnx(net, example, tmp_path / "fixed.onnx")
    assert ort.InferenceSession(fixed, providers=["CPUExecutionProvider"]).get_inputs()[0].shape[0] == 1


class _Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.net, self.scale = nn.Sequential(butterfly.BFT(16, 16), nn.Tanh(), butterfly.BFT(16, 8)), scale

    def forward(self, x):
        return self.net(x) * self.scale


def test_check_onnx_reports_the_relative_error(tmp_path):
    """``max |got - want| / max |want|``: the same float32 rounding (~1e-7) whether the outputs are
    of magnitude 1e-15 or 1e6, where an absolute difference says ~1e-22 or ~0.1."""
    import onnxruntime as ort

    x = torch.randn(2, 16, 3, 3)
    for scale in (1e-15, 1.0, 1e6):
        model = _Scaled(scale).eval()
        path = export_onnx(model, x, tmp_path / f"{scale}.onnx")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        relative = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert check_onnx(path, model, x) == pytest.approx(relative, rel=1e-6, abs=1e-30)
        assert check_onnx(path, model, x) < 1e-5
