// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_PARAMETERS_HPP
#define PEER_CORE_PARAMETERS_HPP

/// \file
/// Parameters<Scalar>: the storage of one layout's tensors, owned or in memory the user provides.

#include <string>
#include <utility>
#include <vector>

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/error.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/row_table.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// The values of every tensor of a ParameterLayout: one flat dense buffer, one flat buffer of buffers, and
/// one RowTable per table. Move-only (a copy of a million-expert table should be deliberate).
template <typename Scalar>
class Parameters {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  /// One table's memory: rows * cols of the layer's Scalar, or of bfloat16 for a table stored so.
  struct TableMemory {
    TableMemory(Scalar* p = nullptr) : native(p) {}  // NOLINT: implicit, so {ptr, ...} lists keep working
    TableMemory(bfloat16* p) : bf16(p) {}            // NOLINT
    TableMemory(std::nullptr_t) {}                   // NOLINT
    Scalar* native = nullptr;
    bfloat16* bf16 = nullptr;
    bool read_only = false;  ///< memory the process must not write (a read-only mapping): RowTable::read_only
  };

  /// Memory provided by the user: `dense` holds layout.dense_size() scalars, `buffers` holds
  /// layout.buffer_size(), and tables[t] holds rows * cols of table t, as Scalar or, for a table stored
  /// as bfloat16, as bfloat16. The user keeps it alive.
  struct ExternalMemory {
    Scalar* dense = nullptr;
    Scalar* buffers = nullptr;
    std::vector<TableMemory> tables;
  };

  Parameters() = default;

  /// Owned, zero-filled storage (a layer's initialize() then fills it).
  explicit Parameters(const ParameterLayout& layout)
      : layout_(layout), owned_dense_(layout.dense_size()), owned_buffers_(layout.buffer_size()) {
    dense_ = owned_dense_.data();
    buffers_ = owned_buffers_.data();
    for (const auto& spec : layout.tables()) tables_.emplace_back(spec.rows, spec.cols, spec.storage);
  }

  /// Views of user memory; nothing is copied or filled.
  Parameters(const ParameterLayout& layout, const ExternalMemory& memory) : layout_(layout) {
    if (memory.dense == nullptr && layout.dense_size() > 0) {
      throw std::invalid_argument("Parameters: ExternalMemory.dense is null but the layout has dense tensors");
    }
    if (memory.buffers == nullptr && layout.buffer_size() > 0) {
      throw std::invalid_argument("Parameters: ExternalMemory.buffers is null but the layout has buffers");
    }
    if (memory.tables.size() != layout.tables().size()) {
      detail::throw_invalid("Parameters: ExternalMemory.tables.size()", memory.tables.size(),
                            "must equal the layout's number of tables, " +
                                detail::to_text(layout.tables().size()));
    }
    dense_ = memory.dense;
    buffers_ = memory.buffers;
    for (std::size_t t = 0; t < memory.tables.size(); ++t) {
      const auto& spec = layout.tables()[t];
      const TableMemory& m = memory.tables[t];
      const bool bf16 = spec.storage == TableStorage::kBFloat16;
      if ((bf16 && m.native != nullptr) || (!bf16 && m.bf16 != nullptr)) {
        throw std::invalid_argument("Parameters: ExternalMemory.tables[" + detail::to_text(t) + "] for table '" + spec.name +
                                    "' is " + (bf16 ? "Scalar" : "bfloat16") + " memory, but the table is stored as " +
                                    to_string(spec.storage));
      }
      tables_.push_back(bf16 ? RowTable<Scalar>::view(m.bf16, spec.rows, spec.cols)
                             : RowTable<Scalar>::view(m.native, spec.rows, spec.cols));
      tables_.back().set_read_only(m.read_only);
    }
  }

  Parameters(Parameters&&) noexcept = default;
  Parameters& operator=(Parameters&&) noexcept = default;

  const ParameterLayout& layout() const { return layout_; }

  MatrixMap<Scalar> dense(DenseHandle h) { return map(dense_, layout_.spec(h)); }
  ConstMatrixMap<Scalar> dense(DenseHandle h) const { return cmap(dense_, layout_.spec(h)); }
  MatrixMap<Scalar> buffer(BufferHandle h) { return map(buffers_, layout_.spec(h)); }
  ConstMatrixMap<Scalar> buffer(BufferHandle h) const { return cmap(buffers_, layout_.spec(h)); }
  RowTable<Scalar>& table(TableHandle h) { return tables_.at(static_cast<std::size_t>(h.index)); }
  const RowTable<Scalar>& table(TableHandle h) const { return tables_.at(static_cast<std::size_t>(h.index)); }

  /// The name of the first read-only table (mapped with MapMode::kReadOnly), or "" when every table can be
  /// written: what an optimizer step and a layer's initialize() check before they change anything.
  std::string read_only_table() const {
    for (std::size_t t = 0; t < tables_.size(); ++t) {
      if (tables_[t].read_only()) return layout_.tables()[t].name;
    }
    return "";
  }

  /// The flat dense buffer (layout().dense_size() scalars): what an all-reduce or a flat optimizer sees.
  Scalar* dense_data() { return dense_; }
  const Scalar* dense_data() const { return dense_; }
  /// The flat buffer of buffers (layout().buffer_size() scalars).
  Scalar* buffer_data() { return buffers_; }
  const Scalar* buffer_data() const { return buffers_; }

  /// Tensors by name, whatever their kind (for tests, checkpoints and inspection); throws if absent.
  MatrixMap<Scalar> find(const std::string& name) {
    for (std::size_t i = 0; i < layout_.dense().size(); ++i) {
      if (layout_.dense()[i].name == name) return dense(DenseHandle{static_cast<int>(i)});
    }
    for (std::size_t i = 0; i < layout_.buffers().size(); ++i) {
      if (layout_.buffers()[i].name == name) return buffer(BufferHandle{static_cast<int>(i)});
    }
    for (std::size_t i = 0; i < layout_.tables().size(); ++i) {
      if (layout_.tables()[i].name == name) return tables_[i].matrix();
    }
    throw std::invalid_argument("Parameters: no tensor named '" + name + "'");
  }

 private:
  static MatrixMap<Scalar> map(Scalar* base, const TensorSpec& s) {
    return MatrixMap<Scalar>(base + s.offset, s.rows, s.cols, Eigen::OuterStride<>(s.cols));
  }
  static ConstMatrixMap<Scalar> cmap(const Scalar* base, const TensorSpec& s) {
    return ConstMatrixMap<Scalar>(base + s.offset, s.rows, s.cols, Eigen::OuterStride<>(s.cols));
  }

  ParameterLayout layout_;
  AlignedBuffer<Scalar> owned_dense_, owned_buffers_;
  Scalar* dense_ = nullptr;
  Scalar* buffers_ = nullptr;
  std::vector<RowTable<Scalar>> tables_;
};

}  // namespace peer

#endif  // PEER_CORE_PARAMETERS_HPP
