// The depthwise convolution kernels' interface for their bindings (no PyTorch types): the shape,
// the packed weights and the entry points, defined in the kernel translation units
// (dw_any.cpp dispatches to the compiled kernels of dw_k3_forward.cpp and dw_k3_backward.cpp,
// or to the generic ones). See dw_kernel.h for the kernels themselves.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/activation.h"
#include "common/simd.h"

namespace dwconv {

template <class A>
using V = simd::vec_t<A>;
template <class A>
inline constexpr int VL = simd::Vec<A>::lanes;

// Activations: the codes of common/activation.h; a kernel's template parameter Act is one of
// them, or kAny: the activation is then its runtime argument `act`.
using activation::kHardsigmoid;
using activation::kHardswish;
using activation::kNone;
using activation::kRelu;
using activation::kRelu6;
inline constexpr int kAny = -1;

// Odd kernel sizes 3, 5 and 7; strides 1 and 2 (the bindings check them).
struct Shape {
  int64_t N, C, H, W, Ho, Wo;
  int K, S;
  int P() const { return K / 2; }
};

inline int64_t out_size(int64_t in, int K, int S) { return (in + 2 * (K / 2) - K) / S + 1; }

inline Shape shape_of(int64_t N, int64_t C, int64_t H, int64_t W, int K, int S) {
  return Shape{N, C, H, W, out_size(H, K, S), out_size(W, K, S), K, S};
}

// Channels-last weights are packed (K*K, Cp) and the bias (Cp), Cp = C rounded up to whole
// vectors, with zeros past C: a channel block's weight vectors load without masks.
template <class A>
inline int64_t padded(int64_t C) {
  return (C + VL<A> - 1) / VL<A> * VL<A>;
}

// (C, K*K) weights -> (K*K, Cp), optionally flipped (the kernel of the input gradient).
template <class A>
std::vector<A> pack_weights(const A* w, int64_t C, int K, bool flip) {
  const int KK = K * K;
  const int64_t Cp = padded<A>(C);
  std::vector<A> p((size_t)(KK * Cp), A(0));
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < KK; ++t) p[t * Cp + c] = w[c * KK + (flip ? KK - 1 - t : t)];
  return p;
}

// (C, K*K) weights -> (Cp / VL, K*K, VL): each channel block's K*K weight vectors one after the
// other, zeros past C.
template <class A>
std::vector<A> pack_weight_blocks(const A* w, int64_t C, int K) {
  const int KK = K * K;
  std::vector<A> p((size_t)(KK * padded<A>(C)), A(0));
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < KK; ++t) p[(c / VL<A> * KK + t) * VL<A> + c % VL<A>] = w[c * KK + t];
  return p;
}

template <class A>
std::vector<A> pack_bias(const A* b, int64_t C) {
  std::vector<A> p((size_t)padded<A>(C), A(0));
  if (b) std::copy(b, b + C, p.begin());
  return p;
}

// The entry points, for A = float and double (dw_any.cpp).

// y = act(conv(x, w) + b): x (N, C, H, W) NCHW- or channels-last-contiguous (channels_last),
// w (C, K*K), b (C) or null, act a code of common/activation.h; y laid out like x.
template <class A>
void forward(const Shape& sh, bool channels_last, const A* x, const A* w, const A* b, int act,
             A* y, int threads);

// The gradients gx (like x), gw (C, K*K), gb (C) of the plain convolution (each may be null:
// not wanted) for the output gradient g (laid out like x).
template <class A>
void backward(const Shape& sh, bool channels_last, const A* g, const A* x, const A* w, A* gx,
              A* gw, A* gb, int threads);

// Rows r0 .. r0 + n of the forward's channels-last output, flattened (N, Ho, Wo), into out (n
// rows of C): the depthwise -> BFT pass's source (dw_bft_cpu.cpp). x is channels-last; wpack and
// bias are packed (pack_weights, pack_bias; bias may be null). Runs on the calling thread.
template <class A>
void conv_rows(const Shape& sh, const A* x, const A* wpack, const A* bias, int act, int64_t r0,
               int64_t n, A* out);

}  // namespace dwconv
