#!/usr/bin/env bash
# Install everything and run the main job: MobileNetV1 0.25 vs MobileNetV1-BFT 1.0 on Fashion-MNIST,
# one epoch each (on a fixed 10,000-image subset, 2 seeds), then print the comparison table and where
# the plot is. The C++ kernels are compiled once, before the benchmark, with progress shown.
# Extra arguments go to the benchmark, e.g. `bash quickstart.sh --train-subset 60000`.
# This is a smoke test, not the reproduction of the paper's claim (1 epoch, pairs not matched in
# multiply-adds): that is `python -m benchmarks.reproduce`, with its results committed in
# benchmarks/results/reproduction_fashion_mnist.md.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || PYTHON=python

# Debian/Ubuntu's system Python refuses `pip install` (PEP 668): use a virtual environment there.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv
            "$PYTHON" -m venv .venv
        else
            echo "error: this Python is externally managed and has no venv module; install python3-venv or activate a virtual environment" >&2
            exit 1
        fi
    fi
    PYTHON=.venv/bin/python
    echo "using the virtual environment .venv"
fi

"$PYTHON" -m pip install torch==2.14.1 torchvision==0.29.1
"$PYTHON" -m pip install -e .

# Fashion-MNIST: Debian's package when we can install it; otherwise `python -m train` downloads it.
if [ -d /usr/share/datasets/fashion-mnist ]; then
    echo "Fashion-MNIST found in /usr/share/datasets/fashion-mnist"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
        || echo "apt-get could not install dataset-fashion-mnist; it will be downloaded through torchvision"
else
    echo "not root or no apt-get: skipping the dataset-fashion-mnist package; it will be downloaded through torchvision"
fi

"$PYTHON" -m butterfly.kernels.cpu || echo "the C++ kernels are unavailable; the pure-PyTorch reference runs instead (slower)"
"$PYTHON" -m benchmarks.accuracy "$@"
echo
echo "This was the smoke test, not the reproduction. The paper's claim at convergence, MAC-matched,"
echo "3 seeds: benchmarks/results/reproduction_fashion_mnist.md (rerun: python -m benchmarks.reproduce)."
