// The feed-forward part of a transformer block, chosen at run time: the library's run-time adapter
// (peer/model/feed_forward.hpp) over a dense FFW, a coarse MoE, a product-key memory or a PEER layer,
// under the names the example uses.
#ifndef PEER_EXAMPLES_LM_FEED_FORWARD_HPP
#define PEER_EXAMPLES_LM_FEED_FORWARD_HPP

#include <memory>
#include <string>

#include <peer/model/feed_forward.hpp>

#include "lm/common.hpp"

namespace lm {

/// Which layer a block's feed-forward part is.
using FfnKind = peer::FeedForwardKind;
using peer::to_string;

inline FfnKind ffn_kind_from_string(const std::string& s) { return peer::feed_forward_kind_from_string(s); }

/// Configuration fields as text pairs (checkpoint metadata).
using Fields = std::vector<std::pair<std::string, std::string>>;

template <typename Scalar>
using FeedForward = peer::FeedForward<Scalar>;

template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_dense_ffn(const peer::DenseFfwConfig& config) {
  return peer::make_feed_forward<Scalar>(config);
}
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_moe_ffn(const peer::MoeConfig& config) {
  return peer::make_feed_forward<Scalar>(config);
}
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_pkm_ffn(const peer::PeerConfig& config) {
  return peer::make_feed_forward<Scalar>(config, FfnKind::kPkm);
}
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_peer_ffn(const peer::PeerConfig& config) {
  return peer::make_feed_forward<Scalar>(config, FfnKind::kPeer);
}

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_FEED_FORWARD_HPP
