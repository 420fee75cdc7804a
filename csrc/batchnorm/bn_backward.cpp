// The BatchNorm-activation backward's kernels (bn_kernel.h's entry points grad_sums and
// grad_input) for float32 and float64, compiled for each activation.
#include "batchnorm/bn_kernel.h"

namespace bnact {

// ---------------------------------------------------------------------------- backward
// s1[c] = sum g_z, s2[c] = sum g_z * (x - mean).
template <typename T, int ACT>
void grad_sums_act(const Shape& s, bool cl, const T* g, const T* x, const T* y, const T* mean,
               const T* scale, const T* shift, double* s1, double* s2) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  constexpr bool pre = ACT == kHardswish || ACT == kHardsigmoid;
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T mu = mean[c], a = scale[c], d = shift[c];
        double t1 = 0, t2 = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t o = (n * C + c) * HW;
          const T *pg = g + o, *px = x + o, *py = y + o;
          for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
            const int64_t i1 = std::min(HW, i0 + kBlock);
            T b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b1, b2)
            for (int64_t i = i0; i < i1; ++i) {
              const T z = pre ? px[i] * a + d : T(0);
              const T gz = activation_grad<T>(pg[i], py[i], z, ACT);
              b1 += gz;
              b2 += gz * (px[i] - mu);
            }
            t1 += b1;
            t2 += b2;
          }
        }
        s1[c] = t1;
        s2[c] = t2;
      }
    });
    return;
  }
  channels_last_sums<T>(M, C, [&](int64_t r, T* q1, T* q2) {
    const T *pg = g + r * C, *px = x + r * C, *py = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T z = pre ? px[c] * scale[c] + shift[c] : T(0);
      const T gz = activation_grad<T>(pg[c], py[c], z, ACT);
      q1[c] += gz;
      q2[c] += gz * (px[c] - mean[c]);
    }
  }, s1, s2);
}

// grad_x = k_g[c] * g_z + k_x[c] * x + k_0[c].
template <typename T, int ACT>
void grad_input_act(const Shape& s, bool cl, const T* g, const T* x, const T* y, const T* scale,
                const T* shift, const T* kg, const T* kx, const T* k0, T* gx) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  constexpr bool pre = ACT == kHardswish || ACT == kHardsigmoid;
  if (!cl) {
    at::parallel_for(0, s.N * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)),
                     [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const T a = scale[c], d = shift[c], u = kg[c], v = kx[c], w = k0[c];
        const T *pg = g + b * HW, *px = x + b * HW, *py = y + b * HW;
        T* q = gx + b * HW;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) {
          const T z = pre ? px[i] * a + d : T(0);
          q[i] = u * activation_grad<T>(pg[i], py[i], z, ACT) + v * px[i] + w;
        }
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T *pg = g + r * C, *px = x + r * C, *py = y + r * C;
        T* q = gx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T z = pre ? px[c] * scale[c] + shift[c] : T(0);
          q[c] = kg[c] * activation_grad<T>(pg[c], py[c], z, ACT) + kx[c] * px[c] + k0[c];
        }
      }
    });
  }
}

template <typename T>
void grad_sums(const Shape& s, bool cl, int act, const T* g, const T* x, const T* y, const T* mean,
               const T* scale, const T* shift, double* s1, double* s2) {
  with_activation<0>(act, [&](auto A) {
    grad_sums_act<T, decltype(A)::value>(s, cl, g, x, y, mean, scale, shift, s1, s2);
  });
}

template <typename T>
void grad_input(const Shape& s, bool cl, int act, const T* g, const T* x, const T* y,
                const T* scale, const T* shift, const T* kg, const T* kx, const T* k0, T* gx) {
  with_activation<0>(act, [&](auto A) {
    grad_input_act<T, decltype(A)::value>(s, cl, g, x, y, scale, shift, kg, kx, k0, gx);
  });
}

#define BN_INSTANTIATE(T)                                                                       \
  template void grad_sums<T>(const Shape&, bool, int, const T*, const T*, const T*, const T*,   \
                             const T*, const T*, double*, double*);                             \
  template void grad_input<T>(const Shape&, bool, int, const T*, const T*, const T*, const T*,  \
                              const T*, const T*, const T*, const T*, T*);
BN_INSTANTIATE(float)
BN_INSTANTIATE(double)
#undef BN_INSTANTIATE

}  // namespace bnact
