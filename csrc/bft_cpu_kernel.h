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

// Per-thread scratch buffers, kept between calls: allocating them per call would fault in
// (and zero) fresh pages every time. Slot i of the calling thread, at least `elems` long.
template <class A>
A* scratch(int slot, int64_t elems) {
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buffers[4];
  Buffer& b = buffers[slot];
  const size_t bytes = ((size_t)std::max<int64_t>(elems, 1) * sizeof(A) + 63) / 64 * 64;
  if (b.bytes < bytes) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, bytes);
    b.bytes = b.p ? bytes : 0;
    if (!b.p) throw std::bad_alloc();
  }
  return static_cast<A*>(b.p);
}

// buf[c][p] = src[c * cs + p * ps] for c < valid, p < np; zero for the other rows < rows and
// pixels < ld. ps == 1: NCHW rows; cs == 1: a channels-last tile, transposed on the way.
template <class S, class A>
void load_rows(A* buf, int64_t ld, int64_t rows, const S* src, int64_t valid, int64_t cs,
               int64_t ps, int64_t np) {
  constexpr int64_t VL = Vec<A>::lanes;
  if (ps == 1) {
    for (int64_t c = 0; c < valid; ++c) {
      for (int64_t p = 0; p < np; ++p) buf[c * ld + p] = static_cast<A>(src[c * cs + p]);
      for (int64_t p = np; p < ld; ++p) buf[c * ld + p] = A(0);
    }
  } else {
    int64_t p0 = 0;
    if constexpr (std::is_same_v<S, A>) {
      for (; p0 + VL <= np; p0 += VL) {
        int64_t c0 = 0;
        for (; c0 + VL <= valid; c0 += VL) {
          vec_t<A> r[VL];
          for (int64_t k = 0; k < VL; ++k) r[k] = vload(src + (p0 + k) * ps + c0);
          transpose<A>(r);
          for (int64_t k = 0; k < VL; ++k) vstore(buf + (c0 + k) * ld + p0, r[k]);
        }
        for (int64_t c = c0; c < valid; ++c)
          for (int64_t p = p0; p < p0 + VL; ++p) buf[c * ld + p] = src[p * ps + c];
      }
    }
    for (int64_t c = 0; c < valid; ++c) {
      for (int64_t p = p0; p < np; ++p) buf[c * ld + p] = static_cast<A>(src[p * ps + c]);
      for (int64_t p = np; p < ld; ++p) buf[c * ld + p] = A(0);
    }
  }
  for (int64_t c = valid; c < rows; ++c)
    for (int64_t p = 0; p < ld; ++p) buf[c * ld + p] = A(0);
}

// dst[c * cs + p * ps] = buf[c][p] for c < rows, p < np.
template <class S, class A>
void store_rows(S* dst, int64_t cs, int64_t ps, const A* buf, int64_t ld, int64_t rows,
                int64_t np) {
  constexpr int64_t VL = Vec<A>::lanes;
  if (ps == 1) {
    for (int64_t c = 0; c < rows; ++c)
      for (int64_t p = 0; p < np; ++p) dst[c * cs + p] = static_cast<S>(buf[c * ld + p]);
    return;
  }
  int64_t p0 = 0;
  if constexpr (std::is_same_v<S, A>) {
    for (; p0 + VL <= np; p0 += VL) {
      int64_t c0 = 0;
      for (; c0 + VL <= rows; c0 += VL) {
        vec_t<A> r[VL];
        for (int64_t k = 0; k < VL; ++k) r[k] = vload(buf + (c0 + k) * ld + p0);
        transpose<A>(r);
        for (int64_t k = 0; k < VL; ++k) vstore(dst + (p0 + k) * ps + c0, r[k]);
      }
      for (int64_t p = p0; p < p0 + VL; ++p)
        for (int64_t c = c0; c < rows; ++c) dst[p * ps + c] = buf[c * ld + p];
    }
  }
  for (int64_t p = p0; p < np; ++p)
    for (int64_t c = 0; c < rows; ++c) dst[p * ps + c] = static_cast<S>(buf[c * ld + p]);
}

// dst[c][p] (+)= src[c][p] for c < rows, p < np (accumulate: add instead of copy).
template <class A>
void copy_rows(A* dst, int64_t dld, const A* src, int64_t sld, int64_t rows, int64_t np,
               bool accumulate) {
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t p = 0; p < np; ++p)
      dst[c * dld + p] = accumulate ? dst[c * dld + p] + src[c * sld + p] : src[c * sld + p];
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

  // Block t: out = B(src) + res. The first run reads src, the last writes out (adding res),
  // the others work in place in mid.
  void apply(const Plan& pl, int64_t t, Rows<const A> src, Rows<A> mid, Rows<A> out,
             Rows<const A> res, int64_t nv, bool stream) const {
    if (runs.empty()) {  // n == 1: the identity
      for (int64_t c = 0; c < pl.n; ++c)
        for (int64_t p = 0; p < nv * Vec<A>::lanes; ++p)
          out.row(c)[p] = src.row(c)[p] + (res.base ? res.row(c)[p] : A(0));
      return;
    }
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& r = runs[i];
      const bool last = i + 1 == runs.size();
      RunArgs<A> args{i == 0 ? src : Rows<const A>{mid.base, mid.ld}, last ? out : mid,
                      last ? res : Rows<const A>{}, nv, packed.data() + t * pl.W + r.woff,
                      pl.segs[r.s0], pl.stride[r.s0 + r.len - 1], last && stream};
      if (r.fn) r.fn(args);
      else stage_fwd_any(args, r.K);
    }
  }
};

struct Options {
  int threads = 1;
  int max_run = 4;                   // stages fused per run (1: stage by stage)
  int64_t fwd_budget = 256 * 1024;   // bytes of the forward tile buffers
  int64_t bwd_budget = 1024 * 1024;  // bytes of the backward tile buffers
  int64_t fwd_cap = 4096, bwd_cap = 512;  // most pixels per tile
  int64_t stream_bytes = 4 << 20;    // outputs at least this large bypass the caches
  bool direct = true;                // runs read x / write y in place when possible
  bool prefetch = true;              // prefetch the next tile of x
};

// Asks for a tile's rows (np elements each) in the L2 cache ahead of use.
template <class S>
void prefetch_rows(const S* src, int64_t rows, int64_t cs, int64_t np, bool write) {
  const int64_t bytes = np * (int64_t)sizeof(S);
  for (int64_t c = 0; c < rows; ++c) {
    const char* row = reinterpret_cast<const char*>(src + c * cs);
    for (int64_t b = 0; b < bytes + 63; b += 64) prefetch_line(row + std::min(b, bytes - 1), write);
  }
}

// Where tile i's part starting at pixel p0 lives in a (B, C, P) tensor.
template <class S>
struct View {
  S* base;
  int64_t cs, ps;
  View at(int64_t c) const { return {base + c * cs, cs, ps}; }
};

template <class S>
View<S> view(S* data, const Tiling& tl, int64_t i, int64_t p0, int64_t C) {
  return {data + tl.offset(i, C) + p0 * tl.ps(C), tl.cs(C), tl.ps(C)};
}

template <class S, class A>
void forward_impl(const Plan& pl, const S* x, const A* w, S* y, int64_t B, int64_t P,
                  const Options& opt) {
  constexpr int64_t VL = Vec<A>::lanes;
  constexpr bool same = std::is_same_v<S, A>;
  const Tiling tl = make_tiling<A>(B, P, 2 * pl.n, opt.fwd_budget, opt.fwd_cap, opt.threads);
  const int64_t ld = tl.tp;
  const bool sum_blocks = !pl.expand && pl.T > 1;
  const Runs<A> runs(pl, w, opt.max_run);
  const bool direct = opt.direct && same && P > 1;
  const bool stream = direct && B * pl.cout * P * (int64_t)sizeof(S) >= opt.stream_bytes &&
                      reinterpret_cast<uintptr_t>(y) % BFT_VECTOR_BYTES == 0 &&
                      (P * (int64_t)sizeof(S)) % BFT_VECTOR_BYTES == 0;
#pragma omp parallel num_threads(opt.threads)
  {
    A* ubuf = scratch<A>(0, pl.n * ld);
    A* buf = scratch<A>(1, pl.n * ld);
    A* acc = scratch<A>(2, sum_blocks ? pl.m * ld : 0);
    // One part of tile i: `fast` parts hold whole vectors and read/write x and y in place.
    auto part = [&](int64_t i, int64_t p0, int64_t np, bool fast) {
      const int64_t nv = (np + VL - 1) / VL;
      const View<const S> xv = view(x, tl, i, p0, pl.cin);
      const View<S> yv = view(y, tl, i, p0, pl.cout);
      for (int64_t t = 0; t < pl.T; ++t) {
        const View<const S> xb = xv.at(pl.in_off(t));
        const View<S> yb = yv.at(pl.out_off(t));
        Rows<const A> in{ubuf, ld};
        if (fast && pl.in_rows(t) == pl.n) in = {reinterpret_cast<const A*>(xb.base), xb.cs};
        else load_rows(ubuf, ld, pl.n, xb.base, pl.in_rows(t), xb.cs, xb.ps, np);
        const bool to_y = fast && pl.out_rows(t) == pl.n && !sum_blocks;
        Rows<A> out = to_y ? Rows<A>{reinterpret_cast<A*>(yb.base), yb.cs} : Rows<A>{buf, ld};
        runs.apply(pl, t, in, Rows<A>{buf, ld}, out, pl.residual ? in : Rows<const A>{}, nv,
                   to_y && stream);
        if (to_y) continue;
        if (sum_blocks) copy_rows(acc, ld, buf, ld, pl.m, nv * VL, t > 0);
        else store_rows(yb.base, yb.cs, yb.ps, buf, ld, pl.out_rows(t), np);
      }
      if (sum_blocks) store_rows(yv.base, yv.cs, yv.ps, acc, ld, pl.m, np);
    };
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tl.ntiles; ++i) {
      const int64_t np = tl.count(i), whole = direct ? np / VL * VL : 0;
      if (opt.prefetch && direct && i + 1 < tl.ntiles)
        prefetch_rows(x + tl.offset(i + 1, pl.cin), pl.cin, tl.cs(pl.cin), tl.count(i + 1), false);
      if (whole) part(i, 0, whole, true);
      if (np > whole) part(i, whole, np - whole, false);
    }
    if (stream) stream_fence();
  }
}

template <class S, class A>
void backward_impl(const Plan& pl, const S* grad, const S* x, const A* w, S* gx, A* gw,
                   int64_t B, int64_t P, const Options& opt) {
  constexpr int64_t VL = Vec<A>::lanes;
  const int L = pl.stages();
  const Tiling tl = make_tiling<A>(B, P, pl.n * (L + 2), opt.bwd_budget, opt.bwd_cap, opt.threads);
  const int64_t ld = tl.tp, slot = pl.n * ld;
  const bool sum_blocks = pl.expand && pl.T > 1;  // grad_x sums over the blocks
  const bool direct = opt.direct && std::is_same_v<S, A> && P > 1;
  // weight-gradient partials: chunk c owns tiles [c * per, (c + 1) * per)
  const int64_t chunks = std::min<int64_t>(tl.ntiles, 32), gwn = pl.T * pl.W;
  const int64_t per = chunks ? (tl.ntiles + chunks - 1) / chunks : 0;
  std::vector<A> partial((size_t)std::max<int64_t>(chunks, 1) * gwn, A(0));
#pragma omp parallel num_threads(opt.threads)
  {
    A* acts = scratch<A>(0, std::max(L, 1) * slot);  // the input of every stage
    A* gbuf = scratch<A>(1, slot);                    // the incoming gradient
    A* work = scratch<A>(2, slot);                    // the gradient between stages
    A* acc = scratch<A>(3, sum_blocks ? pl.m * ld : 0);
    auto part = [&](A* gwc, int64_t i, int64_t p0, int64_t np, bool fast) {
      const int64_t nv = (np + VL - 1) / VL;
      const View<const S> xv = view(x, tl, i, p0, pl.cin);
      const View<S> gxv = view(gx, tl, i, p0, pl.cin);
      const View<const S> gv = view(grad, tl, i, p0, pl.cout);
      for (int64_t t = 0; t < pl.T; ++t) {
        const A* wt = w + t * pl.W;
        const View<const S> xb = xv.at(pl.in_off(t)), gb = gv.at(pl.out_off(t));
        const View<S> gxb = gxv.at(pl.in_off(t));
        // act(s): the input of stage s, recomputed
        auto act = [&](int s) { return Rows<const A>{acts + s * slot, ld}; };
        Rows<const A> act0 = act(0);
        if (fast && pl.in_rows(t) == pl.n) act0 = {reinterpret_cast<const A*>(xb.base), xb.cs};
        else if (L > 0) load_rows(acts, ld, pl.n, xb.base, pl.in_rows(t), xb.cs, xb.ps, np);
        for (int s = 0; s + 1 < L; ++s) {
          RunArgs<A> args{s ? act(s) : act0, Rows<A>{acts + (s + 1) * slot, ld}, Rows<const A>{},
                          nv, wt + pl.woff[s], pl.segs[s], pl.stride[s], false};
          if (RunFn<A> fn = find_run<A>(&pl.radix[s], 1)) fn(args);
          else stage_fwd_any(args, pl.radix[s]);
        }
        Rows<const A> gin{gbuf, ld};
        if (fast && pl.out_rows(t) == pl.n) gin = {reinterpret_cast<const A*>(gb.base), gb.cs};
        else load_rows(gbuf, ld, pl.n, gb.base, pl.out_rows(t), gb.cs, gb.ps, np);
        const bool to_gx = fast && pl.in_rows(t) == pl.n && !sum_blocks;
        const Rows<A> out = to_gx ? Rows<A>{reinterpret_cast<A*>(gxb.base), gxb.cs} : Rows<A>{work, ld};
        const Rows<const A> res = pl.residual ? gin : Rows<const A>{};
        if (L == 0) {  // n == 1: the identity
          for (int64_t p = 0; p < nv * VL; ++p) out.row(0)[p] = gin.row(0)[p] + (res.base ? res.row(0)[p] : A(0));
        }
        for (int s = L - 1; s >= 0; --s) {
          BwdArgs<A> args{s == L - 1 ? gin : Rows<const A>{work, ld}, s == 0 ? out : Rows<A>{work, ld},
                          s ? act(s) : act0, s == 0 ? res : Rows<const A>{}, nv, wt + pl.woff[s],
                          gwc + t * pl.W + pl.woff[s], pl.segs[s], pl.stride[s]};
          stage_backward(args, pl.radix[s]);
        }
        if (to_gx) continue;
        if (sum_blocks) copy_rows(acc, ld, work, ld, pl.m, nv * VL, t > 0);
        else store_rows(gxb.base, gxb.cs, gxb.ps, work, ld, pl.in_rows(t), np);
      }
      if (sum_blocks) store_rows(gxv.base, gxv.cs, gxv.ps, acc, ld, pl.m, np);
    };
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      A* gwc = partial.data() + c * gwn;
      for (int64_t i = c * per; i < std::min(tl.ntiles, (c + 1) * per); ++i) {
        const int64_t np = tl.count(i), whole = direct ? np / VL * VL : 0;
        if (whole) part(gwc, i, 0, whole, true);
        if (np > whole) part(gwc, i, whole, np - whole, false);
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
