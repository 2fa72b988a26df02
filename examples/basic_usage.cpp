// The README's usage example: a PEER layer on the user's own Eigen matrices. Run by ctest
// (example.basic_usage): it checks what it prints and exits non-zero when that is wrong.
#include <peer/peer.hpp>

#include <cmath>
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
  const double dwq = grads.find_dense("query.weight").norm();
  std::cout << "touched " << experts.size() << " of " << config.num_experts << " experts; |dW_q| = " << dwq << "\n";

  // What the README promises: at most B H k experts touched (here 512 x 8 x 16), a finite, non-zero
  // query gradient, y and dx finite.
  const bool ok = experts.size() > 0 && experts.size() <= 512 * 8 * 16 && std::isfinite(dwq) && dwq > 0 &&
                  y.allFinite() && dx.allFinite() && dx.norm() > 0;
  if (!ok) std::cerr << "basic_usage: the results are not what the README says\n";
  return ok ? 0 : 1;
}
