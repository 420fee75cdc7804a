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

#include "common/activation.h"

namespace bnact {
namespace {

using activation::kHardsigmoid;
using activation::kHardswish;
using activation::kNone;
using activation::kRelu;
using activation::kRelu6;

int activation_code(c10::string_view name, const char* what) {
  const int code = activation::code_of(std::string_view(name.data(), name.size()));
  TORCH_CHECK(code >= 0, what, ": unknown activation '", std::string(name), "'; choose one of ",
              activation::name_list());
  return code;
}

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

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
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

// ---------------------------------------------------------------------------- statistics
// mean[c], var[c] (biased) and invstd[c] = 1 / sqrt(var[c] + eps) of the batch.
template <typename T>
void batch_stats(const Shape& s, bool cl, const T* x, double eps, T* mean, T* invstd,
                 T* var_out) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  std::vector<double> sum(C, 0.0), sumsq(C, 0.0);
  std::vector<T> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = cl ? x[c] : x[c * HW];
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T sh = shift[c];
        double t1 = 0, t2 = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const T* p = x + (n * C + c) * HW;
          for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
            const int64_t i1 = std::min(HW, i0 + kBlock);
            T b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b1, b2)
            for (int64_t i = i0; i < i1; ++i) {
              const T v = p[i] - sh;
              b1 += v;
              b2 += v * v;
            }
            t1 += b1;
            t2 += b2;
          }
        }
        sum[c] = t1;
        sumsq[c] = t2;
      }
    });
  } else {
    const T* sh = shift.data();
    channels_last_sums<T>(M, C, [&](int64_t r, T* q1, T* q2) {
      const T* p = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T v = p[c] - sh[c];
        q1[c] += v;
        q2[c] += v * v;
      }
    }, sum.data(), sumsq.data());
  }
  for (int64_t c = 0; c < C; ++c) {
    const double d = sum[c] / M;  // mean - shift
    const double var = std::max(sumsq[c] / M - d * d, 0.0);
    mean[c] = static_cast<T>(static_cast<double>(shift[c]) + d);
    var_out[c] = static_cast<T>(var);
    invstd[c] = static_cast<T>(1.0 / std::sqrt(var + eps));
  }
}

// Per-channel y = act(x * scale + shift).
template <typename T, int ACT>
void normalize(const Shape& s, bool cl, const T* x, const T* scale, const T* shift, T* y) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  if (!cl) {
    at::parallel_for(0, s.N * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)),
                     [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const T a = scale[c], d = shift[c];
        const T* p = x + b * HW;
        T* q = y + b * HW;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) q[i] = activate<T>(p[i] * a + d, ACT);
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* p = x + r * C;
        T* q = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) q[c] = activate<T>(p[c] * scale[c] + shift[c], ACT);
      }
    });
  }
}

// ---------------------------------------------------------------------------- backward
// s1[c] = sum g_z, s2[c] = sum g_z * (x - mean).
template <typename T, int ACT>
void grad_sums(const Shape& s, bool cl, const T* g, const T* x, const T* y, const T* mean,
               const T* scale, const T* shift, double* s1, double* s2) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  constexpr bool pre = ACT == kHardswish || ACT == kHardsigmoid;
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T mu = mean[c], a = scale[c], d = shift[c];
        double t1 = 0, t2 = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t o = (n * C + c) * HW;
          const T *pg = g + o, *px = x + o, *py = y + o;
          for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
            const int64_t i1 = std::min(HW, i0 + kBlock);
            T b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b1, b2)
            for (int64_t i = i0; i < i1; ++i) {
              const T z = pre ? px[i] * a + d : T(0);
              const T gz = activation_grad<T>(pg[i], py[i], z, ACT);
              b1 += gz;
              b2 += gz * (px[i] - mu);
            }
            t1 += b1;
            t2 += b2;
          }
        }
        s1[c] = t1;
        s2[c] = t2;
      }
    });
    return;
  }
  channels_last_sums<T>(M, C, [&](int64_t r, T* q1, T* q2) {
    const T *pg = g + r * C, *px = x + r * C, *py = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T z = pre ? px[c] * scale[c] + shift[c] : T(0);
      const T gz = activation_grad<T>(pg[c], py[c], z, ACT);
      q1[c] += gz;
      q2[c] += gz * (px[c] - mean[c]);
    }
  }, s1, s2);
}

// grad_x = k_g[c] * g_z + k_x[c] * x + k_0[c].
template <typename T, int ACT>
void grad_input(const Shape& s, bool cl, const T* g, const T* x, const T* y, const T* scale,
                const T* shift, const T* kg, const T* kx, const T* k0, T* gx) {
  const int64_t C = s.C, HW = s.HW, M = s.M();
  constexpr bool pre = ACT == kHardswish || ACT == kHardsigmoid;
  if (!cl) {
    at::parallel_for(0, s.N * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)),
                     [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const T a = scale[c], d = shift[c], u = kg[c], v = kx[c], w = k0[c];
        const T *pg = g + b * HW, *px = x + b * HW, *py = y + b * HW;
        T* q = gx + b * HW;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) {
          const T z = pre ? px[i] * a + d : T(0);
          q[i] = u * activation_grad<T>(pg[i], py[i], z, ACT) + v * px[i] + w;
        }
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T *pg = g + r * C, *px = x + r * C, *py = y + r * C;
        T* q = gx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T z = pre ? px[c] * scale[c] + shift[c] : T(0);
          q[c] = kg[c] * activation_grad<T>(pg[c], py[c], z, ACT) + kx[c] * px[c] + k0[c];
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------- bindings
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
    with_activation<0>(act, [&](auto A) {
      normalize<scalar_t, decltype(A)::value>(s, cl, x.const_data_ptr<scalar_t>(), a.scale.data(),
                                              a.shift.data(), y.mutable_data_ptr<scalar_t>());
    });
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
    with_activation<0>(act, [&](auto A) {
      grad_sums<scalar_t, decltype(A)::value>(s, cl, pg, px, py, pmu, a.scale.data(),
                                              a.shift.data(), s1.data(), s2.data());
    });
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
      with_activation<0>(act, [&](auto A) {
        grad_input<scalar_t, decltype(A)::value>(s, cl, pg, px, py, a.scale.data(),
                                                 a.shift.data(), kg.data(), kx.data(), k0.data(),
                                                 pgx);
      });
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
