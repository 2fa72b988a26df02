// Layers: PEER forward, forward + backward and a training step (lazy Adam) next to a dense FFW of the
// same width, in the same run. The PEER rows sweep N = 128^2 .. 1024^2 at D = 256 and 512 (H = 8, k = 16,
// B = 1024): the step time must grow far slower than N.
//
// GB/s counts a model of the expert-table traffic per token, H k rows of 2 D floats each: forward reads
// them once; backward reads them again and writes as many gradient rows; lazy Adam reads the row, its two
// moments and its gradient and writes the row and the moments (7 row transfers; an upper bound, since rows
// picked by several tokens are updated once). Dense FFW counts its weights once per batch.
#include <memory>

#include "bench_common.hpp"

namespace {

enum Phase { kForward = 0, kForwardBackward = 1, kTrainStep = 2 };

// bytes_per_token: {forward, backward, optimizer step} traffic per token.
template <typename Layer>
void run_layer(benchmark::State& state, const Layer& layer, long dim, long b, double flops_per_token,
               const double (&bytes_per_token)[3]) {
  auto params = layer.make_parameters(1);
  auto grads = layer.make_gradients();
  const int phase = static_cast<int>(state.range(2));
  // Adam's moments double the memory of the table: only the training step allocates them.
  std::unique_ptr<peer::Adam<float>> adam;
  if (phase == kTrainStep) adam = std::make_unique<peer::Adam<float>>(layer.layout(), peer::default_param_groups(1e-3));
  typename Layer::Cache cache;
  const bench::Mat x = bench::random(b, dim, 3), dy = bench::random(b, dim, 4);
  bench::Mat y(b, dim), none;
  for (auto _ : state) {
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    if (phase >= kForwardBackward) {
      grads.zero();
      layer.backward(params, cache, dy, none, grads);
    }
    if (phase == kTrainStep) adam->step(params, grads);
    benchmark::DoNotOptimize(y.data());
  }
  double bytes = 0;
  for (int p = 0; p <= phase; ++p) bytes += bytes_per_token[p];
  bench::set_counters(state, static_cast<double>(b), flops_per_token * (phase == kForward ? 1.0 : 3.0), bytes);
}

// args: D, n (N = n^2), phase
void BM_Peer(benchmark::State& state) {
  const long d = state.range(0), n = state.range(1), b = 1024;
  peer::PeerConfig c;
  c.model_dim = d;
  c.key_dim = d;
  c.num_experts = n * n;
  peer::PeerLayer<float> layer(c);
  const double row = static_cast<double>(c.num_heads * c.top_k) * 2.0 * static_cast<double>(d) * sizeof(float);
  const double bytes[3] = {row, 2 * row, 7 * row};
  run_layer(state, layer, d, b, c.forward_flops_per_token(), bytes);
  state.counters["N"] = static_cast<double>(c.num_experts);
}

// args: D, n (N = n^2), phase: the paper's PKM baseline (H = 8, k = 32, Dk = D)
void BM_Pkm(benchmark::State& state) {
  const long d = state.range(0), n = state.range(1), b = 1024;
  peer::PeerConfig c = peer::pkm_config(d);
  c.num_experts = n * n;
  peer::ProductKeyMemory<float> layer(c);
  const double row = static_cast<double>(c.num_heads * c.top_k) * static_cast<double>(d) * sizeof(float);
  const double bytes[3] = {row, 2 * row, 7 * row};
  run_layer(state, layer, d, b, layer.forward_flops_per_token(), bytes);
  state.counters["N"] = static_cast<double>(c.num_experts);
}

// args: D, (unused), phase: D -> 4D -> D
void BM_DenseFfw(benchmark::State& state) {
  const long d = state.range(0), b = 1024;
  peer::DenseFfw<float> ffw(peer::DenseFfwConfig{d, 4 * d});
  const double weights = 2.0 * static_cast<double>(d) * static_cast<double>(4 * d) * sizeof(float) / static_cast<double>(b);
  const double bytes[3] = {weights, 2 * weights, 7 * weights};
  run_layer(state, ffw, d, b, ffw.config().forward_flops_per_token(), bytes);
}

}  // namespace

BENCHMARK(BM_Peer)->ArgsProduct({{256, 512}, {128, 256, 512, 1024}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Pkm)->ArgsProduct({{256, 512}, {1024}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DenseFfw)->ArgsProduct({{256, 512}, {0}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
