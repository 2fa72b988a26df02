// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_PRODUCT_KEY_MEMORY_HPP
#define PEER_LAYERS_PRODUCT_KEY_MEMORY_HPP

/// \file
/// ProductKeyMemory: the product-key memory layer of Lample et al. (2019), "Large Memory Layers with
/// Product Keys", a baseline of He (2024). The same query network, exact product-key retrieval and gating
/// as the PEER layer (one class template, peer/layers/product_key_layer.hpp); the retrieved rows are value
/// vectors instead of experts:
///
///   y = sum_h sum_j g_hj v_id        values [N, D], row-sparse table "values"
///
/// It is configured by a PeerConfig; the activation field is not used (a value has none).
/// pkm_config() gives the configuration of He (2024)'s PKM baseline.

#include "peer/experts/value_memory.hpp"
#include "peer/layers/peer_config.hpp"
#include "peer/layers/product_key_layer.hpp"
#include "peer/nn/query_network.hpp"

namespace peer {

/// A product-key memory over Scalar (float or double) with a pluggable query network.
template <typename Scalar, typename QueryNet = QueryNetwork<Scalar>>
using ProductKeyMemory = ProductKeyLayer<Scalar, ValueMemory<Scalar>, QueryNet>;

/// He (2024)'s PKM baseline: N = 1024^2 values, H = 8 heads, top k = 32 (k' = 32 per half), batch-normed
/// queries, softmax over each head's k scores; D = Dk = model_dim. Sub-keys are shared by the heads, as in
/// the PEER layer it is compared with (Lample et al. give each head its own: KeySharing::kPerHead).
inline PeerConfig pkm_config(Index model_dim = 256) {
  PeerConfig c;
  c.model_dim = model_dim;
  c.key_dim = model_dim;
  c.num_experts = 1024 * 1024;
  c.num_heads = 8;
  c.top_k = 32;
  c.sub_key_top_k = 32;
  c.query_norm = QueryNorm::kBatchNorm;
  c.gating = Gating::kSoftmax;
  return c;
}

}  // namespace peer

#endif  // PEER_LAYERS_PRODUCT_KEY_MEMORY_HPP
