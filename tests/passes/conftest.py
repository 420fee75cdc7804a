import pytest
import torch

from butterfly.ops.dispatch import kernels_loaded


@pytest.fixture(scope="module")
def cpu_kernels():
    """The C++ kernels, built and loaded: a test of a kernel fails (never skips) without them."""
    if not kernels_loaded("cpu", torch.device("cpu")):
        pytest.fail("the CPU kernels did not build; see the warning above")
