// lm_train: trains a small byte-level transformer language model whose feed-forward blocks are dense FFWs,
// a coarse MoE, a product-key memory or a PEER layer, on any text file. lm_train --help lists the options;
// docs/lm.md describes the model, the data and the comparison.
#include <peer/peer.hpp>

#include "lm/trainer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

const char* kUsage = R"(lm_train --text FILE [options]

Trains a decoder-only byte-level transformer on FILE (any text; bytes are the tokens) and reports
validation bits per byte. The feed-forward part of the sparse blocks (by default the middle one) is a
dense FFW, a coarse MoE, a product-key memory or a PEER layer; every other block is dense.

Data
  --text FILE              training text (required)
  --val-fraction F         held-out fraction, in 16 KiB chunks spread over the text (0.05)
Model
  --ffn KIND               dense | moe | pkm | peer (dense)
  --sparse-blocks B        middle | all | comma-separated block indices (middle = L / 2)
  --layers L  --dim D  --heads H  --context T      (4, 128, 4, 128)
  --positions P            learned | rotary (learned)
  --norm N                 rms | layer (rms)
  --head H                 tied | untied (tied)
  --ffn-hidden F           hidden width of the dense FFWs (4 D)
PEER / PKM (defaults scale with D; see docs/lm.md)
  --experts N  --expert-heads H  --top-k K  --key-dim DK
  --query-norm Q           batch_norm | layer_norm | none (batch_norm; layer_norm is causal in training too)
  --expert-storage S       native | bfloat16: the expert / value tables' storage (native = float)
  --table-optimizer R      default | partial_row_wise_adam | row_wise_adagrad (default: AdamW's m and v per entry)
  --moment-storage S       native | bfloat16: the tables' Adam moments (bfloat16: stochastic rounding)
MoE
  --moe-experts E  --moe-hidden F  --moe-top-k K  (16, 2 D, 2)
  --moe-routing R          token_choice | expert_choice (token_choice)
  --moe-balance W          load-balancing loss weight (0.01)
Training
  --steps S | --flops C    steps, or a budget in training FLOPs (forward + backward) (1000)
  --batch B                sequences per step (16)
  --lr LR  --expert-lr LR  dense tensors (cosine, 2e-3) and expert / value tables (constant, 2e-2)
  --weight-decay W  --warmup S  --min-lr-factor F  --clip C      (0.1, 50, 0.1, 1.0)
  --seed S  --threads N
Evaluation and output
  --eval-every S  --eval-windows W  --final-eval-windows W    (250, 256, 0 = all)
  --evals N                N evaluations spread over the run (instead of --eval-every)
  --log FILE.csv           one line per evaluation (losses, resident set, non-finite parameters, expert usage)
  --summary FILE.json      the run's figures, for scripts/lm_compare
  --no-progress            no progress bar
Checkpoints
  --checkpoint FILE  --save-every S  --resume     (resume continues FILE if it exists)
  --stop-after S           stop (and save) at step S of the run; --resume continues it in a later process
Sampling
  --prompt TEXT  --sample-bytes N  --temperature T  --sample-top-k K   (none, 200, 0.8, 0)
)";

struct Args {
  std::map<std::string, std::string> values;
  bool has(const std::string& k) const { return values.count(k) > 0; }
  std::string str(const std::string& k, const std::string& fallback) const { return has(k) ? values.at(k) : fallback; }
  long integer(const std::string& k, long fallback) const {
    if (!has(k)) return fallback;
    char* end = nullptr;
    const long v = std::strtol(values.at(k).c_str(), &end, 10);
    if (*end != '\0') throw std::invalid_argument("--" + k + " = " + values.at(k) + " must be an integer");
    return v;
  }
  double real(const std::string& k, double fallback) const {
    if (!has(k)) return fallback;
    char* end = nullptr;
    const double v = std::strtod(values.at(k).c_str(), &end);
    if (*end != '\0') throw std::invalid_argument("--" + k + " = " + values.at(k) + " must be a number");
    return v;
  }
};

Args parse(int argc, char** argv) {
  static const std::vector<std::string> flags = {"resume", "no-progress"};
  static const std::vector<std::string> known = {
      "text", "val-fraction", "ffn", "sparse-blocks", "layers", "dim", "heads", "context", "positions", "norm", "head",
      "ffn-hidden", "experts", "expert-heads", "top-k", "key-dim", "query-norm", "expert-storage", "table-optimizer",
      "moment-storage", "moe-experts", "moe-hidden", "moe-top-k",
      "moe-routing", "moe-balance", "steps", "flops", "batch", "lr", "expert-lr", "weight-decay", "warmup", "min-lr-factor",
      "clip", "seed", "threads", "stop-after", "eval-every", "evals", "eval-windows", "final-eval-windows", "log", "summary", "checkpoint",
      "save-every", "prompt", "sample-bytes", "temperature", "sample-top-k"};
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument " + arg + " (see --help)");
    arg = arg.substr(2);
    if (std::find(flags.begin(), flags.end(), arg) != flags.end()) {
      a.values[arg] = "1";
      continue;
    }
    if (std::find(known.begin(), known.end(), arg) == known.end()) throw std::invalid_argument("unknown option --" + arg + " (see --help)");
    if (i + 1 >= argc) throw std::invalid_argument("--" + arg + " needs a value");
    a.values[arg] = argv[++i];
  }
  return a;
}

peer::TableStorage storage_from_string(const std::string& option, const std::string& value) {
  if (value == "native") return peer::TableStorage::kNative;
  if (value == "bfloat16") return peer::TableStorage::kBFloat16;
  throw std::invalid_argument("--" + option + " = " + value + " must be native or bfloat16");
}

lm::LmConfig make_config(const Args& a) {
  lm::LmConfig c;
  const long d = a.integer("dim", 128);
  c.context = a.integer("context", 128);
  c.num_layers = a.integer("layers", 4);
  c.num_heads = a.integer("heads", 4);
  c.positions = lm::position_kind_from_string(a.str("positions", "learned"));
  c.norm = lm::norm_kind_from_string(a.str("norm", "rms"));
  const std::string head = a.str("head", "tied");
  if (head != "tied" && head != "untied") throw std::invalid_argument("--head must be tied or untied");
  c.tied_head = head == "tied";
  c.ffn_hidden = a.integer("ffn-hidden", 0);
  c.ffn = lm::ffn_kind_from_string(a.str("ffn", "dense"));
  c.peer = lm::default_peer_config(d);
  c.pkm = lm::default_pkm_config(d);
  c.moe = lm::default_moe_config(d);
  c.set_model_dim(d);
  const std::string blocks = a.str("sparse-blocks", "middle");
  if (blocks == "all") {
    for (long l = 0; l < c.num_layers; ++l) c.sparse_blocks.push_back(l);
  } else if (blocks != "middle") {
    std::stringstream in(blocks);
    std::string item;
    while (std::getline(in, item, ',')) c.sparse_blocks.push_back(std::stol(item));
  }
  for (peer::PeerConfig* p : {&c.peer, &c.pkm}) {
    if (a.has("experts")) p->num_experts = a.integer("experts", 0);
    if (a.has("expert-heads")) p->num_heads = a.integer("expert-heads", 0);
    if (a.has("top-k")) p->top_k = p->sub_key_top_k = a.integer("top-k", 0);
    if (a.has("key-dim")) p->key_dim = a.integer("key-dim", 0);
    if (a.has("query-norm")) p->query_norm = peer::query_norm_from_string(a.str("query-norm", ""));
    if (a.has("expert-storage")) p->expert_storage = storage_from_string("expert-storage", a.str("expert-storage", ""));
    p->sub_key_top_k = std::min<peer::Index>(p->sub_key_top_k, p->num_sub_keys());
  }
  if (a.has("moe-experts")) c.moe.num_experts = a.integer("moe-experts", 0);
  if (a.has("moe-hidden")) c.moe.expert_hidden = a.integer("moe-hidden", 0);
  if (a.has("moe-top-k")) c.moe.top_k = a.integer("moe-top-k", 0);
  if (a.has("moe-routing")) c.moe.routing = peer::moe_routing_from_string(a.str("moe-routing", ""));
  c.moe.load_balance_weight = a.real("moe-balance", c.moe.load_balance_weight);
  return c;
}

lm::TrainOptions make_options(const Args& a) {
  lm::TrainOptions o;
  o.batch = a.integer("batch", o.batch);
  o.steps = a.integer("steps", o.steps);
  o.flops = a.real("flops", 0);
  o.lr = a.real("lr", o.lr);
  o.expert_lr = a.real("expert-lr", o.expert_lr);
  o.weight_decay = a.real("weight-decay", o.weight_decay);
  o.warmup = a.integer("warmup", o.warmup);
  o.min_lr_factor = a.real("min-lr-factor", o.min_lr_factor);
  o.clip = a.real("clip", o.clip);
  if (a.has("moment-storage")) o.moment_storage = storage_from_string("moment-storage", a.str("moment-storage", ""));
  if (a.has("table-optimizer")) {
    const std::string r = a.str("table-optimizer", "");
    bool found = false;
    for (auto t : {peer::TableOptimizer::kDefault, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableOptimizer::kRowWiseAdagrad}) {
      if (r == peer::to_string(t)) {
        o.table_optimizer = t;
        found = true;
      }
    }
    if (!found) throw std::invalid_argument("--table-optimizer = " + r + " must be default, partial_row_wise_adam or row_wise_adagrad");
  }
  o.seed = static_cast<std::uint64_t>(a.integer("seed", 1));
  o.eval_every = a.integer("eval-every", o.eval_every);
  o.evals = a.integer("evals", 0);
  o.eval_windows = a.integer("eval-windows", o.eval_windows);
  o.final_eval_windows = a.integer("final-eval-windows", o.final_eval_windows);
  o.checkpoint = a.str("checkpoint", "");
  o.save_every = a.integer("save-every", 0);
  o.resume = a.has("resume");
  o.stop_after = a.integer("stop-after", 0);
  if (o.stop_after < 0) throw std::invalid_argument("--stop-after must be >= 0");
  o.log_csv = a.str("log", "");
  o.progress = !a.has("no-progress");
  if (o.batch < 1) throw std::invalid_argument("--batch must be >= 1");
  return o;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out;
}

/// The text with control characters (but newlines and tabs) and bytes that are not valid UTF-8 replaced by
/// '?': a half-trained byte model emits arbitrary bytes.
std::string printable(const std::string& s) {
  std::string out;
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = len > 0 && i + len <= n && (c >= 0x20 || c == '\n' || c == '\t');
    for (std::size_t j = 1; ok && j < len; ++j) ok = (static_cast<unsigned char>(s[i + j]) >> 6) == 0x2;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += '?';
      ++i;
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  if (!args.has("text")) throw std::invalid_argument("--text FILE is required (see --help)");
#if defined(_OPENMP)
  if (args.has("threads")) omp_set_num_threads(static_cast<int>(args.integer("threads", 1)));
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const lm::LmConfig config = make_config(args);
  const lm::TrainOptions options = make_options(args);
  const std::string path = args.str("text", "");
  const lm::Corpus corpus = lm::Corpus::split(lm::read_file(path), args.real("val-fraction", 0.05));
  const double unigram = lm::unigram_entropy_bits(corpus.train);

  lm::Trainer<float> trainer(config, options, corpus);
  const auto& model = trainer.model();
  std::cout << std::fixed << std::setprecision(3) << "text " << path << ": " << corpus.train.size() << " training bytes, "
            << corpus.validation.size() << " validation bytes; unigram entropy " << unigram << " bits/byte\n"
            << "model: " << config.num_layers << " blocks, D = " << config.model_dim << ", " << config.num_heads
            << " attention heads, context " << config.context << ", " << lm::to_string(config.positions) << " positions, "
            << lm::to_string(config.norm) << " norm, " << (config.tied_head ? "tied" : "untied") << " head\n";
  for (peer::Index l = 0; l < model.num_layers(); ++l) std::cout << "  block " << l << " FFN: " << model.ffn(l).describe() << "\n";
  std::cout << std::setprecision(2) << "  parameters " << model.total_parameters() / 1e6 << " M, active per token "
            << model.active_parameters_per_token() / 1e6 << " M; " << model.training_flops_per_token() / 1e6
            << " MFLOP per token per training step (" << model.forward_flops_per_token() / 1e6 << " forward)\n"
            << "training: " << trainer.total_steps() << " steps of " << trainer.tokens_per_step() << " tokens = "
            << std::scientific << std::setprecision(3) << static_cast<double>(trainer.total_steps()) * trainer.flops_per_step()
            << std::fixed << " FLOPs, AdamW lr " << std::setprecision(4) << options.lr << " (cosine), tables " << options.expert_lr
            << " (lazy), " << threads << " thread(s), seed " << options.seed << "\n";

  if (options.resume && !options.checkpoint.empty() && std::ifstream(options.checkpoint).good()) {
    trainer.load(options.checkpoint);
    std::cout << "resumed " << options.checkpoint << " at step " << trainer.step() << std::endl;  // flushed: scripts/soak reads it from a process it kills
  }
  const lm::Evaluation result = trainer.run([&](std::int64_t step, double train_loss, const lm::Evaluation& e) {
    if (step == 0) return;
    if (options.progress && isatty(1)) std::printf("\n");  // below the progress bar's line
    std::printf("  step %lld: train loss %.4f, validation %.4f nats = %.4f bits/byte, perplexity %.3f\n",
                static_cast<long long>(step), train_loss, e.loss, e.bits_per_byte(), e.perplexity());
  });
  const double run_tokens = static_cast<double>(trainer.step()) * static_cast<double>(trainer.tokens_per_step());
  std::cout << std::setprecision(4) << "final validation (" << result.tokens << " bytes): " << result.loss << " nats/byte, "
            << result.bits_per_byte() << " bits/byte, perplexity " << result.perplexity() << " (unigram " << unigram
            << " bits/byte); " << std::setprecision(1) << trainer.seconds() << " s of training, "
            << std::setprecision(0) << run_tokens / std::max(trainer.seconds(), 1e-9) << " tokens/s\n";
  for (const auto& s : trainer.expert_stats()) {
    std::cout << std::setprecision(3) << "  block " << s.block << " (" << lm::to_string(s.kind) << ") over the validation pass: usage "
              << 100 * s.usage << "% of " << s.experts << ", unevenness KL(z || uniform) = " << s.unevenness << " nats; most used:";
    for (const auto& e : s.most_used) std::cout << " #" << e.id << " (" << e.selections << "x)";
    std::cout << "\n";
  }

  std::string sample;
  if (args.has("prompt")) {
    sample = trainer.sample(args.str("prompt", ""), args.integer("sample-bytes", 200), args.real("temperature", 0.8),
                            args.integer("sample-top-k", 0), options.seed);
    std::cout << "sample: " << printable(args.str("prompt", "")) << "|" << printable(sample) << "\n";
  }

  if (args.has("summary")) {
    std::ofstream out(args.str("summary", ""));
    if (!out) throw std::runtime_error("cannot write " + args.str("summary", ""));
    std::string sparse_desc;
    for (peer::Index l = 0; l < model.num_layers(); ++l) {
      if (config.is_sparse(l)) sparse_desc += (sparse_desc.empty() ? "" : "; ") + model.ffn(l).describe();
    }
    out << std::setprecision(10) << std::defaultfloat << "{\n"
        << "  \"kind\": \"" << lm::to_string(config.ffn) << "\",\n"
        << "  \"sparse_ffn\": \"" << json_escape(sparse_desc) << "\",\n"
        << "  \"dim\": " << config.model_dim << ", \"layers\": " << config.num_layers << ", \"heads\": " << config.num_heads
        << ", \"context\": " << config.context << ", \"batch\": " << options.batch << ",\n"
        << "  \"parameters\": " << model.total_parameters() << ", \"active_parameters\": " << model.active_parameters_per_token() << ",\n"
        << "  \"forward_flops_per_token\": " << model.forward_flops_per_token()
        << ", \"training_flops_per_token\": " << model.training_flops_per_token() << ",\n"
        << "  \"steps\": " << trainer.step() << ", \"tokens\": " << run_tokens
        << ", \"flops\": " << static_cast<double>(trainer.step()) * trainer.flops_per_step() << ",\n"
        << "  \"expert_storage\": \"" << peer::to_string(config.peer.expert_storage) << "\", \"table_optimizer\": \""
        << peer::to_string(options.table_optimizer) << "\", \"moment_storage\": \"" << peer::to_string(options.moment_storage) << "\",\n"
        << "  \"lr\": " << options.lr << ", \"expert_lr\": " << options.expert_lr << ", \"seed\": " << options.seed
        << ", \"threads\": " << threads << ",\n"
        << "  \"train_loss\": " << trainer.last_train_loss() << ", \"val_loss\": " << result.loss
        << ", \"val_bpb\": " << result.bits_per_byte() << ", \"val_ppl\": " << result.perplexity()
        << ", \"val_tokens\": " << result.tokens << ", \"unigram_bpb\": " << unigram << ",\n"
        << "  \"seconds\": " << trainer.seconds() << ", \"tokens_per_s\": " << run_tokens / std::max(trainer.seconds(), 1e-9) << ",\n"
        << "  \"expert_stats\": [";
    bool first = true;
    for (const auto& s : trainer.expert_stats()) {
      out << (first ? "" : ", ") << "{\"block\": " << s.block << ", \"experts\": " << s.experts << ", \"usage\": " << s.usage
          << ", \"unevenness\": " << s.unevenness << "}";
      first = false;
    }
    out << "],\n  \"sample\": \"" << json_escape(printable(sample)) << "\"\n}\n";
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "lm_train: " << e.what() << "\n";
  return 2;
}
