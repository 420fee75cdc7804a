// What the PyTorch bindings of the BFT kernel share (bft/bft_cpu.cpp: forward, forward_fused,
// backward; depthwise/dw_bft_cpu.cpp: the depthwise -> BFT pass): the plan and argument checks,
// the dtype dispatch and the epilogue's arguments.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

#include "bft/kernel.h"

namespace bft {

// The forward and backward kernels are compiled in their own translation units, in parallel
// (bft_forward.cpp, bft_backward.cpp; the fused forward's forward_fused_impl: bft_cpu_fused.cpp):
// the bindings only call them.
#define BFT_EXTERN_KERNELS(S, A)                                                                 \
  extern template void forward_impl<S, A, false>(const Plan&, const S*, const A*, S*, int64_t,   \
                                                 int64_t, const Options&, const Epilogue<A>*,    \
                                                 const S*, const RowSource<A>*);                 \
  extern template void backward_impl<S, A>(const Plan&, const S*, const S*, const A*, S*, A*,    \
                                           int64_t, int64_t, const Options&);
BFT_DTYPES(BFT_EXTERN_KERNELS)
#undef BFT_EXTERN_KERNELS

inline Plan plan_for(int64_t cin, int64_t cout, c10::IntArrayRef radices, bool residual,
                     const char* what) {
  Plan p;
  std::string err = make_plan(cin, cout, radices.data(), (int64_t)radices.size(), residual, p);
  TORCH_CHECK(err.empty(), what, ": ", err, " (in_channels=", cin, ", out_channels=", cout,
              ", radices=", radices, ")");
  return p;
}

inline Options options() {
  Options o;
  o.threads = at::get_num_threads();
  return o;
}

inline void check_args(const at::Tensor& x, const at::Tensor& weight, const Plan& pl,
                       const char* what) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), what,
              ": the cpu kernel takes CPU tensors, got ", x.device(), " and ", weight.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == pl.T && weight.size(1) == pl.W, what,
              ": expected weight of shape (", pl.T, ", ", pl.W, ") for ", pl.cin, " -> ",
              pl.cout, " channels, got ", weight.sizes());
  auto wt = weight.scalar_type();
  auto xt = x.scalar_type();
  TORCH_CHECK((xt == at::kDouble) == (wt == at::kDouble) && (wt == at::kFloat || wt == at::kDouble),
              what, ": weight must be float64 for float64 input and float32 otherwise, got x ", xt,
              " and weight ", wt, " (the Python wrapper converts it)");
}

// Calls body(S*, A*) with null pointers naming the (input, compute) types of dtype t (the pairs
// of BFT_DTYPES).
template <class F>
void dispatch(at::ScalarType t, const char* what, F&& body) {
  switch (t) {
    case at::kFloat: body((float*)nullptr, (float*)nullptr); break;
    case at::kDouble: body((double*)nullptr, (double*)nullptr); break;
    case at::kBFloat16: body((c10::BFloat16*)nullptr, (float*)nullptr); break;
    case at::kHalf: body((c10::Half*)nullptr, (float*)nullptr); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t,
                         "; use float32/float64/bfloat16/float16 or the reference backend");
  }
}

// The fused forward's epilogue arguments, checked (scale and shift in the compute dtype; add
// contiguous, of x's dtype). `active`: there is a step to apply (without one, forward_fused is
// the plain forward).
struct FusedArgs {
  at::Tensor scale, shift, add;  // undefined: no such step
  Activation act = activation::kNone;
  bool active = false;
};

// The code of activation `name` (common/activation.h); an error naming `role` (e.g. "epilogue
// activation") and the valid names when it is none.
inline int activation_code(std::string_view name, const char* what, const char* role) {
  const int code = activation::code_of(name);
  TORCH_CHECK(code >= 0, what, ": unknown ", role, " '", std::string(name), "'; choose one of ",
              activation::name_list());
  return code;
}

// The scale, shift and activation of an epilogue for input dtype `input` (add is the caller's:
// its layout differs between operators); `active` is set for the scale, shift and activation,
// and is the caller's to set for its add.
inline FusedArgs parse_epilogue(at::ScalarType input, int64_t out_channels,
                                const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift,
                                c10::string_view activation, const char* what) {
  FusedArgs f;
  f.act = static_cast<Activation>(activation_code(
      std::string_view(activation.data(), activation.size()), what, "epilogue activation"));
  const auto compute = input == at::kDouble ? at::kDouble : at::kFloat;
  for (auto [t, out, name] : {std::tuple{&scale, &f.scale, "scale"}, {&shift, &f.shift, "shift"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.dim() == 1 && v.size(0) == out_channels, what, ": epilogue ", name,
                " must have shape (", out_channels, ",), one value per output channel, got ",
                v.sizes());
    TORCH_CHECK(v.device().is_cpu() && at::isFloatingType(v.scalar_type()), what, ": epilogue ",
                name, " must be a floating-point CPU tensor, got ", v.scalar_type(), " on ",
                v.device());
    *out = v.to(compute).contiguous();
  }
  f.active = f.scale.defined() || f.shift.defined() || f.act != activation::kNone;
  return f;
}

// y (B, cout, P, contiguous) = the forward of x (B, cin, P): contiguous, or with P == 1 rows of
// channels `x_row` elements apart (0: cin), with the epilogue `fused` (null or inactive: none;
// its add laid out like y). x and weight are checked by the caller. `lane_plan`: the weights
// packed ahead for float32 rows (Options::lane_plan), or null.
inline void forward_into(const Plan& pl, const at::Tensor& x, int64_t B, int64_t P, int64_t x_row,
                         const at::Tensor& weight, const FusedArgs* fused, at::Tensor& y,
                         const char* what, const LanePlan<float>* lane_plan = nullptr) {
  Options opt = options();
  opt.x_row_stride = x_row;
  opt.lane_plan = lane_plan;
  dispatch(x.scalar_type(), what, [&](auto* s_tag, auto* a_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    using A = std::remove_pointer_t<decltype(a_tag)>;
    const S* xp = (const S*)x.data_ptr();
    const A* wp = (const A*)weight.data_ptr();
    if (!fused || !fused->active)
      return forward_impl<S, A>(pl, xp, wp, (S*)y.data_ptr(), B, P, opt);
    auto data = [](const at::Tensor& t) { return t.defined() ? (const A*)t.data_ptr() : nullptr; };
    const EpilogueData<A> epi(pl.cout, data(fused->scale), data(fused->shift), fused->act);
    forward_fused_impl<S, A>(pl, xp, wp, (S*)y.data_ptr(), B, P, opt, epi.e,
                             fused->add.defined() ? (const S*)fused->add.data_ptr() : nullptr);
  });
}

}  // namespace bft
