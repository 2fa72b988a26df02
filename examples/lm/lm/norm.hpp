// Pre-norms of the transformer: RMSNorm (written here) and LayerNorm (peer::LayerNorm over the whole row),
// behind one Norm type chosen at run time.
//   RMSNorm:   xhat = x s,  s = (mean(x^2) + eps)^(-1/2),  y = g * xhat
//              dx = s (dxhat - xhat mean(dxhat * xhat)),  dxhat = g * dy,  dg = sum over rows of dy * xhat
//   LayerNorm: xhat = (x - mean(x)) s,  s = (var(x) + eps)^(-1/2),  y = g * xhat + b  (see peer/nn/layer_norm.hpp)
// Both are row-local, so they never mix positions.
#ifndef PEER_EXAMPLES_LM_NORM_HPP
#define PEER_EXAMPLES_LM_NORM_HPP

#include <cmath>
#include <string>

#include "lm/common.hpp"

namespace lm {

template <typename Scalar>
class RmsNorm {
 public:
  struct Cache {
    Mat<Scalar> xhat;                 ///< [N, D]
    peer::Vector<Scalar> inv_rms;     ///< [N]
    Mat<Scalar> partials;             ///< reduction scratch
  };
  static constexpr Index kRowGrain = 64;

  RmsNorm() = default;
  RmsNorm(Index dim, double epsilon) : dim_(dim), epsilon_(epsilon) {}

  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix) {
    weight_ = layout.add_dense(prefix + "weight", 1, dim_);
  }
  void initialize(peer::Parameters<Scalar>& params) const { params.dense(weight_).setOnes(); }

  /// y = g * x / rms(x); x, y [N, D], y assigned (must not alias x).
  void forward(const peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& x, MatRef<Scalar> y, Cache& cache) const {
    const Index rows = x.rows();
    cache.xhat.resize(rows, dim_);
    cache.inv_rms.resize(rows);
    const auto g = params.dense(weight_);
    const Scalar eps = static_cast<Scalar>(epsilon_), inv_d = Scalar(1) / static_cast<Scalar>(dim_);
    peer::parallel_for(rows, kRowGrain, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        const Scalar s = Scalar(1) / std::sqrt(x.row(r).squaredNorm() * inv_d + eps);
        cache.inv_rms[r] = s;
        cache.xhat.row(r) = x.row(r) * s;
        y.row(r) = cache.xhat.row(r).cwiseProduct(g.row(0));
      }
    });
  }

  /// dx += dL/dx; dg added into grads.
  void backward(const peer::Parameters<Scalar>& params, Cache& cache, const ConstMatRef<Scalar>& dy, MatRef<Scalar> dx,
                peer::Gradients<Scalar>& grads) const {
    const Index rows = dy.rows();
    peer::Vector<Scalar> dg(dim_);
    peer::detail::reduce_rows<Scalar>(rows, dim_, dg.data(), cache.partials, [&](Index r, Scalar* acc) {
      for (Index j = 0; j < dim_; ++j) acc[j] += dy(r, j) * cache.xhat(r, j);
    });
    grads.dense(weight_).row(0) += dg.transpose();
    const auto g = params.dense(weight_);
    const Scalar inv_d = Scalar(1) / static_cast<Scalar>(dim_);
    peer::parallel_for(rows, kRowGrain, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        Scalar dot = 0;
        for (Index j = 0; j < dim_; ++j) dot += dy(r, j) * g(0, j) * cache.xhat(r, j);
        const Scalar mean = dot * inv_d, s = cache.inv_rms[r];
        for (Index j = 0; j < dim_; ++j) dx(r, j) += s * (dy(r, j) * g(0, j) - cache.xhat(r, j) * mean);
      }
    });
  }

 private:
  Index dim_ = 0;
  double epsilon_ = 1e-5;
  peer::DenseHandle weight_;
};

/// RMSNorm or LayerNorm over rows of D, registered as "<prefix>weight" (and "<prefix>bias" for LayerNorm).
template <typename Scalar>
class Norm {
 public:
  struct Cache {
    typename RmsNorm<Scalar>::Cache rms;
    peer::LayerNormCache<Scalar> layer;
  };

  Norm() = default;
  Norm(NormKind kind, Index dim, double epsilon) : kind_(kind), rms_(dim, epsilon), layer_(dim, dim, epsilon) {}

  NormKind kind() const { return kind_; }

  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix) {
    if (kind_ == NormKind::kRms) {
      rms_.register_parameters(layout, prefix);
    } else {
      layer_.register_parameters(layout, prefix);
    }
  }
  void initialize(peer::Parameters<Scalar>& params) const {
    if (kind_ == NormKind::kRms) {
      rms_.initialize(params);
    } else {
      layer_.initialize(params);
    }
  }
  /// y = Norm(x), y assigned.
  void forward(const peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& x, MatRef<Scalar> y, Cache& cache) const {
    if (kind_ == NormKind::kRms) {
      rms_.forward(params, x, y, cache.rms);
    } else {
      layer_.forward(params, x, y, cache.layer);
    }
  }
  /// dx += dL/dx, parameter gradients added.
  void backward(const peer::Parameters<Scalar>& params, Cache& cache, const ConstMatRef<Scalar>& dy, MatRef<Scalar> dx,
                peer::Gradients<Scalar>& grads) const {
    if (kind_ == NormKind::kRms) {
      rms_.backward(params, cache.rms, dy, dx, grads);
    } else {
      layer_.backward(params, cache.layer, dy, dx, grads);
    }
  }

 private:
  NormKind kind_ = NormKind::kRms;
  RmsNorm<Scalar> rms_;
  peer::LayerNorm<Scalar> layer_;
};

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_NORM_HPP
