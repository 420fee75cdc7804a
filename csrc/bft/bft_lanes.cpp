// The channels-as-lanes stages (bft/lanes.h), float32, compiled once for the forward and the
// fused forward: every (radix K, members per vector Q, lane stride T) of radices 2 and 4 (the
// radices of base 2 and base 4; other radices run the transposing tile kernels).
#include "bft/lanes.h"

namespace bft {

LaneStageFn<float> find_lane_stage(int K, int Q, int T, bool fin) {
  constexpr int VL = Vec<float>::lanes;
#define BFT_LANE_CASE(k, q, t)                                                   \
  if constexpr ((q) * (t) <= VL && (q) <= (k))                                   \
    if (K == (k) && Q == (q) && T == (t))                                        \
      return fin ? &lane_stage<float, (k), (q), (t), true>                       \
                 : &lane_stage<float, (k), (q), (t), false>;
#define BFT_LANE_T(k, q) \
  BFT_LANE_CASE(k, q, 1) BFT_LANE_CASE(k, q, 2) BFT_LANE_CASE(k, q, 4) BFT_LANE_CASE(k, q, 8)
  BFT_LANE_CASE(2, 1, 1) BFT_LANE_CASE(4, 1, 1)
  BFT_LANE_T(2, 2) BFT_LANE_T(4, 2) BFT_LANE_T(4, 4)
#undef BFT_LANE_T
#undef BFT_LANE_CASE
  return nullptr;
}

}  // namespace bft
