// SPDX-License-Identifier: MIT
#ifndef PEER_NN_LINEAR_HPP
#define PEER_NN_LINEAR_HPP

/// \file
/// Linear: y = x W^T + b, with W [out, in] (the PyTorch convention) and an optional bias [1, out].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "peer/core/error.hpp"
#include "peer/core/gemm.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/reduce.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// Whether a linear map has a bias.
enum class Bias { kNone, kLearned };

/// A dense linear map, registered into a layer's layout as "<prefix>weight" and "<prefix>bias".
template <typename Scalar>
class Linear {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  /// Rows per parallel chunk of forward and of the input gradient.
  static constexpr Index kFeatureGrain = 64;  // dW rows per chunk of backward
  static constexpr Index kRowGrain = 64;

  Linear() = default;
  Linear(Index in_dim, Index out_dim, Bias bias) : in_(in_dim), out_(out_dim), bias_(bias) {}

  Index in_dim() const { return in_; }
  Index out_dim() const { return out_; }
  bool has_bias() const { return bias_ == Bias::kLearned; }

  void register_parameters(ParameterLayout& layout, const std::string& prefix) {
    weight_ = layout.add_dense(prefix + "weight", out_, in_);
    if (has_bias()) bias_handle_ = layout.add_dense(prefix + "bias", 1, out_);
  }

  /// W ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's default bound for Linear), b = 0.
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    const CounterRng rng(seed, stream_of(params.layout().spec(weight_).name));
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
    auto w = params.dense(weight_);
    for (Index i = 0; i < w.size(); ++i) {
      w.data()[i] = static_cast<Scalar>(rng.uniform(static_cast<std::uint64_t>(i), -bound, bound));
    }
    if (has_bias()) params.dense(bias_handle_).setZero();
  }

  /// Makes forward on `rows` rows allocation-free on every thread (see detail::reserve_gemm).
  void reserve_forward(Index rows) const {
    const Index full = std::min(rows, kRowGrain), last = rows % kRowGrain;
    detail::reserve_gemm<Scalar>({{full, out_, in_}, {last, out_, in_}});
  }

  /// Makes backward on `rows` rows allocation-free on every thread: dx's row chunks and dW's feature chunks.
  void reserve_backward(Index rows) const {
    const Index full = std::min(rows, kRowGrain), last = rows % kRowGrain;
    const Index features = std::min(out_, kFeatureGrain), last_features = out_ % kFeatureGrain;
    detail::reserve_gemm<Scalar>({{full, in_, out_}, {last, in_, out_}, {features, in_, rows}, {last_features, in_, rows}});
  }

  /// y = x W^T + b. x [B, in], y [B, out] (assigned).
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> y) const {
    reserve_forward(x.rows());
    const auto w = params.dense(weight_);
    parallel_for(x.rows(), kRowGrain, [&](Index begin, Index end, int) {
      auto rows = y.middleRows(begin, end - begin);
      detail::gemm(x.middleRows(begin, end - begin), w.transpose(), rows, Scalar(1), detail::GemmUpdate::kAssign);
      if (has_bias()) rows.rowwise() += params.dense(bias_handle_).row(0);
    });
  }

  /// Scratch for backward, reused across calls.
  struct Scratch {
    RowMatrix<Scalar> dx, dw, partials;
    Vector<Scalar> total;
  };

  /// dx += dy W (skipped when dx has no rows), dW += dy^T x, db += column sums of dy. Each delta is
  /// computed in full first and then added once, so a pre-filled gradient G ends as exactly G + delta.
  void backward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstMatrixRef<Scalar>& dy,
                MatrixRef<Scalar> dx, Gradients<Scalar>& grads, Scratch& scratch) const {
    reserve_backward(dy.rows());
    const auto w = params.dense(weight_);
    if (dx.rows() > 0) {
      scratch.dx.resize(dy.rows(), in_);
      parallel_for(dy.rows(), kRowGrain, [&](Index begin, Index end, int) {
        auto rows = scratch.dx.middleRows(begin, end - begin);
        detail::gemm(dy.middleRows(begin, end - begin), w, rows, Scalar(1), detail::GemmUpdate::kAssign);
        dx.middleRows(begin, end - begin) += rows;
      });
    }
    // dW rows are independent: split over output features; each row sums over all tokens in one GEMM.
    scratch.dw.resize(out_, in_);
    parallel_for(out_, kFeatureGrain, [&](Index begin, Index end, int) {
      auto rows = scratch.dw.middleRows(begin, end - begin);
      detail::gemm(dy.middleCols(begin, end - begin).transpose(), x, rows, Scalar(1), detail::GemmUpdate::kAssign);
    });
    grads.dense(weight_) += scratch.dw;
    if (has_bias()) {
      Vector<Scalar>& total = scratch.total;
      total.resize(out_);
      detail::reduce_rows<Scalar>(dy.rows(), out_, total.data(), scratch.partials, [&](Index r, Scalar* acc) {
        for (Index j = 0; j < out_; ++j) acc[j] += dy(r, j);
      });
      grads.dense(bias_handle_).row(0) += total.transpose();
    }
  }

 private:
  Index in_ = 0;
  Index out_ = 0;
  Bias bias_ = Bias::kNone;
  DenseHandle weight_, bias_handle_;
};

}  // namespace peer

#endif  // PEER_NN_LINEAR_HPP
