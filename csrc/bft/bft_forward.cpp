// The BFT forward's kernel (butterfly_cpu::forward, bound in bft_cpu.cpp): forward_impl without
// an epilogue, for the dtypes of BFT_DTYPES. Its run kernels are compiled in bft_runs.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bft/kernel.h"

namespace bft {

#define BFT_INSTANTIATE(S, A)                                                                   \
  template void forward_impl<S, A, false>(const Plan&, const S*, const A*, S*, int64_t, int64_t, \
                                          const Options&, const Epilogue<A>*, const S*,         \
                                          const RowSource<A>*);
BFT_DTYPES(BFT_INSTANTIATE)
#undef BFT_INSTANTIATE

}  // namespace bft
