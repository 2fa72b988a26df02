/* The C interface from C (compiled as C11, not C++): train a small PEER layer to fit a fixed target, save
 * and load it, and provoke errors that must come back as codes with messages. Prints "N passed, M failed". */
#include <peer/c_api.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

enum { B = 64, D = 16, STRIDE = 20 }; /* rows live in a wider host buffer: stride 20 floats */

static float uniform(unsigned* state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)((*state >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

static double loss_and_grad(const float* y, const float* target, float* dy) {
  double loss = 0;
  for (int r = 0; r < B; ++r) {
    for (int c = 0; c < D; ++c) {
      const float diff = y[r * STRIDE + c] - target[r * D + c];
      loss += 0.5 * (double)diff * diff / B;
      dy[r * STRIDE + c] = diff / B;
    }
  }
  return loss;
}

/* 60 AdamW steps on a fixed regression (clipped to 1, or not): the loss must halve. */
static void train_clipped(peer_layer* layer, const float* x, const float* target, float* y, float* dy, double clip, const char* what) {
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    int rc = peer_layer_forward(layer, x, B, STRIDE, y, STRIDE, PEER_MODE_TRAIN);
    last = loss_and_grad(y, target, dy);
    if (step == 0) first = last;
    rc |= peer_layer_zero_grad(layer);
    rc |= peer_layer_backward(layer, dy, STRIDE, NULL, 0);
    rc |= peer_layer_step(layer, 3e-3, 3e-2, 0.0, clip);
    if (rc != PEER_OK) {
      CHECK(0, "%s, step %d: %s", what, step, peer_last_error());
      return;
    }
  }
  CHECK(last < 0.5 * first, "%s: training lowers the loss: %g -> %g", what, first, last);
}

static void train(peer_layer* layer, const float* x, const float* target, float* y, float* dy, const char* what) {
  train_clipped(layer, x, target, y, dy, 1.0, what);
}

int main(void) {
  peer_config config;
  peer_config_default(&config);
  CHECK(config.num_heads == 8 && config.top_k == 16, "defaults are the paper's");
  config.model_dim = D;
  config.num_experts = 16 * 16;
  config.num_heads = 4;
  config.key_dim = 16;
  config.top_k = 4;
  config.sub_key_top_k = 4;

  peer_layer* layer = NULL;
  CHECK(peer_layer_create(&config, 7, &layer) == PEER_OK, "create: %s", peer_last_error());
  if (layer == NULL) {
    printf("%d passed, %d failed\n", passed, failed + 1);
    return 1;
  }
  CHECK(peer_layer_num_parameters(layer) > 256 * 2 * D, "parameters counted");

  static float x[B * STRIDE], y[B * STRIDE], dy[B * STRIDE], dx[B * STRIDE], target[B * D], y2[B * STRIDE];
  unsigned seed = 12345;
  for (int i = 0; i < B * STRIDE; ++i) x[i] = uniform(&seed);
  for (int i = 0; i < B * D; ++i) target[i] = 0.5f * uniform(&seed);

  train(layer, x, target, y, dy, "float table");

  /* dx is added into the caller's buffer; the gaps between rows stay untouched. */
  for (int i = 0; i < B * STRIDE; ++i) dx[i] = 9.0f;
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y, STRIDE, PEER_MODE_TRAIN) == PEER_OK, "forward");
  CHECK(peer_layer_backward(layer, dy, STRIDE, dx, STRIDE) == PEER_OK, "backward with dx: %s", peer_last_error());
  int gaps_kept = 1, moved = 0;
  for (int r = 0; r < B; ++r) {
    for (int c = 0; c < STRIDE; ++c) {
      if (c >= D && dx[r * STRIDE + c] != 9.0f) gaps_kept = 0;
      if (c < D && dx[r * STRIDE + c] != 9.0f) moved = 1;
    }
  }
  CHECK(gaps_kept && moved, "dx added inside the rows only");

  /* Save, change, load: evaluation outputs come back bit for bit. */
  const char* path = "c_api_test.ckpt";
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y, STRIDE, PEER_MODE_EVAL) == PEER_OK, "eval forward");
  CHECK(peer_layer_save(layer, path) == PEER_OK, "save: %s", peer_last_error());
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y2, STRIDE, PEER_MODE_TRAIN) == PEER_OK, "forward");
  CHECK(peer_layer_zero_grad(layer) == PEER_OK && peer_layer_backward(layer, dy, STRIDE, NULL, 0) == PEER_OK &&
            peer_layer_step(layer, 1e-1, 1e-1, 0.0, 0.0) == PEER_OK,
        "a step that moves the weights");
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y2, STRIDE, PEER_MODE_EVAL) == PEER_OK, "eval forward");
  CHECK(memcmp(y, y2, sizeof(y)) != 0, "the step changed the outputs");
  CHECK(peer_layer_load(layer, path) == PEER_OK, "load: %s", peer_last_error());
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y2, STRIDE, PEER_MODE_EVAL) == PEER_OK, "eval forward");
  CHECK(memcmp(y, y2, sizeof(y)) == 0, "loaded layer reproduces the saved one bit for bit");
  remove(path);

  /* Errors come back as codes with messages; nothing crashes, nothing throws across C. */
  peer_config bad = config;
  bad.top_k = 40;
  peer_layer* none = (peer_layer*)0x1;
  CHECK(peer_layer_create(&bad, 1, &none) == PEER_ERROR_INVALID_ARGUMENT && none == NULL, "bad config refused");
  CHECK(strstr(peer_last_error(), "PeerConfig.top_k = 40 must be <= sub_key_top_k^2 = 16") != NULL, "message: %s", peer_last_error());
  bad = config;
  bad.gating = 9;
  CHECK(peer_layer_create(&bad, 1, &none) == PEER_ERROR_INVALID_ARGUMENT, "bad enum refused");
  CHECK(strstr(peer_last_error(), "peer_config.gating = 9") != NULL, "message: %s", peer_last_error());
  CHECK(peer_layer_forward(layer, x, B, 8, y, STRIDE, PEER_MODE_TRAIN) == PEER_ERROR_INVALID_ARGUMENT, "stride < D refused");
  CHECK(strstr(peer_last_error(), "row_stride = 8") != NULL, "message: %s", peer_last_error());
  CHECK(peer_layer_forward(layer, NULL, B, 0, y, STRIDE, PEER_MODE_TRAIN) == PEER_ERROR_INVALID_ARGUMENT, "NULL x refused");
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y, STRIDE, 7) == PEER_ERROR_INVALID_ARGUMENT, "bad mode refused");
  x[3 * STRIDE + 5] = NAN;
  CHECK(peer_layer_forward(layer, x, B, STRIDE, y, STRIDE, PEER_MODE_TRAIN) == PEER_ERROR_DOMAIN, "NaN input refused");
  CHECK(strstr(peer_last_error(), "non-finite value nan at [3, 5]") != NULL, "message: %s", peer_last_error());
  peer_layer* fresh = NULL;
  CHECK(peer_layer_create(&config, 3, &fresh) == PEER_OK, "create");
  CHECK(peer_layer_backward(fresh, dy, STRIDE, NULL, 0) == PEER_ERROR_INVALID_ARGUMENT, "backward without a forward refused");
  CHECK(strstr(peer_last_error(), "call forward first") != NULL, "message: %s", peer_last_error());
  peer_layer_destroy(fresh);
  CHECK(peer_layer_load(layer, "/nonexistent/peer.ckpt") == PEER_ERROR_IO, "missing file refused");
  CHECK(strlen(peer_last_error()) > 0, "message: %s", peer_last_error());
  CHECK(peer_layer_step(layer, -1.0, 1e-3, 0.0, 0.0) == PEER_ERROR_INVALID_ARGUMENT, "negative learning rate refused");
  CHECK(peer_layer_forward(NULL, x, B, STRIDE, y, STRIDE, PEER_MODE_TRAIN) == PEER_ERROR_INVALID_ARGUMENT, "NULL layer refused");

  peer_layer_destroy(layer);
  peer_layer_destroy(NULL);

  /* A layer with a bfloat16 expert table: trains, and its checkpoint round-trips bit for bit. */
  x[3 * STRIDE + 5] = 0.25f;
  bad = config;
  bad.expert_storage = 5;
  CHECK(peer_layer_create(&bad, 1, &none) == PEER_ERROR_INVALID_ARGUMENT, "bad storage refused");
  CHECK(strstr(peer_last_error(), "peer_config.expert_storage = 5") != NULL, "message: %s", peer_last_error());
  bad = config;
  bad.sub_key_scoring = 2;
  CHECK(peer_layer_create(&bad, 1, &none) == PEER_ERROR_INVALID_ARGUMENT, "bad sub-key scoring refused");
  CHECK(strstr(peer_last_error(), "peer_config.sub_key_scoring = 2") != NULL, "message: %s", peer_last_error());
  peer_config bf16 = config;
  bf16.expert_storage = PEER_STORAGE_BFLOAT16;
  bf16.sub_key_scoring = PEER_SCORING_BF16_CHECKED; /* and the sub-keys scored in bf16, re-checked */
  peer_layer* half = NULL;
  CHECK(peer_layer_create(&bf16, 7, &half) == PEER_OK, "create bf16: %s", peer_last_error());
  if (half != NULL) {
    train(half, x, target, y, dy, "bf16 table");
    CHECK(peer_layer_forward(half, x, B, STRIDE, y, STRIDE, PEER_MODE_EVAL) == PEER_OK, "eval forward");
    CHECK(peer_layer_save(half, path) == PEER_OK, "save bf16: %s", peer_last_error());
    CHECK(peer_layer_forward(half, x, B, STRIDE, y2, STRIDE, PEER_MODE_TRAIN) == PEER_OK &&
              peer_layer_zero_grad(half) == PEER_OK && peer_layer_backward(half, dy, STRIDE, NULL, 0) == PEER_OK &&
              peer_layer_step(half, 3e-3, 3e-2, 0.0, 0.0) == PEER_OK,
          "a step after the save");
    CHECK(peer_layer_load(half, path) == PEER_OK, "load bf16: %s", peer_last_error());
    CHECK(peer_layer_forward(half, x, B, STRIDE, y2, STRIDE, PEER_MODE_EVAL) == PEER_OK, "eval forward");
    CHECK(memcmp(y, y2, sizeof(y)) == 0, "the loaded bf16 layer reproduces the saved one bit for bit");
    remove(path);
  }
  peer_layer_destroy(half);

  /* Table training: fused float Adam gives the unfused run's outputs bit for bit; a bfloat16 table with
   * row-wise Adagrad (2 bytes per parameter) fused into the backward trains; refusals name what is wrong. */
  peer_table_training tt;
  peer_table_training_default(&tt);
  CHECK(tt.rule == PEER_TABLE_ADAM && tt.moment_storage == PEER_STORAGE_FLOAT && tt.fused == 0, "table training defaults");
  peer_layer *plain = NULL, *fused = NULL, *rowwise = NULL, *other = NULL;
  CHECK(peer_layer_create(&config, 9, &plain) == PEER_OK && peer_layer_create(&config, 9, &fused) == PEER_OK &&
            peer_layer_create(&bf16, 9, &rowwise) == PEER_OK && peer_layer_create(&bf16, 9, &other) == PEER_OK,
        "create: %s", peer_last_error());
  if (plain != NULL && fused != NULL && rowwise != NULL && other != NULL) {
    tt.fused = 1;
    tt.expert_lr = 3e-2; /* what train_clipped passes to every step */
    CHECK(peer_layer_set_table_training(fused, &tt) == PEER_OK, "fuse: %s", peer_last_error());
    train_clipped(plain, x, target, y, dy, 0.0, "float table, Adam");
    train_clipped(fused, x, target, y2, dy, 0.0, "float table, Adam, fused");
    CHECK(peer_layer_forward(plain, x, B, STRIDE, y, STRIDE, PEER_MODE_EVAL) == PEER_OK &&
              peer_layer_forward(fused, x, B, STRIDE, y2, STRIDE, PEER_MODE_EVAL) == PEER_OK,
          "eval forward");
    CHECK(memcmp(y, y2, sizeof(y)) == 0, "fused Adam reproduces the unfused run bit for bit");
    CHECK(peer_layer_step(fused, 3e-3, 3e-2, 0.0, 1.0) == PEER_ERROR_INVALID_ARGUMENT, "clip with fused updates refused");
    CHECK(strstr(peer_last_error(), "pass clip = 0") != NULL, "message: %s", peer_last_error());
    CHECK(peer_layer_step(fused, 3e-3, 1e-2, 0.0, 0.0) == PEER_ERROR_INVALID_ARGUMENT, "another expert_lr with fused updates refused");
    CHECK(strstr(peer_last_error(), "expert_lr = 0.010000 differs from the fused table updates' learning rate 0.030000") != NULL,
          "message: %s", peer_last_error());
    CHECK(peer_layer_set_table_training(plain, &tt) == PEER_ERROR_INVALID_ARGUMENT, "a change after the first step refused");
    CHECK(strstr(peer_last_error(), "has taken 60 step(s)") != NULL, "message: %s", peer_last_error());
    tt.rule = PEER_TABLE_ROW_WISE_ADAGRAD;
    tt.moment_storage = PEER_STORAGE_BFLOAT16;
    CHECK(peer_layer_set_table_training(rowwise, &tt) == PEER_ERROR_INVALID_ARGUMENT, "bf16 moments without moments refused");
    CHECK(strstr(peer_last_error(), "row_wise_adagrad") != NULL, "message: %s", peer_last_error());
    tt.moment_storage = PEER_STORAGE_FLOAT;
    tt.rule = 7;
    CHECK(peer_layer_set_table_training(rowwise, &tt) == PEER_ERROR_INVALID_ARGUMENT, "bad rule refused");
    CHECK(strstr(peer_last_error(), "peer_table_training.rule = 7") != NULL, "message: %s", peer_last_error());
    tt.rule = PEER_TABLE_ROW_WISE_ADAGRAD;
    CHECK(peer_layer_set_table_training(rowwise, &tt) == PEER_OK, "row-wise Adagrad, fused: %s", peer_last_error());
    train_clipped(rowwise, x, target, y, dy, 0.0, "bf16 table, row-wise Adagrad, fused");
    /* Its checkpoint holds the row-wise state: a layer trained with Adam cannot load it, naming a tensor. */
    CHECK(peer_layer_save(rowwise, path) == PEER_OK, "save: %s", peer_last_error());
    CHECK(peer_layer_load(other, path) == PEER_ERROR_IO, "a checkpoint of another table rule refused");
    CHECK(strstr(peer_last_error(), "tensor 'adam.adam.m.experts' is missing") != NULL, "message: %s", peer_last_error());
    tt.fused = 0;
    CHECK(peer_layer_set_table_training(other, &tt) == PEER_OK && peer_layer_load(other, path) == PEER_OK,
          "loaded with the same rule: %s", peer_last_error());
    CHECK(peer_layer_forward(rowwise, x, B, STRIDE, y, STRIDE, PEER_MODE_EVAL) == PEER_OK &&
              peer_layer_forward(other, x, B, STRIDE, y2, STRIDE, PEER_MODE_EVAL) == PEER_OK && memcmp(y, y2, sizeof(y)) == 0,
          "the loaded row-wise layer reproduces the saved one");
    remove(path);
  }
  peer_layer_destroy(plain);
  peer_layer_destroy(fused);
  peer_layer_destroy(rowwise);
  peer_layer_destroy(other);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
