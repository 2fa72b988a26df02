// Sharded checkpoints over MPI (peer/mpi/sharded_checkpoint.hpp), run by ctest under mpirun -np 2 and 4.
// An expert-sharded PEER layer (double, lazy AdamW on the table) trains two steps on all P ranks, saves,
// and trains two more: the reference. Then:
// - resumed at P ranks from the checkpoint (into a model started from another seed), two steps reproduce
//   the reference bitwise on every rank;
// - loaded at Q = P / 2 and at Q = 1 ranks (sub-communicators of the first Q ranks), every row of the
//   table, of both moments and of the row steps holds the saved value of its global row, the replicated
//   tensors rank 0's; two steps there on the same global batch match the reference to 1e-12 (the sharded
//   sums are associated by owner, which depends on the rank count);
// - a shard file of another save, a save that fails on one rank, a checkpoint built for another place:
//   every rank throws, with the failing rank's message, nothing is written, and no rank hangs.

#include <peer/mpi/data_parallel.hpp>
#include <peer/mpi/expert_sharded.hpp>
#include <peer/mpi/sharded_checkpoint.hpp>
#include <peer/peer.hpp>

#include "mpi_check.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace peer_mpi_test;
using peer::mpi::Communicator;
using S = double;
namespace fs = std::filesystem;

constexpr Index kDim = 8, kExperts = 49, kBatch = 24;  // the global batch: a multiple of every rank count used

peer::PeerConfig layer_config() {
  peer::PeerConfig c;
  c.model_dim = kDim;
  c.num_experts = kExperts;
  c.num_heads = 2;
  c.key_dim = 8;
  c.top_k = 3;
  c.sub_key_top_k = 3;
  c.query_norm = peer::QueryNorm::kLayerNorm;
  return c;
}

// One rank's part of a sharded training run.
struct Run {
  Communicator comm;
  peer::mpi::ShardedPeerLayer<S> layer;
  peer::Parameters<S> params;
  peer::Gradients<S> grads;
  peer::Adam<S> adam;
  peer::mpi::DataParallel<S> dp;
  peer::mpi::ShardedPeerLayer<S>::Cache cache;
  std::int64_t step = 0;

  Run(const Communicator& c, std::uint64_t seed)
      : comm(c),
        layer(peer::mpi::make_sharded_peer_layer<S>(layer_config(), c)),
        params(layer.make_parameters(seed)),
        grads(layer.make_gradients()),
        adam(layer.layout(), peer::default_param_groups(1e-2, peer::LrSchedule::constant(), 3e-2), peer::AdamConfig::adamw()),
        dp(c, layer.layout(), {"experts"}) {}

  peer::ShardedCheckpoint registrations() {
    peer::ShardedCheckpoint ckpt(comm.rank(), comm.size());
    ckpt.shard_table("experts", kExperts);
    ckpt.add_config("peer", layer_config().to_fields());
    ckpt.add_parameters("peer", params);
    ckpt.add_optimizer("adam", adam);
    ckpt.add_counter("step", &step);
    return ckpt;
  }

  // Steps on the global batch of each step (seeded by the step), this rank's slice of it.
  void train(int steps) {
    const int p = comm.size(), me = comm.rank();
    const Index local = kBatch / p;
    for (int i = 0; i < steps; ++i) {
      ++step;
      const Mat<S> global = random_matrix<S>(kBatch, kDim, 7000 + static_cast<std::uint64_t>(step));
      const Mat<S> x = global.middleRows(me * local, local);
      Mat<S> y(local, kDim), none;
      layer.forward(params, x, y, cache, peer::Mode::kTrain);
      grads.zero();
      layer.backward(params, cache, Mat<S>((y - x) / static_cast<S>(kBatch)), none, grads);
      dp.all_reduce(grads);
      dp.clip_gradient_norm(grads, 0.05);
      adam.step(params, grads);
    }
  }

  // Every byte of the state this rank holds.
  std::vector<unsigned char> state() {
    std::vector<unsigned char> out = bytes_of(params);
    for (const auto& s : adam.state_tensors()) {
      const auto* b = reinterpret_cast<const unsigned char*>(s.data);
      out.insert(out.end(), b, b + s.rows * s.cols * static_cast<Index>(sizeof(S)));
    }
    for (const auto& c : adam.state_counters()) {
      const auto* b = reinterpret_cast<const unsigned char*>(c.data);
      out.insert(out.end(), b, b + c.size * 8);
    }
    const auto* b = reinterpret_cast<const unsigned char*>(&step);
    out.insert(out.end(), b, b + 8);
    return out;
  }

  // Collective: the whole sharded state in global row order (table, then per-row optimizer state, each
  // [N, cols]) and the replicated state of rank 0 (dense parameters, dense moments, counters not per row).
  std::pair<std::vector<double>, std::vector<double>> gathered() {
    std::vector<double> sharded, replicated(params.dense_data(), params.dense_data() + params.layout().dense_size());
    auto add_rows = [&](const double* local, Index rows, Index cols) {
      std::vector<double> mine(local, local + rows * cols), all;
      std::vector<int> counts, offsets;
      comm.all_gather_v(mine, all, counts, offsets);
      std::vector<double> global(static_cast<std::size_t>(kExperts * cols));
      for (int r = 0; r < comm.size(); ++r) {
        for (Index l = 0; l < counts[static_cast<std::size_t>(r)] / cols; ++l) {
          for (Index j = 0; j < cols; ++j) {
            global[static_cast<std::size_t>((l * comm.size() + r) * cols + j)] = all[static_cast<std::size_t>(offsets[static_cast<std::size_t>(r)] + l * cols + j)];
          }
        }
      }
      sharded.insert(sharded.end(), global.begin(), global.end());
    };
    const auto& table = params.table(peer::TableHandle{0});
    add_rows(table.data(), table.rows(), table.cols());
    for (const auto& s : adam.state_tensors()) {
      if (s.per_row) add_rows(s.data, s.rows, s.cols);
      else replicated.insert(replicated.end(), s.data, s.data + s.rows * s.cols);
    }
    for (const auto& c : adam.state_counters()) {
      std::vector<double> as_double(c.data, c.data + c.size);
      if (c.per_row) add_rows(as_double.data(), c.size, 1);
      else replicated.insert(replicated.end(), as_double.begin(), as_double.end());
    }
    replicated.push_back(static_cast<double>(step));
    return {sharded, replicated};
  }
};

// A sub-communicator of the first q ranks of `world` (MPI_COMM_NULL on the others).
MPI_Comm first_ranks(const Communicator& world, int q) {
  MPI_Comm sub = MPI_COMM_NULL;
  peer::mpi::check(MPI_Comm_split(world.comm(), world.rank() < q ? 0 : MPI_UNDEFINED, world.rank(), &sub), "MPI_Comm_split");
  return sub;
}

void resumes_at_every_rank_count(const Communicator& world, const std::string& dir) {
  const int p = world.size();
  const std::string path = dir + "/run.ckpt";
  Run run(world, 11);
  run.train(2);
  peer::mpi::save_sharded_checkpoint(world, run.registrations(), path);
  const auto saved = run.gathered();
  run.train(2);
  const auto reference = run.gathered();

  // The same rank count: bitwise.
  Run resumed(world, 99);
  check(resumed.state() != run.state(), "a fresh run must start elsewhere");
  peer::mpi::load_sharded_checkpoint(world, resumed.registrations(), path);
  check(resumed.gathered() == saved, "the state loaded at the same rank count differs from the saved one");
  resumed.train(2);
  check(resumed.state() == run.state(), "two steps after resuming at the same rank count differ from the uninterrupted run");

  // Fewer ranks: every row from its global id; two steps to the reassociation bound.
  for (int q : {p / 2, 1}) {
    if (q < 1 || q == p) continue;
    MPI_Comm sub = first_ranks(world, q);
    if (sub != MPI_COMM_NULL) {
      const Communicator comm(sub);
      Run small(comm, 5);
      peer::mpi::load_sharded_checkpoint(comm, small.registrations(), path);
      check(small.gathered() == saved, "the state loaded at " + std::to_string(q) + " ranks differs from the one saved at " + std::to_string(p));
      small.train(2);
      const auto after = small.gathered();
      double worst = 0;
      for (std::size_t i = 0; i < after.first.size(); ++i) worst = std::max(worst, std::abs(after.first[i] - reference.first[i]));
      for (std::size_t i = 0; i < after.second.size(); ++i) worst = std::max(worst, std::abs(after.second[i] - reference.second[i]));
      check(worst <= 1e-12, "two steps at " + std::to_string(q) + " ranks after the load differ from " + std::to_string(p) + " ranks' by " +
                                std::to_string(worst));
      check(after.first != saved.first, "the steps after the load must change the table");
      MPI_Comm_free(&sub);
    }
    world.barrier();
  }
}

void failures_are_everyones(const Communicator& world, const std::string& dir) {
  const int p = world.size(), last = p - 1;
  const std::string a = dir + "/a.ckpt", b = dir + "/b.ckpt";
  Run run(world, 3);
  run.train(1);
  peer::mpi::save_sharded_checkpoint(world, run.registrations(), a);
  peer::mpi::save_sharded_checkpoint(world, run.registrations(), b);
  // The last rank's file from another save: only that rank reads it, every rank throws.
  if (world.rank() == 0) fs::copy_file(peer::ShardedCheckpoint::shard_path(b, last, p), peer::ShardedCheckpoint::shard_path(a, last, p), fs::copy_options::overwrite_existing);
  world.barrier();
  Run fresh(world, 4);
  const auto before = fresh.state();
  // (One collective call on every rank: the others' message names the rank that failed.)
  expect_error_everywhere<std::runtime_error>(world.rank() == last ? std::string("a shard of another save")
                                                                   : "rank " + std::to_string(last) + " failed: checkpoint " +
                                                                         peer::ShardedCheckpoint::shard_path(a, last, p) + ": a shard of another save",
                                              [&] { peer::mpi::load_sharded_checkpoint(world, fresh.registrations(), a); });
  check(fresh.state() == before, "a refused load wrote a rank's model");
  // A save that fails on the last rank only (its file's place is taken by a directory): every rank
  // throws and no index is written.
  const std::string c = dir + "/c.ckpt";
  if (world.rank() == 0) fs::create_directories(peer::ShardedCheckpoint::shard_path(c, last, p));
  world.barrier();
  expect_error_everywhere<std::runtime_error>("shard-" + std::to_string(last) + "-of-" + std::to_string(p),
                                              [&] { peer::mpi::save_sharded_checkpoint(world, run.registrations(), c); });
  check(!fs::exists(c), "a failed save wrote the index");
  // A checkpoint object built for another place.
  expect_error_everywhere<std::runtime_error>("build it as ShardedCheckpoint(comm.rank(), comm.size())", [&] {
    peer::ShardedCheckpoint wrong(0, 1);
    peer::mpi::save_sharded_checkpoint(world, wrong, dir + "/d.ckpt");
  });
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [&]() -> int {
    const Communicator comm;
    rank_ = comm.rank();
    // One directory for the job: rank 0's process id names it.
    std::int64_t pid = comm.rank() == 0 ? static_cast<std::int64_t>(::getpid()) : 0;
    pid = comm.max(pid);
    const std::string dir = (fs::temp_directory_path() / ("peer_mpi_ckpt_" + std::to_string(pid))).string();
    if (comm.rank() == 0) fs::create_directories(dir);
    comm.barrier();
    resumes_at_every_rank_count(comm, dir);
    failures_are_everyones(comm, dir);
    comm.barrier();
    if (comm.rank() == 0) fs::remove_all(dir);
    return finish(comm, "sharded checkpoint checks");
  });
  MPI_Finalize();
  return code;
}
