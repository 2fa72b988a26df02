// SPDX-License-Identifier: MIT
#ifndef PEER_NN_QUERY_NETWORK_HPP
#define PEER_NN_QUERY_NETWORK_HPP

/// \file
/// The query network q(x) = Norm(W_q x + b): a linear map D -> H * Dk followed by a query normalization.
///
/// The PEER layer takes its query network as a template parameter. Any class with this interface works
/// (for example a small MLP written by the user):
/// \code
///   using ScalarType = ...;                    // float or double
///   struct Cache;                              // default-constructible; what forward keeps for backward
///   Index input_dim() const;                   // D
///   Index output_dim() const;                  // H * Dk, head h's query in columns [h * Dk, (h + 1) * Dk)
///   void register_parameters(ParameterLayout&, const std::string& prefix);
///   void initialize(Parameters<Scalar>&, std::uint64_t seed) const;
///   // q [B, H * Dk] assigned. May update buffers (running statistics) in training mode. mask: rows that
///   // count in batch statistics (null: all).
///   void forward(Parameters<Scalar>&, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> q, Cache&, Mode,
///                const RowMask* mask) const;
///   // Inference: what forward computes in Mode::kEval, bit for bit, on const parameters (nothing written).
///   void infer(const Parameters<Scalar>&, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> q, Cache&) const;
///   // dx += dL/dx, gradients added into grads; x is the input of the matching forward.
///   void backward(const Parameters<Scalar>&, const ConstMatrixRef<Scalar>& x, Cache&,
///                 const ConstMatrixRef<Scalar>& dq, MatrixRef<Scalar> dx, Gradients<Scalar>&) const;
/// \endcode

#include <cstdint>
#include <stdexcept>
#include <string>

#include "peer/core/gradients.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/nn/batch_norm.hpp"
#include "peer/nn/layer_norm.hpp"
#include "peer/nn/linear.hpp"

namespace peer {

/// Normalization applied to the queries.
enum class QueryNorm {
  kBatchNorm,  ///< batch norm over tokens, per query feature (the paper)
  kLayerNorm,  ///< layer norm of each head's query (row-local: causal, batch-independent)
  kNone,       ///< no normalization
  /// layer norm of each half-query (the Dk / 2 values scored against one sub-key set) with one affine map
  /// [Dk / 2] shared by every head and half: lucidrains product-key-memory's LayerNorm(dim_head) (row-local)
  kHalfLayerNorm,
};

inline const char* to_string(QueryNorm n) {
  switch (n) {
    case QueryNorm::kBatchNorm: return "batch_norm";
    case QueryNorm::kLayerNorm: return "layer_norm";
    case QueryNorm::kNone: return "none";
    case QueryNorm::kHalfLayerNorm: return "half_layer_norm";
  }
  return "unknown";
}

/// Parses "batch_norm", "layer_norm", "none" or "half_layer_norm".
inline QueryNorm query_norm_from_string(const std::string& name) {
  for (QueryNorm n : {QueryNorm::kBatchNorm, QueryNorm::kLayerNorm, QueryNorm::kNone, QueryNorm::kHalfLayerNorm}) {
    if (name == to_string(n)) return n;
  }
  throw std::invalid_argument("query_norm = \"" + name + "\" must be one of batch_norm, layer_norm, none, half_layer_norm");
}

/// Shape and options of the default query network.
struct QueryNetworkConfig {
  Index model_dim = 0;  ///< D, the input width
  Index num_heads = 0;  ///< H
  Index key_dim = 0;    ///< Dk, one head's query width
  Bias bias = Bias::kNone;
  QueryNorm norm = QueryNorm::kBatchNorm;
  double momentum = 0.1;  ///< batch norm running-statistics momentum
  double epsilon = 1e-5;  ///< variance epsilon of both norms
};

/// The default query network: Linear(D -> H * Dk) then the chosen QueryNorm. Registers "<prefix>weight",
/// "<prefix>bias" (optional) and "<prefix>norm.*".
template <typename Scalar>
class QueryNetwork {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  using ScalarType = Scalar;

  struct Cache {
    RowMatrix<Scalar> pre;   // [B, H * Dk] linear output (norm input)
    RowMatrix<Scalar> dpre;  // [B, H * Dk] backward scratch
    typename Linear<Scalar>::Scratch linear;
    BatchNormCache<Scalar> batch_norm;
    LayerNormCache<Scalar> layer_norm;
  };

  QueryNetwork() = default;
  explicit QueryNetwork(const QueryNetworkConfig& config)
      : config_(config),
        linear_(config.model_dim, config.num_heads * config.key_dim, config.bias),
        batch_norm_(config.num_heads * config.key_dim, config.momentum, config.epsilon),
        layer_norm_(config.num_heads * config.key_dim, config.norm == QueryNorm::kHalfLayerNorm ? config.key_dim / 2 : config.key_dim,
                    config.epsilon, config.norm == QueryNorm::kHalfLayerNorm) {}

  const QueryNetworkConfig& config() const { return config_; }
  Index input_dim() const { return config_.model_dim; }
  Index output_dim() const { return config_.num_heads * config_.key_dim; }

  void register_parameters(ParameterLayout& layout, const std::string& prefix) {
    linear_.register_parameters(layout, prefix);
    if (config_.norm == QueryNorm::kBatchNorm) batch_norm_.register_parameters(layout, prefix + "norm.");
    if (layer_normed()) layer_norm_.register_parameters(layout, prefix + "norm.");
  }

  /// Linear as documented in linear.hpp; norms start as the identity map (gamma = 1, beta = 0).
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    linear_.initialize(params, seed);
    if (config_.norm == QueryNorm::kBatchNorm) batch_norm_.initialize(params);
    if (layer_normed()) layer_norm_.initialize(params);
  }

  void forward(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> q, Cache& cache,
               Mode mode, const RowMask* mask) const {
    project(params, x, q, cache, [&](const RowMatrix<Scalar>& pre) {
      batch_norm_.forward(params, pre, q, cache.batch_norm, mode, mask);
    });
  }

  /// Mode::kEval's forward on const parameters: the same code, so the same bits. Allocates nothing once
  /// the cache has held a batch of this size.
  void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> q, Cache& cache) const {
    project(params, x, q, cache, [&](const RowMatrix<Scalar>& pre) { batch_norm_.infer(params, pre, q, cache.batch_norm); });
  }

  void backward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, Cache& cache,
                const ConstMatrixRef<Scalar>& dq, MatrixRef<Scalar> dx, Gradients<Scalar>& grads) const {
    if (config_.norm == QueryNorm::kNone) {
      linear_.backward(params, x, dq, dx, grads, cache.linear);
      return;
    }
    cache.dpre.setZero(dq.rows(), output_dim());
    if (config_.norm == QueryNorm::kBatchNorm) {
      batch_norm_.backward(params, cache.batch_norm, dq, cache.dpre, grads);
    } else {
      layer_norm_.backward(params, cache.layer_norm, dq, cache.dpre, grads);
    }
    linear_.backward(params, x, cache.dpre, dx, grads, cache.linear);
  }

 private:
  // q = Norm(W x + b); `batch_norm(pre)` runs the batch norm step (training or inference) on pre = W x + b.
  template <typename BatchNormStep>
  void project(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> q, Cache& cache,
               BatchNormStep&& batch_norm) const {
    if (config_.norm == QueryNorm::kNone) {
      linear_.forward(params, x, q);
      return;
    }
    cache.pre.resize(x.rows(), output_dim());
    linear_.forward(params, x, cache.pre);
    if (config_.norm == QueryNorm::kBatchNorm) {
      batch_norm(cache.pre);
    } else {
      layer_norm_.forward(params, cache.pre, q, cache.layer_norm);
    }
  }

  bool layer_normed() const { return config_.norm == QueryNorm::kLayerNorm || config_.norm == QueryNorm::kHalfLayerNorm; }

  QueryNetworkConfig config_;
  Linear<Scalar> linear_;
  BatchNorm<Scalar> batch_norm_;
  LayerNorm<Scalar> layer_norm_;
};

}  // namespace peer

#endif  // PEER_NN_QUERY_NETWORK_HPP
