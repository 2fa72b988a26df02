// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_POOL_GROWTH_HPP
#define PEER_LAYERS_POOL_GROWTH_HPP

/// \file
/// A pool that grows: a product-key layer's n sub-keys per set become n' >= n (N = n^2 -> n'^2 experts),
/// with training state carried over, for the lifelong learning He (2024) suggests (section 5).
///
/// Where everything goes. Expert id = a n + b pairs left sub-key a with right sub-key b; in the grown pool
/// the same pair is a n' + b. So, with r -> (r / n) n' + r % n:
///   expert row      a n + b  ->  a n' + b      (and its optimizer state, row step, master row, statistics)
///   sub-key row     h n + a  ->  h n' + a      (h = 0 with shared keys; per-head keys are H blocks of n)
/// Every other tensor (the query network, norms, running statistics) is copied unchanged. New sub-keys
/// (rows a >= n of each block) and new experts (a >= n or b >= n) keep the values the grown parameters were
/// initialized with (the grown layer's initialize(): sub-keys U(+-1/sqrt(Dk/2)), u ~ N(0, 1/D)), except
/// v = 0 for every new expert (the last D columns of its row: [u | v] rows, or the whole value row of a
/// product-key memory). New optimizer state is zero (a fresh row: row step 0, moments 0).
///
/// What growth does to the outputs (docs/growth.md derives it; tests/test_growth.cpp checks it on random
/// inputs). Old scores are unchanged (same sub-key rows, same query), and the id map keeps their order, so
/// per head the grown top k is the old top k's best k - m experts plus m new ones (m >= 0). New experts
/// output sigma(u . x) * 0 = 0, but they take gate mass or a place:
/// - softmax gates: with rho = the new experts' share of the grown gates,
///     |y' - y|_inf <= sum_h rho_h max_{j in old top k of h} |sigma(u_j . x) v_j|_inf
///   (the m dropped experts' scores are <= the new ones', so the kept experts' gates only shrink and the
///   gates' total variation is exactly rho_h);
/// - non-competing gates (ReLU, sigmoid): kept experts keep their gates, so
///     |y' - y|_inf <= sum_h sum_{j dropped from h} g_j |sigma(u_j . x) v_j|_inf.
/// A token whose heads pick no new expert (rho = 0, nothing dropped) gets the same output up to the
/// rounding of the larger sub-key products. Training then moves the new experts: their v get gradient
/// g sigma(u . x) dL/dy as soon as they are picked, and the new sub-keys get gradient through the gates.
///
/// Usage (a layer; a model passes each grown layer's prefix and grows its model-level objects the same):
///     peer::PoolGrowth growth(layer, 2 * n);                      // n -> 2n sub-keys: N -> 4N experts
///     peer::PeerLayer<float> grown_layer(growth.grown_config());
///     auto grown = grown_layer.make_parameters(seed);             // new sub-keys and u from the seed
///     peer::grow_parameters({growth}, params, grown);             // old rows moved, new v = 0
///     peer::Adam<float> grown_adam(grown_layer.layout(), groups);
///     peer::grow_optimizer_state({growth}, adam, grown_adam, grown);
///     stats = growth.grow(stats);                                 // ExpertStats follow their experts

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "peer/core/bfloat16.hpp"
#include "peer/core/error.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/layers/expert_stats.hpp"
#include "peer/layers/peer_config.hpp"
#include "peer/optim/optimizer.hpp"

namespace peer {

/// One product-key layer's growth from n to n' >= n sub-keys per set, and where its tensors sit in the
/// parameter set being grown (`prefix`: "" for a layer's own parameters, "blocks.0.ffn." in a model).
class PoolGrowth {
 public:
  /// How a tensor's rows move.
  enum class Rows {
    kUnchanged,  ///< copied as it is
    kSubKeys,    ///< blocks of n sub-key rows -> blocks of n'
    kExperts,    ///< n^2 expert rows -> n'^2
  };

  /// From a product-key layer (PeerLayer, ProductKeyMemory, any ProductKeyLayer): its configuration and
  /// the names of its sub-key sets and its table. Throws std::invalid_argument when n' < n or the grown
  /// configuration is invalid (PeerConfig::validate names the field).
  template <typename Layer>
  PoolGrowth(const Layer& layer, Index new_sub_keys, std::string prefix = "")
      : config_(layer.config()), grown_(layer.config()), prefix_(std::move(prefix)) {
    const auto& layout = layer.layout();
    if (layout.tables().size() != 1) {
      detail::throw_invalid("PoolGrowth: the layer's table count", layout.tables().size(), "must be 1 (its expert table)");
    }
    left_ = prefix_ + layout.spec(layer.retrieval().left_handle()).name;
    right_ = prefix_ + layout.spec(layer.retrieval().right_handle()).name;
    table_ = prefix_ + layout.tables()[0].name;
    n_ = config_.num_sub_keys();
    if (new_sub_keys < n_) {
      detail::throw_invalid("PoolGrowth new_sub_keys", new_sub_keys,
                            "must be >= the layer's num_sub_keys = " + detail::to_text(n_) + " (a pool only grows)");
    }
    new_n_ = new_sub_keys;
    if (new_n_ > (Index{1} << 16)) detail::throw_invalid("PoolGrowth new_sub_keys", new_n_, "must be < 2^16 (expert ids are int32)");
    grown_.num_experts = new_n_ * new_n_;
    grown_.validate();
  }

  const PeerConfig& config() const { return config_; }
  /// The configuration of the grown layer: num_experts = n'^2, everything else as before.
  const PeerConfig& grown_config() const { return grown_; }
  Index old_sub_keys() const { return n_; }
  Index new_sub_keys() const { return new_n_; }
  const std::string& prefix() const { return prefix_; }
  /// The names, in the parameter set, of the two sub-key sets and of the table.
  const std::string& left_name() const { return left_; }
  const std::string& right_name() const { return right_; }
  const std::string& table_name() const { return table_; }

  /// Where row r of a grown tensor goes: r = a n + b -> a n' + b (expert ids and sub-key rows alike).
  Index move(Index r) const { return r / n_ * new_n_ + r % n_; }
  ExpertId expert(ExpertId id) const { return static_cast<ExpertId>(move(id)); }
  /// Whether expert `id` of the grown pool is new (no old expert moved there).
  bool is_new(ExpertId id) const { return id / new_n_ >= n_ || id % new_n_ >= n_; }

  /// How the rows of the tensor named `name` (in the parameter set) move.
  Rows rows_of(const std::string& name) const {
    if (name == left_ || name == right_) return Rows::kSubKeys;
    if (name == table_) return Rows::kExperts;
    return Rows::kUnchanged;
  }

  /// Rows the tensor has after growth, given `rows` before (checked against n: the shape the rule needs).
  Index grown_rows(Rows rule, Index rows, const std::string& name) const {
    if (rule == Rows::kUnchanged) return rows;
    const Index expected = rule == Rows::kExperts ? n_ * n_ : rows / n_ * n_;
    if (rows != expected || rows == 0) {
      detail::throw_invalid("PoolGrowth: rows of '" + name + "'", rows,
                            rule == Rows::kExperts ? "must be num_experts = " + detail::to_text(n_ * n_)
                                                   : "must be a positive multiple of num_sub_keys = " + detail::to_text(n_));
    }
    return rule == Rows::kExperts ? new_n_ * new_n_ : rows / n_ * new_n_;
  }

  /// Statistics that follow their experts: z' and selections of expert i move to expert(i); new experts
  /// start at 0; the token count is kept.
  ExpertStats grow(const ExpertStats& stats) const {
    if (stats.num_experts() != n_ * n_) {
      detail::throw_invalid("PoolGrowth::grow: ExpertStats num_experts", stats.num_experts(),
                            "must be the layer's num_experts = " + detail::to_text(n_ * n_));
    }
    return stats.moved(new_n_ * new_n_, [this](ExpertId id) { return expert(id); });
  }

  /// The new experts' share of the gate weights in a grown layer's ids and gates [B, H k] (a cache's or an
  /// infer() workspace's): sum of the gates on new experts / sum of all gates (0 when all gates are 0).
  template <typename IdDerived, typename GateDerived>
  double new_expert_share(const Eigen::MatrixBase<IdDerived>& ids, const Eigen::MatrixBase<GateDerived>& gates) const {
    detail::check_shape("gates", gates.rows(), gates.cols(), ids.rows(), ids.cols());
    double fresh = 0.0, total = 0.0;
    for (Index r = 0; r < ids.rows(); ++r) {
      for (Index c = 0; c < ids.cols(); ++c) {
        const double g = static_cast<double>(gates(r, c));
        total += g;
        if (is_new(ids(r, c))) fresh += g;
      }
    }
    return total == 0.0 ? 0.0 : fresh / total;
  }

 private:
  PeerConfig config_, grown_;
  std::string prefix_;
  std::string left_, right_, table_;
  Index n_ = 0, new_n_ = 0;
};

namespace detail {

// The growth that owns the tensor `name` and its rule ({nullptr, kUnchanged} when none does).
inline std::pair<const PoolGrowth*, PoolGrowth::Rows> growth_of(const std::vector<PoolGrowth>& growths, const std::string& name) {
  for (const auto& g : growths) {
    const PoolGrowth::Rows r = g.rows_of(name);
    if (r != PoolGrowth::Rows::kUnchanged) return {&g, r};
  }
  return {nullptr, PoolGrowth::Rows::kUnchanged};
}

// Copies a tensor of `rows` rows of `row_bytes` bytes from `from` to `to` under growth g (nullptr: as it is):
// row r to row g->move(r); rows nothing moves to keep what `to` holds (the caller sets them).
inline void move_rows(const PoolGrowth* g, const void* from, Index rows, Index row_bytes, void* to) {
  if (rows == 0 || row_bytes == 0) return;
  const auto* src = static_cast<const unsigned char*>(from);
  auto* dst = static_cast<unsigned char*>(to);
  if (g == nullptr) {
    std::memcpy(dst, src, static_cast<std::size_t>(rows * row_bytes));
    return;
  }
  parallel_for(rows, 4096, [&](Index r0, Index r1, int) {
    for (Index r = r0; r < r1; ++r) {
      std::memcpy(dst + g->move(r) * row_bytes, src + r * row_bytes, static_cast<std::size_t>(row_bytes));
    }
  });
}

// The spec named `name` in `list`, or nullptr.
inline const TensorSpec* find_spec(const std::vector<TensorSpec>& list, const std::string& name) {
  for (const auto& s : list) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

// Checks that `grown` is `old` grown: the same names in the same kinds, shapes as the growths say.
inline void check_grown_layout(const std::vector<PoolGrowth>& growths, const ParameterLayout& old, const ParameterLayout& grown) {
  if (old.scalar_bytes() != grown.scalar_bytes()) {
    throw_invalid("grow_parameters: the grown layout's scalar_bytes", grown.scalar_bytes(), "must equal the old layout's " + to_text(old.scalar_bytes()));
  }
  for (const auto& g : growths) {
    for (const std::string* name : {&g.left_name(), &g.right_name(), &g.table_name()}) {
      if (old.find(*name).first < 0) {
        throw std::invalid_argument("grow_parameters: the old parameters have no tensor '" + *name +
                                    "' (PoolGrowth prefix '" + g.prefix() + "')");
      }
    }
  }
  const std::vector<TensorSpec>* old_lists[] = {&old.dense(), &old.buffers(), &old.tables()};
  const std::vector<TensorSpec>* grown_lists[] = {&grown.dense(), &grown.buffers(), &grown.tables()};
  for (int k = 0; k < 3; ++k) {
    if (old_lists[k]->size() != grown_lists[k]->size()) {
      throw_invalid("grow_parameters: the grown layout's tensor count", grown_lists[k]->size(),
                    "must equal the old layout's " + to_text(old_lists[k]->size()) + " (growth adds no tensor)");
    }
    for (const auto& s : *grown_lists[k]) {
      const TensorSpec* o = find_spec(*old_lists[k], s.name);
      if (o == nullptr) throw std::invalid_argument("grow_parameters: the old parameters have no tensor '" + s.name + "' of the same kind");
      const auto owner = growth_of(growths, s.name);
      const Index rows = owner.first == nullptr ? o->rows : owner.first->grown_rows(owner.second, o->rows, s.name);
      if (s.rows != rows || s.cols != o->cols || s.storage != o->storage) {
        throw std::invalid_argument("grow_parameters: tensor '" + s.name + "' is [" + to_text(s.rows) + ", " + to_text(s.cols) +
                                    "] " + to_string(s.storage) + " in the grown layout but must be [" + to_text(rows) + ", " +
                                    to_text(o->cols) + "] " + to_string(o->storage) + " (grown from [" + to_text(o->rows) +
                                    ", " + to_text(o->cols) + "])");
      }
    }
  }
}

}  // namespace detail

/// Moves `old` (a parameter set holding the layers before growth) into `grown` (the same set laid out
/// after growth, initialized: make_parameters(seed) of the grown layer, or initialize() of each grown
/// layer on a model's views): old rows go where the growths say, every other tensor is copied, new
/// sub-keys and new experts' u keep grown's values and new experts' v are set to 0. Throws
/// std::invalid_argument, before writing anything, when the layouts are not one set before and after
/// these growths (a tensor missing or of another shape, storage or kind), std::logic_error when a grown
/// table is read-only.
template <typename Scalar>
void grow_parameters(const std::vector<PoolGrowth>& growths, const Parameters<Scalar>& old, Parameters<Scalar>& grown) {
  const ParameterLayout& ol = old.layout();
  const ParameterLayout& gl = grown.layout();
  detail::check_grown_layout(growths, ol, gl);
  if (!grown.read_only_table().empty()) throw std::logic_error("grow_parameters: the grown table '" + grown.read_only_table() + "' is read-only");
  const auto sb = static_cast<Index>(sizeof(Scalar));
  for (const auto& s : gl.dense()) {
    const TensorSpec& o = *detail::find_spec(ol.dense(), s.name);
    detail::move_rows(detail::growth_of(growths, s.name).first, old.dense_data() + o.offset, o.rows, o.cols * sb,
                      grown.dense_data() + s.offset);
  }
  for (const auto& s : gl.buffers()) {
    const TensorSpec& o = *detail::find_spec(ol.buffers(), s.name);
    std::memcpy(grown.buffer_data() + s.offset, old.buffer_data() + o.offset, static_cast<std::size_t>(o.size() * sb));
  }
  for (std::size_t t = 0; t < gl.tables().size(); ++t) {
    const TensorSpec& s = gl.tables()[t];
    const int ot = ol.find(s.name).first;
    const RowTable<Scalar>& from = old.table(TableHandle{ot});
    RowTable<Scalar>& to = grown.table(TableHandle{static_cast<int>(t)});
    const PoolGrowth* g = detail::growth_of(growths, s.name).first;
    void* dst = to.is_bf16() ? static_cast<void*>(to.bf16_data()) : static_cast<void*>(to.data());
    detail::move_rows(g, from.storage_data(), from.rows(), from.row_bytes(), dst);
    if (g == nullptr) continue;
    // v = 0 for every new expert: the row's last D columns (all of a value row).
    const Index d = std::min<Index>(g->config().model_dim, s.cols), v0 = s.cols - d;
    parallel_for(to.rows(), 4096, [&](Index r0, Index r1, int) {
      for (Index r = r0; r < r1; ++r) {
        if (!g->is_new(static_cast<ExpertId>(r))) continue;
        if (to.is_bf16()) {
          std::fill(to.bf16_row(r) + v0, to.bf16_row(r) + s.cols, bfloat16(0.0f));
        } else {
          std::fill(to.row(r) + v0, to.row(r) + s.cols, Scalar(0));
        }
      }
    });
  }
}

/// Moves an optimizer's state (Sgd, Adam: anything with state_tensors() and state_counters()) into a
/// fresh optimizer of the same kind and groups built on the grown layout: every state tensor and counter
/// of `old` goes to the one of the same name in `grown`, rows moved as its tensor's (moments, row-wise
/// accumulators, lazy Adam's row steps, bf16 master rows); new rows start as a fresh row (zero state, row
/// step 0), except the master rows of new experts, which take the values of `grown_params`' table (what a
/// first update would fill them with). The global step and every other counter are copied. Throws
/// std::invalid_argument, before writing anything, when the two optimizers' state differs in names or
/// shapes other than growth explains.
template <typename Optimizer, typename Scalar>
void grow_optimizer_state(const std::vector<PoolGrowth>& growths, Optimizer& old, Optimizer& grown,
                          const Parameters<Scalar>& grown_params) {
  if (grown_params.layout() != grown.layout()) throw std::invalid_argument("grow_optimizer_state: grown_params have another layout than the grown optimizer");
  detail::check_grown_layout(growths, old.layout(), grown.layout());
  auto old_tensors = old.state_tensors();
  auto new_tensors = grown.state_tensors();
  auto old_counters = old.state_counters();
  auto new_counters = grown.state_counters();
  if (old_tensors.size() != new_tensors.size() || old_counters.size() != new_counters.size()) {
    throw std::invalid_argument("grow_optimizer_state: the optimizers keep different state (" + detail::to_text(old_tensors.size()) +
                                " and " + detail::to_text(new_tensors.size()) + " tensors): build the grown one with the same groups and configuration");
  }
  // Each entry of `grown` and the old entry of its name; its rows move when its tensor grows and it has
  // that tensor's rows (moments, row steps), otherwise it must have the same rows (the global step, flags).
  struct Plan {
    const PoolGrowth* growth = nullptr;
    std::size_t from = 0;
  };
  auto plan = [&](const std::string& name, Index new_rows, Index cols, bool bf16, const auto& olds, auto shape) -> Plan {
    std::size_t from = olds.size();
    for (std::size_t i = 0; i < olds.size(); ++i) if (olds[i].name == name) from = i;
    if (from == olds.size()) throw std::invalid_argument("grow_optimizer_state: the old optimizer has no state '" + name + "'");
    const auto [have, have_cols, have_bf16] = shape(olds[from]);
    if (have_cols != cols || have_bf16 != bf16) {
      throw std::invalid_argument("grow_optimizer_state: state '" + name + "' differs in columns or storage between the optimizers");
    }
    const std::string owner = detail::state_owner(grown.layout(), name);
    const auto g = owner.empty() ? std::pair<const PoolGrowth*, PoolGrowth::Rows>{nullptr, PoolGrowth::Rows::kUnchanged}
                                 : detail::growth_of(growths, owner);
    if (g.first != nullptr) {
      const auto found = old.layout().find(owner);
      const auto& list = found.second == ParamKind::kRowSparse ? old.layout().tables() : old.layout().dense();
      const Index rows = list[static_cast<std::size_t>(found.first)].rows;
      if (have == rows && new_rows == g.first->grown_rows(g.second, rows, owner)) return {g.first, from};
    }
    if (have != new_rows) {
      throw std::invalid_argument("grow_optimizer_state: state '" + name + "' has " + detail::to_text(new_rows) +
                                  " rows in the grown optimizer and " + detail::to_text(have) +
                                  " in the old one, which growth does not explain");
    }
    return {nullptr, from};
  };
  std::vector<Plan> tensor_plans, counter_plans;
  for (const auto& s : new_tensors) {
    tensor_plans.push_back(plan(s.name, s.rows, s.cols, s.bf16 != nullptr, old_tensors, [](const StateTensor<Scalar>& o) {
      return std::make_tuple(o.rows, o.cols, o.bf16 != nullptr);
    }));
  }
  for (const auto& c : new_counters) {
    counter_plans.push_back(plan(c.name, c.size, Index{1}, false, old_counters, [](const StateCounter& o) {
      return std::make_tuple(o.size, Index{1}, false);
    }));
  }
  // Checked: now write.
  for (std::size_t i = 0; i < new_tensors.size(); ++i) {
    auto& s = new_tensors[i];
    const auto& o = old_tensors[tensor_plans[i].from];
    const PoolGrowth* g = tensor_plans[i].growth;
    const Index row_bytes = s.cols * static_cast<Index>(s.bf16 != nullptr ? sizeof(bfloat16) : sizeof(Scalar));
    void* dst = s.bf16 != nullptr ? static_cast<void*>(s.bf16) : static_cast<void*>(s.data);
    if (g != nullptr) std::memset(dst, 0, static_cast<std::size_t>(s.rows * row_bytes));  // new rows: fresh
    detail::move_rows(g, o.bf16 != nullptr ? static_cast<const void*>(o.bf16) : static_cast<const void*>(o.data), o.rows, row_bytes, dst);
    const std::string owner = detail::state_owner(grown.layout(), s.name);
    if (g != nullptr && s.data != nullptr && s.name == "bf16.master." + owner) {  // optimizer_core.hpp's name for master rows
      const RowTable<Scalar>& table = grown_params.table(TableHandle{grown.layout().find(owner).first});
      for (Index r = 0; r < s.rows; ++r) {
        if (g->is_new(static_cast<ExpertId>(r))) table.read_row(r, s.data + r * s.cols);
      }
    }
  }
  for (std::size_t i = 0; i < new_counters.size(); ++i) {
    auto& c = new_counters[i];
    const auto& o = old_counters[counter_plans[i].from];
    if (counter_plans[i].growth != nullptr) std::fill(c.data, c.data + c.size, std::int64_t{0});
    detail::move_rows(counter_plans[i].growth, o.data, o.size, static_cast<Index>(sizeof(std::int64_t)), c.data);
  }
}

}  // namespace peer

#endif  // PEER_LAYERS_POOL_GROWTH_HPP
