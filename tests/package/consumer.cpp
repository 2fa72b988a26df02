// A user's program: build a small PEER layer, run forward and backward, check the output is finite; then
// the same layer inside a model set, served by the inference path.
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
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  layer.backward(params, cache, y, dx, grads);
  bool ok = y.allFinite() && dx.allFinite() && grads.find_table("experts").size() > 0;
  // The model set and the inference path.
  peer::ModelLayout model;
  const int l = model.add_layer("blocks.0.ffn.", layer.layout());
  peer::Parameters<float> model_params(model.layout());
  peer::LayerViews<float> views(model, model_params);
  layer.initialize(views.params(l), 7);
  peer::PeerLayer<float>::Workspace ws;
  peer::RowMatrix<float> y2(8, 16);
  layer.infer(peer::layer_parameters(static_cast<const peer::Parameters<float>&>(model_params), model, l), x, y2, ws);
  ok = ok && y2.allFinite();
  std::cout << "peer " << peer::version() << (ok ? ": consumer ok\n" : ": consumer FAILED\n");
  return ok ? 0 : 1;
}
