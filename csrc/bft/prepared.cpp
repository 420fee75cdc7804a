// Inference layers prepared once and called from Python directly (the extension's Python module):
// PreparedBFT is a fused BFT layer (butterfly/passes/fuse.py, FusedBFT) whose plan, weights and
// epilogue are checked and converted when it is built, and whose float32 weights are packed for
// the channels-as-lanes kernel once (again whenever the weight tensor's version counter moves:
// an in-place update such as load_state_dict; an inference tensor has no counter and is packed
// once), so that a call only lays out the image batch and runs the kernel. Calling the operator butterfly_cpu::forward_fused instead goes
// through the dispatcher's boxed call and checks every argument again: a fixed cost per call
// that dominates small layers at batch 1. The operator stays the one traced, counted and
// exported; this is its eager fast path, and it computes the same (forward_into).
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "bft/binding.h"

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
    fused_.active = fused_.scale.defined() || fused_.shift.defined() ||
                    fused_.act != activation::kNone;
  }

  // y (N, cout, H, W) for x (N, cin, H, W), in x's memory format: channels-last pixels (or a
  // channel slice of them, rows at a larger stride) or NCHW. `add`: of y's shape, or None.
  at::Tensor run(const at::Tensor& x_in, const std::optional<at::Tensor>& add) const {
    TORCH_CHECK(x_in.dim() == 4 && x_in.size(1) == pl_.cin && x_in.scalar_type() == dtype_ &&
                    x_in.device().is_cpu(),
                kWhat, ": expected a CPU ", dtype_, " tensor of shape (N, ", pl_.cin,
                ", H, W), got ", x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
    const int64_t N = x_in.size(0), H = x_in.size(2), W = x_in.size(3);
    const at::IntArrayRef s = x_in.strides();
    // pixels at one stride s[3] >= cin, channels contiguous (not NCHW-contiguous)
    const bool rows = !x_in.is_contiguous() && s[1] == 1 && s[3] >= pl_.cin &&
                      (H == 1 || s[2] == W * s[3]) && (N == 1 || s[0] == H * W * s[3]);
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
      forward_into(pl_, x, N * H * W, 1, s[3], weight_, &f, y, kWhat, lane_plan());
    else
      forward_into(pl_, x, N, H * W, 0, weight_, &f, y, kWhat);
    return y;
  }

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

}  // namespace
}  // namespace bft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<bft::PreparedBFT>(m, "PreparedBFT")
      .def(pybind11::init<const at::Tensor&, std::vector<int64_t>, int64_t, int64_t, bool,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::string&, at::ScalarType>())
      .def("__call__", &bft::PreparedBFT::run, pybind11::arg("x"),
           pybind11::arg("add") = pybind11::none());
}
