// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_REDUCE_HPP
#define PEER_CORE_REDUCE_HPP

/// \file
/// Deterministic sums over the rows of a batch (batch-norm statistics, bias gradients): rows are split
/// into fixed chunks, each chunk is summed in row order (in parallel across chunks), and the chunk sums
/// are added in chunk order. The result is the same for any thread count.

#include <algorithm>

#include "peer/core/parallel.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace detail {

/// Rows per chunk of a row reduction; fixed so that the summation order never depends on threads.
constexpr Index kReduceGrain = 64;

/// total[0..cols) = sum over rows r of the vector that add_row(r, acc) adds into acc[0..cols).
/// `partials` is scratch, resized here.
template <typename Scalar, typename AddRow>
void reduce_rows(Index rows, Index cols, Scalar* total, RowMatrix<Scalar>& partials, AddRow&& add_row) {
  const Index chunks = (rows + kReduceGrain - 1) / kReduceGrain;
  partials.setZero(std::max<Index>(chunks, 1), cols);
  parallel_for(rows, kReduceGrain, [&](Index begin, Index end, int) {
    Scalar* acc = partials.row(begin / kReduceGrain).data();
    for (Index r = begin; r < end; ++r) add_row(r, acc);
  });
  std::fill(total, total + cols, Scalar(0));
  for (Index c = 0; c < chunks; ++c) {
    const Scalar* p = partials.row(c).data();
    for (Index j = 0; j < cols; ++j) total[j] += p[j];
  }
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_REDUCE_HPP
