// SPDX-License-Identifier: MIT
#ifndef PEER_MODEL_FEED_FORWARD_HPP
#define PEER_MODEL_FEED_FORWARD_HPP

/// \file
/// FeedForward<Scalar>: one run-time interface over the four feed-forward blocks of the library (dense FFW,
/// coarse MoE, product-key memory, PEER), so a model can choose each block's kind at run time (from a
/// configuration file, a command line) and treat them alike. The layers' own contracts hold unchanged:
/// forward assigns y; backward adds into dx and the gradients; infer is forward in Mode::kEval on const
/// parameters. Caches and workspaces are type-erased: make_cache() and make_workspace() give the right
/// ones, and handing a block another block's cache throws.
///
///     std::unique_ptr<peer::FeedForward<float>> ffn = peer::make_feed_forward<float>(peer_config);
///     const int l = model.add_layer("blocks.3.ffn.", ffn->layout());
///     auto cache = ffn->make_cache();
///     ffn->forward(views.params(l), x, y, *cache, peer::Mode::kTrain);
///     ffn->backward(views.params(l), *cache, dy, dx, views.grads(l));

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peer/core/gradients.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/layers/dense_ffw.hpp"
#include "peer/layers/expert_stats.hpp"
#include "peer/layers/moe.hpp"
#include "peer/layers/peer_layer.hpp"
#include "peer/layers/product_key_memory.hpp"

namespace peer {

/// Which layer a feed-forward block is.
enum class FeedForwardKind { kDense, kMoe, kPkm, kPeer };

inline const char* to_string(FeedForwardKind k) {
  switch (k) {
    case FeedForwardKind::kDense: return "dense";
    case FeedForwardKind::kMoe: return "moe";
    case FeedForwardKind::kPkm: return "pkm";
    case FeedForwardKind::kPeer: return "peer";
  }
  return "unknown";
}

/// Parses "dense", "moe", "pkm" or "peer".
inline FeedForwardKind feed_forward_kind_from_string(const std::string& s) {
  for (FeedForwardKind k : {FeedForwardKind::kDense, FeedForwardKind::kMoe, FeedForwardKind::kPkm, FeedForwardKind::kPeer}) {
    if (s == to_string(k)) return k;
  }
  throw std::invalid_argument("feed-forward kind \"" + s + "\" must be one of dense, moe, pkm, peer");
}

template <typename Scalar>
class FeedForward {
 public:
  using Fields = peer::Fields;
  /// What forward keeps for backward (the layer's Cache inside).
  struct Cache {
    virtual ~Cache() = default;
  };
  /// infer()'s scratch (the layer's Workspace inside).
  struct Workspace {
    virtual ~Workspace() = default;
  };

  virtual ~FeedForward() = default;

  virtual FeedForwardKind kind() const = 0;
  /// One line: the kind and its sizes.
  virtual std::string describe() const = 0;
  virtual const ParameterLayout& layout() const = 0;
  /// The layer's seeded initialization (on owned parameters or a view of a model's).
  virtual void initialize(Parameters<Scalar>& params, std::uint64_t seed) const = 0;
  Parameters<Scalar> make_parameters(std::uint64_t seed) const {
    Parameters<Scalar> p(layout());
    initialize(p, seed);
    return p;
  }
  Gradients<Scalar> make_gradients() const { return Gradients<Scalar>(layout()); }
  virtual std::unique_ptr<Cache> make_cache() const = 0;
  virtual std::unique_ptr<Workspace> make_workspace() const = 0;

  /// y [B, D] assigned from x [B, D]; Mode::kTrain may update buffers in params (batch-norm statistics).
  virtual void forward(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache,
                       Mode mode, const RowMask* mask = nullptr) const = 0;
  /// forward() with the routing held at what `routed` recorded (a cache this block's forward filled, on
  /// a batch of the same size): product-key layers reuse its experts, the coarse MoE its (token, expert)
  /// assignments (their forward_routed()); the dense FFW has no routing. For central-difference checks
  /// of whole models without top-k flips.
  virtual void forward_held(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache,
                            Mode mode, const Cache& routed) const = 0;
  /// forward() in Mode::kEval on const parameters, bit for bit, without a cache or a copy of x.
  virtual void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y,
                     Workspace& ws) const = 0;
  /// dx += dL/dx (skipped when dx has 0 rows), gradients added into grads (the MoE adds its
  /// load-balancing loss's gradient too).
  virtual void backward(const Parameters<Scalar>& params, Cache& cache, const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> dx,
                        Gradients<Scalar>& grads) const = 0;

  /// A loss term the layer adds to the training objective (the MoE's load balancing), from the last forward.
  virtual double aux_loss(const Cache&) const { return 0.0; }
  /// Experts (PEER), memory slots (PKM) or experts (MoE) a routing statistic counts; 0 for a dense FFW.
  virtual Index num_experts() const { return 0; }
  /// Adds the last forward's routing (ids and gate weights) to expert statistics (He 2024, sec. 3.4).
  virtual void add_expert_stats(const Cache&, ExpertStats&) const {}
  /// The last forward's routing as integers (which experts each token used); empty for a dense FFW.
  virtual std::vector<std::int64_t> routing(const Cache&) const { return {}; }

  /// The configuration as text pairs, "kind" first (checkpoint metadata).
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
struct IsProductKeyLayer<ProductKeyLayer<S, M, Q>> : std::true_type {};

/// A library layer behind the FeedForward interface.
template <typename Scalar, typename Layer>
class FeedForwardOf final : public FeedForward<Scalar> {
  using Base = FeedForward<Scalar>;
  static constexpr bool kDense = std::is_same<Layer, DenseFfw<Scalar>>::value;
  static constexpr bool kMoe = std::is_same<Layer, MoeFfw<Scalar>>::value;
  static constexpr bool kProductKey = IsProductKeyLayer<Layer>::value;

 public:
  struct LayerCache final : Base::Cache {
    const void* owner = nullptr;
    typename Layer::Cache cache;
  };
  struct LayerWorkspace final : Base::Workspace {
    const void* owner = nullptr;
    typename Layer::Workspace ws;
  };

  template <typename Config>
  FeedForwardOf(FeedForwardKind kind, const Config& config) : kind_(kind), layer_(config) {}

  const Layer& layer() const { return layer_; }

  FeedForwardKind kind() const override { return kind_; }
  std::string describe() const override {
    std::ostringstream out;
    out << to_string(kind_);
    const auto& c = layer_.config();
    if constexpr (kDense) {
      out << " " << c.model_dim << " -> " << c.hidden_dim << " -> " << c.model_dim;
    } else if constexpr (kMoe) {
      out << " E = " << c.num_experts << " experts of " << c.model_dim << " -> " << c.expert_hidden << " -> " << c.model_dim
          << ", top " << c.top_k << " (" << to_string(c.routing) << ")";
    } else {
      out << " N = " << c.num_experts << " (" << c.num_sub_keys() << "^2), H = " << c.num_heads << ", k = " << c.top_k
          << ", Dk = " << c.key_dim << ", " << to_string(c.query_norm) << " queries";
    }
    return out.str();
  }
  const ParameterLayout& layout() const override { return layer_.layout(); }
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const override { layer_.initialize(params, seed); }
  std::unique_ptr<typename Base::Cache> make_cache() const override {
    auto c = std::make_unique<LayerCache>();
    c->owner = this;
    return c;
  }
  std::unique_ptr<typename Base::Workspace> make_workspace() const override {
    auto w = std::make_unique<LayerWorkspace>();
    w->owner = this;
    return w;
  }

  void forward(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, typename Base::Cache& cache,
               Mode mode, const RowMask* mask) const override {
    layer_.forward(params, x, y, own(cache), mode, mask);
  }
  void forward_held(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y,
                    typename Base::Cache& cache, Mode mode, const typename Base::Cache& routed) const override {
    if constexpr (kProductKey) {
      layer_.forward_routed(params, x, own(routed).ids, y, own(cache), mode);
    } else if constexpr (kMoe) {
      layer_.forward_routed(params, x, own(routed), y, own(cache), mode);
    } else {
      (void)own(routed);
      layer_.forward(params, x, y, own(cache), mode);
    }
  }
  void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y,
             typename Base::Workspace& ws) const override {
    auto* w = dynamic_cast<LayerWorkspace*>(&ws);
    if (w == nullptr || w->owner != this) throw std::invalid_argument("FeedForward::infer: the workspace was made by another block (use make_workspace())");
    layer_.infer(params, x, y, w->ws);
  }
  void backward(const Parameters<Scalar>& params, typename Base::Cache& cache, const ConstMatrixRef<Scalar>& dy,
                MatrixRef<Scalar> dx, Gradients<Scalar>& grads) const override {
    layer_.backward(params, own(cache), dy, dx, grads);
  }

  double aux_loss(const typename Base::Cache& cache) const override {
    if constexpr (kMoe) {
      return static_cast<double>(own(cache).aux_loss);
    } else {
      (void)own(cache);
      return 0.0;
    }
  }
  Index num_experts() const override {
    if constexpr (kDense) {
      return 0;
    } else {
      return layer_.config().num_experts;
    }
  }
  void add_expert_stats(const typename Base::Cache& cache, ExpertStats& stats) const override {
    const auto& c = own(cache);
    if constexpr (kProductKey) {
      stats.add(c.ids, c.gates);
    } else if constexpr (kMoe) {
      const Index m = c.assignments();
      IdMatrix ids(m, 1);
      RowMatrix<Scalar> gates(m, 1);
      for (Index i = 0; i < m; ++i) {
        ids(i, 0) = c.expert[static_cast<std::size_t>(i)];
        gates(i, 0) = c.gate[i];
      }
      stats.add(ids, gates);
    }
  }
  std::vector<std::int64_t> routing(const typename Base::Cache& cache) const override {
    const auto& c = own(cache);
    if constexpr (kProductKey) {
      return std::vector<std::int64_t>(c.ids.data(), c.ids.data() + c.ids.size());
    } else if constexpr (kMoe) {
      std::vector<std::int64_t> out(c.token.begin(), c.token.end());
      out.insert(out.end(), c.expert.begin(), c.expert.end());
      return out;
    } else {
      return {};
    }
  }

  typename Base::Fields config_fields() const override {
    typename Base::Fields f = layer_.config().to_fields();
    f.insert(f.begin(), {"kind", to_string(kind_)});
    return f;
  }
  double total_parameters() const override { return static_cast<double>(layer_.total_parameters()); }
  double active_parameters_per_token() const override { return static_cast<double>(layer_.active_parameters_per_token()); }
  double forward_flops_per_token() const override { return layer_.forward_flops_per_token(); }
  double backward_flops_per_token() const override { return layer_.backward_flops_per_token(); }

 private:
  typename Layer::Cache& own(typename Base::Cache& c) const {
    auto* lc = dynamic_cast<LayerCache*>(&c);
    if (lc == nullptr || lc->owner != this) throw std::invalid_argument("FeedForward: the cache was made by another block (use make_cache())");
    return lc->cache;
  }
  const typename Layer::Cache& own(const typename Base::Cache& c) const {
    return own(const_cast<typename Base::Cache&>(c));
  }

  FeedForwardKind kind_;
  Layer layer_;
};

}  // namespace detail

/// A dense FFW D -> F -> D.
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_feed_forward(const DenseFfwConfig& config) {
  return std::make_unique<detail::FeedForwardOf<Scalar, DenseFfw<Scalar>>>(FeedForwardKind::kDense, config);
}
/// A coarse mixture of experts.
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_feed_forward(const MoeConfig& config) {
  return std::make_unique<detail::FeedForwardOf<Scalar, MoeFfw<Scalar>>>(FeedForwardKind::kMoe, config);
}
/// A PEER layer (He 2024), or with kind kPkm a product-key memory (Lample et al. 2019) of the same
/// configuration.
template <typename Scalar>
std::unique_ptr<FeedForward<Scalar>> make_feed_forward(const PeerConfig& config, FeedForwardKind kind = FeedForwardKind::kPeer) {
  if (kind == FeedForwardKind::kPkm) {
    return std::make_unique<detail::FeedForwardOf<Scalar, ProductKeyMemory<Scalar>>>(FeedForwardKind::kPkm, config);
  }
  if (kind != FeedForwardKind::kPeer) {
    throw std::invalid_argument(std::string("make_feed_forward(PeerConfig): kind ") + to_string(kind) + " must be peer or pkm");
  }
  return std::make_unique<detail::FeedForwardOf<Scalar, PeerLayer<Scalar>>>(FeedForwardKind::kPeer, config);
}

}  // namespace peer

#endif  // PEER_MODEL_FEED_FORWARD_HPP
