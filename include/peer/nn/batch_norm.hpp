// SPDX-License-Identifier: MIT
#ifndef PEER_NN_BATCH_NORM_HPP
#define PEER_NN_BATCH_NORM_HPP

/// \file
/// Batch normalization over the rows of a batch, per feature, with an optional row mask.
///
/// Training: mu and var (biased) over the rows r in U (the unmasked rows, M = |U| >= 2),
///   xhat_r = (x_r - mu) * s,  s = 1 / sqrt(var + eps),  y_r = gamma * xhat_r + beta  for EVERY row r;
///   running_mean <- (1 - m) running_mean + m mu,  running_var <- (1 - m) running_var + m var * M / (M - 1).
/// Evaluation: xhat_r = (x_r - running_mean) / sqrt(running_var + eps).
/// Masked rows are normalized with the statistics of the others but do not change them. Their outputs
/// still depend on the statistics, and the backward pass accounts for that exactly:
///   dxhat_r = gamma * dy_r,  S1 = sum_all dxhat,  S2 = sum_all dxhat * xhat,
///   dx_r = s * dxhat_r - [r in U] (s / M) (S1 + xhat_r * S2)   (training; evaluation keeps s * dxhat_r).

#include <algorithm>
#include <cmath>
#include <string>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/reduce.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// What BatchNorm::forward keeps for backward.
template <typename Scalar>
struct BatchNormCache {
  RowMatrix<Scalar> xhat;       // [B, F]
  RowMatrix<Scalar> inv_std;    // [1, F]
  RowMask mask;                 // [B] rows counted in the statistics (all when no mask was given)
  Index count = 0;              // M
  Mode mode = Mode::kTrain;
  // Scratch, kept so that a step at a batch size seen before allocates nothing: statistics and sums, and
  // the reductions' partials (one per shape: forward [chunks, F], backward [chunks, 2F]).
  RowMatrix<Scalar> mean, var, sums, scale;
  RowMatrix<Scalar> partials, backward_partials;
};

/// Batch normalization of F features, registered as "<prefix>weight", "<prefix>bias" (dense [1, F]) and
/// the buffers "<prefix>running_mean", "<prefix>running_var".
template <typename Scalar>
class BatchNorm {
 public:
  using Cache = BatchNormCache<Scalar>;
  static constexpr Index kRowGrain = 64;

  BatchNorm() = default;
  BatchNorm(Index features, double momentum, double epsilon)
      : features_(features), momentum_(momentum), epsilon_(epsilon) {}

  Index features() const { return features_; }
  double momentum() const { return momentum_; }
  double epsilon() const { return epsilon_; }

  void register_parameters(ParameterLayout& layout, const std::string& prefix) {
    weight_ = layout.add_dense(prefix + "weight", 1, features_);
    bias_ = layout.add_dense(prefix + "bias", 1, features_);
    running_mean_ = layout.add_buffer(prefix + "running_mean", 1, features_);
    running_var_ = layout.add_buffer(prefix + "running_var", 1, features_);
  }

  /// gamma = 1, beta = 0, running mean 0, running variance 1.
  void initialize(Parameters<Scalar>& params) const {
    params.dense(weight_).setOnes();
    params.dense(bias_).setZero();
    params.buffer(running_mean_).setZero();
    params.buffer(running_var_).setOnes();
  }

  /// y = BN(x). x, y [B, F] (y assigned; may not alias x). In training mode the running statistics in
  /// `params` are updated. `mask` (size B) selects the rows that count; null means all rows.
  void forward(Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache,
               Mode mode, const RowMask* mask) const {
    const Index rows = x.rows(), f = features_;
    if (mask != nullptr && mask->size() != rows) {
      detail::throw_invalid("row mask size", mask->size(), "must equal the batch size " + detail::to_text(rows));
    }
    if (mode == Mode::kEval) {
      infer(params, x, y, cache);  // the mask matters to batch statistics only
      return;
    }
    cache.mode = mode;
    cache.xhat.resize(rows, f);
    cache.inv_std.resize(1, f);
    if (mask != nullptr) {
      cache.mask = *mask;
    } else {
      cache.mask.setConstant(rows, true);
    }
    cache.count = cache.mask.count();
    {
      RowMatrix<Scalar>& mean = cache.mean;
      mean.resize(1, f);
      const Index m = cache.count;
      if (m < 2) {
        detail::throw_invalid("BatchNorm (training mode) unmasked rows", m,
                              "must be >= 2: batch statistics need at least two rows");
      }
      const RowMask& keep = cache.mask;
      detail::reduce_rows<Scalar>(rows, f, mean.data(), cache.partials, [&](Index r, Scalar* acc) {
        if (!keep[r]) return;
        for (Index j = 0; j < f; ++j) acc[j] += x(r, j);
      });
      mean /= static_cast<Scalar>(m);
      RowMatrix<Scalar>& var = cache.var;
      var.resize(1, f);
      detail::reduce_rows<Scalar>(rows, f, var.data(), cache.partials, [&](Index r, Scalar* acc) {
        if (!keep[r]) return;
        for (Index j = 0; j < f; ++j) {
          const Scalar d = x(r, j) - mean(0, j);
          acc[j] += d * d;
        }
      });
      var /= static_cast<Scalar>(m);
      cache.inv_std = (var.array() + static_cast<Scalar>(epsilon_)).rsqrt().matrix();
      const Scalar mom = static_cast<Scalar>(momentum_);
      const Scalar unbias = static_cast<Scalar>(m) / static_cast<Scalar>(m - 1);
      auto rm = params.buffer(running_mean_);
      auto rv = params.buffer(running_var_);
      rm = (Scalar(1) - mom) * rm + mom * mean;
      rv = (Scalar(1) - mom) * rv + (mom * unbias) * var;
      normalize(params, x, mean, y, cache);
    }
  }

  /// Inference: y = BN(x) with the running statistics, as forward in Mode::kEval computes it (bit for
  /// bit: the same code), on const parameters. Fills cache.xhat and cache.inv_std; allocates nothing once
  /// the cache has held a batch of this size.
  void infer(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y, Cache& cache) const {
    cache.mode = Mode::kEval;
    cache.xhat.resize(x.rows(), features_);
    cache.inv_std.resize(1, features_);
    eval_statistics(params, cache);
    normalize(params, x, params.buffer(running_mean_), y, cache);
  }

  /// dx += dL/dx (see the file comment), dgamma += sum dy * xhat, dbeta += sum dy.
  void backward(const Parameters<Scalar>& params, Cache& cache, const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> dx,
                Gradients<Scalar>& grads) const {
    const Index rows = dy.rows(), f = features_;
    // sums[0, f) = sum_all dy, sums[f, 2f) = sum_all dy * xhat.
    RowMatrix<Scalar>& sums = cache.sums;
    sums.resize(1, 2 * f);
    detail::reduce_rows<Scalar>(rows, 2 * f, sums.data(), cache.backward_partials, [&](Index r, Scalar* acc) {
      for (Index j = 0; j < f; ++j) {
        acc[j] += dy(r, j);
        acc[f + j] += dy(r, j) * cache.xhat(r, j);
      }
    });
    grads.dense(bias_) += sums.leftCols(f);
    grads.dense(weight_) += sums.rightCols(f);
    const auto gamma = params.dense(weight_);
    const bool train = cache.mode == Mode::kTrain;
    // With S1 = gamma * sum dy and S2 = gamma * sum dy xhat, the stats term is (s / M) gamma (sum dy + xhat sum dy xhat).
    RowMatrix<Scalar>& scale = cache.scale;
    scale = (cache.inv_std.array() * gamma.array()).matrix();  // s * gamma
    const Scalar inv_m = train ? Scalar(1) / static_cast<Scalar>(cache.count) : Scalar(0);
    parallel_for(rows, kRowGrain, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        if (train && cache.mask[r]) {
          dx.row(r).array() += scale.array() * (dy.row(r).array() - inv_m * (sums.leftCols(f).array() +
                                                                            cache.xhat.row(r).array() * sums.rightCols(f).array()));
        } else {
          dx.row(r).array() += scale.array() * dy.row(r).array();
        }
      }
    });
  }

 private:
  void eval_statistics(const Parameters<Scalar>& params, Cache& cache) const {
    cache.inv_std = (params.buffer(running_var_).array() + static_cast<Scalar>(epsilon_)).rsqrt().matrix();
  }

  // xhat_r = (x_r - mean) * inv_std, y_r = gamma * xhat_r + beta, for every row.
  template <typename Mean>
  void normalize(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const Mean& mean, MatrixRef<Scalar> y,
                 Cache& cache) const {
    const auto gamma = params.dense(weight_);
    const auto beta = params.dense(bias_);
    parallel_for(x.rows(), kRowGrain, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        cache.xhat.row(r) = ((x.row(r) - mean).array() * cache.inv_std.array()).matrix();
        y.row(r) = (cache.xhat.row(r).array() * gamma.array() + beta.array()).matrix();
      }
    });
  }

  Index features_ = 0;
  double momentum_ = 0.1;
  double epsilon_ = 1e-5;
  DenseHandle weight_, bias_;
  BufferHandle running_mean_, running_var_;
};

}  // namespace peer

#endif  // PEER_NN_BATCH_NORM_HPP
