// The fused forward's kernels (butterfly_cpu::forward_fused, bound in bft_cpu.cpp): the forward
// with its epilogue (bft_cpu_epilogue.h) and the run kernels of the epilogue's two forms. A
// translation unit of their own, so that they compile in parallel with bft_cpu.cpp (they take
// longer to compile than the plain kernels; in one unit the build took 2.3x as long).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bft/kernel.h"

namespace bft {

template <class A>
RunFn<A> find_epilogue_run(const int* radices, int len, int form) {
  return form == kSwish ? find_run<A, kSwish>(radices, len) : find_run<A, kClamp>(radices, len);
}

template RunFn<float> find_epilogue_run<float>(const int*, int, int);
template RunFn<double> find_epilogue_run<double>(const int*, int, int);

template <class S, class A>
void forward_fused_impl(const Plan& pl, const S* x, const A* w, S* y, int64_t B, int64_t P,
                        const Options& opt, const Epilogue<A>& epi, const S* add,
                        const RowSource<A>* src) {
  forward_impl<S, A, true>(pl, x, w, y, B, P, opt, &epi, add, src);
}

#define BFT_INSTANTIATE(S, A)                                                                  \
  template void forward_fused_impl<S, A>(const Plan&, const S*, const A*, S*, int64_t, int64_t, \
                                         const Options&, const Epilogue<A>&, const S*,   \
                                         const RowSource<A>*);
BFT_INSTANTIATE(float, float)
BFT_INSTANTIATE(double, double)
BFT_INSTANTIATE(c10::BFloat16, float)
BFT_INSTANTIATE(c10::Half, float)
#undef BFT_INSTANTIATE

}  // namespace bft
