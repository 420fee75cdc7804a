// Training-mode BatchNorm fused with its activation, on CPU: the operators
// butterfly_cpu::bn_act_forward and butterfly_cpu::bn_act_backward, added to the namespace of
// the BFT's operators (bft/bft_cpu.cpp; here TORCH_LIBRARY_FRAGMENT) and loaded with them. The
// Python side adds their autograd (the BatchNorm-activation operator,
// butterfly/ops/batch_norm_act.py) and fake kernels (the CPU backend, butterfly/kernels/cpu/).
//
// Forward -> (y, mean, invstd, biased variance): one pass for the per-channel sums of x and x^2
// (double accumulators), one pass for y = act(x * scale + shift). Backward: one pass for the
// per-channel sums of g_z and g_z * (x - mean), where g_z is the gradient before the activation
// (taken from the output y for relu and relu6, from the recomputed pre-activation for hardswish
// and hardsigmoid), one pass for grad_x. PyTorch runs the BatchNorm's statistics, normalisation
// and the activation (and their backward) as separate passes.
//
// Reductions: NCHW one channel per task; channels_last fixed row chunks with per-chunk partial
// sums reduced in chunk order. Either way the sums are bit-identical whatever the number of
// threads (deterministic, like the other kernels).
//
// This file binds the operators; the kernels (bn_kernel.h) are compiled in bn_forward.cpp and
// bn_backward.cpp, for each activation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "batchnorm/bn_kernel.h"

namespace bnact {
namespace {

int activation_code(c10::string_view name, const char* what) {
  const int code = activation::code_of(std::string_view(name.data(), name.size()));
  TORCH_CHECK(code >= 0, what, ": unknown activation '", std::string(name), "'; choose one of ",
              activation::name_list());
  return code;
}

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Shape check(const at::Tensor& x, const std::optional<at::Tensor>& weight,
            const std::optional<at::Tensor>& bias, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": the cpu kernel takes CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4, what, ": expected x of shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, what,
              ": float32 or float64 only, got ", x.scalar_type());
  const int64_t C = x.size(1);
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value() && (*p)->defined()) {
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == C, what, ": expected a weight/bias of "
                  "shape (", C, "), got ", (*p)->sizes());
    }
  }
  Shape s{x.size(0), C, x.size(2) * x.size(3)};
  TORCH_CHECK(s.M() > 1, what, ": expected more than 1 value per channel when training, got "
              "input of shape ", x.sizes());
  return s;
}

// (scale, shift) = (weight * invstd, bias - mean * weight * invstd).
template <typename T>
struct Affine {
  std::vector<T> scale, shift;
};

template <typename T>
Affine<T> affine(int64_t C, const T* mean, const T* invstd, const at::Tensor& weight,
                 const at::Tensor& bias) {
  Affine<T> a{std::vector<T>(C), std::vector<T>(C)};
  const T* w = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    a.scale[c] = w ? w[c] * invstd[c] : invstd[c];
    a.shift[c] = (b ? b[c] : T(0)) - mean[c] * a.scale[c];
  }
  return a;
}

// An optional weight or bias in x's dtype, contiguous (undefined when absent).
at::Tensor param(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(x.scalar_type()).contiguous();
}

// With running_mean and running_var (both or neither) they are updated in place as
// nn.BatchNorm2d updates them: r = (1 - momentum) r + momentum batch, the variance unbiased.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps,
    c10::string_view activation) {
  const char* what = "butterfly_cpu::bn_act_forward";
  const Shape s = check(x_in, weight, bias, what);
  const int act = activation_code(activation, what);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, what, ": give running_mean and running_var, or neither");
  if (has_rm) {
    for (const auto* r : {&*running_mean, &*running_var}) {
      TORCH_CHECK(r->dim() == 1 && r->size(0) == s.C && r->is_contiguous() &&
                      r->scalar_type() == x_in.scalar_type() && r->device().is_cpu(),
                  what, ": running statistics must be contiguous CPU tensors of shape (", s.C,
                  ") and x's dtype, got ", r->sizes(), " ", r->scalar_type());
    }
  }
  const bool cl = is_channels_last(x_in);
  at::Tensor x = x_in.contiguous(format_of(cl));
  auto opts = x.options();
  at::Tensor mean = at::empty({s.C}, opts), invstd = at::empty({s.C}, opts);
  at::Tensor var = at::empty({s.C}, opts);
  at::Tensor y = at::empty(x.sizes(), opts.memory_format(format_of(cl)));
  const at::Tensor w = param(weight, x), b = param(bias, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_forward", [&] {
    scalar_t* pm = mean.mutable_data_ptr<scalar_t>();
    scalar_t* pi = invstd.mutable_data_ptr<scalar_t>();
    batch_stats<scalar_t>(s, cl, x.const_data_ptr<scalar_t>(), eps, pm, pi,
                          var.mutable_data_ptr<scalar_t>());
    const Affine<scalar_t> a = affine<scalar_t>(s.C, pm, pi, w, b);
    normalize<scalar_t>(s, cl, act, x.const_data_ptr<scalar_t>(), a.scale.data(), a.shift.data(),
                        y.mutable_data_ptr<scalar_t>());
    if (running_mean.has_value() && running_mean->defined()) {
      const at::Tensor& rm = *running_mean;
      const at::Tensor& rv = *running_var;
      scalar_t* prm = rm.mutable_data_ptr<scalar_t>();
      scalar_t* prv = rv.mutable_data_ptr<scalar_t>();
      const scalar_t* pv = var.const_data_ptr<scalar_t>();
      const double unbias = static_cast<double>(s.M()) / static_cast<double>(s.M() - 1);
      for (int64_t c = 0; c < s.C; ++c) {
        prm[c] = static_cast<scalar_t>((1 - momentum) * prm[c] + momentum * pm[c]);
        prv[c] = static_cast<scalar_t>((1 - momentum) * prv[c] + momentum * pv[c] * unbias);
      }
    }
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  const char* what = "butterfly_cpu::bn_act_backward";
  const Shape s = check(x_in, weight, bias, what);
  const int act = activation_code(activation, what);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && y_in.sizes() == x_in.sizes(), what,
              ": grad, x and y must have the same shape, got ", grad_in.sizes(), ", ",
              x_in.sizes(), " and ", y_in.sizes());
  const bool cl = is_channels_last(x_in);
  at::Tensor x = x_in.contiguous(format_of(cl));
  at::Tensor g = grad_in.to(x.scalar_type()).contiguous(format_of(cl));
  at::Tensor y = y_in.to(x.scalar_type()).contiguous(format_of(cl));
  at::Tensor mu = mean.to(x.scalar_type()).contiguous();
  at::Tensor inv = invstd.to(x.scalar_type()).contiguous();
  const at::Tensor wc = param(weight, x), bc = param(bias, x);
  std::vector<double> s1(s.C), s2(s.C);
  at::Tensor gx = at::empty({0}, x_in.options());
  at::Tensor gw = at::empty({0}, x_in.options()), gb = at::empty({0}, x_in.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* pinv = inv.const_data_ptr<scalar_t>();
    const scalar_t* pmu = mu.const_data_ptr<scalar_t>();
    const Affine<scalar_t> a = affine<scalar_t>(s.C, pmu, pinv, wc, bc);
    grad_sums<scalar_t>(s, cl, act, pg, px, py, pmu, a.scale.data(), a.shift.data(), s1.data(),
                        s2.data());
    if (output_mask[1]) {  // d weight = sum g_z * xhat
      gw = at::empty({s.C}, x.options());
      scalar_t* p = gw.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < s.C; ++c) p[c] = static_cast<scalar_t>(s2[c] * pinv[c]);
    }
    if (output_mask[2]) {  // d bias = sum g_z
      gb = at::empty({s.C}, x.options());
      scalar_t* p = gb.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < s.C; ++c) p[c] = static_cast<scalar_t>(s1[c]);
    }
    if (output_mask[0]) {
      // grad_x = w * invstd * (g_z - s1 / M - (x - mean) * invstd^2 * s2 / M)
      const double M = static_cast<double>(s.M());
      std::vector<scalar_t> kg(s.C), kx(s.C), k0(s.C);
      const scalar_t* pw = wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr;
      for (int64_t c = 0; c < s.C; ++c) {
        const double w = pw ? static_cast<double>(pw[c]) : 1.0;
        const double i = pinv[c], u = w * i, v = u * i * i * s2[c] / M;
        kg[c] = static_cast<scalar_t>(u);
        kx[c] = static_cast<scalar_t>(-v);
        k0[c] = static_cast<scalar_t>(-u * s1[c] / M + v * static_cast<double>(pmu[c]));
      }
      gx = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
      scalar_t* pgx = gx.mutable_data_ptr<scalar_t>();
      grad_input<scalar_t>(s, cl, act, pg, px, py, a.scale.data(), a.shift.data(), kg.data(),
                           kx.data(), k0.data(), pgx);
    }
  });
  return {gx, gw, gb};
}

}  // namespace
}  // namespace bnact

TORCH_LIBRARY_FRAGMENT(butterfly_cpu, m) {
  m.def("bn_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, str activation) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_act_backward(Tensor grad, Tensor x, Tensor y, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor invstd, str activation, bool[3] output_mask) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(butterfly_cpu, CPU, m) {
  m.impl("bn_act_forward", &bnact::bn_act_forward);
  m.impl("bn_act_backward", &bnact::bn_act_backward);
}
