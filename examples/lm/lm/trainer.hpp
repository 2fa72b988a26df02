// Training a Transformer the way a user's own loop would: AdamW with parameter groups (lazy Adam and its own
// learning rate on the expert / value tables), a cosine schedule, global gradient clipping, evaluation in
// bits per byte, expert statistics, checkpoints that resume bit for bit, and sampling.
#ifndef PEER_EXAMPLES_LM_TRAINER_HPP
#define PEER_EXAMPLES_LM_TRAINER_HPP

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "lm/data.hpp"
#include "lm/transformer.hpp"

namespace lm {

struct TrainOptions {
  Index batch = 16;              ///< sequences per step (each of the model's context)
  std::int64_t steps = 1000;     ///< training steps, unless flops > 0
  double flops = 0;              ///< a training budget in FLOPs: steps = budget / (FLOPs per step)
  double lr = 2e-3;              ///< dense tensors (peak of the cosine schedule)
  double expert_lr = 2e-2;       ///< the PEER expert / PKM value tables (lazy Adam, constant)
  double weight_decay = 0.1;     ///< AdamW, matrices only (not norms, biases, sub-keys or tables)
  std::int64_t warmup = 50;      ///< linear warm-up steps (at most a fifth of the run)
  double min_lr_factor = 0.1;    ///< the cosine ends at min_lr_factor * lr
  double clip = 1.0;             ///< global gradient-norm clip (0: none)
  std::uint64_t seed = 1;        ///< initialization and data order
  std::int64_t eval_every = 250; ///< steps between validation evaluations (0: only at the end)
  std::int64_t evals = 0;        ///< when > 0, overrides eval_every: this many evaluations spread over the run
  Index eval_windows = 256;      ///< validation windows of the periodic evaluations (0: all)
  Index final_eval_windows = 0;  ///< validation windows of the final evaluation (0: all)
  std::string checkpoint;        ///< file to save to (and resume from, with resume)
  std::int64_t save_every = 0;   ///< steps between checkpoints (0: only at the end, when a path is given)
  bool resume = false;           ///< continue from `checkpoint` when it exists
  std::int64_t stop_after = 0;   ///< when > 0, run() stops (and saves) at this step; the schedule still spans
                                 ///< total steps, so a later --resume continues the same run (scripts/soak)
  std::string log_csv;           ///< one line per evaluation: step, tokens, FLOPs, losses, seconds, evaluated bytes,
                                 ///< the steps this process ran, the resident set, the count of non-finite parameters, and each routed block's
                                 ///< usage and unevenness over that evaluation (the last line is the final one)
  bool progress = true;          ///< the progress bar on stdout
  /// The expert / value tables' optimizer state (peer/optim/adam.hpp; docs/storage.md).
  peer::TableOptimizer table_optimizer = peer::TableOptimizer::kDefault;
  peer::TableStorage moment_storage = peer::TableStorage::kNative;
};

/// What an evaluation measured.
struct Evaluation {
  double loss = 0;  ///< nats per byte
  double bits_per_byte() const { return loss / std::log(2.0); }
  double perplexity() const { return std::exp(loss); }
  Index tokens = 0;
};

/// Expert usage of one sparse block over an evaluation pass.
struct BlockStats {
  Index block = 0;
  FfnKind kind = FfnKind::kDense;
  Index experts = 0;
  double usage = 0, unevenness = 0;
  std::vector<peer::ExpertCount> most_used;
};

/// Prints a progress bar: a rewritten line on a terminal, a line every twentieth of the run otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(std::int64_t total) : total_(std::max<std::int64_t>(1, total)), tty_(isatty(1) != 0) {}
  void update(std::int64_t step, double loss, double tokens_per_s, double eta_s, double val_bpb) {
    const bool twentieth = step == total_ || (step * 20 / total_) != ((step - 1) * 20 / total_);
    if (!tty_ && !twentieth) return;
    const int width = 24, filled = static_cast<int>(width * step / total_);
    char val[32] = "";
    if (val_bpb > 0) std::snprintf(val, sizeof(val), "  val %.3f bpb", val_bpb);
    std::printf("%s[%s%s] step %6lld/%lld  loss %.4f%s  %7.0f tok/s  ETA %s%s", tty_ ? "\r" : "",
                std::string(static_cast<std::size_t>(filled), '#').c_str(),
                std::string(static_cast<std::size_t>(width - filled), '.').c_str(), static_cast<long long>(step),
                static_cast<long long>(total_), loss, val, tokens_per_s, clock(eta_s).c_str(), tty_ ? "  " : "\n");
    std::fflush(stdout);
  }
  void done() {
    if (tty_) std::printf("\n");
  }
  /// "1h02m", "3m05s", "42s".
  static std::string clock(double s) {
    const long t = static_cast<long>(std::lround(std::max(0.0, s)));
    char buf[32];
    if (t >= 3600) {
      std::snprintf(buf, sizeof(buf), "%ldh%02ldm", t / 3600, t / 60 % 60);
    } else if (t >= 60) {
      std::snprintf(buf, sizeof(buf), "%ldm%02lds", t / 60, t % 60);
    } else {
      std::snprintf(buf, sizeof(buf), "%lds", t);
    }
    return buf;
  }

 private:
  std::int64_t total_;
  bool tty_;
};

/// The process's resident set in MiB, from /proc/self/statm (Linux); -1 where that file does not exist.
inline double resident_mib() {
  std::ifstream statm("/proc/self/statm");
  long long size = 0, resident = -1;
  if (!(statm >> size >> resident)) return -1;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

template <typename Scalar = float>
class Trainer {
 public:
  using Clock = std::chrono::steady_clock;

  Trainer(const LmConfig& config, const TrainOptions& options, const Corpus& corpus)
      : options_(options),
        corpus_(corpus),
        model_(config),
        params_(model_.make_parameters(options.seed)),
        grads_(model_.make_gradients()) {
    const double per_step = static_cast<double>(options_.batch * config.context) * model_.training_flops_per_token();
    total_steps_ = options_.flops > 0 ? static_cast<std::int64_t>(std::floor(options_.flops / per_step)) : options_.steps;
    if (options_.flops > 0 && total_steps_ < 1) throw std::invalid_argument("the FLOP budget is smaller than one training step");
    if (total_steps_ < 0) throw std::invalid_argument("steps must be >= 0");
    if (options_.evals > 0) options_.eval_every = std::max<std::int64_t>(1, total_steps_ / options_.evals);
    const std::int64_t warmup = std::min(options_.warmup, total_steps_ / 5);
    const peer::LrSchedule schedule = peer::LrSchedule::cosine(warmup, std::max<std::int64_t>(total_steps_, warmup + 1), options_.min_lr_factor);
    optimizer_ = std::make_unique<peer::Adam<Scalar>>(model_.layout(), groups(model_.layout(), schedule), peer::AdamConfig::adamw());
    if (corpus_.train.size() <= static_cast<std::size_t>(config.context + 1) ||
        corpus_.validation.size() <= static_cast<std::size_t>(config.context + 1)) {
      throw std::invalid_argument("the text is too short for the context: training and validation parts need more than context + 1 bytes");
    }
  }

  const Transformer<Scalar>& model() const { return model_; }
  peer::Parameters<Scalar>& parameters() { return params_; }
  const TrainOptions& options() const { return options_; }
  std::int64_t step() const { return step_; }
  std::int64_t total_steps() const { return total_steps_; }
  double seconds() const { return seconds_; }
  /// Tokens (predicted bytes) per training step.
  Index tokens_per_step() const { return options_.batch * model_.config().context; }
  double flops_per_step() const { return static_cast<double>(tokens_per_step()) * model_.training_flops_per_token(); }

  /// One training step on the batch of step_ + 1; returns its loss (nats per byte, without the MoE's
  /// auxiliary loss).
  double train_step() {
    training_batch(corpus_.train, options_.batch, model_.config().context, options_.seed, step_, inputs_, targets_);
    model_.forward(params_, inputs_, cache_, peer::Mode::kTrain);
    const double loss = model_.loss(cache_, targets_, true);
    grads_.zero();
    model_.backward(params_, cache_, grads_);
    if (options_.clip > 0) peer::clip_gradient_norm(grads_, options_.clip);  // the whole model's norm
    optimizer_->step(params_, grads_);
    ++step_;
    return loss;
  }

  /// Validation loss over `max_windows` windows (0: all) in evaluation mode. With `stats`, also the expert
  /// usage of every sparse block with a routing.
  Evaluation evaluate(const Bytes& data, Index max_windows, std::vector<BlockStats>* stats = nullptr) {
    const Index t_len = model_.config().context, b = options_.batch;
    const std::vector<Index> starts = evaluation_windows(data, t_len, max_windows);
    std::vector<std::unique_ptr<peer::ExpertStats>> counters;
    for (Index l = 0; l < model_.num_layers(); ++l) {
      const Index n = model_.ffn(l).num_experts();
      counters.push_back(stats != nullptr && n > 0 ? std::make_unique<peer::ExpertStats>(n) : nullptr);
    }
    double total = 0;
    Index count = 0;
    TokenMatrix inputs, targets;
    for (std::size_t w0 = 0; w0 < starts.size(); w0 += static_cast<std::size_t>(b)) {
      const Index rows = std::min<Index>(b, static_cast<Index>(starts.size() - w0));
      inputs.resize(rows, t_len);
      targets.resize(rows, t_len);
      for (Index r = 0; r < rows; ++r) {
        const Index s = starts[w0 + static_cast<std::size_t>(r)];
        for (Index t = 0; t < t_len; ++t) {
          inputs(r, t) = data[static_cast<std::size_t>(s + t)];
          targets(r, t) = data[static_cast<std::size_t>(s + t + 1)];
        }
      }
      model_.forward(params_, inputs, eval_cache_, peer::Mode::kEval);
      total += model_.loss(eval_cache_, targets, false) * static_cast<double>(rows * t_len);
      count += rows * t_len;
      for (Index l = 0; l < model_.num_layers(); ++l) {
        if (counters[static_cast<std::size_t>(l)]) {
          model_.ffn(l).add_expert_stats(*eval_cache_.blocks[static_cast<std::size_t>(l)].ffn, *counters[static_cast<std::size_t>(l)]);
        }
      }
    }
    if (stats != nullptr) {
      stats->clear();
      for (Index l = 0; l < model_.num_layers(); ++l) {
        const auto& c = counters[static_cast<std::size_t>(l)];
        if (!c) continue;
        stats->push_back(BlockStats{l, model_.ffn(l).kind(), c->num_experts(), c->usage(), c->unevenness(), c->most_used(3)});
      }
    }
    Evaluation e;
    e.loss = total / static_cast<double>(std::max<Index>(count, 1));
    e.tokens = count;
    return e;
  }

  /// Parameters (dense tensors and table entries) that are inf or NaN, decided from bit patterns.
  std::int64_t count_nonfinite() const {
    std::int64_t bad = 0;
    const auto& layout = params_.layout();
    for (Index i = 0; i < layout.dense_size(); ++i) bad += peer::detail::is_finite(params_.dense_data()[i]) ? 0 : 1;
    std::vector<Scalar> row;
    for (std::size_t t = 0; t < layout.tables().size(); ++t) {
      const auto& table = params_.table(peer::TableHandle{static_cast<int>(t)});
      row.resize(static_cast<std::size_t>(table.cols()));
      for (Index r = 0; r < table.rows(); ++r) {
        table.read_row(r, row.data());
        for (const Scalar v : row) bad += peer::detail::is_finite(v) ? 0 : 1;
      }
    }
    return bad;
  }

  /// Registers everything a resumed run needs (the same calls build it for save and load).
  void register_checkpoint(peer::TrainingCheckpoint& ckpt) {
    ckpt.add_config("lm", model_.to_fields());
    ckpt.add_config("train", {{"seed", std::to_string(options_.seed)}, {"batch", std::to_string(options_.batch)}});
    ckpt.add_parameters("model", params_);
    ckpt.add_optimizer("adam", *optimizer_);
    ckpt.add_counter("step", &step_);
    ckpt.add_value("seconds", &seconds_text_);
  }
  void save(const std::string& path) {
    seconds_text_ = std::to_string(seconds_);
    peer::TrainingCheckpoint ckpt;
    register_checkpoint(ckpt);
    ckpt.save(path);
  }
  void load(const std::string& path) {
    peer::TrainingCheckpoint ckpt;
    register_checkpoint(ckpt);
    ckpt.load(path);
    seconds_ = std::stod(seconds_text_);
  }

  /// Trains up to total_steps(), evaluating every eval_every steps (and at the end), saving checkpoints, and
  /// calling on_eval(step, train_loss, evaluation) after each evaluation. Returns the final evaluation.
  Evaluation run(const std::function<void(std::int64_t, double, const Evaluation&)>& on_eval = nullptr) {
    ProgressBar bar(total_steps_);
    std::ofstream csv;
    if (!options_.log_csv.empty()) {
      const bool fresh = step_ == 0;
      csv.open(options_.log_csv, fresh ? std::ios::out : std::ios::app);
      if (!csv) throw std::runtime_error("cannot write " + options_.log_csv);
      if (fresh) {
        csv << "step,tokens,flops,train_loss,val_loss,val_bpb,seconds,val_tokens,process_steps,rss_mib,nonfinite_params";
        for (Index l = 0; l < model_.num_layers(); ++l) {
          if (model_.ffn(l).num_experts() > 0) csv << ",usage_" << l << ",unevenness_" << l;
        }
        csv << "\n";
      }
    }
    double smoothed = -1, last_bpb = -1;
    const std::int64_t first = step_;  // steps of this process = step_ - first
    auto write_line = [&](double train_loss, const Evaluation& e, const std::vector<BlockStats>& stats) {
      csv << step_ << "," << static_cast<double>(step_) * static_cast<double>(tokens_per_step()) << ","
          << static_cast<double>(step_) * flops_per_step() << "," << train_loss << "," << e.loss << "," << e.bits_per_byte() << ","
          << seconds_ << "," << e.tokens << "," << step_ - first << "," << resident_mib() << "," << count_nonfinite();
      for (const auto& b : stats) csv << "," << b.usage << "," << b.unevenness;
      csv << "\n";
      csv.flush();
    };
    std::vector<BlockStats> eval_stats;
    auto log_eval = [&](double train_loss) {
      const Evaluation e = evaluate(corpus_.validation, options_.eval_windows, &eval_stats);
      last_bpb = e.bits_per_byte();
      if (csv) write_line(train_loss, e, eval_stats);
      if (on_eval) on_eval(step_, train_loss, e);
    };
    if (step_ == 0 && options_.eval_every > 0) log_eval(std::log(256.0));
    const double seconds_before = seconds_;
    const std::int64_t last = options_.stop_after > 0 ? std::min(options_.stop_after, total_steps_) : total_steps_;
    while (step_ < last) {
      // Wall time counts training steps only (evaluations and checkpoints are left out).
      const auto start = Clock::now();
      const double loss = train_step();
      seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
      smoothed = smoothed < 0 ? loss : 0.98 * smoothed + 0.02 * loss;
      const double run_s = seconds_ - seconds_before;
      const double tps = static_cast<double>((step_ - first) * tokens_per_step()) / std::max(run_s, 1e-9);
      const double eta = run_s / static_cast<double>(step_ - first) * static_cast<double>(total_steps_ - step_);
      if (options_.progress) bar.update(step_, smoothed, tps, eta, last_bpb);
      const bool eval_now = options_.eval_every > 0 && step_ % options_.eval_every == 0 && step_ < total_steps_;
      if (eval_now) log_eval(smoothed);
      if (!options_.checkpoint.empty() && options_.save_every > 0 && step_ % options_.save_every == 0) save(options_.checkpoint);
    }
    if (options_.progress) bar.done();
    last_train_loss_ = smoothed;
    if (!options_.checkpoint.empty() && step_ > first) save(options_.checkpoint);
    const Evaluation final_eval = evaluate(corpus_.validation, options_.final_eval_windows, &stats_);
    // A run stopped early (stop_after) logs no final line: the next segment's evaluations continue the log.
    if (csv && step_ == total_steps_) write_line(smoothed, final_eval, stats_);
    if (on_eval) on_eval(step_, smoothed, final_eval);
    return final_eval;
  }

  /// Expert statistics of the last final evaluation.
  const std::vector<BlockStats>& expert_stats() const { return stats_; }
  /// The smoothed training loss at the end of run().
  double last_train_loss() const { return last_train_loss_; }

  /// Continues `prompt` by `count` bytes, each sampled from softmax(logits / temperature) restricted to the
  /// top_k most likely bytes (0: all), in evaluation mode, from the last `context` bytes. Deterministic in
  /// (seed, prompt).
  std::string sample(const std::string& prompt, Index count, double temperature, Index top_k, std::uint64_t seed) {
    std::vector<int> text(prompt.begin(), prompt.end());
    for (int& c : text) c &= 0xff;
    if (text.empty()) text.push_back('\n');
    const peer::CounterRng rng(seed, 0x73616d706c65ULL);  // stream "sample"
    typename Transformer<Scalar>::Cache cache;
    std::string out;
    std::vector<std::pair<double, int>> probs(kVocab);
    for (Index i = 0; i < count; ++i) {
      const Index len = std::min<Index>(model_.config().context, static_cast<Index>(text.size()));
      TokenMatrix in(1, len);
      for (Index t = 0; t < len; ++t) in(0, t) = text[text.size() - static_cast<std::size_t>(len - t)];
      model_.forward(params_, in, cache, peer::Mode::kEval);
      const auto row = cache.logits.row(len - 1);
      const double mx = static_cast<double>(row.maxCoeff());
      for (Index v = 0; v < kVocab; ++v) {
        probs[static_cast<std::size_t>(v)] = {std::exp((static_cast<double>(row(v)) - mx) / std::max(temperature, 1e-6)), static_cast<int>(v)};
      }
      std::stable_sort(probs.begin(), probs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      const std::size_t keep = top_k > 0 ? static_cast<std::size_t>(std::min<Index>(top_k, kVocab)) : probs.size();
      double z = 0;
      for (std::size_t j = 0; j < keep; ++j) z += probs[j].first;
      double u = rng.uniform(static_cast<std::uint64_t>(i)) * z;
      int next = probs[keep - 1].second;
      for (std::size_t j = 0; j < keep; ++j) {
        u -= probs[j].first;
        if (u < 0) {
          next = probs[j].second;
          break;
        }
      }
      text.push_back(next);
      out.push_back(static_cast<char>(next));
    }
    return out;
  }

 private:
  /// AdamW groups by tensor name: the expert / value tables (lazy Adam, expert_lr, constant, no decay);
  /// [1, F] tensors (norms, biases) and sub-keys without decay; every other matrix with weight decay.
  std::vector<peer::ParamGroup> groups(const peer::ParameterLayout& layout, const peer::LrSchedule& schedule) const {
    // Tables by kind; vectors ([1, F]: norms, biases) and sub-keys without decay; the other matrices with it.
    peer::ParamGroup tables{"tables", {""}, options_.expert_lr, 0.0, peer::LrSchedule::constant(), peer::GroupKinds::kTables};
    tables.table_optimizer = options_.table_optimizer;
    tables.moment_storage = options_.moment_storage;
    tables.rounding_seed = options_.seed;
    peer::ParamGroup plain{"no_decay", {"*.sub_keys.*"}, options_.lr, 0.0, schedule, peer::GroupKinds::kDense};
    peer::ParamGroup decay{"decay", {}, options_.lr, options_.weight_decay, schedule, peer::GroupKinds::kDense};
    for (const auto& s : layout.dense()) {
      if (s.rows == 1) plain.prefixes.push_back(s.name);
    }
    decay.prefixes.push_back("");
    return {tables, plain, decay};
  }

  TrainOptions options_;
  const Corpus& corpus_;
  Transformer<Scalar> model_;
  peer::Parameters<Scalar> params_;
  peer::Gradients<Scalar> grads_;
  std::unique_ptr<peer::Adam<Scalar>> optimizer_;  // one optimizer for the whole model
  typename Transformer<Scalar>::Cache cache_, eval_cache_;
  TokenMatrix inputs_, targets_;
  std::int64_t step_ = 0, total_steps_ = 0;
  double seconds_ = 0, last_train_loss_ = 0;
  std::string seconds_text_ = "0";
  std::vector<BlockStats> stats_;
};

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_TRAINER_HPP
