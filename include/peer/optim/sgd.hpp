// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_SGD_HPP
#define PEER_OPTIM_SGD_HPP

/// \file
/// SGD with momentum (PyTorch's formulation), dense and row-sparse.
///   g' = g + wd p,   buf = mu buf + g',   p -= lr buf        (mu = 0: p -= lr g')
/// Row-sparse tables apply the same update to the rows the gradient holds and nothing else: an untouched
/// row keeps its value and its momentum buffer bit for bit (lazy momentum). With every row touched at
/// every step this is exactly dense SGD.

#include <cstdint>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/row_blocks.hpp"
#include "peer/optim/optimizer_core.hpp"

namespace peer {

template <typename Scalar>
class Sgd : public detail::OptimizerCore<Scalar> {
  using Core = detail::OptimizerCore<Scalar>;

 public:
  Sgd(const ParameterLayout& layout, std::vector<ParamGroup> groups, double momentum = 0.0)
      : Core(layout, std::move(groups)), momentum_(momentum) {
    if (!(momentum >= 0.0 && momentum < 1.0)) detail::throw_invalid("Sgd momentum", momentum, "must be in [0, 1)");
    for (const auto& g : this->groups()) {
      if (g.table_optimizer != TableOptimizer::kDefault) {
        throw std::invalid_argument("ParamGroup '" + g.name + "'.table_optimizer = " + to_string(g.table_optimizer) +
                                    " needs Adam; Sgd trains tables with SGD only (default)");
      }
      if (g.moment_storage != TableStorage::kNative) {
        throw std::invalid_argument("ParamGroup '" + g.name + "'.moment_storage = bfloat16: Sgd keeps no moments (its momentum buffer is Scalar)");
      }
    }
    if (momentum_ > 0.0) {
      dense_buf_ = AlignedBuffer<Scalar>(layout.dense_size());
      for (const auto& s : layout.tables()) table_buf_.emplace_back(s.size());
    }
  }

  double momentum() const { return momentum_; }

  /// One update of every trained tensor from `grads` (which is not changed).
  void step(Parameters<Scalar>& params, const Gradients<Scalar>& grads) {
    this->begin_step(params, grads);
    const Scalar mu = static_cast<Scalar>(momentum_);
    const auto& layout = this->layout();
    for (std::size_t i = 0; i < layout.dense().size(); ++i) {
      const auto& spec = layout.dense()[i];
      const Scalar lr = this->lr_dense(i), wd = this->wd_dense(i);
      Scalar* p = params.dense_data() + spec.offset;
      const Scalar* g = grads.dense_data() + spec.offset;
      Scalar* buf = mu > 0 ? dense_buf_.data() + spec.offset : nullptr;
      parallel_for(spec.size(), 1 << 14, [&](Index b, Index e, int) {
        detail::NativeRowBlocks<Scalar> row(p);
        update(row, g, buf, b, e, lr, wd, mu);
      });
    }
    this->update_tables(params, grads);
  }

  std::vector<StateTensor<Scalar>> state_tensors() {
    std::vector<StateTensor<Scalar>> out;
    if (momentum_ > 0.0) {
      for (const auto& s : this->layout().dense()) out.push_back({"sgd.momentum." + s.name, s.rows, s.cols, dense_buf_.data() + s.offset, nullptr});
      for (std::size_t t = 0; t < this->layout().tables().size(); ++t) {
        const auto& s = this->layout().tables()[t];
        out.push_back({"sgd.momentum." + s.name, s.rows, s.cols, table_buf_[t].data(), nullptr, true});
      }
    }
    std::vector<StateCounter> unused;
    this->add_table_state(out, unused);
    return out;
  }
  std::vector<StateCounter> state_counters() {
    std::vector<StateCounter> out{this->step_counter()};
    std::vector<StateTensor<Scalar>> unused;
    this->add_table_state(unused, out);
    return out;
  }

 private:
  void update_table_row(std::size_t t, Scalar* p, ExpertId row, const Scalar* g, int) override {
    detail::NativeRowBlocks<Scalar> blocks(p);
    apply_table_rule(t, blocks, row, g);
  }
  // A bf16 row in one pass: each block widened, updated and rounded back (peer/core/row_blocks.hpp).
  void update_bf16_table_row(std::size_t t, detail::Bf16RowBlocks<Scalar>& p, ExpertId row, const Scalar* g, int) override {
    apply_table_rule(t, p, row, g);
  }
  template <typename Row>
  void apply_table_rule(std::size_t t, Row& p, ExpertId row, const Scalar* g) {
    const Index cols = this->layout().tables()[t].cols;
    const Scalar mu = static_cast<Scalar>(momentum_);
    Scalar* buf = mu > 0 ? table_buf_[t].data() + row * cols : nullptr;
    update(p, g, buf, 0, cols, this->table_lr(t), this->wd_table(t), mu);
  }

  // Elements [b, e) in blocks of kBlock through p's Row (load, update, store), the last partial block
  // through a zero-padded copy: every element goes through the same vectorized code whatever the length or
  // the split, so a table row and the same values in a dense tensor get bitwise the same update.
  static constexpr Index kBlock = detail::kRowBlock;
  using Block = Eigen::Array<Scalar, kBlock, 1>;

  template <typename Row>
  static void update(Row& p, const Scalar* g, Scalar* buf, Index b, Index e, Scalar lr, Scalar wd, Scalar mu) {
    using Span = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    using ConstSpan = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    // d = g + wd p; buf = mu buf + d, d = buf (with momentum); p -= lr d.
    const auto block = [&](Block& pi, const Block& gi, Block* bi) {
      Block d = gi + wd * pi;
      if (bi != nullptr) {
        *bi = mu * *bi + d;
        d = *bi;
      }
      pi -= lr * d;
    };
    Index i = b;
    for (; i + kBlock <= e; i += kBlock) {
      Block pi = p.load(i), bi = buf != nullptr ? Block(Eigen::Map<const Block>(buf + i)) : Block::Zero();
      block(pi, Eigen::Map<const Block>(g + i), buf != nullptr ? &bi : nullptr);
      p.store(i, pi);
      if (buf != nullptr) Eigen::Map<Block>(buf + i) = bi;
    }
    if (i == e) return;
    const Index n = e - i;
    Block tp = Block::Zero(), tg = Block::Zero(), tb = Block::Zero();
    for (Index l = 0; l < n; ++l) tp[l] = p.get(i + l);
    tg.head(n) = ConstSpan(g + i, n);
    if (buf != nullptr) tb.head(n) = Span(buf + i, n);
    block(tp, tg, buf != nullptr ? &tb : nullptr);
    for (Index l = 0; l < n; ++l) p.set(i + l, tp[l]);
    if (buf != nullptr) Span(buf + i, n) = tb.head(n);
  }

  double momentum_;
  AlignedBuffer<Scalar> dense_buf_;
  std::vector<AlignedBuffer<Scalar>> table_buf_;
};

}  // namespace peer

#endif  // PEER_OPTIM_SGD_HPP
