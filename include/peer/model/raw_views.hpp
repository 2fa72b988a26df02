// SPDX-License-Identifier: MIT
#ifndef PEER_MODEL_RAW_VIEWS_HPP
#define PEER_MODEL_RAW_VIEWS_HPP

/// \file
/// Views of a host's raw arrays as the row-major matrices every forward and backward takes, without a
/// copy: a C or C++ trainer keeps its activations as `float*` with a row stride (llm.c's [B T, C]
/// buffers, a slice of a wider residual stream) and passes them straight in:
///
///     layer.forward(params, peer::rows_view(x, n, c), peer::rows_view(y, n, c), cache, peer::Mode::kTrain);
///     layer.backward(params, cache, peer::rows_view(dy, n, c), peer::rows_view(dx, n, c), grads);
///
/// Checked (std::invalid_argument): a null pointer with a non-empty shape, negative sizes, a row stride
/// smaller than the row.

#include <string>

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace detail {

inline Index checked_stride(const char* what, const void* data, Index rows, Index cols, Index row_stride) {
  if (rows < 0 || cols < 0) {
    throw std::invalid_argument(std::string(what) + ": shape [" + to_text(rows) + ", " + to_text(cols) + "] must not be negative");
  }
  const Index stride = row_stride == 0 ? cols : row_stride;
  if (stride < cols) throw_invalid(std::string(what) + " row_stride", row_stride, "must be 0 (= cols) or >= cols = " + to_text(cols));
  if (data == nullptr && rows * cols > 0) throw std::invalid_argument(std::string(what) + ": data is null");
  return stride;
}

}  // namespace detail

/// A read-only view of `rows` rows of `cols` scalars, row r starting at data + r * row_stride
/// (row_stride 0 means cols: contiguous rows).
template <typename Scalar>
ConstMatrixMap<Scalar> rows_view(const Scalar* data, Index rows, Index cols, Index row_stride = 0) {
  detail::check_scalar<Scalar>();
  const Index stride = detail::checked_stride("rows_view", data, rows, cols, row_stride);
  return ConstMatrixMap<Scalar>(data, rows, cols, Eigen::OuterStride<>(stride));
}

/// A writable view (outputs: y, dx), as the read-only one.
template <typename Scalar>
MatrixMap<Scalar> rows_view(Scalar* data, Index rows, Index cols, Index row_stride = 0) {
  detail::check_scalar<Scalar>();
  const Index stride = detail::checked_stride("rows_view", data, rows, cols, row_stride);
  return MatrixMap<Scalar>(data, rows, cols, Eigen::OuterStride<>(stride));
}

}  // namespace peer

#endif  // PEER_MODEL_RAW_VIEWS_HPP
