// Portable SIMD helpers of the CPU kernels: GCC/Clang vector extensions, so the same code compiles
// to AVX-512, AVX2, SSE or NEON (whatever -march=native offers).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define SIMD_VECTOR_BYTES 64
#elif defined(__AVX__)
#define SIMD_VECTOR_BYTES 32
#else
#define SIMD_VECTOR_BYTES 16
#endif

// The vector registers the ISA has: a kernel that holds more values than these in a loop spills
// them to the stack, and an accumulator on the stack costs a load and a store per FMA.
#if defined(__AVX512F__) || defined(__aarch64__)
#define SIMD_VECTOR_REGISTERS 32
#else
#define SIMD_VECTOR_REGISTERS 16
#endif

#define SIMD_INLINE inline __attribute__((always_inline))
#define SIMD_INLINE_LAMBDA __attribute__((always_inline))

namespace simd {

template <class A>
struct Vec {
  typedef A type __attribute__((vector_size(SIMD_VECTOR_BYTES)));
  static constexpr int lanes = SIMD_VECTOR_BYTES / sizeof(A);
};
template <class A>
using vec_t = typename Vec<A>::type;

template <class A>
SIMD_INLINE vec_t<A> vload(const A* p) {
  vec_t<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class A>
SIMD_INLINE void vstore(A* p, vec_t<A> v) {
  std::memcpy(p, &v, sizeof(v));
}

// vload, into a register the compiler must keep: a vector that several instructions use is then
// loaded once, instead of being folded into each of them as a memory operand (which the
// compiler prefers, and which makes a loop of FMAs bound by its loads).
template <class A>
SIMD_INLINE vec_t<A> vload_once(const A* p) {
  vec_t<A> v = vload(p);
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

// The first vector-aligned element of v after resizing it to hold n elements from there (zeros
// where it grew): storage for arrays read with aligned vector loads.
template <class A>
inline A* aligned_elements(std::vector<A>& v, int64_t n) {
  constexpr int64_t align = SIMD_VECTOR_BYTES / (int64_t)sizeof(A);
  v.resize((size_t)(n + align));
  const int64_t off = (int64_t)(reinterpret_cast<uintptr_t>(v.data()) / sizeof(A) % align);
  return v.data() + (align - off) % align;
}

// A store that bypasses the caches (p aligned to the vector size): for outputs too large to
// stay in cache, it saves reading every output line before writing it.
template <class A>
SIMD_INLINE void vstream(A* p, vec_t<A> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) return _mm512_stream_ps(p, (__m512)v);
  if constexpr (std::is_same_v<A, double>) return _mm512_stream_pd(p, (__m512d)v);
#elif defined(__AVX__)
  if constexpr (std::is_same_v<A, float>) return _mm256_stream_ps(p, (__m256)v);
  if constexpr (std::is_same_v<A, double>) return _mm256_stream_pd(p, (__m256d)v);
#endif
  vstore(p, v);
}

// The lanes l of a vector with bit l of m set, as AVX2's masked loads and stores take them (a
// lane of all ones where set).
#if defined(__AVX2__) && !defined(__AVX512F__)
template <class A>
SIMD_INLINE __m256i lane_mask(uint32_t m) {
  if constexpr (sizeof(A) == 4) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bit), bit);
  } else {
    const __m256i bit = _mm256_setr_epi64x(1, 2, 4, 8);
    return _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(m), bit), bit);
  }
}
#endif

// p[l] for the lanes l of m (bit l), zero elsewhere; p + l need not be addressable outside m. One
// masked load with AVX-512 or AVX2, lane by lane otherwise.
template <class A>
SIMD_INLINE vec_t<A> vload_mask(const A* p, uint32_t m) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) return (vec_t<A>)_mm512_maskz_loadu_ps((__mmask16)m, p);
  if constexpr (std::is_same_v<A, double>) return (vec_t<A>)_mm512_maskz_loadu_pd((__mmask8)m, p);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<A, float>) return (vec_t<A>)_mm256_maskload_ps(p, lane_mask<A>(m));
  if constexpr (std::is_same_v<A, double>) return (vec_t<A>)_mm256_maskload_pd(p, lane_mask<A>(m));
#endif
  vec_t<A> v{};
  for (int l = 0; l < Vec<A>::lanes; ++l)
    if (m >> l & 1) v[l] = p[l];
  return v;
}

// Stores the lanes l of m (bit l) of v to p + l, nothing else.
template <class A>
SIMD_INLINE void vstore_mask(A* p, vec_t<A> v, uint32_t m) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) return _mm512_mask_storeu_ps(p, (__mmask16)m, (__m512)v);
  if constexpr (std::is_same_v<A, double>)
    return _mm512_mask_storeu_pd(p, (__mmask8)m, (__m512d)v);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<A, float>) return _mm256_maskstore_ps(p, lane_mask<A>(m), (__m256)v);
  if constexpr (std::is_same_v<A, double>)
    return _mm256_maskstore_pd(p, lane_mask<A>(m), (__m256d)v);
#endif
  for (int l = 0; l < Vec<A>::lanes; ++l)
    if (m >> l & 1) p[l] = v[l];
}

// The first `count` (< VL) lanes from p, the others zero (never reads past p + count).
template <class A>
SIMD_INLINE vec_t<A> vload_part(const A* p, int count) {
  return vload_mask(p, (1u << count) - 1);
}

// Stores the first `count` (< VL) lanes of v to p.
template <class A>
SIMD_INLINE void vstore_part(A* p, vec_t<A> v, int count) {
  vstore_mask(p, v, (1u << count) - 1);
}

// The functor of a plain copy: returns the vector it is given.
struct Unchanged {
  template <class V, class... I>
  SIMD_INLINE V operator()(V v, I...) const { return v; }
};

// dst[p] = src[p] for p < np, with streaming stores for the vector-aligned part of dst when
// `stream` (src is read unaligned to realign it). f(v, p, count) is what is stored of the
// vector v = src[p .. p + VL) (count lanes of it reach dst): the fused forward's epilogue.
template <class A, class F = Unchanged>
void copy_out(A* dst, const A* src, int64_t np, bool stream, F f = {}) {
  constexpr int64_t VL = Vec<A>::lanes;
  int64_t p = 0;
  if (stream) {
    const int64_t head = std::min<int64_t>(
        np, (VL - (int64_t)(reinterpret_cast<uintptr_t>(dst) / sizeof(A)) % VL) % VL);
    if (head) vstore_part(dst, f(vload(src), int64_t{0}, (int)head), (int)head);
    for (p = head; p + VL <= np; p += VL) vstream(dst + p, f(vload(src + p), p, (int)VL));
  } else {
    for (; p + VL <= np; p += VL) vstore(dst + p, f(vload(src + p), p, (int)VL));
  }
  if (p < np) vstore_part(dst + p, f(vload(src + p), p, (int)(np - p)), (int)(np - p));
}

// Orders streamed stores before later loads and stores (call once per thread after streaming).
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Calls f(std::integral_constant<int, I>{}) for I = 0..N-1, fully unrolled at compile time.
template <int N, class F>
SIMD_INLINE void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) SIMD_INLINE_LAMBDA {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// Lanes I... of the concatenation (a, b) (GCC before 12 lacks __builtin_shufflevector).
template <class A, int... I>
SIMD_INLINE vec_t<A> shuffle2(vec_t<A> a, vec_t<A> b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, I...);
#else
  typedef std::conditional_t<sizeof(A) == 4, int32_t, int64_t> M;
  typedef M mask_t __attribute__((vector_size(SIMD_VECTOR_BYTES)));
  return __builtin_shuffle(a, b, mask_t{I...});
#endif
}

// One step of a transposing reduction: a and b hold VL / w partial sums of width w each; the
// result holds 2 * VL / w sums of width w / 2 (block 2i: a's i-th, block 2i + 1: b's i-th).
template <class A, int W, int... L>
SIMD_INLINE vec_t<A> fold(vec_t<A> a, vec_t<A> b, std::integer_sequence<int, L...>) {
  constexpr int VL = Vec<A>::lanes, H = W / 2;
  auto lo = shuffle2<A, (((L / H) % 2 ? VL : 0) + (L / H / 2) * W + L % H)...>(a, b);
  auto hi = shuffle2<A, (((L / H) % 2 ? VL : 0) + (L / H / 2) * W + H + L % H)...>(a, b);
  return lo + hi;
}

// Reduces `count` (a power of two <= VL) vectors acc[0..count) whose blocks have width W into
// one vector: after log2(count) folds, block j holds the full sum of acc[j] (natural order).
template <class A, int Count, int W = Vec<A>::lanes>
SIMD_INLINE vec_t<A> fold_all(const vec_t<A>* acc) {
  if constexpr (Count == 1) {
    return acc[0];
  } else {
    constexpr int Half = Count / 2;
    vec_t<A> next[Half];
    unroll<Half>([&](auto i) SIMD_INLINE_LAMBDA {
      next[i] = fold<A, W>(acc[i], acc[i + Half], std::make_integer_sequence<int, Vec<A>::lanes>{});
    });
    return fold_all<A, Half, W / 2>(next);
  }
}

// out[i] += (sum of the lanes of acc[i]) for i < N, in a fixed order (deterministic).
template <class A, int N>
SIMD_INLINE void add_lane_sums(const vec_t<A>* acc, A* out) {
  constexpr int VL = Vec<A>::lanes;
  unroll<(N + VL - 1) / VL>([&](auto c) SIMD_INLINE_LAMBDA {
    constexpr int first = c * VL, count = std::min(VL, N - first);
    constexpr int pow2 = count <= 1 ? 1 : 1 << (32 - __builtin_clz(count - 1));
    vec_t<A> part[pow2];
    unroll<pow2>([&](auto i) SIMD_INLINE_LAMBDA {
      part[i] = i < count ? acc[first + i] : vec_t<A>{};
    });
    vec_t<A> s = fold_all<A, pow2>(part);
    constexpr int width = VL / pow2;  // lanes still summed per accumulator
    if constexpr (width == 1 && count == VL) {
      vstore(out + first, vload(out + first) + s);
    } else {
      unroll<count>([&](auto i) SIMD_INLINE_LAMBDA {
        A v = 0;
        for (int l = 0; l < width; ++l) v += s[i * width + l];
        out[first + i] += v;
      });
    }
  });
}

// Prefetches [p, p + bytes): the rows that a kernel's next task reads first, when the hardware
// prefetcher, fed a few cache lines of many rows at a time, brings them in too late. Into L1
// when they fit (`near`, up to 32 KB), else into L2.
// The prefetches are volatile asm on x86: GCC deletes a loop of __builtin_prefetch calls once
// it is inlined (-ffinite-loops treats the loop as free of side effects).
template <int Hint>
SIMD_INLINE void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (Hint == 3)
    asm volatile("prefetcht0 %0" : : "m"(*p));
  else
    asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, Hint);
#endif
}

inline void prefetch_bytes(const void* p, int64_t bytes, bool near = true) {
  const char* c = static_cast<const char*>(p);
  if (near && bytes <= (32 << 10)) {
    for (int64_t off = 0; off < bytes; off += 64) prefetch_line<3>(c + off);
  } else {
    for (int64_t off = 0; off < bytes; off += 64) prefetch_line<2>(c + off);
  }
}

}  // namespace simd

namespace simd {

// One step of an in-register transpose: swaps the off-diagonal B x B sub-blocks of the pair
// (a, b) = (rows i, i + B).
template <class A, int B, int... L>
SIMD_INLINE void swap_blocks(vec_t<A>& a, vec_t<A>& b, std::integer_sequence<int, L...>) {
  constexpr int VL = Vec<A>::lanes;
  vec_t<A> lo = shuffle2<A, ((L & B) ? VL + L - B : L)...>(a, b);
  vec_t<A> hi = shuffle2<A, ((L & B) ? VL + L : L + B)...>(a, b);
  a = lo;
  b = hi;
}

// Transposes the VL x VL block held in r[0..VL) (r[i][j] <-> r[j][i]).
template <class A>
SIMD_INLINE void transpose(vec_t<A>* r) {
  constexpr int VL = Vec<A>::lanes;
  unroll<__builtin_ctz(VL)>([&](auto s) SIMD_INLINE_LAMBDA {
    constexpr int B = 1 << decltype(s)::value;
    unroll<VL / 2>([&](auto k) SIMD_INLINE_LAMBDA {
      constexpr int K = decltype(k)::value, i = (K / B) * 2 * B + K % B;
      swap_blocks<A, B>(r[i], r[i + B], std::make_integer_sequence<int, VL>{});
    });
  });
}

}  // namespace simd
