// peer: Parameter Efficient Expert Retrieval layers for Eigen.
// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_TYPES_HPP
#define PEER_CORE_TYPES_HPP

/// \file
/// Vocabulary types shared by every stage: row-major matrices, expert ids and the train/eval mode.

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

namespace peer {

/// Sizes and indices, as Eigen uses them.
using Index = Eigen::Index;

/// Flat expert id: expert (a, b) of an n x n product-key grid has id a * n + b (ggml uses int32 ids too).
using ExpertId = std::int32_t;

/// Row-major dense matrix: a token is a contiguous row, and so is an expert's [u_i | v_i].
template <typename Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A column vector (parameters such as biases are stored as [1, F] matrices; this is for scratch).
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// A mutable view of row-major memory with unit inner stride (user buffers need not be aligned).
template <typename Scalar>
using MatrixMap = Eigen::Map<RowMatrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// A read-only view of row-major memory.
template <typename Scalar>
using ConstMatrixMap = Eigen::Map<const RowMatrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// What public functions take as input: any row-major expression with unit inner stride (a RowMatrix, a
/// Map over user memory, a block of rows). Column-major inputs are copied by Eigen into a temporary.
template <typename Scalar>
using ConstMatrixRef = Eigen::Ref<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// What public functions write into: a row-major lvalue of the documented shape (never resized).
template <typename Scalar>
using MatrixRef = Eigen::Ref<RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Row-major matrix of expert ids ([B, H * k] for retrieval results).
using IdMatrix = Eigen::Matrix<ExpertId, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Writable view of ids with unit inner stride.
using IdMatrixRef = Eigen::Ref<IdMatrix, 0, Eigen::OuterStride<>>;
/// Read-only view of ids.
using ConstIdMatrixRef = Eigen::Ref<const IdMatrix, 0, Eigen::OuterStride<>>;

/// Rows to exclude from batch statistics (padding): mask[r] == true means row r counts.
using RowMask = Eigen::Array<bool, Eigen::Dynamic, 1>;

/// Training uses batch statistics (and updates running ones); evaluation uses the running statistics.
enum class Mode { kTrain, kEval };

/// How a table's entries are stored. Computation is always in the layer's Scalar.
enum class TableStorage : std::uint8_t {
  kNative = 0,    ///< the layer's Scalar (float or double)
  kBFloat16 = 1,  ///< bfloat16: half the bytes of float (peer/core/bfloat16.hpp); Scalar float or double
};

/// "native" or "bfloat16".
inline const char* to_string(TableStorage s) { return s == TableStorage::kBFloat16 ? "bfloat16" : "native"; }

namespace detail {

/// The library computes in float or double only.
template <typename Scalar>
constexpr void check_scalar() {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_TYPES_HPP
