// The depthwise convolution's forward compiled for float32 with k = 3 (strides 1 and 2, the
// compiled activations; dw_kernel.h's compiled kernels): forward_k3 and the depthwise -> BFT
// pass's rows, conv_rows_k3. dw_any.cpp sends these cases here.
#include "depthwise/dw_kernel.h"

namespace dwconv {

void forward_k3(const Shape& sh, bool channels_last, const float* x, const float* w,
                const float* b, int act, float* y, int threads) {
  if (sh.S == 1)
    forward_layout<float, 3, 1>(sh, channels_last, x, w, b, act, y, threads);
  else
    forward_layout<float, 3, 2>(sh, channels_last, x, w, b, act, y, threads);
}

void conv_rows_k3(const Shape& sh, const float* x, const float* wpack, const float* bias, int act,
                  int64_t r0, int64_t n, float* out) {
  if (sh.S == 1)
    conv_rows_of<float, 3, 1, kAny>(sh, x, wpack, bias, act, r0, n, out);
  else
    conv_rows_of<float, 3, 2, kAny>(sh, x, wpack, bias, act, r0, n, out);
}

}  // namespace dwconv
