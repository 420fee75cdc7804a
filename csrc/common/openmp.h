// OpenMP, optional: <omp.h> only when the compiler has OpenMP (-fopenmp defines _OPENMP).
// Without it the `#pragma omp` lines are ignored: parallel loops run on the calling thread, with
// the same work partitions and reduction orders (they depend on the requested thread count, not
// on OpenMP), and `omp simd` reductions sum in source order instead of by vector lanes. Calls of
// omp_* functions stay in this file, behind the same guard.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace par {

// body() on `threads` threads (one OpenMP parallel region), or once on the calling thread when
// threads <= 1: a region costs as much to open for one thread as for two, so a kernel's call on
// one thread opens none.
template <class F>
inline void region(int threads, F&& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body();
    return;
  }
#endif
  body();
}

// Inside region(): body(i) for every i < n, shared among the region's threads, `chunk` iterations
// at a time as threads free up (Static: in equal parts, in order), then a barrier (none with
// Nowait). In a region of one thread, every iteration on the caller, in order, without OpenMP's
// scheduling.
template <bool Static = false, bool Nowait = false, class F>
inline void for_each(int64_t n, int64_t chunk, F&& body) {
#ifdef _OPENMP
  if (omp_get_num_threads() > 1) {
    if constexpr (Static) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) body(i);
    } else if constexpr (Nowait) {
#pragma omp for schedule(dynamic, chunk) nowait
      for (int64_t i = 0; i < n; ++i) body(i);
    } else {
#pragma omp for schedule(dynamic, chunk)
      for (int64_t i = 0; i < n; ++i) body(i);
    }
    return;
  }
#endif
  (void)chunk;
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace par
