"""Shared by the benchmark tests: a tiny synthetic Fashion-MNIST."""
import gzip
import os

import numpy as np
import pytest


def write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    """Images whose brightness depends on the label, so that one epoch learns something."""
    folder = str(tmp_path_factory.mktemp("fashion"))
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 192), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = (rng.random((n, 28, 28)) * 60 + labels[:, None, None] * 19).clip(0, 255)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return folder
