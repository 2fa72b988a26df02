// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ROW_BLOCKS_HPP
#define PEER_CORE_ROW_BLOCKS_HPP

/// \file
/// A row of parameters as blocks of 16 columns, the way the optimizers' element-wise rules read and write
/// it: NativeRowBlocks for a row in Scalar (a table row, a master row, a dense tensor), Bf16RowBlocks for a
/// row stored in bfloat16. With the latter an update is one pass over the row: each block is widened,
/// updated and rounded back while it is in registers, with no widened copy of the row written and read
/// again (three passes over a scratch row before).
///
/// Both offer, for a row of cols columns:
///   load(j)      the 16 values of columns [j, j + 16), j a multiple of 16, in Scalar (a bf16 row widens: exact)
///   store(j, x)  writes them (a bf16 row rounds: to nearest, or stochastically with the row's stream)
///   get(j), set(j, x)  the same for one column (the tail of a row that is not a multiple of 16)
/// A bf16 row's results are bitwise those of widen_row, then narrow_row_nearest or narrow_row_stochastic
/// of the whole row (peer/core/bfloat16.hpp): each column rounds by its own value and its own column of
/// the stream, whatever order the blocks are stored in.

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "peer/core/bfloat16.hpp"
#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace detail {

/// Columns per block.
constexpr Index kRowBlock = 16;

// GCC 12's false maybe-uninitialized warning on AVX-512 intrinsics (see peer/core/bfloat16.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

/// A row stored in Scalar (see the file comment).
template <typename Scalar>
class NativeRowBlocks {
 public:
  using Block = Eigen::Array<Scalar, kRowBlock, 1>;

  explicit NativeRowBlocks(Scalar* row) : row_(row) {}

  Block load(Index j) const { return Eigen::Map<const Block>(row_ + j); }
  void store(Index j, const Block& x) { Eigen::Map<Block>(row_ + j) = x; }
  Scalar get(Index j) const { return row_[j]; }
  void set(Index j, Scalar x) { row_[j] = x; }

 private:
  Scalar* row_;
};

/// A row stored in bfloat16, rounded as it is stored (see the file comment).
template <typename Scalar>
class Bf16RowBlocks {
 public:
  using Block = Eigen::Array<Scalar, kRowBlock, 1>;

  /// `stochastic`: round with `stream` (column j draws rounding_bits(stream, j)); else to nearest.
  Bf16RowBlocks(bfloat16* row, Index cols, bool stochastic, RoundingStream stream)
      : row_(row), cols_(cols), stochastic_(stochastic), stream_(stream) {}

  Index cols() const { return cols_; }

  Block load(Index j) const {
    PEER_ASSERT(j % kRowBlock == 0 && j + kRowBlock <= cols_);
    Block x;
    if constexpr (std::is_same<Scalar, float>::value) {
#if defined(__AVX512F__)
      _mm512_storeu_ps(x.data(), widen16(row_ + j));
      return x;
#elif defined(__AVX2__)
      _mm256_storeu_ps(x.data(), widen8(row_ + j));
      _mm256_storeu_ps(x.data() + 8, widen8(row_ + j + 8));
      return x;
#endif
    }
    for (Index l = 0; l < kRowBlock; ++l) x[l] = get(j + l);
    return x;
  }

  void store(Index j, const Block& x) {
    PEER_ASSERT(j % kRowBlock == 0 && j + kRowBlock <= cols_);
    if constexpr (std::is_same<Scalar, float>::value) {
#if defined(__AVX512F__)
      const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(x.data()));
      if (stochastic_) {
        // As narrow_row_stochastic: one pair_draws32 serves two blocks.
        const Index pair_block = j / (2 * kRowBlock);
        if (pair_block != drawn_block_) {
          pair_draws32(stream_, static_cast<std::uint32_t>(pair_block * kRowBlock), draws_[0], draws_[1]);
          drawn_block_ = pair_block;
        }
        narrow16_store(b, _mm512_add_epi32(b, draws_[(j / kRowBlock) & 1]), row_ + j);
      } else {
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        narrow16_store(b, _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), row_ + j);
      }
      return;
#elif defined(__AVX2__)
      __m256i r[2];
      __m256i draws[2];
      if (stochastic_) pair_draws16(stream_, static_cast<std::uint32_t>(j >> 1), draws[0], draws[1]);  // as narrow_row_stochastic
      for (int half = 0; half < 2; ++half) {
        const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(x.data() + 8 * half));
        const __m256i add = stochastic_ ? draws[half]
                                        : _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)));
        r[half] = narrow8(b, _mm256_add_epi32(b, add));
      }
      store16(r[0], r[1], row_ + j);
      return;
#endif
    }
    for (Index l = 0; l < kRowBlock; ++l) set(j + l, x[l]);
  }

  Scalar get(Index j) const { return static_cast<Scalar>(widen_bf16(row_[j])); }
  void set(Index j, Scalar x) {
    const float f = static_cast<float>(x);
    row_[j] = stochastic_ ? narrow_bf16_stochastic(f, rounding_bits(stream_, static_cast<std::uint32_t>(j))) : narrow_bf16_nearest(f);
  }

 private:
  bfloat16* row_;
  Index cols_;
  bool stochastic_;
  RoundingStream stream_;
#if defined(__AVX512F__)
  Index drawn_block_ = -1;              // the pair of blocks draws_ holds
  __m512i draws_[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#endif
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_ROW_BLOCKS_HPP
