// Data-parallel training over MPI (peer/mpi/data_parallel.hpp), run by ctest under
// mpirun --oversubscribe -np 2 and -np 4 on loopback:
// - a data-parallel step equals, bitwise, one process accumulating the same micro-batches in rank order
//   (float and double; PEER with batch-normed queries and a lazy-Adam table, clipped), for 3 steps;
// - with layer-normed queries it equals one process on the concatenated batch to the reassociation bound
//   (double);
// - the table gradient travels as (ids, rows): the bytes sent are counted, never N x D;
// - a configuration or layout that differs on one rank, and fused table updates, fail with one message on
//   every rank; replicas that drift apart are detected.
// `test_mpi --abort-on-rank R` instead throws on rank R while the others wait in a collective: run_or_abort
// must end every rank with the message (ctest checks the message and the timeout).
//
// Not GoogleTest: a failed check must not change which collectives a rank enters, so checks only count,
// and the ranks agree on the count at the end (mpi_check.hpp).

#include <peer/mpi/data_parallel.hpp>
#include <peer/peer.hpp>

#include "mpi_check.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace peer_mpi_test;

peer::PeerConfig config(peer::QueryNorm norm) {
  peer::PeerConfig c;
  c.model_dim = 8;
  c.num_experts = 36;
  c.num_heads = 2;
  c.key_dim = 8;
  c.top_k = 3;
  c.sub_key_top_k = 3;
  c.query_norm = norm;
  return c;
}

std::vector<peer::ParamGroup> groups() {
  return peer::default_param_groups(1e-2, peer::LrSchedule::constant(), 3e-2);
}

constexpr Index kTokens = 10;  // per rank (micro-batch)

// Micro-batch r of step s: inputs and targets, the same on every rank.
template <typename S>
Mat<S> batch(int step, int r) {
  return random_matrix<S>(kTokens, 8, static_cast<std::uint64_t>(1000 * step + r));
}

// Bitwise: P ranks data-parallel == one process accumulating the P micro-batches in rank order.
template <typename S>
void data_parallel_equals_accumulation(const peer::mpi::Communicator& comm, const char* name) {
  const int p = comm.size();
  const peer::PeerLayer<S> layer(config(peer::QueryNorm::kBatchNorm));
  const S scale = S(1) / static_cast<S>(kTokens * p);  // the loss is a mean over the global batch
  // Data parallel: this rank's micro-batch.
  auto params = layer.make_parameters(5);
  auto grads = layer.make_gradients();
  peer::Adam<S> adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  peer::mpi::DataParallel<S> dp(comm, layer.layout());
  typename peer::PeerLayer<S>::Cache cache;
  Mat<S> y(kTokens, 8), none;
  // The reference, on every rank: one process, the P micro-batches accumulated in rank order.
  auto ref = layer.make_parameters(5);
  auto ref_grads = layer.make_gradients();
  peer::Adam<S> ref_adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  std::int64_t sent = 0, rows = 0;
  for (int step = 1; step <= 3; ++step) {
    const Mat<S> x = batch<S>(step, comm.rank());
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    grads.zero();
    layer.backward(params, cache, Mat<S>((y - x) * scale), none, grads);
    dp.all_reduce(grads);
    peer::clip_gradient_norm(grads, 1.0);
    adam.step(params, grads);
    dp.broadcast_buffers(params);  // rank 0's running statistics, as DDP does
    sent += dp.last_traffic().table_bytes;
    rows += dp.last_traffic().table_rows;

    ref_grads.zero();
    std::vector<S> buffers_after_first;
    for (int r = 0; r < p; ++r) {
      const Mat<S> xr = batch<S>(step, r);
      layer.forward(ref, xr, y, cache, peer::Mode::kTrain);
      if (r == 0) buffers_after_first.assign(ref.buffer_data(), ref.buffer_data() + ref.layout().buffer_size());
      layer.backward(ref, cache, Mat<S>((y - xr) * scale), none, ref_grads);
    }
    std::copy(buffers_after_first.begin(), buffers_after_first.end(), ref.buffer_data());
    peer::clip_gradient_norm(ref_grads, 1.0);
    ref_adam.step(ref, ref_grads);
  }
  check(bytes_of(params) == bytes_of(ref), std::string(name) + ": data-parallel parameters differ from the accumulated reference");
  dp.require_identical(params);  // and every replica is the same
  // The table gradient went as (ids, rows): (P - 1) copies of this rank's rows and ids, far below N x D.
  const std::int64_t expected = (p - 1) * rows * static_cast<std::int64_t>(sizeof(peer::ExpertId) + 16 * sizeof(S));
  check(sent == expected, std::string(name) + ": table bytes sent " + std::to_string(sent) + " vs " + std::to_string(expected));
  check(rows > 0 && rows <= 3 * kTokens * 2 * 3, std::string(name) + ": rows sent " + std::to_string(rows));
}

// Against one process on the concatenated batch (no batch statistics: layer-normed queries), in double.
void data_parallel_matches_one_large_batch(const peer::mpi::Communicator& comm) {
  using S = double;
  const int p = comm.size();
  const peer::PeerLayer<S> layer(config(peer::QueryNorm::kLayerNorm));
  auto params = layer.make_parameters(8);
  auto grads = layer.make_gradients();
  peer::mpi::DataParallel<S> dp(comm, layer.layout());
  typename peer::PeerLayer<S>::Cache cache;
  Mat<S> y(kTokens, 8), none;
  const Mat<S> x = batch<S>(7, comm.rank());
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  grads.zero();
  layer.backward(params, cache, Mat<S>(y - x), none, grads);
  dp.all_reduce(grads);

  Mat<S> all(kTokens * p, 8), yall(kTokens * p, 8);
  for (int r = 0; r < p; ++r) all.middleRows(r * kTokens, kTokens) = batch<S>(7, r);
  auto ref_grads = layer.make_gradients();
  layer.forward(params, all, yall, cache, peer::Mode::kTrain);
  ref_grads.zero();
  layer.backward(params, cache, Mat<S>(yall - all), none, ref_grads);
  double worst = 0, scale = 0;
  for (Index i = 0; i < layer.layout().dense_size(); ++i) {
    worst = std::max(worst, std::abs(grads.dense_data()[i] - ref_grads.dense_data()[i]));
    scale = std::max(scale, std::abs(ref_grads.dense_data()[i]));
  }
  const auto& t = grads.table(peer::TableHandle{0});
  const auto& rt = ref_grads.table(peer::TableHandle{0});
  check(t.ids() == rt.ids(), "one large batch: the table gradient holds other rows");
  if (t.ids() == rt.ids()) {
    for (Index r = 0; r < t.size(); ++r) {
      for (Index c = 0; c < t.cols(); ++c) {
        worst = std::max(worst, std::abs(t.values()(r, c) - rt.values()(r, c)));
        scale = std::max(scale, std::abs(rt.values()(r, c)));
      }
    }
  }
  check(worst <= 1e-13 * std::max(1.0, scale), "one large batch: gradients differ by " + std::to_string(worst));
}

void refusals(const peer::mpi::Communicator& comm) {
  const int last = comm.size() - 1;
  // A configuration that differs on the last rank: every rank throws the same message.
  peer::PeerConfig c = config(peer::QueryNorm::kBatchNorm);
  if (comm.rank() == last) c.top_k = 2;
  expect_error_everywhere<std::invalid_argument>("rank " + std::to_string(last) + " has 'top_k = 2'", [&] {
    peer::mpi::require_same(comm, "PeerConfig", peer::mpi::fields_text(c.to_fields()));
  });
  // A layout that differs (another pool size on the last rank).
  peer::PeerConfig c2 = config(peer::QueryNorm::kBatchNorm);
  if (comm.rank() == last) c2.num_experts = 49;
  const peer::PeerLayer<float> layer(c2);
  expect_error_everywhere<std::invalid_argument>("the parameter layout differs between ranks", [&] {
    peer::mpi::DataParallel<float> dp(comm, layer.layout());
  });
  // Fused table updates on one rank only: refused on every rank.
  const peer::PeerLayer<float> same(config(peer::QueryNorm::kBatchNorm));
  auto params = same.make_parameters(1);
  auto grads = same.make_gradients();
  peer::Adam<float> adam(same.layout(), groups());
  if (comm.rank() == last) adam.fuse_table_updates(params, grads);
  peer::mpi::DataParallel<float> dp(comm, same.layout());
  expect_error_everywhere<std::logic_error>("fused", [&] { dp.all_reduce(grads); });
  adam.unfuse_table_updates();
  // Replicas that drifted apart (one entry on the last rank) are detected on every rank.
  if (comm.rank() == last) params.dense_data()[3] += 1.0f;
  expect_error_everywhere<peer::mpi::Error>("query.weight", [&] { dp.require_identical(params); });
  dp.broadcast(params);  // rank 0's parameters everywhere again
  dp.require_identical(params);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [&]() -> int {
    const peer::mpi::Communicator comm;
    rank_ = comm.rank();
    if (argc == 3 && std::string(argv[1]) == "--abort-on-rank") {
      if (comm.rank() == std::atoi(argv[2])) throw std::runtime_error("this rank's input is broken (a deliberate failure)");
      comm.barrier();  // the other ranks wait here for the rank that threw: only MPI_Abort ends them
      std::fprintf(stderr, "rank %d passed the barrier: run_or_abort did not end the job\n", comm.rank());
      return 3;
    }
    if (comm.size() < 2) throw std::invalid_argument("test_mpi needs at least 2 ranks (mpirun -np 2)");
    data_parallel_equals_accumulation<float>(comm, "float");
    data_parallel_equals_accumulation<double>(comm, "double");
    data_parallel_matches_one_large_batch(comm);
    refusals(comm);
    return finish(comm, "data-parallel checks");
  });
  MPI_Finalize();
  return code;
}
