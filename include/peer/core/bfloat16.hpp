// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_BFLOAT16_HPP
#define PEER_CORE_BFLOAT16_HPP

/// \file
/// bfloat16 storage for large tables, and the row conversions and row arithmetic the table kernels use.
///
/// A bf16 value is the top 16 bits of a float (1 sign, 8 exponent, 7 mantissa bits): the same range as
/// float, 3 significant decimal digits. Tables may be stored in it; everything is computed and accumulated
/// in float (or double), so a bf16 table halves the bytes a gather moves and changes nothing else.
///
/// - widen (bf16 -> float): exact, bits << 16.
/// - narrow to nearest (float -> bf16): round to nearest, ties to even, on the bit pattern:
///   (bits + 0x7fff + ((bits >> 16) & 1)) >> 16. Inf stays inf, finite values beyond the largest bf16
///   (3.39e38) round to inf, subnormals round like any other value (nothing is flushed to zero), and every
///   NaN becomes the quiet NaN 0x7fc0 with its sign (what Eigen::bfloat16 gives).
/// - narrow stochastically: (bits + r) >> 16 with r uniform in [0, 2^16): x between the neighbours lo < hi
///   rounds up with probability (x - lo) / (hi - lo), so E[round(x)] = x (unbiased; the bits are linear
///   within a binade and the carry moves into the next one correctly). Small updates that nearest rounding
///   would lose entirely (|dp| < half a unit in the last place) survive in expectation. NaN as above.
///   r comes from a counter-based stream keyed by (seed, tensor, step, row) and the column, so a rounded
///   row is a pure function of those: identical for any thread count and any order of rows.
///
/// Vector paths are chosen by the compiler flags of the including translation unit (-mavx2, -mavx512f,
/// -march=native): AVX-512F, AVX2, else portable loops; all give bitwise the same conversions (tested),
/// and the same dot products and axpys within each path. AVX512_BF16's instructions are not used: its
/// conversion treats subnormal inputs as zero (results would depend on the host) and its dot product
/// needs x in bf16 too (it would round the activations).

#include <cstdint>
#include <cstring>

#include <Eigen/Core>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "peer/core/types.hpp"

namespace peer {

/// The bf16 storage type: Eigen's (trivially copyable, 2 bytes, converts to and from float).
using bfloat16 = Eigen::bfloat16;
static_assert(sizeof(bfloat16) == 2, "peer: bfloat16 must be 2 bytes");

namespace detail {

inline std::uint32_t float_bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float float_from_bits(std::uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
inline std::uint16_t bf16_bits(bfloat16 x) { return Eigen::numext::bit_cast<std::uint16_t>(x); }
inline bfloat16 bf16_from_bits(std::uint16_t b) { return Eigen::numext::bit_cast<bfloat16>(b); }

/// bf16 -> float, exact.
inline float widen_bf16(bfloat16 x) { return float_from_bits(static_cast<std::uint32_t>(bf16_bits(x)) << 16); }

// The NaN rule shared by both roundings: any NaN -> quiet NaN 0x7fc0 with the input's sign.
inline bool is_nan_bits(std::uint32_t b) { return (b & 0x7fffffffu) > 0x7f800000u; }
inline std::uint16_t quiet_nan_bits(std::uint32_t b) { return static_cast<std::uint16_t>(((b >> 16) & 0x8000u) | 0x7fc0u); }

/// float -> bf16, round to nearest, ties to even (see the file comment for inf, NaN and subnormals).
inline bfloat16 narrow_bf16_nearest(float x) {
  const std::uint32_t b = float_bits(x);
  if (is_nan_bits(b)) return bf16_from_bits(quiet_nan_bits(b));
  return bf16_from_bits(static_cast<std::uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16));
}

/// float -> bf16, stochastic: rounds up with probability (low 16 bits of x) / 2^16, given r16 uniform in
/// [0, 2^16).
inline bfloat16 narrow_bf16_stochastic(float x, std::uint32_t r16) {
  const std::uint32_t b = float_bits(x);
  if (is_nan_bits(b)) return bf16_from_bits(quiet_nan_bits(b));
  return bf16_from_bits(static_cast<std::uint16_t>((b + r16) >> 16));
}

/// The random stream of one row's stochastic rounding: columns 2i and 2i + 1 share one hash,
///   h_i = hash32(key + i * 0x9e3779b9),   r_{2i} = h_i >> 16,   r_{2i+1} = h_i & 0xffff,
/// hash32 being a 32-bit integer finalizer with good avalanche (two multiply-xorshift rounds) that the
/// vector paths compute in 8 or 16 lanes. One hash feeds two 16-bit draws: the multiplies were most of a
/// bf16 row update's arithmetic (docs/benchmarks.md). `key` is 32 bits of a SplitMix64 mix of (seed,
/// tensor, step, row) made by the caller (TableRowWriter::stream), so rows and steps draw independent
/// streams.
struct RoundingStream {
  std::uint32_t key = 0;
};

inline std::uint32_t hash32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
/// Column j's 16 random bits of a row's stream.
inline std::uint32_t rounding_bits(RoundingStream s, std::uint32_t j) {
  const std::uint32_t h = hash32(s.key + (j >> 1) * 0x9e3779b9u);
  return (j & 1u) ? (h & 0xffffu) : (h >> 16);
}

// GCC 12's AVX-512 intrinsic headers start from _mm512_undefined_*() values, which its -O2 flow analysis
// reports as maybe-uninitialized once inlined here (GCC bug 105593); the warning is false and is silenced
// for the vector code of this header only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__AVX512F__)
inline __m512 widen16(const bfloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 floats' bit patterns -> 16 bf16 given the 32-bit sums to truncate; NaN lanes get the quiet NaN.
// NaN lanes are found on the bit patterns (|bits| > inf: a float compare would be folded away under
// -ffinite-math-only, docs/reliability.md); the blend that replaces them runs only when there is one (never
// in a healthy update; it was a third of a stochastic rounding's vector work).
inline void narrow16_store(__m512i bits, __m512i sums, bfloat16* out) {
  __m512i r = _mm512_srli_epi32(sums, 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  if (__builtin_expect(nan != 0, 0)) {
    const __m512i qnan = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x8000)),
                                         _mm512_set1_epi32(0x7fc0));
    r = _mm512_mask_blend_epi32(nan, r, qnan);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}
inline __m512i hash16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
// The draws of the 32 columns [2 pair, 2 pair + 32) of stream s, as two blocks of 16: the 16 pair
// hashes h_i, then columns 2i and 2i + 1 take the high and the low 16 bits of h_i. Rotating each lane by
// 16 puts the high half in the lane's first word, so widening the words in memory order gives the draws
// in column order (two widenings instead of a permute, a variable shift and a mask per block).
inline void pair_draws32(RoundingStream s, std::uint32_t pair, __m512i& first, __m512i& second) {
  const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(0x9e3779b9u)));
  const std::uint32_t base = s.key + pair * 0x9e3779b9u;
  const __m512i swapped = _mm512_rol_epi32(hash16(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)), lane)), 16);
  first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(swapped));
  second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(swapped, 1));
}
#elif defined(__AVX2__)
inline __m256 widen8(const bfloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 8 lanes: the truncated (>> 16) result, NaN lanes replaced by the quiet NaN (found and blended as in
// narrow16_store).
inline __m256i narrow8(__m256i bits, __m256i sums) {
  __m256i r = _mm256_srli_epi32(sums, 16);
  // Signed compare is safe: the masked value has the sign bit clear.
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  if (__builtin_expect(_mm256_movemask_epi8(nan) != 0, 0)) {
    const __m256i qnan = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x8000)),
                                         _mm256_set1_epi32(0x7fc0));
    r = _mm256_blendv_epi8(r, qnan, nan);
  }
  return r;
}
// Two 8-lane results (each < 2^16) -> 16 bf16 in order.
inline void store16(__m256i lo, __m256i hi, bfloat16* out) {
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
}
inline __m256i hash8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
// The draws of the 16 columns [2 pair, 2 pair + 16) of stream s, as two blocks of 8 (as pair_draws32:
// swapping each hash's 16-bit halves, a byte shuffle, then widening the words in order).
inline void pair_draws16(RoundingStream s, std::uint32_t pair, __m256i& first, __m256i& second) {
  const __m256i lane = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(0x9e3779b9u)));
  const std::uint32_t base = s.key + pair * 0x9e3779b9u;
  const __m256i h = hash8(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), lane));
  const __m256i swapped = _mm256_shuffle_epi8(h, _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
                                                                  2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  first = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(swapped));
  second = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(swapped, 1));
}
#endif

/// out[0, n) = widen(in[0, n)).
inline void widen_row(const bfloat16* in, float* out, Index n) {
  Index j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, widen16(in + j));
#elif defined(__AVX2__)
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, widen8(in + j));
#endif
  for (; j < n; ++j) out[j] = widen_bf16(in[j]);
}
inline void widen_row(const bfloat16* in, double* out, Index n) {
  for (Index j = 0; j < n; ++j) out[j] = static_cast<double>(widen_bf16(in[j]));
}

/// out[0, n) = nearest(in[0, n)).
inline void narrow_row_nearest(const float* in, bfloat16* out, Index n) {
  Index j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(in + j));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    narrow16_store(b, _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), out + j);
  }
#elif defined(__AVX2__)
  for (; j + 16 <= n; j += 16) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(in + j + 8 * h));
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      r[h] = narrow8(b, _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)));
    }
    store16(r[0], r[1], out + j);
  }
#endif
  for (; j < n; ++j) out[j] = narrow_bf16_nearest(in[j]);
}
inline void narrow_row_nearest(const double* in, bfloat16* out, Index n) {
  for (Index j = 0; j < n; ++j) out[j] = narrow_bf16_nearest(static_cast<float>(in[j]));
}

/// out[0, n) = stochastic(in[0, n)) with element j of the row drawing from `stream` at column first + j.
inline void narrow_row_stochastic(const float* in, bfloat16* out, Index n, RoundingStream stream, std::uint32_t first = 0) {
  Index j = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  // The vector blocks start at even columns, so that each hash lane serves one whole pair.
  if (n > 0 && (first & 1u)) {
    out[0] = narrow_bf16_stochastic(in[0], rounding_bits(stream, first));
    j = 1;
  }
#endif
#if defined(__AVX512F__)
  // One pair_draws32 serves 32 columns, or the last 16.
  for (; j + 16 <= n;) {
    __m512i draws[2];
    pair_draws32(stream, (first + static_cast<std::uint32_t>(j)) >> 1, draws[0], draws[1]);
    for (int half = 0; half < 2 && j + 16 <= n; ++half, j += 16) {
      const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(in + j));
      narrow16_store(b, _mm512_add_epi32(b, draws[half]), out + j);
    }
  }
#elif defined(__AVX2__)
  for (; j + 16 <= n; j += 16) {
    __m256i draws[2];
    pair_draws16(stream, (first + static_cast<std::uint32_t>(j)) >> 1, draws[0], draws[1]);
    __m256i res[2];
    for (int half = 0; half < 2; ++half) {
      const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(in + j + 8 * half));
      res[half] = narrow8(b, _mm256_add_epi32(b, draws[half]));
    }
    store16(res[0], res[1], out + j);
  }
#endif
  for (; j < n; ++j) out[j] = narrow_bf16_stochastic(in[j], rounding_bits(stream, first + static_cast<std::uint32_t>(j)));
}
inline void narrow_row_stochastic(const double* in, bfloat16* out, Index n, RoundingStream stream, std::uint32_t first = 0) {
  for (Index j = 0; j < n; ++j) {
    out[j] = narrow_bf16_stochastic(static_cast<float>(in[j]), rounding_bits(stream, first + static_cast<std::uint32_t>(j)));
  }
}

/// sum_j widen(row[j]) x[j], accumulated in float (16 or 8 lanes, then a fixed-order horizontal sum).
inline float dot_bf16(const bfloat16* row, const float* x, Index n) {
  Index j = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; j + 32 <= n; j += 32) {
    acc0 = _mm512_fmadd_ps(widen16(row + j), _mm512_loadu_ps(x + j), acc0);
    acc1 = _mm512_fmadd_ps(widen16(row + j + 16), _mm512_loadu_ps(x + j + 16), acc1);
  }
  for (; j + 16 <= n; j += 16) acc0 = _mm512_fmadd_ps(widen16(row + j), _mm512_loadu_ps(x + j), acc0);
  sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_fmadd_ps(widen8(row + j), _mm256_loadu_ps(x + j), acc0);
    acc1 = _mm256_fmadd_ps(widen8(row + j + 8), _mm256_loadu_ps(x + j + 8), acc1);
  }
  for (; j + 8 <= n; j += 8) acc0 = _mm256_fmadd_ps(widen8(row + j), _mm256_loadu_ps(x + j), acc0);
  const __m256 a = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  sum = _mm_cvtss_f32(s);
#else
  // Portable: four independent partial sums (a fixed order the compiler may vectorize).
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (; j + 4 <= n; j += 4) {
    for (int l = 0; l < 4; ++l) part[l] += widen_bf16(row[j + l]) * x[j + l];
  }
  sum = (part[0] + part[1]) + (part[2] + part[3]);
#endif
  for (; j < n; ++j) sum += widen_bf16(row[j]) * x[j];
  return sum;
}
inline double dot_bf16(const bfloat16* row, const double* x, Index n) {
  double sum = 0.0;
  for (Index j = 0; j < n; ++j) sum += static_cast<double>(widen_bf16(row[j])) * x[j];
  return sum;
}

/// y[0, n) += a widen(row[0, n)).
inline void axpy_bf16(float a, const bfloat16* row, float* y, Index n) {
  Index j = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a);
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(y + j, _mm512_fmadd_ps(va, widen16(row + j), _mm512_loadu_ps(y + j)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(a);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, widen8(row + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < n; ++j) y[j] += a * widen_bf16(row[j]);
}
inline void axpy_bf16(double a, const bfloat16* row, double* y, Index n) {
  for (Index j = 0; j < n; ++j) y[j] += a * static_cast<double>(widen_bf16(row[j]));
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_BFLOAT16_HPP
