// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPS_PEER_PYTORCH_HPP
#define PEER_IO_MAPS_PEER_PYTORCH_HPP

/// \file
/// lucidrains/PEER-pytorch 0.2.x: the configuration that computes its function exactly, and the map
/// between its tensors and ours, both directions (weights in, weights or gradients out).
///
/// PEER-pytorch's `PEER(dim, heads, num_experts, num_experts_per_head, dim_key, non_competing_scores,
/// product_key_topk)` with its defaults otherwise (no pre-RMSNorm, one expert table for all heads, exact
/// GELU, no dropout) computes, per token x and head h (S = sqrt(N), K = product_key_topk or
/// num_experts_per_head):
///   q_p = W_q[p h dk + h dk .. +dk] x for the two halves p        (no bias, no query norm)
///   s_p[i] = q_p . keys[h, i, p, :]                               (per-head sub-keys)
///   top K of each half, then the top k of the K^2 sums; expert id = a S + b
///   k = num_experts_per_head, g = softmax of the k scores          (non_competing_scores = false)
///   k = 1, g = relu(score)                                         (non_competing_scores = true, its default)
///   y = sum_h sum_j g_j GELU(u_e . x) v_e,  u = weight_down_embed, v = weight_up_embed
/// which is our layer with per-head keys, no query norm, no bias, exact GELU, Dk = 2 dim_key, and
/// k' = K (peer_pytorch_config()). Its tensors and ours:
///
/// | PEER-pytorch                       | shape            | ours                                          |
/// |---|---|---|
/// | `to_queries.0.weight`              | [2 H dk, D]      | `query.weight` [H Dk, D]: their row p H dk + h dk + j is our row h Dk + p dk + j (the half is their outermost index, the head ours) |
/// | `keys`                             | [H, S, 2, dk]    | `sub_keys.left` / `sub_keys.right` [H S, dk]: keys[h, i, 0 / 1, :] is row h S + i |
/// | `weight_down_embed.weight`         | [N, D]           | `experts` [N, 2D] columns [0, D): u_e         |
/// | `weight_up_embed.weight`           | [N, D]           | `experts` columns [D, 2D): v_e                |
///
/// Tensors are exchanged as row-major 2-D views named as in PEER-pytorch's state_dict (`keys` viewed as
/// [H S 2, dk]); every shape is checked (std::invalid_argument naming the tensor and both shapes).

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/io/maps/torch_map.hpp"
#include "peer/layers/peer_config.hpp"

namespace peer {

/// PEER-pytorch's constructor arguments that decide its function.
struct PeerPytorchConfig {
  Index dim = 0;                      ///< D
  Index heads = 8;                    ///< H
  Index num_experts = 1000000;        ///< N (a perfect square)
  Index num_experts_per_head = 16;    ///< k (with non_competing_scores = false), and K by default
  Index dim_key = 0;                  ///< its sub-key length dk (= our Dk / 2); must be set
  bool non_competing_scores = true;   ///< its default: one expert per head, ReLU gate
  Index product_key_topk = 0;         ///< K, the per-half top-K; 0 means num_experts_per_head

  Index per_half_top_k() const { return product_key_topk > 0 ? product_key_topk : num_experts_per_head; }
  Index num_sub_keys() const { return static_cast<Index>(std::llround(std::sqrt(static_cast<double>(num_experts)))); }

  void validate() const {
    const std::string p = "PeerPytorchConfig.";
    if (dim <= 0) detail::throw_invalid(p + "dim", dim, "must be > 0");
    if (heads <= 0) detail::throw_invalid(p + "heads", heads, "must be > 0");
    if (dim_key <= 0) detail::throw_invalid(p + "dim_key", dim_key, "must be > 0 (PEER-pytorch's sub-key length)");
    if (num_experts_per_head <= 0) detail::throw_invalid(p + "num_experts_per_head", num_experts_per_head, "must be > 0");
    if (product_key_topk < 0) detail::throw_invalid(p + "product_key_topk", product_key_topk, "must be >= 0 (0: num_experts_per_head)");
    const Index s = num_sub_keys();
    if (num_experts <= 0 || s * s != num_experts) {
      detail::throw_invalid(p + "num_experts", num_experts, "must be a perfect square");
    }
  }
};

/// The configuration of our layer that computes PEER-pytorch's function exactly.
inline PeerConfig peer_pytorch_config(const PeerPytorchConfig& t) {
  t.validate();
  PeerConfig c;
  c.model_dim = t.dim;
  c.num_experts = t.num_experts;
  c.num_heads = t.heads;
  c.key_dim = 2 * t.dim_key;
  c.sub_key_top_k = t.per_half_top_k();
  c.top_k = t.non_competing_scores ? 1 : t.num_experts_per_head;
  c.gating = t.non_competing_scores ? Gating::kReLU : Gating::kSoftmax;
  c.activation = Activation::kGelu;
  c.query_norm = QueryNorm::kNone;
  c.query_bias = Bias::kNone;
  c.key_sharing = KeySharing::kPerHead;
  c.validate();
  return c;
}

/// The PEER-pytorch configuration whose function our layer configured by `c` computes: the inverse of
/// peer_pytorch_config(). Throws std::invalid_argument naming the first field where `c` differs from every
/// configuration PEER-pytorch computes (a batch-normed query, shared keys, another activation, ...).
inline PeerPytorchConfig peer_pytorch_config_of(const PeerConfig& c) {
  PeerPytorchConfig t;
  t.dim = c.model_dim;
  t.heads = c.num_heads;
  t.num_experts = c.num_experts;
  t.dim_key = c.key_dim / 2;
  t.non_competing_scores = c.gating == Gating::kReLU && c.top_k == 1;
  t.num_experts_per_head = t.non_competing_scores ? c.sub_key_top_k : c.top_k;
  t.product_key_topk = c.sub_key_top_k;
  PeerConfig theirs;
  try {
    theirs = peer_pytorch_config(t);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("this layer is not one PEER-pytorch computes: ") + e.what());
  }
  const std::string diff = theirs.first_difference(c);
  if (!diff.empty()) {
    throw std::invalid_argument("this layer is not one PEER-pytorch computes: " + diff + " (PEER-pytorch's vs this layer's)");
  }
  return t;
}

/// A PEER-pytorch tensor: its name, its row-major 2-D view [rows, cols] and its shape in PyTorch.
using PeerPytorchTensor = TorchTensor;

/// The map between PEER-pytorch's tensors and ours (peer/io/maps/torch_map.hpp), for one configuration.
class PeerPytorchMap {
 public:
  explicit PeerPytorchMap(const PeerPytorchConfig& t) : t_(t) { t_.validate(); }

  static const char* package() { return "PEER-pytorch"; }

  /// Its tensors in its state_dict order (`keys` viewed as [H S 2, dk]).
  std::vector<TorchTensor> tensors() const {
    const Index h = t_.heads, s = t_.num_sub_keys(), dk = t_.dim_key, d = t_.dim, n = t_.num_experts;
    return {{"to_queries.0.weight", 2 * h * dk, d, {2 * h * dk, d}},
            {"keys", h * s * 2, dk, {h, s, 2, dk}},
            {"weight_down_embed.weight", n, d, {n, d}},
            {"weight_up_embed.weight", n, d, {n, d}}};
  }

  template <typename Link>
  void for_each_row(Link&& link) const {
    detail::for_each_product_key_row("to_queries.0.weight", t_.heads, t_.dim_key, t_.num_sub_keys(), t_.dim, link);
    for (Index e = 0; e < t_.num_experts; ++e) {
      link("weight_down_embed.weight", e, "experts", e, 0, t_.dim);
      link("weight_up_embed.weight", e, "experts", e, t_.dim, t_.dim);
    }
  }

 private:
  PeerPytorchConfig t_;
};

/// PEER-pytorch's tensors for `t`, in its state_dict order.
inline std::vector<PeerPytorchTensor> peer_pytorch_tensors(const PeerPytorchConfig& t) { return PeerPytorchMap(t).tensors(); }

/// Fills `params` (of a layer made from peer_pytorch_config(t)) from PEER-pytorch's four tensors.
/// Every tensor is checked before anything is written.
template <typename Scalar>
void import_peer_pytorch(const PeerPytorchConfig& t, const std::map<std::string, ConstMatrixMap<Scalar>>& tensors,
                         Parameters<Scalar>& params) {
  detail::import_torch(PeerPytorchMap(t), tensors, params);
}

/// Writes `params` into PEER-pytorch's four tensors (views of the caller's memory, shapes checked).
template <typename Scalar>
void export_peer_pytorch(const PeerPytorchConfig& t, const Parameters<Scalar>& params,
                         std::map<std::string, MatrixMap<Scalar>>& tensors) {
  detail::export_torch(PeerPytorchMap(t), params, tensors);
}

/// Writes `grads` in PEER-pytorch's layout, as its autograd would hold them: dense [N, D] expert
/// gradients with zeros where no token chose the expert (our gradient holds only the chosen rows).
template <typename Scalar>
void export_peer_pytorch_gradients(const PeerPytorchConfig& t, Gradients<Scalar>& grads,
                                   std::map<std::string, MatrixMap<Scalar>>& tensors) {
  detail::export_torch_gradients(PeerPytorchMap(t), grads, tensors);
}

}  // namespace peer

#endif  // PEER_IO_MAPS_PEER_PYTORCH_HPP
