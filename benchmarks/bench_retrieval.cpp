// Retrieval: exact product-key top-k against exhaustive scoring of all N keys, N = 128^2 .. 2048^2.
#include "bench_common.hpp"

namespace {

struct Setup {
  peer::ProductKeyRetrieval<float> keys;
  peer::ParameterLayout layout{4};
  peer::Parameters<float> params;
  explicit Setup(long n) : keys(config(n)) {
    keys.register_parameters(layout, "sub_keys.");
    params = peer::Parameters<float>(layout);
    keys.initialize(params, 1);
  }
  static peer::ProductKeyConfig config(long n) {
    peer::ProductKeyConfig c;
    c.num_heads = 8;
    c.key_dim = 256;
    c.num_sub_keys = n;
    return c;
  }
};

// Product keys: B tokens x 8 heads, Dk = 256, k = k' = 16.
void BM_ProductKeys(benchmark::State& state) {
  const long n = state.range(0), b = 256;
  Setup s(n);
  const bench::Mat q = bench::random(b, 8 * 256, 2);
  peer::IdMatrix ids(b, 8 * 16);
  bench::Mat scores(b, 8 * 16);
  peer::ProductKeyRetrieval<float>::Workspace ws;
  for (auto _ : state) {
    s.keys.search(s.params, q, ids, scores, ws);
    benchmark::DoNotOptimize(ids.data());
  }
  // Scoring 2 n sub-keys of Dk / 2 per head: 2 * 2 n (Dk / 2) FLOPs; sub-keys read once per tile.
  const double nd = static_cast<double>(n);
  bench::set_counters(state, static_cast<double>(b), 8.0 * 2 * 2 * nd * 128, 0);
  state.counters["N"] = nd * nd;
}

// Brute force: the same scores for all N keys, exhaustive top-k (the oracle), few tokens.
void BM_BruteForce(benchmark::State& state) {
  const long n = state.range(0), b = 2;
  Setup s(n);
  const bench::Mat q = bench::random(b, 8 * 256, 2);
  peer::IdMatrix ids(b, 8 * 16);
  bench::Mat scores(b, 8 * 16);
  peer::BruteForceRetrieval<float> brute(s.keys);
  peer::ProductKeyRetrieval<float>::Workspace ws;
  for (auto _ : state) {
    brute.search(s.params, q, ids, scores, ws);
    benchmark::DoNotOptimize(ids.data());
  }
  const double nd = static_cast<double>(n);
  bench::set_counters(state, static_cast<double>(b), 8.0 * (2 * 2 * nd * 128 + nd * nd), 0);
  state.counters["N"] = nd * nd;
}

}  // namespace

BENCHMARK(BM_ProductKeys)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_BruteForce)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
