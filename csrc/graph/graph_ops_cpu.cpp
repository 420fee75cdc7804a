// The fused inference graph's operators outside the BFT, depthwise and BatchNorm kernels, for
// channels-last CPU tensors (one translation unit: each op is small, and the PyTorch headers
// they need cost more to compile than they do). Their callers are in butterfly/passes/fuse.py.
//
// butterfly_cpu::interleave_channels: ShuffleNetV2's concatenation and channel shuffle of two
// groups in one pass over memory. For images a and b (N, C, H, W) whose pixels are rows of
// contiguous channels, each at its own stride (channels-last, a channel slice of a channels-last
// tensor, or 1x1 images),
//
//   out[n, 2j, h, w] = a[n, j, h, w],  out[n, 2j + 1, h, w] = b[n, j, h, w]
//
// with out (N, 2C, H, W) channels-last; other layouts are stacked by PyTorch (the same values).
// concat_shuffle calls it; the reference is torch.stack((a, b), 2).reshape(N, 2C, H, W). The
// inner loop is plain C++ that the compiler vectorises (loads of a and b, unpack, two stores).
//
// butterfly_cpu::max_pool_cl: max pooling of a channels-last image batch in one pass,
//
//   y[n, c, oh, ow] = max of x[n, c, s*oh - p + i, s*ow - p + j], 0 <= i, j < k, in the image
//
// (PyTorch's max_pool2d with dilation 1 and floor rounding: the padding is -inf, never read;
// a NaN in a window gives NaN). A task is a run of output rows; an output pixel's channels are
// taken a vector at a time (the last vector overlapping the one before; fewer channels than a
// vector one by one), the maximum over the window's taps kept in a register. PyTorch's
// channels-last max_pool2d also computes the argmax of every output, which inference discards.
// FusedMaxPool calls it; the reference is torch.nn.functional.max_pool2d.
//
// butterfly_cpu::linear_rows: a linear layer on a few rows (a classifier at small batch): the
// output features split across the threads, each streaming its rows of the weight, which
// PyTorch's GEMV at one row reads on one thread. FusedLinear calls it where optimize_for_inference
// measured it faster; the reference is F.linear.
//
// butterfly_cpu::small_input_conv_cl: a dense convolution over few input channels (the stem),
// its bias and activation fused (graph/small_input_conv.h). FusedConv calls it where
// optimize_for_inference measured it faster than oneDNN; the reference is F.conv2d followed by
// the activation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "common/activation.h"
#include "common/pixel_rows.h"
#include "common/simd.h"
#include "graph/small_input_conv.h"

namespace {

// ------------------------------------------------------------------ concatenation + shuffle
template <class T>
void interleave(const T* a, int64_t sa, const T* b, int64_t sb, T* out, int64_t R, int64_t C) {
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict pa = a + r * sa;
      const T* __restrict pb = b + r * sb;
      T* __restrict o = out + r * 2 * C;
      for (int64_t j = 0; j < C; ++j) {
        o[2 * j] = pa[j];
        o[2 * j + 1] = pb[j];
      }
    }
  });
}

at::Tensor interleave_channels(const at::Tensor& a, const at::Tensor& b) {
  const char* what = "butterfly_cpu::interleave_channels";
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), what, ": expected CPU tensors, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.dim() == 4 && b.sizes() == a.sizes(), what,
              ": expected two (N, C, H, W) images of one shape, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": the dtypes differ: ", a.scalar_type(),
              " and ", b.scalar_type());
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  const int64_t sa = layout::pixel_stride(a), sb = layout::pixel_stride(b);
  if (!sa || !sb) return at::stack({a, b}, 2).reshape({N, 2 * C, H, W});
  at::Tensor out =
      at::empty({N, 2 * C, H, W}, a.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const int64_t R = N * H * W;
  // by element size: a copy needs no arithmetic on the values
  switch (a.element_size()) {
    case 1: interleave((const uint8_t*)a.data_ptr(), sa, (const uint8_t*)b.data_ptr(), sb,
                       (uint8_t*)out.data_ptr(), R, C); break;
    case 2: interleave((const uint16_t*)a.data_ptr(), sa, (const uint16_t*)b.data_ptr(), sb,
                       (uint16_t*)out.data_ptr(), R, C); break;
    case 4: interleave((const uint32_t*)a.data_ptr(), sa, (const uint32_t*)b.data_ptr(), sb,
                       (uint32_t*)out.data_ptr(), R, C); break;
    case 8: interleave((const uint64_t*)a.data_ptr(), sa, (const uint64_t*)b.data_ptr(), sb,
                       (uint64_t*)out.data_ptr(), R, C); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", a.scalar_type());
  }
  return out;
}

// ------------------------------------------------------------------------------ max pool
// The input check of the channels-last image operators.
void check_channels_last_image(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, ": expected a channels_last float32 or float64 CPU tensor (N, C, H, W), got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device(),
              "; call .contiguous(memory_format=torch.channels_last) first");
}

struct PoolShape {
  int64_t N, C, H, W, Ho, Wo, k, s, p;
};

template <class T>
void max_pool(const PoolShape& sh, const T* x, T* y) {
  using V = simd::vec_t<T>;
  constexpr int64_t VL = simd::Vec<T>::lanes;
  const int64_t C = sh.C, rows = sh.N * sh.Ho;
  // rows per task: at least ~32K comparisons
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, sh.Wo * C * sh.k * sh.k));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / sh.Ho, oh = r % sh.Ho;
      const int64_t h0 = std::max<int64_t>(0, oh * sh.s - sh.p);
      const int64_t h1 = std::min(sh.H, oh * sh.s - sh.p + sh.k);
      const T* img = x + n * sh.H * sh.W * C;
      for (int64_t ow = 0; ow < sh.Wo; ++ow) {
        const int64_t w0 = std::max<int64_t>(0, ow * sh.s - sh.p);
        const int64_t w1 = std::min(sh.W, ow * sh.s - sh.p + sh.k);
        const T* first = img + (h0 * sh.W + w0) * C;
        T* __restrict o = y + (r * sh.Wo + ow) * C;
        // the window's taps for VL channels from c: the maximum stays in a register
        auto window = [&](int64_t c) {
          V m = simd::vload(first + c);
          for (int64_t ih = h0; ih < h1; ++ih)
            for (int64_t iw = w0; iw < w1; ++iw) {
              const V v = simd::vload(img + (ih * sh.W + iw) * C + c);
              m = (v > m) | (v != v) ? v : m;
            }
          simd::vstore(o + c, m);
        };
        int64_t c = 0;
        for (; c + VL <= C; c += VL) window(c);
        if (c < C && C >= VL) {
          window(C - VL);   // the last channels: a vector that overlaps the one before
        } else {
          for (; c < C; ++c) {   // fewer channels than a vector: one at a time
            T m = first[c];
            bool nan = false;
            for (int64_t ih = h0; ih < h1; ++ih)
              for (int64_t iw = w0; iw < w1; ++iw) {
                const T v = img[(ih * sh.W + iw) * C + c];
                m = v > m ? v : m;
                nan |= v != v;
              }
            o[c] = nan ? std::numeric_limits<T>::quiet_NaN() : m;
          }
        }
      }
    }
  });
}

at::Tensor max_pool_cl(const at::Tensor& x, int64_t k, int64_t stride, int64_t padding) {
  const char* what = "butterfly_cpu::max_pool_cl";
  check_channels_last_image(x, what);
  TORCH_CHECK(k >= 1 && stride >= 1 && padding >= 0 && 2 * padding <= k, what,
              ": expected kernel size >= 1, stride >= 1 and 0 <= padding <= kernel size / 2, got ",
              k, ", ", stride, ", ", padding);
  PoolShape sh{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, k, stride, padding};
  sh.Ho = (sh.H + 2 * padding - k) / stride + 1;
  sh.Wo = (sh.W + 2 * padding - k) / stride + 1;
  TORCH_CHECK(sh.H + 2 * padding >= k && sh.W + 2 * padding >= k, what, ": the image ", sh.H,
              "x", sh.W, " with padding ", padding, " is smaller than the kernel size ", k);
  at::Tensor y = at::empty({sh.N, sh.C, sh.Ho, sh.Wo},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (x.scalar_type() == at::kDouble)
    max_pool<double>(sh, x.const_data_ptr<double>(), y.mutable_data_ptr<double>());
  else
    max_pool<float>(sh, x.const_data_ptr<float>(), y.mutable_data_ptr<float>());
  return y;
}

// ------------------------------------------------------------------- linear layer, few rows
// acc[r][k] = x[r] . w[k] for NR rows of x and the kOut weight rows of a block (no of them
// valid): each weight vector is loaded once for the NR rows.
template <class T, int NR, int kOut>
SIMD_INLINE void dot_block(const T* x, int64_t I, const T* w, int64_t no,
                           simd::vec_t<T> (&acc)[NR][kOut]) {
  using V = simd::vec_t<T>;
  constexpr int64_t VL = simd::Vec<T>::lanes;
  const int64_t full = I / VL * VL;
  auto step = [&](int64_t i, auto load) SIMD_INLINE_LAMBDA {
    V xv[NR];
    simd::unroll<NR>([&](auto r) SIMD_INLINE_LAMBDA { xv[r] = load(x + r * I + i); });
    simd::unroll<kOut>([&](auto k) SIMD_INLINE_LAMBDA {
      if (k < no) {
        const V wv = load(w + k * I + i);
        simd::unroll<NR>([&](auto r) SIMD_INLINE_LAMBDA { acc[r][k] += xv[r] * wv; });
      }
    });
  };
  for (int64_t i = 0; i < full; i += VL)
    step(i, [](const T* p) SIMD_INLINE_LAMBDA { return simd::vload(p); });
  if (const uint32_t tail = dwconv::lanes<T>(0, I - full))
    step(full, [tail](const T* p) SIMD_INLINE_LAMBDA { return dwconv::load_m(p, tail); });
}

// y (R, O) = x (R, I) w^T + b for w (O, I): blocks of kOut outputs are the parallel tasks, so
// that every thread streams its own rows of w (the layer is bound by reading w); rows of x go
// two at a time through a block, each weight vector loaded once for both.
template <class T>
void linear_rows(const T* x, int64_t R, int64_t I, const T* w, const T* b, int64_t O, T* y) {
  using V = simd::vec_t<T>;
  constexpr int kOut = 8;
  const int64_t blocks = (O + kOut - 1) / kOut;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * kOut, no = std::min<int64_t>(kOut, O - o0);
      auto rows = [&](int64_t r, auto nr_c) SIMD_INLINE_LAMBDA {
        constexpr int NR = decltype(nr_c)::value;
        V acc[NR][kOut] = {};
        dot_block<T, NR, kOut>(x + r * I, I, w + o0 * I, no, acc);
        for (int q = 0; q < NR; ++q) {
          T sums[kOut] = {};   // the lanes of the kOut accumulators, folded together
          simd::add_lane_sums<T, kOut>(acc[q], sums);
          for (int64_t k = 0; k < no; ++k)
            y[(r + q) * O + o0 + k] = sums[k] + (b ? b[o0 + k] : T(0));
        }
      };
      int64_t r = 0;
      for (; r + 2 <= R; r += 2) rows(r, std::integral_constant<int, 2>{});
      if (r < R) rows(r, std::integral_constant<int, 1>{});
    }
  });
}

at::Tensor linear_rows_op(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  const char* what = "butterfly_cpu::linear_rows";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              what, ": expected a float32 or float64 CPU tensor (rows, in_features), got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.device().is_cpu(),
              what, ": expected a CPU weight (out_features, ", x.size(1), ") of dtype ",
              x.scalar_type(), ", got ", weight.scalar_type(), " ", weight.sizes(), " on ",
              weight.device());
  const int64_t O = weight.size(0), I = x.size(1), R = x.size(0);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == O &&
                        bias->scalar_type() == x.scalar_type() && bias->device().is_cpu()),
              what, ": expected a CPU bias of ", O, " values of dtype ", x.scalar_type());
  at::Tensor y = at::empty({R, O}, x.options());
  if (y.numel() == 0) return y;
  if (I == 0) return bias ? y.copy_(bias->expand({R, O})) : y.zero_();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_rows", [&] {
    linear_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), R, I, wc.const_data_ptr<scalar_t>(),
                          bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, O,
                          y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

// ------------------------------------------------------- dense conv over few input channels
at::Tensor small_input_conv_cl(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t stride,
                               int64_t padding, c10::string_view activation) {
  const char* what = "butterfly_cpu::small_input_conv_cl";
  check_channels_last_image(x, what);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3)
                  && weight.scalar_type() == x.scalar_type() && weight.device().is_cpu(),
              what, ": expected a CPU weight (out_channels, ", x.size(1),
              ", k, k) of the input's dtype ", x.scalar_type(), ", got ", weight.scalar_type(),
              " ", weight.sizes(), " on ", weight.device());
  const int64_t Co = weight.size(0), K = weight.size(2);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == Co &&
                        bias->scalar_type() == x.scalar_type() && bias->device().is_cpu()),
              what, ": expected a CPU bias of ", Co, " values of dtype ", x.scalar_type());
  TORCH_CHECK(stride >= 1 && padding >= 0 && K >= 1, what,
              ": expected stride >= 1, padding >= 0 and a kernel size >= 1, got ", stride, ", ",
              padding, " and ", K);
  const int act = activation::code_of(std::string_view(activation.data(), activation.size()));
  TORCH_CHECK(act >= 0, what, ": unknown activation '", std::string(activation),
              "'; choose one of ", activation::name_list());
  small_input_conv::Shape s{x.size(0), x.size(1), x.size(2), x.size(3), Co, K, stride, padding,
                            0, 0};
  TORCH_CHECK(s.H + 2 * padding >= K && s.W + 2 * padding >= K, what, ": the image ", s.H, "x",
              s.W, " with padding ", padding, " is smaller than the kernel size ", K);
  s.Ho = (s.H + 2 * padding - K) / stride + 1;
  s.Wo = (s.W + 2 * padding - K) / stride + 1;
  at::Tensor y = at::empty({s.N, Co, s.Ho, s.Wo},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  // rows of at least ~64K multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.Wo * Co * K * K * s.C));
  auto run_rows = [&](int64_t rows, auto&& fn) { at::parallel_for(0, rows, grain, fn); };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_input_conv_cl", [&] {
    small_input_conv::forward<scalar_t>(s, x.const_data_ptr<scalar_t>(),
                                        w.const_data_ptr<scalar_t>(),
                                        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, act,
                                        y.mutable_data_ptr<scalar_t>(), run_rows);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(butterfly_cpu, m) {
  m.def("interleave_channels(Tensor a, Tensor b) -> Tensor");
  m.def("max_pool_cl(Tensor x, int kernel_size, int stride, int padding) -> Tensor");
  m.def("small_input_conv_cl(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, "
        "str activation) -> Tensor");
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(butterfly_cpu, CPU, m) {
  m.impl("interleave_channels", &interleave_channels);
  m.impl("max_pool_cl", &max_pool_cl);
  m.impl("small_input_conv_cl", &small_input_conv_cl);
  m.impl("linear_rows", &linear_rows_op);
}
