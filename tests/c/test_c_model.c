/* The C interface's model set and files, from C (C11): a two-layer model sharing one expert table trains;
 * a one-layer model computes bit for bit what a peer_layer with the same configuration and seed computes;
 * checkpoints, safetensors files and PEER-pytorch files round-trip bit for bit; and misuse comes back as
 * codes with messages. Prints "N passed, M failed". */
#include <peer/c_api.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

enum { B = 32, D = 12 };

static float uniform(unsigned* state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)((*state >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

static peer_config small_config(void) {
  peer_config c;
  peer_config_default(&c);
  c.model_dim = D;
  c.num_experts = 10 * 10;
  c.num_heads = 2;
  c.key_dim = 8;
  c.top_k = 4;
  c.sub_key_top_k = 4;
  return c;
}

static float x[B * D], h[B * D], y[B * D], y2[B * D], dy[B * D], dh[B * D], target[B * D], out[B * D];

/* loss = 0.5 |y - target|^2 / B and dy. */
static double loss_of(const float* out, float* grad) {
  double loss = 0;
  for (int i = 0; i < B * D; ++i) {
    const float diff = out[i] - target[i];
    loss += 0.5 * (double)diff * diff / B;
    grad[i] = diff / B;
  }
  return loss;
}

/* out = layer1(layer0(x)) in training mode, backward through both, one AdamW step; returns the loss. */
static double train_step(peer_model* m, int l0, int l1) {
  int rc = peer_model_forward(m, l0, x, B, 0, h, 0, PEER_MODE_TRAIN);
  rc |= peer_model_forward(m, l1, h, B, 0, out, 0, PEER_MODE_TRAIN);
  const double loss = loss_of(out, dy);
  memset(dh, 0, sizeof(dh));
  rc |= peer_model_zero_grad(m);
  rc |= peer_model_backward(m, l1, dy, 0, dh, 0);
  rc |= peer_model_backward(m, l0, dh, 0, NULL, 0);
  rc |= peer_model_step(m, 3e-3, 3e-2, 0.0, 1.0);
  CHECK(rc == PEER_OK, "train step: %s", peer_last_error());
  return loss;
}

static peer_model* two_layer_model(uint64_t seed, int* l0, int* l1) {
  const peer_config c = small_config();
  peer_model* m = NULL;
  CHECK(peer_model_create(&m) == PEER_OK, "create: %s", peer_last_error());
  CHECK(peer_model_add_layer(m, "blocks.0.ffn.", &c, NULL, l0) == PEER_OK && *l0 == 0, "add layer 0: %s", peer_last_error());
  CHECK(peer_model_add_layer(m, "blocks.1.ffn.", &c, "blocks.0.ffn.", l1) == PEER_OK && *l1 == 1, "add layer 1: %s", peer_last_error());
  CHECK(peer_model_build(m, seed) == PEER_OK, "build: %s", peer_last_error());
  return m;
}

static int eval_model(peer_model* m, int l0, int l1, float* out) {
  return peer_model_forward(m, l0, x, B, 0, h, 0, PEER_MODE_EVAL) | peer_model_forward(m, l1, h, B, 0, out, 0, PEER_MODE_EVAL);
}

int main(void) {
  unsigned seed = 777;
  for (int i = 0; i < B * D; ++i) x[i] = uniform(&seed);
  for (int i = 0; i < B * D; ++i) target[i] = 0.5f * uniform(&seed);
  const peer_config c = small_config();

  /* 1. Two layers, one expert table: parameters counted once, training lowers the loss. */
  int l0 = -1, l1 = -1;
  peer_model* m = two_layer_model(5, &l0, &l1);
  peer_layer* single = NULL;
  CHECK(peer_layer_create(&c, 5, &single) == PEER_OK, "layer: %s", peer_last_error());
  const int64_t table = c.num_experts * 2 * D;
  CHECK(peer_model_num_layers(m) == 2, "two layers");
  CHECK(peer_model_num_parameters(m) == 2 * peer_layer_num_parameters(single) - table,
        "a shared table counts once: %lld vs %lld", (long long)peer_model_num_parameters(m),
        (long long)(2 * peer_layer_num_parameters(single) - table));
  double first = 0, last = 0;
  for (int step = 0; step < 80; ++step) {
    last = train_step(m, l0, l1);
    if (step == 0) first = last;
  }
  CHECK(last < 0.5 * first, "training the model lowers the loss: %g -> %g", first, last);

  /* 2. A one-layer model is the layer: same configuration and seed, the same outputs bit for bit, before
   * and after AdamW steps (no clipping: the global norm's summation order is the model's own). */
  peer_model* one = NULL;
  int only = -1;
  CHECK(peer_model_create(&one) == PEER_OK && peer_model_add_layer(one, "ffn.", &c, NULL, &only) == PEER_OK &&
            peer_model_build(one, 5) == PEER_OK,
        "one-layer model: %s", peer_last_error());
  for (int step = 0; step < 3; ++step) {
    int rc = peer_model_forward(one, only, x, B, 0, y, 0, PEER_MODE_TRAIN);
    rc |= peer_layer_forward(single, x, B, 0, y2, 0, PEER_MODE_TRAIN);
    CHECK(rc == PEER_OK && memcmp(y, y2, sizeof(y)) == 0, "step %d: model layer == peer_layer bit for bit", step);
    loss_of(y, dy);
    rc = peer_model_zero_grad(one) | peer_model_backward(one, only, dy, 0, NULL, 0) | peer_model_step(one, 1e-2, 1e-1, 0.01, 0.0);
    rc |= peer_layer_zero_grad(single) | peer_layer_backward(single, dy, 0, NULL, 0) | peer_layer_step(single, 1e-2, 1e-1, 0.01, 0.0);
    CHECK(rc == PEER_OK, "steps: %s", peer_last_error());
  }

  /* 2b. Fused table updates on the model: a table shared by two layers gets two backwards per step, which
   * fused updates refuse (the second one, with a message); unfused again, it trains as before. */
  {
    int f0 = -1, f1 = -1;
    peer_model* fm = two_layer_model(5, &f0, &f1);
    peer_table_training tt;
    peer_table_training_default(&tt);
    tt.fused = 1;
    tt.expert_lr = 3e-2;
    CHECK(peer_model_set_table_training(fm, &tt) == PEER_OK, "fuse the model: %s", peer_last_error());
    int rc = peer_model_forward(fm, f0, x, B, 0, h, 0, PEER_MODE_TRAIN) | peer_model_forward(fm, f1, h, B, 0, out, 0, PEER_MODE_TRAIN);
    loss_of(out, dy);
    rc |= peer_model_zero_grad(fm) | peer_model_backward(fm, f1, dy, 0, dh, 0);
    CHECK(rc == PEER_OK, "the first fused backward: %s", peer_last_error());
    CHECK(peer_model_backward(fm, f0, dh, 0, NULL, 0) == PEER_ERROR_INVALID_ARGUMENT, "a second fused backward into a shared table refused");
    CHECK(strstr(peer_last_error(), "exactly one backward per step") != NULL, "message: %s", peer_last_error());
    tt.fused = 0;
    CHECK(peer_model_set_table_training(fm, &tt) == PEER_ERROR_INVALID_ARGUMENT, "a change after a fused backward refused");
    CHECK(strstr(peer_last_error(), "take the step first") != NULL, "message: %s", peer_last_error());
    CHECK(peer_model_step(fm, 3e-3, 3e-2, 0.0, 0.0) == PEER_OK, "the step closes the fused backward: %s", peer_last_error());
    CHECK(peer_model_set_table_training(fm, &tt) == PEER_ERROR_INVALID_ARGUMENT, "a change after the first step refused");
    peer_model_destroy(fm);
  }

  /* 3. Checkpoint: save, train on, load: evaluation comes back bit for bit. */
  const char* ckpt = "c_model_test.ckpt";
  CHECK(eval_model(m, l0, l1, y) == PEER_OK, "eval: %s", peer_last_error());
  CHECK(peer_model_save(m, ckpt) == PEER_OK, "save: %s", peer_last_error());
  train_step(m, l0, l1);
  CHECK(eval_model(m, l0, l1, y2) == PEER_OK && memcmp(y, y2, sizeof(y)) != 0, "the step changed the outputs");
  CHECK(peer_model_load(m, ckpt) == PEER_OK, "load: %s", peer_last_error());
  CHECK(eval_model(m, l0, l1, y2) == PEER_OK && memcmp(y, y2, sizeof(y)) == 0, "loaded model reproduces the saved one");
  /* ... and a model of other layers refuses it, unchanged. */
  CHECK(peer_model_load(one, ckpt) != PEER_OK, "a one-layer model refuses a two-layer checkpoint");
  CHECK(strlen(peer_last_error()) > 0, "message: %s", peer_last_error());
  CHECK(peer_model_forward(one, only, x, B, 0, y2, 0, PEER_MODE_EVAL) == PEER_OK, "the refused model still runs");
  remove(ckpt);

  /* 4. safetensors under our names: into a fresh model (other seed) the outputs come back bit for bit. */
  const char* st = "c_model_test.safetensors";
  CHECK(peer_model_save_safetensors(m, st) == PEER_OK, "save safetensors: %s", peer_last_error());
  int f0 = -1, f1 = -1;
  peer_model* fresh = two_layer_model(99, &f0, &f1);
  CHECK(eval_model(fresh, f0, f1, y2) == PEER_OK && memcmp(y, y2, sizeof(y)) != 0, "another seed, other outputs");
  CHECK(peer_model_load_safetensors(fresh, st) == PEER_OK, "load safetensors: %s", peer_last_error());
  CHECK(eval_model(fresh, f0, f1, y2) == PEER_OK && memcmp(y, y2, sizeof(y)) == 0, "safetensors round trip bit for bit");
  CHECK(peer_model_load_safetensors(one, st) == PEER_ERROR_IO || peer_model_load_safetensors(one, st) == PEER_ERROR_INVALID_ARGUMENT,
        "a model of other names refuses the file");
  CHECK(strstr(peer_last_error(), "ffn.") != NULL, "the message names the tensor: %s", peer_last_error());
  remove(st);

  /* 5. PEER-pytorch files: its configuration, export, import into another layer, model layers by prefix. */
  peer_config pt;
  CHECK(peer_config_peer_pytorch(&pt, D, 2, 100, 3, 4, 0, 0) == PEER_OK, "PEER-pytorch config: %s", peer_last_error());
  CHECK(pt.key_dim == 8 && pt.top_k == 3 && pt.sub_key_top_k == 3 && pt.query_norm == PEER_QUERY_NORM_NONE &&
            pt.key_sharing == PEER_KEYS_PER_HEAD && pt.gating == PEER_GATING_SOFTMAX,
        "its function: Dk = 2 dim_key, k' = k, no query norm, per-head keys, softmax");
  peer_layer *a = NULL, *b = NULL;
  CHECK(peer_layer_create(&pt, 1, &a) == PEER_OK && peer_layer_create(&pt, 2, &b) == PEER_OK, "layers: %s", peer_last_error());
  const char* torch = "c_model_test_torch.safetensors";
  CHECK(peer_layer_export_peer_pytorch(a, torch, "layers.0.ff.") == PEER_OK, "export: %s", peer_last_error());
  CHECK(peer_layer_import_peer_pytorch(b, torch, "layers.0.ff.") == PEER_OK, "import: %s", peer_last_error());
  CHECK(peer_layer_forward(a, x, B, 0, y, 0, PEER_MODE_EVAL) == PEER_OK && peer_layer_forward(b, x, B, 0, y2, 0, PEER_MODE_EVAL) == PEER_OK &&
            memcmp(y, y2, sizeof(y)) == 0,
        "PEER-pytorch round trip bit for bit");
  CHECK(peer_layer_import_peer_pytorch(b, torch, "layers.1.ff.") == PEER_ERROR_IO, "a prefix not in the file is refused");
  CHECK(strstr(peer_last_error(), "layers.1.ff.to_queries.0.weight") != NULL, "message: %s", peer_last_error());
  CHECK(peer_layer_import_peer_pytorch(single, torch, "layers.0.ff.") == PEER_ERROR_INVALID_ARGUMENT,
        "a layer that is not PEER-pytorch's function is refused");
  CHECK(strstr(peer_last_error(), "not one PEER-pytorch computes") != NULL, "message: %s", peer_last_error());
  peer_model* pm = NULL;
  int p0 = -1, p1 = -1;
  CHECK(peer_model_create(&pm) == PEER_OK && peer_model_add_layer(pm, "blocks.0.", &pt, NULL, &p0) == PEER_OK &&
            peer_model_add_layer(pm, "blocks.1.", &pt, NULL, &p1) == PEER_OK && peer_model_build(pm, 3) == PEER_OK,
        "PEER-pytorch model: %s", peer_last_error());
  CHECK(peer_model_import_peer_pytorch(pm, p1, torch, "layers.0.ff.") == PEER_OK, "model import: %s", peer_last_error());
  CHECK(peer_model_forward(pm, p1, x, B, 0, y2, 0, PEER_MODE_EVAL) == PEER_OK && memcmp(y, y2, sizeof(y)) == 0,
        "layer 1 of the model computes the imported layer");
  CHECK(peer_model_forward(pm, p0, x, B, 0, y2, 0, PEER_MODE_EVAL) == PEER_OK && memcmp(y, y2, sizeof(y)) != 0,
        "layer 0 is untouched");
  CHECK(peer_model_export_peer_pytorch(pm, p1, torch, "") == PEER_OK && peer_layer_import_peer_pytorch(b, torch, NULL) == PEER_OK,
        "model export, layer import: %s", peer_last_error());
  remove(torch);

  /* 6. Misuse. */
  int ix = 5;
  peer_model* early = NULL;
  CHECK(peer_model_create(&early) == PEER_OK, "create");
  CHECK(peer_model_forward(early, 0, x, B, 0, y, 0, PEER_MODE_TRAIN) == PEER_ERROR_INVALID_ARGUMENT, "forward before build refused");
  CHECK(strstr(peer_last_error(), "not built") != NULL, "message: %s", peer_last_error());
  CHECK(peer_model_build(early, 1) == PEER_ERROR_INVALID_ARGUMENT, "a model without layers is refused");
  CHECK(peer_model_add_layer(early, "a.", &c, "b.", &ix) == PEER_ERROR_INVALID_ARGUMENT && ix == -1, "an unknown table owner is refused");
  CHECK(strstr(peer_last_error(), "share_experts_with = 'b.'") != NULL, "message: %s", peer_last_error());
  CHECK(peer_model_add_layer(early, "a.", &c, NULL, &ix) == PEER_OK, "add: %s", peer_last_error());
  CHECK(peer_model_add_layer(early, "a.", &c, NULL, &ix) == PEER_ERROR_INVALID_ARGUMENT, "a prefix taken twice is refused");
  peer_config wide = c;
  wide.model_dim = D + 4;
  CHECK(peer_model_add_layer(early, "w.", &wide, "a.", &ix) == PEER_ERROR_INVALID_ARGUMENT, "sharing a table of another shape is refused");
  CHECK(strlen(peer_last_error()) > 0, "message: %s", peer_last_error());
  CHECK(peer_model_build(early, 1) == PEER_OK, "build: %s", peer_last_error());
  CHECK(peer_model_add_layer(early, "c.", &c, NULL, &ix) == PEER_ERROR_INVALID_ARGUMENT, "adding after build is refused");
  CHECK(peer_model_forward(early, 3, x, B, 0, y, 0, PEER_MODE_TRAIN) == PEER_ERROR_INVALID_ARGUMENT, "a bad layer index is refused");
  CHECK(strstr(peer_last_error(), "layer = 3 must be in [0, 1)") != NULL, "message: %s", peer_last_error());
  CHECK(peer_model_backward(early, 0, dy, 0, NULL, 0) == PEER_ERROR_INVALID_ARGUMENT, "backward without a forward refused");
  CHECK(peer_model_step(early, 1e-3, 1e-3, -1.0, 0.0) == PEER_ERROR_INVALID_ARGUMENT, "negative weight decay refused");
  CHECK(peer_model_forward(NULL, 0, x, B, 0, y, 0, PEER_MODE_TRAIN) == PEER_ERROR_INVALID_ARGUMENT, "NULL model refused");
  CHECK(peer_config_peer_pytorch(&pt, D, 2, 99, 3, 4, 0, 0) == PEER_ERROR_INVALID_ARGUMENT, "N not a square is refused");
  CHECK(strstr(peer_last_error(), "num_experts = 99") != NULL, "message: %s", peer_last_error());

  peer_model_destroy(early);
  peer_model_destroy(pm);
  peer_model_destroy(fresh);
  peer_model_destroy(one);
  peer_model_destroy(m);
  peer_model_destroy(NULL);
  peer_layer_destroy(a);
  peer_layer_destroy(b);
  peer_layer_destroy(single);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
