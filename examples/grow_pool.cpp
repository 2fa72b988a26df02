// A pool that grows mid-training (peer/layers/pool_growth.hpp), on the demo's memorization task: a PEER
// layer with n^2 experts learns random key -> label pairs until its capacity runs out; then its pool grows
// to n'^2 experts, its training state carried over, and it goes on learning. Three runs side by side: the
// small pool throughout, the pool grown at step G, and the large pool from the start.
// peer_grow --help lists the options; docs/growth.md shows a run.
//
// It prints the evaluation right before and right after growth (loss, accuracy, the largest output change)
// and checks itself (exit status 1 otherwise): the new experts take a share of the gates by the end, and
// the grown run ends with more pairs memorized than the small pool. (The bound on the output change is
// tested in tests/test_growth.cpp.)
#include <peer/peer.hpp>

#include "memorize.hpp"

#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace {

using Mat = peer::RowMatrix<float>;

struct Options {
  long pairs = 16384, classes = 512, dim = 64, key_dim = 32, heads = 4, top_k = 8;
  long from = 16, to = 48, steps = 3000, grow_at = 1500, batch = 256, every = 250;
  double dense_lr = 3e-3, expert_lr = 1e-2;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](long& field) { field = demo::integer_option(argc, argv, i, 1); };
    if (a == "--pairs") value(o.pairs);
    else if (a == "--classes") value(o.classes);
    else if (a == "--dim") value(o.dim);
    else if (a == "--from") value(o.from);
    else if (a == "--to") value(o.to);
    else if (a == "--steps") value(o.steps);
    else if (a == "--grow-at") value(o.grow_at);
    else if (a == "--every") value(o.every);
    else if (a == "--quick") { o.pairs = 8192; o.classes = 256; o.to = 32; o.steps = 800; o.grow_at = 400; o.every = 200; }
    else if (a == "--help" || a == "-h") {
      std::cout << "peer_grow [--pairs P] [--classes C] [--dim D] [--from n] [--to n'] [--steps S] [--grow-at G]\n"
                   "          [--every E] [--quick]\n"
                   "Trains PEER layers of n^2 experts, of n^2 grown to n'^2 at step G, and of n'^2 experts on the\n"
                   "memorization task, evaluating all pairs every E steps.\n";
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option " + a + " (see --help)");
    }
  }
  if (o.grow_at >= o.steps) throw std::invalid_argument("--grow-at must be < --steps");
  if (o.to < o.from) throw std::invalid_argument("--to must be >= --from");
  return o;
}

struct Evaluation {
  double loss = 0, accuracy = 0, usage = 0, new_share = 0;
  Mat outputs;  // the PEER layer's outputs on every pair, in pair order
};

/// A PEER layer and a linear readout trained with Adam (lazy Adam on the expert table), as a user's own
/// loop would hold them; grow() replaces the layer, its parameters and optimizer by grown ones.
class Learner {
 public:
  Learner(const Options& o, long sub_keys) : o_(o), readout_(o.dim, o.classes, peer::Bias::kLearned), rlayout_(4) {
    layer_ = std::make_unique<peer::PeerLayer<float>>(config(sub_keys));
    params_ = std::make_unique<peer::Parameters<float>>(layer_->make_parameters(1));
    grads_ = std::make_unique<peer::Gradients<float>>(layer_->make_gradients());
    opt_ = std::make_unique<peer::Adam<float>>(layer_->layout(), groups());
    readout_.register_parameters(rlayout_, "readout.");
    rparams_ = std::make_unique<peer::Parameters<float>>(rlayout_);
    readout_.initialize(*rparams_, 1);
    rgrads_ = std::make_unique<peer::Gradients<float>>(rlayout_);
    ropt_ = std::make_unique<peer::Adam<float>>(rlayout_, std::vector<peer::ParamGroup>{
                                                             peer::ParamGroup{"readout", {""}, o.dense_lr, 0.0, peer::LrSchedule::warmup(50)}});
  }

  const peer::PeerLayer<float>& layer() const { return *layer_; }
  const peer::PoolGrowth* growth() const { return growth_.get(); }

  double step(const Mat& x, const std::vector<int>& labels) {
    h_.resize(x.rows(), o_.dim);
    logits_.resize(x.rows(), o_.classes);
    layer_->forward(*params_, x, h_, cache_, peer::Mode::kTrain);
    readout_.forward(*rparams_, h_, logits_);
    long correct = 0;
    const double loss = demo::softmax_cross_entropy(logits_, labels, dlogits_, correct);
    grads_->zero();
    rgrads_->zero();
    dh_.setZero(x.rows(), o_.dim);
    readout_.backward(*rparams_, h_, dlogits_, dh_, *rgrads_, rscratch_);
    layer_->backward(*params_, cache_, dh_, none_, *grads_);
    opt_->step(*params_, *grads_);
    ropt_->step(*rparams_, *rgrads_);
    return loss;
  }

  /// Loss and accuracy over every pair in evaluation mode, the experts' usage, and (after growth) the new
  /// experts' share of the gate weights.
  Evaluation evaluate(const demo::PairSet& data) {
    Evaluation e;
    const long k = data.keys.rows();
    e.outputs.resize(k, o_.dim);
    peer::ExpertStats stats(layer_->config().num_experts);
    double fresh = 0;
    long correct_total = 0;
    for (long b0 = 0; b0 < k; b0 += o_.batch) {
      const long n = std::min(o_.batch, k - b0);
      const Mat xb = data.keys.middleRows(b0, n);
      Mat hb(n, o_.dim), lb(n, o_.classes), dl;
      const std::vector<int> yb(data.labels.begin() + b0, data.labels.begin() + b0 + n);
      layer_->forward(*params_, xb, hb, cache_, peer::Mode::kEval);
      readout_.forward(*rparams_, hb, lb);
      long correct = 0;
      e.loss += demo::softmax_cross_entropy(lb, yb, dl, correct) * static_cast<double>(n);
      correct_total += correct;
      stats.add(cache_.ids, cache_.gates);
      if (growth_) fresh += growth_->new_expert_share(cache_.ids, cache_.gates) * static_cast<double>(n);
      e.outputs.middleRows(b0, n) = hb;
    }
    e.loss /= static_cast<double>(k);
    e.accuracy = static_cast<double>(correct_total) / static_cast<double>(k);
    e.usage = stats.usage();
    e.new_share = fresh / static_cast<double>(k);
    return e;
  }

  /// n -> n' sub-keys: parameters and optimizer state moved (pool_growth.hpp), new sub-keys and u from a
  /// fresh initialization, new v = 0. The readout is untouched.
  void grow(long sub_keys) {
    growth_ = std::make_unique<peer::PoolGrowth>(*layer_, sub_keys);
    auto layer = std::make_unique<peer::PeerLayer<float>>(growth_->grown_config());
    auto params = std::make_unique<peer::Parameters<float>>(layer->make_parameters(2));
    peer::grow_parameters({*growth_}, *params_, *params);
    auto opt = std::make_unique<peer::Adam<float>>(layer->layout(), groups());
    peer::grow_optimizer_state({*growth_}, *opt_, *opt, *params);
    grads_ = std::make_unique<peer::Gradients<float>>(layer->make_gradients());
    layer_ = std::move(layer);
    params_ = std::move(params);
    opt_ = std::move(opt);
    cache_ = peer::PeerLayer<float>::Cache();
  }

  long parameters() const { return static_cast<long>(layer_->layout().num_parameters() + rlayout_.num_parameters()); }

 private:
  peer::PeerConfig config(long sub_keys) const {
    peer::PeerConfig c;
    c.model_dim = o_.dim;
    c.key_dim = o_.key_dim;
    c.num_heads = o_.heads;
    c.top_k = o_.top_k;
    c.sub_key_top_k = o_.top_k;
    c.num_experts = sub_keys * sub_keys;
    return c;
  }
  std::vector<peer::ParamGroup> groups() const {
    return peer::default_param_groups(o_.dense_lr, peer::LrSchedule::warmup(50), o_.expert_lr);
  }

  Options o_;
  std::unique_ptr<peer::PeerLayer<float>> layer_;
  std::unique_ptr<peer::Parameters<float>> params_;
  std::unique_ptr<peer::Gradients<float>> grads_;
  std::unique_ptr<peer::Adam<float>> opt_;
  std::unique_ptr<peer::PoolGrowth> growth_;
  peer::PeerLayer<float>::Cache cache_;
  peer::Linear<float> readout_;
  peer::ParameterLayout rlayout_;
  std::unique_ptr<peer::Parameters<float>> rparams_;
  std::unique_ptr<peer::Gradients<float>> rgrads_;
  std::unique_ptr<peer::Adam<float>> ropt_;
  peer::Linear<float>::Scratch rscratch_;
  Mat h_, logits_, dlogits_, dh_, none_;
};

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  const demo::PairSet data(o.pairs, o.dim, o.classes, 7);
  std::cout << "Memorize " << o.pairs << " random keys (D = " << o.dim << ") -> labels in [0, " << o.classes << "), " << o.steps
            << " steps of " << o.batch << "; PEER H = " << o.heads << ", k = " << o.top_k << ", Dk = " << o.key_dim
            << "\n  small: " << o.from * o.from << " experts;  grown: " << o.from * o.from << " -> " << o.to * o.to
            << " experts at step " << o.grow_at << ";  large: " << o.to * o.to << " experts\n\n";
  Learner small(o, o.from), grown(o, o.from), large(o, o.to);
  demo::Batches bs(data, o.batch), bg(data, o.batch), bl(data, o.batch);
  Mat x;
  std::vector<int> labels;
  bool ok = true;
  std::cout << "   step   small: loss  acc     grown: loss  acc   new-expert share   large: loss  acc\n";
  std::cout << std::fixed;
  auto report = [&](long step) {
    const Evaluation s = small.evaluate(data), g = grown.evaluate(data), l = large.evaluate(data);
    std::cout << std::setw(7) << step << "   " << std::setprecision(3) << std::setw(10) << s.loss << std::setprecision(1)
              << std::setw(6) << 100 * s.accuracy << "%  " << std::setprecision(3) << std::setw(10) << g.loss
              << std::setprecision(1) << std::setw(6) << 100 * g.accuracy << "%  " << std::setw(10)
              << (grown.growth() ? std::to_string(static_cast<int>(100 * g.new_share + 0.5)) + "%" : std::string("-"))
              << "      " << std::setprecision(3) << std::setw(10) << l.loss << std::setprecision(1) << std::setw(6)
              << 100 * l.accuracy << "%\n";
    return std::make_pair(s, g);
  };
  std::pair<Evaluation, Evaluation> last;
  for (long step = 1; step <= o.steps; ++step) {
    bs.next(step, x, labels);
    small.step(x, labels);
    bg.next(step, x, labels);
    grown.step(x, labels);
    bl.next(step, x, labels);
    large.step(x, labels);
    if (step == o.grow_at) {
      const Evaluation before = grown.evaluate(data);
      grown.grow(o.to);
      const Evaluation after = grown.evaluate(data);
      const double change = (after.outputs - before.outputs).cwiseAbs().maxCoeff();
      std::cout << std::setprecision(4) << "  -- step " << step << ": grown " << o.from * o.from << " -> " << o.to * o.to
                << " experts; evaluation loss " << before.loss << " -> " << after.loss << ", accuracy "
                << std::setprecision(1) << 100 * before.accuracy << "% -> " << 100 * after.accuracy
                << "%, largest output change " << std::scientific << std::setprecision(2) << change << std::fixed
                << ", new experts' share of the gates " << std::setprecision(1) << 100 * after.new_share << "%\n";
    }
    if (step % o.every == 0 || step == o.steps) last = report(step);
  }
  const Evaluation& s = last.first;
  const Evaluation& g = last.second;
  std::cout << "\n  parameters: small " << small.parameters() << ", grown " << grown.parameters() << ", large " << large.parameters()
            << "\n  new experts' share of the grown layer's gates at the end: " << std::setprecision(1) << 100 * g.new_share
            << "%; usage " << 100 * g.usage << "% of " << o.to * o.to << " experts\n";
  if (!(g.new_share > 0.05)) {
    std::cout << "FAIL: the new experts take under 5% of the gates\n";
    ok = false;
  }
  if (!(g.accuracy > s.accuracy)) {
    std::cout << "FAIL: the grown pool memorized no more than the small one\n";
    ok = false;
  }
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "peer_grow: " << e.what() << "\n";
  return 2;
}
