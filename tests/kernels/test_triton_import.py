"""``import butterfly`` never fails because of the installed Triton: a missing, broken or too old
Triton leaves the "triton" backend registered but unavailable, with the reason.

Each case patches triton in a fresh interpreter before ``butterfly`` is imported (the check runs
at import), then runs a layer under "auto" (the reference or CPU kernel) and asks for "triton".
"""
import subprocess
import sys

import pytest

pytest.importorskip("triton")

PROBE = """
import torch, butterfly
from butterfly import use_backend
from butterfly.kernels import triton as backend
assert "triton" in butterfly.available_backends()
print("REASON:", backend.IMPORT_ERROR)
y = butterfly.BFT(8, 8)(torch.randn(1, 8, 2, 2))
assert y.shape == (1, 8, 2, 2)
try:
    with use_backend("triton"):
        butterfly.BFT(8, 8)(torch.randn(1, 8, 2, 2))
except RuntimeError as error:
    print("REFUSED:", error)
"""

CASES = {
    "old version": ("import triton; triton.__version__ = '3.3.1'", "triton 3.3.1 is older than"),
    "no constexpr_function": ("import triton, triton.language as tl\n"
                              "for m in (triton, tl): vars(m).pop('constexpr_function', None)",
                              "has no constexpr_function"),
    "old torch": ("import torch.library; del torch.library.wrap_triton",
                  "has no torch.library.wrap_triton"),
    "not importable": ("import sys; sys.modules['triton'] = None", "triton cannot be imported"),
    "kernels rejected": ("import triton.language as tl; del tl.constexpr",
                         "the kernels failed to load"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_import_survives_triton(case):
    patch, reason = CASES[case]
    run = subprocess.run([sys.executable, "-c", patch + "\n" + PROBE], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("REASON:") and reason in line for line in lines), run.stdout
    assert any(line.startswith("REFUSED:") and reason in line for line in lines), run.stdout


def test_reason_is_empty_with_the_installed_triton():
    from butterfly.kernels import triton as backend
    assert backend.IMPORT_ERROR == ""
