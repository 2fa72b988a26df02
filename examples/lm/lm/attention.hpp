// Causal multi-head self-attention with optional rotary positions.
//
//   [q | k | v] = x W_qkv^T                       W_qkv [3 D, D], no bias; head h uses columns [h dh, (h + 1) dh)
//   q, k <- RoPE(q, k) (rotary positions only)    pairs (j, j + dh / 2) rotated by t theta_j, theta_j = base^(-2 j / dh)
//   P = softmax(q k^T / sqrt(dh) + causal mask)    [T, T] per (sequence, head); P[i, j] = 0 for j > i
//   o = P v;  y = concat_h(o) W_o^T               W_o [D, D], no bias
//
// Queries are processed in tiles of kTile rows; tile r0 only looks at keys [0, r0 + rows), so the upper
// triangle beyond the diagonal tile is never computed. Backward, per (sequence, head), in tile order:
//   dP = dO V^T,  dV += P^T dO,  dS = P * (dP - rowsum(dP * P)),  dQ = dS K / sqrt(dh),  dK += dS^T Q / sqrt(dh).
// Work is split over (sequence, head) pairs, each computed in a fixed order, and the projections use
// peer::Linear: outputs and gradients do not depend on the thread count.
#ifndef PEER_EXAMPLES_LM_ATTENTION_HPP
#define PEER_EXAMPLES_LM_ATTENTION_HPP

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "lm/common.hpp"

namespace lm {

struct AttentionConfig {
  Index model_dim = 128;  ///< D
  Index num_heads = 4;    ///< H; head width dh = D / H (even with rotary positions)
  Index context = 128;    ///< longest sequence T
  PositionKind positions = PositionKind::kLearned;
  double rope_base = 10000.0;

  Index head_dim() const { return model_dim / num_heads; }
  void validate() const {
    if (model_dim <= 0) peer::detail::throw_invalid("AttentionConfig.model_dim", model_dim, "must be > 0");
    if (num_heads <= 0 || model_dim % num_heads != 0) {
      peer::detail::throw_invalid("AttentionConfig.num_heads", num_heads, "must divide model_dim = " + peer::detail::to_text(model_dim));
    }
    if (positions == PositionKind::kRotary && head_dim() % 2 != 0) {
      peer::detail::throw_invalid("AttentionConfig head_dim", head_dim(), "must be even for rotary positions");
    }
    if (context <= 0) peer::detail::throw_invalid("AttentionConfig.context", context, "must be > 0");
  }
};

template <typename Scalar>
class CausalSelfAttention {
 public:
  /// Query rows per causal tile.
  static constexpr Index kTile = 32;

  struct Cache {
    Index batch = 0, seq = 0;
    Mat<Scalar> x;       ///< [B T, D] input
    Mat<Scalar> qkv;     ///< [B T, 3 D]
    Mat<Scalar> q, k, v; ///< [B H T, dh] per (sequence, head), q and k rotated
    Mat<Scalar> p;       ///< [B H T, T] attention weights (entries above the diagonal are not used)
    Mat<Scalar> o;       ///< [B H T, dh]
    Mat<Scalar> merged;  ///< [B T, D] heads concatenated
    // Backward scratch.
    Mat<Scalar> dmerged, dout, dq, dk, dv, dp, dqkv;
    typename peer::Linear<Scalar>::Scratch scratch;
  };

  CausalSelfAttention() = default;
  explicit CausalSelfAttention(const AttentionConfig& config)
      : config_(checked(config)),
        qkv_(config.model_dim, 3 * config.model_dim, peer::Bias::kNone),
        out_(config.model_dim, config.model_dim, peer::Bias::kNone) {
    if (config_.positions == PositionKind::kRotary) {
      const Index half = config_.head_dim() / 2;
      cos_.resize(config_.context, half);
      sin_.resize(config_.context, half);
      for (Index t = 0; t < config_.context; ++t) {
        for (Index j = 0; j < half; ++j) {
          const double theta = std::pow(config_.rope_base, -2.0 * static_cast<double>(j) / static_cast<double>(config_.head_dim()));
          cos_(t, j) = static_cast<Scalar>(std::cos(static_cast<double>(t) * theta));
          sin_(t, j) = static_cast<Scalar>(std::sin(static_cast<double>(t) * theta));
        }
      }
    }
  }

  const AttentionConfig& config() const { return config_; }

  /// Registers "<prefix>qkv.weight" [3 D, D] and "<prefix>out.weight" [D, D].
  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix) {
    qkv_.register_parameters(layout, prefix + "qkv.");
    out_.register_parameters(layout, prefix + "out.");
    out_name_ = prefix + "out.weight";
  }
  /// Both projections U(+-1/sqrt(D)) (peer::Linear); the output projection then scaled by residual_scale
  /// (GPT-2 scales residual projections by 1/sqrt(2 L)).
  void initialize(peer::Parameters<Scalar>& params, std::uint64_t seed, double residual_scale = 1.0) const {
    qkv_.initialize(params, seed);
    out_.initialize(params, seed);
    if (residual_scale != 1.0) params.find(out_name_) *= static_cast<Scalar>(residual_scale);
  }

  /// Forward FLOPs per token for sequences of length T (2 per multiply-add): projections 8 D^2, and
  /// QK^T plus PV over the keys each tile computes, 4 D c_avg.
  double forward_flops_per_token(Index seq) const {
    const double d = static_cast<double>(config_.model_dim);
    return 8 * d * d + 4 * d * mean_keys(seq);
  }
  /// Backward: twice the projections (dx and dW), and dP, dV, dQ, dK, 8 D c_avg.
  double backward_flops_per_token(Index seq) const {
    const double d = static_cast<double>(config_.model_dim);
    return 16 * d * d + 8 * d * mean_keys(seq);
  }
  /// Keys a query row is scored against on average (tiles look at every key up to their last row).
  static double mean_keys(Index seq) {
    double total = 0;
    for (Index r0 = 0; r0 < seq; r0 += kTile) {
      const Index rows = std::min(kTile, seq - r0);
      total += static_cast<double>(rows) * static_cast<double>(r0 + rows);
    }
    return total / static_cast<double>(seq);
  }

  /// y [B T, D] assigned from x [B T, D] = `batch` sequences of `seq` positions (seq <= context).
  void forward(const peer::Parameters<Scalar>& params, const ConstMatRef<Scalar>& x, MatRef<Scalar> y, Index batch, Index seq,
               Cache& cache) const {
    const Index d = config_.model_dim, h_count = config_.num_heads, dh = config_.head_dim();
    if (seq < 1 || seq > config_.context) peer::detail::throw_invalid("attention sequence length", seq, "must be in [1, context]");
    peer::detail::check_shape("attention x", x.rows(), x.cols(), batch * seq, d);
    peer::detail::check_shape("attention y", y.rows(), y.cols(), batch * seq, d);
    cache.batch = batch;
    cache.seq = seq;
    cache.x = x;
    cache.qkv.resize(batch * seq, 3 * d);
    qkv_.forward(params, cache.x, cache.qkv);
    const Index items = batch * h_count;
    cache.q.resize(items * seq, dh);
    cache.k.resize(items * seq, dh);
    cache.v.resize(items * seq, dh);
    cache.p.resize(items * seq, seq);
    cache.o.resize(items * seq, dh);
    cache.merged.resize(batch * seq, d);
    const Scalar alpha = Scalar(1) / std::sqrt(static_cast<Scalar>(dh));
    peer::parallel_for(items, 1, [&](Index i0, Index i1, int) {
      for (Index i = i0; i < i1; ++i) {
        const Index b = i / h_count, h = i % h_count, base = i * seq;
        auto q = cache.q.middleRows(base, seq);
        auto k = cache.k.middleRows(base, seq);
        auto v = cache.v.middleRows(base, seq);
        for (Index t = 0; t < seq; ++t) {
          q.row(t) = cache.qkv.row(b * seq + t).segment(h * dh, dh);
          k.row(t) = cache.qkv.row(b * seq + t).segment(d + h * dh, dh);
          v.row(t) = cache.qkv.row(b * seq + t).segment(2 * d + h * dh, dh);
        }
        if (config_.positions == PositionKind::kRotary) {
          rotate(q, false);
          rotate(k, false);
        }
        auto o = cache.o.middleRows(base, seq);
        for (Index r0 = 0; r0 < seq; r0 += kTile) {
          const Index rows = std::min(kTile, seq - r0), c = r0 + rows;
          auto s = cache.p.block(base + r0, 0, rows, c);
          peer::detail::gemm(q.middleRows(r0, rows), k.topRows(c).transpose(), s, alpha, peer::detail::GemmUpdate::kAssign);
          for (Index r = 0; r < rows; ++r) {
            const Index last = r0 + r;  // keys [0, last] are visible
            Scalar mx = s(r, 0);
            for (Index j = 1; j <= last; ++j) mx = std::max(mx, s(r, j));
            Scalar z = 0;
            for (Index j = 0; j <= last; ++j) {
              s(r, j) = std::exp(s(r, j) - mx);
              z += s(r, j);
            }
            const Scalar inv = Scalar(1) / z;
            for (Index j = 0; j <= last; ++j) s(r, j) *= inv;
            for (Index j = last + 1; j < c; ++j) s(r, j) = 0;
          }
          peer::detail::gemm(s, v.topRows(c), o.middleRows(r0, rows), Scalar(1), peer::detail::GemmUpdate::kAssign);
        }
        for (Index t = 0; t < seq; ++t) cache.merged.row(b * seq + t).segment(h * dh, dh) = o.row(t);
      }
    });
    out_.forward(params, cache.merged, y);
  }

  /// dx += dL/dx; gradients of W_qkv and W_o added into grads.
  void backward(const peer::Parameters<Scalar>& params, Cache& cache, const ConstMatRef<Scalar>& dy, MatRef<Scalar> dx,
                peer::Gradients<Scalar>& grads) const {
    const Index batch = cache.batch, seq = cache.seq, d = config_.model_dim, h_count = config_.num_heads;
    const Index dh = config_.head_dim(), items = batch * h_count;
    peer::detail::check_shape("attention dy", dy.rows(), dy.cols(), batch * seq, d);
    cache.dmerged.setZero(batch * seq, d);
    out_.backward(params, cache.merged, dy, cache.dmerged, grads, cache.scratch);
    cache.dout.resize(items * seq, dh);
    cache.dq.resize(items * seq, dh);
    cache.dk.resize(items * seq, dh);
    cache.dv.resize(items * seq, dh);
    cache.dp.resize(items * seq, seq);
    cache.dqkv.resize(batch * seq, 3 * d);
    const Scalar alpha = Scalar(1) / std::sqrt(static_cast<Scalar>(dh));
    peer::parallel_for(items, 1, [&](Index i0, Index i1, int) {
      for (Index i = i0; i < i1; ++i) {
        const Index b = i / h_count, h = i % h_count, base = i * seq;
        const auto q = cache.q.middleRows(base, seq);
        const auto k = cache.k.middleRows(base, seq);
        const auto v = cache.v.middleRows(base, seq);
        auto dq = cache.dq.middleRows(base, seq);
        auto dk = cache.dk.middleRows(base, seq);
        auto dv = cache.dv.middleRows(base, seq);
        dk.setZero();
        dv.setZero();
        auto dout = cache.dout.middleRows(base, seq);
        for (Index t = 0; t < seq; ++t) dout.row(t) = cache.dmerged.row(b * seq + t).segment(h * dh, dh);
        for (Index r0 = 0; r0 < seq; r0 += kTile) {
          const Index rows = std::min(kTile, seq - r0), c = r0 + rows;
          const auto p = cache.p.block(base + r0, 0, rows, c);
          auto ds = cache.dp.block(base + r0, 0, rows, c);
          const auto dout_tile = dout.middleRows(r0, rows);
          peer::detail::gemm(dout_tile, v.topRows(c).transpose(), ds, Scalar(1), peer::detail::GemmUpdate::kAssign);  // dP
          peer::detail::gemm(p.transpose(), dout_tile, dv.topRows(c), Scalar(1), peer::detail::GemmUpdate::kAccumulate);   // dV += P^T dO
          for (Index r = 0; r < rows; ++r) {
            const Index last = r0 + r;
            Scalar dot = 0;
            for (Index j = 0; j <= last; ++j) dot += ds(r, j) * p(r, j);
            for (Index j = 0; j <= last; ++j) ds(r, j) = p(r, j) * (ds(r, j) - dot);
            for (Index j = last + 1; j < c; ++j) ds(r, j) = 0;
          }
          peer::detail::gemm(ds, k.topRows(c), dq.middleRows(r0, rows), alpha, peer::detail::GemmUpdate::kAssign);       // dQ = dS K a
          peer::detail::gemm(ds.transpose(), q.middleRows(r0, rows), dk.topRows(c), alpha, peer::detail::GemmUpdate::kAccumulate);  // dK += dS^T Q a
        }
        if (config_.positions == PositionKind::kRotary) {
          rotate(dq, true);
          rotate(dk, true);
        }
        for (Index t = 0; t < seq; ++t) {
          auto row = cache.dqkv.row(b * seq + t);
          row.segment(h * dh, dh) = dq.row(t);
          row.segment(d + h * dh, dh) = dk.row(t);
          row.segment(2 * d + h * dh, dh) = dv.row(t);
        }
      }
    });
    qkv_.backward(params, cache.x, cache.dqkv, dx, grads, cache.scratch);
  }

 private:
  static const AttentionConfig& checked(const AttentionConfig& c) {
    c.validate();
    return c;
  }

  /// Rotary positions on rows t = 0.. of m [T, dh]: (a, b) -> (a cos - b sin, a sin + b cos), or its
  /// transpose (the backward) when `inverse`.
  template <typename Block>
  void rotate(Block&& m, bool inverse) const {
    const Index half = config_.head_dim() / 2;
    for (Index t = 0; t < m.rows(); ++t) {
      for (Index j = 0; j < half; ++j) {
        const Scalar a = m(t, j), b = m(t, j + half), c = cos_(t, j), s = inverse ? -sin_(t, j) : sin_(t, j);
        m(t, j) = a * c - b * s;
        m(t, j + half) = a * s + b * c;
      }
    }
  }

  AttentionConfig config_;
  peer::Linear<Scalar> qkv_, out_;
  Mat<Scalar> cos_, sin_;  // [T, dh / 2]
  std::string out_name_;
};

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_ATTENTION_HPP

