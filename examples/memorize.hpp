// The demo's learning task: memorize a fixed set of random key -> label pairs. Capacity decides how many
// pairs a model can store, so a PEER layer with many experts should store far more than a dense FFW of
// the same per-token compute. Written the way a user's own training loop would be.
#ifndef PEER_EXAMPLES_MEMORIZE_HPP
#define PEER_EXAMPLES_MEMORIZE_HPP

#include <peer/peer.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace demo {

using Mat = peer::RowMatrix<float>;
using Clock = std::chrono::steady_clock;

/// The integer after option argv[i] (i moves past it), at least `least`; throws naming the option.
inline long integer_option(int argc, char** argv, int& i, long least) {
  const std::string name = argv[i];
  if (i + 1 >= argc) throw std::invalid_argument(name + " needs a value");
  char* end = nullptr;
  const long value = std::strtol(argv[++i], &end, 10);
  if (*end != '\0' || value < least) {
    throw std::invalid_argument(name + " = " + argv[i] + " must be an integer >= " + std::to_string(least));
  }
  return value;
}

/// K random keys x_k ~ N(0, I_D) with labels uniform in [0, C).
struct PairSet {
  Mat keys;
  std::vector<int> labels;
  PairSet(long count, long dim, long classes, std::uint64_t seed) : keys(count, dim), labels(static_cast<std::size_t>(count)) {
    const peer::CounterRng rng(seed, 1);
    peer::fill_normal(rng, 0, count * dim, 1.0, keys.data());
    const peer::CounterRng label_rng(seed, 2);
    for (long i = 0; i < count; ++i) labels[static_cast<std::size_t>(i)] = static_cast<int>(label_rng.bits(static_cast<std::uint64_t>(i)) % static_cast<std::uint64_t>(classes));
  }
};

/// Softmax cross-entropy over rows of logits; writes dL/dlogits (mean over the batch) and returns the
/// mean loss and the number of correct argmax predictions.
inline double softmax_cross_entropy(const Mat& logits, const std::vector<int>& labels, Mat& dlogits, long& correct) {
  const long b = logits.rows();
  dlogits.resize(b, logits.cols());
  double loss = 0;
  correct = 0;
  for (long r = 0; r < b; ++r) {
    const auto row = logits.row(r);
    Eigen::Index best;
    const float mx = row.maxCoeff(&best);
    const auto e = (row.array() - mx).exp();
    const float z = e.sum();
    const int y = labels[static_cast<std::size_t>(r)];
    loss += std::log(z) - (row(y) - mx);
    correct += best == y;
    dlogits.row(r) = (e / z / static_cast<float>(b)).matrix();
    dlogits(r, y) -= 1.0f / static_cast<float>(b);
  }
  return loss / static_cast<double>(b);
}

/// Prints a progress bar: a rewritten line on a terminal, a line every tenth of the run otherwise.
class Progress {
 public:
  Progress(std::string label, long total) : label_(std::move(label)), total_(total), tty_(isatty(1) != 0), start_(Clock::now()) {}
  void update(long step, double loss, double tokens_per_s) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const double eta = step > 0 ? elapsed * static_cast<double>(total_ - step) / static_cast<double>(step) : 0.0;
    const int width = 24, filled = static_cast<int>(width * step / std::max(1L, total_));
    const bool tenth = step == total_ || (step * 10 / total_) != ((step - 1) * 10 / total_);
    if (!tty_ && !tenth) return;
    std::printf("%s  %-10s [%s%s] step %5ld/%ld  loss %.4f  %8.0f tokens/s  ETA %4.0fs%s", tty_ ? "\r" : "", label_.c_str(),
                std::string(static_cast<std::size_t>(filled), '#').c_str(), std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                step, total_, loss, tokens_per_s, eta, tty_ ? "" : "\n");
    std::fflush(stdout);
  }
  void done() {
    if (tty_) std::printf("\n");
  }

 private:
  std::string label_;
  long total_;
  bool tty_;
  Clock::time_point start_;
};

/// Training batches: the pairs in an order reshuffled every epoch (Fisher-Yates from the counter RNG), the
/// same for every run of the same data and batch size. next(step, ...) fills the batch of step `step` (1-based).
class Batches {
 public:
  Batches(const PairSet& data, long batch, std::uint64_t seed = 7)
      : data_(data), batch_(batch), order_(static_cast<std::size_t>(data.keys.rows())), cursor_(data.keys.rows()), shuffle_(seed, 3) {
    std::iota(order_.begin(), order_.end(), 0L);
  }
  void next(long step, Mat& x, std::vector<int>& labels) {
    const long k = data_.keys.rows();
    x.resize(batch_, data_.keys.cols());
    labels.resize(static_cast<std::size_t>(batch_));
    for (long r = 0; r < batch_; ++r) {
      if (cursor_ == k) {
        for (long i = k - 1; i > 0; --i) {
          std::swap(order_[static_cast<std::size_t>(i)], order_[shuffle_.bits(static_cast<std::uint64_t>(step * k + i)) % static_cast<std::uint64_t>(i + 1)]);
        }
        cursor_ = 0;
      }
      const long idx = order_[static_cast<std::size_t>(cursor_++)];
      x.row(r) = data_.keys.row(idx);
      labels[static_cast<std::size_t>(r)] = data_.labels[static_cast<std::size_t>(idx)];
    }
  }

 private:
  const PairSet& data_;
  long batch_;
  std::vector<long> order_;
  long cursor_;  // == pairs: shuffle before the next pair
  peer::CounterRng shuffle_;
};

struct TrainOptions {
  long steps = 1000, batch = 512, classes = 512;
  double dense_lr = 3e-3, expert_lr = 1e-2;
  std::uint64_t seed = 1;
};

struct TrainResult {
  double accuracy = 0, final_loss = 0, seconds = 0, tokens_per_s = 0;
  double usage = -1, unevenness = -1;
  long parameters = 0;
};

/// Trains `layer` (PeerLayer or DenseFfw: same interface) followed by a linear readout to the classes,
/// with Adam (lazy Adam on the expert table, its own learning rate), then measures accuracy on all pairs
/// in evaluation mode. `stats` (may be null) collects the experts' z' over the evaluation pass.
template <typename Layer>
TrainResult train_memorize(const std::string& label, const Layer& layer, const PairSet& data, const TrainOptions& o,
                           peer::ExpertStats* stats) {
  const long d = data.keys.cols(), k = data.keys.rows();
  auto params = layer.make_parameters(o.seed);
  auto grads = layer.make_gradients();
  peer::Adam<float> opt(layer.layout(), peer::default_param_groups(o.dense_lr, peer::LrSchedule::warmup(50), o.expert_lr));
  // The readout: logits = W_o h + b_o, a small dense layer of our own with its own parameters.
  peer::Linear<float> readout(d, o.classes, peer::Bias::kLearned);
  peer::ParameterLayout readout_layout(4);
  readout.register_parameters(readout_layout, "readout.");
  peer::Parameters<float> rparams(readout_layout);
  readout.initialize(rparams, o.seed);
  peer::Gradients<float> rgrads(readout_layout);
  peer::Adam<float> ropt(readout_layout, {peer::ParamGroup{"readout", {""}, o.dense_lr, 0.0, peer::LrSchedule::warmup(50)}});
  typename peer::Linear<float>::Scratch rscratch;

  typename Layer::Cache cache;
  Mat x(o.batch, d), h(o.batch, d), logits(o.batch, o.classes), dlogits, dh(o.batch, d), none;
  std::vector<int> labels(static_cast<std::size_t>(o.batch));
  Batches batches(data, o.batch, o.seed);
  Progress progress(label, o.steps);
  TrainResult result;
  const auto start = Clock::now();
  double smoothed = 0;
  for (long step = 1; step <= o.steps; ++step) {
    batches.next(step, x, labels);
    layer.forward(params, x, h, cache, peer::Mode::kTrain);
    readout.forward(rparams, h, logits);
    long correct = 0;
    const double loss = softmax_cross_entropy(logits, labels, dlogits, correct);
    smoothed = step == 1 ? loss : 0.95 * smoothed + 0.05 * loss;
    grads.zero();
    rgrads.zero();
    dh.setZero();
    readout.backward(rparams, h, dlogits, dh, rgrads, rscratch);
    layer.backward(params, cache, dh, none, grads);
    opt.step(params, grads);
    ropt.step(rparams, rgrads);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    progress.update(step, smoothed, static_cast<double>(step * o.batch) / elapsed);
  }
  progress.done();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  result.tokens_per_s = static_cast<double>(o.steps * o.batch) / result.seconds;
  result.final_loss = smoothed;
  // Accuracy over every stored pair, in evaluation mode.
  long correct_total = 0;
  for (long b0 = 0; b0 < k; b0 += o.batch) {
    const long n = std::min(o.batch, k - b0);
    Mat xb = data.keys.middleRows(b0, n), hb(n, d), lb(n, o.classes), dl;
    std::vector<int> yb(data.labels.begin() + b0, data.labels.begin() + b0 + n);
    layer.forward(params, xb, hb, cache, peer::Mode::kEval);
    readout.forward(rparams, hb, lb);
    long correct = 0;
    softmax_cross_entropy(lb, yb, dl, correct);
    correct_total += correct;
    if constexpr (std::is_same<Layer, peer::PeerLayer<float>>::value) {
      if (stats != nullptr) stats->add(cache.ids, cache.gates);
    }
  }
  result.accuracy = static_cast<double>(correct_total) / static_cast<double>(k);
  result.parameters = static_cast<long>(layer.layout().num_parameters() + readout_layout.num_parameters());
  if (stats != nullptr) {
    result.usage = stats->usage();
    result.unevenness = stats->unevenness();
  }
  return result;
}

}  // namespace demo

#endif  // PEER_EXAMPLES_MEMORIZE_HPP
