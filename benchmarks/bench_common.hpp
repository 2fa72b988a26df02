// Shared setup of the benchmarks: random inputs, thread counts and counters.
#ifndef PEER_BENCHMARKS_BENCH_COMMON_HPP
#define PEER_BENCHMARKS_BENCH_COMMON_HPP

#include <cstdint>

#if defined(__linux__)
#include <sys/resource.h>
#endif

#include <benchmark/benchmark.h>
#include <peer/peer.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench {

using Mat = peer::RowMatrix<float>;

inline Mat random(long rows, long cols, std::uint64_t seed) {
  Mat m(rows, cols);
  peer::fill_normal(peer::CounterRng(seed, 0), 0, rows * cols, 1.0, m.data());
  return m;
}

/// [rows, cols] ids drawn uniformly from [0, limit) (fixed seed: the same ids in every run).
inline peer::IdMatrix random_ids(long rows, long cols, std::int64_t limit, std::uint64_t seed) {
  peer::IdMatrix ids(rows, cols);
  const peer::CounterRng rng(seed, 1);
  for (long i = 0; i < rows * cols; ++i) {
    ids.data()[i] = static_cast<peer::ExpertId>(rng.bits(static_cast<std::uint64_t>(i)) % static_cast<std::uint64_t>(limit));
  }
  return ids;
}

/// Peak resident set size of this process so far, in bytes (0 where getrusage is unavailable).
inline double peak_resident_bytes() {
#if defined(__linux__)
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) == 0) return static_cast<double>(usage.ru_maxrss) * 1024.0;  // KiB on Linux
#endif
  return 0.0;
}

/// tokens/s, GFLOP/s and GB/s counters for `tokens` tokens per iteration.
inline void set_counters(benchmark::State& state, double tokens, double flops_per_token, double bytes_per_token) {
  state.SetItemsProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * tokens));
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(tokens * flops_per_token * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] = benchmark::Counter(tokens * bytes_per_token * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Counter `name` = per_iteration / second (tokens/s, rows/s, GFLOP/s, GB/s ... given per iteration).
inline void set_rate(benchmark::State& state, const char* name, double per_iteration) {
  state.counters[name] = benchmark::Counter(per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

/// Microseconds per token (counter "us/token"): the figure that compares runs of different batch sizes.
inline void set_time_per_token(benchmark::State& state, double tokens) {
  state.counters["us/token"] = benchmark::Counter(
      tokens * 1e-6, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

/// Sets the OpenMP thread count for the scope (a benchmark argument; the library itself never sets it)
/// and records it as the counter "threads". Without OpenMP everything runs on one thread.
class ThreadScope {
 public:
  ThreadScope(benchmark::State& state, long threads) {
#if defined(_OPENMP)
    saved_ = omp_get_max_threads();
    omp_set_num_threads(static_cast<int>(threads));
#else
    threads = 1;
#endif
    state.counters["threads"] = static_cast<double>(threads);
  }
  ~ThreadScope() {
#if defined(_OPENMP)
    omp_set_num_threads(saved_);
#endif
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int saved_ = 1;
};

/// Threads the library will use here (the counter "threads" of benchmarks without a thread argument).
inline int max_threads() { return peer::parallel_threads(); }

}  // namespace bench

#endif
