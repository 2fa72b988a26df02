// Byte embedding (and learned positions), the output head (tied to the embedding or its own matrix) and the
// softmax cross-entropy loss.
//   x[b T + t] = E[tokens(b, t)] (+ P[t])              E [V, D], P [T, D]
//   logits = h W^T,   W = E (tied) or the head's own [V, D]
//   loss = mean over rows of -log softmax(logits)[target]
#ifndef PEER_EXAMPLES_LM_EMBEDDING_HPP
#define PEER_EXAMPLES_LM_EMBEDDING_HPP

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lm/common.hpp"

namespace lm {

/// Token (and learned position) embedding. Registers "<prefix>tokens" [V, D] and, for learned positions,
/// "<prefix>positions" [T, D]; both N(0, 0.02^2) (GPT-2).
template <typename Scalar>
class Embedding {
 public:
  static constexpr double kInitStd = 0.02;

  Embedding() = default;
  Embedding(Index vocab, Index dim, Index context, PositionKind positions)
      : vocab_(vocab), dim_(dim), context_(context), positions_(positions) {}

  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix) {
    tokens_ = layout.add_dense(prefix + "tokens", vocab_, dim_);
    if (positions_ == PositionKind::kLearned) position_table_ = layout.add_dense(prefix + "positions", context_, dim_);
  }
  void initialize(peer::Parameters<Scalar>& params, std::uint64_t seed) const {
    fill_normal(params, tokens_, kInitStd, seed);
    if (positions_ == PositionKind::kLearned) fill_normal(params, position_table_, kInitStd, seed);
  }
  /// The token table, for a tied output head.
  peer::DenseHandle token_table() const { return tokens_; }

  /// x [B T, D] assigned from tokens [B, T] (T <= context, values in [0, V)).
  void forward(const peer::Parameters<Scalar>& params, const TokenMatrix& tokens, MatRef<Scalar> x) const {
    const Index b = tokens.rows(), t_len = tokens.cols();
    check(tokens);
    peer::detail::check_shape("embedding output", x.rows(), x.cols(), b * t_len, dim_);
    const auto e = params.dense(tokens_);
    peer::parallel_for(b * t_len, 256, [&](Index begin, Index end, int) {
      for (Index r = begin; r < end; ++r) {
        x.row(r) = e.row(tokens(r / t_len, r % t_len));
        if (positions_ == PositionKind::kLearned) x.row(r) += params.dense(position_table_).row(r % t_len);
      }
    });
  }

  /// Scratch for backward: rows grouped by token.
  struct Scratch {
    std::vector<Index> order, begin;
  };

  /// grads += dL/dE (and dL/dP) from dx [B T, D]. Each token row sums its positions in row order and each
  /// position row sums over the batch in order: deterministic for any thread count.
  void backward(const TokenMatrix& tokens, const ConstMatRef<Scalar>& dx, peer::Gradients<Scalar>& grads,
                Scratch& scratch) const {
    const Index b = tokens.rows(), t_len = tokens.cols(), n = b * t_len;
    // Counting sort of the rows by token (stable).
    scratch.begin.assign(static_cast<std::size_t>(vocab_ + 1), 0);
    for (Index r = 0; r < n; ++r) ++scratch.begin[static_cast<std::size_t>(tokens(r / t_len, r % t_len) + 1)];
    for (Index v = 0; v < vocab_; ++v) scratch.begin[static_cast<std::size_t>(v + 1)] += scratch.begin[static_cast<std::size_t>(v)];
    scratch.order.resize(static_cast<std::size_t>(n));
    std::vector<Index> fill(scratch.begin.begin(), scratch.begin.end() - 1);
    for (Index r = 0; r < n; ++r) scratch.order[static_cast<std::size_t>(fill[static_cast<std::size_t>(tokens(r / t_len, r % t_len))]++)] = r;
    auto de = grads.dense(tokens_);
    peer::parallel_for(vocab_, 16, [&](Index v0, Index v1, int) {
      peer::Vector<Scalar> acc(dim_);
      for (Index v = v0; v < v1; ++v) {
        const Index i0 = scratch.begin[static_cast<std::size_t>(v)], i1 = scratch.begin[static_cast<std::size_t>(v + 1)];
        if (i0 == i1) continue;
        acc.setZero();
        for (Index i = i0; i < i1; ++i) acc += dx.row(scratch.order[static_cast<std::size_t>(i)]).transpose();
        de.row(v) += acc.transpose();
      }
    });
    if (positions_ == PositionKind::kLearned) {
      auto dp = grads.dense(position_table_);
      peer::parallel_for(t_len, 16, [&](Index t0, Index t1, int) {
        peer::Vector<Scalar> acc(dim_);
        for (Index t = t0; t < t1; ++t) {
          acc.setZero();
          for (Index s = 0; s < b; ++s) acc += dx.row(s * t_len + t).transpose();
          dp.row(t) += acc.transpose();
        }
      });
    }
  }

 private:
  void check(const TokenMatrix& tokens) const {
    if (tokens.cols() > context_ || tokens.cols() < 1) {
      peer::detail::throw_invalid("sequence length", tokens.cols(), "must be in [1, context = " + peer::detail::to_text(context_) + "]");
    }
    for (Index i = 0; i < tokens.size(); ++i) {
      if (tokens.data()[i] < 0 || tokens.data()[i] >= vocab_) {
        peer::detail::throw_invalid("token", tokens.data()[i], "must be in [0, " + peer::detail::to_text(vocab_) + ")");
      }
    }
  }

  Index vocab_ = 0, dim_ = 0, context_ = 0;
  PositionKind positions_ = PositionKind::kLearned;
  peer::DenseHandle tokens_, position_table_;
};

/// logits = h W^T with W [V, D]: the embedding's token table (tied) or "<prefix>weight" (untied,
/// N(0, 0.02^2)).
template <typename Scalar>
class OutputHead {
 public:
  static constexpr Index kRowGrain = 64;

  OutputHead() = default;
  OutputHead(Index dim, Index vocab, bool tied) : dim_(dim), vocab_(vocab), tied_(tied) {}

  bool tied() const { return tied_; }

  /// Untied: registers "<prefix>weight"; tied: uses `tied_table` (the embedding's [V, D] tokens).
  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix, peer::DenseHandle tied_table) {
    weight_ = tied_ ? tied_table : layout.add_dense(prefix + "weight", vocab_, dim_);
  }
  void initialize(peer::Parameters<Scalar>& params, std::uint64_t seed) const {
    if (!tied_) fill_normal(params, weight_, 0.02, seed);
  }

  /// logits [N, V] assigned from h [N, D].
  void forward(const peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& h, MatRef<Scalar> logits) const {
    const auto w = params.dense(weight_);
    peer::parallel_for(h.rows(), kRowGrain, [&](Index begin, Index end, int) {
      peer::detail::gemm(h.middleRows(begin, end - begin), w.transpose(), logits.middleRows(begin, end - begin), Scalar(1), peer::detail::GemmUpdate::kAssign);
    });
  }

  struct Scratch {
    Mat<Scalar> dh, dw;
  };

  /// dh += dlogits W; dW += dlogits^T h (rows of W split over vocabulary chunks, each one GEMM over all rows).
  void backward(const peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& h, const ConstMatRef<Scalar>& dlogits,
                MatRef<Scalar> dh, peer::Gradients<Scalar>& grads, Scratch& scratch) const {
    const auto w = params.dense(weight_);
    scratch.dh.resize(h.rows(), dim_);
    peer::parallel_for(h.rows(), kRowGrain, [&](Index begin, Index end, int) {
      auto rows = scratch.dh.middleRows(begin, end - begin);
      peer::detail::gemm(dlogits.middleRows(begin, end - begin), w, rows, Scalar(1), peer::detail::GemmUpdate::kAssign);
      dh.middleRows(begin, end - begin) += rows;
    });
    scratch.dw.resize(vocab_, dim_);
    peer::parallel_for(vocab_, 32, [&](Index begin, Index end, int) {
      auto rows = scratch.dw.middleRows(begin, end - begin);
      peer::detail::gemm(dlogits.middleCols(begin, end - begin).transpose(), h, rows, Scalar(1), peer::detail::GemmUpdate::kAssign);
    });
    grads.dense(weight_) += scratch.dw;
  }

 private:
  Index dim_ = 0, vocab_ = 0;
  bool tied_ = true;
  peer::DenseHandle weight_;
};

/// Softmax cross-entropy of each row of logits [N, V] against targets (N values, row-major [B, T]).
/// Writes dlogits = (softmax - onehot) * grad_scale (when dlogits is not null) and returns the SUM of the N
/// losses (in double, summed in row order). Rows are independent: deterministic for any thread count.
template <typename Scalar>
double softmax_cross_entropy(const ConstMatRef<Scalar>& logits, const TokenMatrix& targets, Mat<Scalar>* dlogits,
                             Scalar grad_scale, std::vector<double>& row_loss) {
  const Index n = logits.rows(), v = logits.cols();
  if (targets.size() != n) peer::detail::throw_invalid("targets.size()", targets.size(), "must equal the logits' rows " + peer::detail::to_text(n));
  if (dlogits != nullptr) dlogits->resize(n, v);
  row_loss.resize(static_cast<std::size_t>(n));
  peer::parallel_for(n, 64, [&](Index begin, Index end, int) {
    for (Index r = begin; r < end; ++r) {
      const auto row = logits.row(r);
      const Scalar mx = row.maxCoeff();
      Scalar z = 0;
      for (Index j = 0; j < v; ++j) z += std::exp(row(j) - mx);
      const Index y = targets.data()[r];
      row_loss[static_cast<std::size_t>(r)] = static_cast<double>(std::log(z) - (row(y) - mx));
      if (dlogits != nullptr) {
        auto d = dlogits->row(r);
        const Scalar scale = grad_scale / z;
        for (Index j = 0; j < v; ++j) d(j) = std::exp(row(j) - mx) * scale;
        d(y) -= grad_scale;
      }
    }
  });
  double total = 0;
  for (double l : row_loss) total += l;
  return total;
}

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_EMBEDDING_HPP
