// The table of the fused forward's run kernels of the epilogue's swish form
// (hardswish): run_kernels<A, kSwish> (bft/stages.h) for float32 and float64.
#include "bft/stages.h"

namespace bft {

template BFT_RUN_TABLE(float, kSwish)
template BFT_RUN_TABLE(double, kSwish)

}  // namespace bft
