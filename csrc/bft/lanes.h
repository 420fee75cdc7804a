// The forward on rows of channels (channels-last pixels, linear rows: P == 1) with the channels as
// SIMD lanes: no transposes. A pixel's n channels are n / VL vectors; stage s (radix K, stride t)
// mixes the K members of each group (channels seg * K * t + i * t + r, i < K):
//
//   t >= VL: the members sit in the same lane of K vectors, t / VL vectors apart (Q = 1);
//   t <  VL: Q = min(K, VL / t) members share a vector, t lanes apart, and the group spans K / Q
//            consecutive vectors.
//
// Output member i = qi * Q + a is the sum over the group's vectors qs and the rotations d < Q of
// W[qi][qs, d] * rotate_d(in[qs]), where rotate_d moves member (a + d) % Q of a vector into
// member a's lanes (an in-lane permutation with constant indices) and W holds, per lane, the
// weight w_s[g, i, qs * Q + (a + d) % Q] of that lane's channel. A stage is one pass over an
// L1-sized tile of pixels: per set of K / Q vectors, its K * K / Q weight vectors are loaded once
// and held in registers while the pixels stream past (a load and a store per K FMAs).
//
// Runs when n is a multiple of the vector length and every stage is one of those compiled (see
// find_lane_stage): radix 2 or 4 at any stride; radix 3 or 5 at a stride of whole vectors (the
// plan puts odd radices first, so their strides are). forward_impl tries it first for P == 1 and
// falls back to the transposing tile kernels otherwise.
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include "bft/epilogue.h"
#include "bft/tiles.h"
#include "common/openmp.h"
#include "common/simd.h"

namespace bft {

using namespace simd;  // common/simd.h

// v with member (a + D) % Q of each block of Q * T lanes (member a: lanes a * T .. a * T + T)
// moved into member a's lanes.
template <class A, int Q, int T, int D, int... L>
SIMD_INLINE vec_t<A> rotate_members(vec_t<A> v, std::integer_sequence<int, L...>) {
  if constexpr (D == 0) return v;
  else return shuffle2<A, (L / (Q * T)) * (Q * T) + ((L / T % Q + D) % Q) * T + L % T...>(v, v);
}

// The input vectors of C sets side by side for one pixel row s (set c's vectors c + q * vs, q <
// NQ), each loaded once and rotated to every member position: in[c][q][r] = rotate_r(vector).
template <class A, int Q, int T, int C, int NQ>
SIMD_INLINE void load_members(const A* s, int64_t vs, vec_t<A> (&in)[C][NQ][Q]) {
  constexpr int VL = Vec<A>::lanes;
  constexpr auto lanes = std::make_integer_sequence<int, VL>{};
  unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
    unroll<NQ>([&](auto q) SIMD_INLINE_LAMBDA {
      const vec_t<A> v = vload_once(s + (c + q * vs) * VL);
      unroll<Q>([&](auto r) SIMD_INLINE_LAMBDA {
        in[c][q][r] = rotate_members<A, Q, T, decltype(r)::value>(v, lanes);
      });
    });
  });
}

// sets(jb, C) over a stage's sets of NQ vectors vs apart, nvec vectors in all: single-vector
// sets (NQ == 1) C side by side (the rest one by one), other sets one at a time.
template <int NQ, int C, class F>
SIMD_INLINE void each_set(int64_t nvec, int64_t vs, F&& sets) {
  if constexpr (NQ == 1) {
    int64_t jb = 0;
    for (; jb + C <= nvec; jb += C) sets(jb, std::integral_constant<int, C>{});
    for (; jb < nvec; ++jb) sets(jb, std::integral_constant<int, 1>{});
  } else {
    for (int64_t s0 = 0; s0 < nvec; s0 += NQ * vs)
      for (int64_t r = 0; r < vs; ++r) sets(s0 + r, std::integral_constant<int, 1>{});
  }
}

// What the last stage does to its output vectors before storing them into y: add the residual
// rows (res), apply the epilogue (epi) and add `add`'s rows, as its Finishing says, and store
// with streaming stores or not.
template <class A>
struct Finish {
  const A* res = nullptr;
  int64_t res_ld = 0;
  const Epilogue<A>* epi = nullptr;
  const A* add = nullptr;
  int64_t add_ld = 0;
  bool stream = false;  // streaming stores (the output rows are vector-aligned)
};

// A stage's finishing steps, fixed at compile time (a branch per output vector in the FMA loop
// costs more than the steps): Last: the last stage (reads a Finish; Middle: any other); Res:
// adds the residual rows; Form: the epilogue's form (kPlain: none); Add: adds `add`'s rows.
template <bool Last, bool Res, int Form, bool Add>
struct Finishing {
  static constexpr bool last = Last, res = Res, add = Add;
  static constexpr int form = Form;
};
using Middle = Finishing<false, false, kPlain, false>;

// One stage on np pixels: pixel p's vector j at src + p * sld + j * VL, written to the same place
// in dst (which may be src). w: the stage's packed weights (K vectors per output vector, see
// LanePlan); nvec vectors per pixel; vs: vector stride between a group's vectors. F: the
// finishing steps (see Finishing; a last stage takes them from `fin`, where channel j * VL + l
// of the epilogue is lane l of vector j).
template <class A, int K, int Q, int T, class F>
void lane_stage(const A* src, int64_t sld, A* dst, int64_t dld, int64_t np, const A* w,
                int64_t nvec, int64_t vs, const Finish<A>* fin) {
  using V = vec_t<A>;
  constexpr int VL = Vec<A>::lanes, NQ = K / Q;
  constexpr bool epi = F::form != kPlain;
  // local copies: a store through dst may alias anything (vstore is a memcpy), so fields read
  // through fin would be reloaded for every pixel
  [[maybe_unused]] const Finish<A> f = F::last ? *fin : Finish<A>{};
  [[maybe_unused]] const Epilogue<A> ep = epi ? *f.epi : Epilogue<A>{};
  // C sets side by side from vector jb: set c's vectors are jb + c + q * vs, q < NQ (C > 1 only
  // for NQ == 1, whose sets are single vectors: the stages inside a vector)
  auto sets = [&](int64_t jb, auto count) SIMD_INLINE_LAMBDA {
    constexpr int C = decltype(count)::value;
    V wv[C][NQ][K];
    unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
      unroll<NQ>([&](auto q) SIMD_INLINE_LAMBDA {
        unroll<K>([&](auto e) SIMD_INLINE_LAMBDA {
          wv[c][q][e] = vload(w + ((jb + c + q * vs) * K + e) * VL);
        });
      });
    });
    const A* s = src + jb * VL;
    A* d = dst + jb * VL;
    [[maybe_unused]] const A* res = F::res ? f.res + jb * VL : nullptr;
    [[maybe_unused]] const A* add = F::add ? f.add + jb * VL : nullptr;
    // the epilogue's factors of the sets' channels, held like the weights
    [[maybe_unused]] V mul[C][epi ? NQ : 1], bias[C][epi ? NQ : 1];
    if constexpr (epi)
      unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
        unroll<NQ>([&](auto q) SIMD_INLINE_LAMBDA {
          mul[c][q] = vload(ep.mul + (jb + c + q * vs) * VL);
          bias[c][q] = vload(ep.bias + (jb + c + q * vs) * VL);
        });
      });
    for (int64_t p = 0; p < np; ++p, s += sld, d += dld) {
      V in[C][NQ][Q];
      load_members<A, Q, T>(s, vs, in);
      unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
        unroll<NQ>([&](auto q) SIMD_INLINE_LAMBDA {
          const int64_t at = (c + q * vs) * VL;
          V o = wv[c][q][0] * in[c][0][0];
          unroll<K - 1>([&](auto e) SIMD_INLINE_LAMBDA {
            constexpr int E = decltype(e)::value + 1;
            o += wv[c][q][E] * in[c][E / Q][E % Q];
          });
          if constexpr (F::res) o += vload(res + p * f.res_ld + at);
          if constexpr (epi)
            o = ep.template apply<F::form == kSwish>(o, mul[c][q], bias[c][q]);
          if constexpr (F::add) o += vload(add + p * f.add_ld + at);
          if constexpr (F::last)
            if (f.stream) return vstream(d + at, o);
          vstore(d + at, o);
        });
      });
    }
  };
  // single-vector sets two at a time: two independent vectors per pixel, and half the passes
  // over the tile's pixels
  each_set<NQ, 2>(nvec, vs, sets);
}

// The output vectors of a set whose weight gradients lane_wgrad sums in one pass over the pixels:
// all NQ of them when their NQ * K sums, the set's NQ * Q input vectors and an output gradient
// fit the registers; else the largest divisor of NQ that fits (each pass reloads the inputs).
template <int K, int Q, int C>
constexpr int wgrad_outputs_per_pass() {
  constexpr int NQ = K / Q;
  for (int qb = NQ; qb > 1; --qb)
    if (NQ % qb == 0 && C * (qb * K + NQ * Q + 1) <= SIMD_VECTOR_REGISTERS) return qb;
  return 1;
}

// A stage's weight gradient over np pixels, added to dw (packed like the stage's weights, see
// LanePlan): weight vector e of output vector j gains, per lane, the sum over the pixels of the
// output gradient (g's vector j) times the input vector lane_stage multiplies that weight with
// (x's, rotated). The sums stay in registers over the tile's pixels and are added to dw once.
template <class A, int K, int Q, int T>
void lane_wgrad(const A* x, int64_t xld, const A* g, int64_t gld, int64_t np, A* dw,
                int64_t nvec, int64_t vs) {
  using V = vec_t<A>;
  constexpr int NQ = K / Q;
  constexpr int64_t VL = Vec<A>::lanes;
  // the sets of lane_stage, C side by side, QB of a set's output vectors per pass
  auto sets = [&](int64_t jb, auto count) SIMD_INLINE_LAMBDA {
    constexpr int C = decltype(count)::value, QB = wgrad_outputs_per_pass<K, Q, C>();
    unroll<NQ / QB>([&](auto pass) SIMD_INLINE_LAMBDA {
      constexpr int q0 = decltype(pass)::value * QB;
      V acc[C][QB][K];
      unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
        unroll<QB>([&](auto q) SIMD_INLINE_LAMBDA {
          unroll<K>([&](auto e) SIMD_INLINE_LAMBDA { acc[c][q][e] = V{}; });
        });
      });
      const A* s = x + jb * VL;
      const A* gs = g + jb * VL;
      for (int64_t p = 0; p < np; ++p, s += xld, gs += gld) {
        V in[C][NQ][Q];
        load_members<A, Q, T>(s, vs, in);
        unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
          unroll<QB>([&](auto q) SIMD_INLINE_LAMBDA {
            const V gv = vload_once(gs + (c + (q0 + q) * vs) * VL);
            unroll<K>([&](auto e) SIMD_INLINE_LAMBDA {
              constexpr int E = decltype(e)::value;
              acc[c][q][E] += gv * in[c][E / Q][E % Q];
            });
          });
        });
      }
      unroll<C>([&](auto c) SIMD_INLINE_LAMBDA {
        unroll<QB>([&](auto q) SIMD_INLINE_LAMBDA {
          unroll<K>([&](auto e) SIMD_INLINE_LAMBDA {
            A* d = dw + ((jb + c + (q0 + q) * vs) * K + e) * VL;
            vstore(d, vload(d) + acc[c][q][e]);
          });
        });
      });
    });
  };
  // single-vector sets 8 / K at a time: 8 sums, which the FMA latency needs in flight
  each_set<NQ, 8 / K>(nvec, vs, sets);
}

template <class A>
using LaneWgradFn = void (*)(const A*, int64_t, const A*, int64_t, int64_t, A*, int64_t, int64_t);

template <class A>
using LaneStageFn = void (*)(const A*, int64_t, A*, int64_t, int64_t, const A*, int64_t, int64_t,
                             const Finish<A>*);

// The compiled stages, float32 only, compiled once in bft/bft_lanes.cpp (the forward and the
// fused forward share them), or nullptr: a stage for (K, Q, T) storing its outputs as they are,
// and the last stage of radix K (its stride is 1: Q == K, T == 1) writing y with its finishing
// steps (`form` an Epilogue Form; `add` only with an epilogue).
LaneStageFn<float> find_lane_stage(int K, int Q, int T);
LaneStageFn<float> find_lane_finish(int K, bool res, int form, bool add);
// The weight gradient of the stage find_lane_stage(K, Q, T) returns, or nullptr.
LaneWgradFn<float> find_lane_wgrad(int K, int Q, int T);

// The stages as lane_stage runs them, with their weights packed per output vector: stage s's
// block is n * K values, (n / VL) output vectors x K weight vectors (index qs * Q + d) x VL lanes.
// A is float (find_lane_stage).
template <class A>
struct LanePlan {
  struct Stage {
    int K, Q, T;                // radix, members per vector, their lane stride (Q > 1)
    int64_t t, vs, woff;        // channel stride, vector stride of a group, packed weights
    LaneStageFn<A> fn;          // the stage, its outputs stored as they are
  };
  std::vector<Stage> stages;
  A* packed = nullptr;  // (T, W), W = n * sum(K), vector-aligned in `storage`
  bool ok = false;

  LanePlan(const LanePlan&) = delete;  // `packed` points into `storage`
  LanePlan& operator=(const LanePlan&) = delete;

  LanePlan(const Plan& pl, const A* w) {
    constexpr int64_t VL = Vec<A>::lanes;
    if (pl.n % VL || pl.stages() == 0) return;
    int64_t off = 0;
    for (int s = 0; s < pl.stages(); ++s) {
      const int K = pl.radix[s];
      const int64_t t = pl.stride[s];
      if (t >= VL ? t % VL : VL % t) return;  // members neither whole vectors nor lanes apart
      const int Q = t >= VL ? 1 : (int)std::min<int64_t>(K, VL / t), T = t >= VL ? 1 : (int)t;
      if (Q > 1 && K % Q) return;
      const LaneStageFn<A> fn = find_lane_stage(K, Q, T);
      if (!fn) return;
      stages.push_back({K, Q, T, t, t >= VL ? t / VL : 1, off, fn});
      off += pl.n * K;
    }
    // aligned to the vector size: every weight vector a stage loads is one aligned load
    packed = aligned_elements(storage, pl.T * pl.W);
    each_weight(pl, [&](int64_t at, int64_t from) { packed[at] = w[from]; });
    ok = true;
  }

  // Weights packed like `packed` (e.g. their gradients) back in the plan's layout (T, W).
  void unpack(const Plan& pl, const A* from, A* to) const {
    each_weight(pl, [&](int64_t at, int64_t orig) { to[orig] = from[at]; });
  }

 private:
  std::vector<A> storage;

  // f(index in the packed weights, index in the plan's layout) for every weight: one to one
  template <class F>
  void each_weight(const Plan& pl, F&& f) const {
    constexpr int64_t VL = Vec<A>::lanes;
    for (int64_t b = 0; b < pl.T; ++b)
      for (int s = 0; s < pl.stages(); ++s) {
        const Stage& st = stages[s];
        const int K = st.K, Q = st.Q;
        const int64_t t = st.t;
        const int64_t ws = b * pl.W + pl.woff[s];  // w_s: (n / K, K, K)
        const int64_t out = b * pl.W + st.woff;
        int src[8][8];  // [i % Q][e]: the input member of weight vector e for output member i
        for (int a = 0; a < Q; ++a)
          for (int e = 0; e < K; ++e) src[a][e] = e / Q * Q + (a + e % Q) % Q;
        // channel c = (seg * K + i) * t + r, in order: lane c % VL of output vector c / VL
        int64_t c = 0;
        for (int64_t seg = 0; seg < pl.n / (K * t); ++seg)
          for (int i = 0; i < K; ++i)
            for (int64_t r = 0; r < t; ++r, ++c) {
              const int64_t j = c / VL, l = c % VL, g = seg * t + r;
              const int* si = src[i % Q];
              for (int e = 0; e < K; ++e)
                f(out + (j * K + e) * VL + l, ws + (g * K + i) * K + si[e]);
            }
      }
  }
};

// Rows of n channels in dst (ld apart): the first `count` channels of each of np rows of src
// (sld apart), then zeros.
template <class A>
inline void pad_rows(A* dst, int64_t ld, const A* src, int64_t sld, int64_t count, int64_t n,
                     int64_t np) {
  for (int64_t p = 0; p < np; ++p) {
    std::copy(src + p * sld, src + p * sld + count, dst + p * ld);
    std::fill(dst + p * ld + count, dst + p * ld + n, A(0));
  }
}

// dst[c] = src[c], or with E epi(src[c]) (channel c0 + c of the epilogue) + add[c], for c < count.
template <class A, bool E>
SIMD_INLINE void store_lanes(A* dst, const A* src, int64_t count, const Epilogue<A>* epi,
                             int64_t c0, const A* add) {
  constexpr int64_t VL = Vec<A>::lanes;
  int64_t c = 0;
  if constexpr (!E) {
    std::copy(src, src + count, dst);
    return;
  } else {
    const Epilogue<A> ep = epi->at(c0);  // a local copy: stores through dst cannot alias it
    auto vec = [&](auto swish) SIMD_INLINE_LAMBDA {
      for (; c + VL <= count; c += VL) {
        vec_t<A> v = ep.template channels<decltype(swish)::value>(vload(src + c), c);
        if (add) v += vload(add + c);
        vstore(dst + c, v);
      }
    };
    if (ep.swish) vec(std::true_type{});
    else vec(std::false_type{});
    for (; c < count; ++c) dst[c] = ep.scalar(src[c], c) + (add ? add[c] : A(0));
  }
}

// y (rows of cout) = B(x) (rows of x_row, cin channels each, or the rows `source` fills), or with
// E epi(B(x)) + add (add laid out like y, or null), for `rows` rows, with the weights w packed
// here or ahead (`packed`: LanePlan(pl, w)). Returns false, doing nothing, when the plan has a
// stage lane_stage does not run.
template <class A, bool E>
bool forward_lanes(const Plan& pl, const A* x, int64_t x_row, const A* w, A* y, int64_t rows,
                   int threads, int64_t l1_budget, bool stream, const Epilogue<A>* epi,
                   const A* add, const RowSource<A>* source = nullptr,
                   const LanePlan<A>* packed = nullptr) {
  constexpr int64_t VL = Vec<A>::lanes;
  std::optional<LanePlan<A>> own;  // packed here unless the caller packed the weights ahead
  if (!packed) packed = &own.emplace(pl, w);
  const LanePlan<A>& lp = *packed;
  if (!lp.ok) return false;
  if (source) x_row = pl.cin;
  // streaming stores need vector-aligned rows of y
  stream = stream && reinterpret_cast<uintptr_t>(y) % SIMD_VECTOR_BYTES == 0 &&
           (pl.cout * (int64_t)sizeof(A)) % SIMD_VECTOR_BYTES == 0 &&
           (pl.out_off(1) * (int64_t)sizeof(A)) % SIMD_VECTOR_BYTES == 0;
  const int64_t ld = pl.n + VL;  // a pixel's row in the buffers (padded: n * 4 is often 4 KB)
  const bool contract = !pl.expand && pl.T > 1;
  // rows per tile: l1_budget bytes of buffer, but at least 8 rows, over which a set's weights
  // are loaded once
  const int64_t tp = std::clamp<int64_t>(l1_budget / (ld * (int64_t)sizeof(A)), 8, 256);
  const int64_t ntiles = (rows + tp - 1) / tp;
  const int64_t nvec = pl.n / VL;
  // the last stage when it writes y itself, with its finishing steps
  const LaneStageFn<A> finish = find_lane_finish(lp.stages.back().K, pl.residual,
                                                 E ? form_of(*epi) : kPlain, E && add);
  if (!finish) return false;  // a combination not compiled: the tile kernels run it
  // no more threads than tiles: a thread without a tile would only add to the region's start
  par::region((int)std::min<int64_t>(threads, ntiles), [&] {
    A* in = scratch<A>(0, tp * ld);   // a block's zero-padded input rows
    A* buf = scratch<A>(1, tp * ld);  // the stages' rows
    A* acc = scratch<A>(2, contract ? tp * ld : 0);
    par::for_each<true>(ntiles, 1, [&](int64_t i) {
      const int64_t r0 = i * tp, np = std::min(tp, rows - r0);
      // the tile's input rows: x's, or a source's (cin per row)
      const A* xt = source ? source->fill(r0, np) : x + r0 * x_row;
      for (int64_t b = 0; b < pl.T; ++b) {
        // the block's input: x's rows in place, or copied with zeros up to n channels
        const int64_t valid = pl.in_rows(b), off = pl.in_off(b);
        const A* src = xt + off;
        int64_t sld = x_row;
        if (valid < pl.n) {
          if (b == 0 || !pl.expand) pad_rows(in, ld, xt + off, x_row, valid, pl.n, np);
          src = in, sld = ld;
        }
        const A* wb = lp.packed + b * pl.W;
        const int64_t out_rows = pl.out_rows(b), out_off = pl.out_off(b);
        // the last stage writes y itself when the block's n outputs are all channels of y
        const bool to_y = !contract && out_rows == pl.n;
        const size_t L = lp.stages.size();
        for (size_t s = 0; s + 1 < L; ++s)
          lp.stages[s].fn(s ? buf : src, s ? ld : sld, buf, ld, np, wb + lp.stages[s].woff, nvec,
                          lp.stages[s].vs, nullptr);
        if (to_y) {
          const Epilogue<A> block_epi = E ? epi->at(out_off) : Epilogue<A>{};
          const Finish<A> fin{pl.residual ? src : nullptr, sld, E ? &block_epi : nullptr,
                              E && add ? add + r0 * pl.cout + out_off : nullptr, pl.cout, stream};
          finish(L > 1 ? buf : src, L > 1 ? ld : sld, y + r0 * pl.cout + out_off, pl.cout, np,
                 wb + lp.stages[L - 1].woff, nvec, lp.stages[L - 1].vs, &fin);
          continue;
        }
        lp.stages[L - 1].fn(L > 1 ? buf : src, L > 1 ? ld : sld, buf, ld, np,
                            wb + lp.stages[L - 1].woff, nvec, lp.stages[L - 1].vs, nullptr);
        // the block's output rows (+ its input: the residual), into y or the sum of the blocks
        for (int64_t p = 0; p < np; ++p) {
          A* o = buf + p * ld;
          if (pl.residual)
            for (int64_t c = 0; c < pl.n; ++c) o[c] += src[p * sld + c];
          if (contract) {
            A* a = acc + p * ld;
            if (b == 0) std::copy(o, o + pl.m, a);
            else for (int64_t c = 0; c < pl.m; ++c) a[c] += o[c];
          } else {
            store_lanes<A, E>(y + (r0 + p) * pl.cout + out_off, o, out_rows, epi, out_off,
                              add ? add + (r0 + p) * pl.cout + out_off : nullptr);
          }
        }
      }
      if (contract)
        for (int64_t p = 0; p < np; ++p)
          store_lanes<A, E>(y + (r0 + p) * pl.cout, acc + p * ld, pl.m, epi, 0,
                            add ? add + (r0 + p) * pl.cout : nullptr);
    });
    if (stream) stream_fence();
  });
  return true;
}

}  // namespace bft
