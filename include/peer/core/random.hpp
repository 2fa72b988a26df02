// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_RANDOM_HPP
#define PEER_CORE_RANDOM_HPP

/// \file
/// Seeded, counter-based random numbers for initialization. Every value is a pure function of
/// (seed, stream, counter), so a table can be filled in parallel, in any order, with the same result on
/// every compiler and standard library (std::normal_distribution is not portable across them).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include <vector>

#include <Eigen/Core>

#include "peer/core/parallel.hpp"
#include "peer/core/row_table.hpp"

namespace peer {

/// A random stream: draw i of stream s under seed k is mix(k, s, i). SplitMix64's finalizer does the mixing.
class CounterRng {
 public:
  CounterRng(std::uint64_t seed, std::uint64_t stream) : key_(mix(mix(seed) ^ (stream * kGolden + kOdd))) {}

  /// Uniform in [0, 1) with 53 random bits.
  double uniform(std::uint64_t counter) const {
    return static_cast<double>(bits(counter) >> 11) * 0x1.0p-53;
  }

  /// Uniform in [lo, hi).
  double uniform(std::uint64_t counter, double lo, double hi) const { return lo + (hi - lo) * uniform(counter); }

  /// Standard normal by Box-Muller from draws 2 * counter and 2 * counter + 1.
  double normal(std::uint64_t counter) const {
    const double u1 = 1.0 - uniform(2 * counter);  // in (0, 1], so the log is finite
    const double u2 = uniform(2 * counter + 1);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

  /// Two independent standard normals (both Box-Muller outputs) from draws 2 * counter, 2 * counter + 1;
  /// first == normal(counter).
  void normal_pair(std::uint64_t counter, double& first, double& second) const {
    const double u1 = 1.0 - uniform(2 * counter);
    const double u2 = uniform(2 * counter + 1);
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586476925 * u2;
    first = r * std::cos(angle);
    second = r * std::sin(angle);
  }

  /// 64 random bits.
  std::uint64_t bits(std::uint64_t counter) const { return mix(key_ + counter * kGolden); }

  /// SplitMix64's output function: a bijection of 64-bit words with good avalanche.
  static std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

 private:
  static constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  static constexpr std::uint64_t kOdd = 0x632be59bd9b4e019ULL;
  std::uint64_t key_;
};

/// out[0 .. count) = std_dev * N(0, 1), a pure function of (rng, first, count): values come in blocks of
/// 128 (Box-Muller pairs from the uniforms of counters first + i), computed in float with Eigen's
/// vectorized log, sqrt, sin and cos (about 40x faster than scalar double math; initialization needs no
/// more precision). Used to fill expert tables of billions of entries in seconds.
template <typename Scalar>
void fill_normal(const CounterRng& rng, std::uint64_t first, std::int64_t count, double std_dev, Scalar* out) {
  constexpr int kHalf = 64;
  using Block = Eigen::Array<float, kHalf, 1>;
  Block u1, u2;
  const float scale = static_cast<float>(std_dev);
  for (std::int64_t base = 0; base < count; base += 2 * kHalf) {
    for (int i = 0; i < kHalf; ++i) {
      const std::uint64_t c = first + static_cast<std::uint64_t>(base / 2 + i);
      const std::uint64_t bits = rng.bits(c);
      // Two 24-bit uniforms from one 64-bit draw; u1 in (0, 1] keeps the log finite.
      u1[i] = 1.0f - static_cast<float>(bits >> 40) * 0x1.0p-24f;
      u2[i] = static_cast<float>((bits >> 8) & 0xFFFFFFu) * 0x1.0p-24f;
    }
    const Block r = (-2.0f * u1.log()).sqrt() * scale;
    const Block angle = 6.28318530717958647692f * u2;
    const Block z0 = r * angle.cos();
    const Block z1 = r * angle.sin();
    const std::int64_t n = std::min<std::int64_t>(2 * kHalf, count - base);
    for (std::int64_t i = 0; i < n; ++i) {
      out[base + i] = static_cast<Scalar>(i < kHalf ? z0[static_cast<Eigen::Index>(i)] : z1[static_cast<Eigen::Index>(i - kHalf)]);
    }
  }
}

/// A stream id from a tensor's name (FNV-1a), so each tensor's initial values depend only on the seed and
/// its name, not on the order in which tensors were registered.
inline std::uint64_t stream_of(const std::string& name) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const char c : name) {
    h ^= static_cast<unsigned char>(c);  // the byte's value, whatever char's signedness
    h *= 0x100000001b3ULL;
  }
  return h;
}

namespace detail {

/// Row r of `table` = std_dev * N(0, 1) from the stream of (seed, name) at counters g * cols ..., where
/// g = r * row_stride + first_row is the row's number in the whole table (a shard holding every
/// row_stride-th row from first_row gets exactly the rows the whole table would have): the same values
/// whatever the thread count; a bf16 table gets them rounded to nearest.
template <typename Scalar>
void fill_table_normal(RowTable<Scalar>& table, std::uint64_t seed, const std::string& name, double std_dev,
                       Index row_stride = 1, Index first_row = 0) {
  const CounterRng rng(seed, stream_of(name));
  const Index cols = table.cols();
  parallel_for(table.rows(), 4096, [&](Index r0, Index r1, int) {
    std::vector<Scalar> row(table.is_bf16() ? static_cast<std::size_t>(cols) : 0);
    for (Index r = r0; r < r1; ++r) {
      if (table.is_bf16()) {
        fill_normal(rng, static_cast<std::uint64_t>((r * row_stride + first_row) * cols), cols, std_dev, row.data());
        table.write_row(r, row.data());
      } else {
        fill_normal(rng, static_cast<std::uint64_t>((r * row_stride + first_row) * cols), cols, std_dev, table.row(r));
      }
    }
  });
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_RANDOM_HPP
