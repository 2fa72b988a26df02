// SPDX-License-Identifier: MIT
#ifndef PEER_RETRIEVAL_BRUTE_FORCE_HPP
#define PEER_RETRIEVAL_BRUTE_FORCE_HPP

/// \file
/// Exhaustive retrieval over all N = n^2 product keys: the public oracle for ProductKeyRetrieval.
///
/// It scores every key (a, b) as s1[a] + s2[b], with s1 and s2 from the same sub-key scoring routine as
/// the product-key search (so both see bit-identical sums), and keeps the top k of all N by a streaming
/// top-k in id order (ties to the lower id). O(N) per query: for tests and as a baseline, not for
/// training at large N.

#include <cstdint>

#include "peer/core/parallel.hpp"
#include "peer/core/types.hpp"
#include "peer/retrieval/product_keys.hpp"
#include "peer/retrieval/top_k.hpp"

namespace peer {

template <typename Scalar>
class BruteForceRetrieval {
 public:
  using Workspace = typename ProductKeyRetrieval<Scalar>::Workspace;

  /// Uses the sub-keys, shapes and scoring of `keys` (the object is copied; it holds no tensors).
  explicit BruteForceRetrieval(const ProductKeyRetrieval<Scalar>& keys) : keys_(keys) {}

  /// Same contract as ProductKeyRetrieval::search.
  void search(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, IdMatrixRef ids,
              MatrixRef<Scalar> scores, Workspace& ws) const {
    keys_.check_search_inputs(params, queries, ids.rows(), ids.cols(), scores.rows(), scores.cols());
    keys_.prepare(ws);
    const Index h_count = keys_.num_heads(), k = keys_.top_k(), n = keys_.num_sub_keys();
    parallel_for(queries.rows(), keys_.tile_tokens(), [&](Index t0, Index t1, int thread) {
      auto& tile = ws.tiles[static_cast<std::size_t>(thread)];
      keys_.score_tile(params, queries, t0, t1, tile);
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          const Scalar* s1 = tile.s_left.row((t - t0) * h_count + h).data();
          const Scalar* s2 = tile.s_right.row((t - t0) * h_count + h).data();
          TopKBuffer<Scalar, ExpertId> best(k, &scores(t, h * k), &ids(t, h * k));
          for (Index a = 0; a < n; ++a) {
            for (Index b = 0; b < n; ++b) best.push(s1[a] + s2[b], static_cast<ExpertId>(a * n + b));
          }
        }
      }
    });
  }

 private:
  ProductKeyRetrieval<Scalar> keys_;
};

}  // namespace peer

#endif  // PEER_RETRIEVAL_BRUTE_FORCE_HPP
