// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPPED_FILE_HPP
#define PEER_IO_MAPPED_FILE_HPP

/// \file
/// MappedFileRange: bytes [offset, offset + length) of an open file mapped into memory (POSIX mmap), in one
/// of three modes, with the access and huge-page advice a table of random rows wants. What
/// MappedParameters (peer/io/mapped_parameters.hpp) builds tables on; usable alone for a caller's own
/// files.
///
///   kReadOnly     PROT_READ, MAP_SHARED: pages come from the page cache and are dropped under memory
///                 pressure, so a table larger than RAM can be served; a write would fault (RowTable
///                 refuses writes to such memory first).
///   kCopyOnWrite  PROT_READ | PROT_WRITE, MAP_PRIVATE: writes go to private copies of the touched pages
///                 (anonymous memory, resident until unmapped); the file never changes.
///   kWriteBack    PROT_READ | PROT_WRITE, MAP_SHARED: writes reach the file; sync() makes them durable
///                 (msync MS_SYNC). Needs a descriptor opened for writing.
///
/// The mapping stays valid while the object lives, whatever happens to the descriptor. As with every
/// mmap, a file truncated by another process while mapped makes later accesses to the lost pages raise
/// SIGBUS; replacing a file by rename (what save_checkpoint does) is safe: the mapping keeps the old file.

#include <cerrno>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#define PEER_HAS_MMAP 1
#endif

#include "peer/core/error.hpp"

namespace peer {

/// How a file is mapped (see the file comment).
enum class MapMode { kReadOnly, kCopyOnWrite, kWriteBack };

/// Access-pattern advice (madvise): kRandom turns read-ahead off, which suits a table whose batch reads
/// a few hundred random rows; kSequential suits a scan (checksums); kWillNeed starts reading everything.
enum class MapAccess { kNormal, kRandom, kSequential, kWillNeed };

inline const char* to_string(MapMode m) {
  switch (m) {
    case MapMode::kReadOnly:
      return "read_only";
    case MapMode::kCopyOnWrite:
      return "copy_on_write";
    case MapMode::kWriteBack:
      return "write_back";
  }
  return "unknown";
}

/// The system's page size (4096 where sysconf cannot tell).
inline std::uint64_t page_size() {
#if defined(PEER_HAS_MMAP)
  const long p = ::sysconf(_SC_PAGESIZE);
  return p > 0 ? static_cast<std::uint64_t>(p) : 4096;
#else
  return 4096;
#endif
}

class MappedFileRange {
 public:
  MappedFileRange() = default;

  /// Maps [offset, offset + length) of `fd`; `name` appears in messages. `offset` must be a multiple of
  /// page_size() (std::invalid_argument otherwise, before anything is mapped). A length of 0 maps nothing
  /// (data() is null). Throws std::runtime_error with the errno text when mmap fails.
  MappedFileRange(int fd, std::uint64_t offset, std::uint64_t length, MapMode mode, const std::string& name)
      : length_(length), mode_(mode), name_(name) {
    if (offset % page_size() != 0) {
      detail::throw_invalid("MappedFileRange(" + name + ").offset", offset,
                            "must be a multiple of the page size, " + std::to_string(page_size()));
    }
    if (length == 0) return;
#if defined(PEER_HAS_MMAP)
    if (length > static_cast<std::uint64_t>(SIZE_MAX) || offset > static_cast<std::uint64_t>(INT64_MAX)) {
      detail::throw_invalid("MappedFileRange(" + name + ").length", length, "does not fit this machine's address space");
    }
    const int prot = mode == MapMode::kReadOnly ? PROT_READ : PROT_READ | PROT_WRITE;
    const int flags = mode == MapMode::kCopyOnWrite ? MAP_PRIVATE : MAP_SHARED;
    void* p = ::mmap(nullptr, static_cast<std::size_t>(length), prot, flags, fd, static_cast<off_t>(offset));
    if (p == MAP_FAILED) {
      const int err = errno;
      throw std::runtime_error("cannot map " + name + " (" + std::to_string(length) + " bytes at offset " + std::to_string(offset) +
                               ", " + to_string(mode) + "): " + std::system_error(err, std::generic_category()).what());
    }
    data_ = p;
#else
    (void)fd;
    throw std::runtime_error("cannot map " + name + ": memory-mapped files need a POSIX system");
#endif
  }

  ~MappedFileRange() { unmap(); }
  MappedFileRange(MappedFileRange&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), length_(std::exchange(o.length_, 0)), mode_(o.mode_), name_(std::move(o.name_)) {}
  MappedFileRange& operator=(MappedFileRange&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      length_ = std::exchange(o.length_, 0);
      mode_ = o.mode_;
      name_ = std::move(o.name_);
    }
    return *this;
  }
  MappedFileRange(const MappedFileRange&) = delete;
  MappedFileRange& operator=(const MappedFileRange&) = delete;

  void* data() const { return data_; }
  std::uint64_t length() const { return length_; }
  MapMode mode() const { return mode_; }

  /// madvise with the access pattern; returns whether the kernel accepted it (advice never changes results).
  bool advise(MapAccess access) const {
#if defined(PEER_HAS_MMAP)
    if (data_ == nullptr) return true;
    const int advice = access == MapAccess::kRandom       ? MADV_RANDOM
                       : access == MapAccess::kSequential ? MADV_SEQUENTIAL
                       : access == MapAccess::kWillNeed   ? MADV_WILLNEED
                                                          : MADV_NORMAL;
    return ::madvise(data_, static_cast<std::size_t>(length_), advice) == 0;
#else
    (void)access;
    return false;
#endif
  }

  /// Asks for transparent huge pages (MADV_HUGEPAGE): honoured for the private copies of a copy-on-write
  /// mapping, and for file pages only where the kernel has huge pages for the page cache. Returns whether
  /// the kernel accepted the advice.
  bool advise_huge_pages() const {
#if defined(PEER_HAS_MMAP) && defined(MADV_HUGEPAGE)
    return data_ != nullptr && ::madvise(data_, static_cast<std::size_t>(length_), MADV_HUGEPAGE) == 0;
#else
    return false;
#endif
  }

  /// Read-only: drops the range's pages from this process (MADV_DONTNEED) and asks the kernel to drop
  /// them from the page cache (POSIX_FADV_DONTNEED on `fd`, which must be the mapped file), so the next
  /// access reads from the disk again: a cold cache, for measurements, or memory given back after a
  /// burst. Results never change. Other modes throw std::logic_error (it would discard their changes).
  void evict(int fd, std::uint64_t offset) const {
    if (mode_ != MapMode::kReadOnly) throw std::logic_error("MappedFileRange::evict(" + name_ + "): only read-only mappings can be evicted");
#if defined(PEER_HAS_MMAP)
    if (data_ == nullptr) return;
    (void)::madvise(data_, static_cast<std::size_t>(length_), MADV_DONTNEED);
#if defined(POSIX_FADV_DONTNEED)
    (void)::posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length_), POSIX_FADV_DONTNEED);
#else
    (void)fd, (void)offset;
#endif
#else
    (void)fd, (void)offset;
#endif
  }

  /// Write-back: blocks until every modified page is written to the file (msync MS_SYNC); the caller
  /// fsyncs the descriptor for the metadata. Other modes: nothing to write.
  void sync() const {
#if defined(PEER_HAS_MMAP)
    if (mode_ != MapMode::kWriteBack || data_ == nullptr) return;
    if (::msync(data_, static_cast<std::size_t>(length_), MS_SYNC) != 0) {
      const int err = errno;
      throw std::runtime_error("cannot write back " + name_ + ": msync: " + std::system_error(err, std::generic_category()).what());
    }
#endif
  }

  /// Bytes of the range in memory now (mincore: pages of the page cache or private copies), a multiple of
  /// the page size; 0 where that cannot be asked.
  std::uint64_t resident_bytes() const {
#if defined(PEER_HAS_MMAP)
    if (data_ == nullptr) return 0;
    const std::uint64_t page = page_size(), pages = (length_ + page - 1) / page;
    std::vector<unsigned char> in(static_cast<std::size_t>(pages));
    if (::mincore(data_, static_cast<std::size_t>(length_), in.data()) != 0) return 0;
    std::uint64_t n = 0;
    for (unsigned char c : in) n += c & 1;
    return n * page;
#else
    return 0;
#endif
  }

 private:
  void unmap() {
#if defined(PEER_HAS_MMAP)
    if (data_ != nullptr) (void)::munmap(data_, static_cast<std::size_t>(length_));
#endif
    data_ = nullptr;
  }

  void* data_ = nullptr;
  std::uint64_t length_ = 0;
  MapMode mode_ = MapMode::kReadOnly;
  std::string name_;
};

}  // namespace peer

#endif  // PEER_IO_MAPPED_FILE_HPP
