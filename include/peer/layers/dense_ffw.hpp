// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_DENSE_FFW_HPP
#define PEER_LAYERS_DENSE_FFW_HPP

/// \file
/// DenseFfw: the dense feed-forward block a PEER layer replaces, behind the same interface as PeerLayer.
///   plain:  y = W_down sigma(W_up x + b_up) + b_down
///   GLU:    y = W_down (sigma(W_gate x + b_gate) * (W_up x + b_up)) + b_down
/// W_up, W_gate [F, D], W_down [D, F]. Forward assigns y; backward adds into dx and the gradients.

#include <cstdint>
#include <string>

#include "peer/core/error.hpp"
#include "peer/core/fields.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/layer_layout.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/nn/activation.hpp"
#include "peer/nn/linear.hpp"

namespace peer {

/// Whether the hidden layer is gated.
enum class FfwKind { kPlain, kGlu };

struct DenseFfwConfig {
  Index model_dim = 256;   ///< D
  Index hidden_dim = 1024; ///< F (4 D is the usual choice)
  Activation activation = Activation::kGelu;
  FfwKind kind = FfwKind::kPlain;
  Bias bias = Bias::kLearned;

  /// Forward FLOPs per token: 2 D F per projection (2 projections, 3 with GLU), bias and activation left out.
  double forward_flops_per_token() const {
    return 2.0 * static_cast<double>(model_dim) * static_cast<double>(hidden_dim) * (kind == FfwKind::kGlu ? 3 : 2);
  }

  /// The configuration as (key, value) text pairs (checkpoint metadata).
  Fields to_fields() const {
    return {{"model_dim", std::to_string(model_dim)},
            {"hidden_dim", std::to_string(hidden_dim)},
            {"activation", to_string(activation)},
            {"glu", kind == FfwKind::kGlu ? "yes" : "no"},
            {"bias", bias == Bias::kLearned ? "learned" : "none"}};
  }

  void validate() const {
    if (model_dim <= 0) detail::throw_invalid("DenseFfwConfig.model_dim", model_dim, "must be > 0");
    if (hidden_dim <= 0) detail::throw_invalid("DenseFfwConfig.hidden_dim", hidden_dim, "must be > 0");
  }
};

template <typename Scalar>
class DenseFfw : public detail::LayerLayout<DenseFfw<Scalar>, Scalar> {
  using Base = detail::LayerLayout<DenseFfw<Scalar>, Scalar>;
  using Base::check_layout;
  using Base::layout_;

 public:
  struct Cache {
    RowMatrix<Scalar> x;     ///< [B, D] input copy
    RowMatrix<Scalar> up;    ///< [B, F] W_up x + b
    RowMatrix<Scalar> gate;  ///< [B, F] W_gate x + b (GLU)
    RowMatrix<Scalar> act;   ///< [B, F] the down projection's input
    RowMatrix<Scalar> dact, dup, dgate, dx;
    typename Linear<Scalar>::Scratch scratch;
    bool ready = false;
    Index batch() const { return x.rows(); }
  };

  explicit DenseFfw(const DenseFfwConfig& config)
      : config_(checked(config)),
        up_(config.model_dim, config.hidden_dim, config.bias),
        gate_(config.model_dim, config.hidden_dim, config.bias),
        down_(config.hidden_dim, config.model_dim, config.bias) {
    up_.register_parameters(layout_, "ffw.up.");
    if (config_.kind == FfwKind::kGlu) gate_.register_parameters(layout_, "ffw.gate.");
    down_.register_parameters(layout_, "ffw.down.");
  }

  const DenseFfwConfig& config() const { return config_; }

  // ---- Sizes and costs per token, as the product-key layers report them (2 FLOPs per multiply-add) ----

  /// Trained scalars: 2 (3 with GLU) weight matrices of D F, and the biases (F per up/gate, D down).
  Index total_parameters() const { return layout_.num_parameters(); }
  /// Every parameter is active for every token.
  Index active_parameters_per_token() const { return total_parameters(); }
  /// 2 D F per projection (see DenseFfwConfig::forward_flops_per_token).
  double forward_flops_per_token() const { return config_.forward_flops_per_token(); }
  /// Twice the forward: each projection's weight gradient and input gradient (with dx).
  double backward_flops_per_token() const { return 2 * forward_flops_per_token(); }
  /// Bytes of the parameters a token reads: all of them (shared by the batch's tokens, so in cache).
  double parameter_bytes_per_token() const {
    return static_cast<double>(total_parameters()) * static_cast<double>(sizeof(Scalar));
  }


  /// Weights U(+-1/sqrt(fan_in)), biases 0 (as Linear).
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    check_layout(params.layout(), "params");
    up_.initialize(params, seed);
    if (config_.kind == FfwKind::kGlu) gate_.initialize(params, seed);
    down_.initialize(params, seed);
  }

  /// Scratch of infer(), reused: no allocation after the first call at a batch size.
  struct Workspace {
    RowMatrix<Scalar> up, gate, act;  // [B, F] each
  };

  /// y = FFW(x); x, y [B, D] (y may be x). mode and mask are accepted for interface parity and unused
  /// (the block has no batch statistics); parameters are only read.
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache,
               Mode, const RowMask* = nullptr) const {
    check_inputs(params, x, y);
    cache.ready = false;
    cache.x = x;
    compute(params, cache.x, y, cache.up, cache.gate, cache.act);
    cache.ready = true;
  }

  /// Inference: forward() without the backward cache and without copying x (y must not overlap x);
  /// bitwise the same y.
  void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Workspace& ws) const {
    check_inputs(params, x, y);
    detail::check_no_overlap("infer: y", y, "x", x);
    up_.reserve_forward(x.rows());
    if (config_.kind == FfwKind::kGlu) gate_.reserve_forward(x.rows());
    down_.reserve_forward(x.rows());
    compute(params, x, y, ws.up, ws.gate, ws.act);
  }

  /// dx += dL/dx (skipped when dx has 0 rows); gradients added into grads.
  void backward(const Parameters<Scalar>& params, Cache& cache, const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> dx,
                Gradients<Scalar>& grads) const {
    if (!cache.ready) throw std::invalid_argument("DenseFfw::backward: the cache holds no forward pass");
    const Index b = cache.batch(), f = config_.hidden_dim;
    check_layout(params.layout(), "params");
    check_layout(grads.layout(), "grads");
    detail::check_shape("dy", dy.rows(), dy.cols(), b, config_.model_dim);
    if (dx.rows() != 0) detail::check_shape("dx", dx.rows(), dx.cols(), b, config_.model_dim);
    cache.dact.setZero(b, f);
    down_.backward(params, cache.act, dy, cache.dact, grads, cache.scratch);
    const Activation a = config_.activation;
    cache.dx.setZero(b, config_.model_dim);
    if (config_.kind == FfwKind::kGlu) {
      // act = s(g) * u: du = dact * s(g), dg = dact * u * s'(g).
      cache.dup = cache.dact.cwiseProduct(cache.gate.unaryExpr([a](Scalar z) { return activate(a, z); }));
      cache.dgate = cache.dact.cwiseProduct(cache.up).cwiseProduct(
          cache.gate.unaryExpr([a](Scalar z) { return activate_derivative(a, z); }));
      gate_.backward(params, cache.x, cache.dgate, cache.dx, grads, cache.scratch);
    } else {
      cache.dup = cache.dact.cwiseProduct(cache.up.unaryExpr([a](Scalar z) { return activate_derivative(a, z); }));
    }
    up_.backward(params, cache.x, cache.dup, cache.dx, grads, cache.scratch);
    if (dx.rows() != 0) dx += cache.dx;
  }

 private:
  void check_inputs(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const MatrixRef<Scalar>& y) const {
    check_layout(params.layout(), "params");
    detail::check_shape("x", x.rows(), x.cols(), x.rows(), config_.model_dim);
    detail::check_shape("y", y.rows(), y.cols(), x.rows(), config_.model_dim);
    detail::check_finite("x", x);
  }

  // up = W_up x + b, (gate = W_gate x + b), act = sigma(up) or sigma(gate) * up, y = W_down act + b.
  void compute(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, RowMatrix<Scalar>& up,
               RowMatrix<Scalar>& gate, RowMatrix<Scalar>& act) const {
    const Index b = x.rows(), f = config_.hidden_dim;
    up.resize(b, f);
    act.resize(b, f);
    up_.forward(params, x, up);
    const Activation a = config_.activation;
    if (config_.kind == FfwKind::kGlu) {
      gate.resize(b, f);
      gate_.forward(params, x, gate);
      act = gate.unaryExpr([a](Scalar z) { return activate(a, z); }).cwiseProduct(up);
    } else {
      act = up.unaryExpr([a](Scalar z) { return activate(a, z); });
    }
    down_.forward(params, act, y);
  }

  static const DenseFfwConfig& checked(const DenseFfwConfig& c) {
    c.validate();
    return c;
  }

  DenseFfwConfig config_;
  Linear<Scalar> up_, gate_, down_;
};

}  // namespace peer

#endif  // PEER_LAYERS_DENSE_FFW_HPP
