// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_MOE_CONFIG_HPP
#define PEER_LAYERS_MOE_CONFIG_HPP

/// \file
/// MoeConfig: the configuration of the coarse mixture-of-experts baseline (peer/layers/moe.hpp), its
/// routing and gate choices, and its validation rules.

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/fields.hpp"
#include "peer/core/types.hpp"
#include "peer/nn/activation.hpp"
#include "peer/nn/linear.hpp"

namespace peer {

/// Who chooses: tokens pick their top k experts, or experts pick their top C tokens.
enum class MoeRouting {
  kTokenChoice,   ///< each token takes its top k experts by p (GShard, Switch; experts may overflow)
  kExpertChoice,  ///< each expert takes its top C tokens by p (Zhou et al. 2022; the paper's MoE baseline)
};

/// How token-choice gates are formed from the kept probabilities (expert choice always uses g = p).
enum class MoeGateNorm {
  kRenormalize,  ///< g = p / sum of the k kept p: softmax over the kept logits (GShard top-2, Mixtral)
  kNone,         ///< g = p, the softmax over all E (Switch); with k = 1 the router still learns from the task
};

inline const char* to_string(MoeRouting r) {
  switch (r) {
    case MoeRouting::kTokenChoice: return "token_choice";
    case MoeRouting::kExpertChoice: return "expert_choice";
  }
  return "unknown";
}

inline const char* to_string(MoeGateNorm g) {
  switch (g) {
    case MoeGateNorm::kRenormalize: return "renormalize";
    case MoeGateNorm::kNone: return "none";
  }
  return "unknown";
}

/// Parses "token_choice" or "expert_choice".
inline MoeRouting moe_routing_from_string(const std::string& name) {
  for (MoeRouting r : {MoeRouting::kTokenChoice, MoeRouting::kExpertChoice}) {
    if (name == to_string(r)) return r;
  }
  throw std::invalid_argument("routing = \"" + name + "\" must be one of token_choice, expert_choice");
}

/// Parses "renormalize" or "none".
inline MoeGateNorm moe_gate_norm_from_string(const std::string& name) {
  for (MoeGateNorm g : {MoeGateNorm::kRenormalize, MoeGateNorm::kNone}) {
    if (name == to_string(g)) return g;
  }
  throw std::invalid_argument("gate_norm = \"" + name + "\" must be one of renormalize, none");
}

/// Configuration of a coarse MoE layer. Defaults: the paper's 128 experts; D = 256 as PeerConfig; top 2 with
/// experts of F = 512 = 4 D / k, so the experts' forward FLOPs per token equal those of the default dense FFW
/// (DenseFfwConfig: D -> 4 D -> D), the isoFLOP pairing the paper's comparisons use.
struct MoeConfig {
  Index model_dim = 256;      ///< D: input and output width
  Index num_experts = 128;    ///< E
  Index expert_hidden = 512;  ///< F: hidden width of one expert
  Index top_k = 2;            ///< k: experts per token (token choice); sets the capacity with expert choice
  MoeRouting routing = MoeRouting::kTokenChoice;
  double capacity_factor = 1.0;  ///< c: expert choice takes C = ceil(c B k / E) tokens per expert
  MoeGateNorm gate_norm = MoeGateNorm::kRenormalize;  ///< token choice only
  Activation activation = Activation::kGelu;
  Bias bias = Bias::kLearned;       ///< expert biases b1, b2 (the router has none)
  double load_balance_weight = 0;   ///< w of L_aux; 0 turns the loss (value and gradient) off

  /// Experts a token uses on average: k with token choice; c k with expert choice (nominal: the batch's
  /// exact figure is E C / B, C rounded up and capped at B).
  double experts_per_token() const {
    const double k = static_cast<double>(top_k);
    return routing == MoeRouting::kTokenChoice ? k : capacity_factor * k;
  }

  /// Expert-choice capacity for `tokens` counted rows: C = min(tokens, ceil(c * tokens * k / E)), evaluated
  /// in double in that order (so c = 1.1 may round up one more than exact arithmetic would).
  Index capacity(Index tokens) const {
    if (tokens <= 0) return 0;
    const double want = std::ceil(capacity_factor * static_cast<double>(tokens) * static_cast<double>(top_k) /
                                  static_cast<double>(num_experts));
    return static_cast<Index>(std::min(want, static_cast<double>(tokens)));
  }

  /// Forward FLOPs per token (2 per multiply-add), main terms: router 2 D E + experts 4 D F per expert used
  ///   = 2 D E + 4 D F experts_per_token().
  /// Softmax, top-k, gates, biases, the activation and the weighted sum of outputs (O(E + k (D + F))) are
  /// left out, as in DenseFfwConfig and PeerConfig.
  double forward_flops_per_token() const {
    const double d = static_cast<double>(model_dim), e = static_cast<double>(num_experts);
    const double f = static_cast<double>(expert_hidden);
    return 2 * d * e + 4 * d * f * experts_per_token();
  }

  /// Backward FLOPs per token with dx wanted: each forward GEMM has two of the same size in backward (the
  /// input gradient and the weight gradient), so 2 x forward = 4 D E + 8 D F experts_per_token().
  double backward_flops_per_token() const { return 2 * forward_flops_per_token(); }

  /// Trained parameters: router E D + experts E (2 D F) + biases E (F + D) (with Bias::kLearned).
  /// Equals layout().num_parameters() of the layer.
  Index total_parameters() const {
    const Index per_expert = 2 * model_dim * expert_hidden + (bias == Bias::kLearned ? expert_hidden + model_dim : 0);
    return num_experts * model_dim + num_experts * per_expert;
  }

  /// Parameters one token's output depends on: the whole router E D plus experts_per_token() experts of
  /// 2 D F (+ F + D biases) each. Fractional for expert choice with a fractional c k.
  double active_parameters_per_token() const {
    const double d = static_cast<double>(model_dim), f = static_cast<double>(expert_hidden);
    const double per_expert = 2 * d * f + (bias == Bias::kLearned ? f + d : 0.0);
    return static_cast<double>(num_experts) * d + experts_per_token() * per_expert;
  }

  /// Parameter bytes one token reads when nothing is shared with other tokens: active_parameters_per_token()
  /// x scalar_bytes (the per-token model the PEER benchmark uses for its expert rows). A batch of B tokens
  /// reads every expert's weights once, so its traffic per token is at most total_parameters() x
  /// scalar_bytes / B; the smaller of the two is the better estimate.
  double parameter_bytes_per_token(Index scalar_bytes = static_cast<Index>(sizeof(float))) const {
    return active_parameters_per_token() * static_cast<double>(scalar_bytes);
  }

  /// The configuration as (key, value) text pairs, e.g. for a checkpoint's metadata. Doubles are written
  /// with 17 significant digits, so they read back exactly.
  Fields to_fields() const {
    const auto num = detail::exact_text;
    return {{"model_dim", std::to_string(model_dim)},
            {"num_experts", std::to_string(num_experts)},
            {"expert_hidden", std::to_string(expert_hidden)},
            {"top_k", std::to_string(top_k)},
            {"routing", to_string(routing)},
            {"capacity_factor", num(capacity_factor)},
            {"gate_norm", to_string(gate_norm)},
            {"activation", to_string(activation)},
            {"bias", bias == Bias::kLearned ? "learned" : "none"},
            {"load_balance_weight", num(load_balance_weight)}};
  }

  /// The first field whose value differs from `other`'s, as "field: this vs other", or "" if none.
  std::string first_difference(const MoeConfig& other) const { return detail::first_difference(to_fields(), other.to_fields()); }

  /// Throws std::invalid_argument naming the first field that breaks a rule, its value and the rule.
  void validate() const {
    const std::string p = "MoeConfig.";
    if (model_dim <= 0) detail::throw_invalid(p + "model_dim", model_dim, "must be > 0");
    if (model_dim > (Index{1} << 24)) detail::throw_invalid(p + "model_dim", model_dim, "must be <= 2^24");
    if (num_experts <= 0) detail::throw_invalid(p + "num_experts", num_experts, "must be > 0");
    if (num_experts >= (Index{1} << 31)) {
      detail::throw_invalid(p + "num_experts", num_experts, "must be < 2^31 (expert ids are int32)");
    }
    if (expert_hidden <= 0) detail::throw_invalid(p + "expert_hidden", expert_hidden, "must be > 0");
    if (expert_hidden > (Index{1} << 24)) {
      detail::throw_invalid(p + "expert_hidden", expert_hidden, "must be <= 2^24");
    }
    // The expert weights are two tensors of E F D scalars: keep their sizes far from Index overflow.
    const double weights = static_cast<double>(num_experts) * static_cast<double>(expert_hidden) *
                           static_cast<double>(model_dim);
    if (weights > 0x1.0p46) {
      detail::throw_invalid(p + "num_experts * expert_hidden * model_dim", weights, "must be <= 2^46");
    }
    if (top_k <= 0) detail::throw_invalid(p + "top_k", top_k, "must be > 0");
    if (top_k > num_experts) {
      detail::throw_invalid(p + "top_k", top_k, "must be <= num_experts = " + detail::to_text(num_experts));
    }
    if (!(capacity_factor > 0.0) || !detail::is_finite(capacity_factor)) {
      detail::throw_invalid(p + "capacity_factor", capacity_factor, "must be finite and > 0");
    }
    if (!(load_balance_weight >= 0.0) || !detail::is_finite(load_balance_weight)) {
      detail::throw_invalid(p + "load_balance_weight", load_balance_weight, "must be finite and >= 0");
    }
  }
};

}  // namespace peer

#endif  // PEER_LAYERS_MOE_CONFIG_HPP
