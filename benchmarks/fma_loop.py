"""The FMA peak, measured: a loop of independent fused multiply-adds on the widest vectors the
compiler targets on this machine (``-march=native``), on every thread of an OpenMP region.

Sixteen accumulator chains per thread keep both FMA pipes of a core busy through the FMA latency
(a chain waits for its previous result; two pipes with a 4-cycle latency need 8 in flight). The
loop is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (cached like the
library's kernels). Nothing else in a run can exceed it: a layer's GMAC/s over this rate is its
fraction of the FMA peak.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

SOURCE = r"""
#include <torch/extension.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#define FMA_BYTES 64
#elif defined(__AVX__)
#define FMA_BYTES 32
#else
#define FMA_BYTES 16
#endif
typedef float vfloat __attribute__((vector_size(FMA_BYTES)));
constexpr int kChains = 16;
constexpr int kLanes = FMA_BYTES / sizeof(float);

// iters x kChains x kLanes multiply-adds on each of `threads` threads; returns their count.
double fma_loop(int64_t iters, int64_t threads) {
  double sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    vfloat acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = vfloat{} + 1.0f / (c + 2);
    const vfloat mul = vfloat{} + 0.999999f, add = vfloat{} + 1e-7f;
    for (int64_t i = 0; i < iters; ++i)
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;
    for (int c = 0; c < kChains; ++c)
      for (int l = 0; l < kLanes; ++l) sink += acc[c][l];
  }
  if (sink == 1.2345) throw std::runtime_error("unreachable");  // keeps the loop
  return (double)iters * kChains * kLanes * threads;
}
"""


@functools.lru_cache(maxsize=None)
def _module():
    from butterfly.kernels.cpu.build import _quiet_cpp_extension
    with _quiet_cpp_extension() as cpp_extension:
        return cpp_extension.load_inline(
            "butterfly_fma_loop", cpp_sources=SOURCE, functions=["fma_loop"],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)


def fma_step(threads: int, iters: int = 1 << 18) -> Optional[Callable[[], float]]:
    """A step that runs the FMA loop on ``threads`` threads and returns the multiply-adds it did
    (about 67 million per thread with the default ``iters``), or None (with a warning) where the
    loop cannot be compiled."""
    try:
        module = _module()
    except Exception as error:  # no compiler: the rate is left out, not guessed
        warnings.warn(f"the FMA loop did not compile ({error}); the FMA peak is left out")
        return None
    return lambda: module.fma_loop(iters, threads)
