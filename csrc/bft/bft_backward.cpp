// The BFT backward's kernel (butterfly_cpu::backward, bound in bft_cpu.cpp): backward_impl, for
// the dtypes of BFT_DTYPES. The forward run kernels it recomputes the stages' inputs with are
// compiled in bft_runs.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bft/kernel.h"

namespace bft {

#define BFT_INSTANTIATE(S, A)                                                                \
  template void backward_impl<S, A>(const Plan&, const S*, const S*, const A*, S*, A*, int64_t, \
                                    int64_t, const Options&);
BFT_DTYPES(BFT_INSTANTIATE)
#undef BFT_INSTANTIATE

}  // namespace bft
