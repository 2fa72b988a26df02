// SPDX-License-Identifier: MIT
#ifndef PEER_RETRIEVAL_TOP_K_HPP
#define PEER_RETRIEVAL_TOP_K_HPP

/// \file
/// Top-k selection. Order: score descending, ties to the lower index (faiss's Heap.h rule). The output is
/// sorted in that order.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

namespace detail {

/// Bit j (j < 16) set iff p[j] > t (Strict) or p[j] >= t (false for NaN): one vector compare where the
/// CPU has one.
template <bool Strict>
inline std::uint32_t mask16_compare(const float* p, float t) {
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int kPredicate = Strict ? _CMP_GT_OQ : _CMP_GE_OQ;
#endif
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(t), kPredicate);
#elif defined(__AVX2__)
  const __m256 vt = _mm256_set1_ps(t);
  const std::uint32_t lo = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), vt, kPredicate)));
  const std::uint32_t hi = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), vt, kPredicate)));
  return lo | (hi << 8);
#else
  std::uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<std::uint32_t>(Strict ? p[j] > t : p[j] >= t) << j;
  return m;
#endif
}
template <bool Strict>
inline std::uint32_t mask16_compare(const double* p, double t) {
#if defined(__AVX512F__)
  constexpr int kPredicate = Strict ? _CMP_GT_OQ : _CMP_GE_OQ;
  const __m512d vt = _mm512_set1_pd(t);
  return static_cast<std::uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(p), vt, kPredicate)) |
         (static_cast<std::uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(p + 8), vt, kPredicate)) << 8);
#else
  std::uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<std::uint32_t>(Strict ? p[j] > t : p[j] >= t) << j;
  return m;
#endif
}
/// Bit j set iff p[j] >= t.
template <typename Scalar>
inline std::uint32_t mask16_at_least(const Scalar* p, Scalar t) { return mask16_compare<false>(p, t); }
/// Bit j set iff p[j] > t.
template <typename Scalar>
inline std::uint32_t mask16_greater(const Scalar* p, Scalar t) { return mask16_compare<true>(p, t); }

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

/// The k-th largest of m[0, L) for L = 32 or 64 (0 < k <= L, no NaN): the largest m_i that at least k of
/// the m_j are >= (each m_i above it has at most k - 1 such; the k-th largest itself has k). Branch-free,
/// L / 16 16-lane compares per element (std::nth_element over 32 took 6% of a PEER forward on 2026-12-04).
template <int L, typename Scalar>
Scalar kth_largest_of_lanes(const Scalar* m, Index k) {
  static_assert(L == 32 || L == 64, "kth_largest_of_lanes: 32 or 64 lanes");
  using Lanes = Eigen::Array<Scalar, L, 1>;
  const Scalar low = Eigen::Map<const Lanes>(m).minCoeff();  // <= the answer: a neutral stand-in
  Lanes qualified;  // m_i where at least k are >= m_i, else low: independent per i, then one max
  for (int i = 0; i < L; ++i) {
    int at_least = bit_count(mask16_at_least(m, m[i])) + bit_count(mask16_at_least(m + 16, m[i]));
    if constexpr (L == 64) at_least += bit_count(mask16_at_least(m + 32, m[i])) + bit_count(mask16_at_least(m + 48, m[i]));
    qualified[i] = at_least >= k ? m[i] : low;
  }
  return qualified.maxCoeff();
}

/// The lanes of lane_bound for k: 32 up to k = 24, else 64. More lanes bound tighter (as k nears the lane
/// count, the k-th lane maximum falls towards the smallest, and the survivors multiply) but take four
/// times the compares to select from.
inline Index bound_lanes(Index k) { return k <= 24 ? 32 : 64; }
/// Whether lane_bound applies: 0 < k <= 64 and at least four values per lane.
inline bool has_lane_bound(Index n, Index k) { return k > 0 && k <= 64 && n >= 4 * bound_lanes(k); }

/// lane_bound with L lanes.
template <int L, typename Scalar>
Scalar lane_bound_of(const Scalar* values, Index n, Index k) {
  using Lanes = Eigen::Array<Scalar, L, 1>;
  // Eigen's fixed-size arrays make the pass explicit SIMD (a plain loop was left scalar by gcc 12).
  Lanes lane_max = Eigen::Map<const Lanes>(values);
  const Index full = n / L * L;
  for (Index b = L; b < full; b += L) lane_max = lane_max.max(Eigen::Map<const Lanes>(values + b));
  return kth_largest_of_lanes<L>(lane_max.data(), k);
}

/// A lower bound of the k-th largest of values[0, n) (has_lane_bound(n, k), no NaN): the maxima of
/// L = bound_lanes(k) interleaved lanes are L distinct elements, so their k-th largest t has at least k
/// values >= t. One vector pass and a branch-free selection; tight on random data (about two dozen of 1024
/// values are >= t for k = 16).
template <typename Scalar>
Scalar lane_bound(const Scalar* values, Index n, Index k) {
  PEER_ASSERT(has_lane_bound(n, k));
  return bound_lanes(k) == 32 ? lane_bound_of<32>(values, n, k) : lane_bound_of<64>(values, n, k);
}

/// The lanes [0, c) of a 16-lane block, for any c (none for c <= 0, all for c >= 16).
inline std::uint32_t lanes_below(Index c) { return c <= 0 ? 0u : c >= 16 ? 0xFFFFu : (1u << c) - 1u; }

/// The first k (k <= 64, k <= m) of m values by (value descending, position ascending), into out_idx
/// (idx[position]) and out_val, sorted. Branch-free ranking: rank_i = #{j < i : v_j >= v_i} +
/// #{j > i : v_j > v_i}, distinct for distinct i, by 16-lane compares (m^2 / 16 of them: for small m).
/// v and idx have room for whole blocks of 16 (lanes past m are masked off, never read as values).
template <typename Scalar>
void select_by_rank(const Scalar* v, const std::int32_t* idx, Index m, Index k, std::int32_t* out_idx, Scalar* out_val) {
  Scalar val[65];
  std::int32_t id[65];  // slot k takes every rank >= k
  const Index blocks = (m + 15) / 16;
  for (Index i = 0; i < m; ++i) {
    const Scalar x = v[i];
    int rank = 0;
    for (Index b = 0; b < blocks; ++b) {
      const std::uint32_t before = lanes_below(i - 16 * b), upto = lanes_below(i - 16 * b + 1);
      const std::uint32_t after = lanes_below(m - 16 * b) & ~upto;
      rank += bit_count((mask16_at_least(v + 16 * b, x) & before) | (mask16_greater(v + 16 * b, x) & after));
    }
    const Index slot = std::min<Index>(rank, k);
    val[slot] = x;
    id[slot] = idx[i];
  }
  std::copy(val, val + k, out_val);
  std::copy(id, id + k, out_idx);
}

/// Appends j, and values[j] unless out_val is null, for every j < n with values[j] >= t to out_idx /
/// out_val, in index order, while they fit `capacity` (both have room for capacity + 16: the vector path
/// stores whole blocks of 16 lanes and advances by the survivors); returns how many, or -1 if more would
/// not fit (never with capacity >= n). Branch-free per block with AVX-512 (a compare, register compresses
/// (the memory form is microcoded and slow on some CPUs), stores); the portable path walks each block's mask.
template <typename Scalar>
Index compress_at_least(const Scalar* values, Index n, Scalar t, Scalar* out_val, std::int32_t* out_idx, Index capacity) {
  Index count = 0, j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Scalar, float>) {
    const __m512 vt = _mm512_set1_ps(t);
    __m512i id = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; j + 16 <= n; j += 16) {
      const __m512 x = _mm512_loadu_ps(values + j);
      const __mmask16 mask = _mm512_cmp_ps_mask(x, vt, _CMP_GE_OQ);
      if (out_val != nullptr) _mm512_storeu_ps(out_val + count, _mm512_maskz_compress_ps(mask, x));
      _mm512_storeu_si512(out_idx + count, _mm512_maskz_compress_epi32(mask, id));
      count += bit_count(static_cast<std::uint32_t>(mask));
      if (count > capacity) return -1;
      id = _mm512_add_epi32(id, step);
    }
  }
#endif
  auto append = [&](Index at) {
    if (out_val != nullptr) out_val[count] = values[at];
    out_idx[count++] = static_cast<std::int32_t>(at);
  };
  for (; j + 16 <= n; j += 16) {
    for (std::uint32_t mask = mask16_at_least(values + j, t); mask != 0; mask &= mask - 1) {
      if (count == capacity) return -1;
      append(j + lowest_bit(mask));
    }
  }
  for (; j < n; ++j) {
    if (values[j] >= t) {
      if (count == capacity) return -1;
      append(j);
    }
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
/// Two passes over the data for k <= 64 and n >= 4 L (L = detail::bound_lanes(k), 32 or 64): the maxima of L
/// interleaved lanes are L distinct elements, so the k-th largest of them, t, is a lower bound of the k-th
/// largest value; the second pass compresses the values >= t (about two dozen of 1024 on random data for
/// k = 16) with their indices, in index order, and ranks them branch-free (detail::select_by_rank). Values
/// below t can never be among the k largest, so the result is exact, ties included. Both passes are vector
/// loops over blocks of 16 (MACHINE.md measured this family of methods at about 8x a heap). More survivors
/// than the ranking takes (2 L; heavy ties) go to a sorted buffer in index order instead; inputs of at
/// most 64 values are ranked whole; other sizes use the buffer over all values.
template <typename Scalar>
void top_k(const Scalar* values, Index n, Index k, std::int32_t* out_indices, Scalar* out_values) {
  PEER_ASSERT(k > 0 && k <= n);
  constexpr Index kBlock = 16, kMaxRanked = 128, kShort = 64;
  // Survivors of the bound (or all of a short input), ranked branch-free when there are at most 2 L.
  Scalar kept_val[kMaxRanked + kBlock];
  std::int32_t kept_idx[kMaxRanked + kBlock];
  TopKBuffer<Scalar> best(k, out_values, out_indices);
  Index start = 0;
  Scalar t{};
  const bool bounded = detail::has_lane_bound(n, k);
  if (bounded) {
    t = detail::lane_bound(values, n, k);  // <= the k-th largest of all values
    // The survivors, compressed, then ranked: no data-dependent branch on typical inputs (the sorted
    // insertions below mispredict on real scores, far more than on a benchmark's few repeated rows, which
    // train the branch predictor). More than 2 L survivors (heavy ties): the insertion pass.
    const Index m = detail::compress_at_least(values, n, t, kept_val, kept_idx, 2 * detail::bound_lanes(k));
    if (m >= 0) {
      PEER_ASSERT(m >= k);
      std::fill(kept_val + m, kept_val + m + kBlock, t);  // the last block's unused lanes: defined, masked off
      detail::select_by_rank(kept_val, kept_idx, m, k, out_indices, out_values);
      return;
    }
  } else if (n <= kShort) {
    std::copy(values, values + n, kept_val);
    std::fill(kept_val + n, kept_val + n + kBlock, values[0]);
    for (Index j = 0; j < n; ++j) kept_idx[j] = static_cast<std::int32_t>(j);
    detail::select_by_rank(kept_val, kept_idx, n, k, out_indices, out_values);
    return;
  }
  if (!bounded) {  // else t stays the lane bound
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
