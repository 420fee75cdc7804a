// The depthwise -> BFT block's forward on checked arguments: the depthwise conv's output rows as
// the BFT's row source (DepthwiseRows) and dw_bft_into, which the operator
// butterfly_cpu::dw_bft_fused (dw_bft_cpu.cpp) and the prepared layer (bft/prepared.cpp) call.
#pragma once

#include <ATen/core/Tensor.h>

#include "bft/binding.h"
#include "depthwise/dw_ops.h"

namespace bft {

// Rows r0 .. r0 + n of the depthwise conv's output, flattened (N, Ho, Wo), channels-last.
template <class A>
struct DepthwiseRows final : RowSource<A> {
  const dwconv::Shape& sh;
  const A* x;      // (N, H, W, C)
  const A* wpack;  // (K*K, Cp), dwconv::pack_weights
  const A* bias;   // Cp values, or null
  int act;

  DepthwiseRows(const dwconv::Shape& sh, const A* x, const A* wpack, const A* bias, int act)
      : sh(sh), x(x), wpack(wpack), bias(bias), act(act) {}

  const A* fill(int64_t r0, int64_t n) const override {
    A* out = scratch<A>(5, n * sh.C);
    dwconv::conv_rows<A>(sh, x, wpack, bias, act, r0, n, out);
    return out;
  }
};

template <class A>
void dw_bft_forward(const Plan& pl, const dwconv::Shape& sh, const A* x, const A* dw_w,
                    const A* dw_b, int dw_act, const A* w, const Epilogue<A>& epi, const A* add,
                    A* y) {
  const std::vector<A> wp = dwconv::pack_weights(dw_w, sh.C, sh.K, false);
  const std::vector<A> bp = dwconv::pack_bias(dw_b, sh.C);
  const DepthwiseRows<A> src(sh, x, wp.data(), dw_b ? bp.data() : nullptr, dw_act);
  forward_fused_impl<A, A>(pl, nullptr, w, y, sh.N * sh.Ho * sh.Wo, 1, options(), epi, add, &src);
}

// y (N, cout, Ho, Wo, channels-last) = the block on x (channels-last, float32 or float64, with
// dw_weight (C, 1, K, K), dw_bias (C or undefined) and weight in its dtype; f's add laid out
// like y). The arguments are checked by the caller.
inline void dw_bft_into(const Plan& pl, const dwconv::Shape& sh, const at::Tensor& x,
                        const at::Tensor& dw_weight, const at::Tensor& dw_bias, int dw_act,
                        const at::Tensor& weight, const FusedArgs& f, at::Tensor& y) {
  auto run = [&](auto* tag) {
    using A = std::remove_pointer_t<decltype(tag)>;
    auto data = [](const at::Tensor& v) { return v.defined() ? v.const_data_ptr<A>() : nullptr; };
    const EpilogueData<A> epi(pl.cout, data(f.scale), data(f.shift), f.act);
    dw_bft_forward<A>(pl, sh, x.const_data_ptr<A>(), dw_weight.const_data_ptr<A>(),
                      data(dw_bias), dw_act, weight.const_data_ptr<A>(), epi.e, data(f.add),
                      y.mutable_data_ptr<A>());
  };
  if (x.scalar_type() == at::kDouble)
    run((double*)nullptr);
  else
    run((float*)nullptr);
}

}  // namespace bft
