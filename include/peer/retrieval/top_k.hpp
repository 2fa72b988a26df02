// SPDX-License-Identifier: MIT
#ifndef PEER_RETRIEVAL_TOP_K_HPP
#define PEER_RETRIEVAL_TOP_K_HPP

/// \file
/// Top-k selection. Order: score descending, ties to the lower index (faiss's Heap.h rule). The output is
/// sorted in that order.

#include <algorithm>
#include <cstdint>

#include <Eigen/Core>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

namespace detail {

/// Bit j (j < 16) set iff p[j] >= t (false for NaN): one vector compare where the CPU has one.
inline std::uint32_t mask16_at_least(const float* p, float t) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(t), _CMP_GE_OQ);
#elif defined(__AVX2__)
  const __m256 vt = _mm256_set1_ps(t);
  const std::uint32_t lo = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), vt, _CMP_GE_OQ)));
  const std::uint32_t hi = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), vt, _CMP_GE_OQ)));
  return lo | (hi << 8);
#else
  std::uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<std::uint32_t>(p[j] >= t) << j;
  return m;
#endif
}
inline std::uint32_t mask16_at_least(const double* p, double t) {
#if defined(__AVX512F__)
  const __m512d vt = _mm512_set1_pd(t);
  return static_cast<std::uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(p), vt, _CMP_GE_OQ)) |
         (static_cast<std::uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(p + 8), vt, _CMP_GE_OQ)) << 8);
#else
  std::uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<std::uint32_t>(p[j] >= t) << j;
  return m;
#endif
}

/// Index of the lowest set bit of m != 0.
inline int lowest_bit(std::uint32_t m) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(m);
#else
  int j = 0;
  while (!(m & 1u)) {
    m >>= 1;
    ++j;
  }
  return j;
#endif
}

/// Set bits of m.
inline int bit_count(std::uint32_t m) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcount(m);
#else
  int c = 0;
  for (; m != 0; m &= m - 1) ++c;
  return c;
#endif
}

/// The k-th largest of m[0, 32) (0 < k <= 32, no NaN): the largest m_i that at least k of the m_j are >=
/// (each m_i above it has at most k - 1 such; the k-th largest itself has k). Branch-free, two 16-lane
/// compares per element (std::nth_element over the 32 took 6% of a PEER forward on 2026-12-04).
template <typename Scalar>
Scalar kth_largest_of_32(const Scalar* m, Index k) {
  Scalar t = *std::min_element(m, m + 32);  // all 32 are >= the minimum: a valid start
  for (int i = 0; i < 32; ++i) {
    const int at_least = bit_count(mask16_at_least(m, m[i])) + bit_count(mask16_at_least(m + 16, m[i]));
    t = at_least >= k && m[i] > t ? m[i] : t;
  }
  return t;
}

/// Writes the indices j < n with values[j] >= t to out, ascending, and returns how many. `out` has room for
/// n + 16 (the vector path stores whole blocks of 16 lanes and advances by the survivors). Branch-free per
/// block with AVX-512 (a compare, a register compress, a store); the portable path walks each block's mask.
inline Index indices_at_least(const float* values, Index n, float t, std::int32_t* out) {
  Index count = 0, j = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(t);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; j + 16 <= n; j += 16) {
    const __mmask16 mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(values + j), vt, _CMP_GE_OQ);
    // The register form of the compress (the memory form is microcoded and slow on some CPUs).
    _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(mask, idx));
    count += bit_count(static_cast<std::uint32_t>(mask));
    idx = _mm512_add_epi32(idx, step);
  }
#else
  for (; j + 16 <= n; j += 16) {
    for (std::uint32_t mask = mask16_at_least(values + j, t); mask != 0; mask &= mask - 1) {
      out[count++] = static_cast<std::int32_t>(j + lowest_bit(mask));
    }
  }
#endif
  for (; j < n; ++j) {
    if (values[j] >= t) out[count++] = static_cast<std::int32_t>(j);
  }
  return count;
}

}  // namespace detail

/// A running top-k over (score, index) pairs pushed in ASCENDING index order. The k best are kept sorted
/// in `values`/`indices`; an equal score never displaces an earlier (lower) index.
/// values and indices point at k slots owned by the caller.
template <typename Scalar, typename IndexT = std::int32_t>
class TopKBuffer {
 public:
  TopKBuffer(Index k, Scalar* values, IndexT* indices) : k_(k), values_(values), indices_(indices) {}

  Index size() const { return size_; }
  bool full() const { return size_ == k_; }
  /// The k-th best score so far (valid once full()).
  Scalar threshold() const { return values_[k_ - 1]; }

  /// Offers (value, index); index must exceed every index offered before.
  void push(Scalar value, IndexT index) {
    if (size_ == k_) {
      if (!(value > values_[k_ - 1])) return;  // also rejects NaN
      insert(value, index, k_ - 1);
    } else {
      insert(value, index, size_++);
    }
  }

 private:
  // Places (value, index) among the first `last` + 1 slots: after every kept value >= value (those have
  // lower indices, so they win ties), shifting the rest down by one; slot `last` is overwritten.
  void insert(Scalar value, IndexT index, Index last) {
    Index pos = last;
    while (pos > 0 && values_[pos - 1] < value) {
      values_[pos] = values_[pos - 1];
      indices_[pos] = indices_[pos - 1];
      --pos;
    }
    values_[pos] = value;
    indices_[pos] = index;
  }

  Index k_;
  Index size_ = 0;
  Scalar* values_;
  IndexT* indices_;
};

/// The k largest of values[0 .. n), sorted descending, ties to the lower index: indices into out_indices,
/// scores into out_values (k slots each). Requires 0 < k <= n and no NaN in values.
///
/// Two passes over the data for k <= 32 and n >= 128: the maxima of 32 interleaved lanes are 32 distinct
/// elements, so the k-th largest of them, t, is a lower bound of the k-th largest value; the second pass offers only
/// the values >= t (a few dozen of 1024 on random data) to a sorted buffer, in index order. Values
/// below t can never be among the k largest, so the result is exact, ties included. Both passes are
/// vector loops over blocks of 16, the second one compare to a bit mask per block (MACHINE.md measured
/// this family of methods at about 8x a heap). Other sizes use the buffer over all values.
template <typename Scalar>
void top_k(const Scalar* values, Index n, Index k, std::int32_t* out_indices, Scalar* out_values) {
  PEER_ASSERT(k > 0 && k <= n);
  constexpr Index kLanes = 32, kBlock = 16;
  using Lanes = Eigen::Array<Scalar, kLanes, 1>;
  TopKBuffer<Scalar> best(k, out_values, out_indices);
  Index start = 0;
  Scalar t;
  if (k <= kLanes && n >= 4 * kLanes) {
    // Eigen's fixed-size arrays make both passes explicit SIMD (plain loops were left scalar by gcc 12).
    Lanes lane_max = Eigen::Map<const Lanes>(values);
    const Index full = n / kLanes * kLanes;
    for (Index b = kLanes; b < full; b += kLanes) lane_max = lane_max.max(Eigen::Map<const Lanes>(values + b));
    // The lane maxima are kLanes distinct elements, so the k-th largest of them is <= the k-th largest
    // of all values: a tight bound that leaves a few dozen survivors on random data.
    static_assert(kLanes == 32, "top_k: the bound is the k-th largest of 32 lane maxima");
    t = detail::kth_largest_of_32(lane_max.data(), k);
  } else {
    for (; start < k; ++start) best.push(values[start], static_cast<std::int32_t>(start));
    t = best.threshold();
  }
  // Offer every value >= t (a value equal to the bound may still be among the k largest).
  const Index blocks_end = start + (n - start) / kBlock * kBlock;
  static_assert(kBlock == 16, "top_k: blocks are one 16-bit mask");
  for (Index b = start; b < blocks_end; b += kBlock) {
    std::uint32_t mask = detail::mask16_at_least(values + b, t);
    if (mask == 0) continue;
    // The block's survivors in index order (the rare pushes).
    for (; mask != 0; mask &= mask - 1) {
      const Index j = b + detail::lowest_bit(mask);
      best.push(values[j], static_cast<std::int32_t>(j));
    }
    if (best.full() && best.threshold() > t) t = best.threshold();
  }
  for (Index j = blocks_end; j < n; ++j) {
    if (values[j] >= t) best.push(values[j], static_cast<std::int32_t>(j));
  }
  PEER_ASSERT(best.full());
}

}  // namespace peer

#endif  // PEER_RETRIEVAL_TOP_K_HPP
