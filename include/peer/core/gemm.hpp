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

#include <initializer_list>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "peer/core/types.hpp"

// The sequential product below calls Eigen 3.4's internal GEMM entry points; with another Eigen only the
// public product is left, which Eigen threads itself and so rounds differently for different thread
// counts. Bitwise determinism is a promise of this library, so another Eigen is refused here (and at
// configure time) unless the user accepts results that may depend on the thread count.
#if !(EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)) && !defined(PEER_ALLOW_UNSUPPORTED_EIGEN)
#error "peer needs Eigen 3.4.x (3.4.0 to 3.4.89) for its deterministic GEMM; define PEER_ALLOW_UNSUPPORTED_EIGEN to build with another Eigen, whose results may then differ between thread counts"
#endif

namespace peer {
namespace detail {

#if EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
/// Eigen's packing buffers for one product, taken from per-thread buffers that only grow: Eigen would
/// otherwise put them on the stack up to EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) and on the heap above,
/// i.e. allocate on every call at real sizes (the query projection's packed [D, H Dk] weight is 2 MiB at
/// the paper's size). The blocking sizes are Eigen's own for (m, n, k), so the products are unchanged.
template <typename Scalar>
class ReusedGemmBlocking
    : public Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                                  Eigen::Dynamic> {
  using Base = Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                                    Eigen::Dynamic>;

 public:
  ReusedGemmBlocking(Index m, Index n, Index k) : Base(m, n, k, 1, true) {
    this->m_blockA = buffer(0, this->mc() * this->kc());
    this->m_blockB = buffer(1, this->kc() * this->nc());
  }
  // The buffers are not Eigen's to free: hand it null pointers (aligned_delete ignores them).
  ~ReusedGemmBlocking() {
    this->m_blockA = nullptr;
    this->m_blockB = nullptr;
  }
  ReusedGemmBlocking(const ReusedGemmBlocking&) = delete;
  ReusedGemmBlocking& operator=(const ReusedGemmBlocking&) = delete;

 private:
  static Scalar* buffer(int which, Index size) {
    thread_local std::vector<Scalar, Eigen::aligned_allocator<Scalar>> buffers[2];
    auto& b = buffers[which];
    if (static_cast<Index>(b.size()) < size) b.resize(static_cast<std::size_t>(size));
    return b.data();
  }
};
#endif

/// A product shape [m, k] x [k, n].
struct GemmShape {
  Index m, n, k;
};

/// Grows every thread's packing buffers for the given product shapes now, so that the products a
/// parallel loop runs next allocate nothing whichever thread runs which chunk (dynamic scheduling gives
/// a thread its first chunk of some size at any call). Call it outside a parallel region; inside one it
/// reserves for the calling thread only.
template <typename Scalar>
void reserve_gemm(std::initializer_list<GemmShape> shapes) {
#if EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
  auto reserve = [&] {
    for (const GemmShape& s : shapes) {
      if (s.m > 0 && s.n > 0 && s.k > 0) ReusedGemmBlocking<Scalar> blocking(s.m, s.n, s.k);
    }
  };
#if defined(_OPENMP)
  if (!omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel
    reserve();
    return;
  }
#endif
  reserve();
#else
  (void)shapes;
#endif
}

/// Whether gemm assigns its product or adds it.
enum class GemmUpdate {
  kAssign,      ///< c = alpha a b
  kAccumulate,  ///< c += alpha a b
};

/// c = alpha * a * b (GemmUpdate::kAssign) or c += alpha * a * b (kAccumulate). All three are dense,
/// direct-access expressions with unit inner stride (RowMatrix, maps, their blocks and transposes); c is
/// row-major.
template <typename Lhs, typename Rhs, typename Dst>
void gemm(const Lhs& a, const Rhs& b, Dst&& c, typename std::decay_t<Dst>::Scalar alpha, GemmUpdate update) {
  using D = std::decay_t<Dst>;
  using Scalar = typename D::Scalar;
  static_assert(static_cast<bool>(D::Flags & Eigen::RowMajorBit), "gemm: destination must be row-major");
  eigen_assert(a.rows() == c.rows() && b.cols() == c.cols() && a.cols() == b.rows());
  eigen_assert(a.innerStride() == 1 && b.innerStride() == 1 && c.innerStride() == 1);
  if (update == GemmUpdate::kAssign) c.setZero();
  const Index m = c.rows(), n = c.cols(), k = a.cols();
  if (m == 0 || n == 0 || k == 0) return;
#if EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
  constexpr int kLhsOrder = (Lhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int kRhsOrder = (Rhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  ReusedGemmBlocking<Scalar> blocking(m, n, k);
  Eigen::internal::general_matrix_matrix_product<Index, Scalar, kLhsOrder, false, Scalar, kRhsOrder, false,
                                                 Eigen::RowMajor, 1>::run(m, n, k, a.data(), a.outerStride(),
                                                                          b.data(), b.outerStride(), c.data(),
                                                                          1, c.outerStride(), alpha, blocking,
                                                                          nullptr);
#else
  // Another Eigen, accepted with PEER_ALLOW_UNSUPPORTED_EIGEN: the public product, which Eigen may thread
  // (outside the library's own parallel loops), so results may depend on the thread count.
  c.noalias() += alpha * a * b;
#endif
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_GEMM_HPP
