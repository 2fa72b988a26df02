// SPDX-License-Identifier: MIT
#ifndef PEER_IO_CHECKPOINT_HPP
#define PEER_IO_CHECKPOINT_HPP

/// \file
/// Checkpoint files: named 2-D tensors and string metadata, written atomically, read back only after every
/// byte has been checked. A file is untrusted input: the reader bounds every count and length by the
/// format's limits and by the file's size before it allocates or reads, and names the first broken rule.
/// This header is the interface; the definitions are in peer/io/detail/checkpoint_impl.hpp.
///
/// File layout, format version 1 (docs/checkpoint-format.md has the full description). Integers are in the
/// writer's native byte order, which the endianness marker records; tensor data is row-major, native order.
///
///     offset      size  field
///     0           8     magic "PEERCKPT"
///     8           4     u32 format version = 1
///     12          4     u32 endianness marker 0x01020304 (a reader of the other byte order sees 0x04030201)
///     16          8     u64 header length L
///     24          L     header:
///                         u32 metadata count M, then M x { u32 key length, key, u32 value length, value }
///                         u32 tensor count T,   then T x { u32 name length, name, u8 dtype, i64 rows,
///                                                          i64 cols, u64 data offset, u64 data length,
///                                                          u32 CRC-32C of the data }
///     24 + L      4     u32 CRC-32C of bytes [0, 24 + L)
///     28 + L      ...   for each tensor in header order: zero padding up to its data offset (a multiple
///                       of 64; of 2 MiB for the tables TrainingCheckpoint writes), then its rows * cols * size(dtype) bytes. The file ends where the last
///                       tensor's data ends (at 28 + L without tensors).
///
/// Limits, enforced by the writer and the reader (CheckpointFormat): names and keys are 1 to 4096 bytes of
/// UTF-8 without NUL, unique; metadata values (arbitrary bytes) up to 1 MiB; up to 65536 metadata entries
/// and 2^20 tensors; a header of at most 256 MiB; a tensor of at most 2^62 bytes.
///
/// Every byte of a file is covered: the prefix and header by the header checksum, each tensor's data by its
/// own CRC-32C, and the padding by the rule that it is zero. CRC-32C detects every error burst of up to 32
/// bits, so any single corrupted byte is always detected (the tests flip every byte of a file).
///
/// Intended load sequence, so that a bad file never changes the model:
///
///     peer::CheckpointReader reader(path);  // parses and checks the header and the index
///     reader.verify_all();                  // streams every tensor through its checksum
///     for (each tensor the model expects)   // presence, dtype and shape against the model
///       if (!reader.has(name) || reader.entry(name).rows != ...) reject the file;
///     for (each tensor) reader.read(name, dtype, rows, cols, live_memory);  // only now touch the model
///
/// read() checks the checksum again while it reads. A file modified in place between verify_all() and
/// read() is caught by that re-check, but the destination is then partially overwritten; a caller that
/// needs the model to stay untouched even then reads into scratch memory and copies. (Replacing the file by
/// rename, as save_checkpoint does, does not affect an open reader: it keeps reading the file it opened.)
///
/// Errors: invalid arguments to save_checkpoint (names, shapes, limits, missing data) throw
/// std::invalid_argument before any file is created; I/O failures and every problem found in a file throw
/// std::runtime_error("checkpoint <path>: <reason>"), with the errno text for I/O failures. The I/O needs
/// POSIX (open, pread, pwrite, fsync, rename); elsewhere these functions throw std::runtime_error.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peer/core/bfloat16.hpp"

namespace peer {

/// Element type of a stored tensor. The values are the on-disk codes.
enum class DType : std::uint8_t { kFloat32 = 1, kFloat64 = 2, kInt32 = 3, kInt64 = 4, kUInt8 = 5, kBFloat16 = 6 };

/// Bytes per element, or 0 for a code that is not a DType.
inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kInt32:
      return 4;
    case DType::kInt64:
      return 8;
    case DType::kUInt8:
      return 1;
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

/// "float32", "float64", "int32", "int64", "uint8", "bfloat16", or "unknown dtype <code>".
inline std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kUInt8:
      return "uint8";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown dtype " + std::to_string(static_cast<unsigned>(dtype));
}

/// The DType of a C++ element type: dtype_of<float>() == DType::kFloat32.
template <typename T>
constexpr DType dtype_of() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    std::is_same<T, std::int32_t>::value || std::is_same<T, std::int64_t>::value ||
                    std::is_same<T, std::uint8_t>::value || std::is_same<T, Eigen::bfloat16>::value,
                "peer::dtype_of: T must be float, double, std::int32_t, std::int64_t, std::uint8_t or Eigen::bfloat16");
  if (std::is_same<T, float>::value) return DType::kFloat32;
  if (std::is_same<T, double>::value) return DType::kFloat64;
  if (std::is_same<T, std::int32_t>::value) return DType::kInt32;
  if (std::is_same<T, std::int64_t>::value) return DType::kInt64;
  if (std::is_same<T, Eigen::bfloat16>::value) return DType::kBFloat16;
  return DType::kUInt8;
}

/// Constants and limits of checkpoint format version 1.
struct CheckpointFormat {
  static constexpr char kMagic[9] = "PEERCKPT";  ///< 8 bytes on disk, no terminator
  static constexpr std::uint32_t kVersion = 1;
  static constexpr std::uint32_t kEndianMarker = 0x01020304u;
  static constexpr std::uint64_t kPrefixBytes = 24;  ///< magic, version, marker, header length
  static constexpr std::uint64_t kAlignment = 64;    ///< of every tensor's data offset (a cache line)
  /// What TrainingCheckpoint aligns parameter tables to, so that MappedParameters can map them in place:
  /// 2 MiB, a huge page (and a multiple of every page size). The gap before such a tensor is a hole in the
  /// file (zeros that take no disk space on the usual file systems).
  static constexpr std::uint64_t kMapAlignment = std::uint64_t{2} << 20;
  /// ... and smaller tables to 64 KiB, the largest common page size (a 2 MiB gap would dwarf them).
  static constexpr std::uint64_t kSmallMapAlignment = std::uint64_t{64} << 10;
  static constexpr std::uint64_t map_alignment(std::uint64_t table_bytes) {
    return table_bytes >= kMapAlignment ? kMapAlignment : kSmallMapAlignment;
  }
  static constexpr std::uint64_t kMaxAlignment = std::uint64_t{1} << 30;
  static constexpr std::size_t kMaxNameBytes = 4096;
  static constexpr std::size_t kMaxValueBytes = std::size_t{1} << 20;
  static constexpr std::size_t kMaxMetadata = std::size_t{1} << 16;
  static constexpr std::size_t kMaxTensors = std::size_t{1} << 20;
  static constexpr std::uint64_t kMaxHeaderBytes = std::uint64_t{256} << 20;
  static constexpr std::uint64_t kMaxTensorBytes = std::uint64_t{1} << 62;
  /// Data moves in chunks of this size: memory use is bounded and the CRC runs on cache-warm bytes.
  static constexpr std::size_t kChunkBytes = std::size_t{1} << 20;
};

/// CRC-32C (Castagnoli, the iSCSI / ext4 / SSE4.2 polynomial) of `size` bytes, continuing from `crc`, the
/// CRC of the bytes before them: crc32c(b, nb, crc32c(a, na)) == crc32c(a followed by b).
/// crc32c("123456789", 9) == 0xE3069283.
inline std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc = 0);

/// Fills rows [row_begin, row_end) of a tensor, row-major, into `dst` (exactly (row_end - row_begin) *
/// cols * dtype_size(dtype) bytes). Called in row order with about CheckpointFormat::kChunkBytes per call
/// (at least one row).
using RowProducer = std::function<void(std::int64_t row_begin, std::int64_t row_end, void* dst)>;

/// A tensor to write: either `data`, rows * cols contiguous row-major elements the caller keeps alive
/// during the save (written in chunks, never copied whole), or a `producer` for data that is not
/// contiguous or must be converted. Exactly one of them is set, except that an empty tensor needs neither.
struct TensorView {
  std::string name;
  DType dtype = DType::kFloat32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  const void* data = nullptr;
  RowProducer producer;
  /// The data offset's alignment: 0 for the format's 64 bytes, or a power of two from 64 to 2^30
  /// (CheckpointFormat::kMapAlignment for a table that is to be memory-mapped).
  std::uint64_t alignment = 0;
};

/// A tensor of a checkpoint file, as its header describes it.
struct TensorEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::uint64_t offset = 0;  ///< of the data in the file
  std::uint64_t bytes = 0;   ///< rows * cols * dtype_size(dtype)
  std::uint32_t crc32c = 0;  ///< of the data
  std::uint64_t checksum_offset = 0;  ///< where the file stores crc32c (in the header)
};

/// Writes a checkpoint atomically: the data goes to `path.tmp.<pid>.<n>` in the same directory, which is
/// fsync'ed, closed and renamed over `path`; then the directory is fsync'ed. After a crash `path` holds the
/// old file or the new one, never a mix (a stale temporary file may remain). On any failure the temporary
/// file is removed and `path` is untouched; an exception thrown by a producer propagates unchanged.
/// Tensors are written in the given order, metadata values are arbitrary bytes, keys follow the name rule.
/// Memory: the header, plus one chunk (CheckpointFormat::kChunkBytes, or one row if larger) for producer
/// tensors. Each data chunk is checksummed and written; the header, which holds the checksums, goes last.
inline void save_checkpoint(const std::string& path, const std::vector<std::pair<std::string, std::string>>& metadata,
                            const std::vector<TensorView>& tensors);

/// Reads a checkpoint file; see the file comment for the intended load sequence. The constructor checks
/// everything that does not need the tensor data; verify_all() checks the data. Const member functions may
/// be called from several threads at once (positional reads on one descriptor). Move-only.
class CheckpointReader {
 public:
  /// Opens `path` and checks, in this order: the magic, the endianness marker, the format version, the
  /// header length (limit, file size), the header checksum, then every header field (counts and lengths
  /// within limits and within the header, names valid and unique, dtypes known, rows and cols >= 0 and
  /// their byte size representable, data lengths consistent with shapes, offsets aligned, increasing,
  /// clear of the header and of each other, inside the file), that the header's fields fill exactly its
  /// length, and that the file ends where the last tensor ends. Throws std::runtime_error.
  explicit CheckpointReader(const std::string& path);
  /// Reads from an open descriptor instead (a pipe is not enough: it must support pread and fstat, as a
  /// regular file or a memfd does), with `name` in the messages. The reader keeps its own duplicate of
  /// `fd`; the caller may close `fd` at once. For in-memory bytes (fuzzers, network buffers): write them
  /// to a memfd_create() descriptor.
  CheckpointReader(int fd, const std::string& name);
  ~CheckpointReader();
  CheckpointReader(CheckpointReader&& other) noexcept;
  CheckpointReader& operator=(CheckpointReader&& other) noexcept;
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  const std::string& path() const { return path_; }
  std::uint64_t file_size() const { return file_size_; }
  /// Where the header checksum (CRC-32C of bytes [0, offset)) is stored: 24 + the header length.
  std::uint64_t header_checksum_offset() const { return data_begin_ - 4; }

  /// All metadata in file order.
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  bool has_metadata(const std::string& key) const { return metadata_index_.count(key) != 0; }
  /// The value of `key`; throws std::runtime_error if the file has no such key.
  const std::string& metadata(const std::string& key) const;

  /// All tensors in file order.
  const std::vector<TensorEntry>& tensors() const { return tensors_; }
  bool has(const std::string& name) const { return tensor_index_.count(name) != 0; }
  /// The entry of tensor `name`; throws std::runtime_error if the file has no such tensor.
  const TensorEntry& entry(const std::string& name) const;

  /// Streams through the whole data region in chunks: every tensor's CRC-32C must match its header entry
  /// and every padding byte must be zero. Throws std::runtime_error naming the tensor or the byte.
  void verify_all() const;

  /// Reads tensor `name` into `dst` (rows * cols elements of `dtype`, row-major), after checking that the
  /// file's dtype and shape are the expected ones (std::runtime_error naming both otherwise). Reads in
  /// chunks straight into `dst` and re-checks the checksum; on a mismatch `dst` holds unverified bytes.
  void read(const std::string& name, DType dtype, std::int64_t rows, std::int64_t cols, void* dst) const;

  /// Receives rows [row_begin, row_end) of a tensor, row-major, at `data` (valid during the call only).
  using RowConsumer = std::function<void(std::int64_t row_begin, std::int64_t row_end, const void* data)>;
  /// Reads tensor `name` (dtype and shape checked as by read()) in chunks of whole rows, about
  /// CheckpointFormat::kChunkBytes each (at least one row), handing each to `consume` in row order; the
  /// checksum is checked after the last chunk. For a tensor that is not to be copied whole (rows picked
  /// out of a shard); the consumer sees unverified bytes unless verify_all() came first.
  void stream(const std::string& name, DType dtype, std::int64_t rows, std::int64_t cols, const RowConsumer& consume) const;

 private:
  void open_descriptor();  // fstat fd_, then parse(); closes fd_ on failure
  void parse();
  std::size_t read_some(void* dst, std::size_t n, std::uint64_t offset) const;
  void read_exact(void* dst, std::size_t n, std::uint64_t offset, const TensorEntry& near) const;
  void check_crc(const TensorEntry& e, std::uint32_t computed, const char* context) const;
  const TensorEntry& expect(const std::string& name, DType dtype, std::int64_t rows, std::int64_t cols) const;

  std::string path_, where_;  // where_ = "checkpoint <path>: ", the prefix of every message
  int fd_ = -1;
  std::uint64_t file_size_ = 0;
  std::uint64_t data_begin_ = 0;  // end of the header checksum
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::vector<TensorEntry> tensors_;
  std::unordered_map<std::string, std::size_t> metadata_index_, tensor_index_;
};

}  // namespace peer

#include "peer/io/detail/checkpoint_impl.hpp"

#endif  // PEER_IO_CHECKPOINT_HPP
