// The LayerNorm row kernels behind row_kernels.h, written once and compiled by
// row_kernels_generic.cpp, row_kernels_avx2.cpp and row_kernels_avx512.cpp with
// different target ISAs.
// Include it after every other header, inside nothing: everything here has
// internal linkage, so the builds never share a symbol.
//
// Work split: one call handles a range of rows; the caller spreads ranges over
// threads. Vectors are GCC/Clang vector extensions of 32 bytes (one AVX2 register,
// two SSE/NEON ones in the generic build) or 64 (AVX-512); half/bfloat16 conversions
// use F16C/AVX2 or AVX-512 intrinsics in those builds. Every row sum keeps 2 vectors of
// partial sums, folded into running totals every kChunk elements, then tree-summed: the
// order of additions depends on n and the build alone (never on the thread count), and
// the rounding error grows with kChunk / 16 + n / kChunk rather than n.
// Forward: the corrected two-pass moments (row_moments: the first chunk's mean as a
// shift, then sum(x - K) and sum((x - K)^2) in one pass over the row), then y: two
// passes over the row in memory. Backward: one pass for the row sums (with the residual
// that corrects the stored mean) and the block's partial dweight/dbias, one for dx;
// rows of 3072 elements or more two at a time.
// Assumes: nothing about alignment (unaligned loads) or n (scalar tail per row).
// Measured (1 thread of an AMD EPYC, AVX2 build, fwd / bwd vs torch 2.14 nn.LayerNorm):
// float32 [4096, 1024] 0.83 / 1.41 ms vs 1.28 / 2.07; [64, 65536] 1.62 / 3.52 vs
// 1.55 / 3.56; bfloat16 [4096, 1024] 1.30 / 1.50 vs 1.33 / 2.87.
#pragma once

#ifndef LN_EXT_ISA_NAME
#error "define LN_EXT_ISA_NAME before including row_kernels_impl.h"
#endif

// Everything here is internal, so passing 32-byte vectors by value in the generic
// build (no AVX) changes no ABI anyone else sees.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ln_ext::cpu {
namespace {

struct bf16_t {
  uint16_t bits;
};

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }

// bfloat16 is the top half of a float32.
inline float to_acc(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// Round to nearest even, as c10::BFloat16; NaN stays a (quiet) NaN. Branch-free so
// that it vectorizes.
inline void store(bf16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->bits = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

#if !defined(__FLT16_MAX__)
#error "ln_ext's CPU kernels need the compiler's _Float16 (GCC >= 12 or Clang >= 15)"
#endif
// The compiler's IEEE half: F16C conversions in the AVX2 and AVX-512 builds.
using f16_t = _Float16;
inline float to_acc(f16_t v) { return static_cast<float>(v); }
inline void store(f16_t* p, float v) { *p = static_cast<f16_t>(v); }

// Vectors of acc_t the compiler maps onto the target's registers: LN_EXT_VEC_BYTES wide
// (32 by default: one AVX2 register, two SSE/NEON ones in the generic build; 64, one
// AVX-512 register, in the AVX-512 build).
#ifndef LN_EXT_VEC_BYTES
#define LN_EXT_VEC_BYTES 32
#endif
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(LN_EXT_VEC_BYTES)));
  static constexpr int width = LN_EXT_VEC_BYTES / sizeof(acc_t);
};
using vf = Vec<float>::type;
using vd = Vec<double>::type;
typedef uint16_t vu16 __attribute__((vector_size(LN_EXT_VEC_BYTES / 2)));
typedef uint32_t vu32 __attribute__((vector_size(LN_EXT_VEC_BYTES)));

// vload(p): p[0..width) as a Vec of acc_t; vstore(p, v) the reverse (rounding as store()).
inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vd vload(const double* p) { vd v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
#if defined(LN_EXT_AVX512)  // the AVX2 build's conversions on 16 lanes
inline vf vload(const bf16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<vf>(_mm512_slli_epi32(u, 16));
}
// v rounded to 16 lanes of bfloat16 / float16 bits (vstore's, and stream_store's).
inline __m256i narrow(bf16_t*, vf v) {
  const __m512i u = reinterpret_cast<__m512i>(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512 f = reinterpret_cast<__m512>(v);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m512i h32 = _mm512_mask_blend_epi32(is_nan, rounded, _mm512_set1_epi32(0x7fc0));
  // Every 32-bit lane is below 2^16: narrowing keeps it whole.
  return _mm512_cvtepi32_epi16(h32);
}
inline __m256i narrow(f16_t*, vf v) {
  return _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT);
}
inline void vstore(bf16_t* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(p, v)); }
inline vf vload(const f16_t* p) {
  return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
inline void vstore(f16_t* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(p, v)); }
// A whole narrowed vector stored around the caches (p aligned to its 32 bytes).
template <typename Y>
inline void stream_narrowed(Y* p, vf v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(p, v));
}
#elif defined(LN_EXT_F16C)  // the AVX2 build: the compiler's own widening/narrowing is slow here
inline vf vload(const bf16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm256_slli_epi32(u, 16));
}
// v rounded to 8 lanes of bfloat16 / float16 bits (vstore's, and stream_store's).
inline __m128i narrow(bf16_t*, vf v) {
  const __m256i u = reinterpret_cast<__m256i>(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256 f = reinterpret_cast<__m256>(v);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  const __m256i h32 = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), is_nan);
  // Pack the 32-bit lanes (each < 2^16) to 16 bits; packus works per 128-bit half.
  return _mm_packus_epi32(_mm256_castsi256_si128(h32), _mm256_extracti128_si256(h32, 1));
}
inline __m128i narrow(f16_t*, vf v) { return _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT); }
inline void vstore(bf16_t* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(p, v)); }
// The compiler does not vectorize _Float16 conversions by itself: F16C does it.
inline vf vload(const f16_t* p) {
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(f16_t* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(p, v)); }
// A whole narrowed vector stored around the caches (p aligned to its 16 bytes).
template <typename Y>
inline void stream_narrowed(Y* p, vf v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(p, v));
}
#else
inline vf vload(const bf16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void vstore(bf16_t* p, vf v) {
  vu32 u;
  std::memcpy(&u, &v, sizeof u);
  const vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu32 is_nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
  const vu16 h = __builtin_convertvector((rounded & ~is_nan) | (is_nan & 0x7fc0u), vu16);
  std::memcpy(p, &h, sizeof h);
}
inline vf vload(const f16_t* p) {
  vf v;
  for (int l = 0; l < Vec<float>::width; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline void vstore(f16_t* p, vf v) {
  for (int l = 0; l < Vec<float>::width; ++l) p[l] = static_cast<f16_t>(v[l]);
}
#endif

// A fixed tree over the lanes: the upper half added to the lower half, lane by lane, until
// one lane is left (as vector adds: lane by lane extraction costs a short row ~10%).
template <typename V, size_t... I>
inline auto add_halves(V v, std::index_sequence<I...>) {
  constexpr size_t half = sizeof...(I);
  return __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + half)...);
}
template <typename V>
inline auto hsum(V v) {
  constexpr size_t W = sizeof(V) / sizeof(v[0]);
  if constexpr (W == 2) {
    return v[0] + v[1];
  } else {
    return hsum(add_halves(v, std::make_index_sequence<W / 2>{}));
  }
}

constexpr int64_t kChunk = 1024;  // elements; a multiple of 2 * Vec width

// K sums over a row at once: fv(i, s) adds the terms of elements [i, i + width) to
// the vectors s[0..K); fs(i, t) those of element i to the scalars t[0..K). Two vectors
// per sum in flight, folded into running totals every kChunk elements.
template <int K, typename acc_t, typename FV, typename FS>
inline void row_sums(int64_t n, FV fv, FS fs, acc_t (&out)[K]) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  V total[K] = {};
  const int64_t body = n - n % (2 * W);
  for (int64_t c = 0; c < body; c += kChunk) {
    const int64_t stop = std::min(body, c + kChunk);
    V even[K] = {}, odd[K] = {};
    for (int64_t i = c; i < stop; i += 2 * W) {
      fv(i, even);
      fv(i + W, odd);
    }
    for (int k = 0; k < K; ++k) total[k] += even[k] + odd[k];
  }
  acc_t tail[K] = {};
  for (int64_t i = body; i < n; ++i) fs(i, tail);
  for (int k = 0; k < K; ++k) out[k] = hsum(total[k]) + tail[k];
}

// The moments of a row, as a shift K (the mean of its first kChunk elements, which
// for a row of up to kChunk elements is the row's mean up to rounding), the residual
// mean c of d = x - K and the sum of squared deviations m2 = sum(d^2) - n c^2: the
// "corrected two-pass" algorithm. x - K is exact for the elements near the mean
// (Sterbenz), so rows whose mean is large next to their spread lose nothing to the
// rounding of K, and c repairs it. mean = K + c; every x - mean is computed as
// (x - K) - c. One pass over a longer row after the first chunk (from L1); for a row
// longer than kChunk, K is off the mean by at most sqrt(n / kChunk) standard
// deviations, which costs the m2 subtraction at most that factor in eps.
template <typename acc_t>
struct RowMoments {
  acc_t shift, residual, m2;
  acc_t mean() const { return shift + residual; }
};

// inv_n = 1 / n, from the caller (once per call, not per row: a division is ~4x a
// multiply, and short rows are mostly per-row work).
template <typename T, typename acc_t>
inline RowMoments<acc_t> row_moments(const T* __restrict x, int64_t n, acc_t inv_n) {
  using V = typename Vec<acc_t>::type;
  const int64_t head = std::min(kChunk, n);
  const acc_t inv_head = n <= kChunk ? inv_n : acc_t(1) / acc_t(kChunk);
  acc_t sum[1];
  row_sums<1, acc_t>(
      head, [x](int64_t i, V (&s)[1]) { s[0] += vload(x + i); },
      [x](int64_t i, acc_t (&t)[1]) { t[0] += to_acc(x[i]); }, sum);
  const acc_t shift = sum[0] * inv_head;
  acc_t dev[2];  // sum(d), sum(d^2)
  row_sums<2, acc_t>(
      n,
      [x, shift](int64_t i, V (&s)[2]) {
        const V d = vload(x + i) - shift;
        s[0] += d;
        s[1] += d * d;
      },
      [x, shift](int64_t i, acc_t (&t)[2]) {
        const acc_t d = to_acc(x[i]) - shift;
        t[0] += d;
        t[1] += d * d;
      },
      dev);
  const acc_t residual = dev[0] * inv_n;
  return {shift, residual, std::max(dev[1] - dev[0] * residual, acc_t(0))};
}

// Sum of squares of a row (RMSNorm's statistic), one pass.
template <typename T, typename acc_t>
inline acc_t row_sum_squares(const T* __restrict x, int64_t n) {
  using V = typename Vec<acc_t>::type;
  acc_t sq[1];
  row_sums<1, acc_t>(
      n, [x](int64_t i, V (&s)[1]) { const V v = vload(x + i); s[0] += v * v; },
      [x](int64_t i, acc_t (&t)[1]) { const acc_t v = to_acc(x[i]); t[0] += v * v; }, sq);
  return sq[0];
}

// A whole vector stored around the caches (a non-temporal store), where the build has one
// for Y and p is aligned for it; false: the caller stores it as usual. A range of rows that
// streamed ends with stream_fence().
#if defined(LN_EXT_AVX512) || defined(LN_EXT_F16C)
#define LN_EXT_STREAM_STORES 1
#endif
template <typename Y, typename V>
inline bool stream_store(Y* p, V v) {
#ifdef LN_EXT_STREAM_STORES
  constexpr size_t kStoreBytes = sizeof(V) / sizeof(v[0]) * sizeof(Y);  // the narrowed vector's
  if (reinterpret_cast<uintptr_t>(p) % kStoreBytes != 0) return false;
  if constexpr (std::is_same_v<Y, float>) {
#ifdef LN_EXT_AVX512
    _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#else
    _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#endif
    return true;
  } else if constexpr (std::is_same_v<Y, bf16_t> || std::is_same_v<Y, f16_t>) {
    stream_narrowed(p, v);
    return true;
  }
#endif
  return false;
}
// Streamed stores are weakly ordered: fenced before the thread reports its rows done.
inline void stream_fence() {
#ifdef LN_EXT_STREAM_STORES
  _mm_sfence();
#endif
}

// One row of the forward: y = xhat * (w + w_off) + b (LayerNorm, kCentered) or y = xhat *
// (w + w_off) (RMSNorm: xhat = x * rstd, no mean, no bias); mean (LayerNorm only) and rstd
// stored; y streamed around the caches when `stream`.
template <typename T, typename Y, typename P, typename acc_t, bool kCentered>
inline void norm_row(const T* __restrict xr, const P* __restrict w, acc_t w_off, const P* __restrict b,
                     Y* __restrict yr, acc_t* mean, acc_t* rstd, int64_t n, acc_t inv_n, acc_t eps,
                     bool stream) {
  constexpr int W = Vec<acc_t>::width;
  acc_t k = 0, c = 0, m2;
  if constexpr (kCentered) {
    const RowMoments<acc_t> m = row_moments<T, acc_t>(xr, n, inv_n);
    k = m.shift;
    c = m.residual;
    m2 = m.m2;
    *mean = m.mean();
  } else {
    m2 = row_sum_squares<T, acc_t>(xr, n);
  }
  const acc_t rs = acc_t(1) / std::sqrt(m2 * inv_n + eps);
  *rstd = rs;
  const auto y_of = [&](int64_t i) {
    if constexpr (kCentered) {
      return ((vload(xr + i) - k) - c) * rs * (vload(w + i) + w_off) + vload(b + i);
    } else {
      return vload(xr + i) * rs * (vload(w + i) + w_off);
    }
  };
  const auto store_one = [&](int64_t i) {
    if constexpr (kCentered) {
      store(yr + i, ((to_acc(xr[i]) - k) - c) * rs * (to_acc(w[i]) + w_off) + to_acc(b[i]));
    } else {
      store(yr + i, to_acc(xr[i]) * rs * (to_acc(w[i]) + w_off));
    }
  };
  // Streaming: elements one by one up to the first vector-aligned y (rows of any n start
  // anywhere), so that the whole vectors after it can go around the caches.
  int64_t head = 0;
  if (stream) {
    constexpr int64_t kBytes = W * sizeof(Y);  // one stored vector
    const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(yr) % kBytes);
    head = misalign % sizeof(Y) ? 0 : std::min(n, ((kBytes - misalign) % kBytes) / int64_t{sizeof(Y)});
  }
  int64_t i = 0;
  for (; i < head; ++i) store_one(i);
  for (; i + W <= n; i += W) {  // `stream` is loop-invariant: unswitched
    const auto v = y_of(i);
    if (!(stream && stream_store(yr + i, v))) vstore(yr + i, v);
  }
  for (; i < n; ++i) store_one(i);
}

// h = x + residual for one row, added in acc_t and rounded once to H (the residual
// stream's dtype, x's or float32): the row the norm then reads is the h returned.
template <typename T, typename H>
inline void add_row(const T* __restrict xr, const H* __restrict rr, H* __restrict hr, int64_t n) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  constexpr int W = Vec<acc_t>::width;
  const int64_t body = n - n % W;
  for (int64_t i = 0; i < body; i += W) vstore(hr + i, vload(xr + i) + vload(rr + i));
  for (int64_t i = body; i < n; ++i) store(hr + i, to_acc(xr[i]) + to_acc(rr[i]));
}

// Rows [begin, end): with a residual, h = x + residual first (written out, then
// normalized from cache), else x itself.
template <typename T, typename H, typename Y, typename P, bool kCentered>
void fwd_rows(const FwdCall& a, int64_t begin, int64_t end) {
  using acc_t = std::conditional_t<std::is_same_v<H, double>, double, float>;
  const auto* x = static_cast<const T*>(a.x);
  const auto* res = static_cast<const H*>(a.residual);
  auto* h = static_cast<H*>(a.h);
  const auto* w = static_cast<const P*>(a.w);
  const auto w_off = static_cast<acc_t>(a.weight_offset);
  const auto* b = static_cast<const P*>(a.b);
  auto* y = static_cast<Y*>(a.y);
  auto* mean = static_cast<acc_t*>(a.mean);
  auto* rstd = static_cast<acc_t*>(a.rstd);
  const int64_t n = a.n;
  const auto eps = static_cast<acc_t>(a.eps);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t r = begin; r < end; ++r) {
    acc_t* mean_r = kCentered ? mean + r : nullptr;
    if (res != nullptr) {
      add_row(x + r * n, res + r * n, h + r * n, n);
      norm_row<H, Y, P, acc_t, kCentered>(h + r * n, w, w_off, b, y + r * n, mean_r, rstd + r, n, inv_n, eps,
                                          a.stream_y);
    } else if constexpr (std::is_same_v<T, H>) {
      norm_row<T, Y, P, acc_t, kCentered>(x + r * n, w, w_off, b, y + r * n, mean_r, rstd + r, n, inv_n, eps,
                                          a.stream_y);
    }
  }
  if (a.stream_y) stream_fence();
}

// dx of one element (or a vector of them): rstd / n * (n g - sum(g) - xhat sum(g xhat)),
// g = dy * w, which is rstd * (g - mean(g) - xhat mean(g xhat)) written so that g feeds a
// multiply. A compiler contracts `dy * w - mean(g)` into a fused multiply-add of the exact
// product, while sum(g) was added from rounded products: for N = 1 (every xhat = 0, dx = 0
// exactly) that left the product's rounding error times rstd = 1 / sqrt(eps). A product
// that is multiplied again is never fused into the subtraction, so n g - sum(g) cancels
// exactly where the math does. With xhat = (d - c) rstd (d = x - mean) the row's constants
// fold into DxRow, so an element costs d, g, two multiply-adds and a multiply; every
// intermediate keeps the size of g (a coefficient rstd^2 sum(g xhat) / n would overflow
// float for a spread near 1e-20 with eps = 0). RMSNorm: sum(g) = c = 0.
template <typename acc_t>
struct DxRow {
  acc_t n, sum_g, d_coef, rstd_n;  // dx = rstd_n ((n g - sum_g) - d_coef d)
  DxRow() = default;
  DxRow(acc_t n_, acc_t sum_g_, acc_t sum_gx, acc_t c, acc_t rstd, acc_t inv_n)
      : n(n_), sum_g(sum_g_ - c * (rstd * sum_gx)), d_coef(rstd * sum_gx), rstd_n(rstd * inv_n) {}
  template <typename V>
  V operator()(V g, V d) const {
    return rstd_n * ((g * n - sum_g) - d_coef * d);
  }
};

// The shift of xhat a row may keep in its dweight terms: 16 ulps of 1. The stored mean
// is off by about |mean| * 2^-24 (float), plus the sum's rounding, so rows whose |mean|
// is below some 30 spreads stay under it; their dweight then carries an error of the
// size torch's own rounded mean gives it. Rows far off centre are corrected.
template <typename acc_t>
constexpr acc_t kNegligibleShift = 16 * std::numeric_limits<acc_t>::epsilon();

// Backward of R consecutive rows from `r` (R = 1 or 2), g = dy * gain, gain = w + weight_offset.
// Pass 1, LayerNorm: per row sum(d), sum(g) and sum(g * d), d = x - mean (RMSNorm: d = x,
// only sum(g * x)). d carries the rounding error of the stored float mean (up to half an
// ulp of a mean that may be far larger than the row's spread) as a shift of every
// element; the row's residual c = sum(d) / n takes it out again: xhat = (d - c) * rstd,
// sum(g xhat) = rstd (sum(g d) - c sum(g)). Pass 2: dx from that xhat (plus dh, the
// gradient that reaches h = x + residual from outside the norm, when given).
// The block's partial dweight/dbias: a single row (R = 1: rows below 3072 elements, in
// L1, and the odd last row of a range of longer ones) adds them in pass 1 from d * rstd,
// as the only pass when dx is not asked for, and pass 2 takes dy * c * rstd back out of
// dweight for a row whose shift c * rstd exceeds kNegligibleShift; a pair adds them in pass 2 from xhat (in pass 1 its twelve sums and
// the partials would not fit the registers). Two rows at once load w and the partials,
// and store the partials, once per pair: rows of a few thousand floats no longer stay in
// L1 from one pass to the next, and that saves a quarter of the passes' L2 traffic.
template <int R, typename T, typename D, typename P, typename acc_t, bool kParams, bool kCentered>
inline void bwd_row_group(const BwdCall& a, const P* __restrict w, acc_t* __restrict dw,
                          acc_t* __restrict db, int64_t r, acc_t inv_n) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  constexpr int kSums = kCentered ? 3 : 1;  // sum(d), sum(g), sum(g * d) | sum(g * x)
  constexpr bool kParamsInPass1 = kParams && R == 1;
  const int64_t n = a.n;
  const int64_t body = n - n % W;
  const acc_t nf = static_cast<acc_t>(n);
  const auto w_off = static_cast<acc_t>(a.weight_offset);
  const T* xr[R];
  const D* dyr[R];
  acc_t mu[R], rs[R];
  for (int k = 0; k < R; ++k) {
    xr[k] = static_cast<const T*>(a.x) + (r + k) * n;
    dyr[k] = static_cast<const D*>(a.dy) + (r + k) * n;
    mu[k] = kCentered ? static_cast<const acc_t*>(a.mean)[r + k] : acc_t(0);
    rs[k] = static_cast<const acc_t*>(a.rstd)[r + k];
  }
  acc_t sums[kSums * R];
  row_sums<kSums * R, acc_t>(
      n,
      [=](int64_t i, V (&s)[kSums * R]) {  // by value: stores through dw must not reload mu, rs...
        const V wv = vload(w + i) + w_off;
        V dw_i, db_i;
        if constexpr (kParamsInPass1) {
          dw_i = vload(dw + i);
          if constexpr (kCentered) db_i = vload(db + i);
        }
        for (int k = 0; k < R; ++k) {
          const V dy = vload(dyr[k] + i);
          const V g = dy * wv;
          const V d = vload(xr[k] + i) - mu[k];  // RMSNorm: mu = 0, x - 0 is x
          if constexpr (kCentered) {
            s[3 * k] += d;
            s[3 * k + 1] += g;
            s[3 * k + 2] += g * d;
          } else {
            s[k] += g * d;
          }
          if constexpr (kParamsInPass1) {
            dw_i += dy * (d * rs[k]);
            if constexpr (kCentered) db_i += dy;
          }
        }
        if constexpr (kParamsInPass1) {
          vstore(dw + i, dw_i);
          if constexpr (kCentered) vstore(db + i, db_i);
        }
      },
      [=](int64_t i, acc_t (&t)[kSums * R]) {
        for (int k = 0; k < R; ++k) {
          const acc_t dy = to_acc(dyr[k][i]);
          const acc_t g = dy * (to_acc(w[i]) + w_off);
          const acc_t d = to_acc(xr[k][i]) - mu[k];
          if constexpr (kCentered) {
            t[3 * k] += d;
            t[3 * k + 1] += g;
            t[3 * k + 2] += g * d;
          } else {
            t[k] += g * d;
          }
          if constexpr (kParamsInPass1) {
            dw[i] += dy * (d * rs[k]);
            if constexpr (kCentered) db[i] += dy;
          }
        }
      },
      sums);
  T* dxr[R];
  const T* dhr[R];
  acc_t c[R], shift[R];
  DxRow<acc_t> dx_row[R];
  bool wants_dx = false, shifted = false;
  for (int k = 0; k < R; ++k) {
    dxr[k] = a.dx == nullptr ? nullptr : static_cast<T*>(a.dx) + (r + k) * n;
    dhr[k] = a.dh == nullptr ? nullptr : static_cast<const T*>(a.dh) + (r + k) * n;
    wants_dx |= dxr[k] != nullptr;
    acc_t sum_g = 0, sum_gx;  // sum(g), sum(g * xhat)
    if constexpr (kCentered) {
      c[k] = sums[3 * k] * inv_n;
      sum_g = sums[3 * k + 1];
      sum_gx = rs[k] * (sums[3 * k + 2] - c[k] * sum_g);
    } else {
      c[k] = 0;
      sum_gx = rs[k] * sums[k];
    }
    dx_row[k] = DxRow<acc_t>(nf, sum_g, sum_gx, c[k], rs[k], inv_n);
    // Written as !(<=) so that a NaN shift (sum(d) overflowed: deviations near the float
    // maximum) takes the correcting path and its NaN reaches dweight, as xhat's would.
    const acc_t row_shift = c[k] * rs[k];
    shift[k] = !(std::abs(row_shift) <= kNegligibleShift<acc_t>) ? row_shift : acc_t(0);
    shifted |= shift[k] != acc_t(0);
  }
  // What pass 2 does to the partials, a template flag so that each loop has only its own
  // work: nothing, take the shift out of dweight (after pass 1 added them), or add both.
  enum Partials { kNone, kUnshift, kAdd };
  const auto pass2 = [&](auto partials) {
    constexpr Partials p = decltype(partials)::value;
    for (int64_t i = 0; i < body; i += W) {
      const V wv = vload(w + i) + w_off;
      V dw_i, db_i;
      if constexpr (p != kNone) dw_i = vload(dw + i);
      if constexpr (p == kAdd && kCentered) db_i = vload(db + i);
      for (int k = 0; k < R; ++k) {
        const V dy = vload(dyr[k] + i);
        const V d = vload(xr[k] + i) - mu[k];  // RMSNorm: mu = c = 0
        if (dxr[k] != nullptr) {  // loop-invariant (so are dh's and stream_dx): unswitched
          V out = dx_row[k](dy * wv, d);
          if (dhr[k] != nullptr) out += vload(dhr[k] + i);
          if (!(a.stream_dx && stream_store(dxr[k] + i, out))) vstore(dxr[k] + i, out);
        }
        if constexpr (p == kUnshift) dw_i -= dy * shift[k];
        if constexpr (p == kAdd) {
          dw_i += dy * ((d - c[k]) * rs[k]);
          if constexpr (kCentered) db_i += dy;
        }
      }
      if constexpr (p != kNone) vstore(dw + i, dw_i);
      if constexpr (p == kAdd && kCentered) vstore(db + i, db_i);
    }
    for (int64_t i = body; i < n; ++i) {
      for (int k = 0; k < R; ++k) {
        const acc_t dy = to_acc(dyr[k][i]);
        const acc_t d = to_acc(xr[k][i]) - mu[k];
        if (dxr[k] != nullptr) {
          acc_t out = dx_row[k](dy * (to_acc(w[i]) + w_off), d);
          if (dhr[k] != nullptr) out += to_acc(dhr[k][i]);
          store(dxr[k] + i, out);
        }
        if constexpr (p == kUnshift) dw[i] -= dy * shift[k];
        if constexpr (p == kAdd) {
          dw[i] += dy * ((d - c[k]) * rs[k]);
          if constexpr (kCentered) db[i] += dy;
        }
      }
    }
  };
  using std::integral_constant;
  if constexpr (kParams && !kParamsInPass1) {
    pass2(integral_constant<Partials, kAdd>{});
  } else if (kParamsInPass1 && shifted) {
    pass2(integral_constant<Partials, kUnshift>{});
  } else if (wants_dx) {
    pass2(integral_constant<Partials, kNone>{});
  }
}

template <typename T, typename D, typename P, bool kParams, bool kCentered>
void bwd_rows(const BwdCall& a, void* dw_part, void* db_part, int64_t begin, int64_t end) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const auto* w = static_cast<const P*>(a.w);
  auto* dw = static_cast<acc_t*>(dw_part);
  auto* db = static_cast<acc_t*>(db_part);
  // Pairs from kPairedRowsMinCols columns on (1 thread of an AMD EPYC, float32, 2^21
  // elements: N = 4096 0.90 -> 0.82 ms, 16384 0.99 -> 0.80; below it the pair's vector
  // sums no longer fit the registers: N = 1024 0.49 -> 0.69 ms, measured with the
  // backward before the mean's residual).
  constexpr int64_t kPairedRowsMinCols = 3072;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(a.n);
  int64_t r = begin;
  if (a.n >= kPairedRowsMinCols) {
    for (; r + 2 <= end; r += 2) bwd_row_group<2, T, D, P, acc_t, kParams, kCentered>(a, w, dw, db, r, inv_n);
  }
  for (; r < end; ++r) bwd_row_group<1, T, D, P, acc_t, kParams, kCentered>(a, w, dw, db, r, inv_n);
  if (a.stream_dx) stream_fence();
}

// ---------------------------------------------------------------- dtype dispatch
// The dtype combinations (row_kernels.h); anything else is refused by the torch side.

template <typename T>
constexpr bool kReduced = std::is_same_v<T, f16_t> || std::is_same_v<T, bf16_t>;

// f(T{}) for the element type of e.
template <typename F>
inline void with_elem(Elem e, F&& f) {
  switch (e) {
    case Elem::f32: return f(float{});
    case Elem::f64: return f(double{});
    case Elem::f16: return f(f16_t{});
    case Elem::bf16: return f(bf16_t{});
  }
}

// f(P{}) for the parameters' element type: x's, or float32 beside a 16-bit x (read as they
// are: converting them to float32 first cost a 16-bit call of a few rows a quarter of its time).
template <typename T, typename F>
inline void with_param_elem(Elem p_t, F&& f) {
  if constexpr (kReduced<T>) {
    if (p_t == Elem::f32) return f(float{});
  }
  f(T{});
}

template <typename T, typename H, bool kCentered>
void fwd_as(const FwdCall& a, int64_t begin, int64_t end) {
  with_param_elem<T>(a.p_t, [&](auto p_tag) {
    using P = decltype(p_tag);
    // y: x's dtype, or float32 for a 16-bit x (autocast).
    if constexpr (kReduced<T>) {
      if (a.y_t == Elem::f32) return fwd_rows<T, H, float, P, kCentered>(a, begin, end);
    }
    fwd_rows<T, H, T, P, kCentered>(a, begin, end);
  });
}

template <bool kCentered>
void fwd_centered(const FwdCall& a, int64_t begin, int64_t end) {
  with_elem(a.x_t, [&](auto x_tag) {
    using T = decltype(x_tag);
    // h (with a residual): x's dtype or, for a 16-bit x, float32.
    if constexpr (kReduced<T>) {
      if (a.residual != nullptr && a.h_t == Elem::f32) return fwd_as<T, float, kCentered>(a, begin, end);
    }
    fwd_as<T, T, kCentered>(a, begin, end);
  });
}

void fwd(const FwdCall& a, int64_t begin, int64_t end) {
  a.centered ? fwd_centered<true>(a, begin, end) : fwd_centered<false>(a, begin, end);
}

template <bool kCentered>
void bwd_centered(const BwdCall& a, void* dw_part, void* db_part, int64_t begin, int64_t end) {
  with_elem(a.x_t, [&](auto x_tag) {
    using T = decltype(x_tag);
    auto run = [&](auto dy_tag) {
      using D = decltype(dy_tag);
      with_param_elem<T>(a.p_t, [&](auto p_tag) {
        using P = decltype(p_tag);
        if (dw_part != nullptr) return bwd_rows<T, D, P, true, kCentered>(a, dw_part, db_part, begin, end);
        bwd_rows<T, D, P, false, kCentered>(a, nullptr, nullptr, begin, end);
      });
    };
    // dy: x's dtype, or float32 for a 16-bit x (autocast).
    if constexpr (kReduced<T>) {
      if (a.dy_t == Elem::f32) return run(float{});
    }
    run(T{});
  });
}

void bwd(const BwdCall& a, void* dw_part, void* db_part, int64_t begin, int64_t end) {
  a.centered ? bwd_centered<true>(a, dw_part, db_part, begin, end)
             : bwd_centered<false>(a, dw_part, db_part, begin, end);
}

RowKernels make_row_kernels() { return RowKernels{LN_EXT_ISA_NAME, &fwd, &bwd}; }

}  // namespace
}  // namespace ln_ext::cpu

#pragma GCC diagnostic pop
