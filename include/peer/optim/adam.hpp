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
///
/// Per ParamGroup, a table may keep less state (ParamGroup::table_optimizer, moment_storage), as FBGEMM's
/// table-batched embeddings do; all lazy in the same way, with the same per-row step t_r:
/// - moments in bfloat16 (moment_storage = kBFloat16): the update above computed in Scalar on the widened
///   m and v, both written back with stochastic rounding (unbiased, so v's small per-step changes survive;
///   keyed by the rounding seed, table, step, row and column like the rows themselves). 4 bytes per entry
///   instead of 8.
/// - partial row-wise Adam (kPartialRowWiseAdam): m per entry, one v_r per row,
///     v_r = b2 v_r + (1 - b2) mean_j g'_j^2,   p_j -= lr (m_j / (1 - b1^t_r)) / (sqrt(v_r / (1 - b2^t_r)) + eps)
///   (m in Scalar or bfloat16): 4 or 2 bytes per entry plus 12 per row.
/// - row-wise Adagrad (kRowWiseAdagrad): one accumulator G_r per row, no m, no bias correction,
///     G_r += mean_j g'_j^2,   p_j -= lr g'_j / (sqrt(G_r) + eps)
///   4 bytes per row.
/// Every rule also keeps the 8-byte step count t_r per row.
/// Weight decay enters each of them as in Adam (L2 into g', or decoupled p -= lr wd p first). The means of
/// g'^2 are summed over the row in order (deterministic).

#include <cmath>
#include <cstdint>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/bfloat16.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/row_blocks.hpp"
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
    for (std::size_t t = 0; t < layout.tables().size(); ++t) {
      const auto& s = layout.tables()[t];
      const ParamGroup& g = this->table_group(t);
      TableState st;
      st.rule = g.table_optimizer;
      st.bf16_moments = g.moment_storage == TableStorage::kBFloat16;
      if (st.bf16_moments && st.rule == TableOptimizer::kRowWiseAdagrad) {
        throw std::invalid_argument("ParamGroup '" + g.name + "': moment_storage = bfloat16 has no moments to store with " +
                                    "table_optimizer = row_wise_adagrad (its state is one Scalar per row)");
      }
      const bool has_m = st.rule != TableOptimizer::kRowWiseAdagrad;
      const bool v_per_entry = st.rule == TableOptimizer::kDefault;
      const Index m_size = has_m ? s.size() : 0, v_size = v_per_entry ? s.size() : s.rows;
      if (st.bf16_moments) {
        st.m16 = AlignedBuffer<bfloat16>(m_size);
        st.v16 = AlignedBuffer<bfloat16>(v_per_entry ? v_size : 0);
        if (!v_per_entry) st.v = AlignedBuffer<Scalar>(v_size);
      } else {
        st.m = AlignedBuffer<Scalar>(m_size);
        st.v = AlignedBuffer<Scalar>(v_size);
      }
      tables_.push_back(std::move(st));
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
      parallel_for(spec.size(), 1 << 14, [&](Index b, Index e, int) {
        detail::NativeRowBlocks<Scalar> row(p);
        update(c, row, g, m, v, b, e);
      });
    }
    this->update_tables(params, grads);
  }

  /// Step count of a table's row (lazy Adam), for inspection.
  std::int64_t row_steps(TableHandle h, Index row) const { return row_steps_.at(static_cast<std::size_t>(h.index)).at(static_cast<std::size_t>(row)); }

  std::vector<StateTensor<Scalar>> state_tensors() {
    std::vector<StateTensor<Scalar>> out;
    for (const auto& s : this->layout().dense()) {
      out.push_back({"adam.m." + s.name, s.rows, s.cols, m_dense_.data() + s.offset, nullptr});
      out.push_back({"adam.v." + s.name, s.rows, s.cols, v_dense_.data() + s.offset, nullptr});
    }
    for (std::size_t t = 0; t < this->layout().tables().size(); ++t) {
      const auto& s = this->layout().tables()[t];
      TableState& st = tables_[t];
      if (st.rule != TableOptimizer::kRowWiseAdagrad) {
        out.push_back({"adam.m." + s.name, s.rows, s.cols, st.bf16_moments ? nullptr : st.m.data(),
                       st.bf16_moments ? st.m16.data() : nullptr, true});
      }
      if (st.rule == TableOptimizer::kDefault) {
        out.push_back({"adam.v." + s.name, s.rows, s.cols, st.bf16_moments ? nullptr : st.v.data(),
                       st.bf16_moments ? st.v16.data() : nullptr, true});
      } else if (st.rule == TableOptimizer::kPartialRowWiseAdam) {
        out.push_back({"adam.row_v." + s.name, s.rows, 1, st.v.data(), nullptr, true});
      } else {
        out.push_back({"adagrad.row_sum." + s.name, s.rows, 1, st.v.data(), nullptr, true});
      }
    }
    std::vector<StateCounter> unused;
    this->add_table_state(out, unused);
    return out;
  }
  std::vector<StateCounter> state_counters() {
    std::vector<StateCounter> out{this->step_counter()};
    for (std::size_t t = 0; t < this->layout().tables().size(); ++t) {
      out.push_back({"adam.row_steps." + this->layout().tables()[t].name, static_cast<Index>(row_steps_[t].size()),
                     row_steps_[t].data(), true});
    }
    std::vector<StateTensor<Scalar>> unused;
    this->add_table_state(unused, out);
    return out;
  }

 private:
  void prepare_table(std::size_t tb, int threads) override {
    TableState& st = tables_[tb];
    const std::size_t need = static_cast<std::size_t>(threads) * static_cast<std::size_t>(2 * this->layout().tables()[tb].cols);
    if (st.bf16_moments && st.scratch.size() < need) st.scratch.assign(need, Scalar(0));  // once per thread count
  }

  void update_table_row(std::size_t tb, Scalar* p, ExpertId row, const Scalar* g, int thread) override {
    detail::NativeRowBlocks<Scalar> blocks(p);
    apply_table_rule(tb, blocks, row, g, thread);
  }
  // A bf16 row in one pass: each block widened, updated and rounded back (peer/core/row_blocks.hpp).
  void update_bf16_table_row(std::size_t tb, detail::Bf16RowBlocks<Scalar>& p, ExpertId row, const Scalar* g, int thread) override {
    apply_table_rule(tb, p, row, g, thread);
  }

  // The table rules on one row (see the file comment); row steps are lazy Adam's t_r. p: the row's blocks
  // (NativeRowBlocks or Bf16RowBlocks).
  template <typename Row>
  void apply_table_rule(std::size_t tb, Row& p, ExpertId row, const Scalar* g, int thread) {
    const Index cols = this->layout().tables()[tb].cols;
    TableState& st = tables_[tb];
    const std::int64_t t = ++row_steps_[tb][static_cast<std::size_t>(row)];
    if (st.rule == TableOptimizer::kRowWiseAdagrad) {
      // No bias correction: Adam's two powers per row are not computed.
      const Coefficients c = coefficients(this->table_lr(tb), this->wd_table(tb), t, false);
      update_row_wise_adagrad(c, p, g, st.v.data() + row, cols);
      return;
    }
    const Coefficients c = coefficients(this->table_lr(tb), this->wd_table(tb), t);
    // m (and v) of the row in Scalar: in place, or widened into this thread's scratch.
    Scalar* m = st.bf16_moments ? st.scratch.data() + static_cast<std::size_t>(thread) * static_cast<std::size_t>(2 * cols)
                                : st.m.data() + row * cols;
    Scalar* v = nullptr;
    if (st.bf16_moments) {
      detail::widen_row(st.m16.data() + row * cols, m, cols);
      if (st.rule == TableOptimizer::kDefault) {
        v = m + cols;
        detail::widen_row(st.v16.data() + row * cols, v, cols);
      }
    } else if (st.rule == TableOptimizer::kDefault) {
      v = st.v.data() + row * cols;
    }
    if (st.rule == TableOptimizer::kDefault) {
      update(c, p, g, m, v, 0, cols);
    } else {
      update_partial_row_wise(c, p, g, m, st.v.data() + row, cols);
    }
    if (st.bf16_moments) {
      // Columns [cols, 3 cols) of the row's rounding stream: the parameters use [0, cols).
      const detail::RoundingStream stream = this->rounding_stream(tb, row);
      detail::narrow_row_stochastic(m, st.m16.data() + row * cols, cols, stream, static_cast<std::uint32_t>(cols));
      if (v != nullptr) detail::narrow_row_stochastic(v, st.v16.data() + row * cols, cols, stream, static_cast<std::uint32_t>(2 * cols));
    }
  }

  struct Coefficients {
    Scalar lr, wd, b1, b2, eps, inv_c1, inv_c2;
    bool decoupled;
  };

  // With bias_correction false, inv_c1 and inv_c2 are left at 1 (row-wise Adagrad reads neither).
  Coefficients coefficients(Scalar lr, Scalar wd, std::int64_t t, bool bias_correction = true) const {
    const double c1 = bias_correction ? 1.0 - std::pow(config_.beta1, static_cast<double>(t)) : 1.0;
    const double c2 = bias_correction ? 1.0 - std::pow(config_.beta2, static_cast<double>(t)) : 1.0;
    return {lr, wd, static_cast<Scalar>(config_.beta1), static_cast<Scalar>(config_.beta2), static_cast<Scalar>(config_.epsilon),
            static_cast<Scalar>(1.0 / c1), static_cast<Scalar>(1.0 / c2), config_.weight_decay == WeightDecay::kDecoupled};
  }

  // Elements [b, e) of one tensor, in blocks of kBlock: each full block loaded through p's Row
  // (peer/core/row_blocks.hpp), updated and stored back (a bf16 row is thus widened and rounded in the same
  // pass), the last partial block through a zero-padded copy. Every element thus goes through the same
  // vectorized code whatever the tensor's length or the range's split, so a row of the table and the same
  // values in a dense tensor get bitwise the same update (tested), and the step is vectorized: the plain
  // scalar loop was not (p, g, m, v may alias as far as the compiler knows, and sqrt sets errno), which
  // made the lazy row update compute-bound rather than bound by its memory traffic.
  static constexpr Index kBlock = detail::kRowBlock;
  using Block = Eigen::Array<Scalar, kBlock, 1>;

  template <typename Row>
  static void update(const Coefficients& c, Row& p, const Scalar* g, Scalar* m, Scalar* v, Index b, Index e) {
    using BlockMap = Eigen::Map<Block>;
    using ConstBlockMap = Eigen::Map<const Block>;
    using Span = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    Index i = b;
    for (; i + kBlock <= e; i += kBlock) {
      Block pi = p.load(i);
      update_block(c, pi, ConstBlockMap(g + i), BlockMap(m + i), BlockMap(v + i));
      p.store(i, pi);
    }
    if (i == e) return;
    const Index n = e - i;
    Block tp = Block::Zero(), tg = Block::Zero(), tm = Block::Zero(), tv = Block::Zero();
    for (Index l = 0; l < n; ++l) tp[l] = p.get(i + l);
    tg.head(n) = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(g + i, n);
    tm.head(n) = Span(m + i, n);
    tv.head(n) = Span(v + i, n);
    update_block(c, tp, tg, tm, tv);
    for (Index l = 0; l < n; ++l) p.set(i + l, tp[l]);
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

  // mean_j g'_j^2 of one row (g' = g, plus wd p for L2 decay): blocks of kBlock lanes into four
  // accumulators in turn (four independent FMA chains: one chain waited on the FMA's latency and was a third
  // of the row update), combined as (a0 + a1) + (a2 + a3), the lanes summed as a tree, then the tail. A
  // fixed order whatever the row's alignment, thread or path (fused or not).
  template <typename Row>
  static Scalar mean_square(const Coefficients& c, const Row& p, const Scalar* g, Index cols) {
    using ConstBlockMap = Eigen::Map<const Block>;
    auto square = [&](Index j) {
      Block gj = ConstBlockMap(g + j);
      if (!c.decoupled) gj += c.wd * p.load(j);
      return Block(gj * gj);
    };
    Block acc[4] = {Block::Zero(), Block::Zero(), Block::Zero(), Block::Zero()};
    Index j = 0;
    for (; j + 4 * kBlock <= cols; j += 4 * kBlock) {
      for (int a = 0; a < 4; ++a) acc[a] += square(j + a * kBlock);
    }
    for (int a = 0; j + kBlock <= cols; j += kBlock, ++a) acc[a] += square(j);
    const Block total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    const Eigen::Array<Scalar, kBlock / 2, 1> half = total.template head<kBlock / 2>() + total.template tail<kBlock / 2>();
    const Eigen::Array<Scalar, kBlock / 4, 1> quarter = half.template head<kBlock / 4>() + half.template tail<kBlock / 4>();
    Scalar sum = (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
    for (; j < cols; ++j) {
      const Scalar gj = c.decoupled ? g[j] : g[j] + c.wd * p.get(j);
      sum += gj * gj;
    }
    return sum / static_cast<Scalar>(cols);
  }

  // p_j -= lr step_j / denom for one row, step_j = m_j / c1 with m updated (Adam) or g'_j (Adagrad, m null);
  // decoupled decay first. Blocks of kBlock lanes, then the tail element by element.
  template <typename Row>
  static void apply_row_wise(const Coefficients& c, Row& p, const Scalar* g, Scalar* m, Scalar denom, Index cols) {
    using BlockMap = Eigen::Map<Block>;
    using ConstBlockMap = Eigen::Map<const Block>;
    const Scalar scale = c.lr / denom;
    Index j = 0;
    for (; j + kBlock <= cols; j += kBlock) {
      Block pj = p.load(j);
      Block gj = ConstBlockMap(g + j);
      if (c.decoupled) {
        pj -= (c.lr * c.wd) * pj;
      } else {
        gj += c.wd * pj;
      }
      if (m != nullptr) {
        BlockMap mj(m + j);
        mj = c.b1 * mj + (Scalar(1) - c.b1) * gj;
        pj -= scale * (mj * c.inv_c1);
      } else {
        pj -= scale * gj;
      }
      p.store(j, pj);
    }
    for (; j < cols; ++j) {
      Scalar pj = p.get(j);
      Scalar gj = g[j];
      if (c.decoupled) {
        pj -= (c.lr * c.wd) * pj;
      } else {
        gj += c.wd * pj;
      }
      if (m != nullptr) {
        m[j] = c.b1 * m[j] + (Scalar(1) - c.b1) * gj;
        pj -= scale * (m[j] * c.inv_c1);
      } else {
        pj -= scale * gj;
      }
      p.set(j, pj);
    }
  }

  // Partial row-wise Adam on one row: m per entry, *v_row its one v (see the file comment).
  template <typename Row>
  static void update_partial_row_wise(const Coefficients& c, Row& p, const Scalar* g, Scalar* m, Scalar* v_row, Index cols) {
    *v_row = c.b2 * *v_row + (Scalar(1) - c.b2) * mean_square(c, p, g, cols);
    apply_row_wise(c, p, g, m, std::sqrt(*v_row * c.inv_c2) + c.eps, cols);
  }

  // Row-wise Adagrad on one row: *sum its accumulator of mean squared gradients.
  template <typename Row>
  static void update_row_wise_adagrad(const Coefficients& c, Row& p, const Scalar* g, Scalar* sum, Index cols) {
    *sum += mean_square(c, p, g, cols);
    apply_row_wise(c, p, g, nullptr, std::sqrt(*sum) + c.eps, cols);
  }

  // One table's optimizer state: which rule, and its buffers (only those the rule uses are non-empty).
  struct TableState {
    TableOptimizer rule = TableOptimizer::kDefault;
    bool bf16_moments = false;
    AlignedBuffer<Scalar> m, v;        // m [N, cols]; v [N, cols] (default rule) or [N] (row-wise rules)
    AlignedBuffer<bfloat16> m16, v16;  // the same in bf16
    std::vector<Scalar> scratch;       // per thread: a row's widened m and v
  };

  AdamConfig config_;
  AlignedBuffer<Scalar> m_dense_, v_dense_;
  std::vector<TableState> tables_;
  std::vector<std::vector<std::int64_t>> row_steps_;
};

}  // namespace peer

#endif  // PEER_OPTIM_ADAM_HPP
