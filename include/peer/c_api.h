/* SPDX-License-Identifier: MIT */
#ifndef PEER_C_API_H
#define PEER_C_API_H

/* The C interface: a PEER layer for trainers written in C (llm.c and its kind).
 *
 * Link the `peer::c` CMake target (a small static library, src/peer_c.cpp, built with the package). One
 * peer_layer holds a PEER layer's configuration, its parameters, gradients, forward cache and AdamW state;
 * arrays are the caller's float buffers with a row stride (in floats; 0 means contiguous rows).
 *
 * Contracts are the C++ library's (README, docs/embedding.md): forward ASSIGNS y; backward ADDS into dx
 * and into the gradients, from the cache of the last forward; peer_layer_zero_grad clears the gradients;
 * peer_layer_step applies AdamW (lazy on the expert table) with the learning rates of this call.
 *
 * Errors: every function returns PEER_OK (0) or an error code; no C++ exception ever crosses this
 * interface. peer_last_error() then returns the message (naming the field, the value and the rule), valid
 * until the next failing call on the same thread. */

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum peer_status {
  PEER_OK = 0,
  PEER_ERROR_INVALID_ARGUMENT = 1, /* a configuration, shape, pointer or call order the rules forbid */
  PEER_ERROR_DOMAIN = 2,           /* non-finite input */
  PEER_ERROR_IO = 3,               /* a file that cannot be read or written, or fails validation */
  PEER_ERROR_OUT_OF_MEMORY = 4,
  PEER_ERROR_INTERNAL = 5
};

enum peer_mode { PEER_MODE_TRAIN = 0, PEER_MODE_EVAL = 1 };
enum peer_gating { PEER_GATING_SOFTMAX = 0, PEER_GATING_RELU = 1, PEER_GATING_SIGMOID = 2 };
enum peer_query_norm { PEER_QUERY_NORM_BATCH = 0, PEER_QUERY_NORM_LAYER = 1, PEER_QUERY_NORM_NONE = 2 };
enum peer_key_sharing { PEER_KEYS_SHARED = 0, PEER_KEYS_PER_HEAD = 1 };

/* A PEER layer's configuration; peer_config_default() fills the paper's defaults (as peer::PeerConfig). */
typedef struct peer_config {
  int64_t model_dim;     /* D */
  int64_t num_experts;   /* N = n * n */
  int64_t num_heads;     /* H */
  int64_t key_dim;       /* Dk (even) */
  int64_t top_k;         /* k per head */
  int64_t sub_key_top_k; /* k' per half */
  int gating;            /* enum peer_gating */
  int query_norm;        /* enum peer_query_norm */
  int key_sharing;       /* enum peer_key_sharing */
} peer_config;

typedef struct peer_layer peer_layer;

void peer_config_default(peer_config* config);

/* Creates a layer with parameters initialized from `seed`. *out is set to NULL on failure. */
int peer_layer_create(const peer_config* config, uint64_t seed, peer_layer** out);
/* Frees everything of the layer (NULL is allowed). */
void peer_layer_destroy(peer_layer* layer);

/* y [rows, D] = PEER(x [rows, D]); mode: enum peer_mode. Fills the layer's cache for backward. */
int peer_layer_forward(peer_layer* layer, const float* x, int64_t rows, int64_t x_stride, float* y, int64_t y_stride,
                       int mode);
/* Backward of the last forward: dx += dL/dx (dx may be NULL to skip it), gradients += dL/dparams. */
int peer_layer_backward(peer_layer* layer, const float* dy, int64_t dy_stride, float* dx, int64_t dx_stride);
/* Clears the gradients (dense ones to 0, the expert table's row-sparse one emptied). */
int peer_layer_zero_grad(peer_layer* layer);
/* One AdamW step of every parameter: dense ones with dense_lr and weight_decay, the expert table (lazy
 * Adam) with expert_lr and no decay. clip > 0 first clips the global gradient norm to clip. */
int peer_layer_step(peer_layer* layer, double dense_lr, double expert_lr, double weight_decay, double clip);

/* Trained scalars (dense tensors and the expert table). */
int64_t peer_layer_num_parameters(const peer_layer* layer);
/* Saves / loads the configuration, parameters and optimizer state (peer's checkpoint format, atomic
 * save, validated load that changes nothing on failure). */
int peer_layer_save(const peer_layer* layer, const char* path);
int peer_layer_load(peer_layer* layer, const char* path);

/* The message of the last failing call on this thread ("" if none). */
const char* peer_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* PEER_C_API_H */
