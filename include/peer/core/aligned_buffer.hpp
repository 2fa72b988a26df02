// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ALIGNED_BUFFER_HPP
#define PEER_CORE_ALIGNED_BUFFER_HPP

/// \file
/// Owned, aligned storage for parameters. Buffers of 2 MiB and more are aligned to 2 MiB and, on Linux,
/// advised with MADV_HUGEPAGE: the kernel's transparent huge pages are given only on request in the
/// common `madvise` mode, and random expert-row gathers from an unadvised table measured 15-23% slower
/// (docs/design.md). Smaller buffers are aligned to 64 bytes (a cache line, an AVX-512 register).

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "peer/core/parallel.hpp"
#include "peer/core/types.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace peer {

/// A move-only array of `size` scalars, zero-filled on construction.
template <typename Scalar>
class AlignedBuffer {
 public:
  static constexpr std::size_t kCacheLine = 64;
  static constexpr std::size_t kHugePage = std::size_t{2} << 20;

  AlignedBuffer() = default;

  /// Allocates `size` scalars and fills them with zeros; throws std::bad_alloc when memory is short.
  explicit AlignedBuffer(Index size) : size_(size) {
    if (size <= 0) {
      size_ = 0;
      return;
    }
    const std::size_t bytes = static_cast<std::size_t>(size) * sizeof(Scalar);
    const std::size_t alignment = bytes >= kHugePage ? kHugePage : kCacheLine;
    const std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
    data_ = static_cast<Scalar*>(std::aligned_alloc(alignment, rounded));
    if (data_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (alignment == kHugePage) (void)madvise(data_, rounded, MADV_HUGEPAGE);  // advisory only
#endif
    // Zeroing is the first touch: done in parallel 2 MiB chunks, page faults are spread over threads.
    const Index chunk = static_cast<Index>(kHugePage / sizeof(Scalar));
    Scalar* base = data_;
    parallel_for(size, chunk, [base](Index begin, Index end, int) {
      std::memset(static_cast<void*>(base + begin), 0, static_cast<std::size_t>(end - begin) * sizeof(Scalar));
    });
  }

  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    if (this != &other) {
      std::free(data_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~AlignedBuffer() { std::free(data_); }

  Scalar* data() { return data_; }
  const Scalar* data() const { return data_; }
  Index size() const { return size_; }

 private:
  Scalar* data_ = nullptr;
  Index size_ = 0;
};

}  // namespace peer

#endif  // PEER_CORE_ALIGNED_BUFFER_HPP
