// The pixels of an image batch as rows of channels: the layout that the channels-as-lanes BFT
// kernels and the graph's channels-last operators read in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace layout {

// The stride between the pixels of x (N, C, H, W) when each pixel's C channels are contiguous
// and the pixels follow one another at one stride: channels-last, a channel slice of a
// channels-last tensor, or 1x1 images in either memory format. 0 when they do not.
inline int64_t pixel_stride(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::IntArrayRef s = x.strides();
  if (C > 1 && s[1] != 1) return 0;
  if (H * W == 1) return N == 1 ? C : (s[0] >= C ? s[0] : 0);
  const int64_t p = W > 1 ? s[3] : s[2];
  const bool rows = p >= C && (H == 1 || s[2] == W * p) && (N == 1 || s[0] == H * W * p);
  return rows ? p : 0;
}

}  // namespace layout
