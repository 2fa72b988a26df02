// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_OPTIMIZER_CORE_HPP
#define PEER_OPTIM_OPTIMIZER_CORE_HPP

/// \file
/// detail::OptimizerCore: the bookkeeping every optimizer shares (layout, groups, the global step,
/// per-tensor learning rates and weight decays for the current step).

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peer/core/gradients.hpp"
#include "peer/core/parameters.hpp"
#include "peer/optim/optimizer.hpp"

namespace peer {
namespace detail {

template <typename Scalar>
class OptimizerCore {
 public:
  OptimizerCore(const ParameterLayout& layout, std::vector<ParamGroup> groups)
      : layout_(layout), groups_(std::move(groups)), assignment_(assign_groups(layout_, groups_)) {
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      const auto& group = groups_[static_cast<std::size_t>(assignment_.tables[t])];
      writers_.emplace_back(layout_.tables()[t], group.bf16_rounding, group.rounding_seed);
    }
  }

  const ParameterLayout& layout() const { return layout_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  /// Updates done so far (the step of the last update; 0 before the first).
  std::int64_t steps() const { return step_; }
  /// Group g's learning rate at the step `step` (1-based), schedule included.
  double learning_rate(std::size_t g, std::int64_t step) const {
    return groups_.at(g).learning_rate * groups_.at(g).schedule.factor(step);
  }
  /// Sets group g's base learning rate (the schedule still scales it), for hosts that drive the rate
  /// themselves step by step; validated as at construction.
  void set_learning_rate(std::size_t g, double learning_rate) {
    if (g >= groups_.size()) detail::throw_invalid("optimizer group index", g, "must be < " + detail::to_text(groups_.size()));
    if (!(learning_rate >= 0.0) || !detail::is_finite(learning_rate)) {
      detail::throw_invalid("ParamGroup '" + groups_[g].name + "'.learning_rate", learning_rate, "must be finite and >= 0");
    }
    groups_[g].learning_rate = learning_rate;
  }
  /// Sets group g's weight decay; validated as at construction.
  void set_weight_decay(std::size_t g, double weight_decay) {
    if (g >= groups_.size()) detail::throw_invalid("optimizer group index", g, "must be < " + detail::to_text(groups_.size()));
    if (!(weight_decay >= 0.0) || !detail::is_finite(weight_decay)) {
      detail::throw_invalid("ParamGroup '" + groups_[g].name + "'.weight_decay", weight_decay, "must be finite and >= 0");
    }
    groups_[g].weight_decay = weight_decay;
  }
  /// Index of the group named `name`; throws if there is none.
  std::size_t group_index(const std::string& name) const {
    for (std::size_t g = 0; g < groups_.size(); ++g) if (groups_[g].name == name) return g;
    throw std::invalid_argument("optimizer: no ParamGroup named '" + name + "'");
  }
  /// Group of a tensor by name (-1 if none), for inspection.
  int group_of(const std::string& name) const {
    for (std::size_t i = 0; i < layout_.dense().size(); ++i) if (layout_.dense()[i].name == name) return assignment_.dense[i];
    for (std::size_t i = 0; i < layout_.tables().size(); ++i) if (layout_.tables()[i].name == name) return assignment_.tables[i];
    return -1;
  }

 protected:
  void begin_step(const Parameters<Scalar>& params, const Gradients<Scalar>& grads) {
    if (params.layout() != layout_) throw std::invalid_argument("optimizer: params have a different layout than the optimizer");
    if (grads.layout() != layout_) throw std::invalid_argument("optimizer: grads have a different layout than the optimizer");
    ++step_;
  }
  Scalar lr_dense(std::size_t i) const { return static_cast<Scalar>(learning_rate(static_cast<std::size_t>(assignment_.dense[i]), step_)); }
  Scalar lr_table(std::size_t t) const { return static_cast<Scalar>(learning_rate(static_cast<std::size_t>(assignment_.tables[t]), step_)); }
  Scalar wd_dense(std::size_t i) const { return static_cast<Scalar>(groups_[static_cast<std::size_t>(assignment_.dense[i])].weight_decay); }
  Scalar wd_table(std::size_t t) const { return static_cast<Scalar>(groups_[static_cast<std::size_t>(assignment_.tables[t])].weight_decay); }
  StateCounter step_counter() { return {"optimizer.step", 1, &step_}; }

  /// Calls update(p, r) for every row r of table t's gradient, p being that row in Scalar (a master row,
  /// a widened copy of a bf16 row, or the row itself), and writes bf16 rows back as the table's group
  /// asks (peer/optim/table_rounding.hpp). Rows are updated in parallel.
  template <typename Update>
  void update_table_rows(Parameters<Scalar>& params, const Gradients<Scalar>& grads, std::size_t t, Update&& update) {
    const TableHandle h{static_cast<int>(t)};
    writers_[t].for_each_row(params.table(h), grads.table(h), step_, update);
  }
  /// The master rows of bf16 tables trained with kMasterRows, and whether they are filled: optimizer state.
  void add_table_state(std::vector<StateTensor<Scalar>>& tensors, std::vector<StateCounter>& counters) {
    for (std::size_t t = 0; t < writers_.size(); ++t) {
      if (!writers_[t].has_master()) continue;
      const auto& s = layout_.tables()[t];
      tensors.push_back({"bf16.master." + s.name, s.rows, s.cols, writers_[t].master()});
      counters.push_back({"bf16.master_ready." + s.name, 1, writers_[t].master_ready()});
    }
  }

 private:
  ParameterLayout layout_;
  std::vector<ParamGroup> groups_;
  GroupAssignment assignment_;
  std::vector<TableRowWriter<Scalar>> writers_;
  std::int64_t step_ = 0;
};

}  // namespace detail
}  // namespace peer

#endif  // PEER_OPTIM_OPTIMIZER_CORE_HPP
