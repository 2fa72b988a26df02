// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_PARAMETER_LAYOUT_HPP
#define PEER_CORE_PARAMETER_LAYOUT_HPP

/// \file
/// The named list of a layer's tensors. Components (a query network, product keys, an expert table)
/// register their tensors into a layout when the layer is built and keep the handles they get back;
/// Parameters and Gradients then allocate (or alias) storage from the layout.
///
/// Three kinds of tensor, each in its own storage:
/// - dense parameters: trained, dense gradients; all of them in ONE flat buffer (offsets aligned to 64
///   bytes), so a user's optimizer, checkpointing or all-reduce can treat them as a single array;
/// - buffers: state that is not trained (batch-norm running statistics), in a second flat buffer;
/// - tables: large row-addressed parameters (the expert table), each in its own storage with row-sparse
///   gradients. Tables are where bf16 storage, memory mapping and growing the pool plug in.

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// How a tensor is stored and trained.
enum class ParamKind {
  kDense,      ///< trained, dense gradient, lives in the flat dense buffer
  kBuffer,     ///< not trained (running statistics), lives in the flat buffer of buffers
  kRowSparse,  ///< trained, row-sparse gradient, lives in its own table
};

/// Handles returned by registration; a component keeps them to find its tensors again.
struct DenseHandle {
  int index = -1;
};
struct BufferHandle {
  int index = -1;
};
struct TableHandle {
  int index = -1;
};

/// One tensor: a name ("query.weight"), a row-major shape [rows, cols], its kind, and for dense
/// parameters and buffers its offset (in scalars) into the kind's flat buffer.
struct TensorSpec {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  ParamKind kind = ParamKind::kDense;
  Index offset = 0;
  /// Tables only: how the entries are stored (dense tensors and buffers are always the layer's Scalar).
  TableStorage storage = TableStorage::kNative;
  Index size() const { return rows * cols; }
};

/// The ordered, named list of a layer's tensors.
class ParameterLayout {
 public:
  /// Offsets in the flat buffers are multiples of this many scalars' worth of 64 bytes.
  static constexpr Index kAlignBytes = 64;

  DenseHandle add_dense(const std::string& name, Index rows, Index cols) {
    return DenseHandle{add(dense_, dense_size_, name, rows, cols, ParamKind::kDense)};
  }
  BufferHandle add_buffer(const std::string& name, Index rows, Index cols) {
    return BufferHandle{add(buffers_, buffer_size_, name, rows, cols, ParamKind::kBuffer)};
  }
  TableHandle add_table(const std::string& name, Index rows, Index cols, TableStorage storage = TableStorage::kNative) {
    Index unused = 0;
    const int index = add(tables_, unused, name, rows, cols, ParamKind::kRowSparse);
    tables_.back().storage = storage;
    return TableHandle{index};
  }

  const std::vector<TensorSpec>& dense() const { return dense_; }
  const std::vector<TensorSpec>& buffers() const { return buffers_; }
  const std::vector<TensorSpec>& tables() const { return tables_; }
  const TensorSpec& spec(DenseHandle h) const { return dense_.at(static_cast<std::size_t>(h.index)); }
  const TensorSpec& spec(BufferHandle h) const { return buffers_.at(static_cast<std::size_t>(h.index)); }
  const TensorSpec& spec(TableHandle h) const { return tables_.at(static_cast<std::size_t>(h.index)); }

  /// Scalars in the flat dense buffer (including alignment padding between tensors).
  Index dense_size() const { return dense_size_; }
  /// Scalars in the flat buffer of buffers.
  Index buffer_size() const { return buffer_size_; }
  /// Trained scalars: dense parameters plus all table entries (padding excluded).
  Index num_parameters() const {
    Index total = 0;
    for (const auto& s : dense_) total += s.size();
    for (const auto& s : tables_) total += s.size();
    return total;
  }

  /// Two layouts are compatible when names, shapes, kinds and offsets all agree.
  bool operator==(const ParameterLayout& other) const {
    return scalar_bytes_ == other.scalar_bytes_ && same(dense_, other.dense_) &&
           same(buffers_, other.buffers_) && same(tables_, other.tables_);
  }
  bool operator!=(const ParameterLayout& other) const { return !(*this == other); }

  /// Fixes the scalar size used for alignment (set once, by the layer, before any registration).
  explicit ParameterLayout(Index scalar_bytes = 4) : scalar_bytes_(scalar_bytes) {
    if (scalar_bytes != 4 && scalar_bytes != 8) detail::throw_invalid("ParameterLayout scalar_bytes", scalar_bytes, "must be 4 or 8");
  }

  /// Bytes of one scalar (4: float, 8: double).
  Index scalar_bytes() const { return scalar_bytes_; }
  /// Scalars in kAlignBytes: every offset in the flat buffers is a multiple of this.
  Index align_scalars() const { return std::max<Index>(1, kAlignBytes / scalar_bytes_); }

  /// Index of the tensor named `name` in its kind's list and that kind, or {-1, kDense} if absent.
  std::pair<int, ParamKind> find(const std::string& name) const {
    for (const auto* l : {&dense_, &buffers_, &tables_}) {
      for (std::size_t i = 0; i < l->size(); ++i) {
        if ((*l)[i].name == name) return {static_cast<int>(i), (*l)[i].kind};
      }
    }
    return {-1, ParamKind::kDense};
  }

 private:
  int add(std::vector<TensorSpec>& list, Index& size, const std::string& name, Index rows, Index cols,
          ParamKind kind) {
    if (name.empty()) throw std::invalid_argument("ParameterLayout: a tensor name must not be empty");
    if (rows < 0 || cols < 0) {
      throw std::invalid_argument("ParameterLayout: tensor '" + name + "' has negative shape [" +
                                  detail::to_text(rows) + ", " + detail::to_text(cols) + "]");
    }
    for (const auto* l : {&dense_, &buffers_, &tables_}) {
      for (const auto& s : *l) {
        if (s.name == name) throw std::invalid_argument("ParameterLayout: tensor name '" + name + "' is used twice");
      }
    }
    const Index align = align_scalars();
    TensorSpec spec{name, rows, cols, kind, (size + align - 1) / align * align};
    size = spec.offset + spec.size();
    list.push_back(std::move(spec));
    return static_cast<int>(list.size()) - 1;
  }

  static bool same(const std::vector<TensorSpec>& a, const std::vector<TensorSpec>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (a[i].name != b[i].name || a[i].rows != b[i].rows || a[i].cols != b[i].cols ||
          a[i].kind != b[i].kind || a[i].offset != b[i].offset || a[i].storage != b[i].storage) {
        return false;
      }
    }
    return true;
  }

  Index scalar_bytes_ = 4;
  std::vector<TensorSpec> dense_, buffers_, tables_;
  Index dense_size_ = 0, buffer_size_ = 0;
};

}  // namespace peer

#endif  // PEER_CORE_PARAMETER_LAYOUT_HPP
