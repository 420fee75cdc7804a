// The shape of a BFT layer (Plan), how a tensor's pixels are cut into tiles (Tiling), and the
// copies between a tensor and a tile buffer buf[c][lane] (pixels contiguous, one row per channel).
#pragma once

#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "bft/epilogue.h"
#include "common/simd.h"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace bft {

using namespace simd;  // common/simd.h

// Block size m, T blocks of n = prod(radices) channels, as the Python planner lays them out.
struct Plan {
  int64_t cin = 0, cout = 0, m = 0, n = 1, T = 1, W = 0;
  bool expand = true, residual = false;
  std::vector<int> radix, segs, stride;  // per stage: radix, segments, stride
  std::vector<int64_t> woff;             // per stage: offset of its weights in a block's W

  // rows of block t that carry input (zero beyond), and where they start in x
  int64_t in_rows(int64_t t) const { return expand ? cin : std::min(m, cin - t * m); }
  int64_t in_off(int64_t t) const { return expand ? 0 : t * m; }
  // rows of block t that reach the output, and where they go in y
  int64_t out_rows(int64_t t) const { return expand ? std::min(m, cout - t * m) : m; }
  int64_t out_off(int64_t t) const { return expand ? t * m : 0; }
  int stages() const { return (int)radix.size(); }
};

// Fills p; returns an empty string, or what is wrong with the arguments.
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
  for (int64_t s = 0; s < len; ++s) {
    if (radices[s] < 2) return "every radix must be >= 2";
    p.n *= radices[s];
    if (p.n > (int64_t{1} << 24)) return "the product of the radices is too large";
  }
  if (p.n < p.m) return "the product of the radices must be >= min(in_channels, out_channels)";
  int64_t a = 1, off = 0;
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

// np pixels of image b starting at pixel p0 (NCHW), or rows p0.. (P == 1), at buffer lane `lane`.
struct Segment {
  int64_t b, p0, np, lane;
};

// NCHW (P > 1): body tiles of up to tp pixels (whole vectors) inside one image; the last
// rem = P % VL pixels ("tails") of a group of `group` images are packed into the lanes of one
// tile, which follows the group's body tiles (their cache lines are still warm). P == 1: tiles
// of tp rows. Element (c, p) of a segment of a (B, C, P) tensor sits at
// data[offset + c * cs + p * ps].
struct Tiling {
  int64_t B, P, tp, whole, per_image, rem, group, per_group, ntiles;

  // (group, index in the group, images in the group) of tile i (NCHW)
  void locate(int64_t i, int64_t& g, int64_t& j, int64_t& images) const {
    g = std::min(i / per_group, (B - 1) / group);
    j = i - g * per_group;
    images = std::min(group, B - g * group);
  }
  bool body(int64_t i) const {
    if (P == 1) return true;
    int64_t g, j, images;
    locate(i, g, j, images);
    return j < images * per_image;
  }
  template <class F>
  void segments(int64_t i, F&& f) const {
    if (P == 1) return f(Segment{0, i * tp, std::min(tp, B - i * tp), 0});
    int64_t g, j, images;
    locate(i, g, j, images);
    if (j < images * per_image) {
      const int64_t p0 = (j % per_image) * tp;
      return f(Segment{g * group + j / per_image, p0, std::min(tp, whole - p0), 0});
    }
    for (int64_t k = 0; k < images; ++k) f(Segment{g * group + k, whole, rem, k * rem});
  }
  Segment first(int64_t i) const {
    Segment first{};
    bool seen = false;
    segments(i, [&](const Segment& s) { if (!seen) first = s, seen = true; });
    return first;
  }
  // lanes of tile i's buffer that hold pixels
  int64_t used(int64_t i) const {
    int64_t used = 0;
    segments(i, [&](const Segment& s) { used = std::max(used, s.lane + s.np); });
    return used;
  }
  int64_t offset(const Segment& s, int64_t C) const { return P > 1 ? s.b * C * P + s.p0 : s.p0 * C; }
  int64_t cs(int64_t C) const { return P > 1 ? P : 1; }
  int64_t ps(int64_t C) const { return P > 1 ? 1 : C; }
};

// Pixels per tile: `rows` buffer rows should fit in `budget` bytes; a multiple of the vector
// length, at most `cap`, and enough tiles to keep `threads` threads busy.
template <class A>
Tiling make_tiling(int64_t B, int64_t P, int64_t rows, int64_t budget, int64_t cap, int threads) {
  constexpr int64_t VL = Vec<A>::lanes;
  auto up = [](int64_t v) { return (v + VL - 1) / VL * VL; };
  int64_t tp = std::min<int64_t>(budget / (rows * (int64_t)sizeof(A)), cap) / VL * VL;
  tp = std::max(VL, std::min(tp, up(P > 1 ? P : B)));
  Tiling tl{};
  for (;; tp = std::max(VL, tp / 2 / VL * VL)) {
    tl = Tiling{B, P, tp, 0, 0, 0, 1, 0, 0};
    if (P > 1) {
      tl.whole = P / VL * VL;
      tl.per_image = (tl.whole + tp - 1) / tp;
      tl.rem = P - tl.whole;
      tl.group = tl.rem ? std::max<int64_t>(1, VL / tl.rem) : B;  // tails fill one vector
      tl.per_group = tl.group * tl.per_image + (tl.rem ? 1 : 0);
      const int64_t groups = (B + tl.group - 1) / tl.group;
      tl.ntiles = B * tl.per_image + (tl.rem ? groups : 0);
    } else {
      tl.ntiles = (B + tp - 1) / tp;
    }
    if (tp == VL || tl.ntiles >= 4 * threads) break;
  }
  return tl;
}

// Row stride of a tile buffer of tp pixels: an odd number of vectors, so that rows a power of
// two apart do not all map to the same L1 set (with tp a multiple of 2 vectors they would, and
// a run's 16 rows would evict each other on every access).
template <class A>
int64_t padded_ld(int64_t tp) {
  constexpr int64_t VL = Vec<A>::lanes;
  return (tp / VL) % 2 ? tp : tp + VL;
}

// Where the rows of a channels-last tile (P == 1) come from when they are not read from x: a
// producer that computes them in the tile pass itself, so its output never goes to memory (the
// depthwise -> BFT pass of depthwise/dw_bft_cpu.cpp). fill(r0, n) returns rows r0 .. r0 + n of the
// input, cin values each (row stride cin), valid until the calling thread's next fill.
template <class A>
struct RowSource {
  virtual const A* fill(int64_t r0, int64_t n) const = 0;
  virtual ~RowSource() = default;
};

// Whether the first and last pages of [p, p + bytes) are in memory. Fresh allocations from
// the OS are not: their first write faults the page in (zeroing it through the cache), after
// which streaming stores are slower than plain ones.
inline bool pages_resident(const void* p, size_t bytes) {
#if defined(__unix__) || defined(__APPLE__)
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  for (uintptr_t at : {(uintptr_t)p, (uintptr_t)p + bytes - 1}) {
    unsigned char in_core = 0;
#if defined(__APPLE__)
    const int rc = mincore(reinterpret_cast<caddr_t>(at / page * page), 1,
                           reinterpret_cast<char*>(&in_core));
#else
    const int rc = mincore(reinterpret_cast<void*>(at / page * page), 1, &in_core);
#endif
    if (rc != 0) return true;  // cannot tell: assume resident
    if (!(in_core & 1)) return false;
  }
#endif
  return true;
}

// Per-thread scratch buffers, kept between calls: allocating them per call would fault in
// (and zero) fresh pages every time. Slot `slot` of the calling thread, at least `elems` long.
template <class A>
A* scratch(int slot, int64_t elems) {
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buffers[6];
  Buffer& b = buffers[slot];
  // one spare vector: partial-vector copies may read (never use) up to a vector past the end
  const size_t bytes = ((size_t)std::max<int64_t>(elems, 1) * sizeof(A) + 63) / 64 * 64 + 64;
  if (b.bytes < bytes) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, bytes);
    b.bytes = b.p ? bytes : 0;
    if (!b.p) throw std::bad_alloc();
  }
  return static_cast<A*>(b.p);
}

// buf[c][0..lw) = 0 for valid <= c < rows, buf[c][used..lw) = 0 for c < valid.
template <class A>
void zero_rest(A* buf, int64_t ld, int64_t rows, int64_t valid, int64_t used, int64_t lw) {
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t p = c < valid ? used : 0; p < lw; ++p) buf[c * ld + p] = A(0);
}

// The VL x VL block of VL rows in[k * in_ld + 0..VL), transposed into out[k * out_ld + 0..VL)
// (row k of out: f(transposed row k, k)).
template <class A, class F = Unchanged>
SIMD_INLINE void transpose_block(const A* in, int64_t in_ld, A* out, int64_t out_ld, F f = {}) {
  constexpr int64_t VL = Vec<A>::lanes;
  vec_t<A> r[VL];
  for (int64_t k = 0; k < VL; ++k) r[k] = vload(in + k * in_ld);
  transpose<A>(r);
  for (int64_t k = 0; k < VL; ++k) vstore(out + k * out_ld, f(r[k], k));
}

// buf[c][p] = src[c * cs + p * ps] for c < rows, p < np. ps == 1: NCHW rows; otherwise a
// channels-last segment (cs == 1), transposed on the way.
template <class S, class A>
void load_rows(A* buf, int64_t ld, const S* src, int64_t rows, int64_t cs, int64_t ps, int64_t np) {
  constexpr int64_t VL = Vec<A>::lanes;
  if (ps == 1) {
    for (int64_t c = 0; c < rows; ++c)
      for (int64_t p = 0; p < np; ++p) buf[c * ld + p] = static_cast<A>(src[c * cs + p]);
    return;
  }
  int64_t p0 = 0;
  if constexpr (std::is_same_v<S, A>) {
    for (; p0 + VL <= np; p0 += VL) {
      int64_t c0 = 0;
      for (; c0 + VL <= rows; c0 += VL)
        transpose_block<A>(src + p0 * ps + c0, ps, buf + c0 * ld + p0, ld);
      for (int64_t c = c0; c < rows; ++c)
        for (int64_t p = p0; p < p0 + VL; ++p) buf[c * ld + p] = src[p * ps + c];
    }
  }
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t p = p0; p < np; ++p) buf[c * ld + p] = static_cast<A>(src[p * ps + c]);
}

// dst[c * cs + p * ps] = buf[c][p] for c < rows, p < np (buf rows readable up to a whole
// vector). `stream`: streaming stores where dst is vector-aligned. E (a Form other than kPlain:
// the fused forward): dst[c * cs + p * ps] = epi(buf[c][p]) + add[c * cs + p * ps], channels
// counted from row 0, `add` laid out like dst (or null), in registers on the way out.
template <class S, class A, int E = kPlain>
void store_rows(S* dst, int64_t cs, int64_t ps, const A* buf, int64_t ld, int64_t rows,
                int64_t np, bool stream, const Epilogue<A>* epi = nullptr,
                const S* add = nullptr) {
  constexpr int64_t VL = Vec<A>::lanes;
  const Epilogue<A> ep = E ? *epi : Epilogue<A>{};  // a local copy: stores cannot alias it
  // element (c, p) as stored, in the compute dtype
  auto value = [&](int64_t c, int64_t p) SIMD_INLINE_LAMBDA {
    A v = buf[c * ld + p];
    if constexpr (E) {
      v = ep.template apply<E == kSwish>(v, ep.mul[c], ep.bias[c]);
      if (add) v += static_cast<A>(add[c * cs + p * ps]);
    }
    return v;
  };
  if (ps == 1) {
    if constexpr (std::is_same_v<S, A>) {
      for (int64_t c = 0; c < rows; ++c) {
        if constexpr (E) {
          const A* a = add ? add + c * cs : nullptr;
          copy_out(dst + c * cs, buf + c * ld, np, stream,
                   [&](vec_t<A> v, int64_t p, int count) SIMD_INLINE_LAMBDA {
                     v = ep.template pixels<E == kSwish>(v, c);
                     if (a) v += count == VL ? vload(a + p) : vload_part(a + p, count);
                     return v;
                   });
        } else {
          copy_out(dst + c * cs, buf + c * ld, np, stream);
        }
      }
    } else {
      for (int64_t c = 0; c < rows; ++c)
        for (int64_t p = 0; p < np; ++p) dst[c * cs + p] = static_cast<S>(value(c, p));
    }
    return;
  }
  int64_t p0 = 0;
  if constexpr (std::is_same_v<S, A>) {
    // VL pixels at a time, transposed in registers: straight into dst, or, streaming whole pixel
    // rows, into a staging block laid out like dst that goes out with aligned streaming stores
    // (rows of dst are rarely vector-aligned themselves)
    const bool staged = stream && rows == ps;
    A* stage = staged ? scratch<A>(4, VL * ps) : nullptr;
    for (; p0 + VL <= np; p0 += VL) {
      A* out = staged ? stage : dst + p0 * ps;
      int64_t c0 = 0;
      for (; c0 + VL <= rows; c0 += VL) {
        if constexpr (E) {  // row k: pixel p0 + k, channels c0 .. c0 + VL
          transpose_block<A>(buf + c0 * ld + p0, ld, out + c0, ps,
                             [&](vec_t<A> r, int64_t k) SIMD_INLINE_LAMBDA {
                               r = ep.template channels<E == kSwish>(r, c0);
                               if (add) r += vload(add + (p0 + k) * ps + c0);
                               return r;
                             });
        } else {
          transpose_block<A>(buf + c0 * ld + p0, ld, out + c0, ps);
        }
      }
      for (int64_t k = 0; k < VL; ++k)
        for (int64_t c = c0; c < rows; ++c) out[k * ps + c] = value(c, p0 + k);
      if (staged) copy_out(dst + p0 * ps, stage, VL * ps, true);
    }
  }
  for (int64_t p = p0; p < np; ++p)
    for (int64_t c = 0; c < rows; ++c) dst[p * ps + c] = static_cast<S>(value(c, p));
}

// dst[c][p] (+)= src[c][p] for c < rows, p < np (accumulate: add instead of copy).
template <class A>
void copy_rows(A* dst, int64_t dld, const A* src, int64_t sld, int64_t rows, int64_t np,
               bool accumulate) {
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t p = 0; p < np; ++p)
      dst[c * dld + p] = accumulate ? dst[c * dld + p] + src[c * sld + p] : src[c * sld + p];
}

// Loads block rows of every segment of tile i into buf (zero elsewhere, up to lw lanes).
// `valid` rows come from the tensor (data + row_off * cs), the other rows < n are zero.
template <class S, class A>
void load_tile(A* buf, int64_t ld, int64_t n, int64_t lw, const Tiling& tl, int64_t i,
               const S* data, int64_t C, int64_t row_off, int64_t valid) {
  const int64_t cs = tl.cs(C), ps = tl.ps(C);
  tl.segments(i, [&](const Segment& s) {
    load_rows(buf + s.lane, ld, data + tl.offset(s, C) + row_off * cs, valid, cs, ps, s.np);
  });
  zero_rest(buf, ld, n, valid, tl.used(i), lw);
}

// Stores `rows` buffer rows of every segment of tile i to data + row_off * cs; with E (the
// fused forward) as epi(row) + add, epi counting channels from channel 0 of data, add laid out
// like data (or null).
template <bool E = false, class S, class A>
void store_tile(S* data, int64_t C, int64_t row_off, int64_t rows, const Tiling& tl, int64_t i,
                const A* buf, int64_t ld, bool stream, const Epilogue<A>* epi = nullptr,
                const S* add = nullptr) {
  const int64_t cs = tl.cs(C), ps = tl.ps(C);
  const Epilogue<A> rows_epi = E ? epi->at(row_off) : Epilogue<A>{};
  tl.segments(i, [&](const Segment& s) {
    const int64_t off = tl.offset(s, C) + row_off * cs;
    if constexpr (!E)
      store_rows(data + off, cs, ps, buf + s.lane, ld, rows, s.np, stream);
    else if (rows_epi.swish)
      store_rows<S, A, kSwish>(data + off, cs, ps, buf + s.lane, ld, rows, s.np, stream,
                               &rows_epi, add ? add + off : nullptr);
    else
      store_rows<S, A, kClamp>(data + off, cs, ps, buf + s.lane, ld, rows, s.np, stream,
                               &rows_epi, add ? add + off : nullptr);
  });
}

}  // namespace bft
