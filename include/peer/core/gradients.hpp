// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_GRADIENTS_HPP
#define PEER_CORE_GRADIENTS_HPP

/// \file
/// Gradients<Scalar>: dense gradients in one flat buffer laid out exactly like the parameters' dense
/// buffer (so one all-reduce covers them), and a RowSparseGrad per table.

#include <algorithm>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/error.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/row_sparse.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// Gradients of every trained tensor of a layout. Backward passes ADD into them (like autograd), so
/// gradients of several micro-batches accumulate until zero() is called.
template <typename Scalar>
class Gradients {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  Gradients() = default;

  /// Owned storage, zeroed.
  explicit Gradients(const ParameterLayout& layout) : layout_(layout), owned_(layout.dense_size()) {
    dense_ = owned_.data();
    own_tables();
  }

  /// Dense gradients in user memory of layout.dense_size() scalars (not cleared here); tables owned.
  Gradients(const ParameterLayout& layout, Scalar* dense) : layout_(layout), dense_(dense) {
    if (dense == nullptr && layout.dense_size() > 0) throw std::invalid_argument("Gradients: dense memory is null");
    own_tables();
  }

  /// A view: dense gradients in `dense` (layout.dense_size() scalars) and table t's gradient in
  /// *tables[t], all owned elsewhere (a model's Gradients: peer/model/model_layout.hpp). Several views may
  /// share a table gradient; backward passes then add into it one after the other.
  Gradients(const ParameterLayout& layout, Scalar* dense, const std::vector<RowSparseGrad<Scalar>*>& tables)
      : layout_(layout), dense_(dense), tables_(tables) {
    if (dense == nullptr && layout.dense_size() > 0) throw std::invalid_argument("Gradients: dense memory is null");
    if (tables.size() != layout.tables().size()) {
      detail::throw_invalid("Gradients: tables.size()", tables.size(),
                            "must equal the layout's number of tables, " + detail::to_text(layout.tables().size()));
    }
    for (std::size_t t = 0; t < tables.size(); ++t) {
      const auto& spec = layout.tables()[t];
      if (tables[t] == nullptr) throw std::invalid_argument("Gradients: the gradient of table '" + spec.name + "' is null");
      if (tables[t]->cols() != spec.cols) {
        detail::throw_invalid("Gradients: cols of the gradient of table '" + spec.name + "'", tables[t]->cols(),
                              "must equal the table's cols " + detail::to_text(spec.cols));
      }
    }
  }

  Gradients(Gradients&&) noexcept = default;
  Gradients& operator=(Gradients&&) noexcept = default;

  const ParameterLayout& layout() const { return layout_; }

  MatrixMap<Scalar> dense(DenseHandle h) {
    const auto& s = layout_.spec(h);
    return MatrixMap<Scalar>(dense_ + s.offset, s.rows, s.cols, Eigen::OuterStride<>(s.cols));
  }
  ConstMatrixMap<Scalar> dense(DenseHandle h) const {
    const auto& s = layout_.spec(h);
    return ConstMatrixMap<Scalar>(dense_ + s.offset, s.rows, s.cols, Eigen::OuterStride<>(s.cols));
  }
  RowSparseGrad<Scalar>& table(TableHandle h) { return *tables_.at(static_cast<std::size_t>(h.index)); }
  const RowSparseGrad<Scalar>& table(TableHandle h) const { return *tables_.at(static_cast<std::size_t>(h.index)); }

  /// The flat dense gradient (layout().dense_size() scalars, padding always zero).
  Scalar* dense_data() { return dense_; }
  const Scalar* dense_data() const { return dense_; }

  /// Dense gradient of a tensor by name; throws if there is none.
  MatrixMap<Scalar> find_dense(const std::string& name) {
    for (std::size_t i = 0; i < layout_.dense().size(); ++i) {
      if (layout_.dense()[i].name == name) return dense(DenseHandle{static_cast<int>(i)});
    }
    throw std::invalid_argument("Gradients: no dense tensor named '" + name + "'");
  }
  /// Row-sparse gradient of a table by name; throws if there is none.
  RowSparseGrad<Scalar>& find_table(const std::string& name) {
    for (std::size_t i = 0; i < layout_.tables().size(); ++i) {
      if (layout_.tables()[i].name == name) return *tables_[i];
    }
    throw std::invalid_argument("Gradients: no table named '" + name + "'");
  }

  /// Dense gradients to zero, row-sparse gradients emptied (their memory kept for the next batch).
  void zero() {
    std::fill(dense_, dense_ + layout_.dense_size(), Scalar(0));
    for (auto* t : tables_) t->clear();
  }

 private:
  void own_tables() {
    owned_tables_.reserve(layout_.tables().size());  // no reallocation: tables_ points into it
    for (const auto& spec : layout_.tables()) owned_tables_.emplace_back(spec.cols);
    for (auto& t : owned_tables_) tables_.push_back(&t);
  }

  ParameterLayout layout_;
  AlignedBuffer<Scalar> owned_;
  Scalar* dense_ = nullptr;
  // Moving a std::vector keeps its elements where they are, so tables_ stays valid across moves.
  std::vector<RowSparseGrad<Scalar>> owned_tables_;
  std::vector<RowSparseGrad<Scalar>*> tables_;
};

}  // namespace peer

#endif  // PEER_CORE_GRADIENTS_HPP
