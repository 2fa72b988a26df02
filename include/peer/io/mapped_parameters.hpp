// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPPED_PARAMETERS_HPP
#define PEER_IO_MAPPED_PARAMETERS_HPP

/// \file
/// MappedParameters<Scalar>: a layout's parameters opened from a checkpoint file with every table mapped
/// from the file instead of read into memory (zero-copy), and the small dense tensors and buffers read.
/// A layer or model runs on parameters() with the same kernels as on in-memory tables (the tables are
/// RowTable views of the mapping), so forward, backward and updates are bitwise those of in-memory
/// parameters with the same values.
///
///     peer::MappedParameters<float> mapped(path, layer.layout(), "peer", {peer::MapMode::kReadOnly});
///     layer.forward(mapped.parameters(), x, y, ws, peer::Mode::kEval);
///
/// The file is a checkpoint (docs/checkpoint-format.md) with the tensors "<prefix>.<name>" that
/// TrainingCheckpoint::add_parameters(prefix, params) writes (an empty prefix: "<name>"); other tensors
/// (optimizer state) are ignored. Each table's data must start at a multiple of the page size, which
/// TrainingCheckpoint ensures for files it writes now (2 MiB: CheckpointFormat::kMapAlignment); files
/// written before tables were aligned are rejected here with the tensor's name and offset, and still
/// load through TrainingCheckpoint::load (a copy).
///
/// Modes (MapOptions::mode; peer/io/mapped_file.hpp):
///   kReadOnly     inference: pages are read on demand and can be dropped, so a table larger than RAM
///                 serves; the tables are read-only (an optimizer step is refused, a mutable access
///                 throws std::logic_error).
///   kCopyOnWrite  fine-tuning that must not touch the file: updated rows live in private pages.
///   kWriteBack    training a table larger than RAM: updates reach the file. Before the first write the
///                 whole file's checksums are verified; flush() writes the tables back (msync), stores
///                 their new CRC-32C and the header's in the file's header, and fsyncs. Between flushes the
///                 file's table checksums are stale: a reader rejects it ("checksum mismatch") until the
///                 next flush, so a crash between flushes is detected, not silently loaded. Only the
///                 checksum fields change: the file keeps its layout. Keep the optimizer's state in
///                 another file: a save_checkpoint to this path would replace the file the mapping holds.
///
/// Checks before anything is mapped (std::runtime_error "mapped parameters <path>: ..."): the checkpoint's
/// structure (CheckpointReader), every tensor of the layout present with its shape and the dtype of its
/// storage (Scalar, or bfloat16 for a bf16 table), and each table's offset page-aligned. Dense tensors and
/// buffers are read with their checksums checked; tables are verified when MapOptions::verify is set
/// (always for kWriteBack), or later on demand with verify().

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/parameters.hpp"
#include "peer/io/checkpoint.hpp"
#include "peer/io/mapped_file.hpp"

namespace peer {

struct MapOptions {
  MapMode mode = MapMode::kReadOnly;
  /// Read-ahead advice for the tables (a batch reads random rows).
  MapAccess access = MapAccess::kRandom;
  /// MADV_HUGEPAGE on the tables (see MappedFileRange::advise_huge_pages). Off by default: on Linux 6.18
  /// with ext4 it made each page fault of the file mapping read a 2 MiB folio whatever the access advice
  /// (2.7 major faults per token instead of 123, 1.4 GiB read for a cold batch of 256 tokens from a 2 GiB
  /// table): faster while the table is small enough to read whole, ruinous for a pool larger than RAM
  /// (docs/mapped.md, docs/benchmarks.md).
  bool huge_pages = false;
  /// Verify every checksum of the file before mapping (reads the whole file once); always done for
  /// kWriteBack, whatever this says.
  bool verify = false;
};

/// Writes a checkpoint of `layout`'s tensors as "<prefix>.<name>" (as TrainingCheckpoint::add_parameters
/// names them), every value zero, tables aligned for mapping (2 MiB, or 64 KiB below 2 MiB): the file a
/// table larger than RAM starts from. Map it with MapMode::kWriteBack, initialize the layer on
/// parameters() and flush(). Streams the zeros in chunks: memory stays at one chunk whatever N is.
template <typename Scalar>
void create_parameters_file(const std::string& path, const ParameterLayout& layout, const std::string& prefix) {
  auto full = [&](const std::string& name) { return prefix.empty() ? name : prefix + "." + name; };
  std::vector<TensorView> views;
  auto zeros = [](std::int64_t r0, std::int64_t r1, void* dst, std::size_t row_bytes) {
    std::memset(dst, 0, static_cast<std::size_t>(r1 - r0) * row_bytes);
  };
  auto add = [&](const TensorSpec& s, DType dtype, std::uint64_t alignment) {
    TensorView v;
    v.name = full(s.name);
    v.dtype = dtype;
    v.rows = s.rows;
    v.cols = s.cols;
    v.alignment = alignment;
    const std::size_t row_bytes = static_cast<std::size_t>(s.cols) * dtype_size(dtype);
    if (s.size() > 0) v.producer = [=](std::int64_t r0, std::int64_t r1, void* dst) { zeros(r0, r1, dst, row_bytes); };
    views.push_back(std::move(v));
  };
  for (const auto& s : layout.dense()) add(s, dtype_of<Scalar>(), 0);
  for (const auto& s : layout.buffers()) add(s, dtype_of<Scalar>(), 0);
  for (const auto& s : layout.tables()) {
    const DType dtype = s.storage == TableStorage::kBFloat16 ? DType::kBFloat16 : dtype_of<Scalar>();
    const auto bytes = static_cast<std::uint64_t>(s.size()) * dtype_size(dtype);
    add(s, dtype, CheckpointFormat::map_alignment(bytes));
  }
  save_checkpoint(path, {{"peer.kind", "parameters"}}, views);
}

template <typename Scalar>
class MappedParameters {
 public:
  MappedParameters(const std::string& path, const ParameterLayout& layout, const std::string& prefix, MapOptions options = {})
      : path_(path), where_("mapped parameters " + path + ": "), options_(options) {
#if defined(PEER_HAS_MMAP)
    const bool write_back = options.mode == MapMode::kWriteBack;
    fd_ = detail::open_file(path, write_back ? O_RDWR : O_RDONLY);
    if (fd_ < 0) detail::throw_errno(where_ + "cannot open", errno);
    try {
      open(layout, prefix);
    } catch (...) {
      (void)::close(fd_);
      throw;
    }
#else
    (void)layout, (void)prefix;
    throw std::runtime_error(where_ + "memory-mapped files need a POSIX system");
#endif
  }

  ~MappedParameters() {
#if defined(PEER_HAS_MMAP)
    if (fd_ >= 0) (void)::close(fd_);
#endif
  }
  MappedParameters(const MappedParameters&) = delete;
  MappedParameters& operator=(const MappedParameters&) = delete;

  Parameters<Scalar>& parameters() { return params_; }
  const Parameters<Scalar>& parameters() const { return params_; }
  const MapOptions& options() const { return options_; }
  const std::string& path() const { return path_; }

  /// Bytes of the file mapped (every table), and of them in memory now (page cache or private copies).
  std::uint64_t mapped_bytes() const {
    std::uint64_t n = 0;
    for (const auto& t : tables_) n += t.range.length();
    return n;
  }
  std::uint64_t resident_bytes() const {
    std::uint64_t n = 0;
    for (const auto& t : tables_) n += t.range.resident_bytes();
    return n;
  }

  /// Read-only: every table's pages dropped from the process and the page cache (MappedFileRange::evict),
  /// so the next rows come from the disk. Other modes throw std::logic_error.
  void evict() const {
    for (const auto& t : tables_) t.range.evict(fd_, t.offset);
  }

  /// Checks every mapped table against the checksum the file's header holds now (as of the last flush for
  /// kWriteBack; as of the file's writing otherwise, so for kCopyOnWrite only untouched tables pass).
  /// Throws std::runtime_error naming the table.
  void verify() const {
    for (const auto& t : tables_) {
      const std::uint32_t computed = crc32c(t.range.data(), static_cast<std::size_t>(t.range.length()));
      if (computed != t.crc) {
        throw std::runtime_error(where_ + "checksum mismatch in table " + detail::quote_text(t.name) + " (stored " +
                                 detail::hex32(t.crc) + ", computed " + detail::hex32(computed) + ")");
      }
    }
  }

  /// kWriteBack: every table written back (msync), the dense tensors and buffers written to their places
  /// in the file (they live in memory), every new CRC-32C and the header checksum stored, fsync. When it
  /// returns, the file is a valid checkpoint holding the parameters as they are now. Other modes throw
  /// std::logic_error (nothing of theirs reaches the file).
  void flush() {
#if defined(PEER_HAS_MMAP)
    if (options_.mode != MapMode::kWriteBack) {
      throw std::logic_error(where_ + "flush() needs MapMode::kWriteBack (this mapping is " + to_string(options_.mode) + ")");
    }
    for (auto& t : tables_) {
      t.range.sync();
      t.crc = crc32c(t.range.data(), static_cast<std::size_t>(t.range.length()));
      detail::write_at(fd_, &t.crc, 4, t.checksum_offset, where_ + "cannot write the checksum of " + detail::quote_text(t.name));
    }
    for (const auto& d : in_memory_) {
      const std::uint32_t crc = crc32c(d.data, static_cast<std::size_t>(d.bytes));
      detail::write_at(fd_, d.data, static_cast<std::size_t>(d.bytes), d.offset, where_ + "cannot write " + detail::quote_text(d.name));
      detail::write_at(fd_, &crc, 4, d.checksum_offset, where_ + "cannot write the checksum of " + detail::quote_text(d.name));
    }
    // The header checksum covers the bytes before it, the tensors' checksums among them.
    std::vector<unsigned char> header(static_cast<std::size_t>(header_checksum_offset_));
    if (detail::read_at(fd_, header.data(), header.size(), 0, where_ + "cannot read the header") != header.size()) {
      throw std::runtime_error(where_ + "the file shrank while mapped");
    }
    const std::uint32_t header_crc = crc32c(header.data(), header.size());
    detail::write_at(fd_, &header_crc, 4, header_checksum_offset_, where_ + "cannot write the header checksum");
    detail::sync_file(fd_, where_ + "cannot fsync");
#endif
  }

 private:
  struct InMemory {  // a dense tensor or buffer: read at open, written back by flush()
    std::string name;
    const void* data = nullptr;
    std::uint64_t bytes = 0, offset = 0, checksum_offset = 0;
  };
  struct Table {
    std::string name;
    MappedFileRange range;
    std::uint64_t offset = 0, checksum_offset = 0;
    std::uint32_t crc = 0;
  };

  void open(const ParameterLayout& layout, const std::string& prefix) {
    CheckpointReader reader(fd_, path_);
    auto fail = [&](const std::string& what) { throw std::runtime_error(where_ + what); };
    auto full = [&](const std::string& name) { return prefix.empty() ? name : prefix + "." + name; };
    auto expect = [&](const TensorSpec& s, DType dtype) -> const TensorEntry& {
      const std::string name = full(s.name);
      if (!reader.has(name)) fail("tensor " + detail::quote_text(name) + " is missing");
      const TensorEntry& e = reader.entry(name);
      if (e.dtype != dtype || e.rows != s.rows || e.cols != s.cols) {
        fail("tensor " + detail::quote_text(name) + " is " + dtype_name(e.dtype) + " [" + std::to_string(e.rows) + ", " +
             std::to_string(e.cols) + "] in the file but " + dtype_name(dtype) + " [" + std::to_string(s.rows) + ", " +
             std::to_string(s.cols) + "] here");
      }
      return e;
    };
    // Everything is checked before anything is mapped or allocated.
    for (const auto& s : layout.dense()) expect(s, dtype_of<Scalar>());
    for (const auto& s : layout.buffers()) expect(s, dtype_of<Scalar>());
    for (const auto& s : layout.tables()) {
      const TensorEntry& e = expect(s, s.storage == TableStorage::kBFloat16 ? DType::kBFloat16 : dtype_of<Scalar>());
      if (e.offset % page_size() != 0) {
        fail("table " + detail::quote_text(e.name) + " starts at offset " + std::to_string(e.offset) +
             ", not a multiple of the page size " + std::to_string(page_size()) +
             ", so it cannot be mapped (a file written before tables were aligned: load it with TrainingCheckpoint, or save it again)");
      }
    }
    if (options_.verify || options_.mode == MapMode::kWriteBack) reader.verify_all();
    header_checksum_offset_ = reader.header_checksum_offset();

    dense_ = AlignedBuffer<Scalar>(layout.dense_size());
    buffers_ = AlignedBuffer<Scalar>(layout.buffer_size());
    auto read = [&](const TensorSpec& s, Scalar* dst) {
      const TensorEntry& e = reader.entry(full(s.name));
      if (s.size() > 0) reader.read(e.name, dtype_of<Scalar>(), s.rows, s.cols, dst);
      in_memory_.push_back(InMemory{e.name, dst, e.bytes, e.offset, e.checksum_offset});
    };
    for (const auto& s : layout.dense()) read(s, dense_.data() + s.offset);
    for (const auto& s : layout.buffers()) read(s, buffers_.data() + s.offset);
    typename Parameters<Scalar>::ExternalMemory memory;
    memory.dense = dense_.data();
    memory.buffers = buffers_.data();
    for (const auto& s : layout.tables()) {
      const TensorEntry& e = reader.entry(full(s.name));
      Table t{e.name, MappedFileRange(fd_, e.offset, e.bytes, options_.mode, "table " + detail::quote_text(e.name) + " of " + path_),
              e.offset, e.checksum_offset, e.crc32c};
      (void)t.range.advise(options_.access);
      if (options_.huge_pages) (void)t.range.advise_huge_pages();
      typename Parameters<Scalar>::TableMemory m;
      if (s.storage == TableStorage::kBFloat16) {
        m.bf16 = static_cast<bfloat16*>(t.range.data());
      } else {
        m.native = static_cast<Scalar*>(t.range.data());
      }
      m.read_only = options_.mode == MapMode::kReadOnly;
      memory.tables.push_back(m);
      tables_.push_back(std::move(t));
    }
    params_ = Parameters<Scalar>(layout, memory);
  }

  std::string path_, where_;
  MapOptions options_;
  int fd_ = -1;
  std::uint64_t header_checksum_offset_ = 0;
  AlignedBuffer<Scalar> dense_, buffers_;
  std::vector<InMemory> in_memory_;
  std::vector<Table> tables_;
  Parameters<Scalar> params_;
};

}  // namespace peer

#endif  // PEER_IO_MAPPED_PARAMETERS_HPP
