// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ERROR_HPP
#define PEER_CORE_ERROR_HPP

/// \file
/// Error reporting. Configuration and shapes at the API boundary throw std::invalid_argument naming the
/// field, its value and the rule; these O(1) checks stay on in release builds. Numerical inputs that would
/// make the output meaningless (NaN, infinity) throw std::domain_error. Hot-loop preconditions use
/// PEER_ASSERT, which is off under NDEBUG and can be overridden by defining PEER_ASSERT before inclusion.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "peer/core/types.hpp"

#ifndef PEER_ASSERT
#ifdef NDEBUG
#define PEER_ASSERT(condition) ((void)0)
#else
#include <cassert>
#define PEER_ASSERT(condition) assert(condition)
#endif
#endif

namespace peer {
namespace detail {

/// Formats any streamable value for an error message.
template <typename T>
std::string to_text(const T& value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

/// Throws std::invalid_argument("<field> = <value> <rule>"), e.g.
/// "PeerConfig.top_k = 40 must be <= sub_key_top_k^2 = 16".
template <typename T>
[[noreturn]] void throw_invalid(const std::string& field, const T& value, const std::string& rule) {
  throw std::invalid_argument(field + " = " + to_text(value) + " " + rule);
}

/// Checks that `what` has shape [rows, cols]; names both shapes in the message otherwise.
inline void check_shape(const std::string& what, Index rows, Index cols, Index expected_rows,
                        Index expected_cols) {
  if (rows != expected_rows || cols != expected_cols) {
    throw std::invalid_argument(what + " has shape [" + to_text(rows) + ", " + to_text(cols) +
                                "] but must be [" + to_text(expected_rows) + ", " +
                                to_text(expected_cols) + "]");
  }
}

/// The exponent field of a float or double as unsigned bits: all ones (== kMask) means infinity or NaN.
template <typename S>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Bits = std::uint32_t;
  static constexpr Bits kMask = 0x7F800000u;
};
template <>
struct FloatBits<double> {
  using Bits = std::uint64_t;
  static constexpr Bits kMask = 0x7FF0000000000000ull;
};

template <typename S>
typename FloatBits<S>::Bits exponent_bits(S x) {
  typename FloatBits<S>::Bits u;
  std::memcpy(&u, &x, sizeof u);
  return u & FloatBits<S>::kMask;
}

/// Whether x is finite, decided from its bit pattern. std::isfinite(x), x == x and x - x == 0 are all
/// folded to "finite" under -ffinite-math-only (part of -Ofast, which C trainers use); integer bits are not.
template <typename S>
bool is_finite(S x) {
  return exponent_bits(x) != FloatBits<S>::kMask;
}

/// Throws std::domain_error naming the first non-finite entry of `m` (row, column and value). `what` is
/// a C string so that a check that passes allocates nothing (inference promises no allocation). Bit
/// patterns, so that it holds under -ffinite-math-only.
template <typename Derived>
void check_finite(const char* what, const Eigen::DenseBase<Derived>& m) {
  using S = typename Derived::Scalar;
  // Fast path: the largest exponent field of a row reaches the mask only if an entry is inf or NaN.
  bool finite = true;
  for (Index r = 0; r < m.rows() && finite; ++r) {
    typename FloatBits<S>::Bits top = 0;
    for (Index c = 0; c < m.cols(); ++c) top = std::max(top, exponent_bits(m(r, c)));
    finite = top != FloatBits<S>::kMask;
  }
  if (finite) return;
  for (Index r = 0; r < m.rows(); ++r) {
    for (Index c = 0; c < m.cols(); ++c) {
      if (!is_finite(m(r, c))) {
        throw std::domain_error(std::string(what) + " has a non-finite value " + to_text(m(r, c)) + " at [" +
                                to_text(r) + ", " + to_text(c) + "]");
      }
    }
  }
}

/// Throws std::invalid_argument when the memory of `out` overlaps that of `in` (an output that must not
/// alias its input).
template <typename Out, typename In>
void check_no_overlap(const std::string& out_name, const Out& out, const std::string& in_name, const In& in) {
  if (out.size() == 0 || in.size() == 0) return;
  using S = typename Out::Scalar;
  const S* o0 = out.data();
  const S* o1 = out.data() + (out.rows() - 1) * out.outerStride() + out.cols();
  const S* i0 = in.data();
  const S* i1 = in.data() + (in.rows() - 1) * in.outerStride() + in.cols();
  if (std::less<const S*>()(o0, i1) && std::less<const S*>()(i0, o1)) {
    throw std::invalid_argument(out_name + " overlaps " + in_name + " in memory; it must not (pass another matrix)");
  }
}

/// Throws std::invalid_argument naming the first id outside [0, limit).
inline void check_ids(const ConstIdMatrixRef& ids, Index limit) {
  for (Index r = 0; r < ids.rows(); ++r) {
    for (Index c = 0; c < ids.cols(); ++c) {
      if (ids(r, c) < 0 || ids(r, c) >= limit) {
        throw std::invalid_argument("ids[" + to_text(r) + ", " + to_text(c) + "] = " + to_text(ids(r, c)) +
                                    " must be in [0, " + to_text(limit) + ")");
      }
    }
  }
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_ERROR_HPP
