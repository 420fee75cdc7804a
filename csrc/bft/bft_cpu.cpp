// PyTorch binding of the fused BFT CPU kernel (bft/kernel.h): the operators butterfly_cpu::forward,
// butterfly_cpu::forward_fused (the forward with an epilogue, see bft/epilogue.h) and
// butterfly_cpu::backward, which define the operator namespace (TORCH_LIBRARY) that the other
// folders' operators join. Loaded by the Python side's CPU backend (butterfly/kernels/cpu/).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "bft/binding.h"

namespace bft {
namespace {

// The forward, shared by forward and forward_fused (`fused`: its epilogue, or null).
at::Tensor forward_common(const at::Tensor& x_in, const at::Tensor& weight_in,
                          c10::IntArrayRef radices, int64_t out_channels, bool residual,
                          const FusedArgs* fused, const char* what) {
  TORCH_CHECK(x_in.dim() == 3, what, ": expected x of shape (B, C_in, P), got ", x_in.sizes());
  Plan pl = plan_for(x_in.size(1), out_channels, radices, residual, what);
  check_args(x_in, weight_in, pl, what);
  // rows of channels (P == 1) may sit at a larger stride (a channel slice of a channels-last
  // tensor: ShuffleNetV2's split); the kernel reads them in place
  const bool strided_rows = x_in.size(2) == 1 && x_in.stride(1) == 1 && x_in.size(0) > 1 &&
                            x_in.stride(0) >= x_in.size(1);
  at::Tensor x = strided_rows ? x_in : x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = x.size(0), P = x.size(2);
  at::Tensor y = at::empty({B, out_channels, P}, x.options());
  forward_into(pl, x, B, P, strided_rows ? x.stride(0) : 0, weight, fused, y, what);
  return y;
}

at::Tensor bft_forward(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef radices,
                       int64_t out_channels, bool residual) {
  return forward_common(x, weight, radices, out_channels, residual, nullptr,
                        "butterfly_cpu::forward");
}

// y = act(bft(x) * scale[c] + shift[c]) + add in the compute dtype, rounded once to x's dtype
// (the fused epilogue operator, butterfly/ops/bft_fused.py).
at::Tensor bft_forward_fused(const at::Tensor& x, const at::Tensor& weight,
                             c10::IntArrayRef radices, int64_t out_channels, bool residual,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift, c10::string_view activation,
                             const std::optional<at::Tensor>& add) {
  const char* what = "butterfly_cpu::forward_fused";
  TORCH_CHECK(x.dim() == 3, what, ": expected x of shape (B, C_in, P), got ", x.sizes());
  FusedArgs f = parse_epilogue(x.scalar_type(), out_channels, scale, shift, activation, what);
  if (add.has_value()) {
    const at::Tensor& a = *add;
    TORCH_CHECK(a.dim() == 3 && a.size(0) == x.size(0) && a.size(1) == out_channels &&
                    a.size(2) == x.size(2),
                what, ": epilogue add must have the output's shape (", x.size(0), ", ",
                out_channels, ", ", x.size(2), "), got ", a.sizes());
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == x.scalar_type(), what,
                ": epilogue add must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ",
                a.scalar_type(), " on ", a.device());
    f.add = a.contiguous();
  }
  f.active = f.active || f.add.defined();
  return forward_common(x, weight, radices, out_channels, residual, &f, what);
}

std::tuple<at::Tensor, at::Tensor> bft_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                const at::Tensor& weight_in,
                                                c10::IntArrayRef radices, int64_t out_channels,
                                                bool residual) {
  TORCH_CHECK(x_in.dim() == 3, "butterfly_cpu::backward: expected x of shape (B, C_in, P), got ",
              x_in.sizes());
  Plan pl = plan_for(x_in.size(1), out_channels, radices, residual, "butterfly_cpu::backward");
  check_args(x_in, weight_in, pl, "butterfly_cpu::backward");
  at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), P = x.size(2);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == out_channels &&
                  grad.size(2) == P,
              "butterfly_cpu::backward: expected grad of shape (", B, ", ", out_channels, ", ", P,
              "), got ", grad.sizes());
  // Plain contiguous strides, as the fake kernels promise: empty_like would copy the strides of
  // size-1 dimensions, which contiguous() leaves as they came (e.g. from a channels-last view).
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gw = at::empty(weight.sizes(), weight.options());
  dispatch(x.scalar_type(), "butterfly_cpu::backward", [&](auto* s_tag, auto* a_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    using A = std::remove_pointer_t<decltype(a_tag)>;
    backward_impl<S, A>(pl, (const S*)grad.data_ptr(), (const S*)x.data_ptr(),
                        (const A*)weight.data_ptr(), (S*)gx.data_ptr(), (A*)gw.data_ptr(), B, P,
                        options());
  });
  return {gx, gw};
}

}  // namespace
}  // namespace bft

TORCH_LIBRARY(butterfly_cpu, m) {
  m.def("forward(Tensor x, Tensor weight, int[] radices, int out_channels, bool residual) -> Tensor");
  m.def("forward_fused(Tensor x, Tensor weight, int[] radices, int out_channels, bool residual, "
        "Tensor? scale, Tensor? shift, str activation, Tensor? add) -> Tensor");
  m.def("backward(Tensor grad, Tensor x, Tensor weight, int[] radices, int out_channels, "
        "bool residual) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(butterfly_cpu, CPU, m) {
  m.impl("forward", &bft::bft_forward);
  m.impl("forward_fused", &bft::bft_forward_fused);
  m.impl("backward", &bft::bft_backward);
}
