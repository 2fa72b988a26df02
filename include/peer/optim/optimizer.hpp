// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_OPTIMIZER_HPP
#define PEER_OPTIM_OPTIMIZER_HPP

/// \file
/// What every optimizer shares: parameter groups (a learning rate, weight decay and schedule per group of
/// tensors), gradient clipping by global norm, and the named state tensors that checkpoints save.
/// Optimizer state lives in the optimizer, apart from the parameters (as ensmallen does); a step never
/// hides inside a backward pass.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/types.hpp"
#include "peer/optim/schedule.hpp"
#include "peer/optim/table_rounding.hpp"

namespace peer {

/// Which kinds of tensor a ParamGroup takes.
enum class GroupKinds {
  kAll,     ///< dense tensors and tables
  kDense,   ///< dense tensors only
  kTables,  ///< row-sparse tables only (expert tables, memory values)
};

/// The rule a group's tables are trained with (FBGEMM's names; peer/optim/adam.hpp gives the equations).
enum class TableOptimizer : std::uint8_t {
  kDefault = 0,             ///< the optimizer's own rule (Adam: m and v per entry; Sgd: SGD)
  kPartialRowWiseAdam = 1,  ///< Adam with m per entry and ONE v per row (the mean of the row's g^2); Adam only
  kRowWiseAdagrad = 2,      ///< Adagrad with one accumulator per row (the mean of the row's g^2); Adam only
};

inline const char* to_string(TableOptimizer t) {
  switch (t) {
    case TableOptimizer::kDefault: return "default";
    case TableOptimizer::kPartialRowWiseAdam: return "partial_row_wise_adam";
    case TableOptimizer::kRowWiseAdagrad: return "row_wise_adagrad";
  }
  return "unknown";
}

/// A group of tensors trained with the same settings. A tensor belongs to the first group whose `kinds`
/// admit it and one of whose `prefixes` matches its name. A pattern without '*' matches the names it is
/// a prefix of ("" matches every name); a pattern with '*' matches whole names, '*' standing for any run
/// of characters, dots included ("blocks.*.ffn.experts", "*.norm.*").
struct ParamGroup {
  std::string name;
  std::vector<std::string> prefixes;
  double learning_rate = 1e-3;
  double weight_decay = 0.0;
  LrSchedule schedule;
  GroupKinds kinds = GroupKinds::kAll;
  /// Tables stored as bfloat16: how updated rows are written back (peer/optim/table_rounding.hpp), and
  /// the seed of the stochastic rounding's random stream.
  Bf16Rounding bf16_rounding = Bf16Rounding::kStochastic;
  std::uint64_t rounding_seed = 0;
  /// Tables: the update rule, and how Adam's per-entry moments are stored (kBFloat16: half the bytes,
  /// written back with stochastic rounding keyed like the rows'). Dense tensors are not affected.
  TableOptimizer table_optimizer = TableOptimizer::kDefault;
  TableStorage moment_storage = TableStorage::kNative;
};

/// The usual split for memory layers (PKM, Memory Layers at Scale): every row-sparse table (PEER's
/// "experts", a product-key memory's "values", in one layer or in every layer of a model) with its own,
/// constant learning rate (1e-3 with Adam), everything else with `dense_lr` and `dense_schedule`.
inline std::vector<ParamGroup> default_param_groups(double dense_lr, LrSchedule dense_schedule = LrSchedule(),
                                                     double expert_lr = 1e-3, double dense_weight_decay = 0.0) {
  return {ParamGroup{"experts", {""}, expert_lr, 0.0, LrSchedule(), GroupKinds::kTables},
          ParamGroup{"dense", {""}, dense_lr, dense_weight_decay, dense_schedule, GroupKinds::kAll}};
}

/// Whether `name` matches a ParamGroup pattern (see ParamGroup).
inline bool matches_pattern(const std::string& pattern, const std::string& name) {
  if (pattern.find('*') == std::string::npos) return name.compare(0, pattern.size(), pattern) == 0;
  // Glob with '*' only: greedy match with backtracking to the last star, O(|pattern| |name|).
  std::size_t p = 0, n = 0, star = std::string::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

/// A named state tensor of an optimizer (moments, momentum buffers), for checkpoints.
template <typename Scalar>
struct StateTensor {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  Scalar* data = nullptr;
  bfloat16* bf16 = nullptr;  ///< instead of data, for state stored as bfloat16
  bool per_row = false;      ///< one row per row of its table (moments, row-wise sums): split with a sharded table
};

/// A named array of step counters (the global step, per-row steps of lazy Adam), for checkpoints.
struct StateCounter {
  std::string name;
  Index size = 0;
  std::int64_t* data = nullptr;
  bool per_row = false;  ///< one count per row of its table (lazy Adam's row steps): split with a sharded table
};

namespace detail {

// The tensor of `layout` a state entry named "<kind>.<tensor name>" belongs to: the longest tensor name
// the entry's name ends with after a '.', or "" when none.
inline std::string state_owner(const ParameterLayout& layout, const std::string& name) {
  std::string best;
  for (const auto* list : {&layout.dense(), &layout.tables()}) {
    for (const auto& s : *list) {
      const std::size_t n = s.name.size();
      if (n >= name.size() || n <= best.size()) continue;
      if (name.compare(name.size() - n, n, s.name) == 0 && name[name.size() - n - 1] == '.') best = s.name;
    }
  }
  return best;
}

/// Group index of every dense tensor and every table of `layout`; throws if a tensor matches no group.
struct GroupAssignment {
  std::vector<int> dense, tables;
};

inline GroupAssignment assign_groups(const ParameterLayout& layout, const std::vector<ParamGroup>& groups) {
  if (groups.empty()) throw std::invalid_argument("optimizer: at least one ParamGroup is needed");
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const std::string where = "ParamGroup '" + groups[g].name + "'";
    if (!(groups[g].learning_rate >= 0.0) || !detail::is_finite(groups[g].learning_rate)) {
      throw_invalid(where + ".learning_rate", groups[g].learning_rate, "must be finite and >= 0");
    }
    if (!(groups[g].weight_decay >= 0.0) || !detail::is_finite(groups[g].weight_decay)) {
      throw_invalid(where + ".weight_decay", groups[g].weight_decay, "must be finite and >= 0");
    }
    groups[g].schedule.validate(where + ".schedule");
  }
  auto find = [&](const std::string& name, bool table) {
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const GroupKinds k = groups[g].kinds;
      if ((table && k == GroupKinds::kDense) || (!table && k == GroupKinds::kTables)) continue;
      for (const auto& p : groups[g].prefixes) {
        if (matches_pattern(p, name)) return static_cast<int>(g);
      }
    }
    throw std::invalid_argument("optimizer: tensor '" + name + "' belongs to no ParamGroup (add a group with prefix \"\")");
  };
  GroupAssignment a;
  for (const auto& s : layout.dense()) a.dense.push_back(find(s.name, false));
  for (const auto& s : layout.tables()) a.tables.push_back(find(s.name, true));
  return a;
}

/// sum of x_i^2 over n values, accumulated in double in index order.
template <typename Scalar>
double sum_of_squares(const Scalar* x, Index n) {
  double sum = 0.0;
  for (Index i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return sum;
}

/// Every gradient (dense and the stored table rows) times `scale`.
template <typename Scalar>
void scale_gradients(Gradients<Scalar>& grads, Scalar scale) {
  Scalar* d = grads.dense_data();
  for (Index i = 0; i < grads.layout().dense_size(); ++i) d[i] *= scale;
  for (std::size_t t = 0; t < grads.layout().tables().size(); ++t) grads.table(TableHandle{static_cast<int>(t)}).values() *= scale;
}

}  // namespace detail

/// Global L2 norm of all gradients: dense ones and the stored rows of row-sparse ones (each row is stored
/// once, so duplicates from several tokens are already summed). Accumulated in double, in a fixed order.
/// Throws std::logic_error for a table whose updates are fused into the backward: its gradient never
/// exists, so no global norm can include it.
template <typename Scalar>
double gradient_norm(const Gradients<Scalar>& grads) {
  for (std::size_t t = 0; t < grads.layout().tables().size(); ++t) {
    if (grads.table(TableHandle{static_cast<int>(t)}).sink() != nullptr) {
      throw std::logic_error("gradient_norm / clip_gradient_norm: the updates of table '" + grads.layout().tables()[t].name +
                             "' are fused into the backward, so its gradient is never stored and a global norm cannot "
                             "include it; train with the unfused path (unfuse_table_updates) to clip");
    }
  }
  double sum = detail::sum_of_squares(grads.dense_data(), grads.layout().dense_size());
  for (std::size_t t = 0; t < grads.layout().tables().size(); ++t) {
    const auto values = grads.table(TableHandle{static_cast<int>(t)}).values();
    sum += detail::sum_of_squares(values.data(), values.size());
  }
  return std::sqrt(sum);
}

/// Scales all gradients by max_norm / norm when their global norm exceeds max_norm (> 0). Returns the norm
/// before clipping.
template <typename Scalar>
double clip_gradient_norm(Gradients<Scalar>& grads, double max_norm) {
  if (!(max_norm > 0.0)) detail::throw_invalid("clip_gradient_norm max_norm", max_norm, "must be > 0");
  const double norm = gradient_norm(grads);
  if (norm > max_norm) detail::scale_gradients(grads, static_cast<Scalar>(max_norm / norm));
  return norm;
}

}  // namespace peer

#endif  // PEER_OPTIM_OPTIMIZER_HPP
