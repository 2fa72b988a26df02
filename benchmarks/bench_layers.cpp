// Layers: forward, forward + backward and a full training step (AdamW on dense tensors, lazy Adam on
// tables), for PEER, the product-key memory, the coarse MoE and dense FFWs, in one run.
//
// BM_Peer sweeps N = 128^2 .. 1024^2 at D = 256 and 512 (H = 8, k = 16, B = 1024): the step time must grow
// far slower than N. BM_Layer compares the layers at the paper's configurations, D = 256 (and 512), 1 and
// 2 threads, B = 2048 (256 for the D = 512 training step, as PEER-pytorch's reference figure):
//   PEER      N = 1024^2, H = 8, k = 16, Dk = D
//   PKM       pkm_config(D): N = 1024^2, H = 8, k = 32
//   dense 4D  D -> 4D -> D (equal width)
//   dense =F  D -> F -> D with the PEER layer's forward FLOPs per token (equal active compute)
//   MoE =F    128 experts, top 2, expert width set for the PEER layer's forward FLOPs per token
//
// Counters: tokens/s and us/token; GFLOP/s from the layers' own cost functions (forward, plus backward
// from the second phase on; the optimizer's element-wise work is not counted); GB/s from a model of the
// parameter traffic per token: table rows (the S rows a token reads) count once in forward, three times
// with backward (read again, gradient written) and ten times with the training step (lazy Adam reads the
// row, its two moments and its gradient and writes three of them); dense tensors are read once per batch
// and count the same multiples divided by B.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "bench_common.hpp"

namespace {

enum Phase { kForward = 0, kForwardBackward = 1, kTrainStep = 2, kDiscardTableRows = 3 };

// Phase kDiscardTableRows: forward and backward with every table's summed gradient rows handed to this
// sink, which drops them. It is the fused training step without any table update (and without the dense
// tensors' few-microsecond Adam step): the floor below which no table rule, storage or rounding can bring
// the step, measured rather than estimated.
class DiscardRows final : public peer::RowSink<float> {
 public:
  void prepare(int) override {}
  void update_row(peer::ExpertId, const float* g, int) override { benchmark::DoNotOptimize(g); }
  const std::string& table_name() const override { return name_; }

 private:
  std::string name_ = "discarded";
};

// Scalars of the dense tensors of a layout.
double dense_bytes(const peer::ParameterLayout& layout) {
  double n = 0;
  for (const auto& s : layout.dense()) n += static_cast<double>(s.size());
  return n * sizeof(float);
}

template <typename Layer>
void run_layer(benchmark::State& state, const Layer& layer, long dim, long b, int phase,
               const std::vector<peer::ParamGroup>& groups = peer::default_param_groups(1e-3), bool fused = false) {
  auto params = layer.make_parameters(1);
  auto grads = layer.make_gradients();
  // Adam's moments double the memory of a table: only the training step allocates them.
  std::unique_ptr<peer::Adam<float>> adam;
  if (phase == kTrainStep) {
    adam = std::make_unique<peer::Adam<float>>(layer.layout(), groups, peer::AdamConfig::adamw());
    if (fused) adam->fuse_table_updates(params, grads);  // each table row updated inside the backward
  }
  DiscardRows discard;
  const auto num_tables = static_cast<int>(layer.layout().tables().size());
  if (phase == kDiscardTableRows) {
    for (int t = 0; t < num_tables; ++t) grads.table(peer::TableHandle{t}).set_sink(&discard);
  }
  typename Layer::Cache cache;
  const bench::Mat x = bench::random(b, dim, 3), dy = bench::random(b, dim, 4);
  bench::Mat y(b, dim), none;
  const auto iteration = [&] {
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    if (phase != kForward) {
      grads.zero();
      layer.backward(params, cache, dy, none, grads);
    }
    if (phase == kTrainStep) adam->step(params, grads);
    if (phase == kDiscardTableRows) {
      for (int t = 0; t < num_tables; ++t) grads.table(peer::TableHandle{t}).end_fused_step();
    }
    benchmark::DoNotOptimize(y.data());
  };
  // One untimed step first: it faults in the caches, the gradient's rows and the optimizer's moments, which
  // a training run pays once, not every step. (Timed, with the few iterations a run of the D = 512 step
  // has, it gave that case a 42% coefficient of variation over 3 repetitions on 2026-11-30.)
  iteration();
  for (auto _ : state) iteration();
  const double flops = layer.forward_flops_per_token() + (phase != kForward ? layer.backward_flops_per_token() : 0.0);
  const double dense = dense_bytes(layer.layout());
  const double rows = std::max(0.0, layer.parameter_bytes_per_token() - dense);
  const double times = phase == kForward ? 1 : phase == kTrainStep ? 10 : 3;
  bench::set_counters(state, static_cast<double>(b), flops, times * (rows + dense / static_cast<double>(b)));
  bench::set_time_per_token(state, static_cast<double>(b));
  state.counters["params"] = static_cast<double>(layer.total_parameters());
  state.counters["active"] = static_cast<double>(layer.active_parameters_per_token());
  // Memory: what the model must hold (parameters, buffers and, for the training step, the optimizer's
  // state) against the process's peak resident set. The peak is the process's, so it means something
  // only when the case runs alone: --benchmark_filter=<one case>.
  // Tables count their stored bytes (2 per entry in bf16); "table_B_per_param" is what a table costs per
  // entry: storage plus, for the training step, the optimizer's state of it (moments, row steps, master rows).
  const auto& layout = layer.layout();
  double table_bytes = 0, table_entries = 0;
  for (std::size_t t = 0; t < layout.tables().size(); ++t) {
    table_bytes += static_cast<double>(params.table(peer::TableHandle{static_cast<int>(t)}).bytes());
    table_entries += static_cast<double>(layout.tables()[t].size());
  }
  double model = static_cast<double>(layout.dense_size() + layout.buffer_size()) * sizeof(float) + table_bytes;
  double table_state = table_bytes;
  if (adam) {
    for (const auto& t : adam->state_tensors()) {
      const double bytes = static_cast<double>(t.rows * t.cols) * (t.bf16 != nullptr ? 2.0 : 4.0);
      model += bytes;
      if (layout.find(t.name.substr(t.name.find('.', t.name.find('.') + 1) + 1)).second == peer::ParamKind::kRowSparse) table_state += bytes;
    }
    for (const auto& c : adam->state_counters()) {
      model += static_cast<double>(c.size) * sizeof(std::int64_t);
      if (c.size > 1) table_state += static_cast<double>(c.size) * sizeof(std::int64_t);  // per-row steps
    }
  }
  state.counters["model_GiB"] = model / (1 << 30);
  if (table_entries > 0) state.counters["table_B_per_param"] = table_state / table_entries;
  state.counters["peak_GiB"] = bench::peak_resident_bytes() / (1 << 30);
}

peer::PeerConfig peer_config(long d, long n) {
  peer::PeerConfig c;
  c.model_dim = d;
  c.key_dim = d;
  c.num_experts = n * n;
  return c;
}

// args: D, n (N = n^2), phase; all threads, B = 1024.
void BM_Peer(benchmark::State& state) {
  const long d = state.range(0), n = state.range(1);
  peer::PeerLayer<float> layer(peer_config(d, n));
  run_layer(state, layer, d, 1024, static_cast<int>(state.range(2)));
  state.counters["N"] = static_cast<double>(n * n);
}

enum Kind { kPeer = 0, kPkm = 1, kDenseWidth = 2, kDenseFlops = 3, kMoeFlops = 4 };
const char* const kKindNames[] = {"peer", "pkm", "dense_4d", "dense_equal_flops", "moe_equal_flops"};

// args: kind, D, phase, threads, B.
void BM_Layer(benchmark::State& state) {
  const long d = state.range(1), b = state.range(4);
  const int phase = static_cast<int>(state.range(2));
  bench::ThreadScope threads(state, state.range(3));
  state.SetLabel(kKindNames[state.range(0)]);
  const peer::PeerLayer<float> reference(peer_config(d, 1024));  // sets the equal-FLOPs widths
  const double peer_flops = reference.forward_flops_per_token();
  switch (static_cast<Kind>(state.range(0))) {
    case kPeer:
      run_layer(state, reference, d, b, phase);
      break;
    case kPkm: {
      peer::ProductKeyMemory<float> layer(peer::pkm_config(d));
      run_layer(state, layer, d, b, phase);
      break;
    }
    case kDenseWidth: {
      peer::DenseFfw<float> layer(peer::DenseFfwConfig{d, 4 * d});
      run_layer(state, layer, d, b, phase);
      break;
    }
    case kDenseFlops: {
      const long f = std::lround(peer_flops / (4.0 * static_cast<double>(d)));
      peer::DenseFfw<float> layer(peer::DenseFfwConfig{d, f});
      run_layer(state, layer, d, b, phase);
      break;
    }
    case kMoeFlops: {
      peer::MoeConfig c;
      c.model_dim = d;  // 128 experts, top 2 (token choice); 2 D E + 8 D F = the PEER layer's forward FLOPs
      c.expert_hidden = std::lround((peer_flops - 2.0 * static_cast<double>(d * c.num_experts)) / (8.0 * static_cast<double>(d)));
      peer::MoeFfw<float> layer(c);
      run_layer(state, layer, d, b, phase);
      break;
    }
  }
}

// Table storage and state, in one run: the PEER layer at N = 1024^2, 2 threads. args: D, phase, variant, B.
// Variants: the table's storage, its optimizer state, and whether the update is fused into the backward.
// Phase 3 (kDiscardTableRows) runs a variant's forward and backward with the table rows dropped.
struct StorageVariant {
  const char* label;
  peer::TableStorage table;
  peer::Bf16Rounding rounding;
  peer::TableOptimizer rule;
  peer::TableStorage moments;
  bool fused;
  peer::SubKeyScoring scoring = peer::SubKeyScoring::kExact;
};
const StorageVariant kStorageVariants[] = {
    {"float_adam", peer::TableStorage::kNative, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, false},
    {"float_adam_fused", peer::TableStorage::kNative, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, true},
    {"bf16_adam", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, false},
    {"bf16_master_rows_adam", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kMasterRows, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, false},
    {"bf16_partial_row_wise_adam_bf16_m", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kBFloat16, false},
    {"bf16_partial_row_wise_adam_bf16_m_fused", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kBFloat16, true},
    {"bf16_row_wise_adagrad", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative, false},
    {"bf16_row_wise_adagrad_fused", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative, true},
    // Sub-keys scored in bf16 with the exact re-check (variants 8-10).
    {"float_adam_bf16_checked_scoring", peer::TableStorage::kNative, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, false, peer::SubKeyScoring::kBFloat16Checked},
    {"bf16_adam_bf16_checked_scoring", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, false, peer::SubKeyScoring::kBFloat16Checked},
    {"bf16_row_wise_adagrad_fused_bf16_checked_scoring", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative, true, peer::SubKeyScoring::kBFloat16Checked},
};

void BM_Storage(benchmark::State& state) {
  const long d = state.range(0), b = state.range(3);
  bench::ThreadScope threads(state, 2);
  const StorageVariant& v = kStorageVariants[state.range(2)];
  const int phase = static_cast<int>(state.range(1));
  state.SetLabel(phase == kDiscardTableRows ? std::string(v.label) + "_rows_discarded" : std::string(v.label));
  peer::PeerConfig c = peer_config(d, 1024);
  c.expert_storage = v.table;
  c.sub_key_scoring = v.scoring;
  peer::PeerLayer<float> layer(c);
  auto groups = peer::default_param_groups(1e-3);
  for (auto& g : groups) {
    g.bf16_rounding = v.rounding;
    g.table_optimizer = v.rule;
    g.moment_storage = v.moments;
  }
  run_layer(state, layer, d, b, phase, groups, v.fused);
  // The GB/s model of run_layer counts float rows and lazy Adam's traffic: it does not describe these
  // variants, so it is left out; tokens/s, bytes of state and the peak resident set are what compare.
  state.counters.erase("GB/s");
}

// D = 256 and 512: the forward of each storage, and the training step of every variant; D = 1024: the
// training step of the variants whose state fits this 24 GiB machine (float Adam needs 24 GiB alone).
void storage_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"D", "phase", "variant", "B"});
  const long variants = static_cast<long>(sizeof(kStorageVariants) / sizeof(kStorageVariants[0]));
  for (long d : {256, 512}) {
    const long step_b = d == 256 ? 2048 : 256;
    for (long v : {0, 2, 8, 9}) b->Args({d, kForward, v, 2048});
    for (long v = 0; v < variants; ++v) b->Args({d, kTrainStep, v, step_b});
    // The fastest small-state step's floor: its forward and backward with no table update at all.
    b->Args({d, kDiscardTableRows, 10, step_b});
  }
  for (long v : {4, 5, 6, 7}) b->Args({1024, kTrainStep, v, 256});
}

void layer_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"kind", "D", "phase", "threads", "B"});
  for (long kind : {kPeer, kPkm, kDenseWidth, kDenseFlops, kMoeFlops}) {
    for (long threads : {1, 2}) {
      for (long phase : {kForward, kForwardBackward, kTrainStep}) b->Args({kind, 256, phase, threads, 2048});
    }
    // D = 512: the training step with 256 tokens per step, 2 threads.
    b->Args({kind, 512, kTrainStep, 2, 256});
  }
}

}  // namespace

BENCHMARK(BM_Peer)->ArgsProduct({{256, 512}, {128, 256, 512, 1024}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Layer)->Apply(layer_args)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Storage)->Apply(storage_args)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
