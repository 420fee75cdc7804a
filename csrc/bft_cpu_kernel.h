// The fused BFT operator on CPU tensors (no PyTorch types here; bft_cpu.cpp binds it).
//
// x is (B, C_in, P). For P > 1 (NCHW) a tile is up to TP pixels of one image; for P == 1
// (channels-last / linear) a tile is TP rows. Element (c, p) of a tile sits at src[c * cs + p * ps].
// Each block of each tile runs through every stage in a per-thread buffer buf[c][TP] (pixels
// contiguous) that stays in cache; the result is written once. For NCHW in the compute dtype
// with full tiles and unpadded blocks, the first run reads x and the last run writes y directly.
// Weight gradients: one partial per chunk of tiles (a fixed number of chunks, whatever the thread
// count), reduced in chunk order, so the same inputs give bit-identical gradients.
#pragma once

#include <omp.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "bft_cpu_stages.h"

namespace bft {

struct Plan {
  int64_t cin = 0, cout = 0, m = 0, n = 1, T = 1, W = 0;
  bool expand = true, residual = false;
  std::vector<int> radix, segs, stride;
  std::vector<int64_t> woff;

  // rows of block t that carry input (zero beyond), and where they start in x
  int64_t in_rows(int64_t t) const { return expand ? cin : std::min(m, cin - t * m); }
  int64_t in_off(int64_t t) const { return expand ? 0 : t * m; }
  // rows of block t that reach the output, and where they go in y
  int64_t out_rows(int64_t t) const { return expand ? std::min(m, cout - t * m) : m; }
  int64_t out_off(int64_t t) const { return expand ? t * m : 0; }
  int stages() const { return (int)radix.size(); }
};

// Returns an empty string, or what is wrong with the arguments.
inline std::string make_plan(int64_t cin, int64_t cout, const int64_t* radices, int64_t len,
                             bool residual, Plan& p) {
  if (cin < 1 || cout < 1) return "need at least one input and one output channel";
  p = Plan{};
  p.cin = cin;
  p.cout = cout;
  p.m = std::min(cin, cout);
  p.T = (std::max(cin, cout) + p.m - 1) / p.m;
  p.expand = cin <= cout;
  p.residual = residual;
  int64_t a = 1, off = 0;
  for (int64_t s = 0; s < len; ++s) {
    const int64_t k = radices[s];
    if (k < 2) return "every radix must be >= 2";
    p.n *= k;
    if (p.n > (int64_t{1} << 30)) return "the product of the radices is too large";
  }
  if (p.n < p.m) return "the product of the radices must be >= min(in_channels, out_channels)";
  for (int64_t s = 0; s < len; ++s) {
    const int64_t k = radices[s];
    p.radix.push_back((int)k);
    p.segs.push_back((int)a);
    p.stride.push_back((int)(p.n / (a * k)));
    p.woff.push_back(off);
    off += p.n * k;
    a *= k;
  }
  p.W = off;
  return "";
}

// How the pixels are cut into tiles of tp pixels (NCHW: within one image; else: rows).
struct Tiling {
  int64_t B, P, per_image, tp, ntiles;
  int64_t count(int64_t i) const {
    const int64_t first = (P > 1 ? i % per_image : i) * tp;
    return std::min(tp, (P > 1 ? P : B) - first);
  }
  // offset of element (c = 0, p = 0) of tile i in a (B, C, P) tensor
  int64_t offset(int64_t i, int64_t C) const {
    return P > 1 ? (i / per_image) * C * P + (i % per_image) * tp : i * tp * C;
  }
  int64_t cs(int64_t C) const { return P > 1 ? P : 1; }
  int64_t ps(int64_t C) const { return P > 1 ? 1 : C; }
};

// Pixels per tile: `rows` rows of the buffer should fit in `budget` bytes; a multiple of the
// vector length, at most `cap`, and enough tiles to keep `threads` threads busy.
template <class A>
Tiling make_tiling(int64_t B, int64_t P, int64_t rows, int64_t budget, int64_t cap, int threads) {
  constexpr int64_t VL = Vec<A>::lanes;
  const int64_t items = P > 1 ? P : B;
  int64_t tp = std::min<int64_t>(budget / (rows * (int64_t)sizeof(A)), cap) / VL * VL;
  tp = std::max(VL, std::min(tp, (items + VL - 1) / VL * VL));
  auto tiles = [&](int64_t t) { return (P > 1 ? B : 1) * ((items + t - 1) / t); };
  while (tp > VL && tiles(tp) < 4 * threads) tp = std::max(VL, tp / 2 / VL * VL);
  Tiling tl{B, P, (items + tp - 1) / tp, tp, 0};
  tl.ntiles = B == 0 ? 0 : tiles(tp);
  return tl;
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <class A>
std::unique_ptr<A[], AlignedFree> alloc_buffer(int64_t elems) {
  const size_t bytes = ((size_t)std::max<int64_t>(elems, 1) * sizeof(A) + 63) / 64 * 64;
  A* p = static_cast<A*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<A[], AlignedFree>(p);
}

// buf[c][p] = src(c, p) for c < valid, p < np; zero for the other rows < rows and pixels < ld.
template <class S, class A>
void load_rows(A* buf, int64_t ld, int64_t rows, const S* src, int64_t valid, int64_t cs,
               int64_t ps, int64_t np) {
  if (ps == 1) {
    for (int64_t c = 0; c < valid; ++c) {
      const S* s = src + c * cs;
      A* d = buf + c * ld;
      for (int64_t p = 0; p < np; ++p) d[p] = static_cast<A>(s[p]);
      for (int64_t p = np; p < ld; ++p) d[p] = A(0);
    }
  } else {
    constexpr int64_t BL = 16;  // cache-blocked transpose of a channels-last tile
    for (int64_t p0 = 0; p0 < np; p0 += BL)
      for (int64_t c0 = 0; c0 < valid; c0 += BL) {
        const int64_t pe = std::min(np, p0 + BL), ce = std::min(valid, c0 + BL);
        for (int64_t p = p0; p < pe; ++p)
          for (int64_t c = c0; c < ce; ++c) buf[c * ld + p] = static_cast<A>(src[p * ps + c]);
      }
    for (int64_t c = 0; c < valid; ++c)
      for (int64_t p = np; p < ld; ++p) buf[c * ld + p] = A(0);
  }
  for (int64_t c = valid; c < rows; ++c)
    for (int64_t p = 0; p < ld; ++p) buf[c * ld + p] = A(0);
}

// buf[c][p] += src(c, p) for c < rows, p < np.
template <class S, class A>
void add_rows(A* buf, int64_t ld, const S* src, int64_t rows, int64_t cs, int64_t ps, int64_t np) {
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t p = 0; p < np; ++p) buf[c * ld + p] += static_cast<A>(src[c * cs + p * ps]);
}

// dst(c, p) = buf[c][p] for c < rows, p < np.
template <class S, class A>
void store_rows(S* dst, int64_t cs, int64_t ps, const A* buf, int64_t ld, int64_t rows,
                int64_t np) {
  if (ps == 1) {
    for (int64_t c = 0; c < rows; ++c)
      for (int64_t p = 0; p < np; ++p) dst[c * cs + p] = static_cast<S>(buf[c * ld + p]);
  } else {
    constexpr int64_t BL = 16;
    for (int64_t p0 = 0; p0 < np; p0 += BL)
      for (int64_t c0 = 0; c0 < rows; c0 += BL) {
        const int64_t pe = std::min(np, p0 + BL), ce = std::min(rows, c0 + BL);
        for (int64_t p = p0; p < pe; ++p)
          for (int64_t c = c0; c < ce; ++c) dst[p * ps + c] = static_cast<S>(buf[c * ld + p]);
      }
  }
}

// The forward stages grouped into runs, each with its kernel and packed weights.
template <class A>
struct Runs {
  struct Run {
    int s0, len, K;  // first stage, number of stages, radix (len == 1 without a kernel)
    RunFn<A> fn;     // nullptr: stage_fwd_any
    int64_t woff;    // offset of the packed weights in a block's W weights
  };
  std::vector<Run> runs;
  std::vector<A> packed;  // (T, W)

  Runs(const Plan& pl, const A* w, int max_len) {
    const int L = pl.stages();
    int64_t off = 0;
    for (int s = 0; s < L;) {
      int len = std::min(max_len, L - s);
      RunFn<A> fn = nullptr;
      for (; len >= 1; --len) {
        int prod = 1;
        for (int q = 0; q < len; ++q) prod *= pl.radix[s + q];
        if (prod <= 16 && (fn = find_run<A>(&pl.radix[s], len))) break;
      }
      len = std::max(len, 1);
      runs.push_back({s, len, pl.radix[s], fn, off});
      for (int q = 0; q < len; ++q) off += pl.n * pl.radix[s + q];
      s += len;
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

  // Applies every run to block t: the first reads src, the last writes dst (adding res), the
  // others work in place in mid.
  void apply(const Plan& pl, int64_t t, Rows<const A> src, Rows<A> mid, Rows<A> dst,
             Rows<const A> res, int64_t nv, bool stream = false) const {
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& r = runs[i];
      const bool last = i + 1 == runs.size();
      RunArgs<A> args{i == 0 ? src : Rows<const A>{mid.base, mid.ld}, last ? dst : mid,
                      last ? res : Rows<const A>{}, nv, packed.data() + t * pl.W + r.woff,
                      pl.segs[r.s0], pl.stride[r.s0 + r.len - 1], last && stream};
      if (r.fn) r.fn(args);
      else stage_fwd_any(args, r.K);
    }
  }
};

struct Options {
  int threads = 1;
  int max_run = 4;                          // stages fused per run (1: stage by stage)
  int64_t fwd_budget = 32 * 1024;           // bytes of the forward tile buffer
  int64_t bwd_budget = 768 * 1024;          // bytes of the backward buffers
  int64_t fwd_cap = 256, bwd_cap = 128;     // most pixels per tile
  int64_t stream_bytes = 4 << 20;           // outputs at least this large bypass the caches
};

// Asks for the next tile's rows (np elements each) in the L2 cache ahead of use (`write`: in
// a writable state, so that storing to them later does not wait for memory).
template <class S>
void prefetch_rows(const S* src, int64_t rows, int64_t cs, int64_t np, bool write) {
  const int64_t bytes = np * (int64_t)sizeof(S);
  for (int64_t c = 0; c < rows; ++c) {
    const char* row = reinterpret_cast<const char*>(src + c * cs);
    for (int64_t b = 0; b < bytes + 63; b += 64) {
      const char* at = row + std::min(b, bytes - 1);
      if (write) __builtin_prefetch(at, 1, 2);
      else __builtin_prefetch(at, 0, 2);
    }
  }
}

template <class S, class A>
void forward_impl(const Plan& pl, const S* x, const A* w, S* y, int64_t B, int64_t P,
                  const Options& opt) {
  constexpr int64_t VL = Vec<A>::lanes;
  const Tiling tl = make_tiling<A>(B, P, pl.n, opt.fwd_budget, opt.fwd_cap, opt.threads);
  const int64_t ld = tl.tp;
  const bool sum_blocks = !pl.expand && pl.T > 1;
  const Runs<A> runs(pl, w, opt.max_run);
  // x and y rows are read and written directly when no conversion, padding or summing is needed
  bool direct = std::is_same_v<S, A> && P > 1 && pl.stages() > 0 && !sum_blocks;
  for (int64_t t = 0; t < pl.T; ++t)
    direct = direct && pl.in_rows(t) == pl.n && pl.out_rows(t) == pl.n;
  const int64_t xcs = tl.cs(pl.cin), xps = tl.ps(pl.cin);
  const int64_t ycs = tl.cs(pl.cout), yps = tl.ps(pl.cout);
  // stream y past the caches when it is too large to stay there and its rows are aligned
  const bool stream = direct && B * pl.cout * P * (int64_t)sizeof(S) >= opt.stream_bytes &&
                      reinterpret_cast<uintptr_t>(y) % BFT_VECTOR_BYTES == 0 &&
                      (P * (int64_t)sizeof(S)) % BFT_VECTOR_BYTES == 0;
#pragma omp parallel num_threads(opt.threads)
  {
    auto buf = alloc_buffer<A>(pl.n * ld);
    auto acc = alloc_buffer<A>(sum_blocks ? pl.m * ld : 0);
    const Rows<A> brows{buf.get(), ld};
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tl.ntiles; ++i) {
      const int64_t np = tl.count(i), nv = (np + VL - 1) / VL;
      const S* xt = x + tl.offset(i, pl.cin);
      S* yt = y + tl.offset(i, pl.cout);
      for (int64_t t = 0; t < pl.T; ++t) {
        const S* xb = xt + pl.in_off(t) * xcs;
        S* yb = yt + pl.out_off(t) * ycs;
        if (direct && np == ld) {
          if constexpr (std::is_same_v<S, A>) {
            const Rows<const A> xr{xb, xcs};
            if (i + 1 < tl.ntiles) {
              prefetch_rows(x + tl.offset(i + 1, pl.cin), pl.cin, xcs, np, false);
              if (!stream) prefetch_rows(y + tl.offset(i + 1, pl.cout), pl.cout, ycs, np, true);
            }
            runs.apply(pl, t, xr, brows, Rows<A>{yb, ycs}, pl.residual ? xr : Rows<const A>{}, nv,
                       stream);
          }
          continue;
        }
        load_rows(buf.get(), ld, pl.n, xb, pl.in_rows(t), xcs, xps, np);
        runs.apply(pl, t, Rows<const A>{buf.get(), ld}, brows, brows, Rows<const A>{}, nv);
        if (pl.residual) add_rows(buf.get(), ld, xb, pl.in_rows(t), xcs, xps, np);
        if (!sum_blocks) {
          store_rows(yb, ycs, yps, buf.get(), ld, pl.out_rows(t), np);
        } else if (t == 0) {
          std::memcpy(acc.get(), buf.get(), sizeof(A) * pl.m * ld);
        } else {
          for (int64_t e = 0; e < pl.m * ld; ++e) acc[e] += buf[e];
        }
      }
      if (sum_blocks) store_rows(yt, ycs, yps, acc.get(), ld, pl.m, np);
    }
    if (stream) stream_fence();
  }
}

template <class S, class A>
void backward_impl(const Plan& pl, const S* grad, const S* x, const A* w, S* gx, A* gw,
                   int64_t B, int64_t P, const Options& opt) {
  constexpr int64_t VL = Vec<A>::lanes;
  const int L = pl.stages();
  const Tiling tl = make_tiling<A>(B, P, pl.n * (L + 1), opt.bwd_budget, opt.bwd_cap, opt.threads);
  const int64_t ld = tl.tp, slot = pl.n * ld;
  const bool sum_blocks = pl.expand && pl.T > 1;  // grad_x sums over the blocks
  const int64_t chunks = std::min<int64_t>(tl.ntiles, 32), gwn = pl.T * pl.W;
  const int64_t per = chunks ? (tl.ntiles + chunks - 1) / chunks : 0;
  std::vector<A> partial((size_t)std::max<int64_t>(chunks, 1) * gwn, A(0));
  bool direct = std::is_same_v<S, A> && P > 1 && L > 0 && !sum_blocks;
  for (int64_t t = 0; t < pl.T; ++t)
    direct = direct && pl.in_rows(t) == pl.n && pl.out_rows(t) == pl.n;
  const int64_t xcs = tl.cs(pl.cin), xps = tl.ps(pl.cin);
  const int64_t ycs = tl.cs(pl.cout), yps = tl.ps(pl.cout);
#pragma omp parallel num_threads(opt.threads)
  {
    auto acts = alloc_buffer<A>(L * slot);  // the input of every stage
    auto g = alloc_buffer<A>(slot);
    auto acc = alloc_buffer<A>(sum_blocks ? pl.m * ld : 0);
    const Rows<A> grows{g.get(), ld};
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      A* gwc = partial.data() + c * gwn;
      for (int64_t i = c * per; i < std::min(tl.ntiles, (c + 1) * per); ++i) {
        const int64_t np = tl.count(i), nv = (np + VL - 1) / VL;
        const bool fast = direct && np == ld;
        const S* xt = x + tl.offset(i, pl.cin);
        S* gxt = gx + tl.offset(i, pl.cin);
        const S* gt = grad + tl.offset(i, pl.cout);
        for (int64_t t = 0; t < pl.T; ++t) {
          const A* wt = w + t * pl.W;
          const S* xb = xt + pl.in_off(t) * xcs;
          S* gxb = gxt + pl.in_off(t) * xcs;
          const S* gb = gt + pl.out_off(t) * ycs;
          // stage inputs: act(s) is the input of stage s
          auto act = [&](int s) {
            if (s == 0 && fast) return Rows<const A>{reinterpret_cast<const A*>(xb), xcs};
            return Rows<const A>{acts.get() + s * slot, ld};
          };
          if (L > 0 && !fast) load_rows(acts.get(), ld, pl.n, xb, pl.in_rows(t), xcs, xps, np);
          for (int s = 0; s + 1 < L; ++s) {
            RunArgs<A> args{act(s), Rows<A>{acts.get() + (s + 1) * slot, ld}, Rows<const A>{},
                            nv, wt + pl.woff[s], pl.segs[s], pl.stride[s]};
            RunFn<A> fn = find_run<A>(&pl.radix[s], 1);
            if (fn) fn(args);
            else stage_fwd_any(args, pl.radix[s]);
          }
          Rows<const A> gin{reinterpret_cast<const A*>(gb), ycs};
          if (!fast) {
            load_rows(g.get(), ld, pl.n, gb, pl.out_rows(t), ycs, yps, np);
            gin = Rows<const A>{g.get(), ld};
          }
          for (int s = L - 1; s >= 0; --s) {
            const bool to_gx = fast && s == 0;
            BwdArgs<A> args{gin,
                            to_gx ? Rows<A>{reinterpret_cast<A*>(gxb), xcs} : grows,
                            act(s),
                            to_gx && pl.residual ? Rows<const A>{reinterpret_cast<const A*>(gb), ycs}
                                                 : Rows<const A>{},
                            nv, wt + pl.woff[s], gwc + t * pl.W + pl.woff[s], pl.segs[s],
                            pl.stride[s]};
            stage_backward(args, pl.radix[s]);
            gin = Rows<const A>{g.get(), ld};
          }
          if (fast) continue;
          if (pl.residual) add_rows(g.get(), ld, gb, pl.out_rows(t), ycs, yps, np);
          if (!sum_blocks) {
            store_rows(gxb, xcs, xps, g.get(), ld, pl.in_rows(t), np);
          } else if (t == 0) {
            std::memcpy(acc.get(), g.get(), sizeof(A) * pl.m * ld);
          } else {
            for (int64_t e = 0; e < pl.m * ld; ++e) acc[e] += g[e];
          }
        }
        if (sum_blocks) store_rows(gxt, xcs, xps, acc.get(), ld, pl.m, np);
      }
    }
  }
  // fixed-order reduction of the chunk partials
#pragma omp parallel for num_threads(opt.threads) schedule(static)
  for (int64_t e = 0; e < gwn; ++e) {
    A s = chunks ? partial[e] : A(0);
    for (int64_t c = 1; c < chunks; ++c) s += partial[c * gwn + e];
    gw[e] = s;
  }
}

}  // namespace bft
