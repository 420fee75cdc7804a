import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small tensors gain nothing from more, and on a loaded
    machine idle OpenMP threads spin (a 2-thread run can be many times slower than a 1-thread one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
