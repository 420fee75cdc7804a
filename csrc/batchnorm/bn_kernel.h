// The BatchNorm-activation kernels' shared parts (no PyTorch types but ATen's parallel_for): the
// activations and their gradients, the shape, the channels-last sums, and the entry points that
// bn_cpu.cpp binds, compiled in bn_forward.cpp and bn_backward.cpp for float32 and float64.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/activation.h"

namespace bnact {

using activation::kHardsigmoid;
using activation::kHardswish;
using activation::kNone;
using activation::kRelu;
using activation::kRelu6;

template <typename T>
inline T activate(T z, int act) {
  switch (act) {
    case kRelu: return std::max(z, T(0));  // NaN stays NaN, as in torch.relu
    case kRelu6: return std::min(std::max(z, T(0)), T(6));
    case kHardswish: return z * std::min(std::max(z + T(3), T(0)), T(6)) / T(6);
    case kHardsigmoid: return std::min(std::max(z + T(3), T(0)), T(6)) / T(6);
    default: return z;
  }
}

// d act / d z times g, with PyTorch's conventions at the kinks and for NaN (threshold_backward,
// hardtanh_backward, hardswish_backward, hardsigmoid_backward). y is the output, z the
// pre-activation (only read for hardswish and hardsigmoid).
template <typename T>
inline T activation_grad(T g, T y, T z, int act) {
  switch (act) {
    case kRelu: return y <= T(0) ? T(0) : g;
    case kRelu6: return (y <= T(0) || y >= T(6)) ? T(0) : g;
    case kHardswish: return z < T(-3) ? T(0) : (z <= T(3) ? g * (z / T(3) + T(0.5)) : g);
    case kHardsigmoid: return (z > T(-3) && z < T(3)) ? g / T(6) : T(0);
    default: return g;
  }
}

struct Shape {
  int64_t N, C, HW;
  int64_t M() const { return N * HW; }  // values per channel
};

// Sums are taken in T over blocks of at most kBlock values, each block's sum added to a double
// accumulator: vectorisable, and as accurate as a double sum for all practical purposes. The
// statistics sum x - shift (shift: the channel's first value) so that x^2 does not cancel.
constexpr int64_t kBlock = 256;

template <int A, typename F>
void with_activation(int act, F&& f) {
  if constexpr (A < activation::kCount) {
    if (act == A) return f(std::integral_constant<int, A>{});
    with_activation<A + 1>(act, std::forward<F>(f));
  }
}

// Per-channel sums (out1, out2) over the M rows of a channels_last tensor: add_row(r, q1, q2)
// adds row r's terms to the block accumulators q1, q2 (C values each). Fixed row chunks with
// their partial sums reduced in chunk order: the same bits whatever the number of threads.
template <typename T, typename AddRow>
void channels_last_sums(int64_t M, int64_t C, AddRow add_row, double* out1, double* out2) {
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(kBlock, 16384 / C));
  const int64_t chunks = (M + rows - 1) / rows;
  std::vector<double> part(static_cast<size_t>(chunks) * 2 * C);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> b1(C), b2(C);
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(b1.begin(), b1.end(), T(0));
      std::fill(b2.begin(), b2.end(), T(0));
      const int64_t r1 = std::min(M, (k + 1) * rows);
      for (int64_t r = k * rows; r < r1; ++r) add_row(r, b1.data(), b2.data());
      double* p = part.data() + k * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        p[c] = b1[c];
        p[C + c] = b2[c];
      }
    }
  });
  std::fill(out1, out1 + C, 0.0);
  std::fill(out2, out2 + C, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    const double* p = part.data() + k * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      out1[c] += p[c];
      out2[c] += p[C + c];
    }
  }
}

// ---------------------------------------------------------------------------- entry points
// act: a code of common/activation.h. Forward (bn_forward.cpp): the batch statistics (mean,
// invstd = 1 / sqrt(var + eps), biased var) and y = act(x * scale + shift).
template <typename T>
void batch_stats(const Shape& s, bool cl, const T* x, double eps, T* mean, T* invstd, T* var_out);
template <typename T>
void normalize(const Shape& s, bool cl, int act, const T* x, const T* scale, const T* shift, T* y);

// Backward (bn_backward.cpp): s1[c] = sum g_z, s2[c] = sum g_z * (x - mean); grad_x = k_g[c] *
// g_z + k_x[c] * x + k_0[c] (g_z: the gradient before the activation).
template <typename T>
void grad_sums(const Shape& s, bool cl, int act, const T* g, const T* x, const T* y, const T* mean,
               const T* scale, const T* shift, double* s1, double* s2);
template <typename T>
void grad_input(const Shape& s, bool cl, int act, const T* g, const T* x, const T* y,
                const T* scale, const T* shift, const T* kg, const T* kx, const T* k0, T* gx);

}  // namespace bnact
