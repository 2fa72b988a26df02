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

/* 60 AdamW steps on a fixed regression: the loss must halve. */
static void train(peer_layer* layer, const float* x, const float* target, float* y, float* dy, const char* what) {
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    int rc = peer_layer_forward(layer, x, B, STRIDE, y, STRIDE, PEER_MODE_TRAIN);
    last = loss_and_grad(y, target, dy);
    if (step == 0) first = last;
    rc |= peer_layer_zero_grad(layer);
    rc |= peer_layer_backward(layer, dy, STRIDE, NULL, 0);
    rc |= peer_layer_step(layer, 3e-3, 3e-2, 0.0, 1.0);
    if (rc != PEER_OK) {
      CHECK(0, "%s, step %d: %s", what, step, peer_last_error());
      return;
    }
  }
  CHECK(last < 0.5 * first, "%s: training lowers the loss: %g -> %g", what, first, last);
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
  peer_config bf16 = config;
  bf16.expert_storage = PEER_STORAGE_BFLOAT16;
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
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
