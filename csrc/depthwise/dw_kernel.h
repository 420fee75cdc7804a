// The fused depthwise k x k convolution's kernels on CPU tensors (no PyTorch types here; dw_ops.h
// is their interface, dw_cpu.cpp and dw_bft_cpu.cpp bind them).
//
// y[n, c] = act(conv(x[n, c], w[c]) + b[c]), padding k / 2, stride 1 or 2, odd k = 3, 5, 7.
// Layouts (docs/depthwise.md):
//
// * Channels-last: the channels are the SIMD lanes. The compiled kernels on batches in cache
//   copy a task's input rows into zero-bordered planes of one vector per pixel (see "padded
//   planes" below), so every register block of R pixels is loads at constant offsets; otherwise
//   a task is an output row, its channel blocks one after the other. Along a row, blocks of R
//   pixels share the input vectors they read (stride 1, k = 3, R = 8: 30 loads for 72 FMAs); in
//   the row tasks a block with a tap outside the image (at the first and last columns) checks its
//   columns, and the rest of a row is one block each of R/2, R/4, ..., 1 pixels.
// * NCHW with output rows of a vector or more: the pixels of a row are the lanes. A task is
//   (image, channel, strip of output rows); the k taps of an input row are k (stride 1) or 3
//   (stride 2, deinterleaved in registers) masked loads of that row, so the zero padding is
//   masked-off lanes, never stored; blocks of up to 8 output rows share the input rows they read.
// * NCHW with narrower planes: tiles of VL channels, transposed in registers into a
//   channels-last buffer, run by the channels-last code, transposed back.
//
// Bias and activation run on the accumulators before the one store of each output vector. Each
// task prefetches the rows the next one reads first; large outputs use streaming stores.
//
// Backward: the input gradient is a convolution of the output gradient with the flipped kernel
// (stride 1: the forward code itself) or, for stride 2, its transposed form by phases: the
// input pixel (2i + a, 2j + b) gets the taps of parity (a, b), so each of the four phases is a
// small dense convolution of g. The weight and bias gradients are reductions over images and
// pixels: every task of a fixed partition (a function of the shape alone, never of the thread
// count) sums its share in a fixed order into its own partial, and the partials are added in
// task order. The same inputs give bit-identical gradients, whatever the number of threads or
// the schedule.
//
// Two sets of kernels share the layout code (the drivers forward_nchw, backward_cl, ..., whose
// template parameters KC and SC are the kernel size and stride, or 0 for runtime values):
//
// * compiled kernels, with k, the stride and the activation as constants, register blocks of
//   rows or pixels, and fully unrolled taps: float32 with k = 3 and the common activations
//   (dw_k3_forward.cpp, dw_k3_backward.cpp);
// * generic kernels (the *_any functions), with k, the stride and the activation as runtime
//   arguments, loops over the taps, and the weights and taps in memory rather than registers:
//   every other case, float64 (used mostly for testing), k = 5 and 7, and hardsigmoid
//   (dw_any.cpp). They are slower than compiled kernels would be, and compile in a fraction of
//   the time.
//
// Each output of either set is the same sum, its terms added in the same order (the bias, then
// the taps in (kh, kw) order; the weight gradient's terms in the order of the compiled kernels'
// register blocks), so both give the same bits. A compiled kernel for every case would multiply
// the instantiations, and the build time with them.
#pragma once

#include "common/openmp.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/simd.h"
#include "depthwise/dw_ops.h"

namespace dwconv {

using simd::prefetch_bytes;
using simd::unroll;

// The largest kernel size: the size of the generic kernels' arrays.
inline constexpr int kMaxK = 7;

// ------------------------------------------------------------------------------------ vectors
// a broadcast (a - 0 is a and folds away; 0 + a is not, for a = -0, and would cost an add)
template <class A>
SIMD_INLINE V<A> splat(A a) {
  return a - V<A>{};
}

// The lanes l with lo <= l < hi, as a bit mask.
template <class A>
SIMD_INLINE uint32_t lanes(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, VL<A>);
  if (hi <= lo) return 0;
  return (uint32_t)((uint64_t{1} << hi) - (uint64_t{1} << lo));
}

template <class A>
inline constexpr uint32_t kFull = (uint32_t)((uint64_t{1} << VL<A>) - 1);

// Outputs this large (bytes) are written with streaming stores: they do not fit the caches, and
// a streaming store does not read the line before writing it.
inline constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Whether a channels-last output of `bytes` bytes and C channels is written with streaming
// stores. Its vectors must be whole cache lines (AVX-512 floats): a channels-last task writes one
// channel block at a pixel stride, and the half-line streaming stores of 256-bit vectors leave
// the write-combining buffers with partial lines, each a separate write to memory (several
// times slower than plain stores).
template <class A>
inline bool cl_stream(int64_t C, int64_t bytes) {
  return VL<A> * sizeof(A) >= 64 && C % VL<A> == 0 && bytes >= kStreamBytes;
}

// p[l] for the lanes of m, zero elsewhere. p + l need not be addressable for lanes outside m.
template <class A>
SIMD_INLINE V<A> load_m(const A* p, uint32_t m) {
#if !defined(__AVX512F__)
  if (m == kFull<A>) return simd::vload(p);
#endif
  return simd::vload_mask(p, m);
}

template <class A>
SIMD_INLINE void store_m(A* p, V<A> v, uint32_t m) {
#if !defined(__AVX512F__)
  if (m == kFull<A>) return simd::vstore(p, v);
#endif
  simd::vstore_mask(p, v, m);
}

// The activations of the Python side's `activate` (butterfly/ops/bft_fused.py); NaN stays NaN,
// as in PyTorch.
template <class A>
SIMD_INLINE V<A> activate(V<A> y, int act) {
  const V<A> zero{}, six = splat<A>(6);
  switch (act) {
    case kRelu:
      return y < zero ? zero : y;
    case kRelu6: {
      V<A> t = y < zero ? zero : y;
      return t > six ? six : t;
    }
    case kHardswish: {
      V<A> t = y + (A)3;
      t = t < zero ? zero : t;
      t = t > six ? six : t;
      return y * t * (A)(1.0 / 6.0);
    }
    case kHardsigmoid: {
      V<A> t = y + (A)3;
      t = t < zero ? zero : t;
      t = t > six ? six : t;
      return t * (A)(1.0 / 6.0);
    }
    default:
      return y;
  }
}

// Lanes 2l + B of the concatenation (a, b).
template <class A, int B, int... L>
SIMD_INLINE V<A> deinterleave(V<A> a, V<A> b, std::integer_sequence<int, L...>) {
  return simd::shuffle2<A, (2 * L + B)...>(a, b);
}

// Lanes M.. of eo, then lanes B, B + 2, ... of v2 (the next elements of the same parity).
template <class A, int M, int B, int... L>
SIMD_INLINE V<A> shift_in(V<A> eo, V<A> v2, std::integer_sequence<int, L...>) {
  constexpr int n = VL<A>;
  if constexpr (M == 0) {
    return eo;
  } else {
    return simd::shuffle2<A, (L < n - M ? L + M : n + 2 * (L - (n - M)) + B)...>(eo, v2);
  }
}

// Lanes M.. of a, then the first lanes of b (b: the next elements of a's sequence).
template <class A, int M, int... L>
SIMD_INLINE V<A> shift_next(V<A> a, V<A> b, std::integer_sequence<int, L...>) {
  if constexpr (M == 0) {
    return a;
  } else {
    return simd::shuffle2<A, (L + M)...>(a, b);
  }
}

// Lanes (a0, b0, a1, b1, ...) of the first (H = 0) or second (H = 1) half.
template <class A, int H, int... L>
SIMD_INLINE V<A> interleave(V<A> a, V<A> b, std::integer_sequence<int, L...>) {
  constexpr int n = VL<A>;
  return simd::shuffle2<A, ((L % 2 ? n : 0) + H * n / 2 + L / 2)...>(a, b);
}

template <class A>
using Lanes = std::make_integer_sequence<int, VL<A>>;

// ---------------------------------------------------------------------------- NCHW row taps
// tap[kw][l] = row[S * (c0 + l) + kw - P], zero outside [0, W): the k inputs of output lanes
// c0 .. c0 + VL of one input row. The masks depend on c0 only and are made once per column.
template <class A, int K, int S>
struct RowTaps;

template <class A, int K>
struct RowTaps<A, K, 1> {
  static constexpr int P = K / 2;
  int64_t c0 = 0;
  uint32_t m[K];
  RowTaps() = default;
  RowTaps(int64_t col, int64_t W) : c0(col) {
    for (int kw = 0; kw < K; ++kw) m[kw] = lanes<A>(P - c0 - kw, W - (c0 + kw - P));
  }
  SIMD_INLINE void load(const A* row, V<A>* tap) const {
    unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA {
      constexpr int KW = decltype(kw)::value;
      tap[KW] = load_m(row + c0 + KW - P, m[KW]);
    });
  }
};

template <class A, int K>
struct RowTaps<A, K, 2> {
  static constexpr int P = K / 2;
  // The taps of VL output lanes span 2 VL + K - 2 inputs: 3 vectors, or 4 when K - 2 > VL
  // (k = 7 with 4 lanes: float64 on AVX2, float32 on SSE).
  static constexpr int NV =
      K - 2 < VL<A> ? 3 : K - 2 < 2 * VL<A> ? 4 : (2 * VL<A> + K + VL<A> - 3) / VL<A>;
  int64_t base = 0;
  uint32_t m[NV];
  RowTaps() = default;
  RowTaps(int64_t col, int64_t W) : base(2 * col - P) {
    for (int q = 0; q < NV; ++q) m[q] = lanes<A>(-(base + q * VL<A>), W - (base + q * VL<A>));
  }
  SIMD_INLINE void load(const A* row, V<A>* tap) const {
    const A* p = row + base;
    if constexpr (NV > 4) {  // k = 7 with 2 lanes (float64 on SSE): lane by lane
      for (int kw = 0; kw < K; ++kw)
        for (int l = 0; l < VL<A>; ++l) {
          const int e = 2 * l + kw;  // element of p
          tap[kw][l] = (m[e / VL<A>] >> (e % VL<A>) & 1) ? p[e] : A(0);
        }
    } else {
      const V<A> v0 = load_m(p, m[0]), v1 = load_m(p + VL<A>, m[1]);
      const V<A> v2 = load_m(p + 2 * VL<A>, m[2]);
      const V<A> even = deinterleave<A, 0>(v0, v1, Lanes<A>{});
      const V<A> odd = deinterleave<A, 1>(v0, v1, Lanes<A>{});
      if constexpr (NV == 3) {
        unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA {
          constexpr int KW = decltype(kw)::value, M = KW / 2, B = KW % 2;
          tap[KW] = shift_in<A, M, B>(B ? odd : even, v2, Lanes<A>{});
        });
      } else {
        const V<A> v3 = load_m(p + 3 * VL<A>, m[3]);
        const V<A> even2 = deinterleave<A, 0>(v2, v3, Lanes<A>{});
        const V<A> odd2 = deinterleave<A, 1>(v2, v3, Lanes<A>{});
        unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA {
          constexpr int KW = decltype(kw)::value, M = KW / 2, B = KW % 2;
          tap[KW] = shift_next<A, M>(B ? odd : even, B ? odd2 : even2, Lanes<A>{});
        });
      }
    }
  }
};

// Rows of a block of RB output rows: the output rows o + r read input rows S * (o + r) - P + kh,
// i.e. block row j = S * r + kh. Inside the image the rows are equally spaced (Uniform: one
// pointer and a stride, few registers); a block that reaches the padding takes Listed rows, the
// ones outside pointing at a row of zeros.
template <int K, int S, int RB>
inline constexpr int kBlockRows = (RB - 1) * S + K;

template <class A>
struct Uniform {
  const A* base;
  int64_t stride;
  SIMD_INLINE const A* operator()(int j) const { return base + j * stride; }
};

template <class A>
struct Listed {
  const A* const* rows;
  SIMD_INLINE const A* operator()(int j) const { return rows[j]; }
};

// acc[r] += sum over taps of w[kh][kw] * x[S (o + r) + kh - P][S (c0 + l) + kw - P].
template <class A, int K, int S, int RB, class Src>
SIMD_INLINE void conv_block(const RowTaps<A, K, S>& rt, Src rows, const V<A>* w, V<A>* acc) {
  unroll<kBlockRows<K, S, RB>>([&](auto jj) SIMD_INLINE_LAMBDA {
    constexpr int j = decltype(jj)::value;
    V<A> tap[K];
    rt.load(rows(j), tap);
    unroll<RB>([&](auto rr) SIMD_INLINE_LAMBDA {
      constexpr int R_ = decltype(rr)::value, kh = j - S * R_;
      if constexpr (kh >= 0 && kh < K) {
        unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA {
          constexpr int KW = decltype(kw)::value;
          acc[R_] += tap[KW] * w[kh * K + KW];
        });
      }
    });
  });
}

// acc[kh K + kw] += sum over the block of g[o + r][c0 + l] * x[S (o + r) + kh - P][...].
template <class A, int K, int S, int RB, class Src>
SIMD_INLINE void wgrad_block(const RowTaps<A, K, S>& rt, Src rows, const V<A>* g, V<A>* acc) {
  unroll<kBlockRows<K, S, RB>>([&](auto jj) SIMD_INLINE_LAMBDA {
    constexpr int j = decltype(jj)::value;
    V<A> tap[K];
    rt.load(rows(j), tap);
    unroll<RB>([&](auto rr) SIMD_INLINE_LAMBDA {
      constexpr int R_ = decltype(rr)::value, kh = j - S * R_;
      if constexpr (kh >= 0 && kh < K) {
        unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA {
          constexpr int KW = decltype(kw)::value;
          acc[kh * K + KW] += g[R_] * tap[KW];
        });
      }
    });
  });
}

// Output rows per register block: stride 1, k = 3: 8 rows (10 input rows, 30 loads for 72 FMAs).
// The NCHW weight gradient's sums follow the blocks: the generic kernels use the same ones.
inline constexpr int row_block(int K, int S) { return K == 3 ? (S == 1 ? 8 : 4) : 2; }
template <int K, int S>
inline constexpr int kRowBlock = row_block(K, S);
inline constexpr int kMaxBlockRows = 16;  // (RB - 1) * S + K for every k and stride

// Calls body(o, std::integral_constant<int, R>) for blocks that cover rows [o0, o1): blocks of
// RB rows, then of RB / 2, ..., 1 for the rest.
template <int RB, class F>
SIMD_INLINE void for_row_blocks(int64_t o0, int64_t o1, F&& body) {
  int64_t o = o0;
  for (; o + RB <= o1; o += RB) body(o, std::integral_constant<int, RB>{});
  if constexpr (RB > 1) for_row_blocks<RB / 2>(o, o1, body);
}

// for_row_blocks with a runtime block size RB (a power of two): body(o, R), R an int.
template <class F>
inline void for_row_blocks_any(int64_t o0, int64_t o1, int RB, F&& body) {
  int64_t o = o0;
  for (int R = RB; R >= 1; R /= 2)
    for (; o + R <= o1; o += R) body(o, R);
}

// Output rows per strip (a task's share of one plane): about 2048 outputs, whole row blocks.
inline int64_t strip_rows(int64_t Ho, int64_t Wo, int RB) {
  const int64_t strips = std::max<int64_t>(1, std::min<int64_t>((Ho * Wo + 2047) / 2048,
                                                                (Ho + RB - 1) / RB));
  const int64_t rows = (Ho + strips - 1) / strips;
  return (rows + RB - 1) / RB * RB;
}

// Tasks per OpenMP chunk so that a chunk has at least ~16K multiply-adds.
inline int64_t chunk_of(int64_t tasks, int64_t work_per_task, int threads) {
  const int64_t by_work = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(work_per_task, 1));
  const int64_t by_balance = std::max<int64_t>(1, tasks / (8 * std::max(threads, 1)));
  return std::min(by_work, by_balance);
}

// The columns of an NCHW plane: taps and output mask of every output vector, and a row of zeros
// for the rows outside the image (read through masks, so no wider than a row plus the margins).
template <class A, int K, int S>
struct Columns {
  std::vector<RowTaps<A, K, S>> taps;
  std::vector<uint32_t> out_mask;
  std::vector<A> zeros;
  int64_t n = 0;
  Columns(int64_t Wi, int64_t Wo) : n((Wo + VL<A> - 1) / VL<A>) {
    taps.resize(n);
    out_mask.resize(n);
    for (int64_t ci = 0; ci < n; ++ci) {
      taps[ci] = RowTaps<A, K, S>(ci * VL<A>, Wi);
      out_mask[ci] = lanes<A>(0, Wo - ci * VL<A>);
    }
    zeros.assign((size_t)(std::max(Wi, S * Wo) + 4 * VL<A> + 2 * K), A(0));
  }
  Columns(int64_t Wi, int64_t Wo, int, int) : Columns(Wi, Wo) {}
  const A* zero_row() const { return zeros.data() + 2 * VL<A> + K; }
};

// The columns of the generic kernels (k and the stride at runtime): the number of output vectors,
// the same row of zeros, and for stride 1 the masks of RowTaps<A, K, 1> (k per output vector);
// stride 2 makes its taps where they are read (row_taps_any).
template <class A>
struct Columns<A, 0, 0> {
  int K, S;
  int64_t n;
  std::vector<uint32_t> masks;  // stride 1: masks[ci * K + kw]
  std::vector<A> zeros;
  Columns(int64_t Wi, int64_t Wo, int k, int s) : K(k), S(s), n((Wo + VL<A> - 1) / VL<A>) {
    if (S == 1) {
      masks.resize((size_t)(n * K));
      for (int64_t ci = 0; ci < n; ++ci)
        for (int kw = 0; kw < K; ++kw) {
          const int64_t c0 = ci * VL<A>;
          masks[ci * K + kw] = lanes<A>(K / 2 - c0 - kw, Wi - (c0 + kw - K / 2));
        }
    }
    zeros.assign((size_t)(std::max(Wi, S * Wo) + 4 * VL<A> + 2 * K), A(0));
  }
  const A* zero_row() const { return zeros.data() + 2 * VL<A> + K; }
};

// RowTaps<A, K, S>(c0, W).load(row, tap) for a runtime k and stride.
template <class A>
SIMD_INLINE void row_taps_any(const A* row, int64_t c0, int64_t W, int K, int S, V<A>* tap) {
  switch (K * 4 + S) {
    case 3 * 4 + 1: return RowTaps<A, 3, 1>(c0, W).load(row, tap);
    case 3 * 4 + 2: return RowTaps<A, 3, 2>(c0, W).load(row, tap);
    case 5 * 4 + 1: return RowTaps<A, 5, 1>(c0, W).load(row, tap);
    case 5 * 4 + 2: return RowTaps<A, 5, 2>(c0, W).load(row, tap);
    case 7 * 4 + 1: return RowTaps<A, 7, 1>(c0, W).load(row, tap);
    default: return RowTaps<A, 7, 2>(c0, W).load(row, tap);
  }
}

// simd::add_lane_sums<A, N> for N = K * K + 1, K = 3, 5, 7.
template <class A>
void add_lane_sums_any(const V<A>* acc, int N, A* out) {
  switch (N) {
    case 10: return simd::add_lane_sums<A, 10>(acc, out);
    case 26: return simd::add_lane_sums<A, 26>(acc, out);
    default: return simd::add_lane_sums<A, 50>(acc, out);
  }
}

// One NCHW plane (output rows [o0, o1)): out = act(conv(in, w) + bias). `in` is Hi x Wi,
// `out` has Wo columns.
template <class A, int K, int S, int Act>
void conv_plane(const A* in, int64_t Hi, int64_t Wi, A* out, int64_t Wo, int64_t o0, int64_t o1,
                const Columns<A, K, S>& cols, const A* w, A bias, bool stream, int act = kNone) {
  constexpr int P = K / 2, RB = kRowBlock<K, S>;
  V<A> wl[K * K];  // in registers (k = 3), not reloaded after every store
  for (int i = 0; i < K * K; ++i) wl[i] = splat(w[i]);
  const V<A> bv = splat(bias);
  const A* zero = cols.zero_row();
  for_row_blocks<RB>(o0, o1, [&](int64_t o, auto rb) SIMD_INLINE_LAMBDA {
    constexpr int R = decltype(rb)::value, NR = kBlockRows<K, S, R>;
    const int64_t first = S * o - P;
    auto run = [&](auto src) SIMD_INLINE_LAMBDA {
      for (int64_t ci = 0; ci < cols.n; ++ci) {
        const RowTaps<A, K, S> rt = cols.taps[ci];
        const uint32_t om = cols.out_mask[ci];
        V<A> acc[R];
        for (int r = 0; r < R; ++r) acc[r] = bv;
        conv_block<A, K, S, R>(rt, src, wl, acc);
        for (int r = 0; r < R; ++r) {
          A* dst = out + (o + r) * Wo + ci * VL<A>;
          const V<A> v = activate<A>(acc[r], Act == kAny ? act : Act);
          if (stream)
            simd::vstream(dst, v);
          else
            store_m(dst, v, om);
        }
      }
    };
    // the rows the next block reads first
    const int64_t next = first + NR, next_end = std::min<int64_t>(Hi, next + S * R);
    if (next < next_end) prefetch_bytes(in + next * Wi, (next_end - next) * Wi * sizeof(A));
    if (first >= 0 && first + NR <= Hi) {
      run(Uniform<A>{in + first * Wi, Wi});
    } else {
      const A* rows[NR];
      for (int j = 0; j < NR; ++j)
        rows[j] = first + j >= 0 && first + j < Hi ? in + (first + j) * Wi : zero;
      run(Listed<A>{rows});
    }
  });
}

// The activations the compiled kernels have as constants: those that follow a depthwise
// convolution in the common networks. The others (hardsigmoid) take the generic kernels.
inline constexpr bool compiled_activation(int act) { return act != kHardsigmoid; }

// f(std::integral_constant<int, act>{}): the compiled_activation act as a constant.
template <class F>
SIMD_INLINE void with_compiled_activation(int act, F&& f) {
  switch (act) {
    case kRelu: return f(std::integral_constant<int, kRelu>{});
    case kRelu6: return f(std::integral_constant<int, kRelu6>{});
    case kHardswish: return f(std::integral_constant<int, kHardswish>{});
    default: return f(std::integral_constant<int, kNone>{});
  }
}

// Calls f(std::integral_constant<int, Act>) with the activation as a constant for the compiled
// kernels (KC != 0; act: a compiled_activation), else with kAny: the activation is then a
// runtime argument.
template <class A, int KC, class F>
SIMD_INLINE void dispatch_act(int act, F&& f) {
  if constexpr (KC != 0)
    with_compiled_activation(act, f);
  else
    f(std::integral_constant<int, kAny>{});
}

// f(std::integral_constant<int, a>{}) for the activation a: Act, or with Act == kAny the runtime
// act of a compiled kernel (one branch per call, so that a register block's outputs take a
// compiled activation).
template <int Act, class F>
SIMD_INLINE void with_activation(int act, F&& f) {
  if constexpr (Act != kAny)
    f(std::integral_constant<int, Act>{});
  else
    with_compiled_activation(act, f);
}

// conv_plane for a runtime k, stride (cols) and activation: each output vector is the bias plus
// the k*k taps in (kh, kw) order, those outside the image read as zeros, as in conv_plane.
template <class A>
void conv_plane_any(const A* in, int64_t Hi, int64_t Wi, A* out, int64_t Wo, int64_t o0,
                    int64_t o1, const Columns<A, 0, 0>& cols, const A* w, A bias, bool stream,
                    int act) {
  const int K = cols.K, S = cols.S, P = K / 2;
  V<A> wl[kMaxK * kMaxK];
  for (int i = 0; i < K * K; ++i) wl[i] = splat(w[i]);
  const V<A> bv = splat(bias);
  const A* zero = cols.zero_row();
  // blocks of up to 2 output rows: their NR input rows' taps made once, each weight loaded once
  for (int64_t o = o0; o < o1; o += 2) {
    const int R = o + 1 < o1 ? 2 : 1, NR = (R - 1) * S + K;
    const A* rows[kMaxK + 2];
    for (int j = 0; j < NR; ++j) {
      const int64_t ih = S * o - P + j;
      rows[j] = ih >= 0 && ih < Hi ? in + ih * Wi : zero;
    }
    // the rows the next block reads first
    const int64_t next = S * o - P + NR, next_end = std::min<int64_t>(Hi, next + S * R);
    if (next >= 0 && next < next_end)
      prefetch_bytes(in + next * Wi, (next_end - next) * Wi * sizeof(A));
    for (int64_t ci = 0; ci < cols.n; ++ci) {
      V<A> tap[kMaxK + 2][kMaxK];
      if (S == 1) {  // masked loads of the row (RowTaps<A, K, 1>)
        const uint32_t* mk = cols.masks.data() + ci * K;
        for (int j = 0; j < NR; ++j)
          for (int kw = 0; kw < K; ++kw) tap[j][kw] = load_m(rows[j] + ci * VL<A> - P + kw, mk[kw]);
      } else {
        for (int j = 0; j < NR; ++j) row_taps_any<A>(rows[j], ci * VL<A>, Wi, K, S, tap[j]);
      }
      V<A> acc[2] = {bv, bv};
      for (int kh = 0; kh < K; ++kh)
        for (int kw = 0; kw < K; ++kw) {
          const V<A> wv = wl[kh * K + kw];
          acc[0] += tap[kh][kw] * wv;
          if (R == 2) acc[1] += tap[S + kh][kw] * wv;
        }
      for (int r = 0; r < R; ++r) {
        A* dst = out + (o + r) * Wo + ci * VL<A>;
        const V<A> v = activate<A>(acc[r], act);
        if (stream)
          simd::vstream(dst, v);
        else
          store_m(dst, v, lanes<A>(0, Wo - ci * VL<A>));
      }
    }
  }
}

// Forward, NCHW. KC, SC: the kernel size and stride of the compiled kernels, or 0 (generic).
template <class A, int KC, int SC>
void forward_nchw(const Shape& sh, const A* x, const A* w, const A* b, int act, A* y,
                  int threads) {
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S;
  const Columns<A, KC, SC> cols(sh.W, sh.Wo, K, S);
  const int64_t srows = strip_rows(sh.Ho, sh.Wo, row_block(K, S));
  const int64_t nstrip = (sh.Ho + srows - 1) / srows;
  const int64_t tasks = sh.N * sh.C * nstrip;
  // tasks handed out at a time (par::for_each)
  const int64_t chunk = chunk_of(tasks, srows * cols.n * VL<A> * K * K, threads);
  const bool stream = sh.Wo % VL<A> == 0 &&
                      sh.N * sh.C * sh.Ho * sh.Wo * (int64_t)sizeof(A) >= kStreamBytes;
  dispatch_act<A, KC>(act, [&](auto act_c) {
    constexpr int Act = decltype(act_c)::value;
    par::region(threads, [&] {
      par::for_each(tasks, chunk, [&](int64_t t) {
        const int64_t plane = t / nstrip, s = t % nstrip, c = plane % sh.C;
        const int64_t o0 = s * srows, o1 = std::min(sh.Ho, o0 + srows);
        const A* in = x + plane * sh.H * sh.W;
        A* out = y + plane * sh.Ho * sh.Wo;
        const A bias = b ? b[c] : A(0);
        if constexpr (KC != 0)
          conv_plane<A, KC, SC, Act>(in, sh.H, sh.W, out, sh.Wo, o0, o1, cols, w + c * K * K, bias,
                                     stream, act);
        else
          conv_plane_any<A>(in, sh.H, sh.W, out, sh.Wo, o0, o1, cols, w + c * K * K, bias, stream,
                            act);
      });
    });
    if (stream) simd::stream_fence();
  });
}

// The input gradient of stride 2, NCHW, for phase rows [i0, i1) of one plane: for
// gx[2i + a][2j + b], the taps (kh, kw) = (a + P - 2 dh, b + P - 2 dw) read g[i + dh][j + dw].
template <class A, int K>
void grad_input_s2_plane(const A* g, int64_t Ho, int64_t Wo, A* gx, int64_t H, int64_t W,
                         int64_t i0, int64_t i1, const A* w /* K*K scalars */, const A* zero) {
  constexpr int P = K / 2;
  // dh (and dw) range over [D0, D1]: a + P - kh = 2 dh for a in {0, 1}, kh in [0, K).
  constexpr int D0 = -((K - 1 - P) / 2), D1 = (1 + P) / 2, ND = D1 - D0 + 1;
  V<A> wv[K * K];
  for (int i = 0; i < K * K; ++i) wv[i] = splat(w[i]);
  const int64_t Wph = (W + 1) / 2;
  for (int64_t i = i0; i < i1; ++i) {
    const A* grow[ND];
    for (int d = 0; d < ND; ++d) {
      const int64_t oh = i + D0 + d;
      grow[d] = oh >= 0 && oh < Ho ? g + oh * Wo : zero;
    }
    for (int64_t j0 = 0; j0 < Wph; j0 += VL<A>) {
      uint32_t cm[ND];
      for (int d = 0; d < ND; ++d) {
        const int64_t start = j0 + D0 + d;
        cm[d] = lanes<A>(-start, Wo - start);
      }
      V<A> L[ND][ND];
      for (int dh = 0; dh < ND; ++dh)
        for (int dw = 0; dw < ND; ++dw) L[dh][dw] = load_m(grow[dh] + j0 + D0 + dw, cm[dw]);
      V<A> acc[2][2] = {};
      unroll<2>([&](auto a_) SIMD_INLINE_LAMBDA {
        constexpr int a = decltype(a_)::value;
        unroll<2>([&](auto b_) SIMD_INLINE_LAMBDA {
          constexpr int b = decltype(b_)::value;
          unroll<K>([&](auto kh_) SIMD_INLINE_LAMBDA {
            constexpr int kh = decltype(kh_)::value;
            if constexpr ((a + P - kh) % 2 == 0) {
              constexpr int dh = (a + P - kh) / 2 - D0;
              unroll<K>([&](auto kw_) SIMD_INLINE_LAMBDA {
                constexpr int kw = decltype(kw_)::value;
                if constexpr ((b + P - kw) % 2 == 0) {
                  constexpr int dw = (b + P - kw) / 2 - D0;
                  acc[a][b] += L[dh][dw] * wv[kh * K + kw];
                }
              });
            }
          });
        });
      });
      const uint32_t m0 = lanes<A>(0, W - 2 * j0), m1 = lanes<A>(0, W - 2 * j0 - VL<A>);
      for (int a = 0; a < 2; ++a) {
        const int64_t ih = 2 * i + a;
        if (ih >= H) break;
        A* row = gx + ih * W + 2 * j0;
        store_m(row, interleave<A, 0>(acc[a][0], acc[a][1], Lanes<A>{}), m0);
        if (m1) store_m(row + VL<A>, interleave<A, 1>(acc[a][0], acc[a][1], Lanes<A>{}), m1);
      }
    }
  }
}

// The weight and bias gradient sums of one plane's output rows [o0, o1) (k*k + 1 values, lanes
// and rows summed in a fixed order).
template <class A, int K, int S>
void wgrad_plane(const A* xp, int64_t H, int64_t W, const A* gp, int64_t Wo, int64_t o0,
                 int64_t o1, const Columns<A, K, S>& cols, A* dst) {
  constexpr int P = K / 2, RB = kRowBlock<K, S>, KK = K * K;
  V<A> acc[KK + 1] = {};  // the k*k taps, then the bias
  V<A>& accb = acc[KK];
  const A* zero = cols.zero_row();
  for_row_blocks<RB>(o0, o1, [&](int64_t o, auto rb) SIMD_INLINE_LAMBDA {
    constexpr int R = decltype(rb)::value, NR = kBlockRows<K, S, R>;
    const int64_t first = S * o - P;
    auto run = [&](auto src) SIMD_INLINE_LAMBDA {
      for (int64_t ci = 0; ci < cols.n; ++ci) {
        const RowTaps<A, K, S> rt = cols.taps[ci];
        const uint32_t gm = cols.out_mask[ci];
        V<A> gv[R];
        for (int r = 0; r < R; ++r) {
          gv[r] = load_m(gp + (o + r) * Wo + ci * VL<A>, gm);
          accb += gv[r];
        }
        wgrad_block<A, K, S, R>(rt, src, gv, acc);
      }
    };
    // the rows of x and g that the next block reads first
    const int64_t next = first + NR, next_end = std::min<int64_t>(H, next + S * R);
    if (next < next_end) prefetch_bytes(xp + next * W, (next_end - next) * W * sizeof(A));
    const int64_t gnext = std::min<int64_t>(o + R, o1), gend = std::min<int64_t>(o1, gnext + R);
    if (gnext < gend) prefetch_bytes(gp + gnext * Wo, (gend - gnext) * Wo * sizeof(A));
    if (first >= 0 && first + NR <= H) {
      run(Uniform<A>{xp + first * W, W});
    } else {
      const A* rows[NR];
      for (int j = 0; j < NR; ++j)
        rows[j] = first + j >= 0 && first + j < H ? xp + (first + j) * W : zero;
      run(Listed<A>{rows});
    }
  });
  for (int i = 0; i <= KK; ++i) dst[i] = A(0);
  simd::add_lane_sums<A, KK + 1>(acc, dst);  // a fixed tree of shuffles and adds
}

// grad_input_s2_plane for a runtime k: the same taps, in the same order.
template <class A>
void grad_input_s2_plane_any(const A* g, int64_t Ho, int64_t Wo, A* gx, int64_t H, int64_t W,
                             int64_t i0, int64_t i1, int K, const A* w /* K*K scalars */,
                             const A* zero) {
  const int P = K / 2;
  const int D0 = -((K - 1 - P) / 2), D1 = (1 + P) / 2, ND = D1 - D0 + 1;  // ND <= 4
  V<A> wv[kMaxK * kMaxK];
  for (int i = 0; i < K * K; ++i) wv[i] = splat(w[i]);
  const int64_t Wph = (W + 1) / 2;
  for (int64_t i = i0; i < i1; ++i) {
    const A* grow[4];
    for (int d = 0; d < ND; ++d) {
      const int64_t oh = i + D0 + d;
      grow[d] = oh >= 0 && oh < Ho ? g + oh * Wo : zero;
    }
    for (int64_t j0 = 0; j0 < Wph; j0 += VL<A>) {
      uint32_t cm[4];
      for (int d = 0; d < ND; ++d) {
        const int64_t start = j0 + D0 + d;
        cm[d] = lanes<A>(-start, Wo - start);
      }
      V<A> L[4][4];
      for (int dh = 0; dh < ND; ++dh)
        for (int dw = 0; dw < ND; ++dw) L[dh][dw] = load_m(grow[dh] + j0 + D0 + dw, cm[dw]);
      V<A> acc[2][2] = {};
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          for (int kh = 0; kh < K; ++kh) {
            if ((a + P - kh) % 2 != 0) continue;
            const int dh = (a + P - kh) / 2 - D0;
            for (int kw = 0; kw < K; ++kw) {
              if ((b + P - kw) % 2 != 0) continue;
              const int dw = (b + P - kw) / 2 - D0;
              acc[a][b] += L[dh][dw] * wv[kh * K + kw];
            }
          }
      const uint32_t m0 = lanes<A>(0, W - 2 * j0), m1 = lanes<A>(0, W - 2 * j0 - VL<A>);
      for (int a = 0; a < 2; ++a) {
        const int64_t ih = 2 * i + a;
        if (ih >= H) break;
        A* row = gx + ih * W + 2 * j0;
        store_m(row, interleave<A, 0>(acc[a][0], acc[a][1], Lanes<A>{}), m0);
        if (m1) store_m(row + VL<A>, interleave<A, 1>(acc[a][0], acc[a][1], Lanes<A>{}), m1);
      }
    }
  }
}

// wgrad_plane for a runtime k and stride (cols): the same row blocks, and in each the same
// order of terms (channel vector, then output row of the block, then tap).
template <class A>
void wgrad_plane_any(const A* xp, int64_t H, int64_t W, const A* gp, int64_t Wo, int64_t o0,
                     int64_t o1, const Columns<A, 0, 0>& cols, A* dst) {
  const int K = cols.K, S = cols.S, P = K / 2, KK = K * K;
  V<A> acc[kMaxK * kMaxK + 1] = {};  // the k*k taps, then the bias
  V<A>& accb = acc[KK];
  const A* zero = cols.zero_row();
  for_row_blocks_any(o0, o1, row_block(K, S), [&](int64_t o, int R) {
    const int NR = (R - 1) * S + K;
    const int64_t first = S * o - P;
    const A* rows[kMaxBlockRows];
    for (int j = 0; j < NR; ++j)
      rows[j] = first + j >= 0 && first + j < H ? xp + (first + j) * W : zero;
    // the rows of x and g that the next block reads first
    const int64_t next = first + NR, next_end = std::min<int64_t>(H, next + S * R);
    if (next < next_end) prefetch_bytes(xp + next * W, (next_end - next) * W * sizeof(A));
    const int64_t gnext = std::min<int64_t>(o + R, o1), gend = std::min<int64_t>(o1, gnext + R);
    if (gnext < gend) prefetch_bytes(gp + gnext * Wo, (gend - gnext) * Wo * sizeof(A));
    for (int64_t ci = 0; ci < cols.n; ++ci) {
      const uint32_t gm = lanes<A>(0, Wo - ci * VL<A>);
      V<A> gv[8];
      for (int r = 0; r < R; ++r) {
        gv[r] = load_m(gp + (o + r) * Wo + ci * VL<A>, gm);
        accb += gv[r];
      }
      V<A> tap[kMaxBlockRows][kMaxK];
      if (S == 1) {  // masked loads (RowTaps<A, K, 1>)
        const uint32_t* mk = cols.masks.data() + ci * K;
        for (int j = 0; j < NR; ++j)
          for (int kw = 0; kw < K; ++kw) tap[j][kw] = load_m(rows[j] + ci * VL<A> - P + kw, mk[kw]);
      } else {
        for (int j = 0; j < NR; ++j) row_taps_any<A>(rows[j], ci * VL<A>, W, K, S, tap[j]);
      }
      for (int kh = 0; kh < K; ++kh)
        for (int kw = 0; kw < K; ++kw) {
          V<A> a = acc[kh * K + kw];  // its terms in the order of the rows of the block
          for (int r = 0; r < R; ++r) a += gv[r] * tap[S * r + kh][kw];
          acc[kh * K + kw] = a;
        }
    }
  });
  for (int i = 0; i <= KK; ++i) dst[i] = A(0);
  add_lane_sums_any<A>(acc, KK + 1, dst);
}

// Backward, NCHW: gx, gw, gb (each may be null). Tasks are (image, channel, strip); each writes
// its k*k + 1 sums to its own partial, and the partials are added in (image, strip) order. KC,
// SC as in forward_nchw.
template <class A, int KC, int SC>
void backward_nchw(const Shape& sh, const A* g, const A* x, const A* w, A* gx, A* gw, A* gb,
                   int threads) {
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S, KK = K * K;
  const Columns<A, KC, SC> cols(sh.W, sh.Wo, K, S);            // weight gradient: taps of x
  const Columns<A, KC, KC ? 1 : 0> gcols(sh.Wo, sh.W, K, 1);  // input gradient of stride 1:
  std::vector<A> wflip((size_t)(sh.C * KK));                   // taps of g, flipped kernel
  for (int64_t c = 0; c < sh.C; ++c)
    for (int t = 0; t < KK; ++t) wflip[c * KK + t] = w[c * KK + (KK - 1 - t)];
  // Strips over output rows (and, for stride 2, over phase rows of gx: ceil(H / 2) = Ho)
  const int64_t srows = strip_rows(sh.Ho, sh.Wo, row_block(K, S));
  const int64_t nstrip = (sh.Ho + srows - 1) / srows;
  const int64_t tasks = sh.N * sh.C * nstrip;
  const bool wgrad = gw || gb;
  std::vector<A> part(wgrad ? (size_t)(tasks * (KK + 1)) : 0);
  // tasks handed out at a time (par::for_each)
  const int64_t chunk = chunk_of(tasks, srows * cols.n * VL<A> * KK * 2, threads);
  par::region(threads, [&] {
    par::for_each(tasks, chunk, [&](int64_t t) {
      const int64_t plane = t / nstrip, s = t % nstrip, c = plane % sh.C, n = plane / sh.C;
      const int64_t o0 = s * srows, o1 = std::min(sh.Ho, o0 + srows);
      const A* xp = x + plane * sh.H * sh.W;
      const A* gp = g + plane * sh.Ho * sh.Wo;
      if (wgrad) {
        A* dst = part.data() + ((n * nstrip + s) * sh.C + c) * (KK + 1);
        if constexpr (KC != 0)
          wgrad_plane<A, KC, SC>(xp, sh.H, sh.W, gp, sh.Wo, o0, o1, cols, dst);
        else
          wgrad_plane_any<A>(xp, sh.H, sh.W, gp, sh.Wo, o0, o1, cols, dst);
      }
      if (gx) {
        A* gxp = gx + plane * sh.H * sh.W;
        if (S == 1) {
          if constexpr (KC != 0)
            conv_plane<A, KC, 1, kNone>(gp, sh.Ho, sh.Wo, gxp, sh.W, o0, o1, gcols,
                                        wflip.data() + c * KK, A(0), false);
          else
            conv_plane_any<A>(gp, sh.Ho, sh.Wo, gxp, sh.W, o0, o1, gcols, wflip.data() + c * KK,
                              A(0), false, kNone);
        } else {
          if constexpr (KC != 0)
            grad_input_s2_plane<A, KC>(gp, sh.Ho, sh.Wo, gxp, sh.H, sh.W, o0, o1, w + c * KK,
                                       gcols.zero_row());
          else
            grad_input_s2_plane_any<A>(gp, sh.Ho, sh.Wo, gxp, sh.H, sh.W, o0, o1, K, w + c * KK,
                                       gcols.zero_row());
        }
      }
    });
  });
  if (wgrad) {
    // sums[c][i] over q = (n, strip) in order: vectorised over c
    std::vector<A> sums((size_t)(sh.C * (KK + 1)), A(0));
    const int64_t per_c = sh.N * nstrip, row = sh.C * (KK + 1);
    for (int64_t q = 0; q < per_c; ++q) {
      const A* src = part.data() + q * row;
      for (int64_t e = 0; e < row; ++e) sums[e] += src[e];
    }
    for (int64_t c = 0; c < sh.C; ++c) {
      if (gw)
        for (int i = 0; i < KK; ++i) gw[c * KK + i] = sums[c * (KK + 1) + i];
      if (gb) gb[c] = sums[c * (KK + 1) + KK];
    }
  }
}

// ---------------------------------------------------------------------------- channels-last
// Weights are packed (K*K, Cp) and the bias (Cp): pack_weights, pack_bias (dw_ops.h).
// Output pixels per register block.
template <int K, int S>
inline constexpr int kPixelBlock = K == 3 ? 8 : 4;

// Output pixels [lo, hi) of a row have every tap inside the image's columns.
inline void interior(int64_t W, int64_t Wo, int K, int S, int64_t& lo, int64_t& hi) {
  const int P = K / 2;
  lo = std::min<int64_t>(Wo, (P + S - 1) / S);
  hi = W - 1 - (K - 1 - P) < 0 ? 0 : (W - 1 - (K - 1 - P)) / S + 1;
  hi = std::max(lo, std::min(hi, Wo));
}

// acc[r] += taps of output pixels ow0 + r. rows[kh]: the input row of tap row kh (nullptr:
// outside), each offset to the channel block; C: the pixel stride; w: the block's K*K weight
// vectors, at a stride of ws values. Checked: the taps in columns outside [0, W) are left out of
// the sums (as the generic kernels leave them out); otherwise every column must be inside.
// Full: the block's lanes are all of m (plain loads), otherwise masked loads of m.
//
// A kernel row's K weight vectors are loaded for it, not kept over the block: with the R
// accumulators, one input vector and K weights in registers nothing spills on 16 registers, and
// the K loads per (R - 1) * S + K input loads and K * R FMAs are few. The input columns are one
// pointer stepped by C, so that no column offset waits in a spilled register.
template <class A, int K, int S, int R, bool Checked, bool Full>
SIMD_INLINE void cl_conv_pixels(const A* const* rows, int64_t C, int64_t W, int64_t ow0,
                               uint32_t m, const A* w, int64_t ws, V<A>* acc) {
  constexpr int P = K / 2, NQ = (R - 1) * S + K;
  const int64_t col0 = S * ow0 - P;
  unroll<K>([&](auto kh_) SIMD_INLINE_LAMBDA {
    constexpr int kh = decltype(kh_)::value;
    if (!rows[kh]) return;
    V<A> wk[K];
    unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA { wk[kw] = simd::vload(w + (kh * K + kw) * ws); });
    const A* p = rows[kh] + col0 * C;
    unroll<NQ>([&](auto q_) SIMD_INLINE_LAMBDA {
      constexpr int q = decltype(q_)::value;
      if (!Checked || (col0 + q >= 0 && col0 + q < W)) {
        const V<A> v = Full ? simd::vload(p) : simd::vload_mask(p, m);
        unroll<R>([&](auto r_) SIMD_INLINE_LAMBDA {
          constexpr int r = decltype(r_)::value, kw = q - S * r;
          if constexpr (kw >= 0 && kw < K) acc[r] += v * wk[kw];
        });
      }
      p += C;
    });
  });
}

// Whether a channels-last block whose lanes are m loads them with plain loads: all lanes, on
// ISAs whose masked loads cost more than plain ones (AVX2's vmaskmovps; AVX-512's k-masks cost
// nothing, and one form compiles instead of two).
template <class A>
SIMD_INLINE bool plain_loads(uint32_t m) {
#if defined(__AVX512F__)
  (void)m;
  return false;
#else
  return m == kFull<A>;
#endif
}

// Output pixels [ow0, ow1) of one row for one channel block: out[(ow - ow0) * C] = act(bias +
// taps). rows and out are offset to the block, m its lanes, w its K*K weight vectors (stride
// ws); [lo, hi): the interior pixels (interior()). Blocks of kPixelBlock pixels, those with a tap
// outside the image checking their columns, then checked blocks of half, a quarter, ..., 1 pixel
// for the rest: a short row is a few register blocks rather than single pixels.
template <class A, int K, int S, int Act>
SIMD_INLINE void cl_conv_block_row(const A* const* rows, int64_t C, int64_t W, int64_t ow0,
                                   int64_t ow1, int64_t lo, int64_t hi, uint32_t m,
                                   const A* w, int64_t ws, V<A> bv, A* out, bool stream,
                                   int act) {
  auto run = [&](auto full_) SIMD_INLINE_LAMBDA {
    constexpr bool Full = decltype(full_)::value;
    auto block = [&](auto r_, int64_t ow, auto checked_) SIMD_INLINE_LAMBDA {
      constexpr int R = decltype(r_)::value;
      V<A> acc[R];
      for (int r = 0; r < R; ++r) acc[r] = bv;
      cl_conv_pixels<A, K, S, R, decltype(checked_)::value, Full>(rows, C, W, ow, m, w, ws,
                                                                  acc);
      with_activation<Act>(act, [&](auto act_c) SIMD_INLINE_LAMBDA {
        for (int r = 0; r < R; ++r) {
          const V<A> v = activate<A>(acc[r], decltype(act_c)::value);
          A* p = out + (ow - ow0 + r) * C;
          if (stream)
            simd::vstream(p, v);
          else if (Full)
            simd::vstore(p, v);
          else
            simd::vstore_mask(p, v, m);
        }
      });
    };
    constexpr int RB = kPixelBlock<K, S>;
    constexpr std::integral_constant<int, RB> full{};
    constexpr std::true_type checked{};
    int64_t ow = ow0;
    for (; ow + RB <= ow1 && ow < lo; ow += RB) block(full, ow, checked);
    for (; ow + RB <= std::min(hi, ow1); ow += RB) block(full, ow, std::false_type{});
    for (; ow + RB <= ow1; ow += RB) block(full, ow, checked);
    unroll<4>([&](auto i_) SIMD_INLINE_LAMBDA {  // RB / 2, RB / 4, ..., 1
      constexpr int R = RB >> (decltype(i_)::value + 1);
      if constexpr (R >= 1)
        if (ow + R <= ow1) {
          block(std::integral_constant<int, R>{}, ow, checked);
          ow += R;
        }
    });
  };
  if (plain_loads<A>(m))
    run(std::true_type{});
  else
    run(std::false_type{});
}

// Output pixels [ow0, ow1) of one row of a channels-last convolution: out[ow - ow0][c] =
// act(sum of taps + bias[c]). in_rows[kh]: input row S*oh - P + kh (nullptr: outside); C:
// channels and pixel stride (of the input and of out); wpack: (K*K, wstride) packed weights;
// bias: wstride values or null.
template <class A, int K, int S, int Act>
void cl_conv_range(const A* const* in_rows, int64_t C, int64_t W, int64_t Wo, int64_t ow0,
                   int64_t ow1, const A* wpack, int64_t wstride, const A* bias, A* out,
                   bool stream = false, int act = kNone) {
  int64_t lo, hi;
  interior(W, Wo, K, S, lo, hi);
  for (int64_t cb = 0; cb < C; cb += VL<A>) {
    const A* rows[K];
    for (int kh = 0; kh < K; ++kh) rows[kh] = in_rows[kh] ? in_rows[kh] + cb : nullptr;
    cl_conv_block_row<A, K, S, Act>(rows, C, W, ow0, ow1, lo, hi, lanes<A>(0, C - cb),
                                    wpack + cb, wstride,
                                    bias ? simd::vload(bias + cb) : V<A>{}, out + cb, stream,
                                    act);
  }
}

// One whole output row: cl_conv_range over [0, Wo).
template <class A, int K, int S, int Act>
void cl_conv_row(const A* const* in_rows, int64_t C, int64_t W, int64_t Wo, const A* wpack,
                 int64_t wstride, const A* bias, A* out, bool stream = false, int act = kNone) {
  cl_conv_range<A, K, S, Act>(in_rows, C, W, Wo, 0, Wo, wpack, wstride, bias, out, stream, act);
}

// The rows of image `img` (Hi rows of Wi * C) that output row oh reads: nullptr outside.
template <class A>
SIMD_INLINE void input_rows(const A* img, int64_t Hi, int64_t row_len, int64_t oh, int K, int S,
                            const A** rows) {
  for (int kh = 0; kh < K; ++kh) {
    const int64_t ih = S * oh - K / 2 + kh;
    rows[kh] = ih >= 0 && ih < Hi ? img + ih * row_len : nullptr;
  }
}

// cl_conv_range for a runtime k, stride and activation: each output is the bias plus the taps
// inside the image in (kh, kw) order, as in cl_conv_range.
template <class A>
void cl_conv_range_any(const A* const* in_rows, int64_t C, int64_t W, int64_t Wo, int64_t ow0,
                       int64_t ow1, const A* wpack, int64_t wstride, const A* bias, A* out,
                       bool stream, int act, int K, int S) {
  const int P = K / 2;
  int64_t lo, hi;
  interior(W, Wo, K, S, lo, hi);
  for (int64_t cb = 0; cb < C; cb += VL<A>) {
    const uint32_t m = lanes<A>(0, C - cb);
    V<A> wv[kMaxK * kMaxK];
    for (int i = 0; i < K * K; ++i) wv[i] = simd::vload(wpack + i * wstride + cb);
    const V<A> bv = bias ? simd::vload(bias + cb) : V<A>{};
    const A* rows[kMaxK];
    for (int kh = 0; kh < K; ++kh) rows[kh] = in_rows[kh] ? in_rows[kh] + cb : nullptr;
    auto put = [&](int64_t ow, V<A> v) {
      A* p = out + cb + (ow - ow0) * C;
      v = activate<A>(v, act);
      if (stream)
        simd::vstream(p, v);
      else
        store_m(p, v, m);
    };
    // one pixel, the taps outside the image left out: those inside are kw in [kw0, kw1)
    auto checked = [&](int64_t ow) {
      const int64_t left = S * ow - P;  // the column of tap kw = 0
      const int kw0 = (int)std::max<int64_t>(0, -left);
      const int kw1 = (int)std::min<int64_t>(K, W - left);
      V<A> acc = bv;
      for (int kh = 0; kh < K; ++kh) {
        if (!rows[kh]) continue;
        for (int kw = kw0; kw < kw1; ++kw)
          acc += load_m(rows[kh] + (left + kw) * C, m) * wv[kh * K + kw];
      }
      put(ow, acc);
    };
    const int64_t a = std::min(std::max(lo, ow0), ow1), b = std::min(std::max(hi, a), ow1);
    int64_t ow = ow0;
    for (; ow < a; ++ow) checked(ow);
    for (; ow + 4 <= b; ow += 4) {  // 4 pixels inside: each weight vector loaded once
      V<A> acc[4] = {bv, bv, bv, bv};
      for (int kh = 0; kh < K; ++kh) {
        if (!rows[kh]) continue;
        const A* x = rows[kh] + (S * ow - P) * C;
        for (int kw = 0; kw < K; ++kw) {
          const V<A> w = wv[kh * K + kw];
          for (int r = 0; r < 4; ++r) acc[r] += load_m(x + (S * r + kw) * C, m) * w;
        }
      }
      for (int r = 0; r < 4; ++r) put(ow + r, acc[r]);
    }
    for (; ow < ow1; ++ow) checked(ow);
  }
}

// Prefetches the rows that output row oh + 1 reads and oh does not (of image `img`).
template <class A>
SIMD_INLINE void prefetch_next_rows(const A* img, int64_t Hi, int64_t row_len, int64_t oh,
                                    int64_t Ho, int K, int S) {
  if (oh + 1 >= Ho) return;
  for (int q = 0; q < S; ++q) {
    const int64_t ih = S * (oh + 1) - K / 2 + K - 1 - q;
    if (ih >= 0 && ih < Hi) prefetch_bytes(img + ih * row_len, row_len * (int64_t)sizeof(A));
  }
}

// One output row of the channels-last convolution (a task of forward_cl, a tile row of
// forward_tiles): the compiled kernel (KC != 0, the activation chosen per register block) or the
// generic one.
template <class A, int KC, int SC>
SIMD_INLINE void conv_row(const A* const* in_rows, int64_t C, int64_t W, int64_t Wo,
                          const A* wpack, int64_t wstride, const A* bias, A* out, bool stream,
                          int act, int K, int S) {
  if constexpr (KC != 0)
    cl_conv_row<A, KC, SC, kAny>(in_rows, C, W, Wo, wpack, wstride, bias, out, stream, act);
  else
    cl_conv_range_any<A>(in_rows, C, W, Wo, 0, Wo, wpack, wstride, bias, out, stream, act, K, S);
}

// ------------------------------------------------- channels-last forward through padded planes
// The compiled kernels' channels-last forward. A task is one channel block of an image over a
// strip of output rows. It first copies the input rows the strip reads, that block's lanes, into
// a plane of one vector per pixel with a zero border of P pixels (a per-thread buffer):
//
//   plane[j][P + iw] = x[n, ih0 + j, iw, cb .. cb + VL)   (zero lanes past C, zero rows outside)
//
// and then every register block of R output pixels is the same code wherever it lies: its K*K
// taps are loads at constant offsets from K row pointers, with no column checks at the border,
// no masked loads past C, and no pixel stride of C values between taps (a stride that is a
// multiple of the cache's set span maps every pixel's line to the same set). The copy is one
// load and one store per input vector, against K*K / S^2 FMAs per input vector.

// acc[r] = bias + taps of output pixels ow0 + r: rows[kh] the plane row of tap row kh at column
// S * ow0 (the block's first tap), w the channel block's K*K weight vectors, one after the other
// (pack_weight_blocks).
template <class A, int K, int S, int R>
SIMD_INLINE void plane_block(const A* const* rows, const A* w, V<A> bv, V<A>* acc) {
  constexpr int NQ = (R - 1) * S + K, L = VL<A>;
  for (int r = 0; r < R; ++r) acc[r] = bv;
  unroll<K>([&](auto kh_) SIMD_INLINE_LAMBDA {
    constexpr int kh = decltype(kh_)::value;
    V<A> wk[K];  // this tap row's weights: R accumulators + K weights + 1 input fit 16 registers
    unroll<K>([&](auto kw) SIMD_INLINE_LAMBDA { wk[kw] = simd::vload(w + (kh * K + kw) * L); });
    unroll<NQ>([&](auto q_) SIMD_INLINE_LAMBDA {
      constexpr int q = decltype(q_)::value;
      const V<A> v = simd::vload(rows[kh] + q * L);
      unroll<R>([&](auto r_) SIMD_INLINE_LAMBDA {
        constexpr int r = decltype(r_)::value, kw = q - S * r;
        if constexpr (kw >= 0 && kw < K) acc[r] += v * wk[kw];
      });
    });
  });
}

// The planes (rows ih0 .. ih0 + nrows of image img, columns -P .. W + P) of G channel blocks
// from channel cb on, one after the other at a stride of ps values: each pixel's G * VL channels
// are read in address order. img at the image, C its channels and pixel stride.
template <class A>
void fill_planes(const A* img, int64_t C, int64_t H, int64_t W, int P, int64_t ih0, int64_t nrows,
                 int64_t cb, int64_t G, A* planes, int64_t ps) {
  constexpr int L = VL<A>;
  const int64_t Wp = W + 2 * P;
  const V<A> zero{};
  for (int64_t j = 0; j < nrows; ++j) {
    const int64_t ih = ih0 + j;
    for (int64_t g = 0; g < G; ++g) {  // the border, or the whole row outside the image
      A* row = planes + g * ps + j * Wp * L;
      const bool outside = ih < 0 || ih >= H;
      for (int64_t c = 0; c < Wp; c += outside || c + 1 != P ? 1 : W + 1)
        simd::vstore(row + c * L, zero);
    }
    if (ih < 0 || ih >= H) continue;
    const A* src = img + ih * W * C + cb;
    A* dst = planes + (j * Wp + P) * L;
    const int64_t full = std::min(G, (C - cb) / L);  // blocks with every lane inside C
    for (int64_t iw = 0; iw < W; ++iw) {
      const A* px = src + iw * C;
      A* d = dst + iw * L;
      for (int64_t g = 0; g < full; ++g) simd::vstore(d + g * ps, simd::vload(px + g * L));
      for (int64_t g = full; g < G; ++g)
        simd::vstore(d + g * ps, simd::vload_mask(px + g * L, lanes<A>(0, C - cb - g * L)));
    }
  }
}

// Plane bytes a task aims at (its strip's rows): the rows an output row reads stay in L1 as
// they are read, and the plane in L2 between its fill and its last read.
inline constexpr int64_t kPlaneBytes = int64_t{128} << 10;

// One task's output rows [oh0, oh1) of the channel block at out (pixel stride C, lanes m): R
// pixels at a time, then one block each of R/2, ..., 1 for the rest of a row; plane holds input
// rows from S * oh0 - P on.
template <class A, int K, int S, int Act>
void plane_rows(const A* plane, int64_t Wp, int64_t Wo, int64_t oh0, int64_t oh1, const A* w,
                V<A> bv, A* out, int64_t C, uint32_t m, bool stream, int act) {
  constexpr int L = VL<A>, RB = kPixelBlock<K, S>;
  auto block = [&](auto r_, const A* const* rows, int64_t ow, A* orow) SIMD_INLINE_LAMBDA {
    constexpr int R = decltype(r_)::value;
    const A* at[K];
    for (int kh = 0; kh < K; ++kh) at[kh] = rows[kh] + S * ow * L;
    V<A> acc[R];
    plane_block<A, K, S, R>(at, w, bv, acc);
    with_activation<Act>(act, [&](auto act_c) SIMD_INLINE_LAMBDA {
      for (int r = 0; r < R; ++r) {
        const V<A> v = activate<A>(acc[r], decltype(act_c)::value);
        A* p = orow + (ow + r) * C;
        if (stream)
          simd::vstream(p, v);
        else
          store_m(p, v, m);
      }
    });
  };
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const A* rows[K];
    for (int kh = 0; kh < K; ++kh) rows[kh] = plane + (S * (oh - oh0) + kh) * Wp * L;
    A* orow = out + oh * Wo * C;
    int64_t ow = 0;
    for (; ow + RB <= Wo; ow += RB) block(std::integral_constant<int, RB>{}, rows, ow, orow);
    unroll<4>([&](auto i_) SIMD_INLINE_LAMBDA {  // RB / 2, RB / 4, ..., 1
      constexpr int R = RB >> (decltype(i_)::value + 1);
      if constexpr (R >= 1)
        if (ow + R <= Wo) {
          block(std::integral_constant<int, R>{}, rows, ow, orow);
          ow += R;
        }
    });
  }
}

// Forward, channels-last, by the compiled kernels of K, S (see "padded planes" above). A task is
// a strip of an image's output rows for a group of G channel blocks, whose planes it fills in one
// pass over each pixel's G * VL channels and then runs one after the other: kGroupBytes of
// channels, or fewer where the planes of a strip whose shared rows (K - S of them) are 1/8 of its
// rows would pass kPlaneBytes, or where the tasks would be too few for the threads. Strips are
// cut to about kPlaneBytes of planes, and finer where the tasks are still too few.
inline constexpr int64_t kGroupBytes = 512;

template <class A, int K, int S>
void forward_cl_planes(const Shape& sh, const A* x, const A* w, const A* b, int act, A* y,
                       int threads) {
  constexpr int L = VL<A>, P = K / 2;
  const std::vector<A> wb = pack_weight_blocks(w, sh.C, K), bp = pack_bias(b, sh.C);
  const int64_t C = sh.C, ncb = padded<A>(C) / L, Wp = sh.W + 2 * P;
  const int64_t row_bytes = Wp * L * (int64_t)sizeof(A), want = threads > 1 ? 4 * threads : 1;
  const bool stream = cl_stream<A>(C, sh.N * sh.Ho * sh.Wo * C * (int64_t)sizeof(A));
  // the planes of a strip whose K - S rows shared with the next are 1/8 of its rows or less fit
  // kPlaneBytes (min_srows output rows)
  const int64_t min_srows = (8 * (K - S) + S - 1) / S;
  int64_t G = std::min<int64_t>({ncb, kGroupBytes / (L * (int64_t)sizeof(A)),
                                 kPlaneBytes / (row_bytes * ((min_srows - 1) * S + K))});
  G = std::max<int64_t>(G, 1);
  while (G > 1 && sh.N * ((ncb + G - 1) / G) < want) G = (G + 1) / 2;
  const int64_t groups = (ncb + G - 1) / G;
  // output rows per strip: the planes' budget, then enough tasks for the threads
  int64_t srows = std::max<int64_t>(1, (kPlaneBytes / (G * row_bytes) - K) / S + 1);
  const int64_t min_strips = (want + sh.N * groups - 1) / (sh.N * groups);
  srows = std::min(srows, (sh.Ho + min_strips - 1) / min_strips);
  const int64_t strips = (sh.Ho + srows - 1) / srows, tasks = sh.N * strips * groups;
  const int64_t chunk = std::max<int64_t>(1, tasks / std::max(threads, 1));
  const int64_t ps = ((srows - 1) * S + K) * Wp * L;  // one plane's values
  par::region(threads, [&] {
    thread_local std::vector<A> planes;
    if (planes.size() < (size_t)(G * ps)) planes.resize((size_t)(G * ps));
    par::for_each(tasks, chunk, [&](int64_t t) {
      const int64_t gi = t % groups, st = t / groups % strips, n = t / (groups * strips);
      const int64_t cb0 = gi * G * L, g1 = std::min(G, ncb - gi * G);
      const int64_t oh0 = st * srows, oh1 = std::min(sh.Ho, oh0 + srows);
      fill_planes(x + n * sh.H * sh.W * C, C, sh.H, sh.W, P, S * oh0 - P,
                  (oh1 - oh0 - 1) * S + K, cb0, g1, planes.data(), ps);
      for (int64_t g = 0; g < g1; ++g) {
        const int64_t cb = cb0 + g * L;
        plane_rows<A, K, S, kAny>(planes.data() + g * ps, Wp, sh.Wo, oh0, oh1,
                                  wb.data() + cb * K * K, b ? simd::vload(bp.data() + cb) : V<A>{},
                                  y + n * sh.Ho * sh.Wo * C + cb, C, lanes<A>(0, C - cb), stream,
                                  act);
      }
    });
  });
  if (stream) simd::stream_fence();
}

// Batches from this many bytes on come from memory: there the planes' copy costs more than it
// saves, and tasks of one output row (its channel blocks one after the other) read the lines in
// address order.
inline constexpr int64_t kFromMemoryBytes = int64_t{8} << 20;

// Forward, channels-last. KC, SC as in forward_nchw: the compiled kernels through padded planes
// (forward_cl_planes) on batches under kFromMemoryBytes; otherwise, and for the generic kernels,
// tasks of one output row.
template <class A, int KC, int SC>
void forward_cl(const Shape& sh, const A* x, const A* w, const A* b, int act, A* y, int threads) {
  const int64_t C = sh.C, batch_bytes = sh.N * sh.H * sh.W * C * (int64_t)sizeof(A);
  if constexpr (KC != 0)
    if (batch_bytes < kFromMemoryBytes) return forward_cl_planes<A, KC, SC>(sh, x, w, b, act, y,
                                                                           threads);
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S;
  const std::vector<A> wp = pack_weights(w, C, K, false), bp = pack_bias(b, C);
  const bool stream = cl_stream<A>(C, sh.N * sh.Ho * sh.Wo * C * (int64_t)sizeof(A));
  const int64_t tasks = sh.N * sh.Ho, chunk = chunk_of(tasks, sh.Wo * C * K * K, threads);
  par::region(threads, [&] {
    par::for_each(tasks, chunk, [&](int64_t t) {
      const int64_t n = t / sh.Ho, oh = t % sh.Ho;
      const A* rows[KC ? KC : kMaxK];
      input_rows(x + n * sh.H * sh.W * C, sh.H, sh.W * C, oh, K, S, rows);
      prefetch_next_rows(x + n * sh.H * sh.W * C, sh.H, sh.W * C, oh, sh.Ho, K, S);
      conv_row<A, KC, SC>(rows, C, sh.W, sh.Wo, wp.data(), padded<A>(C),
                          b ? bp.data() : nullptr, y + t * sh.Wo * C, stream, act, K, S);
    });
  });
  if (stream) simd::stream_fence();
}

// Weight gradient accumulation of output pixels ow0 + r (unchecked columns): acc[kh K + kw] +=
// g[r] * x[tap]; grow is g's row at the channel block.
template <class A, int K, int S, int R>
SIMD_INLINE void cl_wgrad_pixels(const A* const* rows, const A* grow, int64_t C, int64_t ow0,
                                uint32_t m, V<A>* acc) {
  constexpr int P = K / 2, NQ = (R - 1) * S + K;
  V<A> gv[R];
  for (int r = 0; r < R; ++r) {
    gv[r] = load_m(grow + (ow0 + r) * C, m);
    acc[K * K] += gv[r];
  }
  unroll<K>([&](auto kh_) SIMD_INLINE_LAMBDA {
    constexpr int kh = decltype(kh_)::value;
    if (!rows[kh]) return;
    const A* base = rows[kh] + (S * ow0 - P) * C;
    unroll<NQ>([&](auto q_) SIMD_INLINE_LAMBDA {
      constexpr int q = decltype(q_)::value;
      const V<A> v = load_m(base + (int64_t)q * C, m);
      unroll<R>([&](auto r_) SIMD_INLINE_LAMBDA {
        constexpr int r = decltype(r_)::value, kw = q - S * r;
        if constexpr (kw >= 0 && kw < K) acc[kh * K + kw] += gv[r] * v;
      });
    });
  });
}

template <class A, int K, int S>
SIMD_INLINE void cl_wgrad_pixel_checked(const A* const* rows, const A* grow, int64_t C, int64_t W,
                                       int64_t ow, uint32_t m, V<A>* acc) {
  constexpr int P = K / 2;
  const V<A> gv = load_m(grow + ow * C, m);
  acc[K * K] += gv;
  unroll<K>([&](auto kh_) SIMD_INLINE_LAMBDA {
    constexpr int kh = decltype(kh_)::value;
    if (!rows[kh]) return;
    unroll<K>([&](auto kw_) SIMD_INLINE_LAMBDA {
      constexpr int kw = decltype(kw_)::value;
      const int64_t iw = S * ow - P + kw;
      if (iw >= 0 && iw < W) acc[kh * K + kw] += gv * load_m(rows[kh] + iw * C, m);
    });
  });
}

// acc (K*K taps, then the bias) += the sums of one output row; rows and grow at the channel
// block, C: the pixel stride.
template <class A, int K, int S>
SIMD_INLINE void cl_wgrad_row(const A* const* rows, const A* grow, int64_t C, int64_t W,
                             int64_t Wo, int64_t lo, int64_t hi, uint32_t m, V<A>* acc) {
  constexpr int R = kPixelBlock<K, S> / 2;
  int64_t ow = 0;
  for (; ow < lo; ++ow) cl_wgrad_pixel_checked<A, K, S>(rows, grow, C, W, ow, m, acc);
  for (; ow + R <= hi; ow += R) cl_wgrad_pixels<A, K, S, R>(rows, grow, C, ow, m, acc);
  for (; ow < hi; ++ow) cl_wgrad_pixels<A, K, S, 1>(rows, grow, C, ow, m, acc);
  for (; ow < Wo; ++ow) cl_wgrad_pixel_checked<A, K, S>(rows, grow, C, W, ow, m, acc);
}

// Input gradient of stride 2, channels-last, one row ih of gx: the taps of parity
// (ih + P, iw + P) read g[(ih + P - kh) / 2][(iw + P - kw) / 2]. C: channels and pixel stride.
template <class A, int K>
void cl_grad_input_s2_row(const A* g_img, int64_t C, int64_t Ho, int64_t Wo, int64_t ih,
                          int64_t W, const A* wpack, int64_t wstride, A* out) {
  constexpr int P = K / 2;
  const A* grows[K];
  for (int kh = 0; kh < K; ++kh) {
    const int64_t num = ih + P - kh;
    grows[kh] = (num % 2 == 0 && num >= 0 && num / 2 < Ho) ? g_img + (num / 2) * Wo * C : nullptr;
  }
  for (int64_t cb = 0; cb < C; cb += VL<A>) {
    const uint32_t m = lanes<A>(0, C - cb);
    V<A> wv[K * K];
    for (int i = 0; i < K * K; ++i) wv[i] = simd::vload(wpack + i * wstride + cb);
    auto pixel = [&](int64_t iw, auto par) SIMD_INLINE_LAMBDA {
      constexpr int B = decltype(par)::value;  // parity of iw + P: the taps kw with kw % 2 == B
      V<A> acc{};
      unroll<K>([&](auto kh_) SIMD_INLINE_LAMBDA {
        constexpr int kh = decltype(kh_)::value;
        if (!grows[kh]) return;
        unroll<K>([&](auto kw_) SIMD_INLINE_LAMBDA {
          constexpr int kw = decltype(kw_)::value;
          if constexpr (kw % 2 == B) {
            const int64_t ow = (iw + P - kw) / 2;
            if (iw + P - kw >= 0 && ow < Wo)
              acc += load_m(grows[kh] + ow * C + cb, m) * wv[kh * K + kw];
          }
        });
      });
      store_m(out + iw * C + cb, acc, m);
    };
    int64_t iw = 0;
    for (; iw + 1 < W; iw += 2) {
      pixel(iw, std::integral_constant<int, P % 2>{});
      pixel(iw + 1, std::integral_constant<int, (P + 1) % 2>{});
    }
    if (iw < W) pixel(iw, std::integral_constant<int, P % 2>{});
  }
}

// cl_wgrad_row for a runtime k and stride: tap by tap, each sum gets the same terms in the same
// order (the row's pixels whose tap is inside the image, in order).
template <class A>
void cl_wgrad_row_any(const A* const* rows, const A* grow, int64_t C, int64_t W, int64_t Wo,
                      uint32_t m, V<A>* acc, int K, int S) {
  const int P = K / 2;
  V<A> bias = acc[K * K];
  for (int64_t ow = 0; ow < Wo; ++ow) bias += load_m(grow + ow * C, m);
  acc[K * K] = bias;
  for (int kh = 0; kh < K; ++kh) {
    if (!rows[kh]) continue;
    for (int kw = 0; kw < K; ++kw) {
      // the pixels whose tap (kh, kw) is inside the image: S * ow - P + kw in [0, W)
      const int64_t first = P - kw > 0 ? (P - kw + S - 1) / S : 0;
      const int64_t last = W - 1 + P - kw < 0 ? 0 : std::min<int64_t>(Wo, (W - 1 + P - kw) / S + 1);
      V<A> a = acc[kh * K + kw];
      for (int64_t ow = first; ow < last; ++ow)
        a += load_m(grow + ow * C, m) * load_m(rows[kh] + (S * ow - P + kw) * C, m);
      acc[kh * K + kw] = a;
    }
  }
}

// cl_grad_input_s2_row for a runtime k.
template <class A>
void cl_grad_input_s2_row_any(const A* g_img, int64_t C, int64_t Ho, int64_t Wo, int64_t ih,
                              int64_t W, const A* wpack, int64_t wstride, A* out, int K) {
  const int P = K / 2;
  const A* grows[kMaxK];
  for (int kh = 0; kh < K; ++kh) {
    const int64_t num = ih + P - kh;
    grows[kh] = (num % 2 == 0 && num >= 0 && num / 2 < Ho) ? g_img + (num / 2) * Wo * C : nullptr;
  }
  for (int64_t cb = 0; cb < C; cb += VL<A>) {
    const uint32_t m = lanes<A>(0, C - cb);
    V<A> wv[kMaxK * kMaxK];
    for (int i = 0; i < K * K; ++i) wv[i] = simd::vload(wpack + i * wstride + cb);
    for (int64_t iw = 0; iw < W; ++iw) {
      V<A> acc{};
      for (int kh = 0; kh < K; ++kh) {
        if (!grows[kh]) continue;
        for (int kw = (iw + P) % 2; kw < K; kw += 2) {  // the taps of iw's parity
          const int64_t ow = (iw + P - kw) / 2;
          if (iw + P - kw >= 0 && ow < Wo)
            acc += load_m(grows[kh] + ow * C + cb, m) * wv[kh * K + kw];
        }
      }
      store_m(out + iw * C + cb, acc, m);
    }
  }
}

// The channels-last weight gradient sums of one output row (see cl_wgrad_row), by the compiled
// kernel (KC != 0) or the generic one.
template <class A, int KC, int SC>
SIMD_INLINE void wgrad_row(const A* const* rows, const A* grow, int64_t C, int64_t W, int64_t Wo,
                           int64_t lo, int64_t hi, uint32_t m, V<A>* acc, int K, int S) {
  if constexpr (KC != 0)
    cl_wgrad_row<A, KC, SC>(rows, grow, C, W, Wo, lo, hi, m, acc);
  else
    cl_wgrad_row_any<A>(rows, grow, C, W, Wo, m, acc, K, S);
}

// Row ih of the channels-last input gradient (C channels at pixel stride C, wpack: (K*K,
// wstride)): for stride 1 the convolution of g with the flipped kernel (wflip), for stride 2
// the taps of ih's parity (wpack); by the compiled kernels (KC != 0) or the generic ones.
template <class A, int KC, int SC>
SIMD_INLINE void grad_input_row(const A* g_img, int64_t C, int64_t Ho, int64_t Wo, int64_t ih,
                                int64_t W, const A* wflip, const A* wpack, int64_t wstride, A* out,
                                bool stream, int K, int S) {
  if (S == 1) {
    const A* rows[KC ? KC : kMaxK];
    input_rows(g_img, Ho, Wo * C, ih, K, 1, rows);
    if constexpr (KC != 0)
      cl_conv_row<A, KC, 1, kNone>(rows, C, Wo, W, wflip, wstride, nullptr, out, stream);
    else
      cl_conv_range_any<A>(rows, C, Wo, W, 0, W, wflip, wstride, nullptr, out, stream, kNone, K,
                           1);
  } else {
    if constexpr (KC != 0)
      cl_grad_input_s2_row<A, KC>(g_img, C, Ho, Wo, ih, W, wpack, wstride, out);
    else
      cl_grad_input_s2_row_any<A>(g_img, C, Ho, Wo, ih, W, wpack, wstride, out, K);
  }
}

// Sums (KK + 1, Cp) partials over the first dimension in order, into gw (C, KK) and gb (C).
template <class A>
void reduce_partials(const std::vector<A>& part, int64_t nparts, int64_t C, int KK, A* gw,
                     A* gb) {
  const int64_t Cp = padded<A>(C), row = (KK + 1) * Cp;
  std::vector<A> sums((size_t)row, A(0));
  for (int64_t q = 0; q < nparts; ++q) {
    const A* src = part.data() + q * row;
    for (int64_t e = 0; e < row; ++e) sums[e] += src[e];
  }
  for (int64_t c = 0; c < C; ++c) {
    if (gw)
      for (int i = 0; i < KK; ++i) gw[c * KK + i] = sums[i * Cp + c];
    if (gb) gb[c] = sums[KK * Cp + c];
  }
}

// Backward, channels-last. The weight gradient's tasks are chunks of (image, output row) rows,
// each with its own partial (reduced in chunk order); the input gradient's tasks are rows of gx.
// KC, SC as in forward_nchw.
template <class A, int KC, int SC>
void backward_cl(const Shape& sh, const A* g, const A* x, const A* w, A* gx, A* gw, A* gb,
                 int threads) {
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S, KK = K * K;
  constexpr int KKA = KC ? KC * KC : kMaxK * kMaxK;  // the size of the sums' arrays
  const int64_t C = sh.C, Cp = padded<A>(C), rows_total = sh.N * sh.Ho;
  const int64_t nchunks = std::min<int64_t>(rows_total, 32);
  const bool wgrad = gw || gb;
  std::vector<A> part(wgrad ? (size_t)(nchunks * (KK + 1) * Cp) : 0);
  const std::vector<A> wflip = pack_weights(w, C, K, true);
  const std::vector<A> wpack = S == 2 ? pack_weights(w, C, K, false) : std::vector<A>();
  int64_t lo, hi;
  interior(sh.W, sh.Wo, K, S, lo, hi);
  par::region(threads, [&] {
    if (wgrad) {
      par::for_each<false, true>(nchunks, 1, [&](int64_t q) {
        const int64_t r0 = q * rows_total / nchunks, r1 = (q + 1) * rows_total / nchunks;
        // the chunk's partial (K*K + 1, Cp) stays in L1; each row is summed into it channel
        // block by channel block (rows in order, so the sums are the same whatever the threads)
        A* dst = part.data() + q * (KK + 1) * Cp;
        if (sh.Wo < 16) {
          // short rows: channel blocks outside, the sums in registers over the chunk's rows
          // (the same additions in the same order as below, without the loads and stores of
          // the partial, which cost more than the few pixels of a row)
          for (int64_t cb = 0; cb < C; cb += VL<A>) {
            const uint32_t m = lanes<A>(0, C - cb);
            V<A> acc[KKA + 1] = {};
            for (int64_t row = r0; row < r1; ++row) {
              const int64_t n = row / sh.Ho, oh = row % sh.Ho;
              const A* rows[KC ? KC : kMaxK];
              input_rows(x + n * sh.H * sh.W * C + cb, sh.H, sh.W * C, oh, K, S, rows);
              wgrad_row<A, KC, SC>(rows, g + row * sh.Wo * C + cb, C, sh.W, sh.Wo, lo, hi, m,
                                   acc, K, S);
            }
            for (int i = 0; i <= KK; ++i) simd::vstore(dst + i * Cp + cb, acc[i]);
          }
          return;  // the next chunk
        }
        std::fill(dst, dst + (KK + 1) * Cp, A(0));
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t n = row / sh.Ho, oh = row % sh.Ho;
          const A* img = x + n * sh.H * sh.W * C;
          prefetch_next_rows(img, sh.H, sh.W * C, oh, sh.Ho, K, S);
          // g's next row into L2 only: with x's next row it would overflow L1
          if (row + 1 < r1)
            prefetch_bytes(g + (row + 1) * sh.Wo * C, sh.Wo * C * sizeof(A), false);
          for (int64_t cb = 0; cb < C; cb += VL<A>) {
            const uint32_t m = lanes<A>(0, C - cb);
            V<A> acc[KKA + 1];
            for (int i = 0; i <= KK; ++i) acc[i] = simd::vload(dst + i * Cp + cb);
            const A* rows[KC ? KC : kMaxK];
            input_rows(img + cb, sh.H, sh.W * C, oh, K, S, rows);
            wgrad_row<A, KC, SC>(rows, g + row * sh.Wo * C + cb, C, sh.W, sh.Wo, lo, hi, m, acc,
                                 K, S);
            for (int i = 0; i <= KK; ++i) simd::vstore(dst + i * Cp + cb, acc[i]);
          }
        }
      });
    }
    if (gx) {
      const int64_t tasks = sh.N * sh.H;
      // tasks handed out at a time (par::for_each)
      const int64_t chunk = chunk_of(tasks, sh.W * C * KK, threads);
      const bool stream = cl_stream<A>(C, tasks * sh.W * C * (int64_t)sizeof(A));
      par::for_each(tasks, chunk, [&](int64_t t) {
        const int64_t n = t / sh.H, ih = t % sh.H;
        const A* g_img = g + n * sh.Ho * sh.Wo * C;
        if (S == 1) prefetch_next_rows(g_img, sh.Ho, sh.Wo * C, ih, sh.H, K, 1);
        grad_input_row<A, KC, SC>(g_img, C, sh.Ho, sh.Wo, ih, sh.W, wflip.data(), wpack.data(), Cp,
                                  gx + t * sh.W * C, stream, K, S);
      });
      if (stream) simd::stream_fence();
    }
  });
  if (wgrad) reduce_partials(part, nchunks, C, KK, gw, gb);
}

// ------------------------------------------------------------- NCHW through channels-last tiles
// Small planes waste most lanes of a row vector, so NCHW images whose planes are small run as
// tiles of VL channels: a task (image, channel block) transposes its VL planes in registers into
// a channels-last tile (one vector per pixel) in a per-thread buffer, runs the channels-last
// kernel on it, and transposes the result back into the planes of the output. The weight
// gradient's partials are per (image, channel block), reduced over images in order.
// tile[p][l] = planes[l][p] for p < HW, l < cw (zero for l >= cw): planes l at plane_stride.
template <class A>
void to_tile(const A* planes, int64_t plane_stride, int64_t HW, int64_t cw, A* tile) {
  constexpr int L = VL<A>;
  for (int64_t p0 = 0; p0 < HW; p0 += L) {
    const int64_t pc = std::min<int64_t>(L, HW - p0);
    const uint32_t pm = lanes<A>(0, pc);
    V<A> r[L];
    for (int l = 0; l < L; ++l) r[l] = l < cw ? load_m(planes + l * plane_stride + p0, pm) : V<A>{};
    simd::transpose<A>(r);
    for (int64_t p = 0; p < pc; ++p) simd::vstore(tile + (p0 + p) * L, r[p]);
  }
}

// planes[l][p] = tile[p][l] for p < HW, l < cw.
template <class A>
void from_tile(const A* tile, int64_t HW, int64_t cw, A* planes, int64_t plane_stride) {
  constexpr int L = VL<A>;
  for (int64_t p0 = 0; p0 < HW; p0 += L) {
    const int64_t pc = std::min<int64_t>(L, HW - p0);
    const uint32_t pm = lanes<A>(0, pc);
    V<A> r[L];
    for (int p = 0; p < L; ++p) r[p] = p < pc ? simd::vload(tile + (p0 + p) * L) : V<A>{};
    simd::transpose<A>(r);
    for (int64_t l = 0; l < cw; ++l) store_m(planes + l * plane_stride + p0, r[l], pm);
  }
}

// Forward, NCHW through tiles. KC, SC as in forward_nchw.
template <class A, int KC, int SC>
void forward_tiles(const Shape& sh, const A* x, const A* w, const A* b, int act, A* y,
                   int threads) {
  constexpr int L = VL<A>;
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S;
  const std::vector<A> wp = pack_weights(w, sh.C, K, false), bp = pack_bias(b, sh.C);
  const int64_t Cp = padded<A>(sh.C), ncb = Cp / L, tasks = sh.N * ncb;
  const int64_t HW = sh.H * sh.W, HWo = sh.Ho * sh.Wo;
  par::region(threads, [&] {
    std::vector<A> tin((size_t)(HW * L)), tout((size_t)(HWo * L));
    par::for_each(tasks, 1, [&](int64_t t) {
      const int64_t n = t / ncb, cb = (t % ncb) * L, cw = std::min<int64_t>(L, sh.C - cb);
      to_tile(x + (n * sh.C + cb) * HW, HW, HW, cw, tin.data());
      for (int64_t oh = 0; oh < sh.Ho; ++oh) {
        const A* rows[kMaxK];
        input_rows(tin.data(), sh.H, sh.W * L, oh, K, S, rows);
        conv_row<A, KC, SC>(rows, L, sh.W, sh.Wo, wp.data() + cb, Cp,
                            b ? bp.data() + cb : nullptr, tout.data() + oh * sh.Wo * L, false,
                            act, K, S);
      }
      from_tile(tout.data(), HWo, cw, y + (n * sh.C + cb) * HWo, HWo);
    });
  });
}

// Backward, NCHW through tiles. KC, SC as in forward_nchw.
template <class A, int KC, int SC>
void backward_tiles(const Shape& sh, const A* g, const A* x, const A* w, A* gx, A* gw, A* gb,
                    int threads) {
  constexpr int L = VL<A>;
  constexpr int KKA = KC ? KC * KC : kMaxK * kMaxK;  // the size of the sums' array
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S, KK = K * K;
  const int64_t Cp = padded<A>(sh.C), ncb = Cp / L, tasks = sh.N * ncb;
  const int64_t HW = sh.H * sh.W, HWo = sh.Ho * sh.Wo;
  const bool wgrad = gw || gb;
  std::vector<A> part(wgrad ? (size_t)(sh.N * (KK + 1) * Cp) : 0);
  const std::vector<A> wflip = pack_weights(w, sh.C, K, true);
  const std::vector<A> wpack = S == 2 ? pack_weights(w, sh.C, K, false) : std::vector<A>();
  int64_t lo, hi;
  interior(sh.W, sh.Wo, K, S, lo, hi);
  par::region(threads, [&] {
    std::vector<A> tx(wgrad ? (size_t)(HW * L) : 0), tg((size_t)(HWo * L));
    std::vector<A> tgx(gx ? (size_t)(HW * L) : 0);
    par::for_each(tasks, 1, [&](int64_t t) {
      const int64_t n = t / ncb, cb = (t % ncb) * L, cw = std::min<int64_t>(L, sh.C - cb);
      to_tile(g + (n * sh.C + cb) * HWo, HWo, HWo, cw, tg.data());
      if (wgrad) {
        to_tile(x + (n * sh.C + cb) * HW, HW, HW, cw, tx.data());
        V<A> acc[KKA + 1] = {};
        for (int64_t oh = 0; oh < sh.Ho; ++oh) {
          const A* rows[KC ? KC : kMaxK];
          input_rows(tx.data(), sh.H, sh.W * L, oh, K, S, rows);
          wgrad_row<A, KC, SC>(rows, tg.data() + oh * sh.Wo * L, L, sh.W, sh.Wo, lo, hi,
                               kFull<A>, acc, K, S);
        }
        A* dst = part.data() + n * (KK + 1) * Cp + cb;
        for (int i = 0; i <= KK; ++i) simd::vstore(dst + i * Cp, acc[i]);
      }
      if (gx) {
        for (int64_t ih = 0; ih < sh.H; ++ih)
          grad_input_row<A, KC, SC>(tg.data(), L, sh.Ho, sh.Wo, ih, sh.W, wflip.data() + cb,
                                    wpack.data() + cb, Cp, tgx.data() + ih * sh.W * L, false, K,
                                    S);
        from_tile(tgx.data(), HW, cw, gx + (n * sh.C + cb) * HW, HW);
      }
    });
  });
  if (wgrad) reduce_partials(part, sh.N, sh.C, KK, gw, gb);
}

// Whether NCHW input runs as channels-last tiles: planes narrower than a vector, and tiles that
// stay in the L2 cache.
template <class A>
bool use_tiles(const Shape& sh) {
  return sh.Wo < VL<A> && sh.H * sh.W * VL<A> * (int64_t)sizeof(A) <= (256 << 10);
}

// --------------------------------------------------------------------------------- entries
// The layout's forward, by the compiled kernels of KC, SC or the generic ones (0, 0).
template <class A, int KC, int SC>
void forward_layout(const Shape& sh, bool channels_last, const A* x, const A* w, const A* b,
                    int act, A* y, int threads) {
  if (channels_last)
    forward_cl<A, KC, SC>(sh, x, w, b, act, y, threads);
  else if (use_tiles<A>(sh))
    forward_tiles<A, KC, SC>(sh, x, w, b, act, y, threads);
  else
    forward_nchw<A, KC, SC>(sh, x, w, b, act, y, threads);
}

template <class A, int KC, int SC>
void backward_layout(const Shape& sh, bool channels_last, const A* g, const A* x, const A* w,
                     A* gx, A* gw, A* gb, int threads) {
  if (channels_last)
    backward_cl<A, KC, SC>(sh, g, x, w, gx, gw, gb, threads);
  else if (use_tiles<A>(sh))
    backward_tiles<A, KC, SC>(sh, g, x, w, gx, gw, gb, threads);
  else
    backward_nchw<A, KC, SC>(sh, g, x, w, gx, gw, gb, threads);
}

// conv_rows (dw_ops.h) by the compiled kernel of KC, SC, Act or the generic one (0, 0, kAny).
template <class A, int KC, int SC, int Act>
void conv_rows_of(const Shape& sh, const A* x, const A* wpack, const A* bias, int act, int64_t r0,
                  int64_t n, A* out) {
  const int K = KC ? KC : sh.K, S = SC ? SC : sh.S;
  const int64_t C = sh.C, per_image = sh.Ho * sh.Wo;
  for (int64_t r = r0; r < r0 + n;) {  // a row of the output pixels at a time
    const int64_t img = r / per_image, oh = r % per_image / sh.Wo, ow0 = r % sh.Wo;
    const int64_t ow1 = std::min(sh.Wo, ow0 + (r0 + n - r));
    const A* rows[KC ? KC : kMaxK];
    input_rows(x + img * sh.H * sh.W * C, sh.H, sh.W * C, oh, K, S, rows);
    if constexpr (KC != 0)
      cl_conv_range<A, KC, SC, Act>(rows, C, sh.W, sh.Wo, ow0, ow1, wpack, padded<A>(C), bias,
                                    out + (r - r0) * C, false, act);
    else
      cl_conv_range_any<A>(rows, C, sh.W, sh.Wo, ow0, ow1, wpack, padded<A>(C), bias,
                           out + (r - r0) * C, false, act, K, S);
    r += ow1 - ow0;
  }
}

// The compiled kernels of float32 with k = 3 (dw_k3_forward.cpp, dw_k3_backward.cpp); act: a
// compiled_activation.
void forward_k3(const Shape& sh, bool channels_last, const float* x, const float* w,
                const float* b, int act, float* y, int threads);
void backward_k3(const Shape& sh, bool channels_last, const float* g, const float* x,
                 const float* w, float* gx, float* gw, float* gb, int threads);
void conv_rows_k3(const Shape& sh, const float* x, const float* wpack, const float* bias, int act,
                  int64_t r0, int64_t n, float* out);

}  // namespace dwconv
