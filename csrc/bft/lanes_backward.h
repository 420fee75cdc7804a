// The backward of the channels-as-lanes forward (bft/lanes.h) on rows of channels: input and
// weight gradients without transposes. Per tile of rows, the stage inputs are recomputed into
// L1/L2-sized buffers; then, last stage first, each stage's weight gradient (lane_wgrad: per
// lane, in registers over the tile) and its input gradient, which is the stage itself with every
// group's K x K matrix transposed (lane_stage on transposed weights, packed by a second
// LanePlan).
#pragma once

#include <algorithm>
#include <vector>

#include "bft/lanes.h"

namespace bft {

// gx (rows of cin) and gw (T, W) for y = B(x) (forward_lanes without an epilogue) from gy (rows
// of cout) and x (rows of cin), for `rows` rows. The weight gradients of a chunk of tiles are
// summed in a partial of its own and the partials in chunk order; the tiles do not depend on the
// thread count, so neither do the gradients, bit for bit. Returns false, doing nothing, when the
// plan has a stage lane_stage does not run.
template <class A>
bool backward_lanes(const Plan& pl, const A* gy, const A* x, const A* w, A* gx, A* gw,
                    int64_t rows, int threads, int64_t l1_budget) {
  constexpr int64_t VL = Vec<A>::lanes;
  const int L = pl.stages();
  if (rows <= 0) return false;
  const LanePlan<A> fwd(pl, w);
  if (!fwd.ok) return false;
  std::vector<LaneWgradFn<A>> wgrad(L);
  for (int s = 0; s < L; ++s) {
    const auto& st = fwd.stages[s];
    if (!(wgrad[s] = find_lane_wgrad(st.K, st.Q, st.T))) return false;
  }
  // every group's matrix transposed: w_s[g, i, k] -> w_s[g, k, i]
  std::vector<A> wt((size_t)(pl.T * pl.W));
  for (int64_t b = 0; b < pl.T; ++b)
    for (int s = 0; s < L; ++s) {
      const int64_t K = pl.radix[s], off = b * pl.W + pl.woff[s];
      for (int64_t g = 0; g < pl.n / K; ++g)
        for (int64_t i = 0; i < K; ++i)
          for (int64_t k = 0; k < K; ++k)
            wt[off + (g * K + k) * K + i] = w[off + (g * K + i) * K + k];
    }
  const LanePlan<A> bwd(pl, wt.data());
  const int64_t ld = pl.n + VL;  // a row in the buffers, as in forward_lanes
  const int64_t tp = std::clamp<int64_t>(l1_budget / (ld * (int64_t)sizeof(A)), 8, 256);
  const int64_t ntiles = (rows + tp - 1) / tp, nvec = pl.n / VL, gwn = pl.T * pl.W;
  const int64_t chunks = std::min<int64_t>(ntiles, 32), per = (ntiles + chunks - 1) / chunks;
  const bool sum_blocks = pl.expand && pl.T > 1;  // gx sums the blocks' input gradients
  // the packed weight gradients of each chunk, vector-aligned
  constexpr int64_t align = SIMD_VECTOR_BYTES / (int64_t)sizeof(A);
  const int64_t pitch = (gwn + align - 1) / align * align;
  std::vector<A> storage;
  A* partial = aligned_elements(storage, chunks * pitch);
  par::region((int)std::min<int64_t>(threads, chunks), [&] {
    A* acts = scratch<A>(0, std::max(L - 1, 1) * tp * ld);  // the inputs of stages 1 .. L - 1
    A* in = scratch<A>(1, tp * ld);    // a block's zero-padded input rows
    A* gin = scratch<A>(2, tp * ld);   // a block's zero-padded output gradient
    A* work = scratch<A>(3, tp * ld);  // the gradient between stages
    A* acc = scratch<A>(4, sum_blocks ? tp * ld : 0);
    auto act = [&](int s) { return acts + (s - 1) * tp * ld; };
    auto tile = [&](A* dw, int64_t r0, int64_t np) {
      const A* xt = x + r0 * pl.cin;
      const A* gt = gy + r0 * pl.cout;
      // the next tile's rows of x and gy, into L2 while this one computes
      const int64_t next = std::min(tp, rows - r0 - np);
      if (next > 0) {
        prefetch_bytes(xt + np * pl.cin, next * pl.cin * (int64_t)sizeof(A), false);
        prefetch_bytes(gt + np * pl.cout, next * pl.cout * (int64_t)sizeof(A), false);
      }
      for (int64_t b = 0; b < pl.T; ++b) {
        // the block's input: x's rows in place, or copied with zeros up to n channels
        const int64_t valid = pl.in_rows(b), off = pl.in_off(b);
        const A* src = xt + off;
        int64_t sld = pl.cin;
        if (valid < pl.n) {
          if (b == 0 || !pl.expand) pad_rows(in, ld, xt + off, pl.cin, valid, pl.n, np);
          src = in, sld = ld;
        }
        const A* wb = fwd.packed + b * pl.W;
        for (int s = 0; s + 1 < L; ++s)
          fwd.stages[s].fn(s ? act(s) : src, s ? ld : sld, act(s + 1), ld, np,
                           wb + fwd.stages[s].woff, nvec, fwd.stages[s].vs, nullptr);
        // the block's output gradient: gy's rows in place, or copied with zeros
        const int64_t out_rows = pl.out_rows(b), out_off = pl.out_off(b);
        const A* g = gt + out_off;
        int64_t gld = pl.cout;
        if (out_rows < pl.n) {
          pad_rows(gin, ld, g, gld, out_rows, pl.n, np);
          g = gin, gld = ld;
        }
        // the last stage's input gradient goes straight into gx's rows when they are the
        // block's n input rows
        const bool to_gx = pl.T == 1 && valid == pl.n;
        A* dx = to_gx ? gx + r0 * pl.cin : work;
        const int64_t dxld = to_gx ? pl.cin : ld;
        const A* gs = g;
        int64_t gsld = gld;
        const A* wtb = bwd.packed + b * pl.W;
        for (int s = L - 1; s >= 0; --s) {
          const auto& st = fwd.stages[s];
          wgrad[s](s ? act(s) : src, s ? ld : sld, gs, gsld, np, dw + b * pl.W + st.woff, nvec,
                   st.vs);
          A* o = s ? work : dx;
          const int64_t o_ld = s ? ld : dxld;
          bwd.stages[s].fn(gs, gsld, o, o_ld, np, wtb + st.woff, nvec, st.vs, nullptr);
          gs = o, gsld = o_ld;
        }
        if (pl.residual)  // y = B(x) + x: the output gradient passes to the input too
          for (int64_t p = 0; p < np; ++p) {
            A* d = dx + p * dxld;
            const A* gp = g + p * gld;
            for (int64_t c = 0; c < pl.n; ++c) d[c] += gp[c];
          }
        if (to_gx) continue;
        for (int64_t p = 0; p < np; ++p) {
          const A* d = dx + p * ld;
          if (sum_blocks) {  // expanding: every block's input is x
            A* a = acc + p * ld;
            if (b == 0) std::copy(d, d + pl.cin, a);
            else for (int64_t c = 0; c < pl.cin; ++c) a[c] += d[c];
          } else {  // the block's input rows of gx
            std::copy(d, d + valid, gx + (r0 + p) * pl.cin + off);
          }
        }
      }
      if (sum_blocks)
        for (int64_t p = 0; p < np; ++p)
          std::copy(acc + p * ld, acc + p * ld + pl.cin, gx + (r0 + p) * pl.cin);
    };
    par::for_each(chunks, 1, [&](int64_t c) {
      for (int64_t i = c * per; i < std::min(ntiles, (c + 1) * per); ++i)
        tile(partial + c * pitch, i * tp, std::min(tp, rows - i * tp));
    });
  });
  // the partials summed in chunk order, then unpacked into the plan's layout
  for (int64_t c = 1; c < chunks; ++c)
    for (int64_t e = 0; e < gwn; ++e) partial[e] += partial[c * pitch + e];
  fwd.unpack(pl, partial, gw);
  return true;
}

}  // namespace bft
