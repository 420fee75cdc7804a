// The fused BFT forward's kernel (butterfly_cpu::forward_fused, bound in bft_cpu.cpp):
// forward_impl with its epilogue (bft/epilogue.h), forward_fused_impl, for the dtypes of
// BFT_DTYPES. The run kernels of the epilogue's two forms are compiled in bft_runs_clamp.cpp and
// bft_runs_swish.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bft/kernel.h"

namespace bft {

template <class S, class A>
void forward_fused_impl(const Plan& pl, const S* x, const A* w, S* y, int64_t B, int64_t P,
                        const Options& opt, const Epilogue<A>& epi, const S* add,
                        const RowSource<A>* src) {
  forward_impl<S, A, true>(pl, x, w, y, B, P, opt, &epi, add, src);
}

#define BFT_INSTANTIATE(S, A)                                                                  \
  template void forward_fused_impl<S, A>(const Plan&, const S*, const A*, S*, int64_t, int64_t, \
                                         const Options&, const Epilogue<A>&, const S*,         \
                                         const RowSource<A>*);
BFT_DTYPES(BFT_INSTANTIATE)
#undef BFT_INSTANTIATE

}  // namespace bft
