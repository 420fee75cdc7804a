// The table of the plain forward's run kernels (no epilogue), used by the forward
// and by the backward: run_kernels<A, kPlain> (bft/stages.h) for float32 and float64.
#include "bft/stages.h"

namespace bft {

template BFT_RUN_TABLE(float, kPlain)
template BFT_RUN_TABLE(double, kPlain)

}  // namespace bft
