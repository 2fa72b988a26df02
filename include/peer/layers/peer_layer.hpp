// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_PEER_LAYER_HPP
#define PEER_LAYERS_PEER_LAYER_HPP

/// \file
/// PeerLayer: the PEER layer of He (2024), "Mixture of A Million Experts": a product-key layer
/// (peer/layers/product_key_layer.hpp) whose memory is a pool of N single-neuron experts
/// e_i(x) = sigma(u_i . x) v_i (peer/experts/single_neuron_experts.hpp).
///
///   q = QueryNet(x)                                   [B, H * Dk]
///   (ids, s) = exact top k of q_h . key over N keys   [B, H, k] per head h (product keys)
///   g = gate(s) per head                              [B, H, k]
///   y = sum_h sum_j g_hj sigma(u_id . x) v_id         [B, D]
///
/// Parameters: query.weight [H Dk, D] (query.bias [1, H Dk] with Bias::kLearned), query.norm.weight/bias
/// [1, H Dk], buffers query.norm.running_mean/running_var [1, H Dk] (batch norm), sub_keys.left/right
/// [n, Dk / 2] ([H n, Dk / 2] per head), and the row-sparse table experts [N, 2 D], row i = [u_i | v_i].

#include "peer/experts/single_neuron_experts.hpp"
#include "peer/layers/product_key_layer.hpp"
#include "peer/nn/query_network.hpp"

namespace peer {

/// A PEER layer over Scalar (float or double) with a pluggable query network.
template <typename Scalar, typename QueryNet = QueryNetwork<Scalar>>
using PeerLayer = ProductKeyLayer<Scalar, SingleNeuronExperts<Scalar>, QueryNet>;

}  // namespace peer

#endif  // PEER_LAYERS_PEER_LAYER_HPP
