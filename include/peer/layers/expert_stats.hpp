// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_EXPERT_STATS_HPP
#define PEER_LAYERS_EXPERT_STATS_HPP

/// \file
/// Expert statistics of He (2024), section 3.4, over an evaluation set:
///   z'_i = sum over tokens of g_i(x)   (0 when expert i is not selected; a token whose heads pick i
///                                        twice adds both weights),
///   z = z' / |z'|_1,
///   usage      = fraction of experts with z_i != 0,
///   unevenness = KL(z || uniform) = log N + sum_i z_i log z_i   (0 log 0 = 0; 0 for a uniform pool).
/// Accumulation costs O(B H k) per batch (in token order, deterministic); the report costs O(N).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// One expert in a report: its id, z'_i and how many times it was selected.
struct ExpertCount {
  ExpertId id = 0;
  double weight = 0.0;
  std::int64_t selections = 0;
};

/// Accumulates z' and selection counts over batches; usage, unevenness and the extremes on demand.
class ExpertStats {
 public:
  explicit ExpertStats(Index num_experts)
      : weight_(static_cast<std::size_t>(num_experts), 0.0), count_(static_cast<std::size_t>(num_experts), 0) {
    if (num_experts <= 0) detail::throw_invalid("ExpertStats num_experts", num_experts, "must be > 0");
  }

  /// Adds a batch: ids and gates [B, H * k] as a PEER layer's cache holds them (cache.ids, cache.gates).
  template <typename IdDerived, typename GateDerived>
  void add(const Eigen::MatrixBase<IdDerived>& ids, const Eigen::MatrixBase<GateDerived>& gates) {
    detail::check_shape("gates", gates.rows(), gates.cols(), ids.rows(), ids.cols());
    const Index n = num_experts();
    for (Index r = 0; r < ids.rows(); ++r) {
      for (Index c = 0; c < ids.cols(); ++c) {
        const auto id = ids(r, c);
        if (id < 0 || id >= n) {
          detail::throw_invalid("ExpertStats: ids[" + detail::to_text(r) + ", " + detail::to_text(c) + "]", id,
                                "must be in [0, " + detail::to_text(n) + ")");
        }
        weight_[static_cast<std::size_t>(id)] += static_cast<double>(gates(r, c));
        count_[static_cast<std::size_t>(id)] += 1;
      }
    }
    tokens_ += ids.rows();
  }

  void clear() {
    std::fill(weight_.begin(), weight_.end(), 0.0);
    std::fill(count_.begin(), count_.end(), 0);
    tokens_ = 0;
  }

  Index num_experts() const { return static_cast<Index>(weight_.size()); }
  std::int64_t tokens() const { return tokens_; }
  /// z'_i.
  double weight(ExpertId id) const { return weight_.at(static_cast<std::size_t>(id)); }
  std::int64_t selections(ExpertId id) const { return count_.at(static_cast<std::size_t>(id)); }

  /// Fraction of experts with z_i != 0.
  double usage() const {
    std::int64_t used = 0;
    for (double w : weight_) used += w != 0.0;
    return static_cast<double>(used) / static_cast<double>(weight_.size());
  }

  /// KL(z || uniform) in nats; 0 before anything was added.
  double unevenness() const {
    double total = 0.0;
    for (double w : weight_) total += w;
    if (total == 0.0) return 0.0;
    double sum = 0.0;
    for (double w : weight_) {
      if (w != 0.0) {
        const double z = w / total;
        sum += z * std::log(z);
      }
    }
    return std::log(static_cast<double>(weight_.size())) + sum;
  }

  /// These statistics over a pool of `num_experts` in which expert i is now expert map(i) (a pool that
  /// grew: peer/layers/pool_growth.hpp); experts nothing moves to start at 0, the token count is kept.
  template <typename Map>
  ExpertStats moved(Index num_experts, Map&& map) const {
    ExpertStats out(num_experts);
    for (std::size_t i = 0; i < weight_.size(); ++i) {
      const auto to = static_cast<Index>(map(static_cast<ExpertId>(i)));
      if (to < 0 || to >= num_experts) {
        detail::throw_invalid("ExpertStats::moved: expert " + detail::to_text(i) + " moves to", to,
                              "which must be in [0, " + detail::to_text(num_experts) + ")");
      }
      out.weight_[static_cast<std::size_t>(to)] += weight_[i];
      out.count_[static_cast<std::size_t>(to)] += count_[i];
    }
    out.tokens_ = tokens_;
    return out;
  }

  /// The `count` experts with the largest z' (ties to the lower id), largest first.
  std::vector<ExpertCount> most_used(Index count) const { return extremes(count, true); }
  /// The `count` USED experts (z' != 0) with the smallest z', smallest first.
  std::vector<ExpertCount> least_used(Index count) const { return extremes(count, false); }

 private:
  std::vector<ExpertCount> extremes(Index count, bool largest) const {
    std::vector<ExpertCount> all;
    for (std::size_t i = 0; i < weight_.size(); ++i) {
      if (largest || weight_[i] != 0.0) all.push_back({static_cast<ExpertId>(i), weight_[i], count_[i]});
    }
    const std::size_t m = std::min<std::size_t>(all.size(), static_cast<std::size_t>(std::max<Index>(count, 0)));
    std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(m), all.end(),
                      [largest](const ExpertCount& a, const ExpertCount& b) {
                        if (a.weight != b.weight) return largest ? a.weight > b.weight : a.weight < b.weight;
                        return a.id < b.id;
                      });
    all.resize(m);
    return all;
  }

  std::vector<double> weight_;
  std::vector<std::int64_t> count_;
  std::int64_t tokens_ = 0;
};

}  // namespace peer

#endif  // PEER_LAYERS_EXPERT_STATS_HPP
