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
#include "peer/io/maps/torch_map_file.hpp"

namespace peer {

/// Fills `params` from PEER-pytorch's tensors `<prefix>to_queries.0.weight`, `<prefix>keys`, ... of
/// `file`, converted to Scalar (F32, F64, BF16 or F16 files). Every tensor is checked (present, shape of
/// this configuration) before anything is written. Tensors of the file it does not name are ignored.
template <typename Scalar>
void import_peer_pytorch(const PeerPytorchConfig& t, const SafetensorsFile& file, Parameters<Scalar>& params,
                         const std::string& prefix = "") {
  detail::import_torch_file(PeerPytorchMap(t), file, params, prefix);
}

/// Adds our parameters to `writer` as PEER-pytorch's tensors (`<prefix>` + its names, its shapes: `keys`
/// as [H, n, 2, dk]), stored as `stored`.
template <typename Scalar>
void add_peer_pytorch(SafetensorsWriter& writer, const PeerPytorchConfig& t, const Parameters<Scalar>& params,
                      const std::string& prefix = "", SafetensorsDType stored = safetensors_dtype_of<Scalar>()) {
  detail::add_torch_file(writer, PeerPytorchMap(t), params, prefix, stored);
}

}  // namespace peer

#endif  // PEER_IO_MAPS_PEER_PYTORCH_FILE_HPP
