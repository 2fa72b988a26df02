// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPS_TORCH_MAP_FILE_HPP
#define PEER_IO_MAPS_TORCH_MAP_FILE_HPP

/// \file
/// A map's tensors (peer/io/maps/torch_map.hpp) in safetensors files, as PyTorch saves a state_dict
/// (`safetensors.torch.save_file(module.state_dict(), path)`): load one layer of such a file into our
/// parameters, and write ours under its names and shapes so PyTorch can load_state_dict() them.
/// `prefix` selects one layer of a larger model's file ("layers.3.ff."). Needs nlohmann-json
/// (peer/io/safetensors.hpp).

#include <map>
#include <string>
#include <vector>

#include "peer/core/parameters.hpp"
#include "peer/io/maps/torch_map.hpp"
#include "peer/io/safetensors.hpp"

namespace peer {
namespace detail {

/// Fills `params` from `<prefix>` + the map's tensors in `file`, converted to Scalar (F32, F64, BF16 or
/// F16 files). Every tensor is checked (present, the element count of this configuration) before anything
/// is written; tensors of the file the map does not name are ignored.
template <typename Map, typename Scalar>
void import_torch_file(const Map& map, const SafetensorsFile& file, Parameters<Scalar>& params, const std::string& prefix) {
  std::map<std::string, RowMatrix<Scalar>> values;
  std::map<std::string, ConstMatrixMap<Scalar>> views;
  for (const auto& spec : map.tensors()) {
    if (!file.has(prefix + spec.name)) {
      throw std::runtime_error(std::string(Map::package()) + " tensor " + quote_text(prefix + spec.name) + " is not in the file");
    }
    auto& m = values[spec.name] = file.matrix<Scalar>(prefix + spec.name, spec.rows, spec.cols);
    views.emplace(spec.name, ConstMatrixMap<Scalar>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  import_torch(map, views, params);
}

/// Adds our parameters to `writer` as the map's tensors (`<prefix>` + its names, its shapes), stored as `stored`.
template <typename Map, typename Scalar>
void add_torch_file(SafetensorsWriter& writer, const Map& map, const Parameters<Scalar>& params, const std::string& prefix,
                    SafetensorsDType stored) {
  std::map<std::string, RowMatrix<Scalar>> values;
  std::map<std::string, MatrixMap<Scalar>> views;
  for (const auto& spec : map.tensors()) {
    auto& m = values[spec.name] = RowMatrix<Scalar>(spec.rows, spec.cols);
    views.emplace(spec.name, MatrixMap<Scalar>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  export_torch(map, params, views);
  for (const auto& spec : map.tensors()) writer.add(prefix + spec.name, values[spec.name].data(), spec.shape, stored);
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_IO_MAPS_TORCH_MAP_FILE_HPP
