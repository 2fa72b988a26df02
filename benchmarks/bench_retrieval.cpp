// Retrieval: exact product-key top-k against exhaustive scoring of all N keys, N = 128^2 .. 2048^2.
//
// The paper's configuration: H = 8 heads, k = k' = 16, Dk = 256 split in halves of 128, shared sub-keys,
// float, all threads. Product keys search B = 1024 tokens per iteration (the layer's batch). Brute force
// scores all N keys of every head (4M per query at 2048^2), so it searches only B = 32 tokens per
// iteration: two tiles of 16 tokens, one per thread. Compare them per token (us/token, tokens/s), not
// per iteration. Both use the same sub-key scoring (score_tile), so the difference is the selection:
// the top k' of each half and about k ln k grid pairs, against a running top-k over all n^2 sums.
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
    c.top_k = 16;
    c.sub_key_top_k = 16;
    return c;
  }
};

void run(benchmark::State& state, bool brute_force, long b) {
  const long n = state.range(0);
  Setup s(n);
  const bench::Mat q = bench::random(b, 8 * 256, 2);
  peer::IdMatrix ids(b, 8 * 16);
  bench::Mat scores(b, 8 * 16);
  peer::BruteForceRetrieval<float> brute(s.keys);
  peer::ProductKeyRetrieval<float>::Workspace ws;
  for (auto _ : state) {
    if (brute_force) {
      brute.search(s.params, q, ids, scores, ws);
    } else {
      s.keys.search(s.params, q, ids, scores, ws);
    }
    benchmark::DoNotOptimize(ids.data());
    benchmark::ClobberMemory();
  }
  // Scoring 2 n sub-keys of Dk / 2 per head: 2 * 2 n (Dk / 2) FLOPs; brute force adds one sum per key.
  const double nd = static_cast<double>(n);
  const double flops = 8.0 * (2 * 2 * nd * 128 + (brute_force ? nd * nd : 0.0));
  bench::set_rate(state, "tokens/s", static_cast<double>(b));
  bench::set_rate(state, "GFLOP/s", static_cast<double>(b) * flops * 1e-9);
  bench::set_time_per_token(state, static_cast<double>(b));
  state.counters["N"] = nd * nd;
  state.counters["batch"] = static_cast<double>(b);
  state.counters["threads"] = bench::max_threads();
}

// args: n (N = n^2)
void BM_ProductKeys(benchmark::State& state) { run(state, false, 1024); }
void BM_BruteForce(benchmark::State& state) { run(state, true, 32); }

}  // namespace

BENCHMARK(BM_ProductKeys)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_BruteForce)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
