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

/// A PEER-pytorch tensor as a row-major 2-D view: its name and [rows, cols].
struct PeerPytorchTensor {
  std::string name;
  Index rows = 0;
  Index cols = 0;
};

/// PEER-pytorch's tensors for `t`, in its state_dict order.
inline std::vector<PeerPytorchTensor> peer_pytorch_tensors(const PeerPytorchConfig& t) {
  t.validate();
  const Index s = t.num_sub_keys();
  return {{"to_queries.0.weight", 2 * t.heads * t.dim_key, t.dim},
          {"keys", t.heads * s * 2, t.dim_key},
          {"weight_down_embed.weight", t.num_experts, t.dim},
          {"weight_up_embed.weight", t.num_experts, t.dim}};
}

namespace detail {

/// Calls link(theirs, their_row, ours, our_row, our_col, cols) for every row of every PEER-pytorch
/// tensor: that row is `cols` scalars of our tensor `ours` at [our_row, our_col ..).
template <typename Link>
void for_each_peer_pytorch_row(const PeerPytorchConfig& t, Link&& link) {
  const Index h_count = t.heads, dk = t.dim_key, s = t.num_sub_keys(), d = t.dim;
  for (Index p = 0; p < 2; ++p) {
    for (Index h = 0; h < h_count; ++h) {
      for (Index j = 0; j < dk; ++j) link("to_queries.0.weight", p * h_count * dk + h * dk + j, "query.weight", h * 2 * dk + p * dk + j, 0, d);
    }
  }
  for (Index h = 0; h < h_count; ++h) {
    for (Index i = 0; i < s; ++i) {
      for (Index p = 0; p < 2; ++p) link("keys", (h * s + i) * 2 + p, p == 0 ? "sub_keys.left" : "sub_keys.right", h * s + i, 0, dk);
    }
  }
  for (Index e = 0; e < t.num_experts; ++e) {
    link("weight_down_embed.weight", e, "experts", e, 0, d);
    link("weight_up_embed.weight", e, "experts", e, d, d);
  }
}

template <typename View>
const View& peer_pytorch_tensor(const std::map<std::string, View>& tensors, const PeerPytorchConfig& t, const std::string& name) {
  const auto it = tensors.find(name);
  if (it == tensors.end()) throw std::invalid_argument("PEER-pytorch tensor '" + name + "' is missing");
  for (const auto& spec : peer_pytorch_tensors(t)) {
    if (spec.name == name && (it->second.rows() != spec.rows || it->second.cols() != spec.cols)) {
      throw std::invalid_argument("PEER-pytorch tensor '" + name + "' is [" + to_text(it->second.rows()) + ", " +
                                  to_text(it->second.cols()) + "] but must be [" + to_text(spec.rows) + ", " +
                                  to_text(spec.cols) + "] for this configuration");
    }
  }
  return it->second;
}

}  // namespace detail

/// Fills `params` (of a layer made from peer_pytorch_config(t)) from PEER-pytorch's four tensors.
/// Every tensor is checked before anything is written.
template <typename Scalar>
void import_peer_pytorch(const PeerPytorchConfig& t, const std::map<std::string, ConstMatrixMap<Scalar>>& tensors,
                         Parameters<Scalar>& params) {
  for (const auto& spec : peer_pytorch_tensors(t)) detail::peer_pytorch_tensor(tensors, t, spec.name);
  for (const char* ours : {"query.weight", "sub_keys.left", "sub_keys.right", "experts"}) params.find(ours);  // all present
  detail::for_each_peer_pytorch_row(t, [&](const char* theirs, Index their_row, const char* ours, Index our_row, Index our_col, Index cols) {
    params.find(ours).row(our_row).segment(our_col, cols) = tensors.at(theirs).row(their_row);
  });
}

/// Writes `params` into PEER-pytorch's four tensors (views of the caller's memory, shapes checked).
template <typename Scalar>
void export_peer_pytorch(const PeerPytorchConfig& t, const Parameters<Scalar>& params,
                         std::map<std::string, MatrixMap<Scalar>>& tensors) {
  for (const auto& spec : peer_pytorch_tensors(t)) detail::peer_pytorch_tensor(tensors, t, spec.name);
  auto& p = const_cast<Parameters<Scalar>&>(params);  // find() is non-const; nothing is written to params
  detail::for_each_peer_pytorch_row(t, [&](const char* theirs, Index their_row, const char* ours, Index our_row, Index our_col, Index cols) {
    tensors.at(theirs).row(their_row) = p.find(ours).row(our_row).segment(our_col, cols);
  });
}

/// Writes `grads` in PEER-pytorch's layout, as its autograd would hold them: dense [N, D] expert
/// gradients with zeros where no token chose the expert (our gradient holds only the chosen rows).
template <typename Scalar>
void export_peer_pytorch_gradients(const PeerPytorchConfig& t, Gradients<Scalar>& grads,
                                   std::map<std::string, MatrixMap<Scalar>>& tensors) {
  for (const auto& spec : peer_pytorch_tensors(t)) detail::peer_pytorch_tensor(tensors, t, spec.name);
  const RowSparseGrad<Scalar>& experts = grads.find_table("experts");
  detail::for_each_peer_pytorch_row(t, [&](const char* theirs, Index their_row, const char* ours, Index our_row, Index our_col, Index cols) {
    auto out = tensors.at(theirs).row(their_row);
    if (std::string(ours) != "experts") {
      out = grads.find_dense(ours).row(our_row).segment(our_col, cols);
      return;
    }
    const Scalar* row = experts.find(static_cast<ExpertId>(our_row));
    if (row == nullptr) {
      out.setZero();
    } else {
      for (Index c = 0; c < cols; ++c) out(c) = row[our_col + c];
    }
  });
}

}  // namespace peer

#endif  // PEER_IO_MAPS_PEER_PYTORCH_HPP
