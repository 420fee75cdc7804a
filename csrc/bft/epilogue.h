// The epilogue of the fused BFT forward (butterfly_cpu::forward_fused; the Python side is the fused
// epilogue operator, butterfly/ops/bft_fused.py):
//
//   y = act(bft(x) * scale[c] + shift[c]) + add
//
// applied to every output vector while it is still in registers, just before its one store (the
// last run's store, or the store of a buffered tile), so that BFT -> BatchNorm -> activation
// costs one pass over memory. The plain forward is the case without an epilogue: the kernels
// that store with one are separate instantiations (template parameter E, a Form), compiled in
// their own translation units (bft/bft_cpu_fused.cpp), so the plain forward's code does not
// change.
#pragma once

#include <limits>
#include <string>
#include <vector>

#include "common/activation.h"
#include "common/simd.h"

namespace bft {

using namespace simd;  // common/simd.h

// An epilogue's activation: a code of the list in common/activation.h.
using Activation = activation::Code;

// The epilogue as the kernels apply it to channel c (pointers offset to the rows being stored):
//   u = y * mul[c] + bias[c]
//   swish ? u * clamp(u / 6 + 1/2, 0, 1) : clamp(u, lo, hi)
// Two forms for the five activations (a kernel per activation would multiply the build time):
// none clamps to +-inf, relu to [0, inf), relu6 to [0, 6]; hardsigmoid, clamp(v + 3, 0, 6) / 6,
// has its / 6 + 1/2 folded into mul and bias and clamps to [0, 1]; hardswish (swish) is
// v * clamp(v + 3, 0, 6) / 6 = v * clamp(v / 6 + 1/2, 0, 1). NaN passes through, as in PyTorch.
// The kernels are compiled for each form (template parameter Swish); the add step (a tensor
// laid out like y) is applied by the stores, after this.
template <class A>
struct Epilogue {
  const A* mul = nullptr;
  const A* bias = nullptr;
  A lo = 0, hi = 0;
  bool swish = false;

  // the same epilogue for rows starting at channel c
  Epilogue at(int64_t c) const {
    Epilogue e = *this;
    e.mul += c;
    e.bias += c;
    return e;
  }

  // u = y * m + b, activated (V: vec_t<A> or A)
  template <bool Swish, class V>
  SIMD_INLINE V apply(V y, V m, V b) const {
    const V u = y * m + b;
    if constexpr (Swish)
      return u * clamp(u * splat<V>(A(1) / A(6)) + splat<V>(A(0.5)), splat<V>(0), splat<V>(1));
    else
      return clamp(u, splat<V>(lo), splat<V>(hi));
  }
  // VL pixels of channel c
  template <bool Swish>
  SIMD_INLINE vec_t<A> pixels(vec_t<A> y, int64_t c) const {
    return apply<Swish>(y, splat<vec_t<A>>(mul[c]), splat<vec_t<A>>(bias[c]));
  }
  // channels c .. c + VL of one pixel
  template <bool Swish>
  SIMD_INLINE vec_t<A> channels(vec_t<A> y, int64_t c) const {
    return apply<Swish>(y, vload(mul + c), vload(bias + c));
  }
  // one value of channel c, either form
  SIMD_INLINE A scalar(A y, int64_t c) const {
    return swish ? apply<true>(y, mul[c], bias[c]) : apply<false>(y, mul[c], bias[c]);
  }

  // a broadcast to V (x - 0 is x and folds away; x + 0 is not, for x = -0, and would add)
  template <class V>
  static SIMD_INLINE V splat(A a) {
    if constexpr (std::is_same_v<V, A>) return a;
    else return a - V{};
  }

 private:
  // clamp(u, lo, hi) as max then min, NaN kept (comparisons with NaN are false)
  template <class V>
  static SIMD_INLINE V clamp(V u, V lo, V hi) {
    u = lo > u ? lo : u;
    return hi < u ? hi : u;
  }
};

// The form a kernel is compiled for (its template parameter E): the plain forward, or the
// epilogue's clamp or swish form.
enum Form : int { kPlain = 0, kClamp = 1, kSwish = 2 };

template <class A>
int form_of(const Epilogue<A>& e) {
  return e.swish ? kSwish : kClamp;
}

// The per-channel arrays behind an Epilogue (scale / shift may be null: 1 / 0).
template <class A>
struct EpilogueData {
  std::vector<A> mul, bias;
  Epilogue<A> e;

  EpilogueData(int64_t channels, const A* scale, const A* shift, Activation act)
      : mul((size_t)channels), bias((size_t)channels) {
    const bool sigmoid = act == activation::kHardsigmoid;
    for (int64_t c = 0; c < channels; ++c) {
      const A s = scale ? scale[c] : A(1), b = shift ? shift[c] : A(0);
      mul[c] = sigmoid ? s / A(6) : s;
      bias[c] = sigmoid ? b / A(6) + A(0.5) : b;
    }
    constexpr A inf = std::numeric_limits<A>::infinity();
    e.mul = mul.data();
    e.bias = bias.data();
    e.swish = act == activation::kHardswish;
    e.lo = act == activation::kNone ? -inf : A(0);
    e.hi = act == activation::kRelu6 ? A(6) : sigmoid ? A(1) : inf;
  }
  EpilogueData(const EpilogueData&) = delete;
  EpilogueData& operator=(const EpilogueData&) = delete;
};

}  // namespace bft
