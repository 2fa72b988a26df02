// Expert-sharded PEER over MPI (peer/mpi/expert_sharded.hpp), run by ctest under mpirun -np 1, 2 and 4 on
// loopback. Every rank builds every rank's batch (seeded by rank), so each can compute the one-process
// reference on the concatenated batch itself:
// - the pool's shard holds exactly the whole pool's rows it owns (i mod P), initialized alike;
// - forward and backward of the sharded pool against one process: z, the gate gradients and the table
//   gradient's rows bitwise; y and dx to the reassociation bound (bitwise for a token whose experts all live
//   on one rank, and everywhere with one rank); the bytes sent counted exactly from the pairs;
// - three clipped AdamW steps (lazy Adam on the table) of a sharded PEER layer against one process on the
//   concatenated batch (double, layer-normed queries);
// - invalid ids on one rank, a configuration that differs, an unknown sharded table: an error on every
//   rank, and the next call works.

#include <peer/mpi/data_parallel.hpp>
#include <peer/mpi/expert_sharded.hpp>
#include <peer/peer.hpp>

#include "mpi_check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

using namespace peer_mpi_test;
using peer::mpi::Communicator;

constexpr Index kDim = 8;
Index tokens_of(int r) { return 6 + 3 * r; }
Index first_token(int r) {
  Index t = 0;
  for (int q = 0; q < r; ++q) t += tokens_of(q);
  return t;
}

// Rank r's routing for a pool of n experts over p ranks: random ids, except that token 0's all live on
// rank r mod p (a token served by one owner only).
peer::IdMatrix ids_of(int r, Index slots, Index n, int p) {
  const Mat<double> u = random_matrix<double>(tokens_of(r), slots, 500 + static_cast<std::uint64_t>(r));
  peer::IdMatrix ids(tokens_of(r), slots);
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index s = 0; s < slots; ++s) {
      const auto v = static_cast<Index>(std::floor(std::abs(u(t, s)) * 1000.0));
      ids(t, s) = static_cast<peer::ExpertId>(t == 0 ? ((v % (n / p)) * p + r % p) : v % n);
    }
  }
  ids(1, 1) = ids(1, 0);  // an expert twice in one token
  return ids;
}

template <typename S>
Mat<S> concat(int p, Index cols, const std::function<Mat<S>(int)>& part) {
  Mat<S> all(first_token(p), cols);
  for (int r = 0; r < p; ++r) all.middleRows(first_token(r), tokens_of(r)) = part(r);
  return all;
}

template <typename S>
double max_abs(const Mat<S>& m) {
  return m.size() == 0 ? 0.0 : static_cast<double>(m.cwiseAbs().maxCoeff());
}

template <typename S>
void pool_matches_one_process(const Communicator& comm, const char* name, double tolerance) {
  const int p = comm.size(), me = comm.rank();
  const Index n = 37, slots = 5;  // 37 rows: not a multiple of 2 or 4, so the shards differ in size
  const peer::ExpertPoolConfig pool{n, kDim, peer::Activation::kGelu, peer::TableStorage::kNative};
  peer::mpi::ShardedExperts<S> sharded(pool, comm);
  peer::SingleNeuronExperts<S> whole(pool);
  peer::ParameterLayout sl(sizeof(S)), wl(sizeof(S));
  sharded.register_parameters(sl, "experts");
  whole.register_parameters(wl, "experts");
  peer::Parameters<S> sp(sl), wp(wl);
  sharded.initialize(sp, 3);
  whole.initialize(wp, 3);
  const std::string what = std::string(name) + ": ";
  const Index local = sharded.shards().rows_of(me);
  check(sl.tables()[0].rows == local && local == (n - me + p - 1) / p, what + "the shard's rows");
  const auto& st = sp.table(peer::TableHandle{0});
  const auto& wt = wp.table(peer::TableHandle{0});
  bool same_rows = true;
  for (Index l = 0; l < local; ++l) {
    same_rows = same_rows && std::memcmp(st.row(l), wt.row(l * p + me), static_cast<std::size_t>(2 * kDim) * sizeof(S)) == 0;
  }
  check(same_rows, what + "the shard's initial rows differ from the whole pool's");

  auto x_of = [&](int r) { return random_matrix<S>(tokens_of(r), kDim, 100 + static_cast<std::uint64_t>(r)); };
  auto g_of = [&](int r) { return random_matrix<S>(tokens_of(r), slots, 200 + static_cast<std::uint64_t>(r)); };
  auto dy_of = [&](int r) { return random_matrix<S>(tokens_of(r), kDim, 300 + static_cast<std::uint64_t>(r)); };
  const Mat<S> x = x_of(me), g = g_of(me), dy = dy_of(me);
  const peer::IdMatrix ids = ids_of(me, slots, n, p);
  // The reference: one process, the ranks' batches concatenated in rank order.
  const Mat<S> xa = concat<S>(p, kDim, x_of), ga = concat<S>(p, slots, g_of), dya = concat<S>(p, kDim, dy_of);
  peer::IdMatrix idsa(first_token(p), slots);
  for (int r = 0; r < p; ++r) idsa.middleRows(first_token(r), tokens_of(r)) = ids_of(r, slots, n, p);
  Mat<S> ya(xa.rows(), kDim), za(xa.rows(), slots), dxa = Mat<S>::Zero(xa.rows(), kDim), dga(xa.rows(), slots);
  peer::Gradients<S> wgrads(wl);
  typename peer::SingleNeuronExperts<S>::Workspace wws;
  whole.forward(wp, xa, idsa, ga, ya, za);
  whole.backward(wp, xa, idsa, ga, za, dya, dxa, dga, wgrads, wws);

  Mat<S> y(x.rows(), kDim), z(x.rows(), slots), dx = Mat<S>::Zero(x.rows(), kDim), dg(x.rows(), slots);
  peer::Gradients<S> sgrads(sl);
  typename peer::mpi::ShardedExperts<S>::Workspace sws;
  sharded.forward(sp, x, ids, g, y, z);
  sharded.backward(sp, x, ids, g, z, dy, dx, dg, sgrads, sws);

  const Index t0 = first_token(me), b = tokens_of(me);
  check(z == za.middleRows(t0, b), what + "z differs from one process (must be bitwise)");
  check(dg == dga.middleRows(t0, b), what + "the gate gradients differ from one process (must be bitwise)");
  const double ey = max_abs<S>(Mat<S>(y - ya.middleRows(t0, b))), edx = max_abs<S>(Mat<S>(dx - dxa.middleRows(t0, b)));
  check(ey <= tolerance * std::max(1.0, max_abs(ya)), what + "y differs by " + std::to_string(ey));
  check(edx <= tolerance * std::max(1.0, max_abs(dxa)), what + "dx differs by " + std::to_string(edx));
  check(y.row(0) == ya.row(t0) && dx.row(0) == dxa.row(t0), what + "a token served by one owner must match bitwise");
  if (p == 1) check(y == ya && dx == dxa, what + "one rank must match bitwise");
  // The table gradient: exactly the whole gradient's rows this rank owns, bitwise.
  const auto& sg = sgrads.table(peer::TableHandle{0});
  const auto& wg = wgrads.table(peer::TableHandle{0});
  std::vector<peer::ExpertId> mine;
  for (const peer::ExpertId id : wg.ids()) {
    if (id % p == me) mine.push_back(id);
  }
  std::vector<peer::ExpertId> got;
  for (const peer::ExpertId l : sg.ids()) got.push_back(static_cast<peer::ExpertId>(l * p + me));
  check(got == mine, what + "the shard's gradient holds other rows than the whole gradient's own");
  bool same_grad = got == mine;
  for (std::size_t i = 0; same_grad && i < got.size(); ++i) {
    same_grad = std::memcmp(sg.find(sg.ids()[i]), wg.find(got[i]), static_cast<std::size_t>(2 * kDim) * sizeof(S)) == 0;
  }
  check(same_grad, what + "the shard's gradient rows differ from one process (must be bitwise)");

  // Bytes sent, from the pairs: requests (c + 1 ints, and D + c scalars forward, 2 D + 2 c backward) for
  // this rank's pairs with other owners; replies (D + c scalars) for other ranks' pairs with this owner.
  std::int64_t fwd = 0, bwd = 0, pairs = 0;
  for (int r = 0; r < p; ++r) {
    const peer::IdMatrix ri = ids_of(r, slots, n, p);
    for (Index t = 0; t < ri.rows(); ++t) {
      for (int o = 0; o < p; ++o) {
        std::int64_t c = 0;
        for (Index s = 0; s < slots; ++s) c += ri(t, s) % p == o ? 1 : 0;
        if (c == 0) continue;
        if (r == me) ++pairs;
        if (r == o) continue;
        const auto sb = static_cast<std::int64_t>(sizeof(S)), ib = static_cast<std::int64_t>(sizeof(peer::ExpertId));
        if (r == me) {
          fwd += (1 + c) * ib + (kDim + c) * sb;
          bwd += (1 + c) * ib + (2 * kDim + 2 * c) * sb;
        }
        if (o == me) {
          fwd += (kDim + c) * sb;
          bwd += (kDim + c) * sb;
        }
      }
    }
  }
  check(sharded.last_forward_traffic().pairs == pairs, what + "pairs " + std::to_string(sharded.last_forward_traffic().pairs));
  check(sharded.last_forward_traffic().bytes_sent == fwd,
        what + "forward bytes " + std::to_string(sharded.last_forward_traffic().bytes_sent) + " vs " + std::to_string(fwd));
  check(sharded.last_backward_traffic().bytes_sent == bwd,
        what + "backward bytes " + std::to_string(sharded.last_backward_traffic().bytes_sent) + " vs " + std::to_string(bwd));

  // Invalid ids on the last rank: refused on every rank, before any exchange; the next call works.
  peer::IdMatrix bad = ids;
  if (me == p - 1) bad(0, 0) = static_cast<peer::ExpertId>(n);
  Mat<S> y2(x.rows(), kDim), z2(x.rows(), slots);
  expect_error_everywhere<std::invalid_argument>(me == p - 1 ? "ids[0, 0] = 37" : "rank " + std::to_string(p - 1) + " refused its input",
                                                 [&] { sharded.forward(sp, x, bad, g, y2, z2); });
  sharded.forward(sp, x, ids, g, y2, z2);
  check(y2 == y && z2 == z, what + "a forward after a refused one differs");
  // A rank without tokens takes part and gets nothing.
  Mat<S> none(0, kDim), none_z(0, slots);
  if (me == 0) {
    sharded.forward(sp, none, peer::IdMatrix(0, slots), Mat<S>(0, slots), none, none_z);
  } else {
    sharded.forward(sp, x, ids, g, y2, z2);
    check(y2 == y, what + "a forward beside a rank without tokens differs");
  }
}

peer::PeerConfig layer_config() {
  peer::PeerConfig c;
  c.model_dim = kDim;
  c.num_experts = 49;
  c.num_heads = 2;
  c.key_dim = 8;
  c.top_k = 3;
  c.sub_key_top_k = 3;
  c.query_norm = peer::QueryNorm::kLayerNorm;  // no batch statistics: one process is the exact reference
  return c;
}

// Three clipped AdamW steps, lazy Adam on the table: the sharded layer against one process on the
// concatenated batch (double; each step's loss is a mean over the global batch).
void steps_match_one_process(const Communicator& comm) {
  using S = double;
  const int p = comm.size(), me = comm.rank();
  const peer::PeerConfig c = layer_config();
  const auto groups = peer::default_param_groups(1e-2, peer::LrSchedule::constant(), 3e-2);
  const auto layer = peer::mpi::make_sharded_peer_layer<S>(c, comm);
  auto params = layer.make_parameters(11);
  auto grads = layer.make_gradients();
  peer::Adam<S> adam(layer.layout(), groups, peer::AdamConfig::adamw());
  peer::mpi::DataParallel<S> dp(comm, layer.layout(), {"experts"});
  typename peer::mpi::ShardedPeerLayer<S>::Cache cache;

  const peer::PeerLayer<S> whole(c);
  auto ref = whole.make_parameters(11);
  auto ref_grads = whole.make_gradients();
  peer::Adam<S> ref_adam(whole.layout(), groups, peer::AdamConfig::adamw());
  typename peer::PeerLayer<S>::Cache ref_cache;
  check(params.layout().dense_size() == ref.layout().dense_size() &&
            std::memcmp(params.dense_data(), ref.dense_data(), static_cast<std::size_t>(ref.layout().dense_size()) * sizeof(S)) == 0,
        "the replicated tensors must start as the whole layer's");
  const S scale = S(1) / static_cast<S>(first_token(p));
  double norm_error = 0;
  for (int step = 1; step <= 3; ++step) {
    auto x_of = [&](int r) { return random_matrix<S>(tokens_of(r), kDim, 1000 * static_cast<std::uint64_t>(step) + static_cast<std::uint64_t>(r)); };
    const Mat<S> x = x_of(me);
    Mat<S> y(x.rows(), kDim), none;
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    grads.zero();
    layer.backward(params, cache, Mat<S>((y - x) * scale), none, grads);
    dp.all_reduce(grads);
    const double norm = dp.clip_gradient_norm(grads, 0.05);
    adam.step(params, grads);

    const Mat<S> xa = concat<S>(p, kDim, x_of);
    Mat<S> ya(xa.rows(), kDim);
    whole.forward(ref, xa, ya, ref_cache, peer::Mode::kTrain);
    ref_grads.zero();
    whole.backward(ref, ref_cache, Mat<S>((ya - xa) * scale), none, ref_grads);
    const double ref_norm = peer::clip_gradient_norm(ref_grads, 0.05);
    ref_adam.step(ref, ref_grads);
    norm_error = std::max(norm_error, std::abs(norm - ref_norm) / ref_norm);
    check(ref_norm > 0.05, "the clip must act in this test");
  }
  check(norm_error <= 1e-13, "the sharded global norm differs by " + std::to_string(norm_error) + " (relative)");
  double worst = 0;
  for (Index i = 0; i < params.layout().dense_size(); ++i) worst = std::max(worst, std::abs(params.dense_data()[i] - ref.dense_data()[i]));
  const auto& st = params.table(peer::TableHandle{0});
  const auto& wt = ref.table(peer::TableHandle{0});
  for (Index l = 0; l < st.rows(); ++l) {
    for (Index j = 0; j < st.cols(); ++j) worst = std::max(worst, std::abs(st.row(l)[j] - wt.row(l * p + me)[j]));
  }
  check(worst <= 1e-12, "sharded steps differ from one process by " + std::to_string(worst));
  dp.require_identical(params);  // the replicated tensors stay identical on every rank
}

void refusals(const Communicator& comm) {
  const int last = comm.size() - 1;
  peer::PeerConfig c = layer_config();
  if (last > 0 && comm.rank() == last) c.top_k = 2;
  if (last > 0) {
    expect_error_everywhere<std::invalid_argument>("rank " + std::to_string(last) + " has 'top_k = 2'",
                                                   [&] { (void)peer::mpi::make_sharded_peer_layer<float>(c, comm); });
  }
  const auto layer = peer::mpi::make_sharded_peer_layer<float>(layer_config(), comm);
  expect_error_everywhere<std::invalid_argument>("must name a table of the layout",
                                                 [&] { peer::mpi::DataParallel<float> dp(comm, layer.layout(), {"expert"}); });
  // Without naming the table as sharded, shards of different sizes are a layout that differs.
  if ((49 % comm.size()) != 0) {
    expect_error_everywhere<std::invalid_argument>("the parameter layout differs between ranks",
                                                   [&] { peer::mpi::DataParallel<float> dp(comm, layer.layout()); });
  }
  expect_error_everywhere<std::invalid_argument>("must be >= the number of ranks", [&] {
    peer::mpi::ShardedExperts<float> pool(peer::ExpertPoolConfig{comm.size() - 1, 4, peer::Activation::kGelu, peer::TableStorage::kNative}, comm);
  });
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [&]() -> int {
    const Communicator comm;
    rank_ = comm.rank();
    pool_matches_one_process<float>(comm, "float", 1e-5);
    pool_matches_one_process<double>(comm, "double", 1e-13);
    steps_match_one_process(comm);
    refusals(comm);
    return finish(comm, "expert-sharded checks");
  });
  MPI_Finalize();
  return code;
}
