// OpenMP, optional: <omp.h> only when the compiler has OpenMP (-fopenmp defines _OPENMP).
// Without it the `#pragma omp` lines are ignored: parallel loops run on the calling thread, with
// the same work partitions and reduction orders (they depend on the requested thread count, not
// on OpenMP), and `omp simd` reductions sum in source order instead of by vector lanes. The
// kernels use pragmas only: a call of an omp_* function would need a serial stand-in here.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif
