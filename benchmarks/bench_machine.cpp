// The machine's limits for the PEER kernels, measured in the same run as everything else, so the other
// benchmarks can be stated as fractions of them (scripts/bench_report.py does):
//
// - fp32 GEMM at the layer's shapes: the query projection [B, D] x [D, H Dk] (B = 1024, D = Dk, H = 8)
//   and one sub-key scoring tile [T H, Dk / 2] x [Dk / 2, n] (T = 16 tokens, so 128 rows; n = 1024),
//   each as the library runs it (peer::detail::gemm, single-threaded, inside parallel_for over fixed row
//   blocks) next to plain Eigen `c.noalias() += a * b` over the same blocks, and for the query
//   projection also Eigen's own product over the whole matrix (Eigen threads it itself); the sub-key tile
//   also in bf16 as SubKeyScoring::kBFloat16Checked scores it (VDPBF16PS, and AMX tiles where built in);
// - random row gathers from a [N, 2D] table far larger than the cache (N = 1024^2: 2 GiB at D = 256,
//   4 GiB at D = 512), B H k = 1024 x 8 x 16 rows summed per token, with and without the kernels'
//   software prefetch two rows ahead;
// - a sequential read of 1 GiB, for reference.
//
// Every case runs on 1 and 2 threads (the last argument), wall-clock time.
#include <algorithm>
#include <cstring>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr long kTokens = 1024;   // B
constexpr long kHeads = 8;       // H
constexpr long kTopK = 16;       // k
constexpr long kRowGrain = peer::Linear<float>::kRowGrain;  // the query projection's row block

// One large buffer at a time (the 4 GiB gather table must be gone before the next one is made). Made
// under the default thread count, so the first touch is spread over all threads.
peer::AlignedBuffer<float>& big_buffer(long size) {
  static peer::AlignedBuffer<float> buffer;
  if (buffer.size() != size) {
    buffer = peer::AlignedBuffer<float>();
    buffer = peer::AlignedBuffer<float>(size);  // zero-filled in parallel 2 MiB chunks
    float* data = buffer.data();
    // Cheap non-constant values, in parallel: the loads below must see real data.
    peer::parallel_for(size, long{1} << 20, [data](peer::Index begin, peer::Index end, int) {
      for (peer::Index i = begin; i < end; ++i) data[i] = static_cast<float>(i % 61) * (1.0f / 64) - 0.5f;
    });
  }
  return buffer;
}

enum class Gemm { kPeer, kEigen, kEigenWhole, kBf16Dot, kBf16Tiles };

// c += a b over row blocks of `grain` rows, the way the library calls its GEMMs.
template <typename A, typename B>
void blocked_gemm(Gemm kind, const A& a, const B& b, bench::Mat& c, long grain) {
  if (kind == Gemm::kEigenWhole) {
    c.noalias() += a * b;  // Eigen's own product; it threads large products itself with OpenMP
    return;
  }
  peer::parallel_for(a.rows(), grain, [&](peer::Index begin, peer::Index end, int) {
    auto rows = c.middleRows(begin, end - begin);
    if (kind == Gemm::kPeer) {
      peer::detail::gemm(a.middleRows(begin, end - begin), b, rows, 1.0f, peer::detail::GemmUpdate::kAccumulate);
    } else {
      rows.noalias() += a.middleRows(begin, end - begin) * b;
    }
  });
}

// Query projection q = x W^T: x [B, D], W [H Dk, D] (row-major, PyTorch's layout), Dk = D.
// args: D, threads
void run_gemm_query(benchmark::State& state, Gemm kind) {
  const long d = state.range(0), out = kHeads * d;
  const bench::Mat x = bench::random(kTokens, d, 1), w = bench::random(out, d, 2);
  bench::Mat y = bench::Mat::Zero(kTokens, out);
  bench::ThreadScope threads(state, state.range(1));
  for (auto _ : state) {
    blocked_gemm(kind, x, w.transpose(), y, kRowGrain);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  bench::set_rate(state, "tokens/s", static_cast<double>(kTokens));
  bench::set_rate(state, "GFLOP/s", 2e-9 * static_cast<double>(kTokens * d * out));
  state.counters["D"] = static_cast<double>(d);
}

void BM_GemmQuery_Peer(benchmark::State& state) { run_gemm_query(state, Gemm::kPeer); }
void BM_GemmQuery_Eigen(benchmark::State& state) { run_gemm_query(state, Gemm::kEigen); }
void BM_GemmQuery_EigenWhole(benchmark::State& state) { run_gemm_query(state, Gemm::kEigenWhole); }

// Sub-key scoring: B = 1024 tokens in tiles of T = 16 tokens (ProductKeyRetrieval::tile_tokens() for
// H = 8); each tile is one [T H, Dk / 2] x [Dk / 2, n] product with C [n, Dk / 2] row-major, written to
// the calling thread's scratch scores (as score_tile does). args: Dk, threads
void run_gemm_sub_keys(benchmark::State& state, Gemm kind) {
  const long dk = state.range(0), half = dk / 2, n = 1024, tile_rows = 16 * kHeads;
  const long tiles = kTokens / 16;
  const bench::Mat q = bench::random(tiles * tile_rows, half, 3), keys = bench::random(n, half, 4);
  bench::ThreadScope threads(state, state.range(1));
  std::vector<bench::Mat> scores(static_cast<std::size_t>(peer::parallel_threads()), bench::Mat::Zero(tile_rows, n));
  // kBf16*: the same products in bf16 (SubKeyScoring::kBFloat16Checked's approximate scores, operands
  // rounded once before timing), on VDPBF16PS alone or on AMX tiles where built in and granted.
  peer::detail::Bf16Queries bq;
  peer::detail::Bf16SubKeys bk;
  if (kind == Gemm::kBf16Dot || kind == Gemm::kBf16Tiles) {
    peer::detail::pack_bf16_sub_keys<float>(keys, 1, bk);
    bq.resize(q.rows(), half);
    for (long i = 0; i < q.rows(); ++i) bq.set_row(i, q.row(i).data(), half);
    state.SetLabel(kind == Gemm::kBf16Dot ? (peer::bf16_dot_instruction() ? "vdpbf16ps" : "widened to float")
                                          : (peer::detail::amx_scoring() ? "amx" : "no amx: vdpbf16ps or widened"));
  }
  for (auto _ : state) {
    peer::parallel_for(tiles, 1, [&](peer::Index t0, peer::Index, int thread) {
      bench::Mat& s = scores[static_cast<std::size_t>(thread)];
      const auto a = q.middleRows(t0 * tile_rows, tile_rows);
      if (kind == Gemm::kBf16Dot || kind == Gemm::kBf16Tiles) {
        peer::detail::bf16_score(bq, t0 * tile_rows, tile_rows, bk, 0, s.data(), n, kind == Gemm::kBf16Tiles);
      } else if (kind == Gemm::kPeer) {
        peer::detail::gemm(a, keys.transpose(), s, 1.0f, peer::detail::GemmUpdate::kAccumulate);
      } else {
        s.noalias() += a * keys.transpose();
      }
      benchmark::DoNotOptimize(s.data());
    });
    benchmark::ClobberMemory();
  }
  // One sub-key set: 2 H (Dk / 2) n FLOPs per token (score_tile runs two such products, one per half).
  bench::set_rate(state, "tokens/s", static_cast<double>(kTokens));
  bench::set_rate(state, "GFLOP/s", 2e-9 * static_cast<double>(kTokens * kHeads * half * n));
  state.counters["Dk"] = static_cast<double>(dk);
  state.counters["n"] = static_cast<double>(n);
}

void BM_GemmSubKeys_Peer(benchmark::State& state) { run_gemm_sub_keys(state, Gemm::kPeer); }
void BM_GemmSubKeys_Eigen(benchmark::State& state) { run_gemm_sub_keys(state, Gemm::kEigen); }
void BM_GemmSubKeys_Bf16Dot(benchmark::State& state) { run_gemm_sub_keys(state, Gemm::kBf16Dot); }
void BM_GemmSubKeys_Bf16Tiles(benchmark::State& state) { run_gemm_sub_keys(state, Gemm::kBf16Tiles); }

// Random row gather: B tokens x H k rows of [N, 2D], each token's rows summed into its output row (so
// every load is used), tokens in chunks of 16 as the expert kernels split them; the same fixed ids in
// every run. args: D, prefetch (0: none, 1: RowTable::prefetch two rows ahead), threads
void BM_Gather(benchmark::State& state) {
  const long d = state.range(0), n_rows = 1024L * 1024, cols = 2 * d, slots = kHeads * kTopK;
  const bool prefetch = state.range(1) != 0;
  const auto table = peer::RowTable<float>::view(big_buffer(n_rows * cols).data(), n_rows, cols);
  const peer::IdMatrix ids = bench::random_ids(kTokens, slots, n_rows, 5);
  bench::Mat out(kTokens, cols);
  bench::ThreadScope threads(state, state.range(2));
  constexpr long kPrefetchRows = 2;
  using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
  for (auto _ : state) {
    peer::parallel_for(kTokens, 16, [&](peer::Index t0, peer::Index t1, int) {
      for (peer::Index t = t0; t < t1; ++t) {
        auto acc = out.row(t);
        acc.setZero();
        for (peer::Index s = 0; s < slots; ++s) {
          if (prefetch && s + kPrefetchRows < slots) table.prefetch(ids(t, s + kPrefetchRows));
          acc += Eigen::Map<const RowVec>(table.row(ids(t, s)), cols);
        }
      }
    });
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double rows = static_cast<double>(kTokens * slots);
  const double row_bytes = static_cast<double>(cols) * sizeof(float);
  bench::set_rate(state, "rows/s", rows);
  bench::set_rate(state, "GB/s", rows * row_bytes * 1e-9);
  state.counters["D"] = static_cast<double>(d);
  state.counters["prefetch"] = prefetch ? 1.0 : 0.0;
}

// Sequential read: the sum of 1 GiB in 2 MiB chunks. args: threads
void BM_StreamRead(benchmark::State& state) {
  const long size = 1L << 28;  // floats: 1 GiB
  const float* data = big_buffer(size).data();
  const long chunk = 1L << 19;  // 2 MiB
  std::vector<float> partial(static_cast<std::size_t>(size / chunk));
  bench::ThreadScope threads(state, state.range(0));
  for (auto _ : state) {
    peer::parallel_for(size, chunk, [&](peer::Index begin, peer::Index end, int) {
      partial[static_cast<std::size_t>(begin / chunk)] = Eigen::Map<const Eigen::VectorXf>(data + begin, end - begin).sum();
    });
    benchmark::DoNotOptimize(partial.data());
    benchmark::ClobberMemory();
  }
  bench::set_rate(state, "GB/s", static_cast<double>(size) * sizeof(float) * 1e-9);
}

}  // namespace

BENCHMARK(BM_GemmQuery_Peer)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"D", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmQuery_Eigen)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"D", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmQuery_EigenWhole)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"D", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmSubKeys_Peer)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"Dk", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmSubKeys_Eigen)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"Dk", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmSubKeys_Bf16Dot)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"Dk", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmSubKeys_Bf16Tiles)->ArgsProduct({{256, 512}, {1, 2}})->ArgNames({"Dk", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Gather)->ArgsProduct({{256, 512}, {0, 1}, {1, 2}})->ArgNames({"D", "prefetch", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_StreamRead)->ArgsProduct({{1, 2}})->ArgNames({"threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
