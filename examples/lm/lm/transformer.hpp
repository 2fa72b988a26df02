// A decoder-only byte-level transformer whose blocks' feed-forward parts are chosen at run time.
//
//   x_0 = E[tokens] (+ P[positions])                                     [B T, D]
//   block l:  x' = x + Attn(Norm1(x));   x_{l+1} = x' + FFN_l(Norm2(x'))  (pre-norm, residuals)
//   logits = Norm_f(x_L) W^T,  W = E (tied) or its own [V, D]            [B T, V]
//   loss = mean cross-entropy of the next byte
//
// FFN_l is a dense FFW in every block except the sparse blocks (by default only the middle one, L / 2, as
// in He 2024), which get the configured kind: MoE, PKM or PEER (or dense, for the baseline).
//
// The whole model is one peer::ModelLayout: the transformer's own weights (embeddings, norms, attention,
// head) as one layer under their own names, and every block's FFN under "blocks.<l>.ffn.". One
// peer::Parameters and one peer::Gradients hold everything, one optimizer steps it and one checkpoint
// saves it; the blocks work on views of their parts (peer::LayerViews, kept in the cache).
#ifndef PEER_EXAMPLES_LM_TRANSFORMER_HPP
#define PEER_EXAMPLES_LM_TRANSFORMER_HPP

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lm/attention.hpp"
#include "lm/common.hpp"
#include "lm/embedding.hpp"
#include "lm/feed_forward.hpp"
#include "lm/norm.hpp"

namespace lm {

/// PEER defaults for a small model of width D: the paper's H = 8 heads, k = 16 and batch-normed queries, with
/// N = 256^2 experts (128^2 for D in [64, 128), 64^2 below) and Dk = max(16, D / 4), so that the layer's FLOPs
/// stay close to a dense D -> 4 D -> D FFW's (a size a 2-core machine trains in minutes).
inline peer::PeerConfig default_peer_config(Index d) {
  peer::PeerConfig c;
  c.model_dim = d;
  const Index n = d >= 128 ? 256 : d >= 64 ? 128 : 64;
  c.num_experts = n * n;
  c.num_heads = 8;
  c.top_k = 16;
  c.sub_key_top_k = 16;
  c.key_dim = std::max<Index>(16, d / 4 / 2 * 2);
  return c;
}

/// PKM defaults: the PEER defaults with k = k' = 32 (He 2024's PKM baseline uses k = 32).
inline peer::PeerConfig default_pkm_config(Index d) {
  peer::PeerConfig c = default_peer_config(d);
  c.top_k = 32;
  c.sub_key_top_k = 32;
  return c;
}

/// MoE defaults: E = 16 experts of D -> 2 D -> D, token choice top 2 (so the experts cost what a dense
/// D -> 4 D -> D costs), a 0.01 load-balancing loss.
inline peer::MoeConfig default_moe_config(Index d) {
  peer::MoeConfig c;
  c.model_dim = d;
  c.num_experts = 16;
  c.expert_hidden = 2 * d;
  c.top_k = 2;
  c.routing = peer::MoeRouting::kTokenChoice;
  c.load_balance_weight = 0.01;
  return c;
}

struct LmConfig {
  Index context = 128;    ///< T: longest sequence
  Index model_dim = 128;  ///< D
  Index num_layers = 4;   ///< L
  Index num_heads = 4;    ///< attention heads (D / heads per head)
  PositionKind positions = PositionKind::kLearned;
  NormKind norm = NormKind::kRms;
  bool tied_head = true;
  double norm_epsilon = 1e-5;
  double rope_base = 10000.0;
  Index ffn_hidden = 0;  ///< F of the dense FFWs; 0 means 4 D

  FfnKind ffn = FfnKind::kDense;     ///< kind of the sparse blocks
  std::vector<Index> sparse_blocks;  ///< blocks that get `ffn`; empty means the middle block L / 2
  peer::PeerConfig peer = default_peer_config(128);
  peer::PeerConfig pkm = default_pkm_config(128);
  peer::MoeConfig moe = default_moe_config(128);

  Index dense_hidden() const { return ffn_hidden > 0 ? ffn_hidden : 4 * model_dim; }
  std::vector<Index> sparse() const { return sparse_blocks.empty() ? std::vector<Index>{num_layers / 2} : sparse_blocks; }
  bool is_sparse(Index block) const {
    const auto s = sparse();
    return std::find(s.begin(), s.end(), block) != s.end();
  }

  /// Sets D everywhere it appears (the sparse layers' configurations included).
  void set_model_dim(Index d) {
    model_dim = d;
    peer.model_dim = d;
    pkm.model_dim = d;
    moe.model_dim = d;
  }

  void validate() const {
    if (context < 1) peer::detail::throw_invalid("LmConfig.context", context, "must be >= 1");
    if (num_layers < 1) peer::detail::throw_invalid("LmConfig.num_layers", num_layers, "must be >= 1");
    for (Index b : sparse()) {
      if (b < 0 || b >= num_layers) peer::detail::throw_invalid("LmConfig.sparse_blocks entry", b, "must be in [0, num_layers)");
    }
    AttentionConfig{model_dim, num_heads, context, positions, rope_base}.validate();
    if (peer.model_dim != model_dim || pkm.model_dim != model_dim || moe.model_dim != model_dim) {
      throw std::invalid_argument("LmConfig: the sparse layers' model_dim must equal model_dim (use set_model_dim)");
    }
  }

  /// The model's configuration as text pairs, for checkpoints (the sparse layers' fields come from the
  /// layers themselves).
  Fields to_fields() const {
    std::ostringstream blocks;
    for (Index b : sparse()) blocks << b << ",";
    return {{"context", std::to_string(context)},
            {"model_dim", std::to_string(model_dim)},
            {"num_layers", std::to_string(num_layers)},
            {"num_heads", std::to_string(num_heads)},
            {"positions", to_string(positions)},
            {"norm", to_string(norm)},
            {"tied_head", tied_head ? "yes" : "no"},
            {"ffn_hidden", std::to_string(dense_hidden())},
            {"ffn", to_string(ffn)},
            {"sparse_blocks", blocks.str()}};
  }
};

/// One pre-norm block: x' = x + Attn(Norm1(x)), y = x' + FFN(Norm2(x')).
template <typename Scalar>
class Block {
 public:
  struct Cache {
    Mat<Scalar> h1, a, x2, h2, f;  // [N, D] each
    typename Norm<Scalar>::Cache norm1, norm2;
    typename CausalSelfAttention<Scalar>::Cache attention;
    std::unique_ptr<typename FeedForward<Scalar>::Cache> ffn;
    Mat<Scalar> dh1, dh2, dx2;  // backward scratch
  };

  Block(const LmConfig& c, std::unique_ptr<FeedForward<Scalar>> ffn)
      : norm1_(c.norm, c.model_dim, c.norm_epsilon),
        norm2_(c.norm, c.model_dim, c.norm_epsilon),
        attention_(AttentionConfig{c.model_dim, c.num_heads, c.context, c.positions, c.rope_base}),
        ffn_(std::move(ffn)) {}

  const CausalSelfAttention<Scalar>& attention() const { return attention_; }
  const FeedForward<Scalar>& ffn() const { return *ffn_; }

  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix) {
    norm1_.register_parameters(layout, prefix + "norm1.");
    attention_.register_parameters(layout, prefix + "attn.");
    norm2_.register_parameters(layout, prefix + "norm2.");
  }
  void initialize(peer::Parameters<Scalar>& params, std::uint64_t seed, double residual_scale) const {
    norm1_.initialize(params);
    attention_.initialize(params, seed, residual_scale);
    norm2_.initialize(params);
  }

  /// y [N, D] assigned from x [N, D] (`batch` sequences of `seq`); y must not alias x. With `routed` (a
  /// cache of an earlier forward of this block) the FFN's routing is held at that forward's
  /// (FeedForward::forward_held), for central-difference checks.
  void forward(const peer::Parameters<Scalar>& params, peer::Parameters<Scalar>& ffn_params, const ConstMatRef<Scalar>& x,
               MatRef<Scalar> y, Index batch, Index seq, Cache& cache, peer::Mode mode, const Cache* routed = nullptr) const {
    const Index n = x.rows(), d = x.cols();
    cache.h1.resize(n, d);
    cache.a.resize(n, d);
    cache.h2.resize(n, d);
    cache.f.resize(n, d);
    norm1_.forward(params, x, cache.h1, cache.norm1);
    attention_.forward(params, cache.h1, cache.a, batch, seq, cache.attention);
    cache.x2 = x + cache.a;
    norm2_.forward(params, cache.x2, cache.h2, cache.norm2);
    if (!cache.ffn) cache.ffn = ffn_->make_cache();
    if (routed != nullptr) {
      ffn_->forward_held(ffn_params, cache.h2, cache.f, *cache.ffn, mode, *routed->ffn);
    } else {
      ffn_->forward(ffn_params, cache.h2, cache.f, *cache.ffn, mode);
    }
    y = cache.x2 + cache.f;
  }

  /// dx += dL/dx from dy; gradients added into grads (transformer weights) and ffn_grads.
  void backward(const peer::Parameters<Scalar>& params, const peer::Parameters<Scalar>& ffn_params, Cache& cache,
                const ConstMatRef<Scalar>& dy, MatRef<Scalar> dx, peer::Gradients<Scalar>& grads,
                peer::Gradients<Scalar>& ffn_grads) const {
    const Index n = dy.rows(), d = dy.cols();
    cache.dh2.setZero(n, d);
    ffn_->backward(ffn_params, *cache.ffn, dy, cache.dh2, ffn_grads);
    cache.dx2 = dy;
    norm2_.backward(params, cache.norm2, cache.dh2, cache.dx2, grads);
    cache.dh1.setZero(n, d);
    attention_.backward(params, cache.attention, cache.dx2, cache.dh1, grads);
    dx += cache.dx2;
    norm1_.backward(params, cache.norm1, cache.dh1, dx, grads);
  }

 private:
  Norm<Scalar> norm1_, norm2_;
  CausalSelfAttention<Scalar> attention_;
  std::unique_ptr<FeedForward<Scalar>> ffn_;
};

template <typename Scalar>
class Transformer {
 public:
  struct Cache {
    Index batch = 0, seq = 0;
    TokenMatrix inputs;             ///< [B, T]
    std::vector<Mat<Scalar>> x;     ///< x_0 .. x_L, [B T, D] each
    std::vector<typename Block<Scalar>::Cache> blocks;
    Mat<Scalar> hf;                 ///< [B T, D] final norm
    typename Norm<Scalar>::Cache final_norm;
    Mat<Scalar> logits;             ///< [B T, V]
    Mat<Scalar> dlogits;            ///< [B T, V] set by loss()
    std::vector<double> row_loss;   ///< [B T] per-position loss, set by loss()
    // Backward scratch.
    Mat<Scalar> dhf, dx, dx_next;
    typename Embedding<Scalar>::Scratch embedding;
    typename OutputHead<Scalar>::Scratch head;
    // Each layer's view of the parameters (and gradients) last used: made once, remade only when the
    // model is called with other objects.
    std::unique_ptr<peer::LayerViews<Scalar>> views;
  };

  explicit Transformer(const LmConfig& config)
      : config_(checked(config)),
        embedding_(kVocab, config.model_dim, config.context, config.positions),
        final_norm_(config.norm, config.model_dim, config.norm_epsilon),
        head_(config.model_dim, kVocab, config.tied_head),
        own_(static_cast<Index>(sizeof(Scalar))),
        model_(static_cast<Index>(sizeof(Scalar))) {
    embedding_.register_parameters(own_, "embed.");
    for (Index l = 0; l < config_.num_layers; ++l) {
      blocks_.emplace_back(config_, make_ffn(l));
      blocks_.back().register_parameters(own_, "blocks." + std::to_string(l) + ".");
    }
    final_norm_.register_parameters(own_, "norm_f.");
    head_.register_parameters(own_, "head.", embedding_.token_table());
    model_.add_layer("", own_);  // layer 0: the transformer's own tensors, under their own names
    for (Index l = 0; l < config_.num_layers; ++l) model_.add_layer("blocks." + std::to_string(l) + ".ffn.", ffn(l).layout());
  }

  const LmConfig& config() const { return config_; }
  /// Every tensor of the model: the transformer's own and every FFN's ("blocks.<l>.ffn.<name>").
  const peer::ParameterLayout& layout() const { return model_.layout(); }
  /// The model set: layer 0 is the transformer's own tensors, layer ffn_layer(l) block l's FFN.
  const peer::ModelLayout& model_layout() const { return model_; }
  /// The transformer's own tensors (embeddings, norms, attention, head).
  const peer::ParameterLayout& own_layout() const { return own_; }
  static constexpr int kOwnLayer = 0;
  static int ffn_layer(Index block) { return static_cast<int>(block) + 1; }
  Index num_layers() const { return config_.num_layers; }
  const Block<Scalar>& block(Index l) const { return blocks_[static_cast<std::size_t>(l)]; }
  const FeedForward<Scalar>& ffn(Index l) const { return block(l).ffn(); }

  /// Seeded initialization: embeddings and an untied head N(0, 0.02^2), attention projections
  /// U(+-1/sqrt(D)) with the output projection scaled by 1/sqrt(2 L), norms the identity; each FFN by its
  /// layer's own initialization from a seed derived from (seed, block).
  peer::Parameters<Scalar> make_parameters(std::uint64_t seed) const {
    peer::Parameters<Scalar> p(model_.layout());
    peer::LayerViews<Scalar> v(model_, p);
    auto& own = v.params(kOwnLayer);
    embedding_.initialize(own, seed);
    const double residual_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(config_.num_layers));
    for (const auto& b : blocks_) b.initialize(own, seed, residual_scale);
    final_norm_.initialize(own);
    head_.initialize(own, seed);
    for (Index l = 0; l < config_.num_layers; ++l) {
      ffn(l).initialize(v.params(ffn_layer(l)), peer::CounterRng::mix(seed * 1000003ULL + static_cast<std::uint64_t>(l) + 1));
    }
    return p;
  }
  peer::Gradients<Scalar> make_gradients() const { return peer::Gradients<Scalar>(model_.layout()); }

  /// Logits cache.logits [B T, V] for inputs [B, T] (T <= context). Mode::kTrain uses batch statistics in
  /// batch-normed PEER / PKM queries (and updates their running statistics); Mode::kEval uses the running
  /// statistics, so every position's logits depend only on the bytes up to it. With `routed` (the cache
  /// of an earlier forward) every FFN's routing is held at that forward's where the FFN can hold it.
  void forward(peer::Parameters<Scalar>& params, const TokenMatrix& inputs, Cache& cache, peer::Mode mode,
               const Cache* routed = nullptr) const {
    const Index b = inputs.rows(), t = inputs.cols(), n = b * t, d = config_.model_dim;
    if (!cache.views || !cache.views->made_from(params)) cache.views = std::make_unique<peer::LayerViews<Scalar>>(model_, params);
    auto& own = cache.views->params(kOwnLayer);
    cache.batch = b;
    cache.seq = t;
    cache.inputs = inputs;
    cache.x.resize(static_cast<std::size_t>(config_.num_layers + 1));
    cache.blocks.resize(static_cast<std::size_t>(config_.num_layers));
    cache.x[0].resize(n, d);
    embedding_.forward(own, inputs, cache.x[0]);
    for (Index l = 0; l < config_.num_layers; ++l) {
      const auto i = static_cast<std::size_t>(l);
      cache.x[i + 1].resize(n, d);
      blocks_[i].forward(own, cache.views->params(ffn_layer(l)), cache.x[i], cache.x[i + 1], b, t, cache.blocks[i], mode,
                         routed != nullptr ? &routed->blocks.at(i) : nullptr);
    }
    cache.hf.resize(n, d);
    final_norm_.forward(own, cache.x.back(), cache.hf, cache.final_norm);
    cache.logits.resize(n, kVocab);
    head_.forward(own, cache.hf, cache.logits);
  }

  /// Mean cross-entropy (nats per byte) of cache.logits against targets [B, T]; with want_gradient, sets
  /// cache.dlogits to its gradient. Per-position losses are left in cache.row_loss.
  double loss(Cache& cache, const TokenMatrix& targets, bool want_gradient) const {
    const Index n = cache.logits.rows();
    const Scalar scale = Scalar(1) / static_cast<Scalar>(n);
    const double total = softmax_cross_entropy<Scalar>(cache.logits, targets, want_gradient ? &cache.dlogits : nullptr, scale,
                                                       cache.row_loss);
    return total / static_cast<double>(n);
  }

  /// The load-balancing terms the FFNs add to the training objective (MoE), from the last forward.
  double aux_loss(const Cache& cache) const {
    double total = 0;
    for (Index l = 0; l < config_.num_layers; ++l) total += ffn(l).aux_loss(*cache.blocks[static_cast<std::size_t>(l)].ffn);
    return total;
  }

  /// Gradients of loss() (+ aux_loss()) w.r.t. everything, added into grads, from cache.dlogits.
  void backward(peer::Parameters<Scalar>& params, Cache& cache, peer::Gradients<Scalar>& grads) const {
    const Index n = cache.batch * cache.seq, d = config_.model_dim;
    if (!cache.views || !cache.views->made_from(params, grads)) {
      cache.views = std::make_unique<peer::LayerViews<Scalar>>(model_, params, grads);
    }
    auto& v = *cache.views;
    const auto& own = v.params(kOwnLayer);
    auto& own_grads = v.grads(kOwnLayer);
    cache.dhf.setZero(n, d);
    head_.backward(own, cache.hf, cache.dlogits, cache.dhf, own_grads, cache.head);
    cache.dx.setZero(n, d);
    final_norm_.backward(own, cache.final_norm, cache.dhf, cache.dx, own_grads);
    for (Index l = config_.num_layers - 1; l >= 0; --l) {
      const auto i = static_cast<std::size_t>(l);
      cache.dx_next.setZero(n, d);
      blocks_[i].backward(own, v.params(ffn_layer(l)), cache.blocks[i], cache.dx, cache.dx_next, own_grads, v.grads(ffn_layer(l)));
      std::swap(cache.dx, cache.dx_next);
    }
    embedding_.backward(cache.inputs, cache.dx, own_grads, cache.embedding);
  }

  // ---- Sizes and costs (2 FLOPs per multiply-add, main terms, as the library layers count them) ----

  double total_parameters() const {
    double total = static_cast<double>(own_.num_parameters());
    for (Index l = 0; l < config_.num_layers; ++l) total += ffn(l).total_parameters();
    return total;
  }
  /// The transformer's own weights all count (the tied table is the head), plus each FFN's active ones.
  double active_parameters_per_token() const {
    double total = static_cast<double>(own_.num_parameters());
    for (Index l = 0; l < config_.num_layers; ++l) total += ffn(l).active_parameters_per_token();
    return total;
  }
  /// Forward FLOPs per token at sequence length `seq` (default: the context): attention (projections and
  /// the causal tiles), FFNs, and the head 2 D V. Embedding lookups and norms are left out.
  double forward_flops_per_token(Index seq = 0) const {
    const Index t = seq > 0 ? seq : config_.context;
    double total = 2.0 * static_cast<double>(config_.model_dim) * static_cast<double>(kVocab);
    for (Index l = 0; l < config_.num_layers; ++l) {
      total += block(l).attention().forward_flops_per_token(t) + ffn(l).forward_flops_per_token();
    }
    return total;
  }
  double backward_flops_per_token(Index seq = 0) const {
    const Index t = seq > 0 ? seq : config_.context;
    double total = 4.0 * static_cast<double>(config_.model_dim) * static_cast<double>(kVocab);
    for (Index l = 0; l < config_.num_layers; ++l) {
      total += block(l).attention().backward_flops_per_token(t) + ffn(l).backward_flops_per_token();
    }
    return total;
  }
  /// A training step's FLOPs per token: forward + backward.
  double training_flops_per_token(Index seq = 0) const { return forward_flops_per_token(seq) + backward_flops_per_token(seq); }

  /// Configuration fields for checkpoints: the model's and every sparse block's layer.
  Fields to_fields() const {
    Fields f = config_.to_fields();
    for (Index l = 0; l < config_.num_layers; ++l) {
      for (const auto& kv : ffn(l).config_fields()) f.emplace_back("ffn" + std::to_string(l) + "." + kv.first, kv.second);
    }
    return f;
  }

 private:
  static const LmConfig& checked(const LmConfig& c) {
    c.validate();
    return c;
  }

  std::unique_ptr<FeedForward<Scalar>> make_ffn(Index l) const {
    const FfnKind kind = config_.is_sparse(l) ? config_.ffn : FfnKind::kDense;
    switch (kind) {
      case FfnKind::kMoe: return make_moe_ffn<Scalar>(config_.moe);
      case FfnKind::kPkm: return make_pkm_ffn<Scalar>(config_.pkm);
      case FfnKind::kPeer: return make_peer_ffn<Scalar>(config_.peer);
      case FfnKind::kDense: break;
    }
    peer::DenseFfwConfig c;
    c.model_dim = config_.model_dim;
    c.hidden_dim = config_.dense_hidden();
    return make_dense_ffn<Scalar>(c);
  }

  LmConfig config_;
  Embedding<Scalar> embedding_;
  std::vector<Block<Scalar>> blocks_;
  Norm<Scalar> final_norm_;
  OutputHead<Scalar> head_;
  peer::ParameterLayout own_;
  peer::ModelLayout model_;
};

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_TRANSFORMER_HPP
