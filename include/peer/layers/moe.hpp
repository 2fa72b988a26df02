// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_MOE_HPP
#define PEER_LAYERS_MOE_HPP

/// \file
/// MoeFfw: a coarse mixture of experts, the paper's MoE baseline, behind the same interface as DenseFfw and
/// PeerLayer. E experts, each a small dense FFW D -> F -> D, and a linear router:
///
///   p_t    = softmax(W_r x_t)                               [E]  router probabilities, no router bias
///   S_t    = the experts token t is sent to:
///              token choice:  the top k of p_t (ties to the lower expert index)
///              expert choice: every e with t among the top C of p_{., e} (ties to the lower token index),
///                             C = min(B, ceil(c B k / E)) (Zhou et al. 2022)
///   g_te   = p_te / sum_{e' in S_t} p_te'    token choice with MoeGateNorm::kRenormalize (default)
///          = p_te                            MoeGateNorm::kNone, and always with expert choice
///   y_t    = sum_{e in S_t} g_te FFW_e(x_t), FFW_e(x) = W2_e sigma(W1_e x + b1_e) + b2_e
///
/// Optional load-balancing loss (Switch Transformer, Fedus et al. 2021), over the rows the mask counts:
///   L_aux = w E sum_e f_e P_e,  f_e = (assignments to e) / (all assignments)  (a count: not differentiated),
///                               P_e = mean_t p_te
/// It is 1 w for perfectly uniform routing. Forward reports it in the cache; backward adds its gradient.
///
/// Tokens are grouped by expert (token index ascending within an expert), so each expert runs one GEMM per
/// projection on its gathered rows. Memory is O(B k (D + F) + B E): nothing of size B E F is formed.
/// Work is split by tokens (fixed chunks) and by experts, never by thread count, and every sum runs in a
/// fixed order, so outputs and gradients are bitwise identical for any number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gemm.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/layer_layout.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/reduce.hpp"
#include "peer/core/types.hpp"
#include "peer/layers/moe_config.hpp"
#include "peer/nn/activation.hpp"
#include "peer/nn/linear.hpp"
#include "peer/retrieval/top_k.hpp"

namespace peer {


/// A coarse mixture-of-experts FFW over Scalar (float or double).
///
/// Parameters (ParameterLayout, all dense, in this order; expert e's blocks are contiguous rows):
///   moe.router.weight  [E, D]      W_r (PyTorch's [out, in])
///   moe.up.weight      [E F, D]    rows [e F, (e + 1) F) are W1_e [F, D]
///   moe.up.bias        [1, E F]    columns [e F, (e + 1) F) are b1_e   (Bias::kLearned)
///   moe.down.weight    [E D, F]    rows [e D, (e + 1) D) are W2_e [D, F]
///   moe.down.bias      [1, E D]    columns [e D, (e + 1) D) are b2_e   (Bias::kLearned)
template <typename Scalar>
class MoeFfw : public detail::LayerLayout<MoeFfw<Scalar>, Scalar> {
  using Base = detail::LayerLayout<MoeFfw<Scalar>, Scalar>;
  using Base::check_layout;
  using Base::layout_;

  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  /// Backward scratch of one thread: one expert's weight-gradient deltas.
  struct ExpertScratch {
    RowMatrix<Scalar> dw_up, dw_down;  // [F, D], [D, F]
    Vector<Scalar> db_up, db_down;     // [F], [D]
  };

  /// Everything forward keeps for backward, plus reusable scratch. Owned by the caller; one per concurrent
  /// forward. M = number of (token, expert) assignments: B k (token choice) or E C (expert choice).
  struct Cache {
    RowMatrix<Scalar> x;      ///< [B, D] copy of the input (so y may alias x)
    RowMatrix<Scalar> probs;  ///< [B, E] router probabilities p

    /// Assignments in token order: token t's are [token_begin[t], token_begin[t + 1]), best first with token
    /// choice, expert ascending with expert choice.
    std::vector<std::int64_t> token_begin;  ///< [B + 1]
    std::vector<std::int32_t> token;        ///< [M] token of assignment i
    std::vector<ExpertId> expert;           ///< [M] expert of assignment i
    Vector<Scalar> gate;                    ///< [M] g of assignment i

    /// Dispatch order: slots grouped by expert, token ascending within an expert.
    std::vector<std::int64_t> expert_begin;     ///< [E + 1] expert e's slots are [expert_begin[e], expert_begin[e + 1])
    std::vector<std::int32_t> slot_assignment;  ///< [M] assignment held by slot s
    std::vector<std::int32_t> assignment_slot;  ///< [M] slot of assignment i
    RowMatrix<Scalar> xg;      ///< [M, D] gathered inputs, slot order
    RowMatrix<Scalar> hidden;  ///< [M, F] W1_e x + b1_e
    RowMatrix<Scalar> act;     ///< [M, F] sigma(hidden)
    RowMatrix<Scalar> out;     ///< [M, D] FFW_e(x)

    Index capacity = 0;               ///< C (expert choice; 0 with token choice)
    Index counted_rows = 0;           ///< rows the mask counts (B without a mask)
    std::vector<std::int32_t> counted;      ///< ascending ids of the counted rows
    std::vector<std::uint8_t> is_counted;   ///< [B] 1 if row t counts
    Vector<Scalar> routed_fraction;   ///< [E] f_e over counted rows
    Vector<Scalar> mean_probability;  ///< [E] P_e over counted rows
    Scalar balance = 0;               ///< E sum_e f_e P_e: 1 for uniform routing, E at worst
    Scalar aux_loss = 0;              ///< load_balance_weight * balance: add it to the training loss
    bool ready = false;               ///< a forward has filled this cache

    // Scratch.
    std::vector<std::int32_t> cursor;                     // per-token / per-expert fill positions
    RowMatrix<Scalar> scores_t, chosen_scores, partials;  // [E, counted] p transposed; [E, C]; reductions
    IdMatrix chosen;                                      // [E, C] tokens each expert took
    RowMatrix<Scalar> dout, dhidden, dxg, dprobs, dx;     // backward: [M, D], [M, F], [M, D], [B, E], [B, D]
    Vector<Scalar> dgate;                                 // [M]
    std::vector<ExpertScratch> experts;                   // one per thread
    typename Linear<Scalar>::Scratch router;

    Index batch() const { return x.rows(); }
    Index assignments() const { return static_cast<Index>(token.size()); }
  };

  /// Validates `config` (std::invalid_argument on the first broken rule).
  explicit MoeFfw(const MoeConfig& config)
      : config_(checked(config)),
        router_(config.model_dim, config.num_experts, Bias::kNone) {
    const Index d = config_.model_dim, e = config_.num_experts, f = config_.expert_hidden;
    router_.register_parameters(layout_, "moe.router.");
    up_weight_ = layout_.add_dense("moe.up.weight", e * f, d);
    if (has_bias()) up_bias_ = layout_.add_dense("moe.up.bias", 1, e * f);
    down_weight_ = layout_.add_dense("moe.down.weight", e * d, f);
    if (has_bias()) down_bias_ = layout_.add_dense("moe.down.bias", 1, e * d);
  }

  const MoeConfig& config() const { return config_; }
  /// The named list of tensors (name, shape, kind) of this layer.

  // ---- Sizes and costs per token, as DenseFfw and the product-key layers report them (see MoeConfig) ----

  /// Trained scalars: router, expert weights and biases (= MoeConfig::total_parameters()).
  Index total_parameters() const { return layout_.num_parameters(); }
  /// The router plus experts_per_token() experts; a double, since c k may be fractional with expert choice.
  double active_parameters_per_token() const { return config_.active_parameters_per_token(); }
  /// 2 D E + 4 D F experts_per_token().
  double forward_flops_per_token() const { return config_.forward_flops_per_token(); }
  /// Twice the forward: each GEMM's weight gradient and input gradient (with dx).
  double backward_flops_per_token() const { return config_.backward_flops_per_token(); }
  /// active_parameters_per_token() x sizeof(Scalar): a token's parameter reads when it shares nothing.
  double parameter_bytes_per_token() const {
    return config_.parameter_bytes_per_token(static_cast<Index>(sizeof(Scalar)));
  }

  /// Seeded initialization, each tensor a pure function of (seed, name): router and W1 U(+-1/sqrt(D)),
  /// W2 U(+-1/sqrt(F)) (PyTorch's Linear bounds, every expert initialized like a DenseFfw), biases 0.
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    check_layout(params.layout(), "params");
    router_.initialize(params, seed);
    fill_uniform(params, up_weight_, 1.0 / std::sqrt(static_cast<double>(config_.model_dim)), seed);
    fill_uniform(params, down_weight_, 1.0 / std::sqrt(static_cast<double>(config_.expert_hidden)), seed);
    if (has_bias()) {
      params.dense(up_bias_).setZero();
      params.dense(down_bias_).setZero();
    }
  }

  /// Scratch of infer(): the forward cache, reused.
  using Workspace = Cache;

  /// Inference: forward() in Mode::kEval on const parameters (the same code, so the same bits), `ws` a
  /// cache used as scratch. Unlike the product-key layers' infer() it may allocate: the per-expert token
  /// groups change size with the routing.
  void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Workspace& ws) const {
    detail::check_no_overlap("infer: y", y, "x", x);  // the same contract as every infer()
    forward(params, x, y, ws, Mode::kEval);
  }

  /// y = MoE(x). x [B, D]; y [B, D] assigned (may be x itself). Fills `cache` for backward, including
  /// cache.aux_loss. `mask` (size B, optional) marks the rows that count: only they enter the load-balancing
  /// statistics, and with expert choice only they can be chosen (C is computed from their number; the other
  /// rows get y = 0). With token choice every row is routed and gets its output. `mode` is accepted for
  /// interface parity: routing is the same in training and evaluation. Throws std::invalid_argument on
  /// shapes, std::domain_error on non-finite x or router logits.
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache,
               Mode, const RowMask* mask = nullptr) const {
    begin_forward(params, x, y, cache, mask);
    if (config_.routing == MoeRouting::kTokenChoice) {
      route_tokens(cache);
    } else {
      route_experts(cache);
    }
    finish_forward(params, y, cache);
  }

  /// forward() with the routing held at `routed`'s (a cache an earlier forward filled, on a batch of the
  /// same size): the same (token, expert) assignments, their gates recomputed from this call's router
  /// probabilities as forward forms them (renormalized over the token's kept experts with token choice
  /// and MoeGateNorm::kRenormalize, else g = p). backward() is the same. With routed = a forward on the
  /// same x and parameters this is that forward bit for bit; with the routing held while parameters move
  /// it is the smooth function central differences can check (peer/testing/gradient_check.hpp). All rows
  /// count in the load-balancing statistics.
  void forward_routed(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const Cache& routed,
                      MatrixRef<Scalar> y, Cache& cache, Mode) const {
    if (!routed.ready) throw std::invalid_argument("MoeFfw::forward_routed: the routed cache holds no forward pass");
    if (routed.batch() != x.rows()) {
      detail::throw_invalid("MoeFfw::forward_routed: the routed cache's batch", routed.batch(),
                            "must equal x.rows() = " + detail::to_text(x.rows()));
    }
    begin_forward(params, x, y, cache, nullptr);
    const Index b = x.rows();
    cache.capacity = routed.capacity;
    cache.token_begin = routed.token_begin;
    cache.token = routed.token;
    cache.expert = routed.expert;
    cache.gate.resize(routed.assignments());
    const bool renormalize = config_.routing == MoeRouting::kTokenChoice && config_.gate_norm == MoeGateNorm::kRenormalize;
    for (Index t = 0; t < b; ++t) {
      Scalar sum = 0;
      for (std::int64_t i = cache.token_begin[t]; i < cache.token_begin[t + 1]; ++i) {
        cache.gate[i] = cache.probs(t, cache.expert[static_cast<std::size_t>(i)]);
        sum += cache.gate[i];
      }
      if (renormalize) {
        for (std::int64_t i = cache.token_begin[t]; i < cache.token_begin[t + 1]; ++i) cache.gate[i] /= sum;
      }
    }
    finish_forward(params, y, cache);
  }

  /// Backward of the forward that filled `cache`, with `params` unchanged since: the gradient of
  /// L + cache.aux_loss, where dy = dL/dy [B, D]. dx [B, D]: dL/dx is ADDED (pass a matrix with 0 rows to
  /// skip it). Gradients of every tensor are ADDED into `grads`, each delta complete before it is added, so
  /// a gradient pre-filled with G ends as exactly G + delta. The routing (which experts, f_e) is treated as
  /// constant, as usual for top-k routers.
  void backward(const Parameters<Scalar>& params, Cache& cache, const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> dx,
                Gradients<Scalar>& grads) const {
    if (!cache.ready) throw std::invalid_argument("MoeFfw::backward: the cache holds no forward pass");
    const Index b = cache.batch(), d = config_.model_dim, e_count = config_.num_experts;
    const Index f = config_.expert_hidden, m = cache.assignments();
    check_layout(params.layout(), "params");
    check_layout(grads.layout(), "grads");
    detail::check_shape("dy", dy.rows(), dy.cols(), b, d);
    if (dx.rows() != 0) detail::check_shape("dx", dx.rows(), dx.cols(), b, d);
    const bool want_dx = dx.rows() != 0;

    // Per slot: dL/d out = g dy_t and dL/dg = dy_t . out.
    cache.dout.resize(m, d);
    cache.dgate.resize(m);
    parallel_for(m, kSlotGrain, [&](Index s0, Index s1, int) {
      for (Index s = s0; s < s1; ++s) {
        const std::int32_t i = cache.slot_assignment[s];
        const Index t = cache.token[i];
        cache.dout.row(s) = cache.gate[i] * dy.row(t);
        Scalar dot = 0;
        for (Index c = 0; c < d; ++c) dot += dy(t, c) * cache.out(s, c);
        cache.dgate[i] = dot;
      }
    });

    // Per expert, on its slots: dA = dO W2, dW2 = dO^T A, dH = dA sigma'(H), dW1 = dH^T X, dX = dH W1.
    cache.dhidden.resize(m, f);
    if (want_dx) cache.dxg.resize(m, d);
    const int threads = parallel_threads();
    if (static_cast<int>(cache.experts.size()) < threads) cache.experts.resize(threads);
    for (auto& s : cache.experts) {
      s.dw_up.resize(f, d);
      s.dw_down.resize(d, f);
      s.db_up.resize(f);
      s.db_down.resize(d);
    }
    const auto w_up = params.dense(up_weight_);
    const auto w_down = params.dense(down_weight_);
    const Activation a = config_.activation;
    parallel_for(e_count, expert_grain(2 * expert_work(m)), [&](Index e0, Index e1, int thread) {
      ExpertScratch& s = cache.experts[thread];
      for (Index e = e0; e < e1; ++e) {
        const Index s0 = cache.expert_begin[e];
        const Index n = cache.expert_begin[e + 1] - s0;
        if (n == 0) continue;  // no tokens: a zero delta, G stays G
        const auto dout = cache.dout.middleRows(s0, n);
        auto dh = cache.dhidden.middleRows(s0, n);
        detail::gemm(dout, w_down.middleRows(e * d, d), dh, Scalar(1), detail::GemmUpdate::kAssign);
        detail::gemm(dout.transpose(), cache.act.middleRows(s0, n), s.dw_down, Scalar(1), detail::GemmUpdate::kAssign);
        dh = dh.cwiseProduct(cache.hidden.middleRows(s0, n).unaryExpr([a](Scalar z) { return activate_derivative(a, z); }));
        detail::gemm(dh.transpose(), cache.xg.middleRows(s0, n), s.dw_up, Scalar(1), detail::GemmUpdate::kAssign);
        if (want_dx) {
          auto dxg = cache.dxg.middleRows(s0, n);
          detail::gemm(dh, w_up.middleRows(e * f, f), dxg, Scalar(1), detail::GemmUpdate::kAssign);
        }
        grads.dense(up_weight_).middleRows(e * f, f) += s.dw_up;
        grads.dense(down_weight_).middleRows(e * d, d) += s.dw_down;
        if (has_bias()) {
          // Column sums in slot order.
          s.db_up.setZero();
          s.db_down.setZero();
          for (Index r = 0; r < n; ++r) {
            for (Index c = 0; c < f; ++c) s.db_up[c] += dh(r, c);
            for (Index c = 0; c < d; ++c) s.db_down[c] += dout(r, c);
          }
          grads.dense(up_bias_).row(0).segment(e * f, f) += s.db_up.transpose();
          grads.dense(down_bias_).row(0).segment(e * d, d) += s.db_down.transpose();
        }
      }
    });

    // dL/dp from the gates and the load-balancing loss, then through the softmax: dr = p (dp - p . dp).
    const bool renormalize =
        config_.routing == MoeRouting::kTokenChoice && config_.gate_norm == MoeGateNorm::kRenormalize;
    const bool balance = config_.load_balance_weight > 0 && cache.counted_rows > 0;
    Vector<Scalar> coefficient;  // dL_aux/dp_te = w E f_e / counted rows, for counted t
    if (balance) {
      coefficient = cache.routed_fraction * (static_cast<Scalar>(config_.load_balance_weight) *
                                             static_cast<Scalar>(e_count)) /
                    static_cast<Scalar>(cache.counted_rows);
    }
    cache.dprobs.setZero(b, e_count);
    parallel_for(b, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        Scalar* dp = &cache.dprobs(t, 0);
        const Scalar* p = &cache.probs(t, 0);
        const std::int64_t i0 = cache.token_begin[t], i1 = cache.token_begin[t + 1];
        if (renormalize) {
          // g_j = p_j / S: dp_j = (dg_j - sum_j' g_j' dg_j') / S, S summed in rank order as in forward.
          Scalar sum = 0, dot = 0;
          for (std::int64_t i = i0; i < i1; ++i) {
            sum += p[cache.expert[i]];
            dot += cache.gate[i] * cache.dgate[i];
          }
          for (std::int64_t i = i0; i < i1; ++i) dp[cache.expert[i]] += (cache.dgate[i] - dot) / sum;
        } else {
          for (std::int64_t i = i0; i < i1; ++i) dp[cache.expert[i]] += cache.dgate[i];
        }
        if (balance && cache.is_counted[t]) {
          for (Index e = 0; e < e_count; ++e) dp[e] += coefficient[e];
        }
        Scalar dot = 0;
        for (Index e = 0; e < e_count; ++e) dot += p[e] * dp[e];
        for (Index e = 0; e < e_count; ++e) dp[e] = p[e] * (dp[e] - dot);
      }
    });

    if (want_dx) {
      // dx_t = sum of the token's dX rows in assignment order, then + dr W_r (the router's Linear).
      cache.dx.resize(b, d);
      parallel_for(b, kTokenGrain, [&](Index t0, Index t1, int) {
        for (Index t = t0; t < t1; ++t) {
          auto row = cache.dx.row(t);
          row.setZero();
          for (std::int64_t i = cache.token_begin[t]; i < cache.token_begin[t + 1]; ++i) {
            row += cache.dxg.row(cache.assignment_slot[i]);
          }
        }
      });
    } else {
      cache.dx.resize(0, d);
    }
    router_.backward(params, cache.x, cache.dprobs, cache.dx, grads, cache.router);
    if (want_dx) dx += cache.dx;
  }

 private:
  static constexpr Index kTokenGrain = 64;  ///< tokens per chunk of the per-token loops
  static constexpr Index kSlotGrain = 64;   ///< assignments per chunk of the per-slot loops
  static constexpr Index kChunkWork = Index{1} << 16;  ///< multiply-adds worth a chunk of experts

  // Experts per chunk, so that a chunk holds about kChunkWork multiply-adds: small problems then run without
  // the cost of a parallel region. It depends on the problem size only, and each expert is computed the
  // same way whatever chunk it is in, so results do not depend on it.
  Index expert_grain(double work_per_expert) const {
    const double experts = std::ceil(static_cast<double>(kChunkWork) / std::max(1.0, work_per_expert));
    return static_cast<Index>(std::min(static_cast<double>(config_.num_experts), experts));
  }
  // Multiply-adds of one expert's forward GEMMs at the batch's mean load.
  double expert_work(Index assignments) const {
    return (static_cast<double>(assignments) / static_cast<double>(config_.num_experts) + 1) * 2 *
           static_cast<double>(config_.model_dim) * static_cast<double>(config_.expert_hidden);
  }

  static const MoeConfig& checked(const MoeConfig& config) {
    config.validate();
    return config;
  }

  bool has_bias() const { return config_.bias == Bias::kLearned; }

  static void fill_uniform(Parameters<Scalar>& params, DenseHandle h, double bound, std::uint64_t seed) {
    const CounterRng rng(seed, stream_of(params.layout().spec(h).name));
    auto w = params.dense(h);
    Scalar* data = w.data();
    parallel_for(w.size(), Index{1} << 16, [&](Index i0, Index i1, int) {
      for (Index i = i0; i < i1; ++i) data[i] = static_cast<Scalar>(rng.uniform(static_cast<std::uint64_t>(i), -bound, bound));
    });
  }

  // forward()'s checks, the copy of x, the router probabilities and the counted rows.
  void begin_forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const MatrixRef<Scalar>& y, Cache& cache,
                     const RowMask* mask) const {
    const Index b = x.rows(), d = config_.model_dim, e_count = config_.num_experts;
    check_layout(params.layout(), "params");
    detail::check_shape("x", x.rows(), x.cols(), b, d);
    detail::check_shape("y", y.rows(), y.cols(), b, d);
    if (mask != nullptr && mask->size() != b) {
      detail::throw_invalid("row mask size", mask->size(), "must equal the batch size " + detail::to_text(b));
    }
    if (b >= (Index{1} << 31)) detail::throw_invalid("batch", b, "must be < 2^31");
    const Index counted = mask == nullptr ? b : static_cast<Index>(mask->count());
    if (config_.routing == MoeRouting::kTokenChoice && b * config_.top_k >= (Index{1} << 31)) {
      detail::throw_invalid("batch * top_k", b * config_.top_k, "must be < 2^31");
    }
    if (config_.routing == MoeRouting::kExpertChoice && e_count * config_.capacity(counted) >= (Index{1} << 31)) {
      detail::throw_invalid("num_experts * capacity", e_count * config_.capacity(counted), "must be < 2^31");
    }
    detail::check_finite("x", x);
    cache.ready = false;
    cache.x = x;
    cache.probs.resize(b, e_count);
    router_.forward(params, cache.x, cache.probs);
    detail::check_finite("router logits", cache.probs);
    // p = softmax(logits), shifted by the row maximum.
    parallel_for(b, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        Scalar* p = &cache.probs(t, 0);
        Scalar max = p[0];
        for (Index e = 1; e < e_count; ++e) max = p[e] > max ? p[e] : max;
        Scalar sum = 0;
        for (Index e = 0; e < e_count; ++e) {
          p[e] = std::exp(p[e] - max);
          sum += p[e];
        }
        for (Index e = 0; e < e_count; ++e) p[e] /= sum;
      }
    });
    cache.counted.clear();
    cache.is_counted.resize(b);
    for (Index t = 0; t < b; ++t) {
      cache.is_counted[t] = mask == nullptr || (*mask)[t];
      if (cache.is_counted[t]) cache.counted.push_back(static_cast<std::int32_t>(t));
    }
    cache.counted_rows = counted;
  }

  // The experts on the routed assignments, the mixed output and the load-balancing statistics.
  void finish_forward(const Parameters<Scalar>& params, MatrixRef<Scalar> y, Cache& cache) const {
    const Index b = cache.batch();
    dispatch(cache);
    run_experts(params, cache);
    // y_t = sum of g o over the token's assignments, in assignment order.
    parallel_for(b, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        auto row = y.row(t);
        row.setZero();
        for (std::int64_t i = cache.token_begin[t]; i < cache.token_begin[t + 1]; ++i) {
          row += cache.gate[i] * cache.out.row(cache.assignment_slot[i]);
        }
      }
    });
    balance_statistics(cache);
    cache.ready = true;
  }

  // Token choice: assignment t k + j is token t's j-th best expert by p (ties to the lower index).
  void route_tokens(Cache& cache) const {
    const Index b = cache.batch(), k = config_.top_k, e_count = config_.num_experts;
    const Index m = b * k;
    cache.capacity = 0;
    cache.token_begin.resize(b + 1);
    for (Index t = 0; t <= b; ++t) cache.token_begin[t] = t * k;
    cache.token.resize(m);
    cache.expert.resize(m);
    cache.gate.resize(m);
    const bool renormalize = config_.gate_norm == MoeGateNorm::kRenormalize;
    parallel_for(b, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        Scalar* g = cache.gate.data() + t * k;
        top_k(&cache.probs(t, 0), e_count, k, cache.expert.data() + t * k, g);  // g = kept p, best first
        Scalar sum = 0;
        for (Index j = 0; j < k; ++j) {
          cache.token[t * k + j] = static_cast<std::int32_t>(t);
          sum += g[j];
        }
        if (renormalize) {
          for (Index j = 0; j < k; ++j) g[j] /= sum;
        }
      }
    });
  }

  // Expert choice: expert e takes the top C counted tokens of column p_{., e} (ties to the lower token);
  // assignments are then listed token by token, experts ascending, with g = p.
  void route_experts(Cache& cache) const {
    const Index b = cache.batch(), e_count = config_.num_experts, n = cache.counted_rows;
    const Index c = config_.capacity(n);
    cache.capacity = c;
    cache.scores_t.resize(e_count, n);
    cache.chosen.resize(e_count, c);
    cache.chosen_scores.resize(e_count, c);
    if (c > 0) {
      parallel_for(e_count, expert_grain(4.0 * static_cast<double>(n)), [&](Index e0, Index e1, int) {
        for (Index e = e0; e < e1; ++e) {
          Scalar* column = &cache.scores_t(e, 0);
          for (Index r = 0; r < n; ++r) column[r] = cache.probs(cache.counted[r], e);
          std::int32_t* chosen = &cache.chosen(e, 0);
          top_k(column, n, c, chosen, &cache.chosen_scores(e, 0));
          for (Index j = 0; j < c; ++j) chosen[j] = cache.counted[chosen[j]];
          std::sort(chosen, chosen + c);
        }
      });
    }
    // Token-major listing: count, prefix sums, then fill experts ascending.
    cache.token_begin.assign(b + 1, 0);
    for (Index i = 0; i < cache.chosen.size(); ++i) ++cache.token_begin[cache.chosen.data()[i] + 1];
    for (Index t = 0; t < b; ++t) cache.token_begin[t + 1] += cache.token_begin[t];
    const std::size_t m = e_count * c;
    cache.token.resize(m);
    cache.expert.resize(m);
    cache.gate.resize(static_cast<Index>(m));
    cache.cursor.assign(b, 0);
    for (Index e = 0; e < e_count; ++e) {
      for (Index j = 0; j < c; ++j) {
        const std::int32_t t = cache.chosen(e, j);
        const std::int64_t i = cache.token_begin[t] + cache.cursor[t]++;
        cache.token[i] = t;
        cache.expert[i] = static_cast<ExpertId>(e);
        cache.gate[i] = cache.probs(t, e);
      }
    }
  }

  // Slots: assignments grouped by expert with a stable counting sort over the assignment index, so tokens
  // ascend within an expert (assignments are listed token by token). O(M + E).
  void dispatch(Cache& cache) const {
    const Index e_count = config_.num_experts;
    const std::size_t m = cache.token.size();
    cache.expert_begin.assign(e_count + 1, 0);
    for (std::size_t i = 0; i < m; ++i) ++cache.expert_begin[cache.expert[i] + 1];
    for (Index e = 0; e < e_count; ++e) cache.expert_begin[e + 1] += cache.expert_begin[e];
    cache.cursor.assign(e_count, 0);
    cache.slot_assignment.resize(m);
    cache.assignment_slot.resize(m);
    for (std::size_t i = 0; i < m; ++i) {
      const std::size_t e = cache.expert[i];
      const std::int64_t s = cache.expert_begin[e] + cache.cursor[e]++;
      cache.slot_assignment[s] = static_cast<std::int32_t>(i);
      cache.assignment_slot[i] = static_cast<std::int32_t>(s);
    }
  }

  // Gathers each slot's input row, then one GEMM per projection per expert: H = X W1^T + b1, A = sigma(H),
  // O = A W2^T + b2, on the expert's contiguous slots.
  void run_experts(const Parameters<Scalar>& params, Cache& cache) const {
    const Index d = config_.model_dim, f = config_.expert_hidden, e_count = config_.num_experts;
    const Index m = cache.assignments();
    cache.xg.resize(m, d);
    parallel_for(m, kSlotGrain, [&](Index s0, Index s1, int) {
      for (Index s = s0; s < s1; ++s) {
        cache.xg.row(s) = cache.x.row(cache.token[cache.slot_assignment[s]]);
      }
    });
    cache.hidden.resize(m, f);
    cache.act.resize(m, f);
    cache.out.resize(m, d);
    const auto w_up = params.dense(up_weight_);
    const auto w_down = params.dense(down_weight_);
    const Activation a = config_.activation;
    parallel_for(e_count, expert_grain(expert_work(m)), [&](Index e0, Index e1, int) {
      for (Index e = e0; e < e1; ++e) {
        const Index s0 = cache.expert_begin[e];
        const Index n = cache.expert_begin[e + 1] - s0;
        if (n == 0) continue;
        auto h = cache.hidden.middleRows(s0, n);
        detail::gemm(cache.xg.middleRows(s0, n), w_up.middleRows(e * f, f).transpose(), h, Scalar(1), detail::GemmUpdate::kAssign);
        if (has_bias()) h.rowwise() += params.dense(up_bias_).row(0).segment(e * f, f);
        auto act = cache.act.middleRows(s0, n);
        act = h.unaryExpr([a](Scalar z) { return activate(a, z); });
        auto o = cache.out.middleRows(s0, n);
        detail::gemm(act, w_down.middleRows(e * d, d).transpose(), o, Scalar(1), detail::GemmUpdate::kAssign);
        if (has_bias()) o.rowwise() += params.dense(down_bias_).row(0).segment(e * d, d);
      }
    });
  }

  // f_e = assignments of counted rows to e / all assignments of counted rows; P_e = mean over counted rows
  // of p_te (chunked row sums added in chunk order); balance = E sum_e f_e P_e.
  void balance_statistics(Cache& cache) const {
    const Index b = cache.batch(), e_count = config_.num_experts, n = cache.counted_rows;
    cache.routed_fraction.setZero(e_count);
    cache.mean_probability.setZero(e_count);
    cache.balance = 0;
    cache.aux_loss = 0;
    if (n == 0) return;
    Index total = 0;
    for (std::size_t i = 0; i < cache.token.size(); ++i) {
      if (cache.is_counted[cache.token[i]]) {
        cache.routed_fraction[cache.expert[i]] += Scalar(1);
        ++total;
      }
    }
    if (total > 0) cache.routed_fraction /= static_cast<Scalar>(total);
    detail::reduce_rows<Scalar>(b, e_count, cache.mean_probability.data(), cache.partials, [&](Index r, Scalar* acc) {
      if (!cache.is_counted[r]) return;
      const Scalar* p = &cache.probs(r, 0);
      for (Index e = 0; e < e_count; ++e) acc[e] += p[e];
    });
    cache.mean_probability /= static_cast<Scalar>(n);
    Scalar sum = 0;
    for (Index e = 0; e < e_count; ++e) sum += cache.routed_fraction[e] * cache.mean_probability[e];
    cache.balance = static_cast<Scalar>(e_count) * sum;
    cache.aux_loss = static_cast<Scalar>(config_.load_balance_weight) * cache.balance;
  }

  MoeConfig config_;
  Linear<Scalar> router_;
  DenseHandle up_weight_, up_bias_, down_weight_, down_bias_;
};

}  // namespace peer

#endif  // PEER_LAYERS_MOE_HPP
