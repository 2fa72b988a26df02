// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ROW_SPARSE_HPP
#define PEER_CORE_ROW_SPARSE_HPP

/// \file
/// RowSparseGrad: the gradient of a row-addressed table, holding only the rows a batch touched.

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// Where a fused table update sends each summed gradient row (an optimizer; see
/// Adam::fuse_table_updates): update_row applies the optimizer's rule to row `row` with gradient g
/// (cols scalars) at once, from thread `thread` < the threads prepare() was told of.
template <typename Scalar>
class RowSink {
 public:
  /// Called once per backward, before any row, with parallel_threads(): scratch is made here.
  virtual void prepare(int threads) = 0;
  virtual void update_row(ExpertId row, const Scalar* g, int thread) = 0;
  /// A hint that update_row(row, ...) comes soon: start loading the row (no effect on results).
  virtual void prefetch(ExpertId /*row*/) const {}
  /// The table's name, for messages.
  virtual const std::string& table_name() const = 0;

 protected:
  ~RowSink() = default;
};

/// Rows of a [num_rows, cols] gradient that are not zero: ids strictly ascending, values [size(), cols]
/// with values row r belonging to ids()[r]. Memory grows with the rows touched, never with num_rows.
/// Invariant: ids are strictly ascending and each id appears once.
template <typename Scalar>
class RowSparseGrad {
 public:
  RowSparseGrad() = default;
  explicit RowSparseGrad(Index cols) : cols_(cols) {}

  Index cols() const { return cols_; }
  /// Number of stored rows.
  Index size() const { return static_cast<Index>(ids_.size()); }
  bool empty() const { return ids_.empty(); }
  const std::vector<ExpertId>& ids() const { return ids_; }

  MatrixMap<Scalar> values() { return MatrixMap<Scalar>(values_.get(), size(), cols_, Eigen::OuterStride<>(cols_)); }
  ConstMatrixMap<Scalar> values() const {
    return ConstMatrixMap<Scalar>(values_.get(), size(), cols_, Eigen::OuterStride<>(cols_));
  }

  /// The stored row for `id`, or nullptr when the row is zero (not stored). O(log size()).
  const Scalar* find(ExpertId id) const {
    const auto it = std::lower_bound(ids_.begin(), ids_.end(), id);
    if (it == ids_.end() || *it != id) return nullptr;
    return values_.get() + (it - ids_.begin()) * cols_;
  }

  /// Drops every row; keeps the allocated memory for the next batch.
  void clear() { ids_.clear(); }

  /// Fused updates: with a sink set, the backward hands every summed row to it instead of storing it, so
  /// this gradient stays empty. One backward per optimizer step: the sink's optimizer calls
  /// end_fused_step() in its step(); a second backward before that (gradient accumulation, or a table
  /// shared by two layers) is refused by begin_fused_backward().
  void set_sink(RowSink<Scalar>* sink) {
    sink_ = sink;
    fused_this_step_ = false;
  }
  RowSink<Scalar>* sink() const { return sink_; }
  void begin_fused_backward() {
    if (fused_this_step_) {
      throw std::logic_error("fused table update: table '" + sink_->table_name() +
                             "' was already updated by a backward since the optimizer's last step; fused updates "
                             "need exactly one backward per step (no gradient accumulation, no table shared by "
                             "two layers): use the unfused path for those");
    }
    fused_this_step_ = true;
  }
  void end_fused_step() { fused_this_step_ = false; }
  /// Whether a fused backward has updated the table since the optimizer's last step.
  bool fused_pending() const { return fused_this_step_; }

  /// Makes room for `rows` rows without moving the stored ones again until a batch touches more. The
  /// memory is only reserved: pages the rows never reach are never touched, so reserving the most rows a
  /// batch can touch (scatter_rows does) costs address space, not resident memory, and spares every
  /// later batch that touches a few more rows than any before it a fresh allocation and a page fault
  /// on every 4 KiB of it (about 116,000 faults for the 475 MiB gradient of a 2048-token batch at D = 256).
  void reserve_rows(Index rows) {
    ids_.reserve(static_cast<std::size_t>(rows));
    const std::size_t n = static_cast<std::size_t>(rows * cols_);
    if (n <= capacity_) return;
    std::unique_ptr<Scalar[]> grown(new Scalar[n]);
    if (!ids_.empty()) std::memcpy(grown.get(), values_.get(), ids_.size() * static_cast<std::size_t>(cols_) * sizeof(Scalar));
    values_ = std::move(grown);
    capacity_ = n;
  }

  /// Replaces the content by `ids` (strictly ascending) and returns the [ids.size(), cols] values, which
  /// the caller must fill: their contents are unspecified. (Not zeroing them saves a pass over the whole
  /// gradient per step: 236 MiB for a 1024-token batch at D = 256.) Memory is reused across batches and
  /// grows only when a batch touches more rows than any before it.
  MatrixMap<Scalar> reset(const std::vector<ExpertId>& ids) {
    PEER_ASSERT(std::is_sorted(ids.begin(), ids.end()));
    refuse_if_fused();
    ids_ = ids;
    reserve_values(static_cast<std::size_t>(size() * cols_));
    return values();
  }

  /// this += rows: `ids` strictly ascending, `rows` [ids.size(), cols]. Rows already present are added
  /// elementwise (existing + new, in that order); new ids are inserted in order.
  void add(const std::vector<ExpertId>& ids, const Scalar* rows) {
    if (ids.empty()) return;
    refuse_if_fused();
    if (empty()) {
      reset(ids);
      std::memcpy(values_.get(), rows, static_cast<std::size_t>(size() * cols_) * sizeof(Scalar));
      return;
    }
    std::vector<ExpertId> merged_ids;
    std::vector<Scalar> merged;
    merged_ids.reserve(ids_.size() + ids.size());
    merged.reserve((ids_.size() + ids.size()) * static_cast<std::size_t>(cols_));
    std::size_t i = 0, j = 0;
    const std::size_t c = static_cast<std::size_t>(cols_);
    while (i < ids_.size() || j < ids.size()) {
      if (j == ids.size() || (i < ids_.size() && ids_[i] < ids[j])) {
        merged_ids.push_back(ids_[i]);
        merged.insert(merged.end(), values_.get() + i * c, values_.get() + (i + 1) * c);
        ++i;
      } else if (i == ids_.size() || ids[j] < ids_[i]) {
        merged_ids.push_back(ids[j]);
        merged.insert(merged.end(), rows + j * c, rows + (j + 1) * c);
        ++j;
      } else {
        merged_ids.push_back(ids_[i]);
        for (std::size_t e = 0; e < c; ++e) merged.push_back(values_[i * c + e] + rows[j * c + e]);
        ++i;
        ++j;
      }
    }
    ids_.swap(merged_ids);
    reserve_values(merged.size());
    std::memcpy(values_.get(), merged.data(), merged.size() * sizeof(Scalar));
  }

 private:
  void refuse_if_fused() const {
    if (sink_ != nullptr) {
      throw std::logic_error("RowSparseGrad: rows given to the gradient of table '" + sink_->table_name() +
                             "', whose updates are fused into the backward (its gradient is never stored)");
    }
  }

  // Capacity for n scalars, contents unspecified (new Scalar[] leaves float and double uninitialized).
  // Grows by at least half, so that batches touching slowly more rows do not reallocate every time.
  void reserve_values(std::size_t n) {
    if (n <= capacity_) return;
    const std::size_t grown = std::max(n, capacity_ + capacity_ / 2);
    values_.reset(new Scalar[grown]);
    capacity_ = grown;
  }

  Index cols_ = 0;
  std::vector<ExpertId> ids_;
  std::unique_ptr<Scalar[]> values_;
  std::size_t capacity_ = 0;
  RowSink<Scalar>* sink_ = nullptr;
  bool fused_this_step_ = false;
};

}  // namespace peer

#endif  // PEER_CORE_ROW_SPARSE_HPP
