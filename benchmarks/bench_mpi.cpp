// DataParallel::all_reduce (peer/mpi/data_parallel.hpp) against MPI's own MPI_Allreduce on the same bytes,
// in one run, under mpirun:
//   mpirun -np 2 build/bench/benchmarks/bench_mpi
// - dense: the flat buffer of `floats` floats, summed in rank order (reduce-scatter + all-gather) against
//   MPI_Allreduce(MPI_SUM) in place (whose order is MPI's);
// - table: each rank's `rows` rows of 2 D = 1,024 floats (D = 512) at its own ids, half of them shared
//   with the next rank, gathered and coalesced into their sum, against MPI_Allgather of the same bytes (the
//   exchange alone, without ids and without coalescing; an MPI_Allreduce would need a dense N x 2D buffer).
// - step: one training step (forward, backward, all-reduce, clip, AdamW with lazy Adam on the table) of
//   a PEER layer with N = sub_keys^2 experts, D = 256, H = 8, k = 16 (the paper's heads and k), a global
//   batch of 1,024 tokens split over the ranks, expert-sharded (the table and its Adam state split by rows)
//   against data-parallel (every rank holds and updates the whole table) in the same run. Counters:
//   tokens/s of the global batch, bytes a rank sent per token of its own, the expert FLOPs per token and
//   their ratio to those bytes, the table state a rank holds (rows, m, v) and the largest resident set of
//   the ranks with the model live.
// Every rank runs every case for a fixed number of iterations (collectives must match across ranks);
// rank 0 reports. Counters: bytes this rank sent per call (GB/s of them), rows.
#include <peer/mpi/data_parallel.hpp>
#include <peer/mpi/expert_sharded.hpp>
#include <peer/peer.hpp>

#include <unistd.h>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <fstream>
#include <string>
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

// ---- Training steps: expert-sharded against data-parallel --------------------------------------------

constexpr peer::Index kGlobalTokens = 1024;
constexpr int kStepIterations = 4;

peer::PeerConfig step_config(peer::Index sub_keys) {
  peer::PeerConfig c;
  c.model_dim = 256;
  c.num_experts = sub_keys * sub_keys;
  c.num_heads = 8;
  c.key_dim = 128;
  c.top_k = 16;
  c.sub_key_top_k = 16;
  return c;
}

// The largest resident set of the ranks now, MiB (/proc/self/statm).
double largest_resident_mib() {
  std::ifstream statm("/proc/self/statm");
  long long size = 0, resident = 0;
  statm >> size >> resident;
  const auto kib = static_cast<std::int64_t>(resident) * sysconf(_SC_PAGESIZE) / 1024;
  return static_cast<double>(comm().max(kib)) / 1024.0;
}

std::int64_t exchange_bytes(const peer::PeerLayer<float>&) { return 0; }
std::int64_t exchange_bytes(const peer::mpi::ShardedPeerLayer<float>& layer) {
  return layer.experts().last_forward_traffic().bytes_sent + layer.experts().last_backward_traffic().bytes_sent;
}

template <typename Layer>
void run_steps(benchmark::State& state, const Layer& layer, const std::vector<std::string>& sharded) {
  const int p = comm().size(), me = comm().rank();
  const peer::PeerConfig c = layer.config();
  const peer::Index local = kGlobalTokens / p, d = c.model_dim;
  auto params = layer.make_parameters(1);
  auto grads = layer.make_gradients();
  peer::Adam<float> adam(layer.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw());
  peer::mpi::DataParallel<float> dp(comm(), layer.layout(), sharded);
  typename Layer::Cache cache;
  peer::RowMatrix<float> x(local, d), y(local, d), none;
  peer::fill_normal(peer::CounterRng(5, static_cast<std::uint64_t>(me)), 0, x.size(), 1.0, x.data());
  std::int64_t sent = 0;
  for (auto _ : state) {
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    grads.zero();
    layer.backward(params, cache, peer::RowMatrix<float>(y / static_cast<float>(kGlobalTokens)), none, grads);
    dp.all_reduce(grads);
    dp.clip_gradient_norm(grads, 1.0);
    adam.step(params, grads);
    sent = dp.last_traffic().dense_bytes + dp.last_traffic().table_bytes + exchange_bytes(layer);
  }
  const auto& table = params.table(layer.experts().table_handle());
  const double flops = static_cast<double>(c.num_heads * c.top_k) *
                       (peer::SingleNeuronExperts<float>::forward_flops_per_slot(d) + peer::SingleNeuronExperts<float>::backward_flops_per_slot(d));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(kGlobalTokens * static_cast<peer::Index>(state.iterations())), benchmark::Counter::kIsRate);
  state.counters["sent_B/token"] = static_cast<double>(sent) / static_cast<double>(local);
  state.counters["expert_FLOP/token"] = flops;
  state.counters["FLOP/sent_B"] = sent > 0 ? flops * static_cast<double>(local) / static_cast<double>(sent) : 0.0;
  state.counters["table_state_MiB/rank"] = 3.0 * static_cast<double>(table.bytes()) / (1024.0 * 1024.0);  // rows, m, v
  state.counters["rss_MiB(max rank)"] = largest_resident_mib();
}

void BM_Step_ExpertSharded(benchmark::State& state) {
  run_steps(state, peer::mpi::make_sharded_peer_layer<float>(step_config(state.range(0)), comm()), {"experts"});
}

void BM_Step_DataParallel(benchmark::State& state) {
  run_steps(state, peer::PeerLayer<float>(step_config(state.range(0))), {});
}

BENCHMARK(BM_Step_ExpertSharded)->Arg(64)->Arg(512)->Iterations(kStepIterations)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Step_DataParallel)->Arg(64)->Arg(512)->Iterations(kStepIterations)->Unit(benchmark::kMillisecond)->UseRealTime();

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
