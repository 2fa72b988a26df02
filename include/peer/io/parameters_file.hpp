// SPDX-License-Identifier: MIT
#ifndef PEER_IO_PARAMETERS_FILE_HPP
#define PEER_IO_PARAMETERS_FILE_HPP

/// \file
/// Our own names in safetensors files: every tensor of a Parameters object (a layer's, or a whole model's
/// made from a ModelLayout) as "<prefix><name>", dense tensors, buffers (batch-norm running statistics)
/// and tables alike, each with its [rows, cols] shape. What PyTorch code that mirrors our layout loads
/// with safetensors.torch.load_file, and what our training checkpoints are not: weights only, no optimizer
/// state (peer/io/training_checkpoint.hpp keeps that).

#include <string>

#include "peer/core/parameters.hpp"
#include "peer/io/safetensors.hpp"

namespace peer {

namespace detail {

/// visit(spec, pointer) for every tensor; const pointers for const `params` (which may be read-only).
template <typename Params, typename Visit>
void for_each_tensor(Params& params, Visit&& visit) {
  const ParameterLayout& layout = params.layout();
  for (const auto& s : layout.dense()) visit(s, params.dense_data() + s.offset);
  for (const auto& s : layout.buffers()) visit(s, params.buffer_data() + s.offset);
  for (std::size_t t = 0; t < layout.tables().size(); ++t) {
    auto& table = params.table(TableHandle{static_cast<int>(t)});
    if (table.is_bf16()) {
      visit(layout.tables()[t], table.bf16_data());
    } else {
      visit(layout.tables()[t], table.data());
    }
  }
}

}  // namespace detail

/// Adds every tensor of `params` to `writer` as "<prefix><name>" [rows, cols], stored as `stored`; tables
/// stored as bfloat16 are written as BF16, their exact values, whatever `stored` says.
template <typename Scalar>
void add_parameters(SafetensorsWriter& writer, const Parameters<Scalar>& params, const std::string& prefix = "",
                    SafetensorsDType stored = safetensors_dtype_of<Scalar>()) {
  detail::for_each_tensor(params, [&](const TensorSpec& s, const auto* data) {
    const bool bf16 = s.kind == ParamKind::kRowSparse && s.storage == TableStorage::kBFloat16;
    writer.add(prefix + s.name, data, {static_cast<std::int64_t>(s.rows), static_cast<std::int64_t>(s.cols)},
               bf16 ? SafetensorsDType::kBF16 : stored);
  });
}

/// Fills every tensor of `params` from "<prefix><name>" of `file`, converted to Scalar (to bfloat16, rounded
/// to nearest, for a table stored so). Checked first,
/// so that a failure changes nothing: every tensor present with its [rows, cols] shape, and no tensor of
/// the file under `prefix` that `params` does not have (std::runtime_error naming it).
template <typename Scalar>
void load_parameters(const SafetensorsFile& file, Parameters<Scalar>& params, const std::string& prefix = "") {
  const ParameterLayout& layout = params.layout();
  detail::for_each_tensor(params, [&](const TensorSpec& s, auto*) {
    const std::string name = prefix + s.name;
    if (!file.has(name)) throw std::runtime_error("load_parameters: tensor " + detail::quote_text(name) + " is not in the file");
    (void)file.matrix_shape(name, s.rows, s.cols);  // throws, naming it, unless it is [rows, cols]
    if (!detail::is_float_dtype(file.tensor(name).dtype)) {
      throw std::runtime_error("load_parameters: tensor " + detail::quote_text(name) + " is " + to_string(file.tensor(name).dtype) +
                               ", not a float dtype");
    }
  });
  for (const auto& t : file.tensors()) {
    if (t.name.compare(0, prefix.size(), prefix) != 0) continue;
    if (layout.find(t.name.substr(prefix.size())).first < 0) {
      throw std::runtime_error("load_parameters: the file's tensor " + detail::quote_text(t.name) + " is not a parameter here");
    }
  }
  detail::for_each_tensor(params, [&](const TensorSpec& s, auto* data) {
    file.read(prefix + s.name, data, static_cast<std::size_t>(s.size()));
  });
}

}  // namespace peer

#endif  // PEER_IO_PARAMETERS_FILE_HPP
