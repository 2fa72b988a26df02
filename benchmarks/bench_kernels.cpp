// Kernels against naive versions, in the same run.
//
// Experts: peer::SingleNeuronExperts<float> forward and backward (one pass over the slots, each expert row
// read once, prefetched two slots ahead; row gradients by a deterministic row scatter) against what a
// PyTorch implementation does: gather the B S rows [u | v] into a dense [B S, 2D] matrix, then
// z = rowwise u . x, h = act(z), y = sum over slots of g h v as per-token GEMVs on that matrix. The naive
// backward works on the gathered matrix saved by its forward (autograd keeps it), materializes the
// per-slot row gradients [B S, 2D] = [dz x | g h dy] and reduces them by expert id into the same
// row-sparse gradient (the scatter of index_add, minus PyTorch's dense N x 2D gradient). D = 256,
// B = 1024, S = H k = 128 random ids (fixed seed), N = 1024^2 (a 2 GiB table: DRAM) and 128^2 (32 MiB).
// Counters: tokens/s, GFLOP/s (4 D per slot forward, 8 D backward), GB/s of expert rows (2 D floats per
// slot; gathered-matrix and gradient traffic not counted).
//
// Top-k: peer::top_k against std::partial_sort and std::nth_element + sort of (value, index) pairs on a
// copy, both ordered by value descending, ties to the lower index; 64 rows of n normal values per
// iteration, 1 thread.
#include <algorithm>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr long kTokens = 1024;  // B
constexpr long kSlots = 128;    // S = H k
constexpr long kDim = 256;      // D

using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;

// The expert table and the batch, kept across the benchmark's calls (initializing 2 GiB takes seconds):
// one per N (2 GiB + 32 MiB in all).
struct ExpertSetup {
  peer::SingleNeuronExperts<float> experts;
  peer::ParameterLayout layout;
  peer::Parameters<float> params;
  bench::Mat x, dy, gates;
  peer::IdMatrix ids;

  ExpertSetup(long num_experts, long d) : experts(peer::ExpertPoolConfig{num_experts, d, peer::Activation::kGelu}) {
    experts.register_parameters(layout, "experts");
    params = peer::Parameters<float>(layout);
    experts.initialize(params, 1);
    x = bench::random(kTokens, d, 2);
    dy = bench::random(kTokens, d, 3);
    gates = bench::random(kTokens, kSlots, 4).cwiseAbs() / static_cast<float>(kSlots);
    ids = bench::random_ids(kTokens, kSlots, num_experts, 5);
  }

  static ExpertSetup& get(long num_experts, long d) {
    static std::map<std::pair<long, long>, std::unique_ptr<ExpertSetup>> setups;
    auto& setup = setups[{num_experts, d}];
    if (!setup) setup = std::make_unique<ExpertSetup>(num_experts, d);
    return *setup;
  }

  const peer::RowTable<float>& table() const { return params.table(experts.table_handle()); }
};

// The naive version's state: the gathered rows [B S, 2D] and the per-slot row gradients [B S, 2D].
struct Naive {
  bench::Mat gathered, row_grads;
  peer::detail::RowScatterWorkspace<float> scatter;
};

// Naive forward: gather, then compute on the dense copy.
void naive_forward(const ExpertSetup& s, Naive& nv, bench::Mat& y, bench::Mat& z) {
  const peer::RowTable<float>& table = s.table();
  const long d = s.experts.model_dim(), cols = 2 * d;
  const peer::Activation act = s.experts.config().activation;
  nv.gathered.resize(kTokens * kSlots, cols);
  peer::parallel_for(kTokens, 16, [&](peer::Index t0, peer::Index t1, int) {
    for (peer::Index t = t0; t < t1; ++t) {
      for (peer::Index j = 0; j < kSlots; ++j) {
        nv.gathered.row(t * kSlots + j) = Eigen::Map<const RowVec>(table.row(s.ids(t, j)), cols);
      }
    }
  });
  peer::parallel_for(kTokens, 16, [&](peer::Index t0, peer::Index t1, int) {
    Eigen::VectorXf zt(kSlots), coef(kSlots);
    for (peer::Index t = t0; t < t1; ++t) {
      const auto g = nv.gathered.middleRows(t * kSlots, kSlots);
      zt.noalias() = g.leftCols(d) * s.x.row(t).transpose();
      for (peer::Index j = 0; j < kSlots; ++j) coef[j] = s.gates(t, j) * peer::activate(act, zt[j]);
      z.row(t) = zt.transpose();
      y.row(t).noalias() = coef.transpose() * g.rightCols(d);
    }
  });
}

// Naive backward on the gathered rows: dx += sum dz u, dgates, then row gradients materialized and
// reduced by id.
void naive_backward(const ExpertSetup& s, Naive& nv, const bench::Mat& z, bench::Mat& dx, bench::Mat& dgates,
                    peer::RowSparseGrad<float>& grad) {
  const long d = s.experts.model_dim(), cols = 2 * d;
  const peer::Activation act = s.experts.config().activation;
  nv.row_grads.resize(kTokens * kSlots, cols);
  peer::parallel_for(kTokens, 16, [&](peer::Index t0, peer::Index t1, int) {
    Eigen::VectorXf dh(kSlots), dz(kSlots);
    for (peer::Index t = t0; t < t1; ++t) {
      const auto g = nv.gathered.middleRows(t * kSlots, kSlots);
      dh.noalias() = g.rightCols(d) * s.dy.row(t).transpose();
      for (peer::Index j = 0; j < kSlots; ++j) {
        const float h = peer::activate(act, z(t, j));
        dz[j] = s.gates(t, j) * peer::activate_derivative(act, z(t, j)) * dh[j];
        dgates(t, j) = h * dh[j];
        nv.row_grads.row(t * kSlots + j).head(d) = dz[j] * s.x.row(t);
        nv.row_grads.row(t * kSlots + j).tail(d) = (s.gates(t, j) * h) * s.dy.row(t);
      }
      dx.row(t).noalias() += dz.transpose() * g.leftCols(d);
    }
  });
  grad.clear();
  peer::detail::scatter_rows(s.ids, s.experts.num_experts(), cols, grad, nv.scatter,
                     [&](peer::Index item, auto row) { row += nv.row_grads.row(item); });
}

// |a - b| <= 1e-4 max|b| + 1e-6: the naive versions sum in another order, so only rounding may differ.
bool close(const Eigen::Ref<const Eigen::MatrixXf>& a, const Eigen::Ref<const Eigen::MatrixXf>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a - b).cwiseAbs().maxCoeff() <= 1e-4f * b.cwiseAbs().maxCoeff() + 1e-6f;
}

void expert_counters(benchmark::State& state, const ExpertSetup& s, bool backward) {
  const long d = s.experts.model_dim();
  const double slots = static_cast<double>(kSlots);
  const double flops = slots * (backward ? peer::SingleNeuronExperts<float>::backward_flops_per_slot(d)
                                         : peer::SingleNeuronExperts<float>::forward_flops_per_slot(d));
  bench::set_counters(state, static_cast<double>(kTokens), flops, slots * 2.0 * static_cast<double>(d) * sizeof(float));
  state.counters["N"] = static_cast<double>(s.experts.num_experts());
  state.counters["D"] = static_cast<double>(d);
}

// args: N, threads
void BM_ExpertForward_Fused(benchmark::State& state) {
  const ExpertSetup& s = ExpertSetup::get(state.range(0), kDim);
  bench::Mat y(kTokens, kDim), z(kTokens, kSlots);
  bench::ThreadScope threads(state, state.range(1));
  s.experts.forward(s.params, s.x, s.ids, s.gates, y, z);  // warm-up, as for every case here
  for (auto _ : state) {
    s.experts.forward(s.params, s.x, s.ids, s.gates, y, z);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  expert_counters(state, s, false);
}

void BM_ExpertForward_Naive(benchmark::State& state) {
  const ExpertSetup& s = ExpertSetup::get(state.range(0), kDim);
  bench::Mat y(kTokens, kDim), z(kTokens, kSlots);
  Naive nv;
  bench::ThreadScope threads(state, state.range(1));
  naive_forward(s, nv, y, z);  // warm-up: the first call faults in the 256 MiB it gathers into
  bench::Mat y_ref(kTokens, kDim), z_ref(kTokens, kSlots);
  s.experts.forward(s.params, s.x, s.ids, s.gates, y_ref, z_ref);
  if (!close(y, y_ref) || !close(z, z_ref)) state.SkipWithError("naive forward differs from SingleNeuronExperts::forward");
  for (auto _ : state) {
    naive_forward(s, nv, y, z);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  expert_counters(state, s, false);
}

void BM_ExpertBackward_Fused(benchmark::State& state) {
  const ExpertSetup& s = ExpertSetup::get(state.range(0), kDim);
  bench::Mat y(kTokens, kDim), z(kTokens, kSlots), dgates(kTokens, kSlots);
  bench::Mat dx = bench::Mat::Zero(kTokens, kDim);
  s.experts.forward(s.params, s.x, s.ids, s.gates, y, z);
  peer::Gradients<float> grads(s.layout);
  peer::SingleNeuronExperts<float>::Workspace ws;
  bench::ThreadScope threads(state, state.range(1));
  s.experts.backward(s.params, s.x, s.ids, s.gates, z, s.dy, dx, dgates, grads, ws);  // warm-up
  for (auto _ : state) {
    grads.zero();
    s.experts.backward(s.params, s.x, s.ids, s.gates, z, s.dy, dx, dgates, grads, ws);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  expert_counters(state, s, true);
}

void BM_ExpertBackward_Naive(benchmark::State& state) {
  const ExpertSetup& s = ExpertSetup::get(state.range(0), kDim);
  bench::Mat y(kTokens, kDim), z(kTokens, kSlots), dgates(kTokens, kSlots);
  bench::Mat dx = bench::Mat::Zero(kTokens, kDim);
  Naive nv;
  naive_forward(s, nv, y, z);  // the gathered rows autograd would have saved
  peer::RowSparseGrad<float> grad(2 * kDim);
  bench::ThreadScope threads(state, state.range(1));
  naive_backward(s, nv, z, dx, dgates, grad);  // warm-up
  {
    bench::Mat dx_ref = bench::Mat::Zero(kTokens, kDim), dgates_ref(kTokens, kSlots);
    peer::Gradients<float> grads(s.layout);
    peer::SingleNeuronExperts<float>::Workspace ws;
    s.experts.backward(s.params, s.x, s.ids, s.gates, z, s.dy, dx_ref, dgates_ref, grads, ws);
    const peer::RowSparseGrad<float>& ref = grads.table(s.experts.table_handle());
    if (!close(dx, dx_ref) || !close(dgates, dgates_ref) || grad.ids() != ref.ids() || !close(grad.values(), ref.values())) {
      state.SkipWithError("naive backward differs from SingleNeuronExperts::backward");
    }
  }
  for (auto _ : state) {
    naive_backward(s, nv, z, dx, dgates, grad);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  expert_counters(state, s, true);
}

// ---- Top-k ------------------------------------------------------------------------------------------

struct Pair {
  float value;
  std::int32_t index;
};
// Value descending, ties to the lower index: the order peer::top_k returns.
inline bool ranks_before(const Pair& a, const Pair& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

enum class Select { kPeer, kPartialSort, kNthElement };

// args: n, k, rows. 64 rows repeat often enough to train the branch predictor (which favours methods with
// data-dependent branches); 4096 distinct rows are what the layer's retrieval sees (2 (H B / tile) per tile).
void run_top_k(benchmark::State& state, Select method) {
  const long n = state.range(0), k = state.range(1), kTopKRows = state.range(2);
  const bench::Mat values = bench::random(kTopKRows, n, 6);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(k));
  std::vector<float> out(static_cast<std::size_t>(k));
  std::vector<Pair> pairs(static_cast<std::size_t>(n));
  auto select = [&](const float* v) {
    if (method == Select::kPeer) {
      peer::top_k(v, n, k, ids.data(), out.data());
      return;
    }
    for (long i = 0; i < n; ++i) pairs[static_cast<std::size_t>(i)] = Pair{v[i], static_cast<std::int32_t>(i)};
    if (method == Select::kPartialSort) {
      std::partial_sort(pairs.begin(), pairs.begin() + k, pairs.end(), ranks_before);
    } else {
      std::nth_element(pairs.begin(), pairs.begin() + (k - 1), pairs.end(), ranks_before);
      std::sort(pairs.begin(), pairs.begin() + k, ranks_before);
    }
    for (long j = 0; j < k; ++j) {
      ids[static_cast<std::size_t>(j)] = pairs[static_cast<std::size_t>(j)].index;
      out[static_cast<std::size_t>(j)] = pairs[static_cast<std::size_t>(j)].value;
    }
  };
  // Every method must return peer::top_k's ids.
  std::vector<std::int32_t> ref_ids(static_cast<std::size_t>(k));
  std::vector<float> ref_values(static_cast<std::size_t>(k));
  for (long r = 0; r < kTopKRows; ++r) {
    peer::top_k(values.row(r).data(), n, k, ref_ids.data(), ref_values.data());
    select(values.row(r).data());
    if (ids != ref_ids) {
      state.SkipWithError("top-k baseline differs from peer::top_k");
      break;
    }
  }
  for (auto _ : state) {
    for (long r = 0; r < kTopKRows; ++r) {
      select(values.row(r).data());
      benchmark::DoNotOptimize(ids.data());
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
  }
  const double rows = static_cast<double>(kTopKRows);
  bench::set_rate(state, "selections/s", rows);
  // time / (rows n) in nanoseconds
  state.counters["ns/element"] = benchmark::Counter(
      rows * static_cast<double>(n) * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["n"] = static_cast<double>(n);
  state.counters["k"] = static_cast<double>(k);
}

void BM_TopK_Peer(benchmark::State& state) { run_top_k(state, Select::kPeer); }
void BM_TopK_PartialSort(benchmark::State& state) { run_top_k(state, Select::kPartialSort); }
void BM_TopK_NthElement(benchmark::State& state) { run_top_k(state, Select::kNthElement); }

void top_k_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "k", "rows"})->ArgsProduct({{1024, 2048}, {16, 32}, {64, 4096}});
  b->Unit(benchmark::kMicrosecond);
}

// ---- bf16 row write-back -----------------------------------------------------------------------------

// Rows of 512 floats narrowed to bf16, round-to-nearest (rounding 0) or stochastic (1), 256 rows (512 KiB
// in, 256 KiB out: in L2, so the rounding's arithmetic is what is measured). args: rounding.
void BM_Bf16NarrowRows(benchmark::State& state) {
  constexpr long kRows = 256, kCols = 512;
  const bool stochastic = state.range(0) == 1;
  state.SetLabel(stochastic ? "stochastic" : "nearest");
  const bench::Mat in = bench::random(kRows, kCols, 8);
  std::vector<peer::bfloat16> out(static_cast<std::size_t>(kRows * kCols));
  for (auto _ : state) {
    for (long r = 0; r < kRows; ++r) {
      peer::bfloat16* row = out.data() + r * kCols;
      if (stochastic) {
        peer::detail::narrow_row_stochastic(in.row(r).data(), row, kCols, peer::detail::RoundingStream{static_cast<std::uint32_t>(r * 2654435761u)});
      } else {
        peer::detail::narrow_row_nearest(in.row(r).data(), row, kCols);
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  bench::set_rate(state, "elements/s", static_cast<double>(kRows * kCols));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(kRows * kCols) * 6.0 * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The table update of one optimizer step on a bf16 table of 256 rows of 512 columns (256 KiB of rows,
// 512 KiB of gradient, 1 MiB of moments for Adam: in a 2 MiB L2, so the update's arithmetic is what is
// measured, not the row traffic), every
// row touched, one thread. args: rule (0 Adam with float moments, 1 row-wise Adagrad), rounding
// (0 nearest, 1 stochastic).
void BM_Bf16TableUpdate(benchmark::State& state) {
  constexpr long kRows = 256, kCols = 512;
  const bench::ThreadScope threads(state, 1);
  const bool adagrad = state.range(0) == 1, stochastic = state.range(1) == 1;
  state.SetLabel(std::string(adagrad ? "row-wise Adagrad" : "Adam") + (stochastic ? ", stochastic" : ", nearest"));
  peer::ParameterLayout layout(8);
  layout.add_table("experts", kRows, kCols, peer::TableStorage::kBFloat16);
  peer::Parameters<float> params(layout);
  peer::Gradients<float> grads(layout);
  const bench::Mat init = bench::random(kRows, kCols, 3);
  for (long r = 0; r < kRows; ++r) params.table(peer::TableHandle{0}).write_row(r, init.row(r).data());
  std::vector<peer::ExpertId> ids(kRows);
  for (long r = 0; r < kRows; ++r) ids[static_cast<std::size_t>(r)] = static_cast<peer::ExpertId>(r);
  const bench::Mat g = bench::random(kRows, kCols, 4);
  grads.table(peer::TableHandle{0}).add(ids, g.data());
  std::vector<peer::ParamGroup> groups{peer::ParamGroup{"experts", {""}, 1e-3, 0.0, peer::LrSchedule(), peer::GroupKinds::kAll}};
  groups[0].table_optimizer = adagrad ? peer::TableOptimizer::kRowWiseAdagrad : peer::TableOptimizer::kDefault;
  groups[0].bf16_rounding = stochastic ? peer::Bf16Rounding::kStochastic : peer::Bf16Rounding::kNearest;
  peer::Adam<float> adam(layout, groups, peer::AdamConfig::adamw());
  for (auto _ : state) {
    adam.step(params, grads);
    benchmark::ClobberMemory();
  }
  bench::set_rate(state, "elements/s", static_cast<double>(kRows * kCols));
}

void expert_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "threads"})->ArgsProduct({{128 * 128, 1024 * 1024}, {1, 2}});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_ExpertForward_Fused)->Apply(expert_args);
BENCHMARK(BM_ExpertForward_Naive)->Apply(expert_args);
BENCHMARK(BM_ExpertBackward_Fused)->Apply(expert_args);
BENCHMARK(BM_ExpertBackward_Naive)->Apply(expert_args);
BENCHMARK(BM_TopK_Peer)->Apply(top_k_args);
BENCHMARK(BM_TopK_PartialSort)->Apply(top_k_args);
BENCHMARK(BM_TopK_NthElement)->Apply(top_k_args);
BENCHMARK(BM_Bf16NarrowRows)->ArgName("rounding")->Arg(0)->Arg(1);
BENCHMARK(BM_Bf16TableUpdate)->ArgNames({"rule", "rounding"})->ArgsProduct({{0, 1}, {0, 1}});
BENCHMARK_MAIN();
