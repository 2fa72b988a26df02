// SPDX-License-Identifier: MIT
#ifndef PEER_NN_LAYER_NORM_HPP
#define PEER_NN_LAYER_NORM_HPP

/// \file
/// Layer normalization within groups of each row (for queries: one group per head, over its Dk values,
/// or per half-query, over Dk / 2), with an elementwise affine map over the whole row (gamma, beta [F]) or
/// one affine map of the group's width shared by every group (gamma, beta [group], as PyTorch's
/// LayerNorm(group) applied to each group). Row-local, so it is causal and batch-independent.
///   xhat = (x - mu_g) * s_g,  s_g = 1 / sqrt(var_g + eps),  y = gamma * xhat + beta;
///   dx = s_g (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)),  dxhat = gamma * dy;
///   shared affine: dgamma[j] = sum over rows and groups of dy * xhat at column g group + j (same for beta).

#include <cmath>
#include <string>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/reduce.hpp"
#include "peer/core/types.hpp"

namespace peer {

template <typename Scalar>
struct LayerNormCache {
  RowMatrix<Scalar> xhat;      // [B, F]
  RowMatrix<Scalar> inv_std;   // [B, F / group]
  RowMatrix<Scalar> partials;  // scratch
  RowMatrix<Scalar> sums;      // [1, 2F] backward's column sums (kept: no allocation per call)
};

/// Layer norm of F = groups * group_size features, registered as "<prefix>weight" and "<prefix>bias" [1, F]
/// (or [1, group_size] with a shared affine map).
template <typename Scalar>
class LayerNorm {
 public:
  using Cache = LayerNormCache<Scalar>;
  static constexpr Index kRowGrain = 64;

  LayerNorm() = default;
  LayerNorm(Index features, Index group_size, double epsilon, bool shared_affine = false)
      : features_(features), group_(group_size), epsilon_(epsilon), shared_(shared_affine) {}

  Index features() const { return features_; }
  Index group_size() const { return group_; }
  /// Width of gamma and beta: F, or group_size when one affine map is shared by the groups.
  Index affine_size() const { return shared_ ? group_ : features_; }

  void register_parameters(ParameterLayout& layout, const std::string& prefix) {
    weight_ = layout.add_dense(prefix + "weight", 1, affine_size());
    bias_ = layout.add_dense(prefix + "bias", 1, affine_size());
  }

  void initialize(Parameters<Scalar>& params) const {
    params.dense(weight_).setOnes();
    params.dense(bias_).setZero();
  }

  /// y = LN(x), x and y [B, F] (y assigned).
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y,
               Cache& cache) const {
    const Index rows = x.rows(), groups = features_ / group_;
    cache.xhat.resize(rows, features_);
    cache.inv_std.resize(rows, groups);
    const auto gamma = params.dense(weight_);
    const auto beta = params.dense(bias_);
    const Scalar eps = static_cast<Scalar>(epsilon_);
    parallel_for(rows, kRowGrain, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        for (Index g = 0; g < groups; ++g) {
          const auto in = x.row(r).segment(g * group_, group_);
          const Scalar mu = in.mean();
          const Scalar var = (in.array() - mu).square().mean();
          const Scalar s = Scalar(1) / std::sqrt(var + eps);
          cache.inv_std(r, g) = s;
          cache.xhat.row(r).segment(g * group_, group_) = ((in.array() - mu) * s).matrix();
        }
        if (!shared_) {
          y.row(r) = (cache.xhat.row(r).array() * gamma.array() + beta.array()).matrix();
          continue;
        }
        for (Index g = 0; g < groups; ++g) {
          y.row(r).segment(g * group_, group_) =
              (cache.xhat.row(r).segment(g * group_, group_).array() * gamma.array() + beta.array()).matrix();
        }
      }
    });
  }

  /// dx += dL/dx, dgamma += sum dy * xhat, dbeta += sum dy.
  void backward(const Parameters<Scalar>& params, Cache& cache, const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> dx,
                Gradients<Scalar>& grads) const {
    const Index rows = dy.rows(), f = features_, groups = features_ / group_;
    RowMatrix<Scalar>& sums = cache.sums;
    sums.resize(1, 2 * f);
    detail::reduce_rows<Scalar>(rows, 2 * f, sums.data(), cache.partials, [&](Index r, Scalar* acc) {
      for (Index j = 0; j < f; ++j) {
        acc[j] += dy(r, j);
        acc[f + j] += dy(r, j) * cache.xhat(r, j);
      }
    });
    if (!shared_) {
      grads.dense(bias_) += sums.leftCols(f);
      grads.dense(weight_) += sums.rightCols(f);
    } else {
      for (Index g = 0; g < groups; ++g) {  // in group order: deterministic
        grads.dense(bias_) += sums.middleCols(g * group_, group_);
        grads.dense(weight_) += sums.middleCols(f + g * group_, group_);
      }
    }
    const auto gamma = params.dense(weight_);
    parallel_for(rows, kRowGrain, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        for (Index g = 0; g < groups; ++g) {
          const Index o = g * group_;
          // dxhat = gamma * dy as an expression (not stored: no allocation).
          const auto dxhat = dy.row(r).segment(o, group_).array() * gamma.row(0).segment(shared_ ? 0 : o, group_).array();
          const auto xh = cache.xhat.row(r).segment(o, group_).array();
          const Scalar mean_d = dxhat.mean();
          const Scalar mean_dx = (dxhat * xh).mean();
          dx.row(r).segment(o, group_).array() += cache.inv_std(r, g) * (dxhat - mean_d - xh * mean_dx);
        }
      }
    });
  }

 private:
  Index features_ = 0;
  Index group_ = 1;
  double epsilon_ = 1e-5;
  bool shared_ = false;
  DenseHandle weight_, bias_;
};

}  // namespace peer

#endif  // PEER_NN_LAYER_NORM_HPP
