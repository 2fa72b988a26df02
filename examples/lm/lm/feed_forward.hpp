// The feed-forward part of a transformer block, chosen at run time: a dense FFW, a coarse MoE, a product-key
// memory or a PEER layer. All four library layers share one interface (make_parameters, make_gradients,
// layout, Cache, forward assigns y, backward adds into dx and the gradients, cost functions); this file puts
// a small virtual interface over them so a model can hold a different kind in every block.
//
// A FeedForward is stateless like the library layers: parameters, gradients and the cache are objects the
// caller owns (the cache is type-erased: make_cache() gives the right one).
#ifndef PEER_EXAMPLES_LM_FEED_FORWARD_HPP
#define PEER_EXAMPLES_LM_FEED_FORWARD_HPP

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lm/common.hpp"

namespace lm {

/// Which layer a block's feed-forward part is.
enum class FfnKind { kDense, kMoe, kPkm, kPeer };

inline const char* to_string(FfnKind k) {
  switch (k) {
    case FfnKind::kDense: return "dense";
    case FfnKind::kMoe: return "moe";
    case FfnKind::kPkm: return "pkm";
    case FfnKind::kPeer: return "peer";
  }
  return "unknown";
}

inline FfnKind ffn_kind_from_string(const std::string& s) {
  for (FfnKind k : {FfnKind::kDense, FfnKind::kMoe, FfnKind::kPkm, FfnKind::kPeer}) {
    if (s == to_string(k)) return k;
  }
  throw std::invalid_argument("ffn = \"" + s + "\" must be one of dense, moe, pkm, peer");
}

/// Configuration fields as text pairs (checkpoint metadata).
using Fields = std::vector<std::pair<std::string, std::string>>;

template <typename Scalar>
class FeedForward {
 public:
  /// Whatever the layer's forward keeps for its backward.
  struct Cache {
    virtual ~Cache() = default;
  };

  virtual ~FeedForward() = default;

  virtual FfnKind kind() const = 0;
  /// One line: the kind and its sizes.
  virtual std::string describe() const = 0;
  virtual const peer::ParameterLayout& layout() const = 0;
  virtual peer::Parameters<Scalar> make_parameters(std::uint64_t seed) const = 0;
  virtual peer::Gradients<Scalar> make_gradients() const = 0;
  virtual std::unique_ptr<Cache> make_cache() const = 0;

  /// y [N, D] assigned from x [N, D]. Training mode may update buffers in params (batch-norm statistics).
  virtual void forward(peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& x, MatRef<Scalar> y, Cache& cache,
                       peer::Mode mode) const = 0;
  /// dx += dL/dx, gradients added into grads (the MoE adds its load-balancing loss's gradient too).
  virtual void backward(const peer::Parameters<Scalar>& params, Cache& cache, const ConstMatRef<Scalar>& dy,
                        MatRef<Scalar> dx, peer::Gradients<Scalar>& grads) const = 0;

  /// A loss term the layer adds to the training objective (the MoE's load balancing), from the last forward.
  virtual double aux_loss(const Cache&) const { return 0.0; }
  /// Experts (PEER), memory slots (PKM) or experts (MoE) a routing statistic counts; 0 for a dense FFW.
  virtual Index num_experts() const { return 0; }
  /// Adds the last forward's routing (ids and gate weights) to expert statistics (He 2024, sec. 3.4).
  virtual void add_expert_stats(const Cache&, peer::ExpertStats&) const {}
  /// The last forward's routing as integers (which experts each token used); empty for a dense FFW.
  /// Gradient checks use it to skip perturbations that change the selection.
  virtual std::vector<std::int64_t> routing(const Cache&) const { return {}; }

  virtual Fields config_fields() const = 0;
  virtual double total_parameters() const = 0;
  virtual double active_parameters_per_token() const = 0;
  virtual double forward_flops_per_token() const = 0;
  virtual double backward_flops_per_token() const = 0;
};

namespace detail {

template <typename Layer>
struct IsProductKeyLayer : std::false_type {};
template <typename S, typename M, typename Q>
struct IsProductKeyLayer<peer::ProductKeyLayer<S, M, Q>> : std::true_type {};

inline Fields prefixed(const std::string& kind, std::vector<std::pair<std::string, std::string>> fields) {
  fields.insert(fields.begin(), {"kind", kind});
  return fields;
}

/// A library layer behind the FeedForward interface.
template <typename Scalar, typename Layer>
class FeedForwardOf final : public FeedForward<Scalar> {
  using Base = FeedForward<Scalar>;

 public:
  struct LayerCache final : Base::Cache {
    typename Layer::Cache cache;
  };

  template <typename Config>
  FeedForwardOf(FfnKind kind, const Config& config) : kind_(kind), layer_(config) {}

  const Layer& layer() const { return layer_; }

  FfnKind kind() const override { return kind_; }
  std::string describe() const override {
    std::ostringstream out;
    out << to_string(kind_);
    const auto& c = layer_.config();
    if constexpr (std::is_same<Layer, peer::DenseFfw<Scalar>>::value) {
      out << " " << c.model_dim << " -> " << c.hidden_dim << " -> " << c.model_dim;
    } else if constexpr (std::is_same<Layer, peer::MoeFfw<Scalar>>::value) {
      out << " E = " << c.num_experts << " experts of " << c.model_dim << " -> " << c.expert_hidden << " -> " << c.model_dim
          << ", top " << c.top_k << " (" << peer::to_string(c.routing) << ")";
    } else {
      out << " N = " << c.num_experts << " (" << c.num_sub_keys() << "^2), H = " << c.num_heads << ", k = " << c.top_k
          << ", Dk = " << c.key_dim << ", " << peer::to_string(c.query_norm) << " queries";
    }
    return out.str();
  }
  const peer::ParameterLayout& layout() const override { return layer_.layout(); }
  peer::Parameters<Scalar> make_parameters(std::uint64_t seed) const override { return layer_.make_parameters(seed); }
  peer::Gradients<Scalar> make_gradients() const override { return layer_.make_gradients(); }
  std::unique_ptr<typename Base::Cache> make_cache() const override { return std::make_unique<LayerCache>(); }

  void forward(peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& x, MatRef<Scalar> y, typename Base::Cache& cache,
               peer::Mode mode) const override {
    layer_.forward(params, x, y, own(cache), mode);
  }
  void backward(const peer::Parameters<Scalar>& params, typename Base::Cache& cache, const ConstMatRef<Scalar>& dy,
                MatRef<Scalar> dx, peer::Gradients<Scalar>& grads) const override {
    layer_.backward(params, own(cache), dy, dx, grads);
  }

  double aux_loss(const typename Base::Cache& cache) const override {
    if constexpr (std::is_same<Layer, peer::MoeFfw<Scalar>>::value) {
      return static_cast<double>(own(cache).aux_loss);
    } else {
      return 0.0;
    }
  }
  Index num_experts() const override {
    if constexpr (std::is_same<Layer, peer::DenseFfw<Scalar>>::value) {
      return 0;
    } else {
      return layer_.config().num_experts;
    }
  }
  void add_expert_stats(const typename Base::Cache& cache, peer::ExpertStats& stats) const override {
    const auto& c = own(cache);
    if constexpr (IsProductKeyLayer<Layer>::value) {
      stats.add(c.ids, c.gates);
    } else if constexpr (std::is_same<Layer, peer::MoeFfw<Scalar>>::value) {
      const Index m = c.assignments();
      peer::IdMatrix ids(m, 1);
      Mat<Scalar> gates(m, 1);
      for (Index i = 0; i < m; ++i) {
        ids(i, 0) = c.expert[static_cast<std::size_t>(i)];
        gates(i, 0) = c.gate[i];
      }
      stats.add(ids, gates);
    }
  }
  std::vector<std::int64_t> routing(const typename Base::Cache& cache) const override {
    const auto& c = own(cache);
    if constexpr (IsProductKeyLayer<Layer>::value) {
      return std::vector<std::int64_t>(c.ids.data(), c.ids.data() + c.ids.size());
    } else if constexpr (std::is_same<Layer, peer::MoeFfw<Scalar>>::value) {
      std::vector<std::int64_t> out(c.token.begin(), c.token.end());
      out.insert(out.end(), c.expert.begin(), c.expert.end());
      return out;
    } else {
      return {};
    }
  }

  Fields config_fields() const override {
    if constexpr (std::is_same<Layer, peer::DenseFfw<Scalar>>::value) {
      const auto& c = layer_.config();
      return prefixed(to_string(kind_), {{"model_dim", std::to_string(c.model_dim)},
                                         {"hidden_dim", std::to_string(c.hidden_dim)},
                                         {"activation", peer::to_string(c.activation)},
                                         {"glu", c.kind == peer::FfwKind::kGlu ? "yes" : "no"}});
    } else {
      return prefixed(to_string(kind_), layer_.config().to_fields());
    }
  }
  double total_parameters() const override { return static_cast<double>(layer_.total_parameters()); }
  double active_parameters_per_token() const override { return static_cast<double>(layer_.active_parameters_per_token()); }
  double forward_flops_per_token() const override { return layer_.forward_flops_per_token(); }
  double backward_flops_per_token() const override { return layer_.backward_flops_per_token(); }

 private:
  static typename Layer::Cache& own(typename Base::Cache& c) { return static_cast<LayerCache&>(c).cache; }
  static const typename Layer::Cache& own(const typename Base::Cache& c) { return static_cast<const LayerCache&>(c).cache; }

  FfnKind kind_;
  Layer layer_;
};

}  // namespace detail

/// A dense FFW D -> F -> D.
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_dense_ffn(const peer::DenseFfwConfig& config) {
  return std::make_unique<detail::FeedForwardOf<Scalar, peer::DenseFfw<Scalar>>>(FfnKind::kDense, config);
}
/// A coarse mixture of experts.
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_moe_ffn(const peer::MoeConfig& config) {
  return std::make_unique<detail::FeedForwardOf<Scalar, peer::MoeFfw<Scalar>>>(FfnKind::kMoe, config);
}
/// A product-key memory (Lample et al. 2019).
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_pkm_ffn(const peer::PeerConfig& config) {
  return std::make_unique<detail::FeedForwardOf<Scalar, peer::ProductKeyMemory<Scalar>>>(FfnKind::kPkm, config);
}
/// A PEER layer (He 2024).
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_peer_ffn(const peer::PeerConfig& config) {
  return std::make_unique<detail::FeedForwardOf<Scalar, peer::PeerLayer<Scalar>>>(FfnKind::kPeer, config);
}

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_FEED_FORWARD_HPP
