// SPDX-License-Identifier: MIT
#ifndef PEER_IO_MAPS_PKM_PYTORCH_FILE_HPP
#define PEER_IO_MAPS_PKM_PYTORCH_FILE_HPP

/// \file
/// product-key-memory weights in safetensors files: load a `PKM` saved from PyTorch
/// (`safetensors.torch.save_file(pkm.state_dict(), path)`) into our ProductKeyMemory's parameters, and
/// save ours under its names and shapes. `prefix` selects one layer of a larger model's file. The map and
/// the configuration are peer/io/maps/pkm_pytorch.hpp's; the format peer/io/safetensors.hpp's (needs
/// nlohmann-json).

#include <string>

#include "peer/core/parameters.hpp"
#include "peer/io/maps/pkm_pytorch.hpp"
#include "peer/io/maps/torch_map_file.hpp"

namespace peer {

/// Fills `params` from `<prefix>to_queries.weight`, `<prefix>norm.weight`, ... of `file`, converted to
/// Scalar. Every tensor is checked (present, this configuration's size) before anything is written.
template <typename Scalar>
void import_pkm_pytorch(const PkmPytorchConfig& t, const SafetensorsFile& file, Parameters<Scalar>& params,
                        const std::string& prefix = "") {
  detail::import_torch_file(PkmPytorchMap(t), file, params, prefix);
}

/// Adds our parameters to `writer` as product-key-memory's tensors (`norm.*` as [dh], `keys` as
/// [H, n, 2, dh]), stored as `stored`.
template <typename Scalar>
void add_pkm_pytorch(SafetensorsWriter& writer, const PkmPytorchConfig& t, const Parameters<Scalar>& params,
                     const std::string& prefix = "", SafetensorsDType stored = safetensors_dtype_of<Scalar>()) {
  detail::add_torch_file(writer, PkmPytorchMap(t), params, prefix, stored);
}

}  // namespace peer

#endif  // PEER_IO_MAPS_PKM_PYTORCH_FILE_HPP
