// The fused BFT operator's kernel on CPU tensors (no PyTorch types here; bft/bft_cpu.cpp binds it).
//
// x is (B, C_in, P): NCHW for P > 1, channels-last / linear rows for P == 1. Each tile (see
// Tiling) is computed block by block in per-thread buffers that stay in cache: all stages run
// there and the result is written once. NCHW body tiles in the compute dtype are read and
// written in place by the first and last runs (no copy). Outputs too large for the cache are
// written with streaming stores. Tiles go to threads dynamically (a thread the OS preempts
// holds up one tile, not a share). Weight gradients: one partial per chunk of tiles (a fixed
// number of chunks, whatever the thread count or schedule), reduced in chunk order: the same
// inputs give bit-identical gradients.
#pragma once

#include "common/openmp.h"

#include <algorithm>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bft/lanes.h"
#include "bft/lanes_backward.h"
#include "bft/stages.h"
#include "bft/tiles.h"

// The (input, compute) dtype pairs of the kernels, X(S, A): what binding.h's dispatch calls, and
// what the kernels' translation units compile (they include c10's BFloat16 and Half).
#define BFT_DTYPES(X) X(float, float) X(double, double) X(c10::BFloat16, float) X(c10::Half, float)

namespace bft {

// The forward stages grouped into runs, each with its kernel and packed weights.
template <class A>
struct Runs {
  struct Run {
    int s0, len, K;  // first stage, number of stages, radix (len == 1 without a kernel)
    int channels;    // product of its radices: the channels of one block
    RunFn<A> fn;     // nullptr: stage_fwd_any
    RunFn<A> epi_fn[2];  // fn with the epilogue, clamp and swish form (see Form)
    int64_t woff;    // offset of the packed weights in a block's W weights
  };
  std::vector<Run> runs;
  std::vector<A> packed;  // (T, W)

  // Splits the stages into as few runs as possible and, among those splits, maximises the
  // smallest run's channel count (a lone radix-2 stage does 2 FMAs per load: the weakest). Among
  // equals, the longest runs come first: the last run writes the output, and the fewer rows it
  // writes at once (fewer streams to memory), the faster. With `cl_output` (channels-last tiles)
  // a split whose last run has VL channels wins instead: that run transposes its blocks straight
  // into y, saving the store and reload of a buffered tile.
  // `epilogue`: also look up the kernels with an epilogue (apply<true>).
  Runs(const Plan& pl, const A* w, int max_len, bool cl_output, bool epilogue = false) {
    const int L = pl.stages();
    std::vector<int> next = split(pl, max_len, true);
    if (cl_output && last_channels(pl, next) != Vec<A>::lanes) {
      std::vector<int> other = split(pl, max_len, false);
      if (last_channels(pl, other) == Vec<A>::lanes) next = other;
    }
    int64_t off = 0;
    for (int s = 0; s < L; s += next[s]) {
      const int len = next[s];
      int channels = 1;
      for (int q = 0; q < len; ++q) channels *= pl.radix[s + q];
      runs.push_back({s, len, pl.radix[s], channels, find_run<A>(&pl.radix[s], len),
                      {epilogue ? find_run<A, kClamp>(&pl.radix[s], len) : nullptr,
                       epilogue ? find_run<A, kSwish>(&pl.radix[s], len) : nullptr},
                      off});
      for (int q = 0; q < len; ++q) off += pl.n * pl.radix[s + q];
    }
    packed.resize((size_t)(pl.T * pl.W));
    for (int64_t t = 0; t < pl.T; ++t)
      for (const Run& r : runs) {
        const A* stage_w[4];
        for (int q = 0; q < r.len; ++q) stage_w[q] = w + t * pl.W + pl.woff[r.s0 + q];
        pack_run(stage_w, &pl.radix[r.s0], r.len, pl.segs[r.s0], pl.stride[r.s0 + r.len - 1],
                 packed.data() + t * pl.W + r.woff);
      }
  }

  // next[s]: length of the run starting at stage s, for the best split (see Runs()); ties go to
  // the longest first run, or the shortest.
  static std::vector<int> split(const Plan& pl, int max_len, bool longest_first) {
    const int L = pl.stages();
    // best[s] = (runs, smallest product) for stages s..L-1
    std::vector<std::pair<int, int>> best(L + 1, {0, 1 << 30});
    std::vector<int> next(L + 1, 1);
    for (int s = L - 1; s >= 0; --s) {
      best[s] = {1 << 30, 0};
      for (int len = 1, prod = 1; len <= std::min(max_len, L - s); ++len) {
        prod *= pl.radix[s + len - 1];
        if (len > 1 && (prod > 16 || !find_run<A>(&pl.radix[s], len))) continue;
        const std::pair<int, int> cand{best[s + len].first + 1,
                                       std::min(prod, best[s + len].second)};
        if (cand.first < best[s].first ||
            (cand.first == best[s].first &&
             (longest_first ? cand.second >= best[s].second : cand.second > best[s].second)))
          best[s] = cand, next[s] = len;
      }
    }
    return next;
  }
  // channels of the last run of a split
  static int last_channels(const Plan& pl, const std::vector<int>& next) {
    int last = 0;
    for (int s = 0; s < pl.stages(); s += next[s]) last = s;
    int channels = 1;
    for (int q = last; q < pl.stages(); ++q) channels *= pl.radix[q];
    return channels;
  }

  // Whether the last run can write channels-last rows itself (RunArgs::cl).
  bool writes_channels_last() const {
    return !runs.empty() && runs.back().fn && runs.back().channels == Vec<A>::lanes;
  }

  // Block t: out = B(src) + res. The first run reads src, the last writes out (adding res), or
  // the channels-last rows `cl` when given (see writes_channels_last), the others work in place
  // in mid. E and `epi`: the last run applies the epilogue and adds `add` (laid out like out, or
  // like cl, or none) before its store: out (or cl) is then the final output.
  template <bool E = false>
  void apply(const Plan& pl, int64_t t, Rows<const A> src, Rows<A> mid, Rows<A> out,
             Rows<const A> res, int64_t nv, bool stream, A* cl = nullptr, int64_t cl_ld = 0,
             int64_t cl_np = 0, const Epilogue<A>* epi = nullptr, Rows<const A> add = {}) const {
    if (runs.empty()) {  // n == 1: the identity
      for (int64_t c = 0; c < pl.n; ++c)
        for (int64_t p = 0; p < nv * Vec<A>::lanes; ++p) {
          A v = src.row(c)[p] + (res.base ? res.row(c)[p] : A(0));
          if constexpr (E)
            if (epi) v = epi->scalar(v, c) + (add.base ? add.row(c)[p] : A(0));
          out.row(c)[p] = v;
        }
      return;
    }
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& r = runs[i];
      const bool last = i + 1 == runs.size();
      RunArgs<A> args{i == 0 ? src : Rows<const A>{mid.base, mid.ld}, last ? out : mid,
                      last ? res : Rows<const A>{}, nv, packed.data() + t * pl.W + r.woff,
                      pl.segs[r.s0], pl.stride[r.s0 + r.len - 1], last && stream};
      if (last && cl) args.cl = cl, args.cl_ld = cl_ld, args.cl_np = cl_np;
      if (E && last && epi) {
        args.epi = epi, args.add = add;
        const int form = form_of(*epi);
        if (r.epi_fn[form - 1]) r.epi_fn[form - 1](args);
        else if (form == kSwish) stage_fwd_any<A, kSwish>(args, r.K);
        else stage_fwd_any<A, kClamp>(args, r.K);
      } else if (r.fn) {
        r.fn(args);
      } else {
        stage_fwd_any(args, r.K);
      }
    }
  }
};

struct Options {
  int threads = 1;
  int max_run = 4;                        // stages fused per run (1: stage by stage)
  int64_t fwd_budget = 512 * 1024;        // bytes of the forward tile buffers
  int64_t bwd_budget = 1536 * 1024;       // bytes of the backward tile buffers
  int64_t l1_budget = 16 * 1024;          // bytes of a channels-as-lanes tile (bft/lanes.h)
  bool lanes = true;                      // P == 1: the channels-as-lanes kernel when it applies
  int64_t fwd_cap = 4096, bwd_cap = 512;  // most pixels per tile
  int64_t stream_bytes = 8 << 20;         // outputs at least this large bypass the caches
  bool direct = true;                     // runs read x / write y in place when possible
  int64_t x_row_stride = 0;               // P == 1: elements between rows of x (0: C_in)
  // float32 rows: the plan's weights packed ahead for the channels-as-lanes kernel (a
  // LanePlan<float> of these weights, kept by a prepared layer), or null: packed per call
  const LanePlan<float>* lane_plan = nullptr;
};

// y = B(x), or with E (the fused forward) y = epi(B(x)) + add (add: laid out like y, or null).
// The epilogue is applied where the output is stored: by the last run when it writes y itself
// (NCHW rows in place, channels-last rows transposed in registers), otherwise by the store of
// the buffered tile (after the blocks' sum, or of all gathered blocks). Without E (the plain
// forward) none of this is compiled in. With `src` (P == 1, S == A; x unused) the tiles' rows
// come from src instead of x.
template <class S, class A, bool E = false>
void forward_impl(const Plan& pl, const S* x, const A* w, S* y, int64_t B, int64_t P,
                  const Options& opt, const Epilogue<A>* epi = nullptr, const S* add = nullptr,
                  const RowSource<A>* src = nullptr) {
  constexpr int64_t VL = Vec<A>::lanes;
  constexpr bool same = std::is_same_v<S, A>;
  if (B * P == 0) return;
  if (src && (P != 1 || !same)) throw std::invalid_argument("a RowSource needs P == 1, S == A");
  // the last run may write y rows itself when they are vector-aligned
  const bool aligned_rows = reinterpret_cast<uintptr_t>(y) % SIMD_VECTOR_BYTES == 0 &&
                            (P * (int64_t)sizeof(S)) % SIMD_VECTOR_BYTES == 0;
  // y too large to stay in cache (and already in memory): write it with streaming stores, but
  // not NCHW rows that are not vector-aligned: those would go through a buffered copy instead of
  // being written by the last run, which costs more than streaming saves
  const int64_t ybytes = B * pl.cout * P * (int64_t)sizeof(S);
  const bool stream = same && ybytes >= opt.stream_bytes && (P == 1 || aligned_rows) &&
                      pages_resident(y, ybytes);
  // rows of channels in float32: the channels-as-lanes kernel, when it runs the plan
  if constexpr (same && std::is_same_v<A, float>)
    if (P == 1 && opt.lanes &&
        forward_lanes<A, E>(pl, x, opt.x_row_stride ? opt.x_row_stride : pl.cin, w, y, B,
                            opt.threads, opt.l1_budget, stream, epi, add, src, opt.lane_plan))
      return;
  // NCHW tiles in the compute dtype read x in place: only the output buffer is in use; a
  // source's rows (cin per pixel) stay in cache too
  const int64_t rows = (same && P > 1 && opt.direct ? 1 : 2) * pl.n + (src ? pl.cin : 0);
  const Tiling tl = make_tiling<A>(B, P, rows, opt.fwd_budget, opt.fwd_cap, opt.threads);
  const int64_t ld = padded_ld<A>(tl.tp);
  const bool sum_blocks = !pl.expand && pl.T > 1;
  const Runs<A> runs(pl, w, opt.max_run, same && P == 1, E);
  const int64_t xcs = tl.cs(pl.cin), ycs = tl.cs(pl.cout);
  // P == 1: the row stride of x (tl.offset and tl.ps take it in place of the channel count)
  const int64_t xrow = P == 1 && opt.x_row_stride ? opt.x_row_stride : pl.cin;
  // channels-last pixel rows of y whose blocks of VL channels are vector-aligned
  const bool cl_aligned = reinterpret_cast<uintptr_t>(y) % SIMD_VECTOR_BYTES == 0 &&
                          (pl.cout * (int64_t)sizeof(S)) % SIMD_VECTOR_BYTES == 0;
  par::region((int)std::min<int64_t>(opt.threads, tl.ntiles), [&] {
    A* ubuf = scratch<A>(0, pl.n * ld);  // the block's input
    A* buf = scratch<A>(1, pl.n * ld);   // its output
    A* acc = scratch<A>(2, sum_blocks ? pl.m * ld : 0);
    // expanding blocks of a buffered tile: all outputs, stored together (whole rows of y)
    A* gathered = scratch<A>(3, pl.expand && pl.T > 1 ? ((pl.T - 1) * pl.m + pl.n) * ld : 0);
    par::for_each(tl.ntiles, 1, [&](int64_t i) {
      const int64_t lw = (tl.used(i) + VL - 1) / VL * VL, nv = lw / VL;
      // NCHW body tiles in the compute dtype: whole vectors, read and written in place
      const bool fast = opt.direct && same && P > 1 && tl.body(i);
      const bool gather = pl.expand && pl.T > 1 && !fast;
      const Segment s0 = tl.first(i);  // the only segment of a body tile
      const A* sx = src ? src->fill(s0.p0, s0.np) : nullptr;  // P == 1: the tile's rows
      for (int64_t t = 0; t < pl.T; ++t) {
        Rows<const A> in{ubuf, ld};
        const int64_t xoff = tl.offset(s0, pl.cin) + pl.in_off(t) * xcs;
        if (fast && pl.in_rows(t) == pl.n) {
          in = {reinterpret_cast<const A*>(x + xoff), xcs};
        } else if (t > 0 && pl.expand) {  // expanding blocks all read the same input
        } else if (sx) {
          load_rows(ubuf, ld, sx + pl.in_off(t), pl.in_rows(t), 1, pl.cin, s0.np);
          zero_rest(ubuf, ld, pl.n, pl.in_rows(t), s0.np, lw);
        } else {
          load_tile(ubuf, ld, pl.n, lw, tl, i, x, xrow, pl.in_off(t), pl.in_rows(t));
        }
        const bool to_y =
            fast && pl.out_rows(t) == pl.n && !sum_blocks && (aligned_rows || !stream);
        // channels-last: the last run transposes its blocks straight into y's pixel rows
        const bool to_cl = same && P == 1 && !fast && !sum_blocks && !gather &&
                           pl.out_rows(t) == pl.n && runs.writes_channels_last();
        const int64_t yoff = tl.offset(s0, pl.cout) + pl.out_off(t) * ycs;
        Rows<A> out = to_y     ? Rows<A>{reinterpret_cast<A*>(y + yoff), ycs}
                      : gather ? Rows<A>{gathered + pl.out_off(t) * ld, ld}  // padding rows are
                               : Rows<A>{buf, ld};                          // overwritten next
        // E, y written by the last run (to_y, to_cl): the epilogue is applied there, from block
        // t's first output channel, adding the rows of `add` laid out like those of y; a block
        // written into a buffer gets it from the store of the buffer, below
        const Epilogue<A> block_epi = E ? epi->at(pl.out_off(t)) : Epilogue<A>{};
        const Epilogue<A>* run_epi = E && (to_y || to_cl) ? &block_epi : nullptr;
        const A* run_add =
            E && add && (to_y || to_cl) ? reinterpret_cast<const A*>(add + yoff) : nullptr;
        if (to_cl) {  // P == 1: y + yoff is the tile's first pixel row
          runs.template apply<E>(pl, t, in, Rows<A>{buf, ld}, out,
                                 pl.residual ? in : Rows<const A>{}, nv, stream && cl_aligned,
                                 reinterpret_cast<A*>(y + yoff), pl.cout, s0.np, run_epi,
                                 Rows<const A>{run_add, pl.cout});
          continue;
        }
        runs.template apply<E>(pl, t, in, Rows<A>{buf, ld}, out,
                               pl.residual ? in : Rows<const A>{}, nv, to_y && stream, nullptr, 0,
                               0, run_epi, Rows<const A>{run_add, ycs});
        if (to_y || gather) continue;
        if (sum_blocks) copy_rows(acc, ld, buf, ld, pl.m, lw, t > 0);
        else store_tile<E>(y, pl.cout, pl.out_off(t), pl.out_rows(t), tl, i, buf, ld, stream, epi,
                           add);
      }
      // contracting blocks: the epilogue applies to their sum
      if (sum_blocks) store_tile<E>(y, pl.cout, 0, pl.m, tl, i, acc, ld, stream, epi, add);
      if (gather) store_tile<E>(y, pl.cout, 0, pl.cout, tl, i, gathered, ld, stream, epi, add);
    });
    stream_fence();
  });
}

// forward_impl with the epilogue (E = true): compiled in bft_cpu_fused.cpp, for the (S, A) of
// BFT_DTYPES.
template <class S, class A>
void forward_fused_impl(const Plan& pl, const S* x, const A* w, S* y, int64_t B, int64_t P,
                        const Options& opt, const Epilogue<A>& epi, const S* add,
                        const RowSource<A>* src = nullptr);

template <class S, class A>
void backward_impl(const Plan& pl, const S* grad, const S* x, const A* w, S* gx, A* gw,
                   int64_t B, int64_t P, const Options& opt) {
  constexpr int64_t VL = Vec<A>::lanes;
  constexpr bool same = std::is_same_v<S, A>;
  const int L = pl.stages();
  if (B * P == 0) return (void)std::fill(gw, gw + pl.T * pl.W, A(0));
  // rows of channels in float32: the channels-as-lanes backward, when it runs the plan
  if constexpr (same && std::is_same_v<A, float>)
    if (P == 1 && opt.lanes && backward_lanes(pl, grad, x, w, gx, gw, B, opt.threads,
                                              opt.l1_budget))
      return;
  // tiles cut for the machine's processor count, not opt.threads: the weight-gradient partials
  // follow the tiles, and the same inputs must give the same gradients on any number of threads
  static const int procs = (int)std::max(1u, std::thread::hardware_concurrency());
  const Tiling tl = make_tiling<A>(B, P, pl.n * (L + 2), opt.bwd_budget, opt.bwd_cap, procs);
  const int64_t ld = padded_ld<A>(tl.tp), slot = pl.n * ld;
  const bool sum_blocks = pl.expand && pl.T > 1;  // grad_x sums over the blocks
  const int64_t xcs = tl.cs(pl.cin), ycs = tl.cs(pl.cout);
  const int64_t gxbytes = B * pl.cin * P * (int64_t)sizeof(S);
  const bool aligned_rows = reinterpret_cast<uintptr_t>(gx) % SIMD_VECTOR_BYTES == 0 &&
                            (P * (int64_t)sizeof(S)) % SIMD_VECTOR_BYTES == 0;
  // as in forward_impl: unaligned NCHW rows are written in place, without streaming stores
  const bool stream = same && gxbytes >= opt.stream_bytes && (P == 1 || aligned_rows) &&
                      pages_resident(gx, gxbytes);
  // weight-gradient partials: chunk c owns tiles [c * per, (c + 1) * per)
  const int64_t chunks = std::min<int64_t>(tl.ntiles, 32), gwn = pl.T * pl.W;
  const int64_t per = chunks ? (tl.ntiles + chunks - 1) / chunks : 0;
  std::vector<A> partial((size_t)std::max<int64_t>(chunks, 1) * gwn, A(0));
  std::vector<RunFn<A>> stage_fn(L);  // the forward of every stage alone (nullptr: any radix)
  for (int s = 0; s < L; ++s) stage_fn[s] = find_run<A>(&pl.radix[s], 1);
  par::region((int)std::min<int64_t>(opt.threads, chunks), [&] {
    A* acts = scratch<A>(0, std::max(L, 1) * slot);  // the input of every stage
    A* gbuf = scratch<A>(1, slot);                    // the incoming gradient
    A* work = scratch<A>(2, slot);                    // the gradient between stages
    A* acc = scratch<A>(3, sum_blocks ? pl.m * ld : 0);
    auto tile = [&](A* gwc, int64_t i) {
      const int64_t lw = (tl.used(i) + VL - 1) / VL * VL, nv = lw / VL;
      const bool fast = opt.direct && same && P > 1 && tl.body(i);
      const Segment s0 = tl.first(i);  // the only segment of a body tile
      for (int64_t t = 0; t < pl.T; ++t) {
        const A* wt = w + t * pl.W;
        const int64_t xoff = tl.offset(s0, pl.cin) + pl.in_off(t) * xcs;
        const int64_t goff = tl.offset(s0, pl.cout) + pl.out_off(t) * ycs;
        auto act = [&](int s) { return Rows<const A>{acts + s * slot, ld}; };
        Rows<const A> act0 = act(0);  // stage inputs, recomputed
        if (fast && pl.in_rows(t) == pl.n) act0 = {reinterpret_cast<const A*>(x + xoff), xcs};
        else if (L > 0) load_tile(acts, ld, pl.n, lw, tl, i, x, pl.cin, pl.in_off(t), pl.in_rows(t));
        for (int s = 0; s + 1 < L; ++s) {
          RunArgs<A> args{s ? act(s) : act0, Rows<A>{acts + (s + 1) * slot, ld}, Rows<const A>{},
                          nv, wt + pl.woff[s], pl.segs[s], pl.stride[s], false};
          if (stage_fn[s]) stage_fn[s](args);
          else stage_fwd_any(args, pl.radix[s]);
        }
        Rows<const A> gin{gbuf, ld};
        if (fast && pl.out_rows(t) == pl.n) gin = {reinterpret_cast<const A*>(grad + goff), ycs};
        else load_tile(gbuf, ld, pl.n, lw, tl, i, grad, pl.cout, pl.out_off(t), pl.out_rows(t));
        const bool to_gx =
            fast && pl.in_rows(t) == pl.n && !sum_blocks && (aligned_rows || !stream);
        const Rows<A> out = to_gx ? Rows<A>{reinterpret_cast<A*>(gx + xoff), xcs} : Rows<A>{work, ld};
        const Rows<const A> res = pl.residual ? gin : Rows<const A>{};
        for (int64_t p = 0; L == 0 && p < lw; ++p)  // n == 1: the identity
          out.row(0)[p] = gin.row(0)[p] + (res.base ? res.row(0)[p] : A(0));
        for (int s = L - 1; s >= 0; --s) {
          BwdArgs<A> args{s == L - 1 ? gin : Rows<const A>{work, ld}, s == 0 ? out : Rows<A>{work, ld},
                          s ? act(s) : act0, s == 0 ? res : Rows<const A>{}, nv, wt + pl.woff[s],
                          gwc + t * pl.W + pl.woff[s], pl.segs[s], pl.stride[s],
                          s == 0 && to_gx && stream};
          stage_backward(args, pl.radix[s]);
        }
        if (to_gx) continue;
        if (sum_blocks) copy_rows(acc, ld, work, ld, pl.m, lw, t > 0);
        else store_tile(gx, pl.cin, pl.in_off(t), pl.in_rows(t), tl, i, work, ld, stream);
      }
      if (sum_blocks) store_tile(gx, pl.cin, 0, pl.m, tl, i, acc, ld, stream);
    };
    par::for_each(chunks, 1, [&](int64_t c) {
      for (int64_t i = c * per; i < std::min(tl.ntiles, (c + 1) * per); ++i)
        tile(partial.data() + c * gwn, i);
    });
    stream_fence();
  });
  // fixed-order reduction of the chunk partials
  par::region(gwn * chunks >= (1 << 18) ? opt.threads : 1, [&] {
    par::for_each<true>(gwn, 1, [&](int64_t e) {
      A s = chunks ? partial[e] : A(0);
      for (int64_t c = 1; c < chunks; ++c) s += partial[c * gwn + e];
      gw[e] = s;
    });
  });
}

}  // namespace bft
