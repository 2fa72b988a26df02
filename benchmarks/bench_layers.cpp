// Layers: PEER forward, forward + backward and a training step (lazy Adam) next to a dense FFW of the
// same width, in the same run.
#include "bench_common.hpp"

namespace {

enum Phase { kForward = 0, kForwardBackward = 1, kTrainStep = 2 };

template <typename Layer>
void run_layer(benchmark::State& state, const Layer& layer, long dim, long b, double flops_per_token) {
  auto params = layer.make_parameters(1);
  auto grads = layer.make_gradients();
  peer::Adam<float> adam(layer.layout(), peer::default_param_groups(1e-3));
  typename Layer::Cache cache;
  const bench::Mat x = bench::random(b, dim, 3), dy = bench::random(b, dim, 4);
  bench::Mat y(b, dim), none;
  const int phase = static_cast<int>(state.range(2));
  for (auto _ : state) {
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    if (phase >= kForwardBackward) {
      grads.zero();
      layer.backward(params, cache, dy, none, grads);
    }
    if (phase == kTrainStep) adam.step(params, grads);
    benchmark::DoNotOptimize(y.data());
  }
  bench::set_counters(state, static_cast<double>(b), flops_per_token * (phase == kForward ? 1.0 : 3.0), 0);
}

// args: D, n (N = n^2), phase
void BM_Peer(benchmark::State& state) {
  const long d = state.range(0), n = state.range(1), b = 1024;
  peer::PeerConfig c;
  c.model_dim = d;
  c.key_dim = d;
  c.num_experts = n * n;
  peer::PeerLayer<float> layer(c);
  // query projection 2 D H Dk, sub-key scoring 2 H n Dk, experts 4 D H k (forward FLOPs per token)
  const double dd = static_cast<double>(d), nd = static_cast<double>(n);
  const double flops = 2.0 * dd * 8 * dd + 2.0 * 8 * nd * dd + 4.0 * dd * 8 * 16;
  run_layer(state, layer, d, b, flops);
  state.counters["N"] = nd * nd;
}

// args: D, (unused), phase: D -> 4D -> D
void BM_DenseFfw(benchmark::State& state) {
  const long d = state.range(0), b = 1024;
  peer::DenseFfw<float> ffw(peer::DenseFfwConfig{d, 4 * d});
  const double dd = static_cast<double>(d);
  run_layer(state, ffw, d, b, 4.0 * dd * 4 * dd);
}

}  // namespace

BENCHMARK(BM_Peer)->ArgsProduct({{256, 512}, {128, 1024}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DenseFfw)->ArgsProduct({{256, 512}, {0}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
