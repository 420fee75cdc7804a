// A dense convolution over few input channels (a network's stem: 3 colour channels in), on
// channels-last images, with its bias and activation fused:
//
//   y[n, oh, ow, co] = act(b[co] + sum over (i, j, ci) of x[n, S*oh - P + i, S*ow - P + j, ci]
//                                                    * w[co, ci, i, j])
//
// (taps outside the image read as zero). With 3 input channels a GEMM formulation (im2col, or
// oneDNN's) reduces over only 27 terms per output; here the output channels are the SIMD lanes
// and every tap is one broadcast input value times NV weight vectors, for a register block of
// PB output pixels: NV weight loads and PB broadcasts per NV * PB FMAs, the weights packed
// (taps, output channels) once per call. A task is one output row of one image. Rows whose
// taps leave the image at the top or bottom skip those kernel rows; columns whose taps leave it
// at the left or right run one pixel at a time with each tap's column checked.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "depthwise/dw_kernel.h"

namespace small_input_conv {

using dwconv::activate;
using dwconv::lanes;
using dwconv::store_m;
using simd::unroll;
template <class A>
using V = simd::vec_t<A>;
template <class A>
inline constexpr int VL = simd::Vec<A>::lanes;

struct Shape {
  int64_t N, C, H, W;   // input, channels last
  int64_t Co, K, S, P;  // output channels, kernel size, stride, padding
  int64_t Ho, Wo;
};

// Output vectors per register block (float64, rare here, takes one vector at a time: fewer
// instances to compile), and pixels per block for NV vectors: at most 12 pixels and 16
// accumulators, and the NV * PB accumulators, the NV weights and one broadcast fit the vector
// registers (a spilled accumulator costs a store and a load per tap).
template <class A>
inline constexpr int kMaxNV = std::is_same_v<A, float> ? 4 : 1;
template <int NV>
inline constexpr int kPixels = std::min({12, 16 / NV, (SIMD_VECTOR_REGISTERS - 1 - NV) / NV});

// acc[q][v] += sum over taps t in [t0, t1) of x[base + off[t] + q * ps] * w[t][v].
template <class A, int NV, int PB>
SIMD_INLINE void block_taps(const A* x, int64_t base, int64_t ps, const int64_t* off, int64_t t0,
                            int64_t t1, const A* w, int64_t wld, V<A> (&acc)[PB][NV]) {
  for (int64_t t = t0; t < t1; ++t) {
    V<A> wv[NV];
    unroll<NV>([&](auto v) SIMD_INLINE_LAMBDA { wv[v] = simd::vload(w + t * wld + v * VL<A>); });
    const A* p = x + (base + off[t]);
    // scalar * vector: a broadcast load, or an FMA's broadcast operand
    unroll<PB>([&](auto q) SIMD_INLINE_LAMBDA {
      const A xs = p[q * ps];
      unroll<NV>([&](auto v) SIMD_INLINE_LAMBDA { acc[q][v] += xs * wv[v]; });
    });
  }
}

// The bias, the activation and the store of PB pixels' NV vectors (the last vector of the
// output channels, count lanes of it, masked). The activation is a runtime argument: each output
// vector took K * K * C FMAs, next to which its branch costs nothing measurable, and a compiled
// copy per activation would multiply the instances.
template <class A, int NV, int PB>
SIMD_INLINE void store_block(A* y, int64_t Co, const V<A>* bias, int act, V<A> (&acc)[PB][NV],
                             int last) {
  unroll<PB>([&](auto q) SIMD_INLINE_LAMBDA {
    unroll<NV>([&](auto v) SIMD_INLINE_LAMBDA {
      const V<A> out = activate<A>(acc[q][v] + bias[v], act);
      A* dst = y + q * Co + v * VL<A>;
      if (v + 1 < NV || last == VL<A>)
        simd::vstore(dst, out);
      else
        store_m(dst, out, lanes<A>(0, last));
    });
  });
}

// Output vectors [cv, cv + NV) of output pixels [ow0, ow1) of row oh of image n.
template <class A, int NV>
void conv_row(const Shape& s, const A* x, const A* w, int64_t wld, const A* bias, int act,
              const int64_t* off, const int* tap_col, A* y, int64_t n, int64_t oh, int64_t cv) {
  constexpr int PB = kPixels<NV>;
  const int64_t C = s.C, KC = s.K * s.C, ps = s.S * s.C;
  const int64_t ih0 = s.S * oh - s.P;
  // the kernel rows inside the image: taps [t0, t1)
  const int64_t t0 = std::max<int64_t>(0, -ih0) * KC;
  const int64_t t1 = std::min<int64_t>(s.K, s.H - ih0) * KC;
  // the output columns whose taps stay inside the image
  const int64_t lo = std::min<int64_t>(s.Wo, (s.P + s.S - 1) / s.S);
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(s.Wo, (s.W - s.K + s.P) / s.S + 1));
  const int64_t co = cv * VL<A>;
  const int last = (int)std::min<int64_t>(VL<A>, s.Co - (cv + NV - 1) * VL<A>);
  const A* wc = w + co;
  V<A> bv[NV];
  unroll<NV>([&](auto v) SIMD_INLINE_LAMBDA {
    bv[v] = bias ? simd::vload(bias + co + v * VL<A>) : V<A>{};
  });
  A* yrow = y + ((n * s.Ho + oh) * s.Wo) * s.Co + co;
  const int64_t row_base = (n * s.H + ih0) * s.W * C;
  auto checked = [&](int64_t ow) {
    V<A> acc[1][NV] = {};
    const int64_t iw0 = s.S * ow - s.P;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t iw = iw0 + tap_col[t];
      if (iw < 0 || iw >= s.W) continue;
      const A xv = x[row_base + iw0 * C + off[t]];
      unroll<NV>([&](auto v) SIMD_INLINE_LAMBDA {
        acc[0][v] += xv * simd::vload(wc + t * wld + v * VL<A>);
      });
    }
    store_block<A, NV, 1>(yrow + ow * s.Co, s.Co, bv, act, acc, last);
  };
  int64_t ow = 0;
  for (; ow < lo; ++ow) checked(ow);
  for (; ow + PB <= hi; ow += PB) {
    V<A> acc[PB][NV] = {};
    block_taps<A, NV, PB>(x, row_base + (s.S * ow - s.P) * C, ps, off, t0, t1, wc, wld, acc);
    store_block<A, NV, PB>(yrow + ow * s.Co, s.Co, bv, act, acc, last);
  }
  for (; ow < hi; ++ow) {
    V<A> acc[1][NV] = {};
    block_taps<A, NV, 1>(x, row_base + (s.S * ow - s.P) * C, ps, off, t0, t1, wc, wld, acc);
    store_block<A, NV, 1>(yrow + ow * s.Co, s.Co, bv, act, acc, last);
  }
  for (; ow < s.Wo; ++ow) checked(ow);
}

// y (N, Ho, Wo, Co) = act(conv(x) + bias) for x (N, H, W, C) and weight (Co, C, K, K); bias may
// be null. Rows of images are the parallel tasks (run_rows(count, fn): fn(first, end)).
template <class A, class RunRows>
void forward(const Shape& s, const A* x, const A* weight, const A* bias, int act, A* y,
             RunRows&& run_rows) {
  const int64_t taps = s.K * s.K * s.C, nv = (s.Co + VL<A> - 1) / VL<A>, wld = nv * VL<A>;
  // packed weights (taps, wld) and bias (wld), zero past Co; tap t = (i * K + j) * C + c
  std::vector<A> w((size_t)(taps * wld), A(0)), b(bias ? (size_t)wld : 0, A(0));
  std::vector<int64_t> off((size_t)taps);
  std::vector<int> col((size_t)taps);
  for (int64_t i = 0; i < s.K; ++i)
    for (int64_t j = 0; j < s.K; ++j)
      for (int64_t c = 0; c < s.C; ++c) {
        const int64_t t = (i * s.K + j) * s.C + c;
        off[t] = (i * s.W + j) * s.C + c;
        col[t] = (int)j;
        for (int64_t o = 0; o < s.Co; ++o)
          w[t * wld + o] = weight[((o * s.C + c) * s.K + i) * s.K + j];
      }
  if (bias) std::copy(bias, bias + s.Co, b.begin());
  const A* bp = bias ? b.data() : nullptr;
  run_rows(s.N * s.Ho, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.Ho, oh = r % s.Ho;
      for (int64_t cv = 0; cv < nv; cv += kMaxNV<A>) {
        const int64_t left = nv - cv;
        auto row = [&](auto nv_c) {
          conv_row<A, decltype(nv_c)::value>(s, x, w.data(), wld, bp, act, off.data(),
                                             col.data(), y, n, oh, cv);
        };
        if constexpr (kMaxNV<A> == 1) {
          row(std::integral_constant<int, 1>{});
        } else {
          if (left >= 4) row(std::integral_constant<int, 4>{});
          else if (left == 3) row(std::integral_constant<int, 3>{});
          else if (left == 2) row(std::integral_constant<int, 2>{});
          else row(std::integral_constant<int, 1>{});
        }
      }
    }
  });
}

}  // namespace small_input_conv
