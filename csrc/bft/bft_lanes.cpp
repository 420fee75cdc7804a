// The channels-as-lanes stages (bft/lanes.h), float32, compiled once for the forward, the fused
// forward and the backward (each stage and its weight gradient): every (radix K, members per
// vector Q, lane stride T) of radices 2 and 4 (the radices of base 2 and base 4; other radices
// run the transposing tile kernels).
#include "bft/lanes.h"

namespace bft {

// X(K, Q, T) for every shape a stage of radix 2 or 4 can take (those that fit a vector).
#define BFT_LANE_T(X, k, q) X(k, q, 1) X(k, q, 2) X(k, q, 4) X(k, q, 8)
#define BFT_LANE_SHAPES(X) \
  X(2, 1, 1) X(4, 1, 1) BFT_LANE_T(X, 2, 2) BFT_LANE_T(X, 4, 2) BFT_LANE_T(X, 4, 4)
#define BFT_LANE_FITS(k, q, t) ((q) * (t) <= Vec<float>::lanes && (q) <= (k))

LaneStageFn<float> find_lane_stage(int K, int Q, int T, bool fin) {
#define BFT_LANE_CASE(k, q, t)                                                 \
  if constexpr (BFT_LANE_FITS(k, q, t))                                        \
    if (K == (k) && Q == (q) && T == (t))                                      \
      return fin ? &lane_stage<float, (k), (q), (t), true>                     \
                 : &lane_stage<float, (k), (q), (t), false>;
  BFT_LANE_SHAPES(BFT_LANE_CASE)
#undef BFT_LANE_CASE
  return nullptr;
}

LaneWgradFn<float> find_lane_wgrad(int K, int Q, int T) {
#define BFT_LANE_CASE(k, q, t)                                                 \
  if constexpr (BFT_LANE_FITS(k, q, t))                                        \
    if (K == (k) && Q == (q) && T == (t)) return &lane_wgrad<float, (k), (q), (t)>;
  BFT_LANE_SHAPES(BFT_LANE_CASE)
#undef BFT_LANE_CASE
  return nullptr;
}

}  // namespace bft
