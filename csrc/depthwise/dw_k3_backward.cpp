// The depthwise convolution's backward compiled for float32 with k = 3 (strides 1 and 2;
// dw_kernel.h's compiled kernels): backward_k3. dw_any.cpp sends these cases here.
#include "depthwise/dw_kernel.h"

namespace dwconv {

void backward_k3(const Shape& sh, bool channels_last, const float* g, const float* x,
                 const float* w, float* gx, float* gw, float* gb, int threads) {
  if (sh.S == 1)
    backward_layout<float, 3, 1>(sh, channels_last, g, x, w, gx, gw, gb, threads);
  else
    backward_layout<float, 3, 2>(sh, channels_last, g, x, w, gx, gw, gb, threads);
}

}  // namespace dwconv
