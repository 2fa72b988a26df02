// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ROW_TABLE_HPP
#define PEER_CORE_ROW_TABLE_HPP

/// \file
/// Storage of a large row-addressed parameter table (the expert table [N, 2D], a product-key memory's
/// values), in the layer's Scalar or in bfloat16 (TableStorage). Kernels go through the row primitives
/// (dot, axpy, read_row, write_row) and never fork on the storage; other storage (a memory-mapped file
/// larger than RAM, a pool that grows) can arrive behind the same primitives.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/bfloat16.hpp"
#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// How many rows ahead the expert and value kernels prefetch the rows they will read next (0 turns it
/// off). Whether it pays depends on the machine: on an AVX2 EPYC host it made the expert forward about 25%
/// faster at D = 256 (2 ahead; 1 or 4 gained nothing); on an AVX-512 Xeon host (AMX, the kind
/// ../shared/MACHINE.md describes) the fused expert kernels ran 1-7% faster with it, while a plain row
/// gather without compute lost up to 22% at D = 512 (docs/benchmarks.md has the figures; all measured
/// when the expert kernels still read each row in one pass per slot). Define it before including peer
/// headers to override the default.
#ifndef PEER_PREFETCH_ROWS
#define PEER_PREFETCH_ROWS 2
#endif
/// Where those requests load to: 2 = L2 (prefetcht1, the default), 3 = L1 (prefetcht0). A row is 8-32
/// lines (the expert kernels now prefetch half a row at a time) and two rows in flight overflow the L1's
/// few miss buffers; on the AMD EPYC AVX-512 host the expert forward at D = 256 ran faster with L2
/// requests (docs/benchmarks.md, "Row prefetching restored").
#ifndef PEER_PREFETCH_LOCALITY
#define PEER_PREFETCH_LOCALITY 2
#endif

namespace detail {

/// Asks the CPU to start loading [p, p + bytes) into cache, one request per 64-byte line (a hint: no
/// effect on results). Random rows of a table far larger than the cache stall on DRAM latency at each row
/// start; the kernels call this a few rows ahead. On x86 the requests are inline assembly: GCC 12 deletes a
/// loop whose only statements are __builtin_prefetch calls when its trip count is not a constant (the
/// loop has no side effects to it), so the builtin version issued nothing at all for rows of run-time size.
inline void prefetch_bytes(const void* p, Index bytes) {
  // From the start of the line holding the first byte, so that a range that does not start on a line
  // boundary (half a row of an odd width) still has its last line requested.
  const Index lead = static_cast<Index>(reinterpret_cast<std::uintptr_t>(p) & 63u);
  const char* c = static_cast<const char*>(p) - lead;
  bytes += lead;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  for (Index off = 0; off < bytes; off += 64) {
#if PEER_PREFETCH_LOCALITY == 2
    __asm__ volatile("prefetcht1 %0" : : "m"(*(c + off)));
#else
    __asm__ volatile("prefetcht0 %0" : : "m"(*(c + off)));
#endif
  }
#elif defined(__GNUC__) || defined(__clang__)
  for (Index off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
#else
  (void)c;
  (void)bytes;
#endif
}

}  // namespace detail

/// A [rows, cols] row-major table, either owned (huge-page backed when large) or a view of user memory,
/// stored as Scalar or as bfloat16.
///
/// Row primitives (every kernel reads and writes rows through these, whatever the storage):
///   dot(i, begin, x, n)     = sum_j row_i[begin + j] x[j]
///   axpy(i, begin, a, y, n):  y[j] += a row_i[begin + j]
///   read_row(i, out):         out = row i, widened to Scalar
///   write_row(i, in):         row i = in, rounded to nearest for bf16
/// For native storage dot and axpy are Eigen's, exactly what the kernels computed before bf16 existed.
template <typename Scalar>
class RowTable {
 public:
  RowTable() = default;

  /// Owned storage, zero-filled.
  RowTable(Index rows, Index cols, TableStorage storage = TableStorage::kNative)
      : storage_(storage), rows_(rows), cols_(cols) {
    if (storage == TableStorage::kBFloat16) {
      owned_bf16_ = AlignedBuffer<bfloat16>(rows * cols);
      bf16_ = owned_bf16_.data();
    } else {
      owned_ = AlignedBuffer<Scalar>(rows * cols);
      data_ = owned_.data();
    }
  }

  /// A view of `rows * cols` scalars the caller owns and keeps alive (row-major, contiguous rows).
  static RowTable view(Scalar* data, Index rows, Index cols) {
    if (data == nullptr && rows * cols > 0) throw std::invalid_argument("RowTable::view: data is null");
    RowTable t;
    t.data_ = data;
    t.rows_ = rows;
    t.cols_ = cols;
    return t;
  }
  /// A view of `rows * cols` bf16 values the caller owns and keeps alive.
  static RowTable view(bfloat16* data, Index rows, Index cols) {
    if (data == nullptr && rows * cols > 0) throw std::invalid_argument("RowTable::view: data is null");
    RowTable t;
    t.storage_ = TableStorage::kBFloat16;
    t.bf16_ = data;
    t.rows_ = rows;
    t.cols_ = cols;
    return t;
  }

  RowTable(RowTable&&) noexcept = default;
  RowTable& operator=(RowTable&&) noexcept = default;

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  TableStorage storage() const { return storage_; }
  bool is_bf16() const { return storage_ == TableStorage::kBFloat16; }
  bool owns_memory() const { return owned_.data() != nullptr || owned_bf16_.data() != nullptr; }
  /// A read-only table (a view of memory mapped read-only: MapMode::kReadOnly) serves the const row
  /// primitives; every mutable access (row, data, bf16_row, bf16_data, write_row, matrix) throws
  /// std::logic_error instead of writing to memory the process may not write.
  bool read_only() const { return read_only_; }
  void set_read_only(bool read_only) { read_only_ = read_only; }
  /// Bytes of one stored row, and of the whole table.
  Index row_bytes() const { return cols_ * static_cast<Index>(is_bf16() ? sizeof(bfloat16) : sizeof(Scalar)); }
  Index bytes() const { return rows_ * row_bytes(); }

  /// Row i of a native table (throws std::logic_error for a bf16 table: use the row primitives or bf16_row).
  Scalar* row(Index i) { return writable(native("row")) + i * cols_; }
  const Scalar* row(Index i) const { return native("row") + i * cols_; }
  Scalar* data() { return writable(native("data")); }
  const Scalar* data() const { return native("data"); }
  /// Row i of a bf16 table (throws std::logic_error for a native one).
  bfloat16* bf16_row(Index i) { return writable(bf16("bf16_row")) + i * cols_; }
  const bfloat16* bf16_row(Index i) const { return bf16("bf16_row") + i * cols_; }
  bfloat16* bf16_data() { return writable(bf16("bf16_data")); }
  const bfloat16* bf16_data() const { return bf16("bf16_data"); }

  /// Where the entries live, whatever the storage (an identity for views).
  const void* storage_data() const { return is_bf16() ? static_cast<const void*>(bf16_) : static_cast<const void*>(data_); }

  /// sum_{j < n} row_i[begin + j] x[j], in Scalar.
  Scalar dot(Index i, Index begin, const Scalar* x, Index n) const {
    if (is_bf16()) return detail::dot_bf16(bf16_ + i * cols_ + begin, x, n);
    return RowMap(data_ + i * cols_ + begin, n).dot(RowMap(x, n));
  }
  /// y[j] += a row_i[begin + j] for j < n.
  void axpy(Index i, Index begin, Scalar a, Scalar* y, Index n) const {
    if (is_bf16()) {
      detail::axpy_bf16(a, bf16_ + i * cols_ + begin, y, n);
    } else {
      Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(y, n) += a * RowMap(data_ + i * cols_ + begin, n);
    }
  }
  /// out[0, cols) = row i in Scalar (exact: bf16 widens without rounding).
  void read_row(Index i, Scalar* out) const {
    if (is_bf16()) {
      detail::widen_row(bf16_ + i * cols_, out, cols_);
    } else {
      std::copy(data_ + i * cols_, data_ + (i + 1) * cols_, out);
    }
  }
  /// Row i = in[0, cols), rounded to the nearest bf16 (ties to even) for a bf16 table.
  void write_row(Index i, const Scalar* in) {
    writable(this);
    if (is_bf16()) {
      detail::narrow_row_nearest(in, bf16_ + i * cols_, cols_);
    } else {
      std::copy(in, in + cols_, data_ + i * cols_);
    }
  }

  /// Asks the CPU to start loading row i (every cache line of it); see PEER_PREFETCH_ROWS.
  void prefetch(Index i) const { prefetch(i, 0, cols_); }
  /// The same for columns [begin, begin + n) of row i only (the u or the v half of an expert's row);
  /// 0 <= begin and begin + n <= cols().
  void prefetch(Index i, Index begin, Index n) const {
    PEER_ASSERT(begin >= 0 && n >= 0 && begin + n <= cols_);
    const void* p = is_bf16() ? static_cast<const void*>(bf16_ + i * cols_ + begin) : static_cast<const void*>(data_ + i * cols_ + begin);
    detail::prefetch_bytes(p, n * static_cast<Index>(is_bf16() ? sizeof(bfloat16) : sizeof(Scalar)));
  }

  /// The whole table as a matrix (native tables only).
  MatrixMap<Scalar> matrix() { return MatrixMap<Scalar>(writable(native("matrix")), rows_, cols_, Eigen::OuterStride<>(cols_)); }
  ConstMatrixMap<Scalar> matrix() const {
    return ConstMatrixMap<Scalar>(native("matrix"), rows_, cols_, Eigen::OuterStride<>(cols_));
  }

 private:
  using RowMap = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;

  Scalar* native(const char* what) const {
    if (is_bf16()) throw std::logic_error(std::string("RowTable::") + what + ": the table is stored as bfloat16; use the row primitives (dot, axpy, read_row, write_row) or bf16_row");
    return data_;
  }
  template <typename T>
  T* writable(T* p) const {
    if (read_only_) throw std::logic_error("RowTable: the table is read-only (mapped with MapMode::kReadOnly); map it copy-on-write or write-back to change it");
    return p;
  }
  bfloat16* bf16(const char* what) const {
    if (!is_bf16()) throw std::logic_error(std::string("RowTable::") + what + ": the table is stored as the layer's Scalar, not bfloat16");
    return bf16_;
  }

  AlignedBuffer<Scalar> owned_;
  AlignedBuffer<bfloat16> owned_bf16_;
  TableStorage storage_ = TableStorage::kNative;
  Scalar* data_ = nullptr;
  bfloat16* bf16_ = nullptr;
  Index rows_ = 0;
  Index cols_ = 0;
  bool read_only_ = false;
};

}  // namespace peer

#endif  // PEER_CORE_ROW_TABLE_HPP
