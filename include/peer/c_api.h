/* SPDX-License-Identifier: MIT */
#ifndef PEER_C_API_H
#define PEER_C_API_H

/* The C interface: PEER layers and models of them for trainers written in C (llm.c and its kind).
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
  PEER_ERROR_INTERNAL = 5,
  PEER_ERROR_UNSUPPORTED = 6 /* a capability this build lacks (safetensors without nlohmann-json) */
};

enum peer_mode { PEER_MODE_TRAIN = 0, PEER_MODE_EVAL = 1 };
enum peer_gating { PEER_GATING_SOFTMAX = 0, PEER_GATING_RELU = 1, PEER_GATING_SIGMOID = 2 };
enum peer_query_norm {
  PEER_QUERY_NORM_BATCH = 0,
  PEER_QUERY_NORM_LAYER = 1,
  PEER_QUERY_NORM_NONE = 2,
  PEER_QUERY_NORM_HALF_LAYER = 3 /* per half-query, one shared affine map (product-key-memory's) */
};
enum peer_key_sharing { PEER_KEYS_SHARED = 0, PEER_KEYS_PER_HEAD = 1 };
/* How the expert table is stored: float, or bfloat16 (half the bytes; computed in float; updated rows are
 * written back with deterministic stochastic rounding; docs/storage.md). */
enum peer_storage { PEER_STORAGE_FLOAT = 0, PEER_STORAGE_BFLOAT16 = 1 };
/* How sub-keys are scored: exactly in float, or in bfloat16 with the candidates re-scored exactly (the same
 * exact retrieval over the re-check scores; faster on CPUs with AVX512_BF16; docs/design.md section 3). */
enum peer_sub_key_scoring { PEER_SCORING_EXACT = 0, PEER_SCORING_BF16_CHECKED = 1 };

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
  int expert_storage;    /* enum peer_storage (0, float, when left zero) */
  int sub_key_scoring;   /* enum peer_sub_key_scoring (0, exact, when left zero) */
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

/* How the expert table is trained (docs/storage.md): Adam's rule or a row-wise one, Adam's moments in
 * float or bfloat16, how updated bfloat16 rows are written back, and whether the table's update is fused
 * into the backward. peer_table_training_default() fills what a new layer uses (Adam with float moments,
 * stochastic rounding, not fused). */
enum peer_table_rule {
  PEER_TABLE_ADAM = 0,                   /* m and v per entry (12 bytes per float parameter with the row) */
  PEER_TABLE_PARTIAL_ROW_WISE_ADAM = 1,  /* m per entry, one v per row */
  PEER_TABLE_ROW_WISE_ADAGRAD = 2        /* one accumulator per row: a bfloat16 table trains at 2 bytes per parameter */
};
enum peer_rounding {
  PEER_ROUNDING_STOCHASTIC = 0, /* unbiased, deterministic for any thread count (keyed by seed, step, row) */
  PEER_ROUNDING_NEAREST = 1,
  PEER_ROUNDING_MASTER_ROWS = 2 /* a float master copy of the table is updated, the table gets its nearest bf16 */
};
typedef struct peer_table_training {
  int rule;               /* enum peer_table_rule */
  int moment_storage;     /* enum peer_storage: Adam's per-entry moments (float only with row-wise Adagrad) */
  int rounding;           /* enum peer_rounding (bfloat16 tables) */
  uint64_t rounding_seed; /* the stochastic rounding's stream */
  /* Nonzero: each backward updates every touched table row as soon as its gradient is summed and stores no
   * table gradient (less memory traffic); the step then updates the dense tensors. The rows are updated
   * before the step is called, so their learning rate is fixed here (expert_lr below) and every step must
   * pass the same expert_lr. Refused on the way: clip > 0 in the step (it would need the table's gradient),
   * and a second backward before the step (gradient accumulation, or a table shared by two layers). With
   * Adam in float the result is bitwise the unfused one's. */
  int fused;
  double expert_lr; /* fused: the table's (constant) learning rate; peer_table_training_default: 1e-3 */
} peer_table_training;

void peer_table_training_default(peer_table_training* training);
/* Before the layer's first step (its optimizer state is rebuilt, empty) and with no table gradient
 * pending (after peer_layer_zero_grad). A checkpoint holds the state of the rule it was saved with. */
int peer_layer_set_table_training(peer_layer* layer, const peer_table_training* training);

/* Trained scalars (dense tensors and the expert table). */
int64_t peer_layer_num_parameters(const peer_layer* layer);
/* Saves / loads the configuration, parameters and optimizer state (peer's checkpoint format, atomic
 * save, validated load that changes nothing on failure). */
int peer_layer_save(const peer_layer* layer, const char* path);
int peer_layer_load(peer_layer* layer, const char* path);

/* The parameters (and batch-norm statistics) alone in a safetensors file under our names ("query.weight",
 * "experts", ...: the README's parameter table), for tools outside this library; no optimizer state.
 * Loading checks every tensor (present, shape) before anything is written. */
int peer_layer_save_safetensors(const peer_layer* layer, const char* path);
int peer_layer_load_safetensors(peer_layer* layer, const char* path);

/* lucidrains/PEER-pytorch 0.2.x: the configuration that computes its function (its constructor's
 * arguments; product_key_topk 0 means num_experts_per_head), and its weights in a safetensors file
 * (`safetensors.torch.save_file(peer.state_dict(), path)`), in and out, under its names with `prefix`
 * ("layers.3.ff."; NULL or "" for none). Import and export refuse a layer whose configuration is not one
 * PEER-pytorch computes. */
int peer_config_peer_pytorch(peer_config* config, int64_t dim, int64_t heads, int64_t num_experts,
                             int64_t num_experts_per_head, int64_t dim_key, int non_competing_scores,
                             int64_t product_key_topk);
int peer_layer_import_peer_pytorch(peer_layer* layer, const char* path, const char* prefix);
int peer_layer_export_peer_pytorch(const peer_layer* layer, const char* path, const char* prefix);

/* ---- A model: many PEER layers in one parameter set ------------------------------------------------
 * Layers are added under name prefixes ("blocks.3.ffn."), optionally sharing the expert table of an
 * earlier layer (one table, one gradient into which both backwards add, one optimizer state), then the
 * model is built: one flat dense buffer, one AdamW for everything, one checkpoint. Each layer keeps the
 * cache of its last forward, so a transformer calls forward layer by layer and backward in reverse.
 *
 *   peer_model* m; int l0, l1;
 *   peer_model_create(&m);
 *   peer_model_add_layer(m, "blocks.0.ffn.", &config, NULL, &l0);
 *   peer_model_add_layer(m, "blocks.1.ffn.", &config, "blocks.0.ffn.", &l1);  // shares l0's experts
 *   peer_model_build(m, seed);
 *   ... peer_model_forward(m, l0, ...); peer_model_forward(m, l1, ...);
 *   ... peer_model_backward(m, l1, ...); peer_model_backward(m, l0, ...);
 *   peer_model_step(m, dense_lr, expert_lr, weight_decay, clip); peer_model_zero_grad(m); */
typedef struct peer_model peer_model;

int peer_model_create(peer_model** out);
void peer_model_destroy(peer_model* model);
/* Before peer_model_build: adds a PEER layer; share_experts_with is NULL or the prefix of an earlier layer
 * whose expert table this one uses (same N and D). *index is the layer's index (0, 1, ...). */
int peer_model_add_layer(peer_model* model, const char* prefix, const peer_config* config,
                         const char* share_experts_with, int* index);
/* Allocates parameters, gradients and AdamW state; layer i is initialized from seed + i (a shared table by
 * the layer that owns it). No layer can be added afterwards. */
int peer_model_build(peer_model* model, uint64_t seed);
int peer_model_num_layers(const peer_model* model);
/* Trained scalars of the whole model (a shared table counted once). */
int64_t peer_model_num_parameters(const peer_model* model);
/* As peer_layer_forward / peer_layer_backward, for layer `layer` of the built model. */
int peer_model_forward(peer_model* model, int layer, const float* x, int64_t rows, int64_t x_stride, float* y,
                       int64_t y_stride, int mode);
int peer_model_backward(peer_model* model, int layer, const float* dy, int64_t dy_stride, float* dx,
                        int64_t dx_stride);
int peer_model_zero_grad(peer_model* model);
/* As peer_layer_set_table_training, for every expert table of the built model. */
int peer_model_set_table_training(peer_model* model, const peer_table_training* training);
/* One AdamW step of every layer: as peer_layer_step, clip over the whole model's gradient. */
int peer_model_step(peer_model* model, double dense_lr, double expert_lr, double weight_decay, double clip);
/* Every layer's configuration, the parameters and the optimizer state in one checkpoint (atomic save;
 * the load validates everything, the model's layers and shapes included, before it changes anything). */
int peer_model_save(const peer_model* model, const char* path);
int peer_model_load(peer_model* model, const char* path);
/* The parameters under their full names ("blocks.0.ffn.experts") in a safetensors file; as for a layer. */
int peer_model_save_safetensors(const peer_model* model, const char* path);
int peer_model_load_safetensors(peer_model* model, const char* path);
/* PEER-pytorch weights of one layer of a PyTorch model's file (prefix "layers.3.ff."), in and out. */
int peer_model_import_peer_pytorch(peer_model* model, int layer, const char* path, const char* prefix);
int peer_model_export_peer_pytorch(const peer_model* model, int layer, const char* path, const char* prefix);

/* The message of the last failing call on this thread ("" if none). */
const char* peer_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* PEER_C_API_H */
