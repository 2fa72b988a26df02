// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_ADAM_HPP
#define PEER_OPTIM_ADAM_HPP

/// \file
/// Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), dense and row-sparse ("lazy").
///
/// Dense tensors, at global step t:
///   Adam (L2):   g' = g + wd p                      AdamW (decoupled):  p -= lr wd p,  g' = g
///   m = b1 m + (1 - b1) g',   v = b2 v + (1 - b2) g'^2,
///   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
/// Row-sparse tables (lazy Adam): the same update, applied only to the rows the gradient holds, with a
/// step count t_r PER ROW that advances only when row r is updated. An untouched row keeps its value, its
/// moments and its step bit for bit, and is never read: a step costs O(rows touched * cols), not O(N).
/// Compared with dense Adam on the same table, lazy Adam (1) does not decay the moments of untouched rows
/// and does not move them by their stale momentum, and (2) bias-corrects each row by how often it was
/// updated. With every row touched at every step it is exactly dense Adam (tested bitwise).
/// The moments of a table are stored densely ([N, cols] each, 2x the table): memory is O(N) state, time
/// per step is not.

#include <cmath>
#include <cstdint>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/optim/optimizer_core.hpp"

namespace peer {

/// How weight decay enters Adam.
enum class WeightDecay {
  kL2,         ///< added to the gradient (torch.optim.Adam)
  kDecoupled,  ///< applied to the weights directly (AdamW)
};

struct AdamConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  WeightDecay weight_decay = WeightDecay::kL2;

  /// AdamW's defaults.
  static AdamConfig adamw() { return {0.9, 0.999, 1e-8, WeightDecay::kDecoupled}; }
};

template <typename Scalar>
class Adam : public detail::OptimizerCore<Scalar> {
  using Core = detail::OptimizerCore<Scalar>;

 public:
  Adam(const ParameterLayout& layout, std::vector<ParamGroup> groups, AdamConfig config = AdamConfig())
      : Core(layout, std::move(groups)), config_(config) {
    if (!(config.beta1 >= 0.0 && config.beta1 < 1.0)) detail::throw_invalid("AdamConfig.beta1", config.beta1, "must be in [0, 1)");
    if (!(config.beta2 >= 0.0 && config.beta2 < 1.0)) detail::throw_invalid("AdamConfig.beta2", config.beta2, "must be in [0, 1)");
    if (!(config.epsilon > 0.0)) detail::throw_invalid("AdamConfig.epsilon", config.epsilon, "must be > 0");
    m_dense_ = AlignedBuffer<Scalar>(layout.dense_size());
    v_dense_ = AlignedBuffer<Scalar>(layout.dense_size());
    for (const auto& s : layout.tables()) {
      m_tables_.emplace_back(s.size());
      v_tables_.emplace_back(s.size());
      row_steps_.emplace_back(static_cast<std::size_t>(s.rows), 0);
    }
  }

  const AdamConfig& config() const { return config_; }

  /// One update of every trained tensor from `grads` (which is not changed).
  void step(Parameters<Scalar>& params, const Gradients<Scalar>& grads) {
    this->begin_step(params, grads);
    const auto& layout = this->layout();
    const std::int64_t t = this->steps();
    for (std::size_t i = 0; i < layout.dense().size(); ++i) {
      const auto& spec = layout.dense()[i];
      const Coefficients c = coefficients(this->lr_dense(i), this->wd_dense(i), t);
      Scalar* p = params.dense_data() + spec.offset;
      const Scalar* g = grads.dense_data() + spec.offset;
      Scalar* m = m_dense_.data() + spec.offset;
      Scalar* v = v_dense_.data() + spec.offset;
      parallel_for(spec.size(), 1 << 14, [&](Index b, Index e, int) { update(c, p, g, m, v, b, e); });
    }
    for (std::size_t tb = 0; tb < layout.tables().size(); ++tb) {
      const auto& grad = grads.table(TableHandle{static_cast<int>(tb)});
      const Index cols = layout.tables()[tb].cols;
      const Scalar lr = this->lr_table(tb), wd = this->wd_table(tb);
      std::int64_t* steps = row_steps_[tb].data();
      this->update_table_rows(params, grads, tb, [&](Scalar* p, Index r) {
        const Index row = grad.ids()[static_cast<std::size_t>(r)];
        const Coefficients c = coefficients(lr, wd, ++steps[row]);
        update(c, p, grad.values().row(r).data(), m_tables_[tb].data() + row * cols, v_tables_[tb].data() + row * cols, 0, cols);
      });
    }
  }

  /// Step count of a table's row (lazy Adam), for inspection.
  std::int64_t row_steps(TableHandle h, Index row) const { return row_steps_.at(static_cast<std::size_t>(h.index)).at(static_cast<std::size_t>(row)); }

  std::vector<StateTensor<Scalar>> state_tensors() {
    std::vector<StateTensor<Scalar>> out;
    for (const auto& s : this->layout().dense()) {
      out.push_back({"adam.m." + s.name, s.rows, s.cols, m_dense_.data() + s.offset});
      out.push_back({"adam.v." + s.name, s.rows, s.cols, v_dense_.data() + s.offset});
    }
    for (std::size_t t = 0; t < this->layout().tables().size(); ++t) {
      const auto& s = this->layout().tables()[t];
      out.push_back({"adam.m." + s.name, s.rows, s.cols, m_tables_[t].data()});
      out.push_back({"adam.v." + s.name, s.rows, s.cols, v_tables_[t].data()});
    }
    std::vector<StateCounter> unused;
    this->add_table_state(out, unused);
    return out;
  }
  std::vector<StateCounter> state_counters() {
    std::vector<StateCounter> out{this->step_counter()};
    for (std::size_t t = 0; t < this->layout().tables().size(); ++t) {
      out.push_back({"adam.row_steps." + this->layout().tables()[t].name, static_cast<Index>(row_steps_[t].size()),
                     row_steps_[t].data()});
    }
    std::vector<StateTensor<Scalar>> unused;
    this->add_table_state(unused, out);
    return out;
  }

 private:
  struct Coefficients {
    Scalar lr, wd, b1, b2, eps, inv_c1, inv_c2;
    bool decoupled;
  };

  Coefficients coefficients(Scalar lr, Scalar wd, std::int64_t t) const {
    const double c1 = 1.0 - std::pow(config_.beta1, static_cast<double>(t));
    const double c2 = 1.0 - std::pow(config_.beta2, static_cast<double>(t));
    return {lr, wd, static_cast<Scalar>(config_.beta1), static_cast<Scalar>(config_.beta2), static_cast<Scalar>(config_.epsilon),
            static_cast<Scalar>(1.0 / c1), static_cast<Scalar>(1.0 / c2), config_.weight_decay == WeightDecay::kDecoupled};
  }

  // Elements [b, e) of one tensor, in blocks of kBlock: full blocks in place, the last partial block
  // through a zero-padded copy. Every element thus goes through the same vectorized code whatever the
  // tensor's length or the range's split, so a row of the table and the same values in a dense tensor
  // get bitwise the same update (tested), and the step is vectorized: the plain scalar loop was not
  // (p, g, m, v may alias as far as the compiler knows, and sqrt sets errno), which made the lazy row
  // update compute-bound rather than bound by its memory traffic.
  static constexpr Index kBlock = 16;
  using Block = Eigen::Array<Scalar, kBlock, 1>;

  static void update(const Coefficients& c, Scalar* p, const Scalar* g, Scalar* m, Scalar* v, Index b, Index e) {
    using BlockMap = Eigen::Map<Block>;
    using ConstBlockMap = Eigen::Map<const Block>;
    using Span = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    Index i = b;
    for (; i + kBlock <= e; i += kBlock) update_block(c, BlockMap(p + i), ConstBlockMap(g + i), BlockMap(m + i), BlockMap(v + i));
    if (i == e) return;
    const Index n = e - i;
    Block tp = Block::Zero(), tg = Block::Zero(), tm = Block::Zero(), tv = Block::Zero();
    tp.head(n) = Span(p + i, n);
    tg.head(n) = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(g + i, n);
    tm.head(n) = Span(m + i, n);
    tv.head(n) = Span(v + i, n);
    update_block(c, tp, tg, tm, tv);
    Span(p + i, n) = tp.head(n);
    Span(m + i, n) = tm.head(n);
    Span(v + i, n) = tv.head(n);
  }

  // One block: with decoupled decay p -= lr wd p (AdamW), else g += wd p (L2); then
  // m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p -= lr (m / c1) / (sqrt(v / c2) + eps),
  // with c1 = 1 - b1^t and c2 = 1 - b2^t (inv_c1, inv_c2 their inverses).
  template <typename P, typename G, typename M, typename V>
  static void update_block(const Coefficients& c, P&& p, const G& g, M&& m, V&& v) {
    Block gi = g;
    if (c.decoupled) {
      p -= (c.lr * c.wd) * p;
    } else {
      gi += c.wd * p;
    }
    m = c.b1 * m + (Scalar(1) - c.b1) * gi;
    v = c.b2 * v + ((Scalar(1) - c.b2) * gi) * gi;
    p -= c.lr * (m * c.inv_c1) / ((v * c.inv_c2).sqrt() + c.eps);
  }

  AdamConfig config_;
  AlignedBuffer<Scalar> m_dense_, v_dense_;
  std::vector<AlignedBuffer<Scalar>> m_tables_, v_tables_;
  std::vector<std::vector<std::int64_t>> row_steps_;
};

}  // namespace peer

#endif  // PEER_OPTIM_ADAM_HPP
