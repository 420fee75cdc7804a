// PyTorch binding of the fused depthwise convolution (dw_ops.h; the kernels in dw_kernel.h): the
// operators butterfly_cpu::dw_forward and butterfly_cpu::dw_backward, added to the namespace of
// the BFT's operators (bft/bft_cpu.cpp; here TORCH_LIBRARY_FRAGMENT) and loaded with them. The
// Python depthwise operator (butterfly/ops/depthwise.py) states their fake kernels.
//
// Memory format: x is NCHW-contiguous or channels_last-contiguous. A tensor that is
// channels_last-contiguous and not contiguous runs the channels-last kernel and gets
// channels_last outputs; anything else is made contiguous and gets contiguous outputs
// (the fake kernels follow the same rule).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "depthwise/dw_ops.h"

namespace dwconv {
namespace {

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

int activation_code(c10::string_view name) {
  const int code = activation::code_of(std::string_view(name.data(), name.size()));
  TORCH_CHECK(code >= 0, "butterfly_cpu::dw_forward: unknown activation '", std::string(name),
              "'; choose one of ", activation::name_list());
  return code;
}

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Shape check_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                  const char* what) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), what,
              ": the cpu kernel takes CPU tensors, got ", x.device(), " and ", weight.device());
  TORCH_CHECK(x.dim() == 4, what, ": expected x of shape (N, C, H, W), got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, what,
              ": unsupported dtype ", t, "; use float32/float64/bfloat16/float16");
  TORCH_CHECK(weight.is_floating_point(), what, ": weight must be floating point, got ",
              weight.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3),
              what, ": expected weight of shape (", C, ", 1, k, k), got ", weight.sizes());
  const int64_t K = weight.size(2);
  TORCH_CHECK(K == 3 || K == 5 || K == 7, what, ": kernel size ", K,
              " is not supported (3, 5 or 7)");
  TORCH_CHECK(stride == 1 || stride == 2, what, ": stride must be 1 or 2, got ", stride);
  return shape_of(x.size(0), C, x.size(2), x.size(3), (int)K, (int)stride);
}

at::Tensor dw_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                      const std::optional<at::Tensor>& bias_in, int64_t stride,
                      c10::string_view activation) {
  const char* what = "butterfly_cpu::dw_forward";
  const Shape sh = check_shape(x_in, weight_in, stride, what);
  const int act = activation_code(activation);
  const bool cl = is_channels_last(x_in);
  const auto out_type = x_in.scalar_type(), ct = compute_type(out_type);
  at::Tensor x = x_in.to(ct).contiguous(format_of(cl));
  at::Tensor weight = weight_in.to(ct).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == sh.C, what,
                ": expected bias of shape (", sh.C, "), got ", bias_in->sizes());
    bias = bias_in->to(ct).contiguous();
  }
  at::Tensor y = at::empty({sh.N, sh.C, sh.Ho, sh.Wo}, x.options().memory_format(format_of(cl)));
  if (y.numel() == 0) return out_type == ct ? y : y.to(out_type);
  const int threads = at::get_num_threads();
  if (ct == at::kDouble) {
    forward<double>(sh, cl, x.const_data_ptr<double>(), weight.const_data_ptr<double>(),
                    bias.defined() ? bias.const_data_ptr<double>() : nullptr, act,
                    y.mutable_data_ptr<double>(), threads);
  } else {
    forward<float>(sh, cl, x.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                   bias.defined() ? bias.const_data_ptr<float>() : nullptr, act,
                   y.mutable_data_ptr<float>(), threads);
  }
  return out_type == ct ? y : y.to(out_type);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_backward(const at::Tensor& grad_in,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& weight_in,
                                                           int64_t stride,
                                                           std::array<bool, 3> output_mask) {
  const char* what = "butterfly_cpu::dw_backward";
  const Shape sh = check_shape(x_in, weight_in, stride, what);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == sh.N && grad_in.size(1) == sh.C &&
                  grad_in.size(2) == sh.Ho && grad_in.size(3) == sh.Wo,
              what, ": expected grad of shape (", sh.N, ", ", sh.C, ", ", sh.Ho, ", ", sh.Wo,
              "), got ", grad_in.sizes());
  const bool cl = is_channels_last(x_in);
  const auto ct = compute_type(x_in.scalar_type());
  at::Tensor x = x_in.to(ct).contiguous(format_of(cl));
  at::Tensor grad = grad_in.to(ct).contiguous(format_of(cl));
  at::Tensor weight = weight_in.to(ct).contiguous();
  at::Tensor gx = at::empty({0}, x_in.options()), gw = at::empty({0}, weight_in.options());
  at::Tensor gb = at::empty({0}, weight_in.options());
  at::Tensor gx_c, gw_c, gb_c;
  if (output_mask[0]) gx_c = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  if (output_mask[1]) gw_c = at::empty(weight.sizes(), weight.options());
  if (output_mask[2]) gb_c = at::empty({sh.C}, weight.options());
  const bool work = grad.numel() > 0 && x.numel() > 0;
  if (!work) {  // nothing to reduce: zero gradients
    if (gx_c.defined()) gx_c.zero_();
    if (gw_c.defined()) gw_c.zero_();
    if (gb_c.defined()) gb_c.zero_();
  } else {
    const int threads = at::get_num_threads();
    auto run = [&](auto* tag) {
      using A = std::remove_pointer_t<decltype(tag)>;
      backward<A>(sh, cl, grad.const_data_ptr<A>(), x.const_data_ptr<A>(),
                  weight.const_data_ptr<A>(), gx_c.defined() ? gx_c.mutable_data_ptr<A>() : nullptr,
                  gw_c.defined() ? gw_c.mutable_data_ptr<A>() : nullptr,
                  gb_c.defined() ? gb_c.mutable_data_ptr<A>() : nullptr, threads);
    };
    if (ct == at::kDouble)
      run((double*)nullptr);
    else
      run((float*)nullptr);
  }
  if (gx_c.defined()) gx = gx_c.scalar_type() == x_in.scalar_type() ? gx_c : gx_c.to(x_in.scalar_type());
  if (gw_c.defined())
    gw = gw_c.scalar_type() == weight_in.scalar_type() ? gw_c : gw_c.to(weight_in.scalar_type());
  if (gb_c.defined())
    gb = gb_c.scalar_type() == weight_in.scalar_type() ? gb_c : gb_c.to(weight_in.scalar_type());
  return {gx, gw, gb};
}

}  // namespace
}  // namespace dwconv

TORCH_LIBRARY_FRAGMENT(butterfly_cpu, m) {
  m.def("dw_forward(Tensor x, Tensor weight, Tensor? bias, int stride, str activation) -> Tensor");
  m.def("dw_backward(Tensor grad, Tensor x, Tensor weight, int stride, bool[3] output_mask) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(butterfly_cpu, CPU, m) {
  m.impl("dw_forward", &dwconv::dw_forward);
  m.impl("dw_backward", &dwconv::dw_backward);
}
