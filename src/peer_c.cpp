// SPDX-License-Identifier: MIT
// The C interface (include/peer/c_api.h) over the header-only C++ library. Every entry point catches
// every exception and turns it into a status code and a thread-local message.
#include "peer/c_api.h"

#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include <peer/peer.hpp>
#ifndef PEER_C_WITHOUT_SAFETENSORS
#include <peer/io/maps/peer_pytorch_file.hpp>
#include <peer/io/parameters_file.hpp>
#endif

struct peer_layer {
  peer::PeerLayer<float> layer;
  peer::Parameters<float> params;
  peer::Gradients<float> grads;
  peer::PeerLayer<float>::Cache cache;
  std::unique_ptr<peer::Adam<float>> adam;  // on the heap: a fused optimizer must not move
  double fused_expert_lr = 0;                // the table's learning rate when its updates are fused
  std::int64_t steps = 0;

  peer_layer(const peer::PeerConfig& config, std::uint64_t seed)
      : layer(config),
        params(layer.make_parameters(seed)),
        grads(layer.make_gradients()),
        adam(std::make_unique<peer::Adam<float>>(layer.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw())) {}
};

// A model: PEER layers in one ModelLayout. Before build() only the layouts exist; build() allocates the
// parameters, gradients, views and AdamW.
struct peer_model {
  struct Layer {
    peer::PeerLayer<float> layer;
    peer::PeerLayer<float>::Cache cache;
    explicit Layer(const peer::PeerConfig& c) : layer(c) {}
  };
  peer::ModelLayout model{sizeof(float)};
  std::vector<std::unique_ptr<Layer>> layers;
  std::unique_ptr<peer::Parameters<float>> params;
  std::unique_ptr<peer::Gradients<float>> grads;
  std::unique_ptr<peer::LayerViews<float>> views;
  std::unique_ptr<peer::Adam<float>> adam;
  double fused_expert_lr = 0;
  std::int64_t steps = 0;

  bool built() const { return params != nullptr; }
};

namespace {

thread_local std::string g_last_error;

// The library was built without nlohmann-json: the safetensors entry points say so.
struct unsupported : std::logic_error {
  using std::logic_error::logic_error;
};

int fail(int code, const std::string& message) {
  g_last_error = message;
  return code;
}

// Runs `body`, mapping every exception to a status (std::invalid_argument and std::domain_error first:
// they derive from std::logic_error, std::runtime_error is what file validation throws).
template <typename Body>
int guarded(const char* where, Body&& body) {
  try {
    body();
    return PEER_OK;
  } catch (const unsupported& e) {
    return fail(PEER_ERROR_UNSUPPORTED, std::string(where) + ": " + e.what());
  } catch (const std::invalid_argument& e) {
    return fail(PEER_ERROR_INVALID_ARGUMENT, std::string(where) + ": " + e.what());
  } catch (const std::domain_error& e) {
    return fail(PEER_ERROR_DOMAIN, std::string(where) + ": " + e.what());
  } catch (const std::logic_error& e) {  // a call order the rules forbid (a second fused backward, ...)
    return fail(PEER_ERROR_INVALID_ARGUMENT, std::string(where) + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return fail(PEER_ERROR_OUT_OF_MEMORY, std::string(where) + ": out of memory");
  } catch (const std::runtime_error& e) {
    return fail(PEER_ERROR_IO, std::string(where) + ": " + e.what());
  } catch (const std::exception& e) {
    return fail(PEER_ERROR_INTERNAL, std::string(where) + ": " + e.what());
  } catch (...) {
    return fail(PEER_ERROR_INTERNAL, std::string(where) + ": unknown error");
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

peer::PeerConfig to_config(const peer_config& c) {
  peer::PeerConfig p;
  p.model_dim = c.model_dim;
  p.num_experts = c.num_experts;
  p.num_heads = c.num_heads;
  p.key_dim = c.key_dim;
  p.top_k = c.top_k;
  p.sub_key_top_k = c.sub_key_top_k;
  switch (c.gating) {
    case PEER_GATING_SOFTMAX: p.gating = peer::Gating::kSoftmax; break;
    case PEER_GATING_RELU: p.gating = peer::Gating::kReLU; break;
    case PEER_GATING_SIGMOID: p.gating = peer::Gating::kSigmoid; break;
    default: peer::detail::throw_invalid("peer_config.gating", c.gating, "must be a peer_gating value (0, 1 or 2)");
  }
  switch (c.query_norm) {
    case PEER_QUERY_NORM_BATCH: p.query_norm = peer::QueryNorm::kBatchNorm; break;
    case PEER_QUERY_NORM_LAYER: p.query_norm = peer::QueryNorm::kLayerNorm; break;
    case PEER_QUERY_NORM_NONE: p.query_norm = peer::QueryNorm::kNone; break;
    case PEER_QUERY_NORM_HALF_LAYER: p.query_norm = peer::QueryNorm::kHalfLayerNorm; break;
    default: peer::detail::throw_invalid("peer_config.query_norm", c.query_norm, "must be a peer_query_norm value (0 to 3)");
  }
  switch (c.key_sharing) {
    case PEER_KEYS_SHARED: p.key_sharing = peer::KeySharing::kShared; break;
    case PEER_KEYS_PER_HEAD: p.key_sharing = peer::KeySharing::kPerHead; break;
    default: peer::detail::throw_invalid("peer_config.key_sharing", c.key_sharing, "must be a peer_key_sharing value (0 or 1)");
  }
  switch (c.expert_storage) {
    case PEER_STORAGE_FLOAT: p.expert_storage = peer::TableStorage::kNative; break;
    case PEER_STORAGE_BFLOAT16: p.expert_storage = peer::TableStorage::kBFloat16; break;
    default: peer::detail::throw_invalid("peer_config.expert_storage", c.expert_storage, "must be a peer_storage value (0 or 1)");
  }
  switch (c.sub_key_scoring) {
    case PEER_SCORING_EXACT: p.sub_key_scoring = peer::SubKeyScoring::kExact; break;
    case PEER_SCORING_BF16_CHECKED: p.sub_key_scoring = peer::SubKeyScoring::kBFloat16Checked; break;
    default: peer::detail::throw_invalid("peer_config.sub_key_scoring", c.sub_key_scoring, "must be a peer_sub_key_scoring value (0 or 1)");
  }
  return p;
}

void from_config(const peer::PeerConfig& p, peer_config& c) {
  c.model_dim = p.model_dim;
  c.num_experts = p.num_experts;
  c.num_heads = p.num_heads;
  c.key_dim = p.key_dim;
  c.top_k = p.top_k;
  c.sub_key_top_k = p.sub_key_top_k;
  c.gating = p.gating == peer::Gating::kSoftmax ? PEER_GATING_SOFTMAX
             : p.gating == peer::Gating::kReLU  ? PEER_GATING_RELU
                                                : PEER_GATING_SIGMOID;
  c.query_norm = p.query_norm == peer::QueryNorm::kBatchNorm   ? PEER_QUERY_NORM_BATCH
                 : p.query_norm == peer::QueryNorm::kLayerNorm ? PEER_QUERY_NORM_LAYER
                 : p.query_norm == peer::QueryNorm::kNone      ? PEER_QUERY_NORM_NONE
                                                               : PEER_QUERY_NORM_HALF_LAYER;
  c.key_sharing = p.key_sharing == peer::KeySharing::kShared ? PEER_KEYS_SHARED : PEER_KEYS_PER_HEAD;
  c.expert_storage = p.expert_storage == peer::TableStorage::kBFloat16 ? PEER_STORAGE_BFLOAT16 : PEER_STORAGE_FLOAT;
  c.sub_key_scoring = p.sub_key_scoring == peer::SubKeyScoring::kBFloat16Checked ? PEER_SCORING_BF16_CHECKED : PEER_SCORING_EXACT;
}

std::string prefix_of(const char* prefix) { return prefix == nullptr ? std::string() : std::string(prefix); }

// forward / backward of one layer on the caller's float rows (shared by peer_layer and peer_model).
void forward_rows(const peer::PeerLayer<float>& layer, peer::Parameters<float>& params, peer::PeerLayer<float>::Cache& cache,
                  const float* x, int64_t rows, int64_t x_stride, float* y, int64_t y_stride, int mode) {
  require(mode == PEER_MODE_TRAIN || mode == PEER_MODE_EVAL, "mode = " + std::to_string(mode) + " must be PEER_MODE_TRAIN (0) or PEER_MODE_EVAL (1)");
  const peer::Index d = layer.config().model_dim;
  layer.forward(params, peer::rows_view(x, rows, d, x_stride), peer::rows_view(y, rows, d, y_stride), cache,
                mode == PEER_MODE_TRAIN ? peer::Mode::kTrain : peer::Mode::kEval);
}

void backward_rows(const peer::PeerLayer<float>& layer, const peer::Parameters<float>& params, peer::PeerLayer<float>::Cache& cache,
                   const float* dy, int64_t dy_stride, float* dx, int64_t dx_stride, peer::Gradients<float>& grads) {
  const peer::Index d = layer.config().model_dim, rows = cache.batch();
  if (dx == nullptr) {
    peer::RowMatrix<float> none(0, d);
    layer.backward(params, cache, peer::rows_view(dy, rows, d, dy_stride), none, grads);
  } else {
    layer.backward(params, cache, peer::rows_view(dy, rows, d, dy_stride), peer::rows_view(dx, rows, d, dx_stride), grads);
  }
}

// The optimizer groups of a table training: default_param_groups with the table group's rule.
std::vector<peer::ParamGroup> table_groups(const peer_table_training& t) {
  auto groups = peer::default_param_groups(1e-3);
  peer::ParamGroup& g = groups[0];
  switch (t.rule) {
    case PEER_TABLE_ADAM: g.table_optimizer = peer::TableOptimizer::kDefault; break;
    case PEER_TABLE_PARTIAL_ROW_WISE_ADAM: g.table_optimizer = peer::TableOptimizer::kPartialRowWiseAdam; break;
    case PEER_TABLE_ROW_WISE_ADAGRAD: g.table_optimizer = peer::TableOptimizer::kRowWiseAdagrad; break;
    default: peer::detail::throw_invalid("peer_table_training.rule", t.rule, "must be a peer_table_rule value (0, 1 or 2)");
  }
  switch (t.moment_storage) {
    case PEER_STORAGE_FLOAT: g.moment_storage = peer::TableStorage::kNative; break;
    case PEER_STORAGE_BFLOAT16: g.moment_storage = peer::TableStorage::kBFloat16; break;
    default: peer::detail::throw_invalid("peer_table_training.moment_storage", t.moment_storage, "must be a peer_storage value (0 or 1)");
  }
  switch (t.rounding) {
    case PEER_ROUNDING_STOCHASTIC: g.bf16_rounding = peer::Bf16Rounding::kStochastic; break;
    case PEER_ROUNDING_NEAREST: g.bf16_rounding = peer::Bf16Rounding::kNearest; break;
    case PEER_ROUNDING_MASTER_ROWS: g.bf16_rounding = peer::Bf16Rounding::kMasterRows; break;
    default: peer::detail::throw_invalid("peer_table_training.rounding", t.rounding, "must be a peer_rounding value (0, 1 or 2)");
  }
  g.rounding_seed = t.rounding_seed;
  return groups;
}

// Replaces `adam` by a fresh AdamW over `layout` with the table training `t` (validated first: nothing
// changes on a refusal), fused into params / grads when asked. Only before the first step, with no table
// gradient pending.
void set_table_training(std::unique_ptr<peer::Adam<float>>& adam, double& fused_expert_lr, const peer::ParameterLayout& layout,
                        std::int64_t steps, peer::Parameters<float>& params, peer::Gradients<float>& grads, const peer_table_training* t) {
  require(t != nullptr, "training is NULL");
  require(steps == 0, "the optimizer has taken " + std::to_string(steps) +
                          " step(s): choose the table training before the first step (its state would be lost)");
  for (std::size_t i = 0; i < layout.tables().size(); ++i) {
    const auto& g = grads.table(peer::TableHandle{static_cast<int>(i)});
    require(g.empty(), "the gradient of table '" + layout.tables()[i].name + "' holds rows: call zero_grad first");
    require(!g.fused_pending(), "a fused backward has updated table '" + layout.tables()[i].name +
                                    "' since the last step: take the step first (its update would be lost)");
  }
  auto fresh = std::make_unique<peer::Adam<float>>(layout, table_groups(*t), peer::AdamConfig::adamw());
  if (t->fused != 0) fresh->set_learning_rate(fresh->group_index("experts"), t->expert_lr);  // validated there
  if (adam != nullptr) adam->unfuse_table_updates();
  if (t->fused != 0) fresh->fuse_table_updates(params, grads);
  adam = std::move(fresh);
  fused_expert_lr = t->fused != 0 ? t->expert_lr : 0.0;
}

// AdamW with this call's rates over `grads` (clipped first when clip > 0). With fused table updates the
// table's rows were updated in the backward at fused_expert_lr: expert_lr must be that rate.
void adam_step(peer::Adam<float>& adam, double fused_expert_lr, peer::Parameters<float>& params, peer::Gradients<float>& grads,
               double dense_lr, double expert_lr, double weight_decay, double clip) {
  require(!adam.fused() || expert_lr == fused_expert_lr,
          "expert_lr = " + std::to_string(expert_lr) + " differs from the fused table updates' learning rate " +
              std::to_string(fused_expert_lr) + " (peer_table_training.expert_lr: the rows were updated in the backward)");
  require(clip >= 0.0, "clip = " + std::to_string(clip) + " must be >= 0 (0: no clipping)");
  require(clip == 0.0 || !adam.fused(), "clip = " + std::to_string(clip) +
                                            " needs the expert table's gradient, which fused table updates (peer_table_training.fused) never store: pass clip = 0");
  if (!(weight_decay >= 0.0)) peer::detail::throw_invalid("weight_decay", weight_decay, "must be >= 0");
  adam.set_learning_rate(adam.group_index("experts"), expert_lr);  // validated there
  adam.set_learning_rate(adam.group_index("dense"), dense_lr);
  adam.set_weight_decay(adam.group_index("dense"), weight_decay);
  if (clip > 0.0) peer::clip_gradient_norm(grads, clip);
  adam.step(params, grads);
}

#ifndef PEER_C_WITHOUT_SAFETENSORS
void save_safetensors(const peer::Parameters<float>& params, const char* path) {
  require(path != nullptr, "path is NULL");
  peer::SafetensorsWriter writer;
  peer::add_parameters(writer, params);
  writer.save(path);
}

void load_safetensors(peer::Parameters<float>& params, const char* path) {
  require(path != nullptr, "path is NULL");
  peer::load_parameters(peer::SafetensorsFile::open(path), params);
}

void import_peer_pytorch_file(const peer::PeerConfig& config, peer::Parameters<float>& params, const char* path, const char* prefix) {
  require(path != nullptr, "path is NULL");
  peer::import_peer_pytorch(peer::peer_pytorch_config_of(config), peer::SafetensorsFile::open(path), params, prefix_of(prefix));
}

void export_peer_pytorch_file(const peer::PeerConfig& config, const peer::Parameters<float>& params, const char* path, const char* prefix) {
  require(path != nullptr, "path is NULL");
  peer::SafetensorsWriter writer;
  peer::add_peer_pytorch(writer, peer::peer_pytorch_config_of(config), params, prefix_of(prefix));
  writer.save(path);
}
#else
[[noreturn]] void no_safetensors() { throw unsupported("this build of peer has no safetensors support (built without nlohmann-json)"); }
void save_safetensors(const peer::Parameters<float>&, const char*) { no_safetensors(); }
void load_safetensors(peer::Parameters<float>&, const char*) { no_safetensors(); }
void import_peer_pytorch_file(const peer::PeerConfig&, peer::Parameters<float>&, const char*, const char*) { no_safetensors(); }
void export_peer_pytorch_file(const peer::PeerConfig&, const peer::Parameters<float>&, const char*, const char*) { no_safetensors(); }
#endif

peer_model& built(peer_model* m) {
  require(m != nullptr, "model is NULL");
  require(m->built(), "the model is not built yet (call peer_model_build after adding its layers)");
  return *m;
}

peer_model::Layer& layer_of(peer_model& m, int layer) {
  if (layer < 0 || layer >= static_cast<int>(m.layers.size())) {
    peer::detail::throw_invalid("layer", layer, "must be in [0, " + std::to_string(m.layers.size()) + ") (the model's layers)");
  }
  return *m.layers[static_cast<std::size_t>(layer)];
}

peer::TrainingCheckpoint registrations(peer_model& m) {
  peer::TrainingCheckpoint ckpt;
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    ckpt.add_config(m.model.slot(static_cast<int>(i)).prefix + "peer", m.layers[i]->layer.config().to_fields());
  }
  ckpt.add_parameters("model", *m.params);
  ckpt.add_optimizer("adam", *m.adam);
  ckpt.add_counter("c_api.steps", &m.steps);
  return ckpt;
}

peer::TrainingCheckpoint registrations(peer_layer& l) {
  peer::TrainingCheckpoint ckpt;
  ckpt.add_config("peer", l.layer.config().to_fields());
  ckpt.add_parameters("peer", l.params);
  ckpt.add_optimizer("adam", *l.adam);
  ckpt.add_counter("c_api.steps", &l.steps);
  return ckpt;
}

}  // namespace

extern "C" {

void peer_config_default(peer_config* config) {
  if (config != nullptr) from_config(peer::PeerConfig(), *config);
}

int peer_layer_create(const peer_config* config, uint64_t seed, peer_layer** out) {
  if (out != nullptr) *out = nullptr;
  return guarded("peer_layer_create", [&] {
    require(config != nullptr, "config is NULL");
    require(out != nullptr, "out is NULL");
    *out = new peer_layer(to_config(*config), seed);
  });
}

void peer_layer_destroy(peer_layer* layer) { delete layer; }

int peer_layer_forward(peer_layer* layer, const float* x, int64_t rows, int64_t x_stride, float* y, int64_t y_stride,
                       int mode) {
  return guarded("peer_layer_forward", [&] {
    require(layer != nullptr, "layer is NULL");
    forward_rows(layer->layer, layer->params, layer->cache, x, rows, x_stride, y, y_stride, mode);
  });
}

int peer_layer_backward(peer_layer* layer, const float* dy, int64_t dy_stride, float* dx, int64_t dx_stride) {
  return guarded("peer_layer_backward", [&] {
    require(layer != nullptr, "layer is NULL");
    backward_rows(layer->layer, layer->params, layer->cache, dy, dy_stride, dx, dx_stride, layer->grads);
  });
}

int peer_layer_zero_grad(peer_layer* layer) {
  return guarded("peer_layer_zero_grad", [&] {
    require(layer != nullptr, "layer is NULL");
    layer->grads.zero();
  });
}

int peer_layer_step(peer_layer* layer, double dense_lr, double expert_lr, double weight_decay, double clip) {
  return guarded("peer_layer_step", [&] {
    require(layer != nullptr, "layer is NULL");
    adam_step(*layer->adam, layer->fused_expert_lr, layer->params, layer->grads, dense_lr, expert_lr, weight_decay, clip);
    ++layer->steps;
  });
}

void peer_table_training_default(peer_table_training* training) {
  if (training == nullptr) return;
  training->rule = PEER_TABLE_ADAM;
  training->moment_storage = PEER_STORAGE_FLOAT;
  training->rounding = PEER_ROUNDING_STOCHASTIC;
  training->rounding_seed = 0;
  training->fused = 0;
  training->expert_lr = 1e-3;
}

int peer_layer_set_table_training(peer_layer* layer, const peer_table_training* training) {
  return guarded("peer_layer_set_table_training", [&] {
    require(layer != nullptr, "layer is NULL");
    set_table_training(layer->adam, layer->fused_expert_lr, layer->layer.layout(), layer->steps, layer->params, layer->grads, training);
  });
}

int64_t peer_layer_num_parameters(const peer_layer* layer) {
  return layer == nullptr ? 0 : static_cast<int64_t>(layer->layer.total_parameters());
}

int peer_layer_save(const peer_layer* layer, const char* path) {
  return guarded("peer_layer_save", [&] {
    require(layer != nullptr, "layer is NULL");
    require(path != nullptr, "path is NULL");
    registrations(const_cast<peer_layer&>(*layer)).save(path);
  });
}

int peer_layer_load(peer_layer* layer, const char* path) {
  return guarded("peer_layer_load", [&] {
    require(layer != nullptr, "layer is NULL");
    require(path != nullptr, "path is NULL");
    registrations(*layer).load(path);
  });
}

int peer_layer_save_safetensors(const peer_layer* layer, const char* path) {
  return guarded("peer_layer_save_safetensors", [&] {
    require(layer != nullptr, "layer is NULL");
    save_safetensors(layer->params, path);
  });
}

int peer_layer_load_safetensors(peer_layer* layer, const char* path) {
  return guarded("peer_layer_load_safetensors", [&] {
    require(layer != nullptr, "layer is NULL");
    load_safetensors(layer->params, path);
  });
}

int peer_config_peer_pytorch(peer_config* config, int64_t dim, int64_t heads, int64_t num_experts,
                             int64_t num_experts_per_head, int64_t dim_key, int non_competing_scores,
                             int64_t product_key_topk) {
  return guarded("peer_config_peer_pytorch", [&] {
    require(config != nullptr, "config is NULL");
    peer::PeerPytorchConfig t;
    t.dim = dim;
    t.heads = heads;
    t.num_experts = num_experts;
    t.num_experts_per_head = num_experts_per_head;
    t.dim_key = dim_key;
    t.non_competing_scores = non_competing_scores != 0;
    t.product_key_topk = product_key_topk;
    from_config(peer::peer_pytorch_config(t), *config);
  });
}

int peer_layer_import_peer_pytorch(peer_layer* layer, const char* path, const char* prefix) {
  return guarded("peer_layer_import_peer_pytorch", [&] {
    require(layer != nullptr, "layer is NULL");
    import_peer_pytorch_file(layer->layer.config(), layer->params, path, prefix);
  });
}

int peer_layer_export_peer_pytorch(const peer_layer* layer, const char* path, const char* prefix) {
  return guarded("peer_layer_export_peer_pytorch", [&] {
    require(layer != nullptr, "layer is NULL");
    export_peer_pytorch_file(layer->layer.config(), layer->params, path, prefix);
  });
}

int peer_model_create(peer_model** out) {
  if (out != nullptr) *out = nullptr;
  return guarded("peer_model_create", [&] {
    require(out != nullptr, "out is NULL");
    *out = new peer_model();
  });
}

void peer_model_destroy(peer_model* model) { delete model; }

int peer_model_add_layer(peer_model* model, const char* prefix, const peer_config* config, const char* share_experts_with,
                         int* index) {
  if (index != nullptr) *index = -1;
  return guarded("peer_model_add_layer", [&] {
    require(model != nullptr, "model is NULL");
    require(!model->built(), "the model is built: layers are added before peer_model_build");
    require(prefix != nullptr, "prefix is NULL");
    require(config != nullptr, "config is NULL");
    auto entry = std::make_unique<peer_model::Layer>(to_config(*config));
    std::vector<peer::SharedTable> shared;
    if (share_experts_with != nullptr) {
      const int owner = model->model.find_layer(share_experts_with);
      if (owner < 0) {
        throw std::invalid_argument("share_experts_with = " + peer::detail::quote_text(share_experts_with) +
                                    " must be the prefix of a layer added before");
      }
      shared.push_back({"experts", std::string(share_experts_with) + "experts"});
    }
    const int i = model->model.add_layer(prefix, entry->layer.layout(), shared);  // checks names and shapes
    model->layers.push_back(std::move(entry));
    if (index != nullptr) *index = i;
  });
}

int peer_model_build(peer_model* model, uint64_t seed) {
  return guarded("peer_model_build", [&] {
    require(model != nullptr, "model is NULL");
    require(!model->built(), "the model is built already");
    require(!model->layers.empty(), "the model has no layers (peer_model_add_layer first)");
    auto params = std::make_unique<peer::Parameters<float>>(model->model.layout());
    auto grads = std::make_unique<peer::Gradients<float>>(model->model.layout());
    auto views = std::make_unique<peer::LayerViews<float>>(model->model, *params, *grads);
    // Last layer first: a table's owner comes before the layers that share it, so its initialization is
    // the one that stays in the shared table.
    for (std::size_t i = model->layers.size(); i-- > 0;) {
      model->layers[i]->layer.initialize(views->params(static_cast<int>(i)), seed + i);
    }
    model->adam = std::make_unique<peer::Adam<float>>(model->model.layout(), peer::default_param_groups(1e-3),
                                                      peer::AdamConfig::adamw());
    model->params = std::move(params);
    model->grads = std::move(grads);
    model->views = std::move(views);
  });
}

int peer_model_num_layers(const peer_model* model) { return model == nullptr ? 0 : static_cast<int>(model->layers.size()); }

int64_t peer_model_num_parameters(const peer_model* model) {
  return model == nullptr ? 0 : static_cast<int64_t>(model->model.layout().num_parameters());
}

int peer_model_forward(peer_model* model, int layer, const float* x, int64_t rows, int64_t x_stride, float* y,
                       int64_t y_stride, int mode) {
  return guarded("peer_model_forward", [&] {
    auto& m = built(model);
    auto& l = layer_of(m, layer);
    forward_rows(l.layer, m.views->params(layer), l.cache, x, rows, x_stride, y, y_stride, mode);
  });
}

int peer_model_backward(peer_model* model, int layer, const float* dy, int64_t dy_stride, float* dx, int64_t dx_stride) {
  return guarded("peer_model_backward", [&] {
    auto& m = built(model);
    auto& l = layer_of(m, layer);
    backward_rows(l.layer, m.views->params(layer), l.cache, dy, dy_stride, dx, dx_stride, m.views->grads(layer));
  });
}

int peer_model_zero_grad(peer_model* model) {
  return guarded("peer_model_zero_grad", [&] { built(model).grads->zero(); });
}

int peer_model_set_table_training(peer_model* model, const peer_table_training* training) {
  return guarded("peer_model_set_table_training", [&] {
    auto& m = built(model);
    set_table_training(m.adam, m.fused_expert_lr, m.model.layout(), m.steps, *m.params, *m.grads, training);
  });
}

int peer_model_step(peer_model* model, double dense_lr, double expert_lr, double weight_decay, double clip) {
  return guarded("peer_model_step", [&] {
    auto& m = built(model);
    adam_step(*m.adam, m.fused_expert_lr, *m.params, *m.grads, dense_lr, expert_lr, weight_decay, clip);
    ++m.steps;
  });
}

int peer_model_save(const peer_model* model, const char* path) {
  return guarded("peer_model_save", [&] {
    auto& m = built(const_cast<peer_model*>(model));
    require(path != nullptr, "path is NULL");
    registrations(m).save(path);
  });
}

int peer_model_load(peer_model* model, const char* path) {
  return guarded("peer_model_load", [&] {
    auto& m = built(model);
    require(path != nullptr, "path is NULL");
    registrations(m).load(path);
  });
}

int peer_model_save_safetensors(const peer_model* model, const char* path) {
  return guarded("peer_model_save_safetensors", [&] { save_safetensors(*built(const_cast<peer_model*>(model)).params, path); });
}

int peer_model_load_safetensors(peer_model* model, const char* path) {
  return guarded("peer_model_load_safetensors", [&] { load_safetensors(*built(model).params, path); });
}

int peer_model_import_peer_pytorch(peer_model* model, int layer, const char* path, const char* prefix) {
  return guarded("peer_model_import_peer_pytorch", [&] {
    auto& m = built(model);
    import_peer_pytorch_file(layer_of(m, layer).layer.config(), m.views->params(layer), path, prefix);
  });
}

int peer_model_export_peer_pytorch(const peer_model* model, int layer, const char* path, const char* prefix) {
  return guarded("peer_model_export_peer_pytorch", [&] {
    auto& m = built(const_cast<peer_model*>(model));
    export_peer_pytorch_file(layer_of(m, layer).layer.config(), m.views->params(layer), path, prefix);
  });
}

const char* peer_last_error(void) { return g_last_error.c_str(); }

}  // extern "C"
