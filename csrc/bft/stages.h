// The butterfly stages on rows of pixels: row c of a tile starts at base + c * ld and holds
// nv * VL pixels of channel c, so one SIMD vector is VL pixels of one channel and every stage is
// vertical FMAs with broadcast weights.
//
// Stage s (radix K, a segments, stride t): group g = seg * t + r mixes the channels
// seg * K * t + j * t + r (j < K) with its own K x K block w_s[g] (out[c_i] = sum_j w[g,i,j] in[c_j]).
//
// Forward: a *run* of consecutive stages whose radices multiply to at most 16 is applied to
// blocks of KP = prod(K) channels held in vector registers: load once, all stages of the run,
// store once. Backward: one stage at a time, accumulating the weight gradient in registers.
#pragma once

#include <array>
#include <vector>

#include "bft/epilogue.h"
#include "common/simd.h"

namespace bft {

using namespace simd;  // common/simd.h

// Rows of a tile: row c starts at base + c * ld (base == nullptr: no rows).
template <class A>
struct Rows {
  A* base = nullptr;
  int64_t ld = 0;
  A* row(int64_t c) const { return base + c * ld; }
};

template <class A>
struct RunArgs {
  Rows<const A> src;  // input rows
  Rows<A> dst;        // output rows (may equal src: in place)
  Rows<const A> res;  // rows added to the output (the residual), or none
  int64_t nv;         // pixel vectors per row
  const A* w;         // the run's weights, packed by pack_run
  int a, t;           // segments of the run's first stage, stride of its last stage
  bool stream;        // write dst with streaming stores (rows aligned to the vector size)
  // Channels-last output instead of dst (runs of VL channels at stride 1 only): the block is
  // transposed in registers and pixel q < cl_np of the tile written to cl + q * cl_ld.
  A* cl = nullptr;
  int64_t cl_ld = 0, cl_np = 0;
  // The epilogue (kernels of an epilogue form only; channels counted from dst's row 0), then
  // `add`: rows laid out like dst, or with cl pixel rows add.base + q * add.ld (base ==
  // nullptr: no add step).
  const Epilogue<A>* epi = nullptr;
  Rows<const A> add;
};

template <class A>
using RunFn = void (*)(const RunArgs<A>&);

// Block (seg, r) of a run with radices Ks holds channels seg * KP * t + b * t + r, b < KP.
// Its stage q (radix K, local stride st = product of the radices after q) has groups
// lg = ls * st + lr; their weights are packed one after the other (K x K each). E (a Form):
// kPlain, or apply the epilogue (p.epi, p.add) in that form to every output vector before its
// store.
template <class A, int E, int... Ks>
void run_fwd(const RunArgs<A>& p) {
  using V = vec_t<A>;
  constexpr int VL = Vec<A>::lanes, L = sizeof...(Ks), KP = (Ks * ...);
  static constexpr int k[L] = {Ks...};
  constexpr int per_block = KP * (Ks + ...);
  const int64_t n_end = p.nv * VL;
  const A* w = p.w;
  // a local copy: stores through d cannot alias it
  const Epilogue<A> ep = E ? *p.epi : Epilogue<A>{};
  for (int seg = 0; seg < p.a; ++seg) {
    for (int r = 0; r < p.t; ++r, w += per_block) {
      const int64_t c0 = (int64_t)seg * KP * p.t + r;
      const A* s = p.src.row(c0);
      A* d = p.dst.row(c0);
      const A* res = p.res.base ? p.res.row(c0) : nullptr;
      const int64_t ss = p.t * p.src.ld, ds = p.t * p.dst.ld, rs = p.t * p.res.ld;
      [[maybe_unused]] const A* add = E && p.add.base ? p.add.row(c0) : nullptr;
      [[maybe_unused]] const int64_t as = p.t * p.add.ld;
      // the epilogue's factors, loaded once per block: per channel b (NCHW rows), or for the
      // block's VL channels (channels-last, cl)
      [[maybe_unused]] V mul[E ? KP : 1], bias[E ? KP : 1], cl_mul{}, cl_bias{};
      if constexpr (E) {
        if (KP == VL && p.cl) {
          cl_mul = vload(ep.mul + c0), cl_bias = vload(ep.bias + c0);
        } else {
          unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA {
            mul[b] = Epilogue<A>::template splat<V>(ep.mul[c0 + b * p.t]);
            bias[b] = Epilogue<A>::template splat<V>(ep.bias[c0 + b * p.t]);
          });
        }
      }
      for (int64_t v = 0; v < n_end; v += VL) {
        V x[KP];
        unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA { x[b] = vload(s + b * ss + v); });
        const A* wq = w;
        unroll<L>([&](auto q) SIMD_INLINE_LAMBDA {
          constexpr int Q = decltype(q)::value, K = k[Q];
          constexpr int st = [] { int m = 1; for (int i = Q + 1; i < L; ++i) m *= k[i]; return m; }();
          unroll<KP / K>([&](auto lg) SIMD_INLINE_LAMBDA {
            constexpr int G = decltype(lg)::value, base = (G / st) * K * st + G % st;
            const A* wg = wq + lg * K * K;
            V o[K];
            unroll<K>([&](auto i) SIMD_INLINE_LAMBDA {
              o[i] = wg[i * K] * x[base];
              unroll<K - 1>([&](auto j) SIMD_INLINE_LAMBDA {
                o[i] += wg[i * K + j + 1] * x[base + (j + 1) * st];
              });
            });
            unroll<K>([&](auto i) SIMD_INLINE_LAMBDA { x[base + i * st] = o[i]; });
          });
          wq += KP * K;
        });
        if (res) unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA { x[b] += vload(res + b * rs + v); });
        if constexpr (KP == VL) {
          if (p.cl) {  // t == 1: x[q] is pixel v + q, channels c0 .. c0 + VL
            transpose<A>(x);
            unroll<VL>([&](auto q) SIMD_INLINE_LAMBDA {
              if (v + q >= p.cl_np) return;
              A* o = p.cl + (v + q) * p.cl_ld + c0;
              if constexpr (E) {
                x[q] = ep.template apply<E == kSwish>(x[q], cl_mul, cl_bias);
                if (p.add.base) x[q] += vload(p.add.base + (v + q) * p.add.ld + c0);
              }
              if (p.stream) vstream(o, x[q]);
              else vstore(o, x[q]);
            });
            continue;
          }
        }
        if constexpr (E) {
          unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA {
            x[b] = ep.template apply<E == kSwish>(x[b], mul[b], bias[b]);
          });
          if (add) unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA { x[b] += vload(add + b * as + v); });
        }
        if (p.stream) unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA { vstream(d + b * ds + v, x[b]); });
        else unroll<KP>([&](auto b) SIMD_INLINE_LAMBDA { vstore(d + b * ds + v, x[b]); });
      }
    }
  }
}

// A single stage of any radix (large primes), with runtime loops; E as in run_fwd.
template <class A, int E = kPlain>
void stage_fwd_any(const RunArgs<A>& p, int K) {
  using V = vec_t<A>;
  constexpr int VL = Vec<A>::lanes;
  std::vector<V> o(K);
  const Epilogue<A> ep = E ? *p.epi : Epilogue<A>{};
  const A* w = p.w;
  for (int seg = 0; seg < p.a; ++seg)
    for (int r = 0; r < p.t; ++r, w += K * K) {
      const int64_t c0 = (int64_t)seg * K * p.t + r;
      const int64_t ss = p.t * p.src.ld, ds = p.t * p.dst.ld, rs = p.t * p.res.ld;
      for (int64_t v = 0; v < p.nv * VL; v += VL) {
        for (int i = 0; i < K; ++i) {
          V acc = V{};
          for (int j = 0; j < K; ++j) acc += w[i * K + j] * vload(p.src.row(c0) + j * ss + v);
          o[i] = acc;
        }
        for (int i = 0; i < K; ++i) {
          if (p.res.base) o[i] += vload(p.res.row(c0) + i * rs + v);
          if constexpr (E) {
            o[i] = ep.template pixels<E == kSwish>(o[i], c0 + i * p.t);
            if (p.add.base) o[i] += vload(p.add.row(c0) + i * p.t * p.add.ld + v);
          }
          vstore(p.dst.row(c0) + i * ds + v, o[i]);
        }
      }
    }
}

// The runs with a compiled kernel (float64, used mostly for testing, gets single stages only, to
// keep the build short); any other radix runs alone through stage_fwd_any.
#define BFT_SINGLE_STAGES(X) X(2) X(3) X(4) X(5) X(8)
#define BFT_FUSED_RUNS(X)                                                                      \
  X(2, 2) X(2, 3) X(3, 2) X(2, 4) X(4, 2) X(3, 3) X(2, 5) X(5, 2) X(3, 4) X(4, 3) X(4, 4)       \
  X(3, 5) X(5, 3) X(8, 2) X(2, 8) X(2, 2, 2) X(2, 2, 3) X(2, 2, 4) X(4, 2, 2) X(2, 2, 2, 2)

template <class A>
struct RunKernel {
  std::array<int, 4> radices;
  int len;
  RunFn<A> fn;
};

// The kernels of form E (see Form). Each table is compiled in a translation unit of its own
// (bft_runs.cpp: the plain kernels; bft_runs_clamp.cpp, bft_runs_swish.cpp: the epilogue's
// forms), in parallel; elsewhere it is only looked up (the extern declarations below).
template <class A, int E = kPlain>
const std::vector<RunKernel<A>>& run_kernels() {
#define BFT_ENTRY(...)                                                                \
  RunKernel<A>{{__VA_ARGS__}, (int)std::initializer_list<int>{__VA_ARGS__}.size(), \
               &run_fwd<A, E, __VA_ARGS__>},
  if constexpr (std::is_same_v<A, double>) {
    static const std::vector<RunKernel<A>> table{BFT_SINGLE_STAGES(BFT_ENTRY)};
    return table;
  } else {
    static const std::vector<RunKernel<A>> table{
        BFT_SINGLE_STAGES(BFT_ENTRY) BFT_FUSED_RUNS(BFT_ENTRY)};
    return table;
  }
#undef BFT_ENTRY
}

#define BFT_RUN_TABLE(A, E) const std::vector<RunKernel<A>>& run_kernels<A, E>();
#define BFT_EXTERN_RUN_TABLES(E) \
  extern template BFT_RUN_TABLE(float, E) extern template BFT_RUN_TABLE(double, E)
BFT_EXTERN_RUN_TABLES(kPlain)
BFT_EXTERN_RUN_TABLES(kClamp)
BFT_EXTERN_RUN_TABLES(kSwish)
#undef BFT_EXTERN_RUN_TABLES

// The compiled kernel of form E for exactly these radices, or nullptr.
template <class A, int E = kPlain>
RunFn<A> find_run(const int* radices, int len) {
  for (const auto& e : run_kernels<A, E>())
    if (e.len == len && std::equal(radices, radices + len, e.radices.begin())) return e.fn;
  return nullptr;
}

// Copies the weights of the run of stages [s0, s0 + len) into the order run_fwd reads them.
// stage_w[q] points at the (n / k, k, k) weights of stage s0 + q; `a` segments of the first
// stage, `t` stride of the last.
template <class A>
void pack_run(const A* const* stage_w, const int* k, int len, int a, int t, A* out) {
  int KP = 1;
  for (int q = 0; q < len; ++q) KP *= k[q];
  for (int seg = 0; seg < a; ++seg)
    for (int r = 0; r < t; ++r)
      for (int q = 0; q < len; ++q) {
        int st = 1;
        for (int i = q + 1; i < len; ++i) st *= k[i];
        const int sa = KP / (k[q] * st), K = k[q];
        for (int lg = 0; lg < sa * st; ++lg) {
          const int64_t g = ((int64_t)seg * sa + lg / st) * st * t + (int64_t)(lg % st) * t + r;
          std::memcpy(out, stage_w[q] + g * K * K, sizeof(A) * K * K);
          out += K * K;
        }
      }
}

template <class A>
struct BwdArgs {
  Rows<const A> g;    // gradient of the stage's output
  Rows<A> out;        // gradient of the stage's input (may equal g)
  Rows<const A> act;  // the stage's input
  Rows<const A> res;  // rows added to out (the residual), or none
  int64_t nv;
  const A* w;  // the stage's (n / K, K, K) weights
  A* gw;       // where its weight gradient accumulates
  int a, t;
  bool stream;  // write out with streaming stores (rows aligned to the vector size)
};

// Backward of one stage: gw[g, i, j] += sum_p g[c_i] act[c_j]; out[c_j] = sum_i w[g, i, j] g[c_i].
template <class A, int K>
void stage_bwd(const BwdArgs<A>& p) {
  using V = vec_t<A>;
  constexpr int VL = Vec<A>::lanes;
  const int64_t n_end = p.nv * VL;
  for (int seg = 0; seg < p.a; ++seg) {
    for (int r = 0; r < p.t; ++r) {
      const int64_t grp = (int64_t)seg * p.t + r, c0 = (int64_t)seg * K * p.t + r;
      const A* wg = p.w + grp * K * K;
      const A* gs = p.g.row(c0);
      const A* xs = p.act.row(c0);
      A* os = p.out.row(c0);
      const A* res = p.res.base ? p.res.row(c0) : nullptr;
      const int64_t gst = p.t * p.g.ld, xst = p.t * p.act.ld, ost = p.t * p.out.ld,
                    rst = p.t * p.res.ld;
      V acc[K * K];
      unroll<K * K>([&](auto e) SIMD_INLINE_LAMBDA { acc[e] = V{}; });
      for (int64_t v = 0; v < n_end; v += VL) {
        V gi[K], xj[K];
        unroll<K>([&](auto j) SIMD_INLINE_LAMBDA {
          gi[j] = vload(gs + j * gst + v);
          xj[j] = vload(xs + j * xst + v);
        });
        unroll<K * K>([&](auto e) SIMD_INLINE_LAMBDA { acc[e] += gi[e / K] * xj[e % K]; });
        unroll<K>([&](auto j) SIMD_INLINE_LAMBDA {
          V o = wg[j] * gi[0];
          unroll<K - 1>([&](auto i) SIMD_INLINE_LAMBDA { o += wg[(i + 1) * K + j] * gi[i + 1]; });
          if (res) o += vload(res + j * rst + v);
          if (p.stream) vstream(os + j * ost + v, o);
          else vstore(os + j * ost + v, o);
        });
      }
      add_lane_sums<A, K * K>(acc, p.gw + grp * K * K);
    }
  }
}

template <class A>
void stage_bwd_any(const BwdArgs<A>& p, int K) {
  using V = vec_t<A>;
  constexpr int VL = Vec<A>::lanes;
  std::vector<V> o(K);
  for (int seg = 0; seg < p.a; ++seg)
    for (int r = 0; r < p.t; ++r) {
      const int64_t grp = (int64_t)seg * p.t + r, c0 = (int64_t)seg * K * p.t + r;
      const A* wg = p.w + grp * K * K;
      const int64_t gst = p.t * p.g.ld, xst = p.t * p.act.ld, ost = p.t * p.out.ld,
                    rst = p.t * p.res.ld;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          V acc = V{};
          for (int64_t v = 0; v < p.nv * VL; v += VL)
            acc += vload(p.g.row(c0) + i * gst + v) * vload(p.act.row(c0) + j * xst + v);
          add_lane_sums<A, 1>(&acc, p.gw + grp * K * K + i * K + j);
        }
      for (int64_t v = 0; v < p.nv * VL; v += VL) {
        for (int j = 0; j < K; ++j) {
          V acc = V{};
          for (int i = 0; i < K; ++i) acc += wg[i * K + j] * vload(p.g.row(c0) + i * gst + v);
          if (p.res.base) acc += vload(p.res.row(c0) + j * rst + v);
          o[j] = acc;
        }
        for (int j = 0; j < K; ++j) vstore(p.out.row(c0) + j * ost + v, o[j]);
      }
    }
}

template <class A>
void stage_backward(const BwdArgs<A>& p, int K) {
  switch (K) {
    case 2: return stage_bwd<A, 2>(p);
    case 3: return stage_bwd<A, 3>(p);
    case 4: return stage_bwd<A, 4>(p);
    case 5: return stage_bwd<A, 5>(p);
    case 8: return stage_bwd<A, 8>(p);
    default: return stage_bwd_any(p, K);
  }
}

}  // namespace bft
