// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_RANDOM_HPP
#define PEER_CORE_RANDOM_HPP

/// \file
/// Seeded, counter-based random numbers for initialization. Every value is a pure function of
/// (seed, stream, counter), so a table can be filled in parallel, in any order, with the same result on
/// every compiler and standard library (std::normal_distribution is not portable across them).

#include <cmath>
#include <cstdint>
#include <string>

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

/// A stream id from a tensor's name (FNV-1a), so each tensor's initial values depend only on the seed and
/// its name, not on the order in which tensors were registered.
inline std::uint64_t stream_of(const std::string& name) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace peer

#endif  // PEER_CORE_RANDOM_HPP
