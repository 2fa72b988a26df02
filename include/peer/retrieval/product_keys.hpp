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
///
/// With SubKeyScoring::kBFloat16Checked the sub-key scores s1, s2 that all of the above ranks by are the
/// re-check dots of peer/retrieval/bf16_scoring.hpp (computed for the few candidates a bf16 pass cannot
/// rule out), and every statement holds for them unchanged.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gemm.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/types.hpp"
#include "peer/retrieval/bf16_scoring.hpp"
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
  SubKeyScoring scoring = SubKeyScoring::kExact;  ///< how s1, s2 are computed (both exact retrieval)
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
    // SubKeyScoring::kBFloat16Checked: the rounded queries, one half's approximate scores [T * H, padded n]
    // (row h T + t - t0), each row's candidates, and every row's exact top k' + 1 of both halves.
    detail::Bf16Queries bf16_queries;
    RowMatrix<float> approx;
    std::vector<double> query_norm;
    std::vector<std::int32_t> candidates, candidate_rank, checked_idx;
    std::vector<float> approx_top;
    std::vector<Scalar> candidate_val, checked_val;
  };

  /// Scratch of search and backward, owned by the caller (a layer keeps it in its cache).
  struct Workspace {
    std::vector<TileScratch> tiles;  // one per thread
    RowMatrix<Scalar> rows[2];       // backward: the summed sub-key rows of each side
    std::vector<char> touched[2];    // backward: which of them some item kept
    Index fallbacks = 0;             // queries of the last search that needed the exact tie enumeration
    std::vector<Index> thread_fallbacks;  // per-thread counts of the last search
    detail::Bf16SubKeys bf16_keys[2];     // kBFloat16Checked: both sub-key sets, rounded and packed per search
  };

  ProductKeyRetrieval() = default;
  explicit ProductKeyRetrieval(const ProductKeyConfig& config) : config_(config) {}

  const ProductKeyConfig& config() const { return config_; }
  Index num_heads() const { return config_.num_heads; }
  SubKeyScoring scoring() const { return config_.scoring; }
  bool checked_scoring() const { return config_.scoring == SubKeyScoring::kBFloat16Checked; }
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
  /// The sub-key row that expert `id` (of head h) uses on `side`: c_{id / n} (side 0) or c'_{id % n} (side
  /// 1), at h n with per-head keys. ids are checked in [0, n^2) first, so the division runs on 32 bits.
  Index sub_key_row(ExpertId id, int side, Index h) const {
    const auto u = static_cast<std::uint32_t>(id), n = static_cast<std::uint32_t>(config_.num_sub_keys);
    const Index offset = config_.key_sharing == KeySharing::kPerHead ? h * config_.num_sub_keys : 0;
    return offset + static_cast<Index>(side == 0 ? u / n : u % n);
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
    if (checked_scoring()) {
      const Index groups = config_.key_sharing == KeySharing::kPerHead ? h_count : 1;
      detail::pack_bf16_sub_keys<Scalar>(params.dense(left_), groups, ws.bf16_keys[0]);
      detail::pack_bf16_sub_keys<Scalar>(params.dense(right_), groups, ws.bf16_keys[1]);
      parallel_for(queries.rows(), tile_tokens(), [&](Index t0, Index t1, int thread) {
        TileScratch& tile = ws.tiles[static_cast<std::size_t>(thread)];
        checked_tile(params, queries, t0, t1, ws, tile);
        const std::size_t ka = static_cast<std::size_t>(kept_per_half());
        for (Index t = t0; t < t1; ++t) {
          for (Index h = 0; h < h_count; ++h) {
            const std::size_t row = static_cast<std::size_t>((t - t0) * h_count + h) * 2 * ka;
            tile.a_idx.assign(tile.checked_idx.begin() + row, tile.checked_idx.begin() + row + ka);
            tile.a_val.assign(tile.checked_val.begin() + row, tile.checked_val.begin() + row + ka);
            tile.b_idx.assign(tile.checked_idx.begin() + row + ka, tile.checked_idx.begin() + row + 2 * ka);
            tile.b_val.assign(tile.checked_val.begin() + row + ka, tile.checked_val.begin() + row + 2 * ka);
            fallbacks[static_cast<std::size_t>(thread)] +=
                combine(tile, &ids(t, h * k), &scores(t, h * k), [&](const Scalar*& l, const Scalar*& r) {
                  recheck_row(params, queries, t, h, tile.s_left.row(0).data(), tile.s_right.row(0).data());
                  l = tile.s_left.row(0).data();
                  r = tile.s_right.row(0).data();
                });
          }
        }
      });
      ws.fallbacks = std::accumulate(fallbacks.begin(), fallbacks.end(), Index(0));
      detail::check_finite("retrieved scores", scores);
      return;
    }
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
    const Index h_count = num_heads(), k = top_k(), half = half_dim(), dk = key_dim();
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    parallel_for(queries.rows(), 64, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          for (Index j = 0; j < k; ++j) {
            const ExpertId id = ids(t, h * k + j);
            const Index a = sub_key_row(id, 0, h), b = sub_key_row(id, 1, h);
            if (checked_scoring()) {
              scores(t, h * k + j) = detail::recheck_dot(queries.row(t).data() + (h * dk), left.row(a).data(), half) +
                                     detail::recheck_dot(queries.row(t).data() + (h * dk + half), right.row(b).data(), half);
            } else {
              scores(t, h * k + j) = queries.row(t).segment(h * dk, half).dot(left.row(a)) +
                                     queries.row(t).segment(h * dk + half, half).dot(right.row(b));
            }
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
    const Index b_count = queries.rows(), h_count = num_heads(), k = top_k();
    const Index half = half_dim(), dk = key_dim();
    detail::check_shape("queries", queries.rows(), queries.cols(), b_count, h_count * dk);
    detail::check_shape("ids", ids.rows(), ids.cols(), b_count, h_count * k);
    detail::check_shape("dscores", dscores.rows(), dscores.cols(), b_count, h_count * k);
    detail::check_shape("dqueries", dqueries.rows(), dqueries.cols(), b_count, h_count * dk);
    detail::check_ids(ids, num_experts());
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    // dq: each token's rows are its own.
    parallel_for(b_count, 64, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          for (Index j = 0; j < k; ++j) {
            const Scalar ds = dscores(t, h * k + j);
            const ExpertId id = ids(t, h * k + j);
            dqueries.row(t).segment(h * dk, half) += ds * left.row(sub_key_row(id, 0, h));
            dqueries.row(t).segment(h * dk + half, half) += ds * right.row(sub_key_row(id, 1, h));
          }
        }
      }
    });
    // Sub-keys: dc_r = sum, over the items i that kept row r, in ascending i, of ds_i times the item's query
    // half. The items are visited in order, token by token, so each token's query row is read once and in
    // order (grouping the items by row first made every item a random load of a query row from a matrix
    // larger than L2). One thread sums one side, the whole side: every row over its items in ascending
    // order, bitwise the same for any thread count. Only the rows some item kept are added to the gradient.
    const Index rows = sub_key_rows();
    for (int side = 0; side < 2; ++side) {  // sized before the loop, which must not allocate (or throw)
      ws.rows[side].resize(rows, half);
      ws.touched[side].resize(static_cast<std::size_t>(rows));
    }
    MatrixMap<Scalar> grad[2] = {grads.dense(left_), grads.dense(right_)};
    parallel_for(2, 1, [&](Index side, Index, int) {
      RowMatrix<Scalar>& acc = ws.rows[side];
      std::vector<char>& touched = ws.touched[side];
      std::fill(touched.begin(), touched.end(), char{0});  // a row is zeroed when first kept: work ~ items
      for (Index t = 0; t < b_count; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          const auto q = queries.row(t).segment(h * dk + side * half, half);
          for (Index j = 0; j < k; ++j) {
            const Index r = sub_key_row(ids(t, h * k + j), static_cast<int>(side), h);
            if (touched[static_cast<std::size_t>(r)] == 0) {
              acc.row(r).setZero();
              touched[static_cast<std::size_t>(r)] = 1;
            }
            acc.row(r) += dscores(t, h * k + j) * q;
          }
        }
      }
      for (Index r = 0; r < rows; ++r) {
        if (touched[static_cast<std::size_t>(r)] != 0) grad[side].row(r) += acc.row(r);
      }
    });
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
    const std::size_t ka = static_cast<std::size_t>(kept_per_half());
    if (checked_scoring()) {
      const Index pairs = (half + 1) / 2, padded = (n + 15) / 16 * 16, tile_rows = full * h_count;
      for (TileScratch& tile : ws.tiles) {
        for (auto* v : {&tile.a_idx, &tile.b_idx}) v->reserve(ka);
        for (auto* v : {&tile.a_val, &tile.b_val}) v->reserve(ka);
        tile.bf16_queries.resize(tile_rows, half);
        if (tile.approx.rows() < tile_rows || tile.approx.cols() != padded) tile.approx.resize(tile_rows, padded);
        tile.query_norm.reserve(static_cast<std::size_t>(tile_rows));
        tile.candidates.resize(static_cast<std::size_t>(n + 16));
        tile.candidate_rank.reserve(ka);  // ids of the approximate top k' + 1 where the lane bound does not apply (only its last value, tau, is used)
        tile.candidate_val.reserve(static_cast<std::size_t>(n));
        tile.approx_top.reserve(ka);
        tile.checked_idx.reserve(static_cast<std::size_t>(tile_rows) * 2 * ka);
        tile.checked_val.reserve(static_cast<std::size_t>(tile_rows) * 2 * ka);
        for (RowMatrix<Scalar>* m : {&tile.s_left, &tile.s_right}) {
          if (m->rows() < 1 || m->cols() != n) m->resize(1, n);  // a whole exact row, for the rare tie repair
        }
        tile.sorted_b.reserve(static_cast<std::size_t>(n));
        tile.tie_b.reserve(static_cast<std::size_t>(n));
      }
      ws.thread_fallbacks.reserve(ws.tiles.size());
      if (!bf16_dot_instruction()) {
        const Index m = config_.key_sharing == KeySharing::kShared ? h_count : 1;
        detail::reserve_gemm<float>({{full * m, n, 2 * pairs}, {last * m, n, 2 * pairs}});
      }
      return;
    }
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
  /// token t, head h. The brute-force oracle uses this same routine, so both see identical scores (with
  /// kBFloat16Checked: every re-check dot, which search computes only for its candidates).
  void score_tile(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, Index t0, Index t1,
                  TileScratch& tile) const {
    const Index h_count = num_heads(), n = num_sub_keys(), half = half_dim(), dk = key_dim();
    const Index rows = (t1 - t0) * h_count;
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    reserve_tile(tile, rows);  // only the first `rows` rows are used
    if (checked_scoring()) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          const Index row = (t - t0) * h_count + h;
          recheck_row(params, queries, t, h, tile.s_left.row(row).data(), tile.s_right.row(row).data());
        }
      }
      return;
    }
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
    const Index n = num_sub_keys(), ka = kept_per_half();
    tile.a_idx.resize(static_cast<std::size_t>(ka));
    tile.b_idx.resize(static_cast<std::size_t>(ka));
    tile.a_val.resize(static_cast<std::size_t>(ka));
    tile.b_val.resize(static_cast<std::size_t>(ka));
    peer::top_k(s_left, n, ka, tile.a_idx.data(), tile.a_val.data());
    peer::top_k(s_right, n, ka, tile.b_idx.data(), tile.b_val.data());
    return combine(tile, out_ids, out_scores, [&](const Scalar*& l, const Scalar*& r) {
      l = s_left;
      r = s_right;
    });
  }

  /// k' + 1 (at most n): the sorted top of each half that the product-key stage reads; one more than kept,
  /// since the best excluded value bounds the rest.
  Index kept_per_half() const { return std::min(sub_key_top_k() + 1, num_sub_keys()); }

  /// The product-key stage of select() over the halves' top k' + 1 already in tile.a_idx / a_val and
  /// tile.b_idx / b_val (sorted, ties to the lower index). `full_rows(l, r)` points l and r at both halves'
  /// whole score rows, asked for only when the tie repair must run.
  template <typename FullRows>
  Index combine(TileScratch& tile, ExpertId* out_ids, Scalar* out_scores, FullRows&& full_rows) const {
    const Index n = num_sub_keys(), k = top_k(), kk = sub_key_top_k();
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
    const Scalar* s_left = nullptr;
    const Scalar* s_right = nullptr;
    full_rows(s_left, s_right);
    resolve_ties(s_left, s_right, t, tile, out_ids, out_scores);
    return 1;
  }

  /// kBFloat16Checked: both halves' re-check scores of token t, head h against every sub-key (n each).
  void recheck_row(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, Index t, Index h,
                   Scalar* s_left, Scalar* s_right) const {
    const Index n = num_sub_keys(), half = half_dim(), dk = key_dim();
    const Index base = config_.key_sharing == KeySharing::kPerHead ? h * n : 0;
    const auto left = params.dense(left_);
    const auto right = params.dense(right_);
    const Scalar* q = queries.row(t).data() + (h * dk);
    for (Index j = 0; j < n; ++j) {
      s_left[j] = detail::recheck_dot(q, left.row(base + j).data(), half);
      s_right[j] = detail::recheck_dot(q + half, right.row(base + j).data(), half);
    }
  }

  /// kBFloat16Checked: the exact top k' + 1 of both halves of every (token, head) of tokens [t0, t1), into
  /// tile.checked_idx / checked_val at ((t - t0) H + h) 2 (k' + 1) (left, then right): bf16 scores, the
  /// candidates the bound cannot rule out, their re-check dots (bf16_scoring.hpp).
  void checked_tile(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& queries, Index t0, Index t1,
                    const Workspace& ws, TileScratch& tile) const {
    const Index h_count = num_heads(), n = num_sub_keys(), half = half_dim(), dk = key_dim();
    const Index tokens = t1 - t0, rows = tokens * h_count, ka = kept_per_half();
    const bool per_head = config_.key_sharing == KeySharing::kPerHead;
    const double roundoff = std::numeric_limits<Scalar>::epsilon();
    tile.bf16_queries.resize(rows, half);
    tile.query_norm.resize(static_cast<std::size_t>(rows));
    tile.checked_idx.resize(static_cast<std::size_t>(rows * 2 * ka));
    tile.checked_val.resize(static_cast<std::size_t>(rows * 2 * ka));
    tile.approx_top.resize(static_cast<std::size_t>(ka));
    tile.candidate_rank.resize(static_cast<std::size_t>(ka));
    if (static_cast<Index>(tile.candidates.size()) < n + 16) tile.candidates.resize(static_cast<std::size_t>(n + 16));
    const Index padded = (n + 15) / 16 * 16;
    if (tile.approx.rows() < rows || tile.approx.cols() != padded) tile.approx.resize(rows, padded);
    for (int side = 0; side < 2; ++side) {
      const auto keys = params.dense(side == 0 ? left_ : right_);
      const detail::Bf16SubKeys& packed = ws.bf16_keys[side];
      // Rows ordered h T + (t - t0): one head's rows are contiguous, as per-head keys need.
      for (Index h = 0; h < h_count; ++h) {
        for (Index t = t0; t < t1; ++t) {
          const Scalar* q = queries.row(t).data() + (h * dk + side * half);
          const Index r = h * tokens + (t - t0);
          tile.bf16_queries.set_row(r, q, half);
          // |q| in Scalar (one vector pass), raised by its own rounding bound (d + 2) u_S.
          const double sq = static_cast<double>(Eigen::Map<const Vector<Scalar>>(q, half).squaredNorm());
          tile.query_norm[static_cast<std::size_t>(r)] = std::sqrt(sq) * (1.0 + static_cast<double>(half + 2) * roundoff);
        }
      }
      if (per_head) {
        for (Index h = 0; h < h_count; ++h) {
          detail::bf16_score(tile.bf16_queries, h * tokens, tokens, packed, h, tile.approx.row(h * tokens).data(), padded);
        }
      } else {
        detail::bf16_score(tile.bf16_queries, 0, rows, packed, 0, tile.approx.data(), padded);
      }
      for (Index h = 0; h < h_count; ++h) {
        const Index g = per_head ? h : 0;
        const double key_norm = packed.max_norm[static_cast<std::size_t>(g)];
        for (Index t = t0; t < t1; ++t) {
          const Index r = h * tokens + (t - t0);
          const Scalar* q = queries.row(t).data() + (h * dk + side * half);
          const float* a = tile.approx.row(r).data();
          const double q_norm = tile.query_norm[static_cast<std::size_t>(r)];
          // Candidates: every j with a_j >= L - 2E, for any L <= the (k' + 1)-th largest approximate score
          // (all of them when a rounded operand or a score could overflow: then a bf16 value may be
          // infinite, and inf * 0 is NaN). At least k' + 1 of the a_j are >= L, so their exact scores are
          // >= L - E, and so is the (k' + 1)-th largest exact score s*; a j of the exact top k' + 1 has
          // s_j >= s* and a_j >= s_j - E >= L - 2E. L is the lane bound (detail::lane_bound, one pass; a
          // few more candidates than the exact tau) where it applies, else tau itself.
          // tile.candidates keeps n + 16 slots (the vector scan stores whole blocks); the first m are used.
          std::int32_t* cand = tile.candidates.data();
          Index m = 0;
          const double limit = detail::kBf16ScoringMaxProduct;
          if (!(q_norm <= limit && key_norm <= limit && q_norm * key_norm <= limit)) {
            for (Index j = 0; j < n; ++j) cand[m++] = static_cast<std::int32_t>(j);
          } else {
            float lower;
            if (detail::has_lane_bound(n, ka)) {
              lower = detail::lane_bound(a, n, ka);
            } else {
              peer::top_k(a, n, ka, tile.candidate_rank.data(), tile.approx_top.data());
              lower = tile.approx_top[static_cast<std::size_t>(ka - 1)];
            }
            const double bound = detail::bf16_score_bound(q_norm, key_norm, half, roundoff);
            const double floor = static_cast<double>(lower) - 2.0 * bound;
            float theta = static_cast<float>(floor);
            if (static_cast<double>(theta) > floor) theta = std::nextafter(theta, -std::numeric_limits<float>::infinity());
            m = detail::compress_at_least<float>(a, n, theta, nullptr, cand, n);
          }
          tile.candidate_val.resize(static_cast<std::size_t>(m));
          const Index base = g * n;
          for (Index c = 0; c < m; ++c) {
            tile.candidate_val[static_cast<std::size_t>(c)] =
                detail::recheck_dot(q, keys.row(base + cand[c]).data(), half);
          }
          // The candidates are in ascending index order, so top_k's ties to the lower position are ties to
          // the lower sub-key.
          const std::size_t out = static_cast<std::size_t>(((t - t0) * h_count + h) * 2 + side) * static_cast<std::size_t>(ka);
          std::int32_t* idx = tile.checked_idx.data() + out;
          peer::top_k(tile.candidate_val.data(), m, ka, idx, tile.checked_val.data() + out);
          for (Index i = 0; i < ka; ++i) idx[i] = cand[idx[i]];
        }
      }
    }
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
