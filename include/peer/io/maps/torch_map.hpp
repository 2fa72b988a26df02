// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPS_TORCH_MAP_HPP
#define PEER_IO_MAPS_TORCH_MAP_HPP

/// \file
/// What every map between a PyTorch module's state_dict and our parameters shares: its tensors as
/// row-major 2-D views, and import / export / gradient export driven by the map's row links. A map is a
/// class with
/// \code
///   static const char* package();                 // "PEER-pytorch", named in errors
///   std::vector<TorchTensor> tensors() const;     // its tensors, in its state_dict order
///   template <typename Link> void for_each_row(Link&& link) const;
///   // link(theirs, their_row, ours, our_row, our_col, cols): row `their_row` of their tensor `theirs` is the
///   // `cols` scalars of our tensor `ours` at [our_row, our_col ..); every row of every tensor once.
/// \endcode
/// peer/io/maps/peer_pytorch.hpp and peer/io/maps/pkm_pytorch.hpp are the two maps; their public functions
/// (import_peer_pytorch, ...) call the ones here.

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// One tensor of a PyTorch state_dict as the maps exchange it: a row-major 2-D view [rows, cols] of the
/// tensor whose shape (in PyTorch and in a safetensors file) is `shape` (rows x cols scalars in all).
struct TorchTensor {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  std::vector<std::int64_t> shape;
};

namespace detail {

/// The view of `name` in `tensors`, checked: present, and [rows, cols] as the map says.
template <typename Map, typename View>
const View& torch_tensor(const Map& map, const std::map<std::string, View>& tensors, const std::string& name) {
  const auto it = tensors.find(name);
  if (it == tensors.end()) throw std::invalid_argument(std::string(Map::package()) + " tensor '" + name + "' is missing");
  for (const auto& spec : map.tensors()) {
    if (spec.name == name && (it->second.rows() != spec.rows || it->second.cols() != spec.cols)) {
      throw std::invalid_argument(std::string(Map::package()) + " tensor '" + name + "' is [" + to_text(it->second.rows()) +
                                  ", " + to_text(it->second.cols()) + "] but must be [" + to_text(spec.rows) + ", " +
                                  to_text(spec.cols) + "] for this configuration");
    }
  }
  return it->second;
}

/// Every tensor of the map present with its shape (nothing written yet).
template <typename Map, typename View>
void check_torch_tensors(const Map& map, const std::map<std::string, View>& tensors) {
  for (const auto& spec : map.tensors()) torch_tensor(map, tensors, spec.name);
}

/// Our tensors that the map writes, checked present in `params` before anything is written.
template <typename Map, typename Scalar>
void check_our_tensors(const Map& map, const Parameters<Scalar>& params) {
  map.for_each_row([&](const char*, Index, const char* ours, Index, Index, Index) {
    if (params.layout().find(ours).first < 0) {
      throw std::invalid_argument(std::string(Map::package()) + " map: the parameters have no tensor '" + ours +
                                  "' (made from another configuration?)");
    }
  });
}

/// The bfloat16 table named `ours` in `params`, or null (a dense tensor, or a table in Scalar).
template <typename Scalar>
RowTable<Scalar>* bf16_table(Parameters<Scalar>& params, const char* ours) {
  const auto found = params.layout().find(ours);
  if (found.second != ParamKind::kRowSparse) return nullptr;
  RowTable<Scalar>& table = params.table(TableHandle{found.first});
  return table.is_bf16() ? &table : nullptr;
}

/// Writes the maps' rows into `params`. A bfloat16 table receives each value rounded to the nearest
/// bfloat16 (RowTable::write_row), its row widened and written back whole when a map fills a part of it.
template <typename Map, typename Scalar>
void import_torch(const Map& map, const std::map<std::string, ConstMatrixMap<Scalar>>& tensors, Parameters<Scalar>& params) {
  check_torch_tensors(map, tensors);
  check_our_tensors(map, params);
  std::vector<Scalar> row;
  map.for_each_row([&](const char* theirs, Index their_row, const char* ours, Index our_row, Index our_col, Index cols) {
    if (RowTable<Scalar>* table = bf16_table(params, ours)) {
      row.resize(static_cast<std::size_t>(table->cols()));
      table->read_row(our_row, row.data());
      Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(row.data() + our_col, cols) = tensors.at(theirs).row(their_row);
      table->write_row(our_row, row.data());
    } else {
      params.find(ours).row(our_row).segment(our_col, cols) = tensors.at(theirs).row(their_row);
    }
  });
}

/// Reads the maps' rows out of `params` (a bfloat16 table's rows widened, exactly).
template <typename Map, typename Scalar>
void export_torch(const Map& map, const Parameters<Scalar>& params, std::map<std::string, MatrixMap<Scalar>>& tensors) {
  check_torch_tensors(map, tensors);
  check_our_tensors(map, params);
  auto& p = const_cast<Parameters<Scalar>&>(params);  // find() is non-const; nothing is written to params
  std::vector<Scalar> row;
  map.for_each_row([&](const char* theirs, Index their_row, const char* ours, Index our_row, Index our_col, Index cols) {
    if (const RowTable<Scalar>* table = bf16_table(p, ours)) {
      row.resize(static_cast<std::size_t>(table->cols()));
      table->read_row(our_row, row.data());
      tensors.at(theirs).row(their_row) = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(row.data() + our_col, cols);
    } else {
      tensors.at(theirs).row(their_row) = p.find(ours).row(our_row).segment(our_col, cols);
    }
  });
}

/// Gradients as PyTorch's autograd holds them: a table's gradient dense, zero where no token chose the row.
template <typename Map, typename Scalar>
void export_torch_gradients(const Map& map, Gradients<Scalar>& grads, std::map<std::string, MatrixMap<Scalar>>& tensors) {
  check_torch_tensors(map, tensors);
  map.for_each_row([&](const char* theirs, Index their_row, const char* ours, Index our_row, Index our_col, Index cols) {
    auto out = tensors.at(theirs).row(their_row);
    const auto found = grads.layout().find(ours);
    if (found.first < 0) {
      throw std::invalid_argument(std::string(Map::package()) + " map: the gradients have no tensor '" + ours + "'");
    }
    if (found.second != ParamKind::kRowSparse) {
      out = grads.find_dense(ours).row(our_row).segment(our_col, cols);
      return;
    }
    const Scalar* row = grads.find_table(ours).find(static_cast<ExpertId>(our_row));
    if (row == nullptr) {
      out.setZero();
    } else {
      for (Index c = 0; c < cols; ++c) out(c) = row[our_col + c];
    }
  });
}

/// The query projection and per-head sub-keys of lucidrains' product-key layers (PEER-pytorch and
/// product-key-memory lay them out the same way). Their query weight [2 H dh, D] (`query_name`) has the
/// half p outermost: their row p H dh + h dh + j is our `query.weight` row h 2 dh + p dh + j (head
/// outermost). Their `keys` [H, S, 2, dh], viewed as [H S 2, dh]: keys[h, i, p, :] is row h S + i of our
/// `sub_keys.left` (p = 0) or `sub_keys.right` (p = 1). Expert / value id = a S + b, a from the first half.
template <typename Link>
void for_each_product_key_row(const char* query_name, Index heads, Index dh, Index sub_keys, Index dim, Link&& link) {
  for (Index p = 0; p < 2; ++p) {
    for (Index h = 0; h < heads; ++h) {
      for (Index j = 0; j < dh; ++j) link(query_name, p * heads * dh + h * dh + j, "query.weight", h * 2 * dh + p * dh + j, 0, dim);
    }
  }
  for (Index h = 0; h < heads; ++h) {
    for (Index i = 0; i < sub_keys; ++i) {
      for (Index p = 0; p < 2; ++p) {
        link("keys", (h * sub_keys + i) * 2 + p, p == 0 ? "sub_keys.left" : "sub_keys.right", h * sub_keys + i, 0, dh);
      }
    }
  }
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_IO_MAPS_TORCH_MAP_HPP
