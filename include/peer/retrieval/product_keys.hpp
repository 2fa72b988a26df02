// SPDX-License-Identifier: MIT
#ifndef PEER_RETRIEVAL_PRODUCT_KEYS_HPP
#define PEER_RETRIEVAL_PRODUCT_KEYS_HPP

/// \file
/// Exact product-key top-k retrieval (Lample et al. 2019; He 2024, section 2).
///
/// N = n^2 keys are never stored: key (a, b) = [c_a ; c'_b] with c_a a row of the left sub-key set C and
/// c'_b a row of the right set C' (n rows of Dk / 2 each). For a head's query q = [q1 ; q2],
///   score(a, b) = s1[a] + s2[b],   s1 = C q1,  s2 = C' q2,   expert id = a * n + b.
/// Retrieval keeps the top k' of s1 and of s2, then the top k of the candidate sums: O((n + k'^2) Dk)
/// per query instead of O(N Dk).
///
/// Exactness (when k' >= k, the default k' = k, or k' = n). The result equals the exhaustive top k over all N scores in the order (score descending,
/// ties to the lower id), bit for bit, including ties:
/// - every excluded pair is dominated: a pair outside the grid has k' >= k pairs in the grid whose score is
///   >= its own, and grid pair (i, j) (ranks in the sorted lists) with (i + 1)(j + 1) > k has at least k
///   pairs with score >= its own, so only pairs with (i + 1)(j + 1) <= k are scored (about k ln k of them);
/// - hence any pair that was not scored has a score <= t, the k-th score found. Ties AT t can still hide
///   a lower id outside the scored set (exact ties, or sums that round to the same float). A cheap bound
///   check (the best unscored sum of each excluded region) detects when that is possible, and only then an
///   exact enumeration of the pairs scoring exactly t runs (O(n log n), rare on real data; see
///   docs/design.md).
///
/// With k' < k the two-stage search is an approximation (the top k of the k'^2 candidate pairs), as in
/// PKM implementations that set k' < k; the configuration allows it (k <= k'^2) and docs/design.md says so.
///
/// Sub-keys are shared by all heads (the paper) or, with KeySharing::kPerHead, head h owns rows
/// [h * n, (h + 1) * n) of both sets. Either way all heads share one expert pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gemm.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/key_groups.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/types.hpp"
#include "peer/retrieval/top_k.hpp"

namespace peer {

/// Whether heads share one pair of sub-key sets (the paper) or each head has its own.
enum class KeySharing { kShared, kPerHead };

inline const char* to_string(KeySharing s) { return s == KeySharing::kShared ? "shared" : "per_head"; }

/// Shape of a product-key retrieval.
struct ProductKeyConfig {
  Index num_heads = 8;       ///< H
  Index key_dim = 256;       ///< Dk (even); each half has Dk / 2
  Index num_sub_keys = 1024; ///< n; N = n^2 keys
  Index top_k = 16;          ///< k kept per head
  Index sub_key_top_k = 16;  ///< k' kept per half, k <= k'^2, k' <= n
  KeySharing key_sharing = KeySharing::kShared;
};

/// Product-key retrieval: registers "<prefix>left" and "<prefix>right" ([n, Dk / 2], or [H * n, Dk / 2]
/// per head), searches the exact top k per head, and back-propagates into the queries and sub-keys
/// through the kept scores.
template <typename Scalar>
class ProductKeyRetrieval {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  /// Per-thread scratch of one tile of tokens.
  struct TileScratch {
    RowMatrix<Scalar> q_left, q_right;  // [T * H, Dk / 2] (shared keys)
    RowMatrix<Scalar> s_left, s_right;  // [T * H, n], row (t - t0) * H + h
    std::vector<std::int32_t> a_idx, b_idx, cand_id, sorted_b, tie_b;
    std::vector<Scalar> a_val, b_val, cand_val;
  };

  /// Scratch of search and backward, owned by the caller (a layer keeps it in its cache).
  struct Workspace {
    std::vector<TileScratch> tiles;  // one per thread
    std::vector<std::int32_t> keys;  // backward: item -> sub-key row
    detail::KeyGroups groups;
    RowMatrix<Scalar> rows;          // backward: summed sub-key rows of one group set
    Index fallbacks = 0;             // queries of the last search that needed the exact tie enumeration
    std::vector<Index> thread_fallbacks;  // per-thread counts of the last search
  };

  ProductKeyRetrieval() = default;
  explicit ProductKeyRetrieval(const ProductKeyConfig& config) : config_(config) {}

  const ProductKeyConfig& config() const { return config_; }
  Index num_heads() const { return config_.num_heads; }
  Index key_dim() const { return config_.key_dim; }
  Index half_dim() const { return config_.key_dim / 2; }
  Index num_sub_keys() const { return config_.num_sub_keys; }
  Index num_experts() const { return config_.num_sub_keys * config_.num_sub_keys; }
  Index top_k() const { return config_.top_k; }
  Index sub_key_top_k() const { return config_.sub_key_top_k; }
  /// Rows of each sub-key set: n, or H * n with per-head keys.
  Index sub_key_rows() const {
    return config_.key_sharing == KeySharing::kPerHead ? config_.num_heads * config_.num_sub_keys
                                                       : config_.num_sub_keys;
  }
  /// Tokens per parallel tile: about 128 query rows per sub-key GEMM. Fixed by H only.
  Index tile_tokens() const { return std::max<Index>(1, 128 / config_.num_heads); }

  void register_parameters(ParameterLayout& layout, const std::string& prefix) {
    left_ = layout.add_dense(prefix + "left", sub_key_rows(), half_dim());
    right_ = layout.add_dense(prefix + "right", sub_key_rows(), half_dim());
  }

  DenseHandle left_handle() const { return left_; }
  DenseHandle right_handle() const { return right_; }

  /// Sub-keys ~ U(-1/sqrt(Dk/2), 1/sqrt(Dk/2)) (PKM's choice; see docs/design.md).
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    const double bound = 1.0 / std::sqrt(static_cast<double>(half_dim()));
    for (DenseHandle h : {left_, right_}) {
      const CounterRng rng(seed, stream_of(params.layout().spec(h).name));
      auto m = params.dense(h);
      for (Index i = 0; i < m.size(); ++i) {
        m.data()[i] = static_cast<Scalar>(rng.uniform(static_cast<std::uint64_t>(i), -bound, bound));
      }
    }
  }

  /// Checks shapes and values common to search and the brute-force oracle.
  void check_search_inputs(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, Index id_rows,
                           Index id_cols, Index score_rows, Index score_cols) const {
    detail::check_shape("queries", queries.rows(), queries.cols(), queries.rows(), num_heads() * key_dim());
    detail::check_shape("ids", id_rows, id_cols, queries.rows(), num_heads() * top_k());
    detail::check_shape("scores", score_rows, score_cols, queries.rows(), num_heads() * top_k());
    detail::check_finite("queries", queries);
    detail::check_finite("sub-keys (left)", params.dense(left_));
    detail::check_finite("sub-keys (right)", params.dense(right_));
  }

  /// Top-k experts of every head of every token.
  /// queries [B, H * Dk] (head h's query in columns [h Dk, (h + 1) Dk), halves q1 | q2);
  /// ids [B, H * k] and scores [B, H * k] assigned: head h's k experts in columns [h k, (h + 1) k), sorted
  /// by score descending, ties to the lower id. Throws std::domain_error on non-finite queries or keys.
  void search(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, IdMatrixRef ids,
              MatrixRef<Scalar> scores, Workspace& ws) const {
    check_search_inputs(params, queries, ids.rows(), ids.cols(), scores.rows(), scores.cols());
    reserve(ws, queries.rows());
    std::vector<Index>& fallbacks = ws.thread_fallbacks;
    fallbacks.assign(ws.tiles.size(), 0);
    const Index h_count = num_heads(), k = top_k();
    parallel_for(queries.rows(), tile_tokens(), [&](Index t0, Index t1, int thread) {
      TileScratch& tile = ws.tiles[static_cast<std::size_t>(thread)];
      score_tile(params, queries, t0, t1, tile);
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          const Index row = (t - t0) * h_count + h;
          fallbacks[static_cast<std::size_t>(thread)] +=
              select(tile.s_left.row(row).data(), tile.s_right.row(row).data(), tile, &ids(t, h * k),
                     &scores(t, h * k));
        }
      }
    });
    ws.fallbacks = std::accumulate(fallbacks.begin(), fallbacks.end(), Index(0));
    detail::check_finite("retrieved scores", scores);
  }

  /// Scores of given experts instead of searched ones (routing held fixed, for gradient checks and
  /// user routers): scores(t, h k + j) = q1 . c_a + q2 . c'_b for expert ids(t, h k + j) = a n + b of head
  /// h. queries [B, H * Dk], ids [B, H * k] (any order, repeats allowed), scores [B, H * k] assigned.
  /// backward() then applies unchanged.
  void score(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, const ConstIdMatrixRef& ids,
             MatrixRef<Scalar> scores) const {
    check_search_inputs(params, queries, ids.rows(), ids.cols(), scores.rows(), scores.cols());
    detail::check_ids(ids, num_experts());
    const Index h_count = num_heads(), k = top_k(), n = num_sub_keys(), half = half_dim(), dk = key_dim();
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    const bool per_head = config_.key_sharing == KeySharing::kPerHead;
    parallel_for(queries.rows(), 64, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          const Index offset = per_head ? h * n : 0;
          for (Index j = 0; j < k; ++j) {
            const ExpertId id = ids(t, h * k + j);
            scores(t, h * k + j) = queries.row(t).segment(h * dk, half).dot(left.row(offset + id / n)) +
                                   queries.row(t).segment(h * dk + half, half).dot(right.row(offset + id % n));
          }
        }
      }
    });
  }

  /// Back-propagates dL/dscores [B, H * k] through score(a, b) = q1 . c_a + q2 . c'_b:
  /// dqueries += (dq1 = sum_j ds_j c_{a_j}, dq2 = sum_j ds_j c'_{b_j}) per head, and the sub-key
  /// gradients += (dc_a = sum ds q1, dc'_b = sum ds q2) over the items that kept them. Only kept sub-keys
  /// receive gradient. Rows are summed in a fixed item order (deterministic for any thread count).
  void backward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, const ConstIdMatrixRef& ids,
                const ConstMatrixRef<Scalar>& dscores, MatrixRef<Scalar> dqueries, Gradients<Scalar>& grads,
                Workspace& ws) const {
    const Index b_count = queries.rows(), h_count = num_heads(), k = top_k(), n = num_sub_keys();
    const Index half = half_dim(), dk = key_dim();
    detail::check_shape("queries", queries.rows(), queries.cols(), b_count, h_count * dk);
    detail::check_shape("ids", ids.rows(), ids.cols(), b_count, h_count * k);
    detail::check_shape("dscores", dscores.rows(), dscores.cols(), b_count, h_count * k);
    detail::check_shape("dqueries", dqueries.rows(), dqueries.cols(), b_count, h_count * dk);
    detail::check_ids(ids, num_experts());
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    const bool per_head = config_.key_sharing == KeySharing::kPerHead;
    // dq: each token's rows are its own.
    parallel_for(b_count, 64, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          const Index offset = per_head ? h * n : 0;
          for (Index j = 0; j < k; ++j) {
            const Scalar ds = dscores(t, h * k + j);
            const ExpertId id = ids(t, h * k + j);
            dqueries.row(t).segment(h * dk, half) += ds * left.row(offset + id / n);
            dqueries.row(t).segment(h * dk + half, half) += ds * right.row(offset + id % n);
          }
        }
      }
    });
    // Sub-keys: group the B * H * k items by the row they touch, then sum each row in item order.
    const Index items = b_count * h_count * k;
    for (int side = 0; side < 2; ++side) {
      ws.keys.resize(static_cast<std::size_t>(items));
      for (Index i = 0; i < items; ++i) {
        const Index t = i / (h_count * k), h = (i / k) % h_count;
        const ExpertId id = ids(t, h * k + i % k);
        ws.keys[static_cast<std::size_t>(i)] =
            static_cast<std::int32_t>((per_head ? h * n : 0) + (side == 0 ? id / n : id % n));
      }
      detail::group_by_key(ws.keys.data(), items, sub_key_rows(), ws.groups);
      const detail::KeyGroups& g = ws.groups;
      ws.rows.setZero(g.num_groups(), half);
      parallel_for(g.num_groups(), 64, [&](Index g0, Index g1, int) {
        for (Index gi = g0; gi < g1; ++gi) {
          auto acc = ws.rows.row(gi);
          for (std::int64_t p = g.starts[gi]; p < g.starts[gi + 1]; ++p) {
            const Index i = g.order[static_cast<std::size_t>(p)];
            const Index t = i / (h_count * k), h = (i / k) % h_count;
            acc += dscores(t, h * k + i % k) * queries.row(t).segment(h * dk + side * half, half);
          }
        }
      });
      auto grad = grads.dense(side == 0 ? left_ : right_);
      for (Index gi = 0; gi < g.num_groups(); ++gi) grad.row(g.keys[static_cast<std::size_t>(gi)]) += ws.rows.row(gi);
    }
  }

  /// Sizes the per-thread scratch (called by search; public for the brute-force oracle).
  void prepare(Workspace& ws) const {
    const std::size_t threads = static_cast<std::size_t>(parallel_threads());
    if (ws.tiles.size() < threads) ws.tiles.resize(threads);
  }

  /// Sizes every thread's scratch (and its GEMM packing buffers) for a search of `rows` queries, before
  /// the parallel loop: then the search allocates nothing whichever thread scores which tile.
  void reserve(Workspace& ws, Index rows) const {
    prepare(ws);
    const Index h_count = num_heads(), n = num_sub_keys(), half = half_dim(), tt = tile_tokens();
    const Index full = std::min(rows, tt), last = rows % tt;
    const std::size_t ka = static_cast<std::size_t>(std::min(sub_key_top_k() + 1, n));
    for (TileScratch& tile : ws.tiles) {
      reserve_tile(tile, full * h_count);
      for (auto* v : {&tile.a_idx, &tile.b_idx}) v->reserve(ka);
      for (auto* v : {&tile.a_val, &tile.b_val}) v->reserve(ka);
      tile.sorted_b.reserve(static_cast<std::size_t>(n));  // the exact tie enumeration (rare)
      tile.tie_b.reserve(static_cast<std::size_t>(n));
    }
    ws.thread_fallbacks.reserve(ws.tiles.size());
    if (config_.key_sharing == KeySharing::kShared) {
      detail::reserve_gemm<Scalar>({{full * h_count, n, half}, {last * h_count, n, half}});
    } else {
      detail::reserve_gemm<Scalar>({{full, n, half}, {last, n, half}});
    }
  }

  /// Tile scratch for at least `rows` query rows: kept at the rows of a full tile, so a shorter last tile
  /// reuses it.
  void reserve_tile(TileScratch& tile, Index rows) const {
    const Index n = num_sub_keys(), half = half_dim(), full = std::max(rows, tile_tokens() * num_heads());
    auto grow = [&](RowMatrix<Scalar>& m, Index cols) {
      if (m.rows() < rows || m.cols() != cols) m.resize(full, cols);
    };
    grow(tile.s_left, n);
    grow(tile.s_right, n);
    if (config_.key_sharing == KeySharing::kShared) {
      grow(tile.q_left, half);
      grow(tile.q_right, half);
    }
  }

  /// Sub-key scores of tokens [t0, t1): tile.s_left / s_right row (t - t0) * H + h holds s1 / s2 of
  /// token t, head h. The brute-force oracle uses this same routine, so both see identical scores.
  void score_tile(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, Index t0, Index t1,
                  TileScratch& tile) const {
    const Index h_count = num_heads(), n = num_sub_keys(), half = half_dim(), dk = key_dim();
    const Index rows = (t1 - t0) * h_count;
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    reserve_tile(tile, rows);  // only the first `rows` rows are used
    if (config_.key_sharing == KeySharing::kShared) {
      // Stack every head's half-queries into one [T * H, Dk / 2] matrix: one GEMM per half.
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          tile.q_left.row((t - t0) * h_count + h) = queries.row(t).segment(h * dk, half);
          tile.q_right.row((t - t0) * h_count + h) = queries.row(t).segment(h * dk + half, half);
        }
      }
      detail::gemm(tile.q_left.topRows(rows), left.transpose(), tile.s_left.topRows(rows), Scalar(1), detail::GemmUpdate::kAssign);
      detail::gemm(tile.q_right.topRows(rows), right.transpose(), tile.s_right.topRows(rows), Scalar(1), detail::GemmUpdate::kAssign);
    } else {
      for (Index h = 0; h < h_count; ++h) {
        MatrixMap<Scalar> out_l(tile.s_left.row(h).data(), t1 - t0, n, Eigen::OuterStride<>(h_count * n));
        MatrixMap<Scalar> out_r(tile.s_right.row(h).data(), t1 - t0, n, Eigen::OuterStride<>(h_count * n));
        detail::gemm(queries.block(t0, h * dk, t1 - t0, half), left.middleRows(h * n, n).transpose(), out_l,
                     Scalar(1), detail::GemmUpdate::kAssign);
        detail::gemm(queries.block(t0, h * dk + half, t1 - t0, half), right.middleRows(h * n, n).transpose(), out_r,
                     Scalar(1), detail::GemmUpdate::kAssign);
      }
    }
  }

  /// Top k of s_left[a] + s_right[b] over all (a, b) for one query: ids and scores (k each), sorted by
  /// score descending, ties to the lower id. Returns 1 when the exact tie enumeration ran, else 0.
  Index select(const Scalar* s_left, const Scalar* s_right, TileScratch& tile, ExpertId* out_ids,
               Scalar* out_scores) const {
    const Index n = num_sub_keys(), k = top_k(), kk = sub_key_top_k();
    const Index ka = std::min(kk + 1, n);  // one more than kept: the best excluded value bounds the rest
    tile.a_idx.resize(static_cast<std::size_t>(ka));
    tile.b_idx.resize(static_cast<std::size_t>(ka));
    tile.a_val.resize(static_cast<std::size_t>(ka));
    tile.b_val.resize(static_cast<std::size_t>(ka));
    peer::top_k(s_left, n, ka, tile.a_idx.data(), tile.a_val.data());
    peer::top_k(s_right, n, ka, tile.b_idx.data(), tile.b_val.data());
    const Scalar* av = tile.a_val.data();
    const Scalar* bv = tile.b_val.data();
    // Score the grid pairs (i, j) with (i + 1)(j + 1) <= k; keep the best k by (score desc, id asc).
    Index size = 0;
    for (Index i = 0; i < kk; ++i) {
      const Index j_end = std::min(kk, k / (i + 1));
      for (Index j = 0; j < j_end; ++j) {
        const Scalar s = av[i] + bv[j];
        const ExpertId id = static_cast<ExpertId>(tile.a_idx[static_cast<std::size_t>(i)] * n +
                                                  tile.b_idx[static_cast<std::size_t>(j)]);
        insert_ranked(s, id, out_scores, out_ids, size, k);
      }
    }
    PEER_ASSERT(size == k);
    // With k' < k (and k' < n) the search is the usual two-stage approximation: the top k of the k'^2
    // candidates, nothing more to prove or repair.
    if (kk < k && kk < n) return 0;
    // Could a pair that was not scored tie with the k-th score t? Bound each excluded region by its best sum.
    const Scalar t = out_scores[k - 1];
    bool tie_possible = false;
    if (kk < n) tie_possible = (av[kk] + bv[0] >= t) || (av[0] + bv[kk] >= t);
    for (Index i = 0; i < kk && !tie_possible; ++i) {
      const Index j_first = k / (i + 1);  // first unscored rank j in row i
      if (j_first < kk && av[i] + bv[j_first] >= t) tie_possible = true;
    }
    if (!tie_possible) return 0;
    resolve_ties(s_left, s_right, t, tile, out_ids, out_scores);
    return 1;
  }

 private:
  // Inserts (s, id) into the first `size` ranked slots (capacity k) by (score desc, id asc).
  static void insert_ranked(Scalar s, ExpertId id, Scalar* scores, ExpertId* ids, Index& size, Index k) {
    Index pos;
    if (size < k) {
      pos = size++;
    } else {
      if (!(s > scores[k - 1] || (s == scores[k - 1] && id < ids[k - 1]))) return;
      pos = k - 1;
    }
    while (pos > 0 && (scores[pos - 1] < s || (scores[pos - 1] == s && ids[pos - 1] > id))) {
      scores[pos] = scores[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    scores[pos] = s;
    ids[pos] = id;
  }

  // Exact repair of the ties at the k-th score t. Every pair scoring more than t is already among the
  // results (see the file comment), so keep those and refill the rest with the lowest ids among ALL
  // pairs scoring exactly t. For a fixed a, the b's with fl(s1[a] + s2[b]) == t form one contiguous run
  // of the right scores sorted descending (rounding is monotonic), found by binary search; a ascends, so
  // ids ascend, and the enumeration stops as soon as enough ids are found.
  void resolve_ties(const Scalar* s_left, const Scalar* s_right, Scalar t, TileScratch& tile, ExpertId* out_ids,
                    Scalar* out_scores) const {
    const Index n = num_sub_keys(), k = top_k();
    Index above = 0;
    while (above < k && out_scores[above] > t) ++above;
    const Index need = k - above;
    auto& sorted = tile.sorted_b;
    sorted.resize(static_cast<std::size_t>(n));
    std::iota(sorted.begin(), sorted.end(), 0);
    std::sort(sorted.begin(), sorted.end(), [&](std::int32_t x, std::int32_t y) {
      return s_right[x] > s_right[y] || (s_right[x] == s_right[y] && x < y);
    });
    Index found = 0;
    for (Index a = 0; a < n && found < need; ++a) {
      const Scalar sa = s_left[a];
      const auto lo = std::partition_point(sorted.begin(), sorted.end(),
                                           [&](std::int32_t b) { return sa + s_right[b] > t; });
      const auto hi = std::partition_point(lo, sorted.end(), [&](std::int32_t b) { return sa + s_right[b] >= t; });
      if (lo == hi) continue;
      tile.tie_b.assign(lo, hi);
      std::sort(tile.tie_b.begin(), tile.tie_b.end());
      for (std::size_t q = 0; q < tile.tie_b.size() && found < need; ++q, ++found) {
        out_ids[above + found] = static_cast<ExpertId>(a * n + tile.tie_b[q]);
        out_scores[above + found] = t;
      }
    }
    PEER_ASSERT(found == need);
  }

  ProductKeyConfig config_;
  DenseHandle left_, right_;
};

}  // namespace peer

#endif  // PEER_RETRIEVAL_PRODUCT_KEYS_HPP
