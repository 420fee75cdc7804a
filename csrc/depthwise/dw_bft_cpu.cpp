// The depthwise-separable block in one pass over tiles: butterfly_cpu::dw_bft_fused,
//
//   y = epi(bft(dw_act(depthwise_conv(x) + dw_bias)))   (epi: bft/epilogue.h, with add)
//
// for channels-last float32/float64 tensors. The BFT's tiles are groups of output pixels
// (P == 1, rows of the flattened (N, Ho, Wo) output); for each tile the depthwise conv
// computes those pixels' C channels (dwconv::conv_rows: the channels-last row code of
// dw_kernel.h, bias and activation in its epilogue) into a per-thread buffer that stays in
// cache, and the BFT reads its tile from there (RowSource in bft/kernel.h). The depthwise output
// never goes to memory: the block reads x and writes y once, where the two layers apart write
// and read the intermediate once more. The Python operator (butterfly/ops/dw_bft_fused.py) calls
// it; the fused inference layers (FusedDepthwiseBFT, butterfly/passes/fuse.py) run the same code
// (dw_bft.h) through their prepared form (bft/prepared.cpp). The reference is the two fused
// layers run one after the other.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "depthwise/dw_bft.h"

namespace bft {
namespace {

bool channels_last(const at::Tensor& t) { return t.is_contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor dw_bft_fused(const at::Tensor& x_in, const at::Tensor& dw_weight_in,
                        const std::optional<at::Tensor>& dw_bias_in, int64_t stride,
                        c10::string_view dw_activation, const at::Tensor& weight_in,
                        c10::IntArrayRef radices, int64_t out_channels, bool residual,
                        const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, c10::string_view activation,
                        const std::optional<at::Tensor>& add) {
  const char* what = "butterfly_cpu::dw_bft_fused";
  TORCH_CHECK(x_in.device().is_cpu() && dw_weight_in.device().is_cpu(), what,
              ": the cpu kernel takes CPU tensors, got ", x_in.device(), " and ",
              dw_weight_in.device());
  TORCH_CHECK(x_in.dim() == 4 && channels_last(x_in), what,
              ": expected a channels_last (N, C, H, W) input, got shape ", x_in.sizes(),
              " with strides ", x_in.strides(),
              " (x.contiguous(memory_format=torch.channels_last), or run the layers apart)");
  const auto t = x_in.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, what, ": expected float32 or float64, got ", t,
              " (run the depthwise and BFT layers apart for other dtypes)");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(dw_weight_in.dim() == 4 && dw_weight_in.size(0) == C && dw_weight_in.size(1) == 1 &&
                  dw_weight_in.size(2) == dw_weight_in.size(3),
              what, ": expected a depthwise weight of shape (", C, ", 1, k, k), got ",
              dw_weight_in.sizes());
  const int K = (int)dw_weight_in.size(2);
  TORCH_CHECK(K == 3 || K == 5 || K == 7, what, ": kernel size ", K, " is not supported (3, 5 or 7)");
  TORCH_CHECK(stride == 1 || stride == 2, what, ": stride must be 1 or 2, got ", stride);
  const int dw_act = activation_code(std::string_view(dw_activation.data(), dw_activation.size()),
                                     what, "depthwise activation");
  const dwconv::Shape sh = dwconv::shape_of(N, C, x_in.size(2), x_in.size(3), K, (int)stride);

  const Plan pl = plan_for(C, out_channels, radices, residual, what);
  check_args(x_in, weight_in, pl, what);
  FusedArgs f = parse_epilogue(t, out_channels, scale, shift, activation, what);
  if (add.has_value()) {
    const at::Tensor& a = *add;
    TORCH_CHECK(a.dim() == 4 && a.size(0) == N && a.size(1) == out_channels &&
                    a.size(2) == sh.Ho && a.size(3) == sh.Wo,
                what, ": epilogue add must have the output's shape (", N, ", ", out_channels,
                ", ", sh.Ho, ", ", sh.Wo, "), got ", a.sizes());
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == t, what,
                ": epilogue add must be a CPU tensor of x's dtype ", t, ", got ", a.scalar_type(),
                " on ", a.device());
    f.add = a.contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor dw_bias;
  if (dw_bias_in.has_value() && dw_bias_in->defined()) {
    TORCH_CHECK(dw_bias_in->dim() == 1 && dw_bias_in->size(0) == C, what,
                ": expected a depthwise bias of shape (", C, "), got ", dw_bias_in->sizes());
    dw_bias = dw_bias_in->to(t).contiguous();
  }
  const at::Tensor dw_weight = dw_weight_in.to(t).contiguous(), weight = weight_in.contiguous();
  at::Tensor y = at::empty({N, out_channels, sh.Ho, sh.Wo},
                           x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  dw_bft_into(pl, sh, x_in, dw_weight, dw_bias, dw_act, weight, f, y);
  return y;
}

}  // namespace
}  // namespace bft

TORCH_LIBRARY_FRAGMENT(butterfly_cpu, m) {
  m.def("dw_bft_fused(Tensor x, Tensor dw_weight, Tensor? dw_bias, int stride, str dw_activation, "
        "Tensor weight, int[] radices, int out_channels, bool residual, Tensor? scale, "
        "Tensor? shift, str activation, Tensor? add) -> Tensor");
}

TORCH_LIBRARY_IMPL(butterfly_cpu, CPU, m) { m.impl("dw_bft_fused", &bft::dw_bft_fused); }
