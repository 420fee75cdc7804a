"""Loops compiled at benchmark time, for what bounds the kernels: the FMA peak, and the BFT's
stage kernels on a tile that stays in L1.

* :func:`fma_step`: a loop of independent fused multiply-adds on the widest vectors the compiler
  targets here (``-march=native``), on every thread of an OpenMP region. Sixteen accumulator
  chains per thread (twelve where the ISA has 16 vector registers: AVX2, SSE) keep both FMA pipes
  of a core busy through the FMA latency without spilling. Nothing in a run
  can exceed it: a layer's GMAC/s over this rate is its fraction of the FMA peak.
* :func:`stage_rates`: one thread, the library's own kernels (``csrc/``, with the library's
  compile flags) on data in L1: each stage of the channels-as-lanes forward (``bft/lanes.h``) of a
  base-4 layer on a tile of pixels and its weight gradient (``bft/lanes_backward.h``), and the NCHW
  tile kernels' (4, 4) run (``bft/stages.h``) on 16 rows. Their rate against the FMA peak is the
  kernels' own ceiling, before any memory traffic.

Both compile on first use with ``torch.utils.cpp_extension.load_inline`` (cached like the
library's kernels), and are left out, with a warning, where they cannot be compiled.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, List, Optional, Tuple

SOURCE = r"""
#include <torch/extension.h>
#include <chrono>
#include <random>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bft/bft_lanes.cpp"  // the lane stages (find_lane_stage)
#include "bft/lanes.h"
#include "bft/stages.h"

typedef float vfloat __attribute__((vector_size(SIMD_VECTOR_BYTES)));
// Enough independent chains to cover the FMA latency on both pipes, and few enough to stay in
// the registers (16 on AVX2: 16 chains would spill, and the loop would measure the spills)
constexpr int kChains = SIMD_VECTOR_REGISTERS >= 32 ? 16 : 12;
constexpr int kLanes = SIMD_VECTOR_BYTES / sizeof(float);

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

template <class F>
double best_seconds(F f, int64_t reps) {
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return best;
}

// Per stage of the lanes forward of an n-channel base-4 layer on np pixels in L1:
// (radix, members per vector, their lane stride, multiply-adds per second, what was timed: 0 the
// stage in place, 1 the last stage as the forward runs it, adding the residual and applying a
// ReLU epilogue on its way to separate output rows, 2 the whole forward of the np pixels, 3 the
// stage's weight gradient as the backward runs it (bft/lanes_backward.h), the stage's index).
std::vector<std::vector<double>> lane_stages(int64_t n, int64_t np, int64_t reps) {
  using namespace bft;
  std::vector<int64_t> radices;
  for (int64_t c = 1; c < n; c *= 4) radices.push_back(4);
  Plan pl;
  if (!make_plan(n, n, radices.data(), radices.size(), true, pl).empty()) return {};
  std::mt19937 g(0);
  std::normal_distribution<float> d;
  std::vector<float> w(pl.W);
  for (auto& v : w) v = 0.5f * d(g);
  const LanePlan<float> lp(pl, w.data());
  if (!lp.ok) return {};
  const int64_t VL = Vec<float>::lanes, ld = n + VL;
  std::vector<float> buf(np * ld + VL);
  for (auto& v : buf) v = 0.1f * d(g);
  std::vector<std::vector<double>> out;
  const int L = (int)lp.stages.size();
  for (int s = 0; s < L; ++s) {
    const auto& st = lp.stages[s];
    const double sec = best_seconds([&] {
      st.fn(buf.data(), ld, buf.data(), ld, np, lp.packed + st.woff, n / VL, st.vs, nullptr);
    }, reps);
    out.push_back({(double)st.K, (double)st.Q, (double)st.T, (double)n * st.K * np / sec, 0,
                   (double)s});
  }
  std::vector<float> grad(np * ld + VL), dw(pl.W + VL);
  for (auto& v : grad) v = 0.1f * d(g);
  for (int s = 0; s < L; ++s) {
    const auto& st = lp.stages[s];
    const LaneWgradFn<float> wgrad = find_lane_wgrad(st.K, st.Q, st.T);
    const double sec = best_seconds([&] {
      wgrad(buf.data(), ld, grad.data(), ld, np, dw.data() + st.woff, n / VL, st.vs);
    }, reps);
    out.push_back({(double)st.K, (double)st.Q, (double)st.T, (double)n * st.K * np / sec, 3,
                   (double)s});
  }
  const auto& last = lp.stages.back();
  const EpilogueData<float> relu(n, nullptr, nullptr, activation::kRelu);
  std::vector<float> x(np * n + VL), y(np * n + VL);
  for (auto& v : x) v = 0.1f * d(g);
  const Finish<float> fin{buf.data(), ld, &relu.e, nullptr, 0, false};
  const LaneStageFn<float> finish = find_lane_finish(last.K, true, kClamp, false);
  const double fsec = best_seconds([&] {
    finish(buf.data(), ld, y.data(), n, np, lp.packed + last.woff, n / VL, last.vs, &fin);
  }, reps);
  out.push_back({(double)last.K, (double)last.Q, (double)last.T,
                 (double)n * last.K * np / fsec, 1, (double)(L - 1)});
  const double lsec = best_seconds([&] {
    forward_lanes<float, true>(pl, x.data(), n, w.data(), y.data(), np, 1, 16 << 10, false,
                               &relu.e, nullptr, nullptr, &lp);
  }, reps);
  out.push_back({0, 0, 0, (double)pl.W * np / lsec, 2, 0});
  return out;
}

// The NCHW tile kernels' (4, 4) run on 16 rows of nv vectors in L1, in place: multiply-adds per second.
double run44(int64_t nv, int64_t reps) {
  using namespace bft;
  const int64_t VL = Vec<float>::lanes, ld = (nv % 2 ? nv : nv + 1) * VL;
  std::vector<float> buf(16 * ld), w(16 * 8, 0.25f);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = 0.001f * (i % 13);
  RunArgs<float> args{{buf.data(), ld}, {buf.data(), ld}, {}, nv, w.data(), 1, 1, false};
  const double sec = best_seconds([&] { run_fwd<float, kPlain, 4, 4>(args); }, reps);
  return 16.0 * 8 * nv * VL / sec;
}
"""


@functools.lru_cache(maxsize=None)
def _module():
    from butterfly.kernels.cpu.build import _compile_flags, _quiet_cpp_extension, _source_dir
    with _quiet_cpp_extension() as cpp_extension:
        return cpp_extension.load_inline(
            "butterfly_bench_loops", cpp_sources=SOURCE,
            functions=["fma_loop", "lane_stages", "run44"],
            extra_include_paths=[str(_source_dir())], extra_cflags=_compile_flags()[0],
            extra_ldflags=["-fopenmp"], verbose=False)


def _loaded():
    try:
        return _module()
    except Exception as error:  # no compiler: the rates are left out, not guessed
        warnings.warn(f"the benchmark loops did not compile ({error}); the FMA peak and the "
                      "stage rates are left out")
        return None


def fma_step(threads: int, iters: int = 1 << 18) -> Optional[Tuple[Callable[[], float], float]]:
    """A step that runs the FMA loop on ``threads`` threads, and the multiply-adds one call does
    (about 67 million per thread with the default ``iters``); None where it cannot compile."""
    module = _loaded()
    if module is None:
        return None
    return (lambda: module.fma_loop(iters, threads)), module.fma_loop(1, threads) * iters


def stage_rates(quick: bool = False) -> List[Dict]:
    """One thread, data in L1: GMAC/s of every stage of the lanes forward of a 256- and a
    1024-channel base-4 layer, of its last stage as the fused forward runs it, of the whole
    forward on one tile and of every stage's weight gradient as the backward runs it, and of the
    NCHW (4, 4) run at 3 and 12 vectors a row."""
    module = _loaded()
    if module is None:
        return []
    reps = 200 if quick else 2000
    rows = []
    for n, pixels in ((256, 15), (1024, 8)):  # the kernel's tiles (bft/lanes.h)
        for k, q, t, rate, what, s in module.lane_stages(n, pixels, reps):
            kind = ("vertical (members in one lane of 4 vectors)" if q == 1 else
                    f"in one vector (stride {int(t)}: {int(q) - 1} permutes per 4 FMAs)"
                    if q == k else f"across {int(k // q)} vectors, {int(q)} members each")
            suffix = {1: ", finished", 3: ", weight gradient"}.get(what, "")
            step = f"stage {int(s)}{suffix}"
            if what == 1:
                kind = "the last stage adding the residual and a ReLU epilogue, to output rows"
            elif what == 2:
                step, kind = "the whole forward", "every stage, one tile, input and output rows"
            rows.append({"kernel": f"lanes, {n} channels, {pixels} pixels", "step": step,
                         "kind": kind, "GMACs": rate / 1e9})
    for nv in (3, 12):
        rows.append({"kernel": "NCHW (4, 4) run, 16 rows", "step": f"{nv} vectors a row",
                     "kind": "16 rows in registers, broadcast weights",
                     "GMACs": module.run44(nv, reps) / 1e9})
    return rows
