// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPS_PEER_PYTORCH_FILE_HPP
#define PEER_IO_MAPS_PEER_PYTORCH_FILE_HPP

/// \file
/// PEER-pytorch weights in safetensors files: load a PEER layer saved from PyTorch
/// (`safetensors.torch.save_file(peer.state_dict(), path)`) into our parameters, and save ours under its
/// names, so PyTorch can load_state_dict() them. `prefix` selects one layer of a larger model's file
/// ("layers.3.ff."). The map and the configuration are peer/io/maps/peer_pytorch.hpp's; the file format
/// is peer/io/safetensors.hpp's (needs nlohmann-json).

#include <map>
#include <string>

#include "peer/core/parameters.hpp"
#include "peer/io/maps/peer_pytorch.hpp"
#include "peer/io/safetensors.hpp"

namespace peer {

/// Fills `params` from PEER-pytorch's tensors `<prefix>to_queries.0.weight`, `<prefix>keys`, ... of
/// `file`, converted to Scalar (F32, F64, BF16 or F16 files). Every tensor is checked (present, shape of
/// this configuration) before anything is written. Tensors of the file it does not name are ignored.
template <typename Scalar>
void import_peer_pytorch(const PeerPytorchConfig& t, const SafetensorsFile& file, Parameters<Scalar>& params,
                         const std::string& prefix = "") {
  std::map<std::string, RowMatrix<Scalar>> values;
  std::map<std::string, ConstMatrixMap<Scalar>> views;
  for (const auto& spec : peer_pytorch_tensors(t)) {
    if (!file.has(prefix + spec.name)) {
      throw std::runtime_error("PEER-pytorch tensor " + detail::quote_text(prefix + spec.name) + " is not in the file");
    }
    auto& m = values[spec.name] = file.matrix<Scalar>(prefix + spec.name, spec.rows, spec.cols);
    views.emplace(spec.name, ConstMatrixMap<Scalar>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  import_peer_pytorch(t, views, params);
}

/// Adds our parameters to `writer` as PEER-pytorch's tensors (`<prefix>` + its names, its shapes: `keys`
/// as [H, n, 2, dk]), stored as `stored`.
template <typename Scalar>
void add_peer_pytorch(SafetensorsWriter& writer, const PeerPytorchConfig& t, const Parameters<Scalar>& params,
                      const std::string& prefix = "", SafetensorsDType stored = safetensors_dtype_of<Scalar>()) {
  std::map<std::string, RowMatrix<Scalar>> values;
  std::map<std::string, MatrixMap<Scalar>> views;
  for (const auto& spec : peer_pytorch_tensors(t)) {
    auto& m = values[spec.name] = RowMatrix<Scalar>(spec.rows, spec.cols);
    views.emplace(spec.name, MatrixMap<Scalar>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  export_peer_pytorch(t, params, views);
  for (const auto& spec : peer_pytorch_tensors(t)) {
    std::vector<std::int64_t> shape{spec.rows, spec.cols};
    if (spec.name == "keys") shape = {t.heads, t.num_sub_keys(), 2, t.dim_key};
    writer.add(prefix + spec.name, values[spec.name].data(), shape, stored);
  }
}

}  // namespace peer

#endif  // PEER_IO_MAPS_PEER_PYTORCH_FILE_HPP
