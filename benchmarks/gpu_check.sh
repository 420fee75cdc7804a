#!/usr/bin/env bash
# The prepared GPU check of the Triton BFT backend: one call, at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT]     # OUT: the folder for the tables (default $OUT)
#
# For an image with torch and triton but no package registry and no fvcore: installs the
# checkout without dependencies, runs the Triton tests on the GPU (pytest.txt), then
# benchmarks/gpu_check.py (gpu_check.md, gpu_check.json: correctness against a float64
# reference, tensors over 2^31 elements, launches per call, opcheck and torch.compile,
# timings against cuDNN and the reference, a whole model pair). Exits 1 on any failure or
# mismatch, after writing every table it got to.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
START=$(date +%s)
LIMIT=${GPU_CHECK_SECONDS:-470}   # the whole run, leaving a margin under 8 minutes
elapsed() { echo $(( $(date +%s) - START )); }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT_DIR/env.txt"

# The package without its dependencies (the image has torch and triton; no registry to fetch
# a build backend from, so without build isolation if the plain install fails).
if ! pip install --no-deps -e . > "$OUT_DIR/pip.txt" 2>&1 &&
   ! pip install --no-deps --no-build-isolation -e . >> "$OUT_DIR/pip.txt" 2>&1; then
    echo "pip install failed (see pip.txt): the checkout is used from PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

STATUS=0
echo "== Triton tests on the GPU ($(elapsed)s)"
# test_interpreter (the kernels under TRITON_INTERPRET=1 on CPU) is left to CI: the interpreter
# of Triton <= 3.6 fails under NumPy >= 2.4 (int() of a 1-element array), whatever the kernels.
timeout 210 python -m pytest tests/kernels/test_triton_kernel.py tests/kernels/test_triton_cuda.py \
    tests/kernels/test_triton_aot.py tests/kernels/test_triton_import.py -q -m "not slow" \
    -k "not test_interpreter" -p no:cacheprovider -x -rfE > "$OUT_DIR/pytest.txt" 2>&1 || STATUS=1
tail -n 3 "$OUT_DIR/pytest.txt"
[ "$STATUS" = 0 ] || echo "FAILED: the Triton tests (see $OUT_DIR/pytest.txt)"

LEFT=$(( LIMIT - $(elapsed) ))
BUDGET=$(( LEFT > 150 ? LEFT - 90 : 60 ))   # sections with time budgets, plus the fixed ones
echo "== gpu_check.py, budget ${BUDGET}s ($(elapsed)s)"
timeout $(( LEFT > 60 ? LEFT : 60 )) python -m benchmarks.gpu_check "$OUT_DIR" --budget "$BUDGET" \
    2>&1 | tee "$OUT_DIR/gpu_check.log" | grep -v "^  " | tail -n 40
[ "${PIPESTATUS[0]}" = 0 ] || { STATUS=1; echo "FAILED: gpu_check.py (see $OUT_DIR/gpu_check.md)"; }

echo "== done in $(elapsed)s, status $STATUS; tables in $OUT_DIR"
exit $STATUS
