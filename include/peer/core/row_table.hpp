// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ROW_TABLE_HPP
#define PEER_CORE_ROW_TABLE_HPP

/// \file
/// Storage of a large row-addressed parameter table (the expert table [N, 2D], a product-key memory's
/// values). Kernels only ask a table for a pointer to row i, so other storage (bf16 rows, a memory-mapped
/// file larger than RAM, a pool that grows) can arrive behind this class without touching the kernels.

#include <stdexcept>
#include <utility>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// How many rows ahead the expert and value kernels prefetch the rows they will read next (0 turns it
/// off). Whether it pays depends on the machine: on an AVX2 EPYC host it made the expert forward about 25%
/// faster at D = 256 (2 ahead; 1 or 4 gained nothing); on an AVX-512 Xeon host (AMX, the kind
/// ../shared/MACHINE.md describes) the fused expert kernels ran 1-7% faster with it, while a plain row
/// gather without compute lost up to 22% at D = 512 (docs/benchmarks.md has the figures). Define it before
/// including peer headers to override the default.
#ifndef PEER_PREFETCH_ROWS
#define PEER_PREFETCH_ROWS 2
#endif

namespace detail {

/// Asks the CPU to start loading [p, p + bytes) into cache, one request per 64-byte line (a hint: no
/// effect on results; nothing where the compiler has no prefetch builtin). Random rows of a table far
/// larger than the cache stall on DRAM latency at each row start; the kernels call this a few rows ahead.
inline void prefetch_bytes(const void* p, Index bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (Index off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace detail

/// A [rows, cols] row-major table, either owned (huge-page backed when large) or a view of user memory.
template <typename Scalar>
class RowTable {
 public:
  RowTable() = default;

  /// Owned storage, zero-filled.
  RowTable(Index rows, Index cols) : owned_(rows * cols), data_(owned_.data()), rows_(rows), cols_(cols) {}

  /// A view of `rows * cols` scalars the caller owns and keeps alive (row-major, contiguous rows).
  static RowTable view(Scalar* data, Index rows, Index cols) {
    if (data == nullptr && rows * cols > 0) throw std::invalid_argument("RowTable::view: data is null");
    RowTable t;
    t.data_ = data;
    t.rows_ = rows;
    t.cols_ = cols;
    return t;
  }

  RowTable(RowTable&&) noexcept = default;
  RowTable& operator=(RowTable&&) noexcept = default;

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  bool owns_memory() const { return owned_.data() != nullptr; }

  Scalar* row(Index i) { return data_ + i * cols_; }
  const Scalar* row(Index i) const { return data_ + i * cols_; }
  Scalar* data() { return data_; }
  const Scalar* data() const { return data_; }

  /// Asks the CPU to start loading row i (every cache line of it); see PEER_PREFETCH_ROWS.
  void prefetch(Index i) const { detail::prefetch_bytes(row(i), cols_ * static_cast<Index>(sizeof(Scalar))); }

  MatrixMap<Scalar> matrix() { return MatrixMap<Scalar>(data_, rows_, cols_, Eigen::OuterStride<>(cols_)); }
  ConstMatrixMap<Scalar> matrix() const {
    return ConstMatrixMap<Scalar>(data_, rows_, cols_, Eigen::OuterStride<>(cols_));
  }

 private:
  AlignedBuffer<Scalar> owned_;
  Scalar* data_ = nullptr;
  Index rows_ = 0;
  Index cols_ = 0;
};

}  // namespace peer

#endif  // PEER_CORE_ROW_TABLE_HPP
