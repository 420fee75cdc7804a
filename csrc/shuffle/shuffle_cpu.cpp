// ShuffleNetV2's concatenation and channel shuffle of two groups in one pass over memory,
// butterfly_cpu::interleave_rows: for rows a (R, C) and b (R, C), each with contiguous channels
// at its own row stride (the pixels of a channels-last tensor, or of a channel slice of one),
//
//   out[r][2j] = a[r][j],  out[r][2j + 1] = b[r][j]   (out: (R, 2C), contiguous)
//
// The fused inference layers' concat_shuffle (butterfly/passes/fuse.py) calls it for
// channels-last CPU tensors; the reference is torch.stack on the last dimension. The inner loop is
// plain C++ that the compiler vectorises (loads of a and b, unpack, two stores).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

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

at::Tensor interleave_rows(const at::Tensor& a, const at::Tensor& b) {
  const char* what = "butterfly_cpu::interleave_rows";
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), what, ": expected CPU tensors, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.dim() == 2 && b.sizes() == a.sizes(), what,
              ": expected two (rows, channels) tensors of one shape, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": the dtypes differ: ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK((a.size(1) <= 1 || a.stride(1) == 1) && (b.size(1) <= 1 || b.stride(1) == 1), what,
              ": the channels of each row must be contiguous (strides ", a.strides(), " and ",
              b.strides(), ")");
  const int64_t R = a.size(0), C = a.size(1);
  at::Tensor out = at::empty({R, 2 * C}, a.options());
  if (out.numel() == 0) return out;
  const int64_t sa = R > 1 ? a.stride(0) : C, sb = R > 1 ? b.stride(0) : C;
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(butterfly_cpu, m) {
  m.def("interleave_rows(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(butterfly_cpu, CPU, m) { m.impl("interleave_rows", &interleave_rows); }
