// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_OPTIMIZER_CORE_HPP
#define PEER_OPTIM_OPTIMIZER_CORE_HPP

/// \file
/// detail::OptimizerCore: the bookkeeping every optimizer shares (layout, groups, the global step,
/// per-tensor learning rates and weight decays for the current step).

#include <cmath>
#include <cstdint>
#include <memory>
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
    table_step_.assign(layout_.tables().size(), 0);
    table_lr_.assign(layout_.tables().size(), Scalar(0));
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

  /// Fused table updates (opt-in): from now on each backward into `grads` updates every table row as soon
  /// as it has summed the row's gradient, and no table gradient is stored; step(params, grads) then
  /// updates the dense tensors and closes the step. Rows get exactly the update step() would give them
  /// (bitwise: the same sums, the same rule, the same step). Refused on the way, with a message: a second
  /// backward before step() (gradient accumulation, a table shared by two layers), rows added to a table
  /// gradient by other code, a global clip (clip_gradient_norm) and step() with other params or grads.
  /// The optimizer must stay where it is (not be moved) while fused.
  void fuse_table_updates(Parameters<Scalar>& params, Gradients<Scalar>& grads) {
    if (params.layout() != layout_) throw std::invalid_argument("fuse_table_updates: params have a different layout than the optimizer");
    check_writable(params, "fuse_table_updates");
    if (grads.layout() != layout_) throw std::invalid_argument("fuse_table_updates: grads have a different layout than the optimizer");
    unfuse_table_updates();
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      const TableHandle h{static_cast<int>(t)};
      if (!grads.table(h).empty()) {
        throw std::invalid_argument("fuse_table_updates: the gradient of table '" + layout_.tables()[t].name + "' holds rows; call it after zero()");
      }
      sinks_.push_back(std::make_unique<FusedSink>(this, &params, t, layout_.tables()[t].name));
      grads.table(h).set_sink(sinks_.back().get());
    }
    fused_params_ = &params;
    fused_grads_ = &grads;
  }
  /// Back to the ordinary path (table gradients stored, updated in step()).
  void unfuse_table_updates() {
    if (fused_grads_ != nullptr) {
      for (std::size_t t = 0; t < layout_.tables().size(); ++t) fused_grads_->table(TableHandle{static_cast<int>(t)}).set_sink(nullptr);
    }
    sinks_.clear();
    fused_params_ = nullptr;
    fused_grads_ = nullptr;
  }
  bool fused() const { return fused_grads_ != nullptr; }

  virtual ~OptimizerCore() = default;
  OptimizerCore(OptimizerCore&&) noexcept = default;
  OptimizerCore& operator=(OptimizerCore&&) noexcept = default;
  OptimizerCore(const OptimizerCore&) = delete;
  OptimizerCore& operator=(const OptimizerCore&) = delete;

 protected:
  void begin_step(const Parameters<Scalar>& params, const Gradients<Scalar>& grads) {
    if (params.layout() != layout_) throw std::invalid_argument("optimizer: params have a different layout than the optimizer");
    if (grads.layout() != layout_) throw std::invalid_argument("optimizer: grads have a different layout than the optimizer");
    check_writable(params, "step");
    ++step_;
  }
  /// Read-only tables (mapped with MapMode::kReadOnly) are refused before anything changes.
  static void check_writable(const Parameters<Scalar>& params, const char* where) {
    const std::string table = params.read_only_table();
    if (!table.empty()) {
      throw std::invalid_argument(std::string("optimizer: ") + where + ": table '" + table +
                                  "' is read-only (mapped with MapMode::kReadOnly); map it copy-on-write or write-back to train it");
    }
  }
  Scalar lr_dense(std::size_t i) const { return static_cast<Scalar>(learning_rate(static_cast<std::size_t>(assignment_.dense[i]), step_)); }
  Scalar wd_dense(std::size_t i) const { return static_cast<Scalar>(groups_[static_cast<std::size_t>(assignment_.dense[i])].weight_decay); }
  Scalar wd_table(std::size_t t) const { return static_cast<Scalar>(groups_[static_cast<std::size_t>(assignment_.tables[t])].weight_decay); }
  StateCounter step_counter() { return {"optimizer.step", 1, &step_}; }

  /// Each optimizer's rule for one table row: p is row `row` of table t in Scalar (the row itself, its
  /// master, or a widened copy of a bf16 row: write the updated values into it), g its summed gradient,
  /// `thread` < the thread count prepare_table was given. table_lr(t) and rounding_stream(t, row) belong
  /// to the update in progress.
  virtual void update_table_row(std::size_t t, Scalar* p, ExpertId row, const Scalar* g, int thread) = 0;
  /// The same rule on a row stored in bf16, read and rounded back through p block by block (one pass over
  /// the row): bitwise what the rule gives on the widened row, rounded as the table's group asks.
  virtual void update_bf16_table_row(std::size_t t, Bf16RowBlocks<Scalar>& p, ExpertId row, const Scalar* g, int thread) = 0;
  /// Called before a table's rows are updated: per-thread scratch of the optimizer's own.
  virtual void prepare_table(std::size_t /*t*/, int /*threads*/) {}

  /// The table half of step(): every row of every table gradient through update_table_row, in parallel,
  /// written back as the table's storage asks (peer/optim/table_rounding.hpp). Tables whose updates are
  /// fused were updated in the backward already: they only close the step.
  void update_tables(Parameters<Scalar>& params, const Gradients<Scalar>& grads) {
    if (fused() && (&params != fused_params_ || &grads != fused_grads_)) {
      throw std::invalid_argument("optimizer: step() got other params or grads than fuse_table_updates() was given");
    }
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      const TableHandle h{static_cast<int>(t)};
      if (fused()) {
        fused_grads_->table(h).end_fused_step();
        continue;
      }
      auto& table = params.table(h);
      const auto& grad = grads.table(h);
      begin_table(t, step_, table, parallel_threads());
      parallel_for(grad.size(), 64, [&](Index r0, Index r1, int thread) {
        for (Index r = r0; r < r1; ++r) {
          const ExpertId row = grad.ids()[static_cast<std::size_t>(r)];
          const Scalar* g = grad.values().row(r).data();
          writers_[t].update_row(table, row, step_, [&](auto&& p) { apply_rule(t, p, row, g, thread); });
        }
      });
    }
  }
  /// The group table t belongs to.
  const ParamGroup& table_group(std::size_t t) const { return groups_[static_cast<std::size_t>(assignment_.tables[t])]; }
  /// The learning rate of table t's update in progress (its group's, at that update's step).
  Scalar table_lr(std::size_t t) const { return table_lr_[t]; }
  /// The rounding stream of table t's row `row` in the update in progress (columns [0, cols) round the row).
  RoundingStream rounding_stream(std::size_t t, Index row) const { return writers_[t].stream(table_step_[t], row); }

  /// The master rows of bf16 tables trained with kMasterRows, and whether they are filled: optimizer state.
  void add_table_state(std::vector<StateTensor<Scalar>>& tensors, std::vector<StateCounter>& counters) {
    for (std::size_t t = 0; t < writers_.size(); ++t) {
      if (!writers_[t].has_master()) continue;
      const auto& s = layout_.tables()[t];
      tensors.push_back({"bf16.master." + s.name, s.rows, s.cols, writers_[t].master(), nullptr, true});
      counters.push_back({"bf16.master_ready." + s.name, 1, writers_[t].master_ready()});
    }
  }

 private:
  // Starts an update of table t at `step`: its learning rate, the write-back's and the optimizer's scratch.
  void begin_table(std::size_t t, std::int64_t step, const RowTable<Scalar>& table, int threads) {
    table_step_[t] = step;
    table_lr_[t] = static_cast<Scalar>(learning_rate(static_cast<std::size_t>(assignment_.tables[t]), step));
    writers_[t].prepare(table);
    prepare_table(t, threads);
  }

  // The optimizer's rule on a row in Scalar, or on a bf16 row.
  void apply_rule(std::size_t t, Scalar* p, ExpertId row, const Scalar* g, int thread) { update_table_row(t, p, row, g, thread); }
  void apply_rule(std::size_t t, Bf16RowBlocks<Scalar>& p, ExpertId row, const Scalar* g, int thread) {
    update_bf16_table_row(t, p, row, g, thread);
  }

  // What a fused backward hands its rows to: the update step() would make, at the step about to come.
  class FusedSink final : public RowSink<Scalar> {
   public:
    FusedSink(OptimizerCore* core, Parameters<Scalar>* params, std::size_t t, std::string name)
        : core_(core), params_(params), t_(t), name_(std::move(name)) {}
    void prepare(int threads) override {
      core_->begin_table(t_, core_->step_ + 1, params_->table(TableHandle{static_cast<int>(t_)}), threads);
    }
    void update_row(ExpertId row, const Scalar* g, int thread) override {
      auto& table = params_->table(TableHandle{static_cast<int>(t_)});
      core_->writers_[t_].update_row(table, row, core_->table_step_[t_], [&](auto&& p) { core_->apply_rule(t_, p, row, g, thread); });
    }
    // Only bf16 rows: with the one-pass update they measured faster prefetched, while a float table's
    // fused Adam step (row, m and v: three rows) measured slower (docs/benchmarks.md, 2026-12-06).
    void prefetch(ExpertId row) const override {
      const auto& table = params_->table(TableHandle{static_cast<int>(t_)});
      if (table.is_bf16()) table.prefetch(row);
    }
    const std::string& table_name() const override { return name_; }

   private:
    OptimizerCore* core_;
    Parameters<Scalar>* params_;
    std::size_t t_;
    std::string name_;
  };

  ParameterLayout layout_;
  std::vector<ParamGroup> groups_;
  GroupAssignment assignment_;
  std::vector<TableRowWriter<Scalar>> writers_;
  std::vector<std::int64_t> table_step_;
  std::vector<Scalar> table_lr_;
  std::vector<std::unique_ptr<FusedSink>> sinks_;
  Parameters<Scalar>* fused_params_ = nullptr;
  Gradients<Scalar>* fused_grads_ = nullptr;
  std::int64_t step_ = 0;
};

}  // namespace detail
}  // namespace peer

#endif  // PEER_OPTIM_OPTIMIZER_CORE_HPP
