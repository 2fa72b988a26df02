// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ROW_SCATTER_HPP
#define PEER_CORE_ROW_SCATTER_HPP

/// \file
/// The deterministic scatter-add of per-slot contributions into a table's row-sparse gradient, shared by
/// every kernel that reads rows by id (single-neuron experts, product-key memory values).
///
/// Slots are the entries of an id matrix [B, S]; slot (t, s) is item i = t S + s and contributes to row
/// ids(t, s). The items are grouped by row (stable radix sort, peer/core/key_groups.hpp) and each touched
/// row is summed once, over its items in ascending order, by one thread: no atomics, bitwise identical for
/// any thread count. An empty gradient receives the rows in place; otherwise they are summed aside and
/// merged (RowSparseGrad::add), so a gradient pre-filled with G ends as exactly G + delta.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "peer/core/key_groups.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/row_sparse.hpp"
#include "peer/core/types.hpp"

/// How many rows ahead a fused backward asks the optimizer to start loading the table rows it will update
/// (0 turns it off; a hint, no effect on results). docs/benchmarks.md has the measurement behind the default.
#ifndef PEER_PREFETCH_UPDATE_ROWS
#define PEER_PREFETCH_UPDATE_ROWS 4
#endif

namespace peer {

namespace detail {

/// dst[0, n) = src[0, n), bit for bit, with non-temporal (streaming) stores where the CPU has them and dst
/// is 16-byte aligned, else memcpy. A gradient row is written once and read again only by the optimizer,
/// after far more data than the caches hold; an ordinary store first loads the line it writes (a read for
/// ownership), so streaming the rows saves a third of the scatter's memory traffic. Call
/// streaming_fence() before other threads read what was stored.
template <typename Scalar>
inline void store_streaming(Scalar* dst, const Scalar* src, Index n) {
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(Scalar);
#if defined(__SSE2__)
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 == 0) {
    char* d = reinterpret_cast<char*>(dst);
    const char* s = reinterpret_cast<const char*>(src);
    std::size_t i = 0;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

/// Orders the streaming stores of this thread before whatever it does next.
inline void streaming_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Reusable memory of scatter_rows.
template <typename Scalar>
struct RowScatterWorkspace {
  std::vector<std::int32_t> keys;  // [B * S] row id of each item
  KeyGroups groups;
  RowMatrix<Scalar> rows;          // summed rows when they must be merged into a non-empty gradient
  RowMatrix<Scalar> buffers;       // [threads, cols] one row buffer per thread (kept: no allocation per call)
};

/// For every row r touched by `ids` (values in [0, num_rows)): grad[r] += sum over items i with
/// ids = r, in ascending i, of the contribution `add_item(i, row)` writes into `row` (an Eigen row
/// expression of `cols` scalars, zeroed before the first item: add_item must ADD).
/// With a sink on `grad` (fused table updates) each summed row goes to sink->update_row instead, the same
/// sum in the same order, and nothing is stored; the sink is asked to prefetch the rows a few groups ahead.
template <typename Scalar, typename AddItem>
void scatter_rows(const ConstIdMatrixRef& ids, Index num_rows, Index cols, RowSparseGrad<Scalar>& grad,
                  RowScatterWorkspace<Scalar>& ws, AddItem&& add_item) {
  const Index b_count = ids.rows(), slots = ids.cols(), items = b_count * slots;
  ws.keys.resize(static_cast<std::size_t>(items));
  for (Index t = 0; t < b_count; ++t) {
    for (Index s = 0; s < slots; ++s) ws.keys[static_cast<std::size_t>(t * slots + s)] = ids(t, s);
  }
  group_by_key(ws.keys.data(), items, num_rows, ws.groups);
  const KeyGroups& g = ws.groups;
  // Each row is summed in a buffer that stays in L1 (over its items in ascending order), then handed to
  // finish(group, buffer, thread): to the fused sink, or stored into the gradient.
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  ws.buffers.resize(parallel_threads(), cols);
  RowSink<Scalar>* const sink = grad.sink();
  auto sum_rows = [&](auto&& finish) {
    parallel_for(g.num_groups(), 256, [&](Index g0, Index g1, int thread) {
      Scalar* buffer = ws.buffers.row(thread).data();
      for (Index gi = g0; gi < g1; ++gi) {
        if (PEER_PREFETCH_UPDATE_ROWS > 0 && sink != nullptr && gi + PEER_PREFETCH_UPDATE_ROWS < g1) {
          sink->prefetch(g.keys[static_cast<std::size_t>(gi + PEER_PREFETCH_UPDATE_ROWS)]);
        }
        Eigen::Map<RowVec> row(buffer, cols);
        row.setZero();
        for (std::int64_t p = g.starts[static_cast<std::size_t>(gi)]; p < g.starts[static_cast<std::size_t>(gi) + 1]; ++p) {
          add_item(static_cast<Index>(g.order[static_cast<std::size_t>(p)]), row);
        }
        finish(gi, buffer, thread);
      }
      streaming_fence();
    });
  };
  if (sink != nullptr) {
    grad.begin_fused_backward();
    sink->prepare(parallel_threads());
    sum_rows([&](Index gi, const Scalar* buffer, int thread) { sink->update_row(g.keys[static_cast<std::size_t>(gi)], buffer, thread); });
    return;
  }
  const bool direct = grad.empty();
  if (direct) {
    grad.reserve_rows(std::min(items, num_rows));  // the most rows a batch of this size can touch
  } else {
    ws.rows.resize(g.num_groups(), cols);
  }
  MatrixMap<Scalar> out(direct ? grad.reset(g.keys).data() : ws.rows.data(), g.num_groups(), cols,
                        Eigen::OuterStride<>(cols));
  // Stored: streamed into the gradient, plainly into the aside rows (which the merge reads at once).
  sum_rows([&](Index gi, const Scalar* buffer, int) {
    if (direct) {
      store_streaming(out.row(gi).data(), buffer, cols);
    } else {
      out.row(gi) = Eigen::Map<const RowVec>(buffer, cols);
    }
  });
  if (!direct) grad.add(g.keys, ws.rows.data());
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_ROW_SCATTER_HPP
