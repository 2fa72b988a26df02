// The main demo: a PEER layer with a million experts runs forward and backward on a batch, next to a
// dense feed-forward block of the same width, and reports throughput and the experts it used.
//
// Then it trains a PEER layer and a dense FFW of the same per-token compute on a task where capacity
// matters (memorizing random pairs) and reports what each learned.   peer_demo --help lists the options.
#include <peer/peer.hpp>

#include "memorize.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;
using Mat = peer::RowMatrix<float>;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Options {
  long dim = 256, experts = 1024 * 1024, heads = 8, top_k = 16, batch = 1024, reps = 5, threads = 0;
  // Part 2, the learning task.
  long pairs = 65536, classes = 1024, train_dim = 128, train_key_dim = 64, train_experts = 256 * 256, steps = 900;
  bool skip_throughput = false, skip_training = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](long& field) { field = demo::integer_option(argc, argv, i, 0); };
    if (a == "--dim") value(o.dim);
    else if (a == "--experts") value(o.experts);
    else if (a == "--heads") value(o.heads);
    else if (a == "--top-k") value(o.top_k);
    else if (a == "--batch") value(o.batch);
    else if (a == "--reps") value(o.reps);
    else if (a == "--threads") value(o.threads);
    else if (a == "--pairs") value(o.pairs);
    else if (a == "--classes") value(o.classes);
    else if (a == "--train-dim") value(o.train_dim);
    else if (a == "--train-experts") value(o.train_experts);
    else if (a == "--steps") value(o.steps);
    else if (a == "--no-throughput") o.skip_throughput = true;
    else if (a == "--no-training") o.skip_training = true;
    else if (a == "--help" || a == "-h") {
      std::cout << "peer_demo [--dim D] [--experts N] [--heads H] [--top-k K] [--batch B] [--reps R] [--threads T]\n"
                   "          [--pairs P] [--classes C] [--train-dim D] [--train-experts N] [--steps S]\n"
                   "          [--no-throughput] [--no-training]\n"
                   "Part 1: a PEER layer with N experts, forward + backward throughput next to a dense FFW.\n"
                   "Part 2: train PEER and a dense FFW of the same per-token FLOPs to memorize P random\n"
                   "        key -> label pairs; report accuracy, expert usage and unevenness.\n";
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option " + a + " (see --help)");
    }
  }
  if (o.reps < 1) o.reps = 1;
  return o;
}

void throughput_part(const Options& o, int threads) {
  peer::PeerConfig config;
  config.model_dim = o.dim;
  config.key_dim = o.dim;
  config.num_experts = o.experts;
  config.num_heads = o.heads;
  config.top_k = o.top_k;
  config.sub_key_top_k = o.top_k;
  peer::PeerLayer<float> layer(config);
  const long d = o.dim, b = o.batch;

  std::cout << "peer " << peer::version() << " demo on " << threads << " thread(s)\n\nPart 1: a PEER layer (He 2024) with "
            << config.num_experts << " experts, forward and backward\n  N = " << config.num_experts << " experts (" << config.num_sub_keys() << "^2 product keys), H = "
            << config.num_heads << " heads, top k = " << config.top_k << " per head, D = Dk = " << d
            << ", batch B = " << b << " tokens\n";
  const auto layout = layer.layout();
  std::cout << "  parameters:\n";
  for (const auto* list : {&layout.dense(), &layout.buffers(), &layout.tables()}) {
    for (const auto& s : *list) {
      std::cout << "    " << std::left << std::setw(30) << s.name << std::right << " [" << s.rows << ", " << s.cols
                << "]  " << (s.kind == peer::ParamKind::kDense ? "dense" : s.kind == peer::ParamKind::kBuffer ? "buffer" : "row-sparse")
                << "\n";
    }
  }
  const double total = static_cast<double>(layout.num_parameters());
  const double active = static_cast<double>(config.num_heads * config.top_k * 2 * d + layout.dense_size());  // experts + query net + keys
  std::cout << "  total parameters " << total / 1e6 << " M (" << total * 4 / (1 << 30) << " GiB), active per token "
            << active / 1e6 << " M\n";

  auto start = Clock::now();
  auto params = layer.make_parameters(1);
  auto grads = layer.make_gradients();
  std::cout << "  allocated and initialized in " << std::setprecision(3) << seconds_since(start) << " s\n";

  const Mat x = Mat::Random(b, d);
  Mat y(b, d), dx(b, d);
  const Mat dy = Mat::Random(b, d);
  peer::PeerLayer<float>::Cache cache;
  std::vector<double> fwd, bwd;
  for (long r = 0; r <= o.reps; ++r) {  // the first round warms up and is not counted
    start = Clock::now();
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    const double tf = seconds_since(start);
    grads.zero();
    dx.setZero();
    start = Clock::now();
    layer.backward(params, cache, dy, dx, grads);
    const double tb = seconds_since(start);
    if (r > 0) {
      fwd.push_back(tf);
      bwd.push_back(tb);
    }
  }
  peer::DenseFfw<float> ffw(peer::DenseFfwConfig{d, 4 * d});
  auto ffw_params = ffw.make_parameters(2);
  auto ffw_grads = ffw.make_gradients();
  peer::DenseFfw<float>::Cache ffw_cache;
  Mat yd(b, d), dxd(b, d);
  std::vector<double> dfwd, dbwd;
  for (long r = 0; r <= o.reps; ++r) {
    start = Clock::now();
    ffw.forward(ffw_params, x, yd, ffw_cache, peer::Mode::kTrain);
    const double tf = seconds_since(start);
    ffw_grads.zero();
    dxd.setZero();
    start = Clock::now();
    ffw.backward(ffw_params, ffw_cache, dy, dxd, ffw_grads);
    const double tb = seconds_since(start);
    if (r > 0) {
      dfwd.push_back(tf);
      dbwd.push_back(tb);
    }
  }
  const double pf = median(fwd), pb = median(bwd), df = median(dfwd), db = median(dbwd);
  const double tokens = static_cast<double>(b), width = static_cast<double>(d);
  std::cout << "\n  throughput (median of " << o.reps << " runs, tokens/s)      forward    forward+backward\n"
            << std::fixed << std::setprecision(0)
            << "    PEER, " << std::setw(8) << config.num_experts << " experts           " << std::setw(10) << tokens / pf
            << "    " << std::setw(10) << tokens / (pf + pb) << "\n"
            << "    dense FFW " << d << " -> " << 4 * d << " -> " << d << "         " << std::setw(10) << tokens / df << "    "
            << std::setw(10) << tokens / (df + db) << "\n";

  // Which experts the batch used.
  std::vector<std::pair<int, peer::ExpertId>> counts;
  {
    std::vector<peer::ExpertId> ids(cache.ids.data(), cache.ids.data() + cache.ids.size());
    std::sort(ids.begin(), ids.end());
    for (std::size_t i = 0; i < ids.size();) {
      std::size_t j = i;
      while (j < ids.size() && ids[j] == ids[i]) ++j;
      counts.push_back({static_cast<int>(j - i), ids[i]});
      i = j;
    }
  }
  std::sort(counts.begin(), counts.end(), [](auto& l, auto& r) { return l.first > r.first || (l.first == r.first && l.second < r.second); });
  const auto& g = grads.find_table("experts");
  std::cout << std::setprecision(2) << "\n  experts used by this batch: " << counts.size() << " distinct of "
            << config.num_experts << " (" << 100.0 * static_cast<double>(counts.size()) / static_cast<double>(config.num_experts)
            << "%), from " << cache.ids.size() << " selections; row-sparse gradient rows: " << g.size() << " ("
            << static_cast<double>(g.size()) * 2 * width * 4 / (1 << 20) << " MiB, the dense alternative would be "
            << static_cast<double>(config.num_experts) * 2 * width * 4 / (1 << 20) << " MiB)\n  most selected:";
  for (std::size_t i = 0; i < std::min<std::size_t>(5, counts.size()); ++i) {
    const auto id = counts[i].second;
    std::cout << "  #" << id << " (" << id / config.num_sub_keys() << "," << id % config.num_sub_keys() << ") x" << counts[i].first;
  }
  std::cout << "\n  token 0, head 0 kept experts (id: score, gate):";
  for (long j = 0; j < std::min<long>(4, config.top_k); ++j) {
    std::cout << "  " << cache.ids(0, j) << ": " << std::setprecision(3) << cache.scores(0, j) << ", " << cache.gates(0, j);
  }
  std::cout << " ...\n  exact tie repairs in the last search: " << cache.retrieval.fallbacks << " of " << b * config.num_heads
            << " queries\n";
}

void training_part(const Options& o) {
  peer::PeerConfig config;
  config.model_dim = o.train_dim;
  config.key_dim = o.train_key_dim;
  config.num_experts = o.train_experts;
  peer::PeerLayer<float> peer_layer(config);
  // The dense baseline gets the same forward FLOPs per token: 4 D F = PEER's.
  const long hidden = std::max(1L, static_cast<long>(std::lround(config.forward_flops_per_token() / (4.0 * static_cast<double>(o.train_dim)))));
  peer::DenseFfw<float> dense(peer::DenseFfwConfig{o.train_dim, hidden});
  demo::TrainOptions t;
  t.steps = o.steps;
  t.classes = o.classes;
  std::cout << "\nPart 2: memorize " << o.pairs << " random keys (N(0, I), D = " << o.train_dim << ") -> labels in [0, "
            << o.classes << "), " << o.steps << " steps of " << t.batch << ", Adam (experts: lazy Adam at " << t.expert_lr
            << ")\n  PEER: N = " << config.num_experts << ", H = " << config.num_heads << ", k = " << config.top_k
            << ", Dk = " << config.key_dim << "; dense FFW: " << o.train_dim << " -> " << hidden << " -> " << o.train_dim
            << ", both " << std::setprecision(3) << config.forward_flops_per_token() / 1e6 << " MFLOP per token forward\n";
  const demo::PairSet data(o.pairs, o.train_dim, o.classes, 7);
  peer::ExpertStats stats(config.num_experts);
  const demo::TrainResult p = demo::train_memorize("PEER", peer_layer, data, t, &stats);
  const demo::TrainResult f = demo::train_memorize("dense FFW", dense, data, t, nullptr);
  std::cout << std::fixed << std::setprecision(1)
            << "\n  model        parameters   train tokens/s   final loss   accuracy on all " << o.pairs << " pairs\n"
            << "  PEER       " << std::setw(12) << p.parameters << "   " << std::setw(14) << std::setprecision(0) << p.tokens_per_s
            << "   " << std::setw(10) << std::setprecision(4) << p.final_loss << "   " << std::setprecision(1) << 100 * p.accuracy << "%\n"
            << "  dense FFW  " << std::setw(12) << f.parameters << "   " << std::setw(14) << std::setprecision(0) << f.tokens_per_s
            << "   " << std::setw(10) << std::setprecision(4) << f.final_loss << "   " << std::setprecision(1) << 100 * f.accuracy << "%\n"
            << std::setprecision(3) << "\n  PEER expert statistics over the evaluation pass (He 2024, sec. 3.4): usage "
            << 100 * p.usage << "% of " << config.num_experts << " experts, unevenness KL(z || uniform) = " << p.unevenness << " nats\n";
  const auto most = stats.most_used(3);
  std::cout << "  most used:";
  for (const auto& e : most) std::cout << "  #" << e.id << " (z' = " << e.weight << ", " << e.selections << " selections)";
  const auto least = stats.least_used(3);
  std::cout << "\n  least used (of those used):";
  for (const auto& e : least) std::cout << "  #" << e.id << " (z' = " << e.weight << ")";
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
#if defined(_OPENMP)
  if (o.threads > 0) omp_set_num_threads(static_cast<int>(o.threads));
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  if (!o.skip_throughput) throughput_part(o, threads);
  if (!o.skip_training) training_part(o);
  return 0;
} catch (const std::exception& e) {
  std::cerr << "peer_demo: " << e.what() << "\n";
  return 2;
}
