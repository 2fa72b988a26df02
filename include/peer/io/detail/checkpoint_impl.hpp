// SPDX-License-Identifier: MIT
#ifndef PEER_IO_DETAIL_CHECKPOINT_IMPL_HPP
#define PEER_IO_DETAIL_CHECKPOINT_IMPL_HPP

/// \file
/// Definitions of peer/io/checkpoint.hpp (include that header, not this one) and their helpers: CRC-32C,
/// the name rule (UTF-8 without NUL), native-order encoding and bounds-checked decoding of the header, and
/// POSIX file I/O whose errors name the file and the errno text.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "peer/io/checkpoint.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#endif

namespace peer {
namespace detail {

// ---- CRC-32C --------------------------------------------------------------------------------------

/// Slicing-by-8 tables of CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, as in iSCSI, ext4 and
/// SSE4.2's crc32 instruction). t[0][b] is the CRC register after byte b; t[k][b] = t[0] applied to
/// t[k-1][b] shifted by one more zero byte, so one step folds 8 input bytes with 8 lookups (about 4x the
/// speed of the byte-at-a-time loop, well above disk bandwidth). 8 KiB, built at compile time.
struct Crc32cTables {
  std::uint32_t t[8][256];
  constexpr Crc32cTables() : t{} {
    for (std::uint32_t b = 0; b < 256; ++b) {
      std::uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      t[0][b] = c;
    }
    for (int k = 1; k < 8; ++k) {
      for (std::uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
    }
  }
};
inline constexpr Crc32cTables kCrc32cTables{};

/// Advances the raw (non-inverted) CRC-32C register over n bytes. Bytes are combined explicitly, so the
/// result does not depend on the machine's byte order or on the alignment of `p`.
inline std::uint32_t crc32c_update(std::uint32_t state, const unsigned char* p, std::size_t n) {
  const auto& t = kCrc32cTables.t;
  for (; n >= 8; n -= 8, p += 8) {
    const std::uint32_t lo = state ^ (static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
                                      static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24);
    state = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^ t[3][p[4]] ^
            t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
  }
  for (; n > 0; --n, ++p) state = (state >> 8) ^ t[0][(state ^ *p) & 0xFFu];
  return state;
}

// ---- Names ----------------------------------------------------------------------------------------

/// Empty if `s` is a valid tensor name or metadata key, else the rule it breaks. A name is 1 to
/// `max_bytes` bytes of well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF)
/// without NUL, so it prints, compares and round-trips through C strings and JSON unchanged.
inline std::string name_problem(const std::string& s, std::size_t max_bytes) {
  if (s.empty()) return "must not be empty";
  if (s.size() > max_bytes) {
    return "is " + std::to_string(s.size()) + " bytes long, the limit is " + std::to_string(max_bytes);
  }
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned c = p[i];
    const std::string at = " at byte " + std::to_string(i);
    if (c == 0) return "contains a NUL byte" + at;
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // UTF-16 surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return "is not valid UTF-8" + at;
    }
    if (n - i < len || p[i + 1] < lo || p[i + 1] > hi) return "is not valid UTF-8" + at;
    for (std::size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xC0u) != 0x80u) return "is not valid UTF-8" + at;
    }
    i += len;
  }
  return "";
}

/// `s` quoted for a message, cut to 64 bytes and with control bytes escaped (names come from files).
inline std::string quote_text(const std::string& s) {
  static const char* const kHex = "0123456789abcdef";
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < 64; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F || c == '\'' || c == '\\') {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xFu];
    } else {
      out += s[i];
    }
  }
  return out + (s.size() > 64 ? "'..." : "'");
}

/// "0x" + 8 hex digits.
inline std::string hex32(std::uint32_t v) {
  static const char* const kHex = "0123456789abcdef";
  std::string out = "0x";
  for (int shift = 28; shift >= 0; shift -= 4) out += kHex[(v >> shift) & 0xFu];
  return out;
}

// ---- Encoding -------------------------------------------------------------------------------------

/// Appends the native-order bytes of an integer.
template <typename T>
void put(std::string& out, T value) {
  static_assert(std::is_integral<T>::value, "put: integers only");
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

/// Reads a header from memory; every read is bounds-checked and an overrun names the field.
class ByteCursor {
 public:
  ByteCursor(const unsigned char* data, std::size_t size, std::string where)
      : data_(data), size_(size), where_(std::move(where)) {}

  template <typename T>
  T get(const std::string& what) {
    static_assert(std::is_integral<T>::value, "get: integers only");
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string get_bytes(std::size_t n, const std::string& what) {
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

  /// A u32 length (at most `limit`) followed by that many bytes.
  std::string get_string(std::size_t limit, const std::string& what) {
    const auto n = get<std::uint32_t>(what + " length");
    if (n > limit) {
      throw std::runtime_error(where_ + what + " length " + std::to_string(n) + " exceeds the limit " +
                               std::to_string(limit));
    }
    return get_bytes(n, what);
  }

  std::size_t position() const { return pos_; }
  std::size_t remaining() const { return size_ - pos_; }

 private:
  void need(std::size_t n, const std::string& what) const {
    if (n > size_ - pos_) {
      throw std::runtime_error(where_ + "the header ends inside " + what + " (" + std::to_string(n) +
                               " bytes needed at header byte " + std::to_string(pos_) + ", header length " +
                               std::to_string(size_) + ")");
    }
  }

  const unsigned char* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::string where_;
};

// ---- Files ----------------------------------------------------------------------------------------

/// The text of an errno value (thread-safe, unlike strerror).
inline std::string errno_text(int err) { return std::system_category().message(err); }

#if defined(__unix__) || defined(__APPLE__)

/// open(2) with O_CLOEXEC, retried on EINTR; returns the descriptor, or -1 with errno set.
inline int open_file(const std::string& path, int flags, mode_t mode = 0) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

[[noreturn]] inline void throw_errno(const std::string& context, int err) {
  throw std::runtime_error(context + ": " + errno_text(err));
}

inline off_t file_offset(std::uint64_t offset) {
  if (offset > static_cast<std::uint64_t>(std::numeric_limits<off_t>::max())) {
    throw std::runtime_error("checkpoint: offset " + std::to_string(offset) + " does not fit off_t");
  }
  return static_cast<off_t>(offset);
}

/// At most 1 GiB per system call (Linux transfers at most 2 GiB - 4 KiB per call anyway).
inline std::size_t io_step(std::size_t n) { return std::min(n, std::size_t{1} << 30); }

/// Reads up to n bytes at `offset` with pread (no shared file position, so concurrent calls are safe);
/// returns how many were read, fewer only at end of file. Throws std::runtime_error(context: errno text).
inline std::size_t read_at(int fd, void* dst, std::size_t n, std::uint64_t offset, const std::string& context) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t got =
        ::pread(fd, static_cast<unsigned char*>(dst) + done, io_step(n - done), file_offset(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw_errno(context, errno);
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  return done;
}

/// Writes all n bytes at `offset`; throws std::runtime_error(context: errno text).
inline void write_at(int fd, const void* src, std::size_t n, std::uint64_t offset, const std::string& context) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t put_bytes =
        ::pwrite(fd, static_cast<const unsigned char*>(src) + done, io_step(n - done), file_offset(offset + done));
    if (put_bytes < 0 && errno == EINTR) continue;
    if (put_bytes <= 0) throw_errno(context, put_bytes == 0 ? EIO : errno);
    done += static_cast<std::size_t>(put_bytes);
  }
}

inline void sync_file(int fd, const std::string& context) {
  int rc;
  do {
    rc = ::fsync(fd);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) throw_errno(context, errno);
}

/// A temporary file `path.tmp.<pid>.<n>` next to `path` (same directory, hence same file system, so the
/// final rename is atomic), created with O_EXCL. Unlinked on destruction unless commit() renamed it.
class TempFile {
 public:
  TempFile(const std::string& path, const std::string& where) : path_(path), where_(where) {
    static std::atomic<unsigned long> counter{0};
    for (int attempt = 0;; ++attempt) {
      tmp_ = path + ".tmp." + std::to_string(static_cast<long>(::getpid())) + "." + std::to_string(counter++);
      fd_ = open_file(tmp_, O_WRONLY | O_CREAT | O_EXCL, 0666);
      if (fd_ >= 0) break;
      const int err = errno;
      if (err != EEXIST || attempt == 100) {
        throw std::runtime_error(where_ + "cannot create temporary file " + quote_text(tmp_) + ": " + errno_text(err));
      }
    }
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) (void)::close(fd_);
    if (!committed_) (void)::unlink(tmp_.c_str());
  }

  void write(const void* src, std::size_t n, std::uint64_t offset) const {
    write_at(fd_, src, n, offset, where_ + "cannot write temporary file " + quote_text(tmp_));
  }

  /// Sets the file's length (a hole at the end, when the last tensor is empty after a long gap).
  void resize(std::uint64_t size) const {
    if (::ftruncate(fd_, file_offset(size)) != 0) throw_errno(where_ + "cannot resize temporary file " + quote_text(tmp_), errno);
  }

  /// fsync, close (whose error NFS uses for deferred write failures), rename over the final path, then
  /// fsync the directory so that the rename itself survives a crash.
  void commit() {
    sync_file(fd_, where_ + "cannot fsync temporary file " + quote_text(tmp_));
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0 && errno != EINTR)
      throw_errno(where_ + "cannot close temporary file " + quote_text(tmp_), errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      throw_errno(where_ + "cannot rename temporary file " + quote_text(tmp_) + " to it", errno);
    }
    committed_ = true;
    const std::size_t slash = path_.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path_.substr(0, slash);
    const std::string context = where_ + "written and renamed into place, but syncing its directory " + quote_text(dir);
    const int dir_fd = open_file(dir, O_RDONLY);
    if (dir_fd < 0) throw_errno(context + " failed", errno);
    int rc;
    do {
      rc = ::fsync(dir_fd);
    } while (rc != 0 && errno == EINTR);
    const int err = errno;
    (void)::close(dir_fd);
    if (rc != 0) throw_errno(context + " failed", err);
  }

 private:
  std::string path_, where_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

#endif  // POSIX

[[noreturn]] inline void throw_checkpoint_argument(const std::string& where, const std::string& field,
                                                   const std::string& value, const std::string& rule) {
  throw std::invalid_argument(where + field + " = " + value + " " + rule);
}

/// rows * cols * element bytes; calls fail(field, value, rule), which must throw, if a dimension is
/// negative or the product exceeds CheckpointFormat::kMaxTensorBytes (2^62: then offsets and sums of
/// lengths stay far from overflowing u64, i64 and off_t).
template <typename Fail>
std::uint64_t tensor_bytes(std::int64_t rows, std::int64_t cols, std::size_t element, Fail&& fail) {
  constexpr std::uint64_t kLimit = CheckpointFormat::kMaxTensorBytes;
  if (rows < 0) fail("rows", std::to_string(rows), "must be >= 0");
  if (cols < 0) fail("cols", std::to_string(cols), "must be >= 0");
  const auto r = static_cast<std::uint64_t>(rows), c = static_cast<std::uint64_t>(cols);
  if (r != 0 && (c > kLimit / r || r * c > kLimit / element)) {
    fail("rows * cols", std::to_string(rows) + " * " + std::to_string(cols),
         "is too large: " + std::to_string(element) + "-byte elements must total at most 2^62 bytes");
  }
  return r * c * element;
}

inline std::uint64_t align_up(std::uint64_t x, std::uint64_t alignment = CheckpointFormat::kAlignment) {
  return (x + alignment - 1) / alignment * alignment;
}

}  // namespace detail

// ---- Public functions ------------------------------------------------------------------------------

inline std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc) {
  return ~detail::crc32c_update(~crc, static_cast<const unsigned char*>(data), size);
}

inline void save_checkpoint(const std::string& path, const std::vector<std::pair<std::string, std::string>>& metadata,
                            const std::vector<TensorView>& tensors) {
  using F = CheckpointFormat;
  const std::string where = "checkpoint " + path + ": ";

  // ---- Every argument is checked before a file is created.
  auto fail = [&where](const std::string& field, const std::string& value, const std::string& rule) {
    detail::throw_checkpoint_argument(where, field, value, rule);
  };
  if (metadata.size() > F::kMaxMetadata) {
    fail("metadata.size()", std::to_string(metadata.size()), "must be <= " + std::to_string(F::kMaxMetadata));
  }
  if (tensors.size() > F::kMaxTensors) {
    fail("tensors.size()", std::to_string(tensors.size()), "must be <= " + std::to_string(F::kMaxTensors));
  }
  std::uint64_t header_bytes = 8;  // the two counts
  std::unordered_map<std::string, std::size_t> seen;
  for (std::size_t i = 0; i < metadata.size(); ++i) {
    const std::string& key = metadata[i].first;
    const std::string field = "metadata[" + std::to_string(i) + "]";
    const std::string problem = detail::name_problem(key, F::kMaxNameBytes);
    if (!problem.empty()) fail(field + ".first (key)", detail::quote_text(key), problem);
    if (!seen.emplace(key, i).second) fail(field + ".first (key)", detail::quote_text(key), "is a duplicate");
    if (metadata[i].second.size() > F::kMaxValueBytes) {
      fail(field + ".second.size() (value)", std::to_string(metadata[i].second.size()),
           "must be <= " + std::to_string(F::kMaxValueBytes));
    }
    header_bytes += 8 + key.size() + metadata[i].second.size();
  }
  seen.clear();
  std::vector<std::uint64_t> bytes(tensors.size()), offsets(tensors.size());
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const TensorView& v = tensors[t];
    const std::string field = "tensors[" + std::to_string(t) + "]";
    const std::string problem = detail::name_problem(v.name, F::kMaxNameBytes);
    if (!problem.empty()) fail(field + ".name", detail::quote_text(v.name), problem);
    if (!seen.emplace(v.name, t).second) fail(field + ".name", detail::quote_text(v.name), "is a duplicate");
    const std::string named = field + " (" + detail::quote_text(v.name) + ")";
    const std::size_t element = dtype_size(v.dtype);
    if (element == 0) fail(named + ".dtype", std::to_string(static_cast<unsigned>(v.dtype)), "is not a DType");
    bytes[t] = detail::tensor_bytes(v.rows, v.cols, element,
                                    [&](const std::string& f, const std::string& value, const std::string& rule) {
                                      fail(named + "." + f, value, rule);
                                    });
    if (v.alignment != 0 && (v.alignment < F::kAlignment || v.alignment > F::kMaxAlignment || (v.alignment & (v.alignment - 1)) != 0)) {
      fail(named + ".alignment", std::to_string(v.alignment), "must be 0 or a power of two from 64 to 2^30");
    }
    if (v.data != nullptr && v.producer) fail(named + ".data", "non-null", "and a producer are set; set one");
    if (bytes[t] > 0 && v.data == nullptr && !v.producer) fail(named + ".data", "null", "and no producer is set");
    header_bytes += 4 + v.name.size() + 1 + 4 * 8 + 4;
  }
  if (header_bytes > F::kMaxHeaderBytes) {
    fail("header length", std::to_string(header_bytes), "must be <= " + std::to_string(F::kMaxHeaderBytes));
  }
  const std::uint64_t header_end = F::kPrefixBytes + header_bytes + 4;
  std::uint64_t end = header_end;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    offsets[t] = detail::align_up(end, tensors[t].alignment == 0 ? F::kAlignment : tensors[t].alignment);
    end = offsets[t] + bytes[t];  // <= 2^62 + 2^62 after the check below held for the previous tensor
    if (end > F::kMaxTensorBytes) fail("total file size", std::to_string(end), "must be <= 2^62 bytes");
  }

#if defined(__unix__) || defined(__APPLE__)
  // ---- Data first (each chunk checksummed, then written), the header with the checksums last.
  detail::TempFile file(path, where);
  static constexpr unsigned char kZeros[F::kAlignment] = {};
  std::vector<std::uint32_t> crcs(tensors.size(), 0);
  std::unique_ptr<unsigned char[]> stage;
  std::size_t stage_bytes = 0;
  end = header_end;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const TensorView& v = tensors[t];
    // A gap of up to 64 bytes is written; a longer one (a mappable tensor's) stays a hole of the new
    // file, which reads as zeros.
    if (offsets[t] - end <= F::kAlignment) file.write(kZeros, static_cast<std::size_t>(offsets[t] - end), end);
    std::uint32_t crc = 0;
    if (v.data != nullptr) {
      const auto* src = static_cast<const unsigned char*>(v.data);
      for (std::uint64_t done = 0; done < bytes[t];) {
        const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(F::kChunkBytes, bytes[t] - done));
        crc = crc32c(src + done, n, crc);
        file.write(src + done, n, offsets[t] + done);
        done += n;
      }
    } else if (bytes[t] > 0) {
      const auto rows = static_cast<std::uint64_t>(v.rows);
      const std::uint64_t row_bytes = bytes[t] / rows;
      const std::uint64_t rows_per_call = std::max<std::uint64_t>(1, F::kChunkBytes / row_bytes);
      const auto need = static_cast<std::size_t>(std::min(rows_per_call, rows) * row_bytes);
      if (need > stage_bytes) {
        stage.reset(new unsigned char[need]);
        stage_bytes = need;
      }
      for (std::uint64_t r = 0; r < rows;) {
        const std::uint64_t r_end = std::min(rows, r + rows_per_call);
        const auto n = static_cast<std::size_t>((r_end - r) * row_bytes);
        v.producer(static_cast<std::int64_t>(r), static_cast<std::int64_t>(r_end), stage.get());
        crc = crc32c(stage.get(), n, crc);
        file.write(stage.get(), n, offsets[t] + r * row_bytes);
        r = r_end;
      }
    }
    crcs[t] = crc;
    end = offsets[t] + bytes[t];
  }

  if (end > header_end) file.resize(end);
  std::string header;
  header.reserve(static_cast<std::size_t>(header_end));
  header.append(F::kMagic, 8);
  detail::put(header, F::kVersion);
  detail::put(header, F::kEndianMarker);
  detail::put(header, header_bytes);
  detail::put(header, static_cast<std::uint32_t>(metadata.size()));
  for (const auto& kv : metadata) {
    detail::put(header, static_cast<std::uint32_t>(kv.first.size()));
    header += kv.first;
    detail::put(header, static_cast<std::uint32_t>(kv.second.size()));
    header += kv.second;
  }
  detail::put(header, static_cast<std::uint32_t>(tensors.size()));
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const TensorView& v = tensors[t];
    detail::put(header, static_cast<std::uint32_t>(v.name.size()));
    header += v.name;
    detail::put(header, static_cast<std::uint8_t>(v.dtype));
    detail::put(header, v.rows);
    detail::put(header, v.cols);
    detail::put(header, offsets[t]);
    detail::put(header, bytes[t]);
    detail::put(header, crcs[t]);
  }
  detail::put(header, crc32c(header.data(), header.size()));
  if (header.size() != header_end) throw std::logic_error(where + "header size mismatch (a bug in peer)");
  file.write(header.data(), header.size(), 0);
  file.commit();
#else
  throw std::runtime_error(where + "writing checkpoints needs a POSIX system");
#endif
}

// ---- CheckpointReader ------------------------------------------------------------------------------

inline CheckpointReader::CheckpointReader(const std::string& path) : path_(path), where_("checkpoint " + path + ": ") {
#if defined(__unix__) || defined(__APPLE__)
  fd_ = detail::open_file(path, O_RDONLY);
  if (fd_ < 0) detail::throw_errno(where_ + "cannot open", errno);
  open_descriptor();
#else
  throw std::runtime_error(where_ + "reading checkpoints needs a POSIX system");
#endif
}

inline CheckpointReader::CheckpointReader(int fd, const std::string& name) : path_(name), where_("checkpoint " + name + ": ") {
#if defined(__unix__) || defined(__APPLE__)
  fd_ = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (fd_ < 0) detail::throw_errno(where_ + "cannot duplicate descriptor " + std::to_string(fd), errno);
  open_descriptor();
#else
  (void)fd;
  throw std::runtime_error(where_ + "reading checkpoints needs a POSIX system");
#endif
}

inline void CheckpointReader::open_descriptor() {
#if defined(__unix__) || defined(__APPLE__)
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    (void)::close(fd_);
    detail::throw_errno(where_ + "cannot stat", err);
  }
  if (!S_ISREG(st.st_mode)) {
    (void)::close(fd_);
    throw std::runtime_error(where_ + "not a regular file");
  }
  file_size_ = static_cast<std::uint64_t>(st.st_size);
  try {
    parse();
  } catch (...) {
    (void)::close(fd_);  // the destructor does not run for a constructor that throws
    throw;
  }
#endif
}

inline CheckpointReader::~CheckpointReader() {
#if defined(__unix__) || defined(__APPLE__)
  if (fd_ >= 0) (void)::close(fd_);
#endif
}

inline CheckpointReader::CheckpointReader(CheckpointReader&& other) noexcept
    : path_(std::move(other.path_)),
      where_(std::move(other.where_)),
      fd_(std::exchange(other.fd_, -1)),
      file_size_(other.file_size_),
      data_begin_(other.data_begin_),
      metadata_(std::move(other.metadata_)),
      tensors_(std::move(other.tensors_)),
      metadata_index_(std::move(other.metadata_index_)),
      tensor_index_(std::move(other.tensor_index_)) {}

inline CheckpointReader& CheckpointReader::operator=(CheckpointReader&& other) noexcept {
  if (this != &other) {
#if defined(__unix__) || defined(__APPLE__)
    if (fd_ >= 0) (void)::close(fd_);
#endif
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    where_ = std::move(other.where_);
    file_size_ = other.file_size_;
    data_begin_ = other.data_begin_;
    metadata_ = std::move(other.metadata_);
    tensors_ = std::move(other.tensors_);
    metadata_index_ = std::move(other.metadata_index_);
    tensor_index_ = std::move(other.tensor_index_);
  }
  return *this;
}

inline const std::string& CheckpointReader::metadata(const std::string& key) const {
  const auto it = metadata_index_.find(key);
  if (it == metadata_index_.end()) throw std::runtime_error(where_ + "no metadata key " + detail::quote_text(key));
  return metadata_[it->second].second;
}

inline const TensorEntry& CheckpointReader::entry(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  if (it == tensor_index_.end()) throw std::runtime_error(where_ + "no tensor named " + detail::quote_text(name));
  return tensors_[it->second];
}

inline void CheckpointReader::verify_all() const {
  std::unique_ptr<unsigned char[]> buffer(new unsigned char[CheckpointFormat::kChunkBytes]);
  std::uint64_t pos = data_begin_;
  for (const TensorEntry& e : tensors_) {
    for (std::uint64_t gap = pos; gap < e.offset;) {
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(CheckpointFormat::kChunkBytes, e.offset - gap));
      read_exact(buffer.get(), n, gap, e);
      for (std::size_t i = 0; i < n; ++i) {
        if (buffer[i] != 0) {
          throw std::runtime_error(where_ + "padding byte " + std::to_string(gap + i) + " before tensor " +
                                   detail::quote_text(e.name) + " is " + std::to_string(buffer[i]) + ", not 0");
        }
      }
      gap += n;
    }
    std::uint32_t crc = 0;
    for (std::uint64_t done = 0; done < e.bytes;) {
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(CheckpointFormat::kChunkBytes, e.bytes - done));
      read_exact(buffer.get(), n, e.offset + done, e);
      crc = crc32c(buffer.get(), n, crc);
      done += n;
    }
    check_crc(e, crc, "");
    pos = e.offset + e.bytes;
  }
}

inline const TensorEntry& CheckpointReader::expect(const std::string& name, DType dtype, std::int64_t rows,
                                                   std::int64_t cols) const {
  const TensorEntry& e = entry(name);
  if (e.dtype != dtype || e.rows != rows || e.cols != cols) {
    throw std::runtime_error(where_ + "tensor " + detail::quote_text(name) + " is " + dtype_name(e.dtype) + " [" +
                             std::to_string(e.rows) + ", " + std::to_string(e.cols) + "] but the caller expects " +
                             dtype_name(dtype) + " [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
  }
  return e;
}

inline void CheckpointReader::stream(const std::string& name, DType dtype, std::int64_t rows, std::int64_t cols,
                                     const RowConsumer& consume) const {
  const TensorEntry& e = expect(name, dtype, rows, cols);
  if (e.bytes == 0) return;
  const std::uint64_t row_bytes = static_cast<std::uint64_t>(cols) * dtype_size(dtype);
  const std::int64_t chunk_rows = static_cast<std::int64_t>(std::max<std::uint64_t>(1, CheckpointFormat::kChunkBytes / row_bytes));
  std::vector<unsigned char> buffer(static_cast<std::size_t>(static_cast<std::uint64_t>(std::min(chunk_rows, rows)) * row_bytes));
  std::uint32_t crc = 0;
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const std::int64_t r1 = std::min(rows, r0 + chunk_rows);
    const auto n = static_cast<std::size_t>(static_cast<std::uint64_t>(r1 - r0) * row_bytes);
    read_exact(buffer.data(), n, e.offset + static_cast<std::uint64_t>(r0) * row_bytes, e);
    crc = crc32c(buffer.data(), n, crc);
    consume(r0, r1, buffer.data());
  }
  check_crc(e, crc, " while streaming it (the file changed after it was checked?)");
}

inline void CheckpointReader::read(const std::string& name, DType dtype, std::int64_t rows, std::int64_t cols,
                                   void* dst) const {
  const TensorEntry& e = expect(name, dtype, rows, cols);
  if (dst == nullptr && e.bytes > 0) {
    throw std::invalid_argument(where_ + "read(" + detail::quote_text(name) + ", ...): dst is null");
  }
  auto* out = static_cast<unsigned char*>(dst);
  std::uint32_t crc = 0;
  for (std::uint64_t done = 0; done < e.bytes;) {
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(CheckpointFormat::kChunkBytes, e.bytes - done));
    read_exact(out + done, n, e.offset + done, e);
    crc = crc32c(out + done, n, crc);
    done += n;
  }
  check_crc(e, crc,
            " while reading it (the file changed after it was checked?); the destination holds unverified bytes");
}

inline void CheckpointReader::parse() {
  using F = CheckpointFormat;
  // ---- Fixed prefix: magic, byte order, version, header length. The marker goes before the version: a
  // file of the other byte order would otherwise be reported as an unknown version.
  unsigned char prefix[F::kPrefixBytes] = {};
  const std::size_t got = read_some(prefix, F::kPrefixBytes, 0);
  if (std::memcmp(prefix, F::kMagic, std::min<std::size_t>(got, 8)) != 0) {
    throw std::runtime_error(where_ + "bad magic: the file does not start with \"PEERCKPT\" (not a peer checkpoint)");
  }
  if (got < F::kPrefixBytes) {
    throw std::runtime_error(where_ + "truncated: the fixed prefix needs bytes [0, 24) but the file has " +
                             std::to_string(file_size_));
  }
  std::uint32_t version = 0, marker = 0;
  std::uint64_t header_bytes = 0;
  std::memcpy(&version, prefix + 8, 4);
  std::memcpy(&marker, prefix + 12, 4);
  std::memcpy(&header_bytes, prefix + 16, 8);
  if (marker == 0x04030201u) {
    throw std::runtime_error(where_ +
                             "written on a machine of the other byte order (endianness marker reads "
                             "0x04030201, expected 0x01020304); this build reads native-order files only");
  }
  if (marker != F::kEndianMarker) {
    throw std::runtime_error(where_ + "bad endianness marker " + detail::hex32(marker) + ", expected 0x01020304");
  }
  if (version != F::kVersion) {
    throw std::runtime_error(where_ + "format version " + std::to_string(version) +
                             " is not supported (this build reads " + std::to_string(F::kVersion) + ")");
  }
  if (header_bytes > F::kMaxHeaderBytes) {
    throw std::runtime_error(where_ + "header length " + std::to_string(header_bytes) + " exceeds the limit " +
                             std::to_string(F::kMaxHeaderBytes));
  }
  data_begin_ = F::kPrefixBytes + header_bytes + 4;
  if (data_begin_ > file_size_) {
    throw std::runtime_error(where_ + "truncated: the header needs bytes [0, " + std::to_string(data_begin_) +
                             ") but the file has " + std::to_string(file_size_));
  }

  // ---- The header checksum, then every field.
  const auto total = static_cast<std::size_t>(data_begin_);
  std::unique_ptr<unsigned char[]> header(new unsigned char[total]);
  if (read_some(header.get(), total, 0) != total) {
    throw std::runtime_error(where_ + "truncated while reading the header (the file shrank after it was opened)");
  }
  std::uint32_t stored = 0;
  std::memcpy(&stored, header.get() + total - 4, 4);
  const std::uint32_t computed = crc32c(header.get(), total - 4);
  if (stored != computed) {
    throw std::runtime_error(where_ + "header checksum mismatch (stored " + detail::hex32(stored) + ", computed " +
                             detail::hex32(computed) + ")");
  }
  detail::ByteCursor in(header.get() + F::kPrefixBytes, static_cast<std::size_t>(header_bytes), where_);

  const auto metadata_count = in.get<std::uint32_t>("the metadata count");
  if (metadata_count > F::kMaxMetadata) {
    throw std::runtime_error(where_ + "metadata count " + std::to_string(metadata_count) + " exceeds the limit " +
                             std::to_string(F::kMaxMetadata));
  }
  if (metadata_count > in.remaining() / 8) {  // two u32 lengths each: bounds the reserve below
    throw std::runtime_error(where_ + "metadata count " + std::to_string(metadata_count) +
                             " does not fit in the header length " + std::to_string(header_bytes));
  }
  metadata_.reserve(metadata_count);
  for (std::uint32_t i = 0; i < metadata_count; ++i) {
    const std::string field = "metadata entry " + std::to_string(i);
    std::string key = in.get_string(F::kMaxNameBytes, field + " key");
    const std::string problem = detail::name_problem(key, F::kMaxNameBytes);
    if (!problem.empty()) throw std::runtime_error(where_ + field + " key " + detail::quote_text(key) + " " + problem);
    std::string value = in.get_string(F::kMaxValueBytes, field + " value");
    if (!metadata_index_.emplace(key, metadata_.size()).second) {
      throw std::runtime_error(where_ + "duplicate metadata key " + detail::quote_text(key));
    }
    metadata_.emplace_back(std::move(key), std::move(value));
  }

  const auto tensor_count = in.get<std::uint32_t>("the tensor count");
  constexpr std::size_t kMinEntryBytes = 4 + 1 + 1 + 4 * 8 + 4;  // with a 1-byte name
  if (tensor_count > F::kMaxTensors) {
    throw std::runtime_error(where_ + "tensor count " + std::to_string(tensor_count) + " exceeds the limit " +
                             std::to_string(F::kMaxTensors));
  }
  if (tensor_count > in.remaining() / kMinEntryBytes) {
    throw std::runtime_error(where_ + "tensor count " + std::to_string(tensor_count) +
                             " does not fit in the header length " + std::to_string(header_bytes));
  }
  tensors_.reserve(tensor_count);
  std::uint64_t end = data_begin_;  // where the header or the previous tensor's data ends
  for (std::uint32_t t = 0; t < tensor_count; ++t) {
    TensorEntry e;
    const std::string field = "tensor " + std::to_string(t);
    e.name = in.get_string(F::kMaxNameBytes, field + " name");
    const std::string problem = detail::name_problem(e.name, F::kMaxNameBytes);
    if (!problem.empty())
      throw std::runtime_error(where_ + field + " name " + detail::quote_text(e.name) + " " + problem);
    const std::string named = "tensor " + detail::quote_text(e.name);
    e.dtype = static_cast<DType>(in.get<std::uint8_t>(named + " dtype"));
    e.rows = in.get<std::int64_t>(named + " rows");
    e.cols = in.get<std::int64_t>(named + " cols");
    e.offset = in.get<std::uint64_t>(named + " data offset");
    e.bytes = in.get<std::uint64_t>(named + " data length");
    e.checksum_offset = F::kPrefixBytes + in.position();
    e.crc32c = in.get<std::uint32_t>(named + " checksum");
    if (!tensor_index_.emplace(e.name, tensors_.size()).second) {
      throw std::runtime_error(where_ + "duplicate tensor name " + detail::quote_text(e.name));
    }
    const std::size_t element = dtype_size(e.dtype);
    if (element == 0) throw std::runtime_error(where_ + named + " has " + dtype_name(e.dtype));
    const std::uint64_t expected = detail::tensor_bytes(
        e.rows, e.cols, element, [&](const std::string& f, const std::string& value, const std::string& rule) {
          throw std::runtime_error(where_ + named + " " + f + " = " + value + " " + rule);
        });
    if (e.bytes != expected) {
      throw std::runtime_error(where_ + named + " data length " + std::to_string(e.bytes) + " should be " +
                               std::to_string(expected) + " for " + dtype_name(e.dtype) + " [" +
                               std::to_string(e.rows) + ", " + std::to_string(e.cols) + "]");
    }
    if (e.offset % F::kAlignment != 0) {
      throw std::runtime_error(where_ + named + " data offset " + std::to_string(e.offset) + " is not a multiple of " +
                               std::to_string(F::kAlignment));
    }
    if (e.offset < end) {
      throw std::runtime_error(where_ + named + " data offset " + std::to_string(e.offset) + " overlaps " +
                               (t == 0 ? std::string("the header") : std::string("the previous tensor")) +
                               ", which ends at " + std::to_string(end));
    }
    if (e.offset > file_size_ || e.bytes > file_size_ - e.offset) {
      throw std::runtime_error(where_ + "truncated: " + named + " needs bytes [" + std::to_string(e.offset) + ", " +
                               std::to_string(e.offset + e.bytes) + ") but the file has " + std::to_string(file_size_));
    }
    end = e.offset + e.bytes;
    tensors_.push_back(std::move(e));
  }
  if (in.remaining() != 0) {
    throw std::runtime_error(where_ + "header length is " + std::to_string(header_bytes) +
                             " but its fields end at header byte " + std::to_string(in.position()));
  }
  if (file_size_ != end) {
    throw std::runtime_error(where_ + "the file has " + std::to_string(file_size_) + " bytes but its data ends at " +
                             std::to_string(end) + " (" + std::to_string(file_size_ - end) + " trailing bytes)");
  }
}

inline std::size_t CheckpointReader::read_some(void* dst, std::size_t n, std::uint64_t offset) const {
#if defined(__unix__) || defined(__APPLE__)
  return detail::read_at(fd_, dst, n, offset, where_ + "cannot read");
#else
  (void)dst, (void)n, (void)offset;
  return 0;
#endif
}

inline void CheckpointReader::read_exact(void* dst, std::size_t n, std::uint64_t offset,
                                         const TensorEntry& near) const {
  if (read_some(dst, n, offset) != n) {
    throw std::runtime_error(where_ + "truncated while reading near tensor " + detail::quote_text(near.name) +
                             ": bytes [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
                             ") are past the end of the file (it shrank after it was opened)");
  }
}

inline void CheckpointReader::check_crc(const TensorEntry& e, std::uint32_t computed, const char* context) const {
  if (computed != e.crc32c) {
    throw std::runtime_error(where_ + "checksum mismatch in tensor " + detail::quote_text(e.name) + " (stored " +
                             detail::hex32(e.crc32c) + ", computed " + detail::hex32(computed) + ")" + context);
  }
}

}  // namespace peer

#endif  // PEER_IO_DETAIL_CHECKPOINT_IMPL_HPP
