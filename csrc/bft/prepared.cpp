// Inference layers prepared once and called from Python directly (the extension's Python module),
// for the fused layers of butterfly/passes/fuse.py: PreparedBFT (FusedBFT), PreparedDepthwise
// (a FusedConv on the depthwise kernel) and PreparedDepthwiseBFT (FusedDepthwiseBFT, in one pass
// or apart).
// Their arguments are checked and converted when they are built, and PreparedBFT's float32
// weights are packed for the channels-as-lanes kernel once (again whenever the weight tensor's
// version counter moves: an in-place update such as load_state_dict; an inference tensor has no
// counter and is packed once), so that a call only lays out the image batch and runs the kernel.
// Calling an operator such as butterfly_cpu::forward_fused instead goes through the dispatcher's
// boxed call and checks every argument again: a fixed cost per call that dominates small layers
// at batch 1. The operators stay the ones traced, counted and exported; these are their eager
// fast paths, and they run the same code (forward_into, dwconv::forward, dw_bft_into).
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "bft/binding.h"
#include "common/pixel_rows.h"
#include "depthwise/dw_bft.h"

namespace bft {
namespace {

class PreparedBFT {
 public:
  // weight (T, W) and scale and shift (cout, or None) in the compute dtype of `dtype`;
  // `activation`: an epilogue activation name.
  PreparedBFT(const at::Tensor& weight, std::vector<int64_t> radices, int64_t in_channels,
              int64_t out_channels, bool residual, const std::optional<at::Tensor>& scale,
              const std::optional<at::Tensor>& shift, const std::string& activation,
              at::ScalarType dtype)
      : pl_(plan_for(in_channels, out_channels, radices, residual, kWhat)),
        weight_(weight.contiguous()),
        dtype_(dtype) {
    check_args(at::empty({0}, at::TensorOptions().dtype(dtype)), weight_, pl_, kWhat);
    fused_ = parse_epilogue(dtype, out_channels, scale, shift, activation, kWhat);
  }

  // y (N, cout, H, W) for x (N, cin, H, W), in x's memory format: channels-last pixels (or a
  // channel slice of them, rows at a larger stride) or NCHW. `add`: of y's shape, or None.
  at::Tensor run(const at::Tensor& x_in, const std::optional<at::Tensor>& add) const {
    TORCH_CHECK(x_in.dim() == 4 && x_in.size(1) == pl_.cin && x_in.scalar_type() == dtype_ &&
                    x_in.device().is_cpu(),
                kWhat, ": expected a CPU ", dtype_, " tensor of shape (N, ", pl_.cin,
                ", H, W), got ", x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
    const int64_t N = x_in.size(0), H = x_in.size(2), W = x_in.size(3);
    // rows of channels (channels-last pixels, a channel slice of them, 1x1 images), or NCHW
    const int64_t pixel_stride = layout::pixel_stride(x_in);
    const bool rows = pixel_stride != 0;
    const auto format = rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    at::Tensor x = rows ? x_in : x_in.contiguous();
    at::Tensor y = at::empty({N, pl_.cout, H, W}, x.options().memory_format(format));
    FusedArgs f = fused_;
    if (add.has_value()) {
      TORCH_CHECK(add->sizes() == y.sizes() && add->scalar_type() == dtype_, kWhat,
                  ": expected add of shape ", y.sizes(), " and dtype ", dtype_, ", got ",
                  add->sizes(), " ", add->scalar_type());
      f.add = add->contiguous(format);
      f.active = true;
    }
    if (rows)
      forward_into(pl_, x, N * H * W, 1, pixel_stride, weight_, &f, y, kWhat, lane_plan());
    else
      forward_into(pl_, x, N, H * W, 0, weight_, &f, y, kWhat);
    return y;
  }

  const Plan& plan() const { return pl_; }
  const at::Tensor& weight() const { return weight_; }
  const FusedArgs& fused() const { return fused_; }

 private:
  // the float32 weights packed for the channels-as-lanes kernel, as of their current version
  const LanePlan<float>* lane_plan() const {
    if (weight_.scalar_type() != at::kFloat) return nullptr;
    // an inference tensor has no version counter: its weights are packed once
    const uint32_t version =
        weight_.is_inference() ? 0
                               : weight_.unsafeGetTensorImpl()->version_counter().current_version();
    if (!lanes_ || version != lanes_version_) {
      lanes_.emplace(pl_, weight_.const_data_ptr<float>());
      lanes_version_ = version;
    }
    return &*lanes_;
  }

  static constexpr const char* kWhat = "PreparedBFT";
  Plan pl_;
  at::Tensor weight_;
  at::ScalarType dtype_;
  FusedArgs fused_;
  mutable std::optional<LanePlan<float>> lanes_;
  mutable uint32_t lanes_version_ = 0;
};

// A depthwise conv's shape for x (N, C, H, W), checked against the prepared layer's.
dwconv::Shape depthwise_shape(const at::Tensor& x, int64_t C, int K, int S, at::ScalarType dtype,
                              bool need_channels_last, const char* what) {
  const bool cl = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.dim() == 4 && x.size(1) == C && x.scalar_type() == dtype &&
                  x.device().is_cpu() && (cl || !need_channels_last),
              what, ": expected a CPU ", dtype, need_channels_last ? " channels_last" : "",
              " tensor of shape (N, ", C, ", H, W), got ", x.scalar_type(), " ", x.sizes(),
              " on ", x.device());
  return dwconv::shape_of(x.size(0), C, x.size(2), x.size(3), K, S);
}

// act(depthwise_conv(x) + bias) for float32 or float64 x in either memory format; weight
// (C, 1, K, K) and bias (C, or None) in x's dtype.
class PreparedDepthwise {
 public:
  PreparedDepthwise(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    int64_t stride, const std::string& activation, at::ScalarType dtype)
      : weight_(weight.contiguous()),
        dtype_(dtype),
        act_(activation_code(activation, kWhat, "activation")) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kWhat,
                ": prepared for float32 or float64, got ", dtype);
    TORCH_CHECK(weight_.dim() == 4 && weight_.size(1) == 1 && weight_.size(2) == weight_.size(3) &&
                    (weight_.size(2) == 3 || weight_.size(2) == 5 || weight_.size(2) == 7) &&
                    weight_.scalar_type() == dtype && (stride == 1 || stride == 2),
                kWhat, ": expected a (C, 1, k, k) ", dtype, " weight with k in 3, 5, 7 and stride "
                "1 or 2, got ", weight_.sizes(), " ", weight_.scalar_type(), ", stride ", stride);
    if (bias.has_value() && bias->defined()) bias_ = bias->to(dtype).contiguous();
    K_ = (int)weight_.size(2);
    S_ = (int)stride;
  }

  int64_t channels() const { return weight_.size(0); }
  at::ScalarType dtype() const { return dtype_; }
  int K() const { return K_; }
  int S() const { return S_; }
  int act() const { return act_; }
  const at::Tensor& weight() const { return weight_; }
  const at::Tensor& bias() const { return bias_; }

  at::Tensor run(const at::Tensor& x_in) const {
    const dwconv::Shape sh = depthwise_shape(x_in, weight_.size(0), K_, S_, dtype_, false, kWhat);
    const bool cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
    const auto format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const at::Tensor x = x_in.contiguous(format);
    at::Tensor y = at::empty({sh.N, sh.C, sh.Ho, sh.Wo}, x.options().memory_format(format));
    if (y.numel() == 0) return y;
    auto run = [&](auto* tag) {
      using A = std::remove_pointer_t<decltype(tag)>;
      dwconv::forward<A>(sh, cl, x.const_data_ptr<A>(), weight_.const_data_ptr<A>(),
                         bias_.defined() ? bias_.const_data_ptr<A>() : nullptr, act_,
                         y.mutable_data_ptr<A>(), at::get_num_threads());
    };
    if (dtype_ == at::kDouble)
      run((double*)nullptr);
    else
      run((float*)nullptr);
    return y;
  }

 private:
  static constexpr const char* kWhat = "PreparedDepthwise";
  at::Tensor weight_, bias_;
  at::ScalarType dtype_;
  int act_, K_ = 3, S_ = 1;
};

// The depthwise -> BFT block for float32 or float64 x: in one pass (dw_bft_into, channels-last
// x), or apart (the depthwise conv as in PreparedDepthwise, then the fused BFT as in
// PreparedBFT, either memory format: what the block's two layers compute, without a return to
// Python between them).
class PreparedDepthwiseBFT {
 public:
  PreparedDepthwiseBFT(const PreparedDepthwise& dw, const at::Tensor& weight,
                       std::vector<int64_t> radices, int64_t out_channels, bool residual,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, const std::string& activation)
      : dw_(dw),
        pw_(weight, std::move(radices), dw.channels(), out_channels, residual, scale, shift,
            activation, dw.dtype()) {}

  at::Tensor run(const at::Tensor& x, const std::optional<at::Tensor>& add) const {
    const Plan& pl = pw_.plan();
    const dwconv::Shape sh = depthwise_shape(x, pl.cin, dw_.K(), dw_.S(), dw_.dtype(), true,
                                             kWhat);
    at::Tensor y = at::empty({sh.N, pl.cout, sh.Ho, sh.Wo},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
    FusedArgs f = pw_.fused();
    if (add.has_value()) {
      TORCH_CHECK(add->sizes() == y.sizes() && add->scalar_type() == dw_.dtype(), kWhat,
                  ": expected add of shape ", y.sizes(), " and dtype ", dw_.dtype(), ", got ",
                  add->sizes(), " ", add->scalar_type());
      f.add = add->contiguous(at::MemoryFormat::ChannelsLast);
    }
    if (y.numel()) dw_bft_into(pl, sh, x, dw_.weight(), dw_.bias(), dw_.act(), pw_.weight(), f, y);
    return y;
  }

  at::Tensor apart(const at::Tensor& x, const std::optional<at::Tensor>& add) const {
    return pw_.run(dw_.run(x), add);
  }

 private:
  static constexpr const char* kWhat = "PreparedDepthwiseBFT";
  PreparedDepthwise dw_;
  PreparedBFT pw_;
};

}  // namespace
}  // namespace bft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<bft::PreparedBFT>(m, "PreparedBFT")
      .def(pybind11::init<const at::Tensor&, std::vector<int64_t>, int64_t, int64_t, bool,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::string&, at::ScalarType>())
      .def("__call__", &bft::PreparedBFT::run, pybind11::arg("x"),
           pybind11::arg("add") = pybind11::none());
  pybind11::class_<bft::PreparedDepthwise>(m, "PreparedDepthwise")
      .def(pybind11::init<const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                          const std::string&, at::ScalarType>())
      .def("__call__", &bft::PreparedDepthwise::run, pybind11::arg("x"));
  pybind11::class_<bft::PreparedDepthwiseBFT>(m, "PreparedDepthwiseBFT")
      .def(pybind11::init<const bft::PreparedDepthwise&, const at::Tensor&, std::vector<int64_t>,
                          int64_t, bool, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::string&>())
      .def("__call__", &bft::PreparedDepthwiseBFT::run, pybind11::arg("x"),
           pybind11::arg("add") = pybind11::none())
      .def("apart", &bft::PreparedDepthwiseBFT::apart, pybind11::arg("x"),
           pybind11::arg("add") = pybind11::none());
}
