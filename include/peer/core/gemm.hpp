// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_GEMM_HPP
#define PEER_CORE_GEMM_HPP

/// \file
/// A single-threaded, deterministic matrix product on Eigen's GEMM kernels.
///
/// Why not `c.noalias() += a * b`: Eigen parallelizes large products itself when OpenMP is on, and its
/// parallel path recomputes the depth blocking (kc) from the thread count, which changes the summation
/// order and so the rounding. The library parallelizes over fixed chunks itself (parallel.hpp) and calls
/// this sequential product inside each chunk, so results never depend on the thread count.

#include <type_traits>

#include <Eigen/Core>

#include "peer/core/types.hpp"

namespace peer {
namespace detail {

/// c = alpha * a * b (or c += alpha * a * b when accumulate). All three are dense, direct-access
/// expressions with unit inner stride (RowMatrix, maps, their blocks and transposes); c is row-major.
template <typename Lhs, typename Rhs, typename Dst>
void gemm(const Lhs& a, const Rhs& b, Dst&& c, typename std::decay_t<Dst>::Scalar alpha,
          bool accumulate) {
  using D = std::decay_t<Dst>;
  using Scalar = typename D::Scalar;
  static_assert(static_cast<bool>(D::Flags & Eigen::RowMajorBit), "gemm: destination must be row-major");
  eigen_assert(a.rows() == c.rows() && b.cols() == c.cols() && a.cols() == b.rows());
  eigen_assert(a.innerStride() == 1 && b.innerStride() == 1 && c.innerStride() == 1);
  if (!accumulate) c.setZero();
  const Index m = c.rows(), n = c.cols(), k = a.cols();
  if (m == 0 || n == 0 || k == 0) return;
#if EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
  constexpr int kLhsOrder = (Lhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int kRhsOrder = (Rhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                       Eigen::Dynamic>
      blocking(m, n, k, 1, true);
  Eigen::internal::general_matrix_matrix_product<Index, Scalar, kLhsOrder, false, Scalar, kRhsOrder, false,
                                                 Eigen::RowMajor, 1>::run(m, n, k, a.data(), a.outerStride(),
                                                                          b.data(), b.outerStride(), c.data(),
                                                                          1, c.outerStride(), alpha, blocking,
                                                                          nullptr);
#else
  // Other Eigen versions: the public product (deterministic as long as Eigen does not thread it).
  c.noalias() += alpha * a * b;
#endif
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_GEMM_HPP
