// The README's usage example: a PEER layer on the user's own Eigen matrices.
#include <peer/peer.hpp>

#include <iostream>

int main() {
  peer::PeerConfig config;               // the paper's defaults: 1024^2 experts, 8 heads, top 16
  config.model_dim = 256;                // D
  peer::PeerLayer<float> layer(config);  // validates the configuration

  peer::Parameters<float> params = layer.make_parameters(/*seed=*/1);
  peer::Gradients<float> grads = layer.make_gradients();
  peer::PeerLayer<float>::Cache cache;

  peer::RowMatrix<float> x = peer::RowMatrix<float>::Random(512, 256);  // [B, D], your activations
  peer::RowMatrix<float> y(512, 256), dx = peer::RowMatrix<float>::Zero(512, 256);

  layer.forward(params, x, y, cache, peer::Mode::kTrain);  // y = PEER(x)
  peer::RowMatrix<float> dy = y;                             // dL/dy from your loss (here L = |y|^2 / 2)
  layer.backward(params, cache, dy, dx, grads);              // dx += dL/dx, grads += dL/dparams

  const auto& experts = grads.find_table("experts");        // row-sparse: only the touched experts
  std::cout << "touched " << experts.size() << " of " << config.num_experts << " experts; |dW_q| = "
            << grads.find_dense("query.weight").norm() << "\n";
}
