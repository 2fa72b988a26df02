// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_PRODUCT_KEY_LAYER_HPP
#define PEER_LAYERS_PRODUCT_KEY_LAYER_HPP

/// \file
/// ProductKeyLayer: a query network, exact product-key retrieval and gating, composed with a row memory.
/// With single-neuron experts it is the PEER layer of He (2024), "Mixture of A Million Experts"
/// (peer/layers/peer_layer.hpp); with a value table it is the product-key memory of Lample et al. (2019)
/// (peer/layers/product_key_memory.hpp). Both share every component but the memory, as the papers do.
///
///   q = QueryNet(x)                                   [B, H * Dk]
///   (ids, s) = exact top k of q_h . key over N keys   [B, H, k] per head h (product keys)
///   g = gate(s) per head                              [B, H, k]
///   y = sum_h sum_j g_hj m_id(x)                      [B, D]
///       m_i(x) = sigma(u_i . x) v_i (SingleNeuronExperts)  or  v_i (ValueMemory)
///
/// The layer holds only its validated configuration and components. Parameters, gradients and the
/// forward cache are objects the caller owns and passes in; nothing is remembered between calls
/// except what the caller's Cache holds.
///
/// A Memory implements, as SingleNeuronExperts and ValueMemory do: a constructor from ExpertPoolConfig,
/// Workspace, kTableName, row_cols(D), forward_flops_per_slot(D), backward_flops_per_slot(D),
/// register_parameters, initialize, forward(params, x, ids, gates, y, z) and
/// backward(params, x, ids, gates, z, dy, dx, dgates, grads, workspace).

#include <cstdint>
#include <utility>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/layer_layout.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/experts/single_neuron_experts.hpp"
#include "peer/layers/gating.hpp"
#include "peer/layers/peer_config.hpp"
#include "peer/nn/query_network.hpp"
#include "peer/retrieval/product_keys.hpp"

namespace peer {

/// The default query network's configuration for a PEER configuration.
inline QueryNetworkConfig query_network_config(const PeerConfig& c) {
  QueryNetworkConfig q;
  q.model_dim = c.model_dim;
  q.num_heads = c.num_heads;
  q.key_dim = c.key_dim;
  q.bias = c.query_bias;
  q.norm = c.query_norm;
  q.momentum = c.batch_norm_momentum;
  q.epsilon = c.norm_epsilon;
  return q;
}

/// The memory's configuration for a PEER configuration.
inline ExpertPoolConfig expert_pool_config(const PeerConfig& c) {
  return ExpertPoolConfig{c.num_experts, c.model_dim, c.activation, c.expert_storage};
}

/// A product-key layer over Scalar (float or double) with a row memory and a pluggable query network (see
/// query_network.hpp for the interface a custom one implements).
///
/// Parameters (ParameterLayout, in this order):
///   query.weight            [H * Dk, D]   dense    (query.bias [1, H * Dk] with Bias::kLearned)
///   query.norm.weight/bias  [1, H * Dk]   dense    (batch or layer norm)
///   query.norm.running_mean/running_var [1, H * Dk]  buffers (batch norm)
///   sub_keys.left/right     [n, Dk / 2]   dense    ([H * n, Dk / 2] with KeySharing::kPerHead)
///   experts                 [N, 2 D]      row-sparse table, row i = [u_i | v_i]   (SingleNeuronExperts)
///   values                  [N, D]        row-sparse table, row i = v_i           (ValueMemory)
template <typename Scalar, typename Memory, typename QueryNet = QueryNetwork<Scalar>>
class ProductKeyLayer : public detail::LayerLayout<ProductKeyLayer<Scalar, Memory, QueryNet>, Scalar> {
  using Base = detail::LayerLayout<ProductKeyLayer<Scalar, Memory, QueryNet>, Scalar>;
  using Base::check_layout;
  using Base::layout_;
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");
  static_assert(std::is_same<typename QueryNet::ScalarType, Scalar>::value,
                "peer: the query network must compute in the layer's Scalar");

 public:
  /// Everything forward keeps for backward, plus reusable scratch. Owned by the caller; one per
  /// concurrent forward. Sized by the first forward and reused afterwards.
  struct Cache {
    RowMatrix<Scalar> x;       ///< [B, D] copy of the input (so y may alias x)
    RowMatrix<Scalar> q;       ///< [B, H * Dk] normalized queries
    IdMatrix ids;              ///< [B, H * k] kept experts, head h in columns [h k, (h + 1) k), best first
    RowMatrix<Scalar> scores;  ///< [B, H * k] their scores q_h . key
    RowMatrix<Scalar> gates;   ///< [B, H * k] router weights g
    RowMatrix<Scalar> z;       ///< [B, H * k] pre-activations u . x
    Mode mode = Mode::kTrain;
    bool ready = false;        ///< a forward has filled this cache
    typename QueryNet::Cache query;
    typename ProductKeyRetrieval<Scalar>::Workspace retrieval;
    typename Memory::Workspace experts;  ///< the memory's backward scratch
    RowMatrix<Scalar> dgates, dscores, dq, dx;  // backward scratch

    Index batch() const { return x.rows(); }
  };

  /// Scratch of infer(), owned by the caller and reused: sized by the first call, it allocates nothing
  /// more at the same (or a smaller) batch size. Holds nothing backward could use.
  struct Workspace {
    RowMatrix<Scalar> q;       ///< [B, H * Dk]
    IdMatrix ids;              ///< [B, H * k] the last call's experts (for statistics)
    RowMatrix<Scalar> scores;  ///< [B, H * k]
    RowMatrix<Scalar> gates;   ///< [B, H * k]
    RowMatrix<Scalar> z;       ///< [B, H * k]
    typename QueryNet::Cache query;
    typename ProductKeyRetrieval<Scalar>::Workspace retrieval;
  };

  /// Validates `config` (std::invalid_argument on the first broken rule) and builds the default query
  /// network from it.
  explicit ProductKeyLayer(const PeerConfig& config) : ProductKeyLayer(config, make_query_network(config)) {}

  /// Uses a caller-built query network; its input_dim() must be D and output_dim() H * Dk.
  ProductKeyLayer(const PeerConfig& config, QueryNet query_network)
      : ProductKeyLayer(config, std::move(query_network), Memory(expert_pool_config(config))) {}

  /// Uses a caller-built query network and memory (one that needs more than ExpertPoolConfig to be built,
  /// as peer::mpi::ShardedExperts needs its communicator); memory.config() must be expert_pool_config(config).
  ProductKeyLayer(const PeerConfig& config, QueryNet query_network, Memory memory)
      : config_(checked(config)),
        query_(std::move(query_network)),
        retrieval_(product_key_config(config)),
        experts_(std::move(memory)) {
    const ExpertPoolConfig want = expert_pool_config(config_), have = experts_.config();
    if (have.num_experts != want.num_experts || have.model_dim != want.model_dim || have.activation != want.activation ||
        have.storage != want.storage) {
      throw std::invalid_argument("ProductKeyLayer: the memory's ExpertPoolConfig (num_experts = " + detail::to_text(have.num_experts) +
                                  ", model_dim = " + detail::to_text(have.model_dim) +
                                  ") must be the one the PeerConfig gives (num_experts = " + detail::to_text(want.num_experts) +
                                  ", model_dim = " + detail::to_text(want.model_dim) + ", the same activation and expert_storage)");
    }
    if (query_.input_dim() != config_.model_dim) {
      detail::throw_invalid("query network input_dim()", query_.input_dim(),
                            "must equal PeerConfig.model_dim = " + detail::to_text(config_.model_dim));
    }
    if (query_.output_dim() != config_.num_heads * config_.key_dim) {
      detail::throw_invalid("query network output_dim()", query_.output_dim(),
                            "must equal num_heads * key_dim = " + detail::to_text(config_.num_heads * config_.key_dim));
    }
    query_.register_parameters(layout_, "query.");
    retrieval_.register_parameters(layout_, "sub_keys.");
    experts_.register_parameters(layout_, Memory::kTableName);
  }

  const PeerConfig& config() const { return config_; }
  const QueryNet& query_network() const { return query_; }
  const ProductKeyRetrieval<Scalar>& retrieval() const { return retrieval_; }
  const Memory& experts() const { return experts_; }

  // ---- Sizes and costs per token (main terms; 2 FLOPs per multiply-add; n = sqrt(N), S = H k slots) ----

  /// Trained scalars: every dense tensor and the whole table (batch-norm running statistics excluded).
  Index total_parameters() const { return layout_.num_parameters(); }
  /// Trained scalars a token reads: every dense tensor (all sub-keys are scored) plus S table rows
  /// (counted per slot, so an expert picked by two heads counts twice).
  Index active_parameters_per_token() const {
    Index dense = 0;
    for (const auto& s : layout_.dense()) dense += s.size();
    return dense + slots() * Memory::row_cols(config_.model_dim);
  }
  /// Forward: query projection 2 D H Dk + sub-key scoring 2 H n Dk (per head, both halves: n Dk / 2
  /// multiply-adds each) + S x the memory's per-slot forward. Normalization, top-k selection over the
  /// candidates and gating are O(H (Dk + n + k log k)) and left out.
  double forward_flops_per_token() const {
    const double d = static_cast<double>(config_.model_dim), h = static_cast<double>(config_.num_heads);
    const double dk = static_cast<double>(config_.key_dim), n = static_cast<double>(config_.num_sub_keys());
    return 2 * d * h * dk + 2 * h * n * dk + static_cast<double>(slots()) * Memory::forward_flops_per_slot(config_.model_dim);
  }
  /// Backward (with dx): query projection dW and dx 4 D H Dk + per slot the retrieval backward through the
  /// kept score (dq and d sub-key for both halves, 4 Dk) and the memory's per-slot backward. The sub-key
  /// scoring has no dense backward: only the kept scores carry gradient.
  double backward_flops_per_token() const {
    const double d = static_cast<double>(config_.model_dim), h = static_cast<double>(config_.num_heads);
    const double dk = static_cast<double>(config_.key_dim);
    return 4 * d * h * dk +
           static_cast<double>(slots()) * (4 * dk + Memory::backward_flops_per_slot(config_.model_dim));
  }
  /// Bytes of the parameters a token reads: active_parameters_per_token() scalars. (Within a batch the
  /// dense tensors are shared by all tokens and stay in cache; the S table rows are each token's own.)
  double parameter_bytes_per_token() const {
    return static_cast<double>(active_parameters_per_token()) * static_cast<double>(sizeof(Scalar));
  }

  /// Seeded initialization; every tensor's values depend only on the seed and its name:
  /// query weight U(+-1/sqrt(D)), biases 0, norm gamma 1 / beta 0, running mean 0 / variance 1,
  /// sub-keys U(+-1/sqrt(Dk/2)), expert u_i, v_i ~ N(0, 1/D).
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    check_layout(params.layout(), "params");
    if (!params.read_only_table().empty()) {  // before anything is written
      throw std::logic_error("initialize: table '" + params.read_only_table() + "' is read-only (mapped with MapMode::kReadOnly)");
    }
    query_.initialize(params, seed);
    retrieval_.initialize(params, seed);
    experts_.initialize(params, seed);
  }

  /// y = PEER(x). x [B, D]; y [B, D] assigned (may be x itself). Fills `cache` for backward.
  /// Mode::kTrain uses batch statistics in batch-normed queries and updates their running statistics in
  /// `params`; Mode::kEval uses the running statistics and changes nothing in `params` (infer() does the
  /// same on const parameters, without the cache). `mask` (size B, optional) marks the rows that count in
  /// batch statistics (padding excluded); every row still gets an output. Throws std::invalid_argument on
  /// shapes, std::domain_error on non-finite x or queries.
  void forward(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache,
               Mode mode, const RowMask* mask = nullptr) const {
    begin_forward(params, x, y, cache, mode);
    query_.forward(params, cache.x, cache.q, cache.query, mode, mask);
    retrieval_.search(params, cache.q, cache.ids, cache.scores, cache.retrieval);
    finish_forward(params, y, cache);
  }

  /// forward() with the routing held fixed: the experts are `ids` [B, H * k] (head h's in columns
  /// [h k, (h + 1) k)) instead of the search's, scored as the search scores them (q_h . key), gated and
  /// mixed as usual. backward() is the same. With ids from a forward() on the same x and parameters this
  /// is that forward (its scores to rounding); with ids held while parameters move, it is the smooth
  /// function central differences can check without top-k flips (peer/testing/gradient_check.hpp).
  void forward_routed(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
                      MatrixRef<Scalar> y, Cache& cache, Mode mode, const RowMask* mask = nullptr) const {
    detail::check_shape("ids", ids.rows(), ids.cols(), x.rows(), config_.num_heads * config_.top_k);
    detail::check_ids(ids, config_.num_experts);  // before the cache changes: a refused call keeps it
    begin_forward(params, x, y, cache, mode);
    query_.forward(params, cache.x, cache.q, cache.query, mode, mask);
    cache.ids = ids;
    retrieval_.score(params, cache.q, cache.ids, cache.scores);
    finish_forward(params, y, cache);
  }

  /// Inference: y = PEER(x) as forward() computes it in Mode::kEval, bit for bit, on const parameters
  /// (nothing in them changes), without a backward cache and without copying x. x, y [B, D]; y must not
  /// overlap x. `ws` is reused: after the first call at a batch size, further calls at that size allocate
  /// nothing (tested). Throws as forward() does.
  void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Workspace& ws) const {
    const Index b = x.rows(), d = config_.model_dim, hk = config_.num_heads * config_.top_k;
    check_layout(params.layout(), "params");
    detail::check_shape("x", x.rows(), x.cols(), b, d);
    detail::check_shape("y", y.rows(), y.cols(), b, d);
    detail::check_no_overlap("infer: y", y, "x", x);
    check_batch(b);
    detail::check_finite("x", x);
    ws.q.resize(b, config_.num_heads * config_.key_dim);
    query_.infer(params, x, ws.q, ws.query);
    ws.ids.resize(b, hk);
    ws.scores.resize(b, hk);
    retrieval_.search(params, ws.q, ws.ids, ws.scores, ws.retrieval);
    ws.gates.resize(b, hk);
    gate_all(ws.scores, ws.gates);
    ws.z.resize(b, hk);
    experts_.forward(params, x, ws.ids, ws.gates, y, ws.z);
  }

  /// Backward of the forward that filled `cache`, with `params` unchanged since. dy [B, D].
  /// dx [B, D]: dL/dx is ADDED (pass a matrix with 0 rows to skip it). Gradients are ADDED into `grads`:
  /// dense ones, and a row-sparse "experts" gradient holding each touched expert once. Each delta is
  /// complete before it is added, so a gradient pre-filled with G ends as exactly G + delta.
  void backward(const Parameters<Scalar>& params, Cache& cache, const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> dx,
                Gradients<Scalar>& grads) const {
    if (!cache.ready) throw std::invalid_argument("backward: the cache holds no forward pass (call forward first)");
    const Index b = cache.batch(), d = config_.model_dim, h_count = config_.num_heads, k = config_.top_k;
    check_layout(params.layout(), "params");
    check_layout(grads.layout(), "grads");
    detail::check_shape("dy", dy.rows(), dy.cols(), b, d);
    if (dx.rows() != 0) detail::check_shape("dx", dx.rows(), dx.cols(), b, d);
    cache.dx.setZero(b, d);
    cache.dgates.resize(b, h_count * k);
    experts_.backward(params, cache.x, cache.ids, cache.gates, cache.z, dy, cache.dx, cache.dgates, grads,
                      cache.experts);
    cache.dscores.resize(b, h_count * k);
    parallel_for(b, 64, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) {
          gate_backward(config_.gating, &cache.scores(t, h * k), &cache.gates(t, h * k), &cache.dgates(t, h * k), k,
                        &cache.dscores(t, h * k));
        }
      }
    });
    cache.dq.setZero(b, h_count * config_.key_dim);
    retrieval_.backward(params, cache.q, cache.ids, cache.dscores, cache.dq, grads, cache.retrieval);
    query_.backward(params, cache.x, cache.query, cache.dq, cache.dx, grads);
    if (dx.rows() != 0) dx += cache.dx;
  }

 private:
  Index slots() const { return config_.num_heads * config_.top_k; }

  static const PeerConfig& checked(const PeerConfig& config) {
    config.validate();
    return config;
  }

  static QueryNet make_query_network(const PeerConfig& config) {
    config.validate();
    return QueryNet(query_network_config(config));
  }

  static ProductKeyConfig product_key_config(const PeerConfig& c) {
    ProductKeyConfig p;
    p.num_heads = c.num_heads;
    p.key_dim = c.key_dim;
    p.num_sub_keys = c.num_sub_keys();
    p.top_k = c.top_k;
    p.sub_key_top_k = c.sub_key_top_k;
    p.key_sharing = c.key_sharing;
    p.scoring = c.sub_key_scoring;
    return p;
  }

  void check_batch(Index b) const {
    const Index hk = config_.num_heads * config_.top_k;
    if (b * hk >= (Index{1} << 31)) detail::throw_invalid("batch * num_heads * top_k", b * hk, "must be < 2^31");
  }

  // forward()'s checks and the copy of x (so y may alias x).
  void begin_forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const MatrixRef<Scalar>& y,
                     Cache& cache, Mode mode) const {
    const Index b = x.rows(), d = config_.model_dim, hk = config_.num_heads * config_.top_k;
    check_layout(params.layout(), "params");
    detail::check_shape("x", x.rows(), x.cols(), b, d);
    detail::check_shape("y", y.rows(), y.cols(), b, d);
    check_batch(b);
    detail::check_finite("x", x);
    cache.ready = false;
    cache.mode = mode;
    cache.x = x;
    cache.q.resize(b, config_.num_heads * config_.key_dim);
    cache.ids.resize(b, hk);
    cache.scores.resize(b, hk);
  }

  // Gates from the scores, then the experts: the part of forward after routing.
  void finish_forward(const Parameters<Scalar>& params, MatrixRef<Scalar> y, Cache& cache) const {
    const Index b = cache.batch(), hk = config_.num_heads * config_.top_k;
    cache.gates.resize(b, hk);
    gate_all(cache.scores, cache.gates);
    cache.z.resize(b, hk);
    experts_.forward(params, cache.x, cache.ids, cache.gates, y, cache.z);
    cache.ready = true;
  }

  // gates = gate(scores), per token and head.
  void gate_all(const RowMatrix<Scalar>& scores, RowMatrix<Scalar>& gates) const {
    const Index h_count = config_.num_heads, k = config_.top_k;
    parallel_for(scores.rows(), 64, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index h = 0; h < h_count; ++h) gate_forward(config_.gating, &scores(t, h * k), k, &gates(t, h * k));
      }
    });
  }

  PeerConfig config_;
  QueryNet query_;
  ProductKeyRetrieval<Scalar> retrieval_;
  Memory experts_;
};

}  // namespace peer

#endif  // PEER_LAYERS_PRODUCT_KEY_LAYER_HPP
