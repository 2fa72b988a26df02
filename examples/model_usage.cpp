// The README's model example: three residual blocks (PEER, dense FFW, PEER sharing the first block's
// expert table) as ONE parameter set, trained by one optimizer, saved in one checkpoint, then served by
// the inference path on const parameters. Built and run by the tests (ctest -R example.model_usage).
#include <peer/peer.hpp>

#include <cstdio>
#include <iostream>
#include <string>

int main() {
  using Mat = peer::RowMatrix<float>;
  const peer::Index d = 64, batch = 256;

  peer::PeerConfig pc;  // the paper's defaults, at a size that runs in a second
  pc.model_dim = d;
  pc.num_experts = 128 * 128;
  pc.key_dim = 64;
  peer::PeerLayer<float> peer0(pc), peer2(pc);
  peer::DenseFfwConfig fc;
  fc.model_dim = d;
  fc.hidden_dim = 4 * d;
  peer::DenseFfw<float> ffw(fc);

  // One model: every layer under a prefix; block 2 uses block 0's expert table (one table, one state).
  peer::ModelLayout model;
  const int b0 = model.add_layer("blocks.0.ffn.", peer0.layout());
  const int b1 = model.add_layer("blocks.1.ffn.", ffw.layout());
  const int b2 = model.add_layer("blocks.2.ffn.", peer2.layout(), {{"experts", "blocks.0.ffn.experts"}});

  peer::Parameters<float> params(model.layout());  // one flat dense buffer, one table
  peer::Gradients<float> grads(model.layout());
  peer::LayerViews<float> views(model, params, grads);  // each layer's part; made once
  peer0.initialize(views.params(b0), 1);
  ffw.initialize(views.params(b1), 2);
  peer2.initialize(views.params(b2), 3);  // initializes the shared table too (last one wins)

  peer::Adam<float> adam(model.layout(), peer::default_param_groups(/*dense_lr=*/1e-3), peer::AdamConfig::adamw());
  peer::PeerLayer<float>::Cache c0, c2;
  peer::DenseFfw<float>::Cache c1;

  // A toy task: learn y = tanh(x A) for a fixed random A.
  const Mat a = Mat::Random(d, d);
  auto make_batch = [&](int step, Mat& x, Mat& target) {
    std::srand(static_cast<unsigned>(step));
    x = Mat::Random(batch, d);
    target = (x * a).array().tanh().matrix();
  };
  Mat x, target, h1(batch, d), h2(batch, d), out(batch, d), f(batch, d);
  auto forward = [&](peer::Mode mode) {  // out = h2 + PEER_2(h2), h2 = h1 + FFW(h1), h1 = x + PEER_0(x)
    peer0.forward(views.params(b0), x, f, c0, mode);
    h1 = x + f;
    ffw.forward(views.params(b1), h1, f, c1, mode);
    h2 = h1 + f;
    peer2.forward(views.params(b2), h2, f, c2, mode);
    out = h2 + f;
    return 0.5 * (out - target).squaredNorm() / batch;
  };
  double first = 0, last = 0;
  for (int step = 0; step < 40; ++step) {
    make_batch(step, x, target);
    last = forward(peer::Mode::kTrain);
    if (step == 0) first = last;
    const Mat dout = (out - target) / static_cast<float>(batch);
    Mat dh2 = dout, dh1, dx = Mat::Zero(batch, d);
    grads.zero();                                                  // every layer's gradients at once
    peer2.backward(views.params(b2), c2, dout, dh2, views.grads(b2));  // backward adds: dh2 += ...
    dh1 = dh2;
    ffw.backward(views.params(b1), c1, dh2, dh1, views.grads(b1));
    peer0.backward(views.params(b0), c0, dh1, dx, views.grads(b0));
    peer::clip_gradient_norm(grads, 1.0);                          // the global norm of the whole model
    adam.step(params, grads);                                      // every layer, one step
  }
  std::cout << "training loss " << first << " -> " << last << "\n";

  // One checkpoint for the whole model and its optimizer.
  std::int64_t steps = adam.steps();
  const std::string path = "model_usage.ckpt";
  peer::TrainingCheckpoint ckpt;
  ckpt.add_config("peer", pc.to_fields());
  ckpt.add_parameters("model", params);
  ckpt.add_optimizer("adam", adam);
  ckpt.add_counter("step", &steps);
  ckpt.save(path);

  // Inference: const parameters, a workspace per layer, no backward cache, no copy of x.
  peer::Parameters<float> served(model.layout());
  {
    peer::TrainingCheckpoint restore;  // the same registrations, on fresh objects
    peer::Adam<float> fresh(model.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw());
    std::int64_t restored_steps = 0;
    restore.add_config("peer", pc.to_fields());
    restore.add_parameters("model", served);
    restore.add_optimizer("adam", fresh);
    restore.add_counter("step", &restored_steps);
    restore.load(path);
  }
  std::remove(path.c_str());
  const peer::Parameters<float>& frozen = served;
  const peer::Parameters<float> v0 = peer::layer_parameters(frozen, model, b0);
  const peer::Parameters<float> v1 = peer::layer_parameters(frozen, model, b1);
  const peer::Parameters<float> v2 = peer::layer_parameters(frozen, model, b2);
  peer::PeerLayer<float>::Workspace w0, w2;
  peer::DenseFfw<float>::Workspace w1;
  make_batch(1000, x, target);
  peer0.infer(v0, x, f, w0);
  h1 = x + f;
  ffw.infer(v1, h1, f, w1);
  h2 = h1 + f;
  peer2.infer(v2, h2, f, w2);
  const Mat served_out = h2 + f;
  // The served model is the trained one: the same outputs as the training objects in evaluation mode.
  forward(peer::Mode::kEval);
  const bool same = served_out == out;
  std::cout << "held-out loss " << 0.5 * (served_out - target).squaredNorm() / batch
            << (same ? "; restored model serves bitwise the trained model's outputs\n" : "; MISMATCH\n");
  return (last < 0.8 * first && same) ? 0 : 1;
}
