// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPS_PKM_PYTORCH_HPP
#define PEER_IO_MAPS_PKM_PYTORCH_HPP

/// \file
/// lucidrains/product-key-memory 0.3.x (PyPI `product-key-memory`, its class `PKM`): the configuration
/// that computes its function, and the map between its tensors and ours, both directions.
///
/// `PKM(dim, heads, num_keys, topk, dim_head, use_layernorm = True, non_competitive_gates)` with its other
/// options at their defaults (no pre- or output LayerNorm, no dropout, no Gumbel noise, no
/// differentiable top-k, values summed rather than concatenated) computes, per token x and head h
/// (n = num_keys, N = n^2, dh = dim_head, K = topk):
///   q_p = LN(W_q[p H dh + h dh .. +dh] x) for the two halves p     (no bias; one LayerNorm(dh), eps 1e-5,
///                                                                   shared by every head and half)
///   s_p[i] = q_p . keys[h, i, p, :]                                 (per-head sub-keys, no scaling)
///   top K of each half, then the top K of the K^2 sums; value id = a n + b, a from the first half
///   g = softmax of the K scores (its default), or relu(score) (non_competitive_gates)
///   y = sum_h sum_j g_j values[id_j]                                (heads summed; no output projection)
/// which is our ProductKeyMemory with per-head keys, QueryNorm::kHalfLayerNorm, no bias, Dk = 2 dh, k =
/// k' = K (pkm_pytorch_config()). Its tensors and ours:
///
/// | product-key-memory | shape          | ours                                                       |
/// |---|---|---|
/// | `to_queries.weight` | [2 H dh, D]   | `query.weight` [H Dk, D]: their row p H dh + h dh + j is our row h Dk + p dh + j |
/// | `norm.weight`, `norm.bias` | [dh]   | `query.norm.weight`, `query.norm.bias` [1, dh] (one affine map for all halves) |
/// | `keys`              | [H, n, 2, dh] | `sub_keys.left` / `sub_keys.right` [H n, dh]: keys[h, i, 0 / 1, :] is row h n + i |
/// | `values.weight`     | [N, D]        | `values` [N, D], row for row                                |
///
/// Not mapped (refused by validate(), so nothing computes another function silently): its BatchNorm query
/// path (`use_layernorm = False`; in 0.2-0.3 it normalizes over the token axis of a [B H 2, T, dh] tensor,
/// which no layer here computes); the options outside the layer (pre_layernorm, norm_output: put a
/// LayerNorm before or after the layer) and those that change training only (dropouts, Gumbel noise).

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

/// product-key-memory's `PKM` constructor arguments that decide its function, with its defaults.
struct PkmPytorchConfig {
  Index dim = 0;                       ///< D; must be set
  Index heads = 4;                     ///< H
  Index num_keys = 128;                ///< n sub-keys per half: N = n^2 values
  Index topk = 32;                     ///< K: per half, and of the K^2 candidates
  Index dim_head = 128;                ///< dh, one half-query's width (our Dk = 2 dh)
  bool use_layernorm = true;           ///< its default; false (BatchNorm) is not mapped
  bool non_competitive_gates = false;  ///< ReLU instead of softmax over the K scores

  Index num_values() const { return num_keys * num_keys; }

  void validate() const {
    const std::string p = "PkmPytorchConfig.";
    if (dim <= 0) detail::throw_invalid(p + "dim", dim, "must be > 0");
    if (heads <= 0) detail::throw_invalid(p + "heads", heads, "must be > 0");
    if (num_keys <= 0) detail::throw_invalid(p + "num_keys", num_keys, "must be > 0");
    if (dim_head <= 0) detail::throw_invalid(p + "dim_head", dim_head, "must be > 0");
    if (topk <= 0 || topk > num_keys) detail::throw_invalid(p + "topk", topk, "must be in [1, num_keys] (torch.topk over each half's num_keys scores)");
    if (!use_layernorm) {
      throw std::invalid_argument(p + "use_layernorm = false is not mapped: product-key-memory's BatchNorm path "
                                  "normalizes over the token axis, which no layer here computes");
    }
  }
};

/// The configuration of our ProductKeyMemory that computes product-key-memory's function.
inline PeerConfig pkm_pytorch_config(const PkmPytorchConfig& t) {
  t.validate();
  PeerConfig c;
  c.model_dim = t.dim;
  c.num_experts = t.num_values();
  c.num_heads = t.heads;
  c.key_dim = 2 * t.dim_head;
  c.top_k = t.topk;
  c.sub_key_top_k = t.topk;
  c.gating = t.non_competitive_gates ? Gating::kReLU : Gating::kSoftmax;
  c.query_norm = QueryNorm::kHalfLayerNorm;
  c.norm_epsilon = 1e-5;  // torch.nn.LayerNorm's default
  c.query_bias = Bias::kNone;
  c.key_sharing = KeySharing::kPerHead;
  c.validate();
  return c;
}

/// The map between product-key-memory's tensors and ours (peer/io/maps/torch_map.hpp).
class PkmPytorchMap {
 public:
  explicit PkmPytorchMap(const PkmPytorchConfig& t) : t_(t) { t_.validate(); }

  static const char* package() { return "product-key-memory"; }

  /// Its tensors in its state_dict order (`norm.*` viewed as [1, dh], `keys` as [H n 2, dh]).
  std::vector<TorchTensor> tensors() const {
    const Index h = t_.heads, n = t_.num_keys, dh = t_.dim_head, d = t_.dim, v = t_.num_values();
    return {{"to_queries.weight", 2 * h * dh, d, {2 * h * dh, d}},
            {"norm.weight", 1, dh, {dh}},
            {"norm.bias", 1, dh, {dh}},
            {"keys", h * n * 2, dh, {h, n, 2, dh}},
            {"values.weight", v, d, {v, d}}};
  }

  template <typename Link>
  void for_each_row(Link&& link) const {
    detail::for_each_product_key_row("to_queries.weight", t_.heads, t_.dim_head, t_.num_keys, t_.dim, link);
    link("norm.weight", 0, "query.norm.weight", 0, 0, t_.dim_head);
    link("norm.bias", 0, "query.norm.bias", 0, 0, t_.dim_head);
    for (Index e = 0; e < t_.num_values(); ++e) link("values.weight", e, "values", e, 0, t_.dim);
  }

 private:
  PkmPytorchConfig t_;
};

/// product-key-memory's tensors for `t`, in its state_dict order.
inline std::vector<TorchTensor> pkm_pytorch_tensors(const PkmPytorchConfig& t) { return PkmPytorchMap(t).tensors(); }

/// Fills `params` (of a ProductKeyMemory made from pkm_pytorch_config(t)) from its five tensors; every
/// tensor is checked before anything is written.
template <typename Scalar>
void import_pkm_pytorch(const PkmPytorchConfig& t, const std::map<std::string, ConstMatrixMap<Scalar>>& tensors,
                        Parameters<Scalar>& params) {
  detail::import_torch(PkmPytorchMap(t), tensors, params);
}

/// Writes `params` into its five tensors (views of the caller's memory, shapes checked).
template <typename Scalar>
void export_pkm_pytorch(const PkmPytorchConfig& t, const Parameters<Scalar>& params,
                        std::map<std::string, MatrixMap<Scalar>>& tensors) {
  detail::export_torch(PkmPytorchMap(t), params, tensors);
}

/// Writes `grads` in its layout, as its autograd would hold them (values dense [N, D], zero where no
/// token chose the value).
template <typename Scalar>
void export_pkm_pytorch_gradients(const PkmPytorchConfig& t, Gradients<Scalar>& grads,
                                  std::map<std::string, MatrixMap<Scalar>>& tensors) {
  detail::export_torch_gradients(PkmPytorchMap(t), grads, tensors);
}

}  // namespace peer

#endif  // PEER_IO_MAPS_PKM_PYTORCH_HPP
