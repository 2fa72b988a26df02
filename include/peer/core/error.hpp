// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_ERROR_HPP
#define PEER_CORE_ERROR_HPP

/// \file
/// Error reporting. Configuration and shapes at the API boundary throw std::invalid_argument naming the
/// field, its value and the rule; these O(1) checks stay on in release builds. Numerical inputs that would
/// make the output meaningless (NaN, infinity) throw std::domain_error. Hot-loop preconditions use
/// PEER_ASSERT, which is off under NDEBUG and can be overridden by defining PEER_ASSERT before inclusion.

#include <cmath>
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

/// Throws std::domain_error naming the first non-finite entry of `m` (row, column and value). `what` is
/// a C string so that a check that passes allocates nothing (inference promises no allocation).
template <typename Derived>
void check_finite(const char* what, const Eigen::DenseBase<Derived>& m) {
  // Fast path: x - x is 0 for finite x and NaN otherwise, so one vectorizable sum per row decides.
  bool finite = true;
  for (Index r = 0; r < m.rows() && finite; ++r) {
    typename Derived::Scalar sum(0);
    for (Index c = 0; c < m.cols(); ++c) sum += m(r, c) - m(r, c);
    finite = sum == sum;
  }
  if (finite) return;
  for (Index r = 0; r < m.rows(); ++r) {
    for (Index c = 0; c < m.cols(); ++c) {
      if (!std::isfinite(m(r, c))) {
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
