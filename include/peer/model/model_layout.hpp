// SPDX-License-Identifier: MIT
#ifndef PEER_MODEL_MODEL_LAYOUT_HPP
#define PEER_MODEL_MODEL_LAYOUT_HPP

/// \file
/// ModelLayout: one parameter set for a whole model of many layers.
///
/// Every layer keeps its own ParameterLayout (what its forward and backward check their arguments
/// against). A ModelLayout lays those layouts end to end under name prefixes ("blocks.3.ffn." +
/// "experts"), giving one model-level ParameterLayout, and so:
/// - all dense tensors of all layers in ONE flat buffer (one all-reduce, one flat optimizer, one array a
///   user may own: Parameters::ExternalMemory), each layer's block starting on a 64-byte boundary so a
///   layer's own offsets hold unchanged inside it;
/// - all buffers (batch-norm running statistics) in one flat buffer of buffers;
/// - every table once, even when several layers share it (Memory Layers at Scale share one memory across
///   layers): a shared table has one value, one row-sparse gradient and one optimizer state.
/// Parameters, Gradients, optimizers (Sgd, Adam), clip_gradient_norm and TrainingCheckpoint are built on
/// layout() exactly as for a single layer. layer_parameters() and layer_gradients() then give each layer
/// a view of its part, which its forward and backward take as they take a layer's own objects; nothing
/// is copied.
///
///     peer::ModelLayout model;                                  // float: 4-byte scalars
///     const int l0 = model.add_layer("blocks.0.ffn.", peer0.layout());
///     const int l1 = model.add_layer("blocks.1.ffn.", peer1.layout(),
///                                    {{"experts", "blocks.0.ffn.experts"}});  // one table, two layers
///     peer::Parameters<float> params(model.layout());
///     peer::Gradients<float> grads(model.layout());
///     peer::LayerViews<float> views(model, params, grads);      // make once, keep
///     peer0.initialize(views.params(l0), seed0);
///     peer0.forward(views.params(l0), x, y, cache0, peer::Mode::kTrain);
///     peer0.backward(views.params(l0), cache0, dy, dx, views.grads(l0));
///     peer::Adam<float> adam(model.layout(), peer::default_param_groups(3e-4));
///     adam.step(params, grads);                                 // every layer, one step
///
/// Views hold pointers into the model's storage: they stay valid while that Parameters / Gradients object
/// lives (moving it keeps its storage, so views survive a move).

#include <string>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// Where one layer's tensors sit in a model.
struct LayerSlot {
  std::string prefix;        ///< prepended to the layer's tensor names ("blocks.3.ffn.")
  ParameterLayout layout;    ///< the layer's own layout, as its forward and backward expect it
  Index dense_offset = 0;    ///< scalars into the model's flat dense buffer where the layer's block starts
  Index buffer_offset = 0;   ///< scalars into the model's flat buffer of buffers
  std::vector<int> tables;   ///< for each of the layer's tables, the index of the model table it is
};

/// A layer table that is not new but an existing model table: `table` names it in the layer's layout
/// ("experts"), `model_table` in the model's ("blocks.0.ffn.experts"). Shapes must agree.
struct SharedTable {
  std::string table;
  std::string model_table;
};

/// The layers of a model, laid end to end in one model-level ParameterLayout.
class ModelLayout {
 public:
  /// `scalar_bytes`: sizeof(Scalar) of the layers (4 for float, 8 for double); every layer must agree.
  explicit ModelLayout(Index scalar_bytes = 4) : layout_(scalar_bytes) {}

  /// Adds a layer's tensors as "<prefix><name>" and returns the layer's index. Its dense tensors and its
  /// buffers each form one contiguous block, in the layer's order, with the layer's own offsets; its
  /// tables are new model tables, except those listed in `shared`. Throws std::invalid_argument when a
  /// name is taken, the scalar size differs, or a shared table is unknown or of another shape.
  int add_layer(const std::string& prefix, const ParameterLayout& layer, const std::vector<SharedTable>& shared = {}) {
    if (layer.scalar_bytes() != layout_.scalar_bytes()) {
      detail::throw_invalid("ModelLayout::add_layer('" + prefix + "'): the layer's scalar_bytes", layer.scalar_bytes(),
                            "must equal the model's " + detail::to_text(layout_.scalar_bytes()));
    }
    for (const auto& s : slots_) {
      if (s.prefix == prefix) throw std::invalid_argument("ModelLayout::add_layer: prefix '" + prefix + "' is used twice");
    }
    for (const auto& sh : shared) {
      bool found = false;
      for (const auto& t : layer.tables()) found = found || t.name == sh.table;
      if (!found) {
        throw std::invalid_argument("ModelLayout::add_layer('" + prefix + "'): SharedTable.table '" + sh.table +
                                    "' is not a table of the layer");
      }
    }
    // Check everything before registering anything, so a failed call leaves the model unchanged.
    std::vector<int> table_ids;
    for (const auto& t : layer.tables()) {
      const SharedTable* share = nullptr;
      for (const auto& sh : shared) share = sh.table == t.name ? &sh : share;
      if (share == nullptr) {
        check_free(prefix + t.name);
        table_ids.push_back(-1);
        continue;
      }
      const auto found = layout_.find(share->model_table);
      if (found.first < 0 || found.second != ParamKind::kRowSparse) {
        throw std::invalid_argument("ModelLayout::add_layer('" + prefix + "'): SharedTable.model_table '" +
                                    share->model_table + "' is not a table of the model");
      }
      const TensorSpec& m = layout_.tables()[static_cast<std::size_t>(found.first)];
      if (m.rows != t.rows || m.cols != t.cols) {
        throw std::invalid_argument("ModelLayout::add_layer('" + prefix + "'): table '" + t.name + "' is [" +
                                    detail::to_text(t.rows) + ", " + detail::to_text(t.cols) + "] but the shared model table '" +
                                    m.name + "' is [" + detail::to_text(m.rows) + ", " + detail::to_text(m.cols) + "]");
      }
      if (m.storage != t.storage) {
        throw std::invalid_argument("ModelLayout::add_layer('" + prefix + "'): table '" + t.name + "' is stored as " +
                                    to_string(t.storage) + " but the shared model table '" + m.name + "' as " + to_string(m.storage));
      }
      table_ids.push_back(found.first);
    }
    for (const auto& s : layer.dense()) check_free(prefix + s.name);
    for (const auto& s : layer.buffers()) check_free(prefix + s.name);

    LayerSlot slot;
    slot.prefix = prefix;
    slot.layout = layer;
    slot.dense_offset = aligned(layout_.dense_size());
    slot.buffer_offset = aligned(layout_.buffer_size());
    // The block starts aligned, and add_dense aligns each offset the way the layer's layout did, so every
    // tensor lands at block start + its offset in the layer (checked: views rely on it).
    for (const auto& s : layer.dense()) {
      const auto& m = layout_.spec(layout_.add_dense(prefix + s.name, s.rows, s.cols));
      if (m.offset != slot.dense_offset + s.offset) throw std::logic_error("ModelLayout: dense block misaligned");
    }
    for (const auto& s : layer.buffers()) {
      const auto& m = layout_.spec(layout_.add_buffer(prefix + s.name, s.rows, s.cols));
      if (m.offset != slot.buffer_offset + s.offset) throw std::logic_error("ModelLayout: buffer block misaligned");
    }
    for (std::size_t t = 0; t < layer.tables().size(); ++t) {
      if (table_ids[t] >= 0) continue;
      const auto& s = layer.tables()[t];
      table_ids[t] = layout_.add_table(prefix + s.name, s.rows, s.cols, s.storage).index;
    }
    slot.tables = std::move(table_ids);
    slots_.push_back(std::move(slot));
    return static_cast<int>(slots_.size()) - 1;
  }

  /// The model-level layout: every tensor of every layer under its full name, each table once.
  const ParameterLayout& layout() const { return layout_; }
  int num_layers() const { return static_cast<int>(slots_.size()); }
  const LayerSlot& slot(int layer) const {
    if (layer < 0 || layer >= num_layers()) {
      detail::throw_invalid("ModelLayout layer index", layer, "must be in [0, " + detail::to_text(num_layers()) + ")");
    }
    return slots_[static_cast<std::size_t>(layer)];
  }
  /// Index of the layer added with `prefix`, or -1.
  int find_layer(const std::string& prefix) const {
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].prefix == prefix) return static_cast<int>(i);
    }
    return -1;
  }

 private:
  Index aligned(Index size) const {
    const Index a = layout_.align_scalars();
    return (size + a - 1) / a * a;
  }
  void check_free(const std::string& name) const {
    if (layout_.find(name).first >= 0) {
      throw std::invalid_argument("ModelLayout::add_layer: tensor name '" + name + "' is used twice");
    }
  }

  ParameterLayout layout_;
  std::vector<LayerSlot> slots_;
};

namespace detail {

inline void check_model(const ParameterLayout& got, const ModelLayout& model, const char* what) {
  if (got != model.layout()) {
    throw std::invalid_argument(std::string(what) + " were made for a different layout than the model's (make them from "
                                "ModelLayout::layout())");
  }
}

}  // namespace detail

/// A view of layer `layer`'s parameters inside the model's `params` (made from model.layout()).
template <typename Scalar>
Parameters<Scalar> layer_parameters(Parameters<Scalar>& params, const ModelLayout& model, int layer) {
  detail::check_model(params.layout(), model, "layer_parameters: params");
  const LayerSlot& s = model.slot(layer);
  typename Parameters<Scalar>::ExternalMemory memory;
  memory.dense = params.dense_data() + s.dense_offset;
  memory.buffers = params.buffer_data() + s.buffer_offset;
  for (int t : s.tables) {
    auto& table = params.table(TableHandle{t});
    if (table.is_bf16()) {
      memory.tables.emplace_back(table.bf16_data());
    } else {
      memory.tables.emplace_back(table.data());
    }
  }
  return Parameters<Scalar>(s.layout, memory);
}

/// A read-only view (for inference on const parameters). The object is const: nothing can write through it.
template <typename Scalar>
const Parameters<Scalar> layer_parameters(const Parameters<Scalar>& params, const ModelLayout& model, int layer) {
  return layer_parameters(const_cast<Parameters<Scalar>&>(params), model, layer);
}

/// A view of layer `layer`'s gradients inside the model's `grads`: its dense block, and the model's
/// table gradients (shared with the other layers of a shared table).
template <typename Scalar>
Gradients<Scalar> layer_gradients(Gradients<Scalar>& grads, const ModelLayout& model, int layer) {
  detail::check_model(grads.layout(), model, "layer_gradients: grads");
  const LayerSlot& s = model.slot(layer);
  std::vector<RowSparseGrad<Scalar>*> tables;
  for (int t : s.tables) tables.push_back(&grads.table(TableHandle{t}));
  return Gradients<Scalar>(s.layout, grads.dense_data() + s.dense_offset, tables);
}

/// Every layer's views of one model's parameters and gradients, made once and kept (making a view copies
/// the layer's layout, so it allocates: keep views out of the training loop).
template <typename Scalar>
class LayerViews {
 public:
  LayerViews(const ModelLayout& model, Parameters<Scalar>& params, Gradients<Scalar>& grads)
      : params_key_(storage_of(params)), grads_key_(storage_of(grads)) {
    for (int l = 0; l < model.num_layers(); ++l) {
      params_.push_back(layer_parameters(params, model, l));
      grads_.push_back(layer_gradients(grads, model, l));
    }
  }
  /// Parameters only (inference, initialization).
  LayerViews(const ModelLayout& model, Parameters<Scalar>& params) : params_key_(storage_of(params)) {
    for (int l = 0; l < model.num_layers(); ++l) params_.push_back(layer_parameters(params, model, l));
  }

  /// Whether these views were made from `params` (the same storage), and from `grads` when given: a
  /// model that keeps views in its cache checks this before reusing them.
  bool made_from(const Parameters<Scalar>& params) const { return storage_of(params) == params_key_; }
  bool made_from(const Parameters<Scalar>& params, const Gradients<Scalar>& grads) const {
    return made_from(params) && !grads_.empty() && storage_of(grads) == grads_key_;
  }

  int num_layers() const { return static_cast<int>(params_.size()); }
  Parameters<Scalar>& params(int layer) { return params_.at(static_cast<std::size_t>(layer)); }
  const Parameters<Scalar>& params(int layer) const { return params_.at(static_cast<std::size_t>(layer)); }
  Gradients<Scalar>& grads(int layer) {
    if (grads_.empty()) throw std::invalid_argument("LayerViews: made without gradients");
    return grads_.at(static_cast<std::size_t>(layer));
  }

 private:
  // Where a views' storage lives: the flat buffers and every table (views hold nothing else).
  static std::vector<const void*> storage_of(const Parameters<Scalar>& p) {
    std::vector<const void*> key{p.dense_data(), p.buffer_data()};
    for (std::size_t t = 0; t < p.layout().tables().size(); ++t) key.push_back(p.table(TableHandle{static_cast<int>(t)}).storage_data());
    return key;
  }
  static std::vector<const void*> storage_of(const Gradients<Scalar>& g) {
    std::vector<const void*> key{g.dense_data()};
    for (std::size_t t = 0; t < g.layout().tables().size(); ++t) key.push_back(&g.table(TableHandle{static_cast<int>(t)}));
    return key;
  }

  std::vector<const void*> params_key_, grads_key_;
  std::vector<Parameters<Scalar>> params_;
  std::vector<Gradients<Scalar>> grads_;
};

}  // namespace peer

#endif  // PEER_MODEL_MODEL_LAYOUT_HPP
