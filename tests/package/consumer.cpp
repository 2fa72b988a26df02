// A user's program: build a small PEER layer, run forward and backward, check the output is finite.
#include <peer/peer.hpp>

#include <iostream>

int main() {
  peer::PeerConfig config;
  config.model_dim = 16;
  config.key_dim = 8;
  config.num_experts = 16 * 16;
  config.num_heads = 2;
  config.top_k = 4;
  config.sub_key_top_k = 4;
  peer::PeerLayer<float> layer(config);
  auto params = layer.make_parameters(7);
  auto grads = layer.make_gradients();
  peer::PeerLayer<float>::Cache cache;
  peer::RowMatrix<float> x = peer::RowMatrix<float>::Random(8, 16);
  peer::RowMatrix<float> y(8, 16), dx = peer::RowMatrix<float>::Zero(8, 16);
  layer.forward(params, x, y, cache);
  layer.backward(params, cache, y, dx, grads);
  const bool ok = y.allFinite() && dx.allFinite() && grads.find_table("experts").size() > 0;
  std::cout << "peer " << peer::version() << (ok ? ": consumer ok\n" : ": consumer FAILED\n");
  return ok ? 0 : 1;
}
