// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_TABLE_ROUNDING_HPP
#define PEER_OPTIM_TABLE_ROUNDING_HPP

/// \file
/// How an optimizer writes updated rows back into a table stored as bfloat16 (chosen per ParamGroup).
///
/// Every optimizer computes a row's update in Scalar on the widened row p = widen(row) (16 columns at a
/// time, widened and rounded back in one pass: peer/core/row_blocks.hpp) and then:
/// - kStochastic (the default): row = stochastic(p'), unbiased (E[row] = p'); the random bits are keyed by
///   (ParamGroup::rounding_seed, the table's name, the optimizer's step, the row) and the column
///   (peer/core/bfloat16.hpp), so the result is identical for any thread count and after a resume;
/// - kNearest: row = nearest(p'); an update smaller than half a unit in the last place (about 0.2% of
///   |p|) is lost, so small learning rates stall; there for comparison;
/// - kMasterRows: the optimizer keeps a Scalar master copy of the table (4 more bytes per entry for
///   float), updates the master exactly and sets row = nearest(master). The master is the parameter of
///   record: it is filled from the table at the first step (or restored from a checkpoint) and saved
///   with the optimizer's state as "<optimizer>.master.<table>".
/// Tables in the layer's Scalar are updated in place, as always; these settings do not apply to them.

#include <cstdint>
#include <string>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/bfloat16.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/row_blocks.hpp"
#include "peer/core/row_sparse.hpp"

namespace peer {

/// See the file comment.
enum class Bf16Rounding : std::uint8_t { kStochastic = 0, kNearest = 1, kMasterRows = 2 };

inline const char* to_string(Bf16Rounding r) {
  switch (r) {
    case Bf16Rounding::kStochastic: return "stochastic";
    case Bf16Rounding::kNearest: return "nearest";
    case Bf16Rounding::kMasterRows: return "master_rows";
  }
  return "unknown";
}

namespace detail {

/// The write-back of one table's updated rows (one per table in an optimizer).
template <typename Scalar>
class TableRowWriter {
 public:
  TableRowWriter() = default;
  TableRowWriter(const TensorSpec& spec, Bf16Rounding rounding, std::uint64_t seed)
      : bf16_(spec.storage == TableStorage::kBFloat16),
        rounding_(rounding),
        rng_(seed, stream_of(spec.name)),
        cols_(spec.cols) {
    if (bf16_ && rounding_ == Bf16Rounding::kMasterRows) master_ = AlignedBuffer<Scalar>(spec.size());
  }

  bool has_master() const { return master_.data() != nullptr; }
  Scalar* master() { return master_.data(); }
  /// 1 once the master holds the table (state saved with it, so a resumed run does not refill it).
  std::int64_t* master_ready() { return &master_ready_; }

  /// For master rows, fills the master from the table the first time. Call before update_row.
  void prepare(const RowTable<Scalar>& table) {
    if (!bf16_) return;
    if (has_master() && master_ready_ == 0) {
      parallel_for(table.rows(), 4096, [&](Index r0, Index r1, int) {
        for (Index row = r0; row < r1; ++row) table.read_row(row, master_.data() + row * cols_);
      });
      master_ready_ = 1;
    }
  }

  /// Calls update(p) on row `row`, p being what the rule updates in place: a Scalar* to the row itself (a
  /// table in Scalar) or to its master (then rounded to nearest into the bf16 row), or a
  /// Bf16RowBlocks<Scalar>& over the bf16 row, which rounds each block as it is stored (nearest, or
  /// stochastic keyed by `step`).
  template <typename Update>
  void update_row(RowTable<Scalar>& table, Index row, std::int64_t step, Update&& update) {
    if (!bf16_) {
      update(table.row(row));
    } else if (has_master()) {
      Scalar* p = master_.data() + row * cols_;
      update(p);
      table.write_row(row, p);
    } else {
      Bf16RowBlocks<Scalar> p(table.bf16_row(row), cols_, rounding_ == Bf16Rounding::kStochastic, stream(step, row));
      update(p);
    }
  }

  /// The rounding stream of `row` at `step`.
  RoundingStream stream(std::int64_t step, Index row) const {
    const std::uint64_t counter = (static_cast<std::uint64_t>(step) << 32) ^ static_cast<std::uint64_t>(row);
    return RoundingStream{static_cast<std::uint32_t>(rng_.bits(counter) >> 32)};
  }

 private:
  bool bf16_ = false;
  Bf16Rounding rounding_ = Bf16Rounding::kStochastic;
  CounterRng rng_{0, 0};
  Index cols_ = 0;
  AlignedBuffer<Scalar> master_;
  std::int64_t master_ready_ = 0;
};

}  // namespace detail
}  // namespace peer

#endif  // PEER_OPTIM_TABLE_ROUNDING_HPP
