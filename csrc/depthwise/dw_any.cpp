// The depthwise convolution's entry points (dw_ops.h) for float32 and float64: float32 with
// k = 3 (and a compiled_activation) goes to the compiled kernels (dw_k3_forward.cpp,
// dw_k3_backward.cpp), every other case to the generic kernels (k, stride and activation at
// runtime), compiled here.
#include <type_traits>

#include "depthwise/dw_kernel.h"

namespace dwconv {

template <class A>
void forward(const Shape& sh, bool channels_last, const A* x, const A* w, const A* b, int act,
             A* y, int threads) {
  if constexpr (std::is_same_v<A, float>)
    if (sh.K == 3 && compiled_activation(act))
      return forward_k3(sh, channels_last, x, w, b, act, y, threads);
  forward_layout<A, 0, 0>(sh, channels_last, x, w, b, act, y, threads);
}

template <class A>
void backward(const Shape& sh, bool channels_last, const A* g, const A* x, const A* w, A* gx,
              A* gw, A* gb, int threads) {
  if constexpr (std::is_same_v<A, float>)
    if (sh.K == 3) return backward_k3(sh, channels_last, g, x, w, gx, gw, gb, threads);
  backward_layout<A, 0, 0>(sh, channels_last, g, x, w, gx, gw, gb, threads);
}

template <class A>
void conv_rows(const Shape& sh, const A* x, const A* wpack, const A* bias, int act, int64_t r0,
               int64_t n, A* out) {
  if constexpr (std::is_same_v<A, float>)
    if (sh.K == 3 && compiled_activation(act))
      return conv_rows_k3(sh, x, wpack, bias, act, r0, n, out);
  conv_rows_of<A, 0, 0, kAny>(sh, x, wpack, bias, act, r0, n, out);
}

#define DW_INSTANTIATE(A)                                                                       \
  template void forward<A>(const Shape&, bool, const A*, const A*, const A*, int, A*, int);     \
  template void backward<A>(const Shape&, bool, const A*, const A*, const A*, A*, A*, A*, int); \
  template void conv_rows<A>(const Shape&, const A*, const A*, const A*, int, int64_t, int64_t, \
                             A*);
DW_INSTANTIATE(float)
DW_INSTANTIATE(double)
#undef DW_INSTANTIATE

}  // namespace dwconv
