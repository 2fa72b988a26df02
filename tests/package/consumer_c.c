/* A user's C program: a small PEER layer through the C interface, forward and backward. */
#include <peer/c_api.h>

#include <stdio.h>

int main(void) {
  peer_config config;
  peer_config_default(&config);
  config.model_dim = 8;
  config.num_experts = 16;
  config.num_heads = 2;
  config.key_dim = 8;
  config.top_k = 2;
  config.sub_key_top_k = 2;
  peer_layer* layer = NULL;
  float x[4 * 8], y[4 * 8];
  for (int i = 0; i < 4 * 8; ++i) x[i] = (float)(i % 7) / 7.0f - 0.5f;
  int rc = peer_layer_create(&config, 1, &layer);
  if (rc == PEER_OK) rc = peer_layer_forward(layer, x, 4, 0, y, 0, PEER_MODE_TRAIN);
  if (rc == PEER_OK) rc = peer_layer_backward(layer, y, 0, NULL, 0);
  if (rc != PEER_OK) printf("consumer_c FAILED: %s\n", peer_last_error());
  peer_layer_destroy(layer);
  if (rc == PEER_OK) printf("consumer_c ok\n");
  return rc == PEER_OK ? 0 : 1;
}
