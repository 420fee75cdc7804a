// The channels-as-lanes stages (bft/lanes.h), float32, compiled once for the forward, the fused
// forward and the backward: every (radix K, members per vector Q, lane stride T) of radices 2
// and 4 (the radices of base 2 and base 4), radices 3 and 5 between whole vectors (Q == 1: the
// odd radices of mixed-radix plans, which come first), each with its weight gradient, and the
// last stage of radices 2 and 4 with each set of finishing steps the forwards use. Other stages
// run the transposing tile kernels.
#include "bft/lanes.h"

namespace bft {

// the stage kinds (K, Q, T), each as BFT_LANE_CASE(K, Q, T) (Q * T <= VL)
#define BFT_LANE_KIND(k, q, t, fn)                 \
  if constexpr ((q) * (t) <= VL && (q) <= (k))     \
    if (K == (k) && Q == (q) && T == (t)) return fn;
#define BFT_LANE_T(k, q) \
  BFT_LANE_CASE(k, q, 1) BFT_LANE_CASE(k, q, 2) BFT_LANE_CASE(k, q, 4) BFT_LANE_CASE(k, q, 8)
#define BFT_LANE_KINDS                                                                 \
  BFT_LANE_CASE(2, 1, 1) BFT_LANE_CASE(3, 1, 1) BFT_LANE_CASE(4, 1, 1) BFT_LANE_CASE(5, 1, 1) \
  BFT_LANE_T(2, 2) BFT_LANE_T(4, 2) BFT_LANE_T(4, 4)

LaneStageFn<float> find_lane_stage(int K, int Q, int T) {
  constexpr int VL = Vec<float>::lanes;
#define BFT_LANE_CASE(k, q, t) BFT_LANE_KIND(k, q, t, (&lane_stage<float, k, q, t, Middle>))
  BFT_LANE_KINDS
#undef BFT_LANE_CASE
  return nullptr;
}

LaneWgradFn<float> find_lane_wgrad(int K, int Q, int T) {
  constexpr int VL = Vec<float>::lanes;
#define BFT_LANE_CASE(k, q, t) BFT_LANE_KIND(k, q, t, (&lane_wgrad<float, k, q, t>))
  BFT_LANE_KINDS
#undef BFT_LANE_CASE
  return nullptr;
}

namespace {

// the last stage of radix K (stride 1) with the finishing steps (res, form, add)
template <int K>
LaneStageFn<float> last_stage(bool res, int form, bool add) {
  auto pick = [&](auto r) -> LaneStageFn<float> {
    constexpr bool R = decltype(r)::value;
    switch (form) {
      case kPlain:  // the plain forward: no add step
        return add ? nullptr : &lane_stage<float, K, K, 1, Finishing<true, R, kPlain, false>>;
      case kClamp:
        return add ? &lane_stage<float, K, K, 1, Finishing<true, R, kClamp, true>>
                   : &lane_stage<float, K, K, 1, Finishing<true, R, kClamp, false>>;
      case kSwish:
        return add ? &lane_stage<float, K, K, 1, Finishing<true, R, kSwish, true>>
                   : &lane_stage<float, K, K, 1, Finishing<true, R, kSwish, false>>;
    }
    return nullptr;
  };
  return res ? pick(std::true_type{}) : pick(std::false_type{});
}

}  // namespace

LaneStageFn<float> find_lane_finish(int K, bool res, int form, bool add) {
  if (K == 2) return last_stage<2>(res, form, add);
  if (K == 4) return last_stage<4>(res, form, add);
  return nullptr;
}

}  // namespace bft
