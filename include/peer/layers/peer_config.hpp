// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_PEER_CONFIG_HPP
#define PEER_LAYERS_PEER_CONFIG_HPP

/// \file
/// PeerConfig: the configuration of a PEER layer, with the paper's defaults and its validation rules.

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/fields.hpp"
#include "peer/core/types.hpp"
#include "peer/layers/gating.hpp"
#include "peer/nn/activation.hpp"
#include "peer/nn/linear.hpp"
#include "peer/nn/query_network.hpp"
#include "peer/retrieval/product_keys.hpp"

namespace peer {

/// Configuration of a PEER layer. Defaults follow He (2024): N = 1024^2 experts, H = 8 heads, top k = 16
/// per head (k' = k per half), batch-normed queries, softmax gates. The paper fixes neither D nor Dk; the
/// defaults here are D = Dk = 256 (a query of D per head, as in the paper's released configurations).
struct PeerConfig {
  Index model_dim = 256;              ///< D: input and output width
  Index num_experts = 1024 * 1024;    ///< N = n^2, a perfect square < 2^31
  Index num_heads = 8;                ///< H: retrieval heads, all sharing one expert pool
  Index key_dim = 256;                ///< Dk: one head's query width (even), split in halves of Dk / 2
  Index top_k = 16;                   ///< k: experts kept per head
  Index sub_key_top_k = 16;           ///< k': sub-keys kept per half; exact retrieval needs k' >= k
  Activation activation = Activation::kGelu;
  Gating gating = Gating::kSoftmax;
  QueryNorm query_norm = QueryNorm::kBatchNorm;
  Bias query_bias = Bias::kNone;      ///< the paper omits biases
  KeySharing key_sharing = KeySharing::kShared;
  double batch_norm_momentum = 0.1;   ///< running <- (1 - m) running + m batch
  double norm_epsilon = 1e-5;         ///< added to variances in query normalization
  /// How the expert (or value) table is stored: the layer's Scalar, or bfloat16 (half the bytes of float,
  /// computed in Scalar; optimizers round updated rows, see peer/optim/table_rounding.hpp).
  TableStorage expert_storage = TableStorage::kNative;
  /// How sub-keys are scored: the GEMM in Scalar (kExact), or bfloat16 with the candidates re-scored
  /// exactly (kBFloat16Checked: the same exact retrieval over re-check scores, faster on CPUs with
  /// AVX512_BF16; peer/retrieval/bf16_scoring.hpp). Needs key_dim <= 65536.
  SubKeyScoring sub_key_scoring = SubKeyScoring::kExact;

  /// n = sqrt(N), the number of sub-keys per half (valid after validate()).
  Index num_sub_keys() const { return static_cast<Index>(std::llround(std::sqrt(static_cast<double>(num_experts)))); }

  /// Forward multiply-add FLOPs per token (2 per multiply-add), main terms only:
  ///   query projection 2 D H Dk + sub-key scoring 2 H n Dk + experts 4 D H k (u . x and the axpy of v).
  /// Normalization, top-k selection, k ln k candidate sums and gates are O(H (Dk + n + k)) and left out.
  double forward_flops_per_token() const {
    const double d = static_cast<double>(model_dim), h = static_cast<double>(num_heads);
    const double dk = static_cast<double>(key_dim), n = static_cast<double>(num_sub_keys());
    return 2 * d * h * dk + 2 * h * n * dk + 4 * d * h * static_cast<double>(top_k);
  }

  /// The configuration as (key, value) text pairs, e.g. for a checkpoint's metadata. Doubles are written
  /// with 17 significant digits, so they read back exactly.
  /// "expert_storage" is listed only when it is not native, so files from before it existed still match.
  /// sub_key_scoring is not listed: it changes how retrieval computes, no parameter, so a checkpoint of
  /// either mode loads into a layer of the other.
  Fields to_fields() const {
    const auto num = detail::exact_text;
    Fields f{{"model_dim", std::to_string(model_dim)},
            {"num_experts", std::to_string(num_experts)},
            {"num_heads", std::to_string(num_heads)},
            {"key_dim", std::to_string(key_dim)},
            {"top_k", std::to_string(top_k)},
            {"sub_key_top_k", std::to_string(sub_key_top_k)},
            {"activation", to_string(activation)},
            {"gating", to_string(gating)},
            {"query_norm", to_string(query_norm)},
            {"query_bias", query_bias == Bias::kLearned ? "learned" : "none"},
            {"key_sharing", to_string(key_sharing)},
            {"batch_norm_momentum", num(batch_norm_momentum)},
            {"norm_epsilon", num(norm_epsilon)}};
    if (expert_storage != TableStorage::kNative) f.push_back({"expert_storage", to_string(expert_storage)});
    return f;
  }

  /// The first field whose value differs from `other`'s, as "field: this vs other", or "" if none.
  std::string first_difference(const PeerConfig& other) const { return detail::first_difference(to_fields(), other.to_fields()); }

  /// Throws std::invalid_argument naming the first field that breaks a rule, its value and the rule.
  void validate() const {
    const std::string p = "PeerConfig.";
    if (model_dim <= 0) detail::throw_invalid(p + "model_dim", model_dim, "must be > 0");
    if (num_experts <= 0) detail::throw_invalid(p + "num_experts", num_experts, "must be > 0");
    if (num_experts >= (Index{1} << 31)) {
      detail::throw_invalid(p + "num_experts", num_experts, "must be < 2^31 (expert ids are int32)");
    }
    const Index n = num_sub_keys();
    if (n * n != num_experts) {
      detail::throw_invalid(p + "num_experts", num_experts,
                            "must be a perfect square n * n (product keys pair n left and n right sub-keys)");
    }
    if (num_heads <= 0) detail::throw_invalid(p + "num_heads", num_heads, "must be > 0");
    if (key_dim <= 0 || key_dim % 2 != 0) {
      detail::throw_invalid(p + "key_dim", key_dim, "must be even and > 0 (a query splits into two halves)");
    }
    if (sub_key_scoring == SubKeyScoring::kBFloat16Checked && key_dim / 2 > detail::kBf16ScoringMaxHalfDim) {
      detail::throw_invalid(p + "key_dim", key_dim, "must be <= 65536 with sub_key_scoring = bf16_checked (the bound's range)");
    }
    if (sub_key_top_k <= 0) detail::throw_invalid(p + "sub_key_top_k", sub_key_top_k, "must be > 0");
    if (sub_key_top_k > n) {
      detail::throw_invalid(p + "sub_key_top_k", sub_key_top_k,
                            "must be <= num_sub_keys = sqrt(num_experts) = " + detail::to_text(n));
    }
    if (top_k <= 0) detail::throw_invalid(p + "top_k", top_k, "must be > 0");
    if (top_k > sub_key_top_k * sub_key_top_k) {
      detail::throw_invalid(p + "top_k", top_k,
                            "must be <= sub_key_top_k^2 = " + detail::to_text(sub_key_top_k * sub_key_top_k));
    }
    if (!(batch_norm_momentum >= 0.0 && batch_norm_momentum <= 1.0)) {
      detail::throw_invalid(p + "batch_norm_momentum", batch_norm_momentum, "must be in [0, 1]");
    }
    if (!(norm_epsilon > 0.0) || !detail::is_finite(norm_epsilon)) {
      detail::throw_invalid(p + "norm_epsilon", norm_epsilon, "must be finite and > 0");
    }
    // The expert table holds N * 2D scalars and the query projection H * Dk * D: keep indices in range.
    if (model_dim > (Index{1} << 24)) detail::throw_invalid(p + "model_dim", model_dim, "must be <= 2^24");
    if (num_heads * key_dim > (Index{1} << 24)) {
      detail::throw_invalid(p + "num_heads * key_dim", num_heads * key_dim, "must be <= 2^24");
    }
  }
};

}  // namespace peer

#endif  // PEER_LAYERS_PEER_CONFIG_HPP
