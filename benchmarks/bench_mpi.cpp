// DataParallel::all_reduce (peer/mpi/data_parallel.hpp) against MPI's own MPI_Allreduce on the same bytes,
// in one run, under mpirun:
//   mpirun -np 2 build/bench/benchmarks/bench_mpi
// - dense: the flat buffer of `floats` floats, summed in rank order (reduce-scatter + all-gather) against
//   MPI_Allreduce(MPI_SUM) in place (whose order is MPI's);
// - table: each rank's `rows` rows of 2 D = 1,024 floats (D = 512) at its own ids, half of them shared
//   with the next rank, gathered and coalesced into their sum, against MPI_Allgather of the same bytes (the
//   exchange alone, without ids and without coalescing; an MPI_Allreduce would need a dense N x 2D buffer).
// Every rank runs every case for a fixed number of iterations (collectives must match across ranks);
// rank 0 reports. Counters: bytes this rank sent per call (GB/s of them), rows.
#include <peer/mpi/data_parallel.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <vector>

namespace {

constexpr int kIterations = 20;

const peer::mpi::Communicator& comm() {
  static const peer::mpi::Communicator c;
  return c;
}

peer::ParameterLayout dense_layout(peer::Index floats) {
  peer::ParameterLayout l(4);
  l.add_dense("w", 1, floats);
  return l;
}

void BM_AllReduceDense_Peer(benchmark::State& state) {
  const peer::Index n = state.range(0);
  const auto layout = dense_layout(n);
  peer::Gradients<float> grads(layout);
  peer::mpi::DataParallel<float> dp(comm(), layout);
  for (auto _ : state) {
    for (peer::Index i = 0; i < n; ++i) grads.dense_data()[i] = 1.0f;
    dp.all_reduce(grads);
    benchmark::DoNotOptimize(grads.dense_data());
  }
  state.counters["sent_bytes"] = static_cast<double>(dp.last_traffic().dense_bytes);
  state.SetBytesProcessed(state.iterations() * dp.last_traffic().dense_bytes);
}

void BM_AllReduceDense_MpiAllreduce(benchmark::State& state) {
  const peer::Index n = state.range(0);
  std::vector<float> g(static_cast<std::size_t>(n));
  const int p = comm().size();
  const auto sent = static_cast<std::int64_t>(2 * (p - 1) * n / p) * 4;  // what a ring all-reduce sends
  for (auto _ : state) {
    std::fill(g.begin(), g.end(), 1.0f);
    peer::mpi::check(MPI_Allreduce(MPI_IN_PLACE, g.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm().comm()), "MPI_Allreduce");
    benchmark::DoNotOptimize(g.data());
  }
  state.counters["sent_bytes"] = static_cast<double>(sent);
  state.SetBytesProcessed(state.iterations() * sent);
}

// This rank's table gradient: `rows` rows at ids r * rows / 2 + i (half shared with the next rank).
void fill_table(peer::RowSparseGrad<float>& grad, peer::Index rows) {
  std::vector<peer::ExpertId> ids(static_cast<std::size_t>(rows));
  for (peer::Index i = 0; i < rows; ++i) ids[static_cast<std::size_t>(i)] = static_cast<peer::ExpertId>(comm().rank() * rows / 2 + i);
  auto v = grad.reset(ids);
  v.setConstant(1.0f);
}

void BM_AllReduceTable_Peer(benchmark::State& state) {
  const peer::Index rows = state.range(0), cols = 1024;
  peer::ParameterLayout layout(4);
  layout.add_table("experts", rows * (comm().size() + 1), cols);
  peer::Gradients<float> grads(layout);
  peer::mpi::DataParallel<float> dp(comm(), layout);
  for (auto _ : state) {
    state.PauseTiming();  // the rank's own gradient, refilled (all_reduce replaced it by the sum)
    fill_table(grads.table(peer::TableHandle{0}), rows);
    state.ResumeTiming();
    dp.all_reduce(grads);
    benchmark::DoNotOptimize(grads.table(peer::TableHandle{0}).values().data());
  }
  state.counters["sent_bytes"] = static_cast<double>(dp.last_traffic().table_bytes);
  state.counters["merged_rows"] = static_cast<double>(dp.last_traffic().merged_rows);
  state.SetBytesProcessed(state.iterations() * dp.last_traffic().table_bytes);
}

void BM_AllReduceTable_MpiAllgather(benchmark::State& state) {
  const peer::Index rows = state.range(0), cols = 1024;
  std::vector<float> mine(static_cast<std::size_t>(rows * cols), 1.0f), all(mine.size() * static_cast<std::size_t>(comm().size()));
  const auto sent = static_cast<std::int64_t>(comm().size() - 1) * rows * cols * 4;
  for (auto _ : state) {
    peer::mpi::check(MPI_Allgather(mine.data(), static_cast<int>(rows * cols), MPI_FLOAT, all.data(), static_cast<int>(rows * cols), MPI_FLOAT,
                                   comm().comm()),
                     "MPI_Allgather");
    benchmark::DoNotOptimize(all.data());
  }
  state.counters["sent_bytes"] = static_cast<double>(sent);
  state.SetBytesProcessed(state.iterations() * sent);
}

BENCHMARK(BM_AllReduceDense_Peer)->Arg(1 << 16)->Arg(1 << 22)->Iterations(kIterations)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_AllReduceDense_MpiAllreduce)->Arg(1 << 16)->Arg(1 << 22)->Iterations(kIterations)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_AllReduceTable_Peer)->Arg(1 << 10)->Arg(1 << 14)->Iterations(kIterations)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_AllReduceTable_MpiAllgather)->Arg(1 << 10)->Arg(1 << 14)->Iterations(kIterations)->Unit(benchmark::kMillisecond)->UseRealTime();

// Ranks other than 0 run the same cases silently.
class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [&] {
    benchmark::Initialize(&argc, argv);
    if (comm().rank() == 0) {
      std::printf("bench_mpi: %d ranks\n", comm().size());
      benchmark::RunSpecifiedBenchmarks();
    } else {
      Silent silent;
      benchmark::RunSpecifiedBenchmarks(&silent);
    }
    benchmark::Shutdown();
    return 0;
  });
  MPI_Finalize();
  return code;
}
