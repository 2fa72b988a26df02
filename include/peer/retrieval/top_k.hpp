// SPDX-License-Identifier: MIT
#ifndef PEER_RETRIEVAL_TOP_K_HPP
#define PEER_RETRIEVAL_TOP_K_HPP

/// \file
/// Top-k selection. Order: score descending, ties to the lower index (faiss's Heap.h rule). The output is
/// sorted in that order.

#include <algorithm>
#include <cstdint>

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

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
/// Blocks of 16 whose maximum does not beat the running k-th best are skipped with one vector compare,
/// so a scan costs about n comparisons plus O(k log(n / k)) insertions on random data.
template <typename Scalar>
void top_k(const Scalar* values, Index n, Index k, std::int32_t* out_indices, Scalar* out_values) {
  PEER_ASSERT(k > 0 && k <= n);
  TopKBuffer<Scalar> best(k, out_values, out_indices);
  Index i = 0;
  for (; i < k; ++i) best.push(values[i], static_cast<std::int32_t>(i));
  constexpr Index kBlock = 16;
  for (; i + kBlock <= n; i += kBlock) {
    const Scalar t = best.threshold();
    bool any = false;
    for (Index j = 0; j < kBlock; ++j) any |= values[i + j] > t;
    if (!any) continue;
    for (Index j = 0; j < kBlock; ++j) best.push(values[i + j], static_cast<std::int32_t>(i + j));
  }
  for (; i < n; ++i) best.push(values[i], static_cast<std::int32_t>(i));
}

}  // namespace peer

#endif  // PEER_RETRIEVAL_TOP_K_HPP
