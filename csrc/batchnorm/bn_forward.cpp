// The BatchNorm-activation forward's kernels (bn_kernel.h's entry points batch_stats and
// normalize) for float32 and float64: the statistics pass and the normalising pass, compiled for
// each activation.
#include <cmath>

#include "batchnorm/bn_kernel.h"

namespace bnact {

// ---------------------------------------------------------------------------- statistics
// mean[c], var[c] (biased) and invstd[c] = 1 / sqrt(var[c] + eps) of the batch.
template <typename T>
void batch_stats(const Shape& s, bool cl, const T* x, double eps, T* mean, T* invstd,
                 T* var_out) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  std::vector<double> sum(C, 0.0), sumsq(C, 0.0);
  std::vector<T> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = cl ? x[c] : x[c * HW];
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T sh = shift[c];
        double t1 = 0, t2 = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const T* p = x + (n * C + c) * HW;
          for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
            const int64_t i1 = std::min(HW, i0 + kBlock);
            T b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b1, b2)
            for (int64_t i = i0; i < i1; ++i) {
              const T v = p[i] - sh;
              b1 += v;
              b2 += v * v;
            }
            t1 += b1;
            t2 += b2;
          }
        }
        sum[c] = t1;
        sumsq[c] = t2;
      }
    });
  } else {
    const T* sh = shift.data();
    channels_last_sums<T>(M, C, [&](int64_t r, T* q1, T* q2) {
      const T* p = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T v = p[c] - sh[c];
        q1[c] += v;
        q2[c] += v * v;
      }
    }, sum.data(), sumsq.data());
  }
  for (int64_t c = 0; c < C; ++c) {
    const double d = sum[c] / M;  // mean - shift
    const double var = std::max(sumsq[c] / M - d * d, 0.0);
    mean[c] = static_cast<T>(static_cast<double>(shift[c]) + d);
    var_out[c] = static_cast<T>(var);
    invstd[c] = static_cast<T>(1.0 / std::sqrt(var + eps));
  }
}

// Per-channel y = act(x * scale + shift).
template <typename T, int ACT>
void normalize_act(const Shape& s, bool cl, const T* x, const T* scale, const T* shift, T* y) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  if (!cl) {
    at::parallel_for(0, s.N * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)),
                     [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const T a = scale[c], d = shift[c];
        const T* p = x + b * HW;
        T* q = y + b * HW;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) q[i] = activate<T>(p[i] * a + d, ACT);
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* p = x + r * C;
        T* q = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) q[c] = activate<T>(p[c] * scale[c] + shift[c], ACT);
      }
    });
  }
}

template <typename T>
void normalize(const Shape& s, bool cl, int act, const T* x, const T* scale, const T* shift, T* y) {
  with_activation<0>(act, [&](auto A) {
    normalize_act<T, decltype(A)::value>(s, cl, x, scale, shift, y);
  });
}

#define BN_INSTANTIATE(T)                                                                       \
  template void batch_stats<T>(const Shape&, bool, const T*, double, T*, T*, T*);               \
  template void normalize<T>(const Shape&, bool, int, const T*, const T*, const T*, T*);
BN_INSTANTIATE(float)
BN_INSTANTIATE(double)
#undef BN_INSTANTIATE

}  // namespace bnact
