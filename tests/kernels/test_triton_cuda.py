"""The Triton kernels on a real GPU (skipped without CUDA): forward, both gradients and the fused
forward against a float64 reference in every dtype and layout, one launch per forward,
``opcheck`` of the operators on the backend and ``torch.compile(fullgraph=True)``.

``bash benchmarks/gpu_check.sh`` runs these on the GPU machine, beside the wider sweeps of
``benchmarks/gpu_check.py`` (whose helpers these tests share).
"""
import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from benchmarks import gpu_check
from butterfly.kernels.triton import bft as triton_bft

if triton_bft.INTERPRETED:
    pytest.skip("runs the compiled kernels, not the interpreter", allow_module_level=True)

CASES = gpu_check.extremes(tiny=True)


@pytest.mark.parametrize("dtype", list(gpu_check.DTYPES.values()), ids=list(gpu_check.DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_matches_float64_reference(case, layout, dtype):
    gpu_check.check_case(case, 3, layout, dtype, torch.device("cuda"))


def test_one_launch_per_forward():
    report = gpu_check.Report()
    gpu_check.launches(report, torch.device("cuda"))
    assert not report.failures, report.failures


def test_opcheck_and_compile():
    report = gpu_check.Report()
    gpu_check.compile_checks(report, torch.device("cuda"))
    assert not report.failures, report.failures
