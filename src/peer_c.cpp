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

#include <peer/peer.hpp>

struct peer_layer {
  peer::PeerLayer<float> layer;
  peer::Parameters<float> params;
  peer::Gradients<float> grads;
  peer::PeerLayer<float>::Cache cache;
  peer::Adam<float> adam;
  std::int64_t steps = 0;

  peer_layer(const peer::PeerConfig& config, std::uint64_t seed)
      : layer(config),
        params(layer.make_parameters(seed)),
        grads(layer.make_gradients()),
        adam(layer.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw()) {}
};

namespace {

thread_local std::string g_last_error;

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
  } catch (const std::invalid_argument& e) {
    return fail(PEER_ERROR_INVALID_ARGUMENT, std::string(where) + ": " + e.what());
  } catch (const std::domain_error& e) {
    return fail(PEER_ERROR_DOMAIN, std::string(where) + ": " + e.what());
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
    default: peer::detail::throw_invalid("peer_config.query_norm", c.query_norm, "must be a peer_query_norm value (0, 1 or 2)");
  }
  switch (c.key_sharing) {
    case PEER_KEYS_SHARED: p.key_sharing = peer::KeySharing::kShared; break;
    case PEER_KEYS_PER_HEAD: p.key_sharing = peer::KeySharing::kPerHead; break;
    default: peer::detail::throw_invalid("peer_config.key_sharing", c.key_sharing, "must be a peer_key_sharing value (0 or 1)");
  }
  return p;
}

peer::TrainingCheckpoint registrations(peer_layer& l) {
  peer::TrainingCheckpoint ckpt;
  ckpt.add_config("peer", l.layer.config().to_fields());
  ckpt.add_parameters("peer", l.params);
  ckpt.add_optimizer("adam", l.adam);
  ckpt.add_counter("c_api.steps", &l.steps);
  return ckpt;
}

}  // namespace

extern "C" {

void peer_config_default(peer_config* config) {
  if (config == nullptr) return;
  const peer::PeerConfig d;
  config->model_dim = d.model_dim;
  config->num_experts = d.num_experts;
  config->num_heads = d.num_heads;
  config->key_dim = d.key_dim;
  config->top_k = d.top_k;
  config->sub_key_top_k = d.sub_key_top_k;
  config->gating = PEER_GATING_SOFTMAX;
  config->query_norm = PEER_QUERY_NORM_BATCH;
  config->key_sharing = PEER_KEYS_SHARED;
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
    require(mode == PEER_MODE_TRAIN || mode == PEER_MODE_EVAL, "mode = " + std::to_string(mode) + " must be PEER_MODE_TRAIN (0) or PEER_MODE_EVAL (1)");
    const peer::Index d = layer->layer.config().model_dim;
    layer->layer.forward(layer->params, peer::rows_view(x, rows, d, x_stride), peer::rows_view(y, rows, d, y_stride),
                         layer->cache, mode == PEER_MODE_TRAIN ? peer::Mode::kTrain : peer::Mode::kEval);
  });
}

int peer_layer_backward(peer_layer* layer, const float* dy, int64_t dy_stride, float* dx, int64_t dx_stride) {
  return guarded("peer_layer_backward", [&] {
    require(layer != nullptr, "layer is NULL");
    const peer::Index d = layer->layer.config().model_dim, rows = layer->cache.batch();
    if (dx == nullptr) {
      peer::RowMatrix<float> none(0, d);
      layer->layer.backward(layer->params, layer->cache, peer::rows_view(dy, rows, d, dy_stride), none, layer->grads);
    } else {
      layer->layer.backward(layer->params, layer->cache, peer::rows_view(dy, rows, d, dy_stride),
                            peer::rows_view(dx, rows, d, dx_stride), layer->grads);
    }
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
    require(clip >= 0.0, "clip = " + std::to_string(clip) + " must be >= 0 (0: no clipping)");
    if (!(weight_decay >= 0.0)) peer::detail::throw_invalid("weight_decay", weight_decay, "must be >= 0");
    auto& adam = layer->adam;
    adam.set_learning_rate(adam.group_index("experts"), expert_lr);  // validated there
    adam.set_learning_rate(adam.group_index("dense"), dense_lr);
    adam.set_weight_decay(adam.group_index("dense"), weight_decay);
    if (clip > 0.0) peer::clip_gradient_norm(layer->grads, clip);
    adam.step(layer->params, layer->grads);
    ++layer->steps;
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

const char* peer_last_error(void) { return g_last_error.c_str(); }

}  // extern "C"
