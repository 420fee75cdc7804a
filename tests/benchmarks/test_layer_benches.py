"""benchmarks.kernel, depthwise, batchnorm, flops and kernel_gpu on tiny cases: the JSON each
writes (every cell present, its values consistent) and the report drawn from it."""
import json

import pytest
import torch

from benchmarks import batchnorm, depthwise, flops, kernel, kernel_gpu
from butterfly.kernels.cpu import load_extension

needs_kernels = pytest.mark.skipif(load_extension() is None, reason="the C++ kernels did not build")


def _run(module, monkeypatch, tmp_path, argv, **patches):
    for name, value in patches.items():
        monkeypatch.setattr(module, name, value)
    threads = torch.get_num_threads()
    try:
        assert module.main([*argv, "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_kernel(tmp_path, monkeypatch):
    _run(kernel, monkeypatch, tmp_path, ["--quick", "--threads", "1", "--cpu-time"],
         QUICK_SHAPES=[("tiny", 8, 16, 4)])
    data = json.loads((tmp_path / "kernel_cpu.json").read_text())
    assert data["runs"][0]["machine"]["flags"]
    # batch 1 runs the fused layers, without the reference
    want = {kernel.key(c, 1, m, "tiny", r) for c in ("wall", "cpu")
            for m in kernel.MODES for r in kernel.RUNNERS
            if not (m == "inference, batch 1" and r == "reference")}
    assert set(data["cells"]) == want
    for key, cell in data["cells"].items():
        assert cell["status"] == "ok" and cell["ms"] > 0 and cell["samples"] == 3 * 3, key
        mode, runner = key.split("|")[2], key.rsplit("|", 1)[1]
        pixels = kernel.MODES[mode] * 4 * 4
        if runner.startswith("conv"):
            assert cell["macs"] == 8 * 16 * pixels
        elif runner != "copy":
            assert cell["macs"] > 0
    assert set(data["rates"]) == {"t1", "cpu|t1"}
    assert data["rates"]["t1"]["fma_GMACs"] > 0
    md = (tmp_path / "kernel_cpu.md").read_text()
    assert md.count("| tiny | 4 |") == 6 and md.count("What bounds it") == 4
    assert md.count("Inference at batch 1 (fused layers)") == 2


@needs_kernels
def test_depthwise(tmp_path, monkeypatch):
    _run(depthwise, monkeypatch, tmp_path, ["--quick", "--threads", "1"],
         network_layers=lambda: [(8, 6, 1), (16, 6, 2), (8, 6, 1)], BATCH=2)
    cells = json.loads((tmp_path / "depthwise_cpu.json").read_text())["cells"]
    rows = {k.rsplit("|", 1)[0] for k in cells}
    assert rows == {f"t1|{m}|net|{s}" for m in depthwise.MODES for s in ("8,6,s1", "16,6,s2")}
    assert len(cells) == 4 * len(rows)
    assert all(c["status"] == "ok" and c["ms"] > 0 for c in cells.values())
    assert cells["t1|inference|net|8,6,s1|kernel CL"]["count"] == 2
    md = (tmp_path / "depthwise_cpu.md").read_text()
    assert md.count("**all 3 layers**") == 3


@pytest.mark.slow
def test_depthwise_blocks_are_found():
    blocks = depthwise.separable_blocks("mobilenetv1_bft_100", 32, 1)
    assert blocks and all(x.dim() == 4 for _, _, x in blocks)


@needs_kernels
def test_batchnorm(tmp_path, monkeypatch):
    _run(batchnorm, monkeypatch, tmp_path, ["--quick", "--threads", "1"],
         LAYER_SHAPES=[(4, 8, 5, 5)], STEP_MODELS=[("mobilenetv3_small_035", 24)])
    cells = json.loads((tmp_path / "batchnorm_cpu.json").read_text())["cells"]
    assert set(cells) == {f"t1|layer|(4, 8, 5, 5)|{f}|{r}" for f in ("NCHW", "CL")
                          for r in ("torch", "fused")} | {
        f"t1|step|mobilenetv3_small_035@24|{r}" for r in ("torch", "fused")}
    assert all(c["status"] == "ok" and c["ms"] > 0 for c in cells.values())
    assert "| (4, 8, 5, 5) | CL |" in (tmp_path / "batchnorm_cpu.md").read_text()


@pytest.mark.slow
def test_flops(tmp_path, monkeypatch):
    _run(flops, monkeypatch, tmp_path, [],
         registered_models=lambda: ["mobilenetv1_bft_100", "mobilenetv1_025"])
    cells = json.loads((tmp_path / "flops.json").read_text())["cells"]
    assert set(cells) == {f"mobilenetv1_bft_100@{r}" for r in (96, 128, 160, 192, 224)} | {
        f"mobilenetv1_025@{r}" for r in (128, 160, 192, 224)}
    for c in cells.values():
        assert c["macs"] > 0 and c["params"] > 0
        if c["paper"]:
            assert c["diff"] == pytest.approx(100 * (c["macs"] / c["paper"] - 1))
    assert "paper_style" in cells["mobilenetv1_bft_100@160"]
    assert "paper_style" not in cells["mobilenetv1_025@224"]
    assert flops.within_tolerance(cells["mobilenetv1_025@224"])


def test_gpu_section_from_stored_cells():
    data = {"gpu": {"device": "G", "peak_Bps": 1e12, "peak_source": "s", "rep_ms": 20},
            "cells": {}}
    for p in ("fwd", "fwd+bwd"):
        for runner, ms in (("bft", 1.0), ("conv", 2.0)):
            data["cells"][f"gpu|8->8@4|fp32|NCHW|{p}|{runner}"] = {
                "cin": 8, "cout": 8, "hw": 4, "dtype": "fp32", "format": "NCHW", "radices": "4x2",
                "pass": p, "runner": runner, "status": "ok", "ms": ms, "bytes": 5e8}
    row = [ln for ln in kernel_gpu.section(data) if ln.startswith("| 8->8 @4")]
    # 5e8 bytes in 1 ms = 0.5 TB/s: 50% of the peak; conv / bft = 2
    assert row == ["| 8->8 @4 | 4x2 | fp32 | NCHW | 1.000 | 2.000 | 2.00 | 50% | 1.000 | 2.000 "
                   "| 2.00 | 50% |"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_quick(tmp_path, monkeypatch):
    _run(kernel_gpu, monkeypatch, tmp_path, ["--quick"], QUICK_SHAPES=[(128, 128, 8)])
    cells = json.loads((tmp_path / "kernel_gpu.json").read_text())["cells"]
    assert len(cells) == 2 * 2 * 2 * 2 and all(c["ms"] > 0 for c in cells.values())


def test_kernel_speed_goals_from_stored_cells():
    ms = {"conv NCHW": 4.0, "conv CL": 3.0, "BFT-4 NCHW": 1.0, "BFT-4 CL": 2.0, "BFT-2 NCHW": 1.0,
          "BFT-2 CL": 1.0, "reference": 9.0, "copy": 0.5}
    cells = {kernel.key("wall", 1, "inference", "square 64", n): {
        "timed_by": "wall", "threads": 1, "mode": "inference", "shape": "square 64", "cin": 64,
        "cout": 64, "hw": 8, "status": "ok", "ms": v, "min_ms": v / 2, "macs": 1e6}
        for n, v in ms.items()}
    lines = kernel.sections({"cells": cells, "rates": {}})
    # best conv 3 ms / best base-4 BFT 1 ms = 3x against the 2x goal at 64 channels
    assert "| 64 | >= 2.0x | 3.00x | 3.00x | met |" in lines
    assert any(ln.startswith("| square 64 | BFT-4 NCHW | 1.00 | 2.0x | 1 |") for ln in lines)


@needs_kernels
def test_fixed_cost(tmp_path, monkeypatch):
    from benchmarks import fixed_cost
    _run(fixed_cost, monkeypatch, tmp_path, ["--quick", "--threads", "1"],
         MODELS=["mobilenetv3_small_bft_050@32"])
    cells = json.loads((tmp_path / "fixed_cost_cpu.json").read_text())["cells"]
    assert set(cells) == {f"t1|{c}|{w}" for c in ("mobilenetv3_small_bft_050@32", fixed_cost.TINY)
                          for w in fixed_cost.WAYS}
    assert all(c["status"] == "ok" and c["ms"] > 0 for c in cells.values())
    assert cells["t1|mobilenetv3_small_bft_050@32|prepared"]["layers"] > 20
    md = (tmp_path / "fixed_cost_cpu.md").read_text()
    assert md.count("| mobilenetv3_small_bft_050@32 |") == 1 and "| one layer" in md
