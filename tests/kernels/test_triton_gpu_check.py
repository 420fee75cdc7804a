"""``benchmarks/gpu_check.py`` (the prepared GPU check) without a GPU: its arguments, its
comparison and report, and its correctness section on tiny shapes under TRITON_INTERPRET=1, so
that the check does not rot between the runs on a GPU machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args([])
    assert args.out == tmp_path and not args.tiny
    assert args.sections == {"correctness", "big", "launches", "compile", "timings", "models"}
    args = gpu_check.parse_args(["elsewhere", "--tiny", "--budget", "5", "--sections",
                                 "correctness"])
    assert args.out == Path("elsewhere") and args.tiny and args.budget == 5
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "correctness,speed"])


def test_comparison():
    want = torch.tensor([1.0, float("inf"), -2.0])
    assert gpu_check.relative_error(want.clone(), want) == 0
    assert gpu_check.relative_error(torch.tensor([1.0, float("nan"), -2.0]), want) == float("inf")
    assert gpu_check.relative_error(torch.tensor([1.0, -float("inf"), -2.0]), want) == \
        float("inf")
    assert gpu_check.check_close("x", torch.tensor([1.01, 3.0]), torch.tensor([1.0, 3.0]),
                                 1e-2) == pytest.approx(0.01 / 3)
    with pytest.raises(gpu_check.Mismatch, match="x: relative error"):
        gpu_check.check_close("x", torch.tensor([1.1]), torch.tensor([1.0]), 1e-2)


def test_a_mismatch_is_reported_and_fails(monkeypatch, tmp_path):
    def wrong(*args, **kwargs):
        raise gpu_check.Mismatch("forward: relative error 1 > 0.01")

    monkeypatch.setattr(gpu_check, "check_case", wrong)
    report = gpu_check.Report()
    gpu_check.correctness(report, gpu_check.extremes(True)[:2], 1, torch.device("cpu"),
                          gpu_check.Budget(60), [torch.float32])
    assert len(report.failures) == 4 and all("relative error" in f for f in report.failures)
    report.write(tmp_path, {"device": "none"})
    text = (tmp_path / "gpu_check.md").read_text()
    assert "MISMATCH forward" in text and "## Failures" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failures"] == report.failures


def test_refuses_without_gpu_or_interpreter(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path), "--tiny"]) == 2


def test_tiny_run_under_the_interpreter(tmp_path):
    """The correctness section on tiny shapes (every dtype, both layouts, padded, expand,
    contract, rows) passes against the float64 reference and writes its tables."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path), "--tiny",
                          "--budget", "300"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    rows = report["sections"][0]["rows"]
    assert len(rows) == 44 and all(r[-1] == "ok" for r in rows)
    assert {r[3] for r in rows} == {"bf16", "fp16", "fp32", "fp64"}
    assert {r[2] for r in rows} == {"nchw", "nhwc"}


def test_shell_script_is_valid():
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "pip install --no-deps -e ." in text and "benchmarks.gpu_check" in text
