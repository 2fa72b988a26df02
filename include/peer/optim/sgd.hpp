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
      parallel_for(spec.size(), 1 << 14, [&](Index b, Index e, int) { update(p, g, buf, b, e, lr, wd, mu); });
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
    const Index cols = this->layout().tables()[t].cols;
    const Scalar mu = static_cast<Scalar>(momentum_);
    Scalar* buf = mu > 0 ? table_buf_[t].data() + row * cols : nullptr;
    update(p, g, buf, 0, cols, this->table_lr(t), this->wd_table(t), mu);
  }

  static void update(Scalar* p, const Scalar* g, Scalar* buf, Index b, Index e, Scalar lr, Scalar wd, Scalar mu) {
    for (Index i = b; i < e; ++i) {
      Scalar d = g[i] + wd * p[i];
      if (buf != nullptr) {
        buf[i] = mu * buf[i] + d;
        d = buf[i];
      }
      p[i] -= lr * d;
    }
  }

  double momentum_;
  AlignedBuffer<Scalar> dense_buf_;
  std::vector<AlignedBuffer<Scalar>> table_buf_;
};

}  // namespace peer

#endif  // PEER_OPTIM_SGD_HPP
