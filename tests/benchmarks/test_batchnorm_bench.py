"""benchmarks.batchnorm runs end to end (tiny shapes, one model) and writes its report."""
import pytest

from benchmarks import batchnorm as B
from butterfly.depthwise import kernel_available


@pytest.mark.skipif(not kernel_available(), reason="the C++ kernels did not build")
def test_report(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(B, "LAYER_SHAPES", [(4, 8, 5, 5)])
    monkeypatch.setattr(B, "STEP_MODELS", [("mobilenetv1_025", 28)])
    out = tmp_path / "bn.md"
    assert B.main(["--threads", "1", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| (4, 8, 5, 5) | NCHW |" in text and "| (4, 8, 5, 5) | CL |" in text
    assert "`mobilenetv1_025` @28" in text and "Load average before" in text
