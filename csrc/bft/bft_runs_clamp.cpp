// The table of the fused forward's run kernels of the epilogue's clamp form (none,
// relu, relu6, hardsigmoid): run_kernels<A, kClamp> (bft/stages.h) for float32 and float64.
#include "bft/stages.h"

namespace bft {

template BFT_RUN_TABLE(float, kClamp)
template BFT_RUN_TABLE(double, kClamp)

}  // namespace bft
