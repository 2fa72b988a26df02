// Shared setup of the benchmarks: random inputs and counters.
#ifndef PEER_BENCHMARKS_BENCH_COMMON_HPP
#define PEER_BENCHMARKS_BENCH_COMMON_HPP

#include <benchmark/benchmark.h>
#include <peer/peer.hpp>

namespace bench {

using Mat = peer::RowMatrix<float>;

inline Mat random(long rows, long cols, std::uint64_t seed) {
  Mat m(rows, cols);
  peer::fill_normal(peer::CounterRng(seed, 0), 0, rows * cols, 1.0, m.data());
  return m;
}

/// tokens/s, GFLOP/s and GB/s counters for `tokens` tokens per iteration.
inline void set_counters(benchmark::State& state, double tokens, double flops_per_token, double bytes_per_token) {
  state.SetItemsProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * tokens));
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(tokens * flops_per_token * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] = benchmark::Counter(tokens * bytes_per_token * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace bench

#endif
