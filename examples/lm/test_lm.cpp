// Tests of the language-model example: central-difference gradient checks in double for every transformer
// piece (norms, embedding, causal attention, head + cross-entropy, a block with each FFN kind, a whole
// model), causality of the logits, determinism across thread counts, bit-for-bit resume, and a short
// training run that must take the loss far below the unigram entropy of its text.
#include <peer/peer.hpp>

#include "lm/trainer.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using D = double;
using lm::Index;
using Mat = peer::RowMatrix<D>;

Mat random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  Mat m(rows, cols);
  const peer::CounterRng rng(seed, 7);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = scale * rng.normal(static_cast<std::uint64_t>(i));
  return m;
}

lm::TokenMatrix random_tokens(Index rows, Index cols, std::uint64_t seed, int vocab = 256) {
  lm::TokenMatrix t(rows, cols);
  const peer::CounterRng rng(seed, 11);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<int>(rng.bits(static_cast<std::uint64_t>(i)) % static_cast<std::uint64_t>(vocab));
  return t;
}

/// Perturbs single parameters by +-eps and compares the central difference of the loss with the analytic
/// derivative. Perturbations that change a layer's routing (the selected experts) are skipped.
struct GradientChecker {
  std::function<double()> loss;
  std::function<std::vector<std::int64_t>()> routing = [] { return std::vector<std::int64_t>{}; };
  double eps = 1e-6, rtol = 2e-5, atol = 1e-8;
  int checked = 0, skipped = 0;

  /// Checks `count` entries of `values` (all when count <= 0 or >= size), spread evenly.
  void check(const std::string& what, D* values, Index size, const D* analytic, Index count = 0) {
    const std::vector<std::int64_t> base = routing();
    const Index n = count <= 0 || count >= size ? size : count;
    for (Index j = 0; j < n; ++j) {
      const Index i = n == size ? j : j * size / n;
      const D saved = values[i];
      values[i] = saved + eps;
      const double plus = loss();
      const bool same_plus = routing() == base;
      values[i] = saved - eps;
      const double minus = loss();
      const bool same_minus = routing() == base;
      values[i] = saved;
      if (!same_plus || !same_minus) {
        ++skipped;
        continue;
      }
      const double numeric = (plus - minus) / (2 * eps);
      const double a = analytic[i];
      EXPECT_LE(std::abs(numeric - a), atol + rtol * std::max(std::abs(numeric), std::abs(a)))
          << what << "[" << i << "]: numeric " << numeric << " analytic " << a;
      ++checked;
    }
  }

  /// Every dense tensor of `params` against `grads`.
  void check_dense(peer::Parameters<D>& params, peer::Gradients<D>& grads, const std::string& label, Index per_tensor = 40) {
    for (const auto& s : params.layout().dense()) {
      auto p = params.find(s.name);
      auto g = grads.find_dense(s.name);
      check(label + s.name, p.data(), s.size(), g.data(), per_tensor);
    }
  }

  /// The touched rows of every row-sparse table (the rows the gradient holds; other rows have gradient 0).
  void check_tables(peer::Parameters<D>& params, peer::Gradients<D>& grads, const std::string& label, Index rows = 4) {
    for (const auto& s : params.layout().tables()) {
      auto p = params.find(s.name);
      const auto& g = grads.find_table(s.name);
      ASSERT_GT(g.size(), 0) << label << s.name;
      const Index n = std::min<Index>(rows, g.size());
      for (Index r = 0; r < n; ++r) {
        const Index k = r * g.size() / n;  // the k-th stored row
        const Index id = g.ids()[static_cast<std::size_t>(k)];
        check(label + s.name + " row " + std::to_string(id), p.row(id).data(), s.cols, g.values().row(k).data());
      }
    }
  }
};

double dot(const Mat& a, const Mat& b) { return (a.array() * b.array()).sum(); }

// ---- Norms ---------------------------------------------------------------------------------------------

class NormGradient : public ::testing::TestWithParam<lm::NormKind> {};

TEST_P(NormGradient, MatchesCentralDifferences) {
  const Index n = 6, d = 10;
  lm::Norm<D> norm(GetParam(), d, 1e-5);
  peer::ParameterLayout layout(8);
  norm.register_parameters(layout, "norm.");
  peer::Parameters<D> params(layout);
  norm.initialize(params);
  for (const auto& s : layout.dense()) params.find(s.name) += random_matrix(s.rows, s.cols, 3, 0.3);
  Mat x = random_matrix(n, d, 1), r = random_matrix(n, d, 2), y(n, d), dx = Mat::Zero(n, d);
  lm::Norm<D>::Cache cache;
  norm.forward(params, x, y, cache);
  peer::Gradients<D> grads(layout);
  norm.backward(params, cache, r, dx, grads);
  GradientChecker c;
  c.loss = [&] {
    Mat out(n, d);
    lm::Norm<D>::Cache tmp;
    norm.forward(params, x, out, tmp);
    return dot(out, r);
  };
  c.check("x", x.data(), x.size(), dx.data());
  c.check_dense(params, grads, "");
  EXPECT_EQ(c.checked, x.size() + layout.num_parameters());
}

INSTANTIATE_TEST_SUITE_P(Kinds, NormGradient, ::testing::Values(lm::NormKind::kRms, lm::NormKind::kLayer),
                         [](const auto& p) { return std::string(lm::to_string(p.param)); });

// ---- Embedding ----------------------------------------------------------------------------------------

TEST(EmbeddingGradient, TokensAndLearnedPositions) {
  const Index b = 3, t = 7, d = 5;
  lm::Embedding<D> emb(lm::kVocab, d, 9, lm::PositionKind::kLearned);
  peer::ParameterLayout layout(8);
  emb.register_parameters(layout, "embed.");
  peer::Parameters<D> params(layout);
  emb.initialize(params, 1);
  const lm::TokenMatrix tokens = random_tokens(b, t, 4, 6);  // few distinct bytes: rows are shared
  const Mat r = random_matrix(b * t, d, 5);
  peer::Gradients<D> grads(layout);
  lm::Embedding<D>::Scratch scratch;
  emb.backward(tokens, r, grads, scratch);
  GradientChecker c;
  c.loss = [&] {
    Mat x(b * t, d);
    emb.forward(params, tokens, x);
    return dot(x, r);
  };
  auto e = params.find("embed.tokens");
  auto ge = grads.find_dense("embed.tokens");
  c.check("embed.tokens (used rows)", e.data(), 6 * d, ge.data());
  c.check("embed.tokens (unused rows)", e.row(200).data(), d, ge.row(200).data());
  auto p = params.find("embed.positions");
  c.check("embed.positions", p.data(), p.size(), grads.find_dense("embed.positions").data());
  EXPECT_EQ(c.checked, 6 * d + d + 9 * d);
}

// ---- Attention ----------------------------------------------------------------------------------------

class AttentionGradient : public ::testing::TestWithParam<lm::PositionKind> {};

TEST_P(AttentionGradient, CausalMultiHeadMatchesCentralDifferences) {
  // T = 40 spans two causal tiles of 32 rows.
  const Index b = 2, t = 40, d = 8;
  lm::CausalSelfAttention<D> attn(lm::AttentionConfig{d, 2, 48, GetParam(), 10000.0});
  peer::ParameterLayout layout(8);
  attn.register_parameters(layout, "attn.");
  peer::Parameters<D> params(layout);
  attn.initialize(params, 3, 0.5);
  Mat x = random_matrix(b * t, d, 1), r = random_matrix(b * t, d, 2), y(b * t, d), dx = Mat::Zero(b * t, d);
  lm::CausalSelfAttention<D>::Cache cache;
  attn.forward(params, x, y, b, t, cache);
  peer::Gradients<D> grads(layout);
  attn.backward(params, cache, r, dx, grads);
  GradientChecker c;
  c.loss = [&] {
    Mat out(b * t, d);
    lm::CausalSelfAttention<D>::Cache tmp;
    attn.forward(params, x, out, b, t, tmp);
    return dot(out, r);
  };
  c.check("x", x.data(), x.size(), dx.data(), 200);
  c.check_dense(params, grads, "", 120);
  EXPECT_EQ(c.checked, 200 + 120 + 64);  // x, 120 of W_qkv's 192, all of W_o
}

TEST_P(AttentionGradient, OutputsAtEarlierPositionsIgnoreLaterInputs) {
  const Index t = 45, d = 8;
  lm::CausalSelfAttention<D> attn(lm::AttentionConfig{d, 2, 48, GetParam(), 10000.0});
  peer::ParameterLayout layout(8);
  attn.register_parameters(layout, "attn.");
  peer::Parameters<D> params(layout);
  attn.initialize(params, 3);
  Mat x = random_matrix(t, d, 1), y(t, d), y2(t, d);
  lm::CausalSelfAttention<D>::Cache cache;
  attn.forward(params, x, y, 1, t, cache);
  x.row(37) = random_matrix(1, d, 9);
  attn.forward(params, x, y2, 1, t, cache);
  EXPECT_TRUE(y.topRows(37) == y2.topRows(37));  // bit for bit
  EXPECT_FALSE(y.row(37) == y2.row(37));
}

INSTANTIATE_TEST_SUITE_P(Positions, AttentionGradient, ::testing::Values(lm::PositionKind::kLearned, lm::PositionKind::kRotary),
                         [](const auto& p) { return std::string(lm::to_string(p.param)); });

// ---- Output head and cross-entropy --------------------------------------------------------------------

class HeadGradient : public ::testing::TestWithParam<bool> {};

TEST_P(HeadGradient, CrossEntropyMatchesCentralDifferences) {
  const bool tied = GetParam();
  const Index n = 9, d = 6;
  lm::Embedding<D> emb(lm::kVocab, d, 4, lm::PositionKind::kRotary);
  lm::OutputHead<D> head(d, lm::kVocab, tied);
  peer::ParameterLayout layout(8);
  emb.register_parameters(layout, "embed.");
  head.register_parameters(layout, "head.", emb.token_table());
  peer::Parameters<D> params(layout);
  emb.initialize(params, 1);
  head.initialize(params, 1);
  params.find(tied ? "embed.tokens" : "head.weight") *= 20.0;  // logits of order 1
  Mat h = random_matrix(n, d, 1), dh = Mat::Zero(n, d), logits(n, lm::kVocab), dlogits;
  const lm::TokenMatrix targets = random_tokens(1, n, 3);
  std::vector<double> rows;
  head.forward(params, h, logits);
  lm::softmax_cross_entropy<D>(logits, targets, &dlogits, 1.0 / static_cast<D>(n), rows);
  peer::Gradients<D> grads(layout);
  lm::OutputHead<D>::Scratch scratch;
  head.backward(params, h, dlogits, dh, grads, scratch);
  GradientChecker c;
  c.loss = [&] {
    Mat l(n, lm::kVocab);
    std::vector<double> tmp;
    head.forward(params, h, l);
    return lm::softmax_cross_entropy<D>(l, targets, nullptr, 0.0, tmp) / static_cast<double>(n);
  };
  c.check("h", h.data(), h.size(), dh.data());
  const std::string w = tied ? "embed.tokens" : "head.weight";
  auto p = params.find(w);
  auto g = grads.find_dense(w);
  for (Index i = 0; i < n; ++i) {  // the target rows carry the -1 of the one-hot
    const Index row = targets(0, i);
    c.check(w + " target row", p.row(row).data(), d, g.row(row).data());
  }
  c.check(w, p.data(), p.size(), g.data(), 300);
  EXPECT_EQ(c.checked, n * d + n * d + 300);
}

INSTANTIATE_TEST_SUITE_P(Tying, HeadGradient, ::testing::Values(true, false),
                         [](const auto& p) { return std::string(p.param ? "tied" : "untied"); });

TEST(CrossEntropy, UniformLogitsGiveLogVocabulary) {
  const Mat logits = Mat::Zero(3, lm::kVocab);
  std::vector<double> rows;
  EXPECT_NEAR(lm::softmax_cross_entropy<D>(logits, random_tokens(1, 3, 1), nullptr, 0.0, rows), 3 * std::log(256.0), 1e-12);
}

// ---- Small configurations of every FFN kind -------------------------------------------------------------

lm::LmConfig tiny_config(lm::FfnKind kind, Index d = 8) {
  lm::LmConfig c;
  c.context = 12;
  c.num_layers = 2;
  c.num_heads = 2;
  c.ffn = kind;
  c.ffn_hidden = 12;
  c.peer.num_experts = 16;  // n = 4
  c.peer.num_heads = 2;
  c.peer.top_k = 2;
  c.peer.sub_key_top_k = 2;
  c.peer.key_dim = 4;
  c.pkm = c.peer;
  c.pkm.top_k = 3;
  c.pkm.sub_key_top_k = 3;
  c.moe.num_experts = 4;
  c.moe.expert_hidden = 6;
  c.moe.top_k = 2;
  c.moe.load_balance_weight = 0.01;
  c.set_model_dim(d);
  return c;
}

const lm::FfnKind kAllKinds[] = {lm::FfnKind::kDense, lm::FfnKind::kMoe, lm::FfnKind::kPkm, lm::FfnKind::kPeer};

class BlockGradient : public ::testing::TestWithParam<lm::FfnKind> {};

TEST_P(BlockGradient, EveryParameterAndInputMatchesCentralDifferences) {
  const lm::LmConfig config = tiny_config(GetParam());
  const Index b = 2, t = 6, d = config.model_dim;
  lm::Transformer<D> model(config);  // block 1 is the sparse (middle) block
  const lm::Block<D>& block = model.block(1);
  ASSERT_EQ(block.ffn().kind(), GetParam());
  auto params = model.make_parameters(5);
  for (const auto& s : model.layout().dense()) {  // norms away from the identity
    if (s.rows == 1) params.find(s.name) += random_matrix(1, s.cols, 8, 0.2);
  }
  auto grads = model.make_gradients();
  peer::LayerViews<D> views(model.model_layout(), params, grads);
  auto& own = views.params(lm::Transformer<D>::kOwnLayer);
  auto& ffn = views.params(lm::Transformer<D>::ffn_layer(1));
  Mat x = random_matrix(b * t, d, 1), r = random_matrix(b * t, d, 2), y(b * t, d), dx = Mat::Zero(b * t, d);
  lm::Block<D>::Cache cache;
  block.forward(own, ffn, x, y, b, t, cache, peer::Mode::kTrain);
  block.backward(own, ffn, cache, r, dx, views.grads(lm::Transformer<D>::kOwnLayer), views.grads(lm::Transformer<D>::ffn_layer(1)));
  lm::Block<D>::Cache probe;
  GradientChecker c;
  c.loss = [&] {
    Mat out(b * t, d);
    block.forward(own, ffn, x, out, b, t, probe, peer::Mode::kTrain);
    return dot(out, r) + block.ffn().aux_loss(*probe.ffn);
  };
  c.routing = [&] { return probe.ffn ? block.ffn().routing(*probe.ffn) : std::vector<std::int64_t>{}; };
  c.loss();
  c.check("x", x.data(), x.size(), dx.data());
  // The block's own tensors (blocks.1.*) and its FFN's (blocks.1.ffn.*), all in the one model set.
  for (const auto& s : model.layout().dense()) {
    if (s.name.rfind("blocks.1.", 0) != 0) continue;
    c.check(s.name, params.find(s.name).data(), s.size(), grads.find_dense(s.name).data(), 40);
  }
  c.check_tables(params, grads, "");
  EXPECT_GT(c.checked, 250);
  EXPECT_LT(c.skipped, c.checked / 10);
}

INSTANTIATE_TEST_SUITE_P(Kinds, BlockGradient, ::testing::ValuesIn(kAllKinds),
                         [](const auto& p) { return std::string(lm::to_string(p.param)); });

// ---- The whole model -----------------------------------------------------------------------------------

struct ModelCase {
  lm::FfnKind kind;
  lm::PositionKind positions;
  lm::NormKind norm;
  bool tied;
};

class ModelGradient : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGradient, LossGradientMatchesCentralDifferences) {
  const ModelCase mc = GetParam();
  lm::LmConfig config = tiny_config(mc.kind);
  config.positions = mc.positions;
  config.norm = mc.norm;
  config.tied_head = mc.tied;
  config.sparse_blocks = {0, 1};
  lm::Transformer<D> model(config);
  auto params = model.make_parameters(2);
  // Larger embeddings than the 0.02 initialization, so that the loss depends visibly on everything.
  params.find("embed.tokens") *= 30.0;
  auto grads = model.make_gradients();
  const lm::TokenMatrix inputs = random_tokens(2, 9, 1, 12), targets = random_tokens(2, 9, 2, 12);
  lm::Transformer<D>::Cache cache, probe;
  model.forward(params, inputs, cache, peer::Mode::kTrain);
  model.loss(cache, targets, true);
  model.backward(params, cache, grads);
  // Routing held at the first forward's in every FFN (FeedForward::forward_held): no perturbation can
  // flip a top-k, so nothing is skipped.
  GradientChecker c;
  c.loss = [&] {
    model.forward(params, inputs, probe, peer::Mode::kTrain, &cache);
    return model.loss(probe, targets, false) + model.aux_loss(probe);
  };
  c.routing = [&] {
    std::vector<std::int64_t> all;
    for (Index l = 0; l < model.num_layers(); ++l) {
      if (probe.blocks.size() > static_cast<std::size_t>(l)) {
        const auto r = model.ffn(l).routing(*probe.blocks[static_cast<std::size_t>(l)].ffn);
        all.insert(all.end(), r.begin(), r.end());
      }
    }
    return all;
  };
  c.loss();
  c.check_dense(params, grads, "", 16);
  c.check_tables(params, grads, "", 2);
  EXPECT_GT(c.checked, 200);
  EXPECT_EQ(c.skipped, 0) << "routing held fixed: no perturbation may change it";
}

INSTANTIATE_TEST_SUITE_P(
    Configurations, ModelGradient,
    ::testing::Values(ModelCase{lm::FfnKind::kDense, lm::PositionKind::kLearned, lm::NormKind::kRms, true},
                      ModelCase{lm::FfnKind::kMoe, lm::PositionKind::kRotary, lm::NormKind::kLayer, false},
                      ModelCase{lm::FfnKind::kPkm, lm::PositionKind::kLearned, lm::NormKind::kLayer, true},
                      ModelCase{lm::FfnKind::kPeer, lm::PositionKind::kRotary, lm::NormKind::kRms, false}),
    [](const auto& p) {
      return std::string(lm::to_string(p.param.kind)) + "_" + lm::to_string(p.param.positions) + "_" +
             lm::to_string(p.param.norm) + (p.param.tied ? "_tied" : "_untied");
    });

// ---- Causality ----------------------------------------------------------------------------------------

/// Logits of one sequence, and of the same sequence with byte `changed` replaced.
template <typename Scalar>
std::pair<peer::RowMatrix<Scalar>, peer::RowMatrix<Scalar>> logits_before_after(const lm::LmConfig& config, peer::Mode mode,
                                                                                Index changed, Index batch = 1) {
  lm::Transformer<Scalar> model(config);
  auto params = model.make_parameters(4);
  lm::TokenMatrix tokens = random_tokens(batch, config.context, 6);
  typename lm::Transformer<Scalar>::Cache cache;
  model.forward(params, tokens, cache, mode);
  peer::RowMatrix<Scalar> before = cache.logits;
  auto params2 = model.make_parameters(4);  // training mode updated running statistics: start again
  tokens(0, changed) = (tokens(0, changed) + 101) % 256;
  model.forward(params2, tokens, cache, mode);
  return {before, cache.logits};
}

class Causality : public ::testing::TestWithParam<lm::FfnKind> {};

/// Earlier rows must be equal: bit for bit, except with the MoE, whose experts each run one GEMM over the
/// tokens routed to them. A later byte that changes its expert changes those GEMMs' row counts, and with
/// them Eigen's blocking and so the last bits of the other rows (no information flows: the difference is
/// rounding, about 1e-7 relative). The MoE is checked to a relative 1e-5 instead.
void expect_causal(lm::FfnKind kind, const peer::RowMatrix<float>& before, const peer::RowMatrix<float>& after, Index changed) {
  if (kind != lm::FfnKind::kMoe) {
    EXPECT_TRUE(before.topRows(changed) == after.topRows(changed)) << "byte " << changed;  // bit for bit
  } else {
    const double diff = (before.topRows(changed) - after.topRows(changed)).cwiseAbs().maxCoeff();
    EXPECT_LE(diff, 1e-5 * before.topRows(changed).cwiseAbs().maxCoeff()) << "byte " << changed;
  }
  EXPECT_FALSE(before.row(changed) == after.row(changed)) << "byte " << changed;
}

TEST_P(Causality, ChangingALaterByteNeverChangesEarlierLogitsInEvaluation) {
  lm::LmConfig config = tiny_config(GetParam(), 16);
  config.context = 40;
  config.sparse_blocks = {0, 1};
  for (const Index changed : {Index{1}, Index{20}, Index{33}, Index{39}}) {
    const auto [before, after] = logits_before_after<float>(config, peer::Mode::kEval, changed);
    expect_causal(GetParam(), before, after, changed);
  }
}

TEST_P(Causality, LayerNormedQueriesAreCausalInTrainingToo) {
  lm::LmConfig config = tiny_config(GetParam(), 16);
  config.context = 40;
  config.sparse_blocks = {0, 1};
  config.peer.query_norm = peer::QueryNorm::kLayerNorm;
  config.pkm.query_norm = peer::QueryNorm::kLayerNorm;
  const auto [before, after] = logits_before_after<float>(config, peer::Mode::kTrain, 25);
  expect_causal(GetParam(), before, after, 25);
}

INSTANTIATE_TEST_SUITE_P(Kinds, Causality, ::testing::ValuesIn(kAllKinds),
                         [](const auto& p) { return std::string(lm::to_string(p.param)); });

TEST(Causality, BatchNormedQueriesShareStatisticsAcrossPositionsInTraining) {
  // Documented behaviour, not a bug: in training mode the batch-norm statistics of PEER's queries are taken
  // over every position of the batch, so a later byte moves the normalization of earlier queries.
  lm::LmConfig config = tiny_config(lm::FfnKind::kPeer, 16);
  config.context = 40;
  const auto [before, after] = logits_before_after<double>(config, peer::Mode::kTrain, 30);
  EXPECT_FALSE(before.topRows(30) == after.topRows(30));
}

// ---- Training ------------------------------------------------------------------------------------------

/// A deterministic text of sentences drawn from a small vocabulary (no file, no network): easy structure
/// for a model to learn (spelling, spaces, sentence ends), with a unigram entropy near 4 bits per byte.
std::string generated_text(Index bytes) {
  static const char* words[] = {"the",   "king",  "of",    "israel", "said",  "unto",  "them",  "and",  "lord",
                                "house", "their", "land",  "people", "went",  "came",  "shall", "be",   "with",
                                "all",   "for",   "which", "there",  "upon",  "his",   "hath",  "not",  "city",
                                "heard", "sons",  "water", "bread",  "gold",  "night", "morning"};
  constexpr std::uint64_t kWords = sizeof(words) / sizeof(words[0]);
  const peer::CounterRng rng(42, 1);
  std::string text;
  std::uint64_t i = 0;
  while (static_cast<Index>(text.size()) < bytes) {
    const std::uint64_t len = 4 + rng.bits(i++) % 6;
    for (std::uint64_t w = 0; w < len; ++w) {
      std::string word = words[rng.bits(i++) % kWords];
      if (w == 0) word[0] = static_cast<char>(word[0] - 'a' + 'A');
      text += word;
      text += w + 1 == len ? ".\n" : " ";
    }
  }
  text.resize(static_cast<std::size_t>(bytes));
  return text;
}

lm::Corpus generated_corpus() {
  const std::string text = generated_text(200000);
  return lm::Corpus::split(lm::Bytes(text.begin(), text.end()), 0.1, 4096);
}

lm::LmConfig small_config(lm::FfnKind kind) {
  lm::LmConfig c;
  c.context = 32;
  c.num_layers = 2;
  c.num_heads = 2;
  c.ffn = kind;
  c.peer = lm::default_peer_config(32);
  c.peer.num_experts = 32 * 32;
  c.peer.num_heads = 4;
  c.peer.top_k = 8;
  c.peer.sub_key_top_k = 8;
  c.peer.key_dim = 16;
  c.set_model_dim(32);
  return c;
}

TEST(Training, PeerModelGoesFarBelowTheUnigramEntropy) {
  const lm::Corpus corpus = generated_corpus();
  const double unigram = lm::unigram_entropy_bits(corpus.validation);
  lm::TrainOptions o;
  o.batch = 16;
  o.steps = 200;
  o.lr = 1e-2;
  o.expert_lr = 1e-2;
  o.warmup = 20;
  o.eval_every = 0;
  o.final_eval_windows = 64;
  o.progress = false;
  lm::Trainer<float> trainer(small_config(lm::FfnKind::kPeer), o, corpus);
  const lm::Evaluation start = trainer.evaluate(corpus.validation, 64);
  const lm::Evaluation end = trainer.run();
  std::printf("unigram %.3f bits/byte; validation %.3f -> %.3f bits/byte in %lld steps (%.1f s)\n", unigram, start.bits_per_byte(),
              end.bits_per_byte(), static_cast<long long>(trainer.step()), trainer.seconds());
  EXPECT_GT(unigram, 3.5);
  EXPECT_NEAR(start.bits_per_byte(), 8.0, 0.2);  // uniform over 256 bytes at initialization
  EXPECT_LT(end.bits_per_byte(), 0.5 * unigram);
  ASSERT_EQ(trainer.expert_stats().size(), 1U);
  EXPECT_GT(trainer.expert_stats()[0].usage, 0.1);
  const std::string sample = trainer.sample("The king ", 40, 0.5, 0, 1);
  EXPECT_EQ(sample.size(), 40U);
  EXPECT_EQ(sample, trainer.sample("The king ", 40, 0.5, 0, 1));  // deterministic
}

lm::TrainOptions short_options() {
  lm::TrainOptions o;
  o.batch = 4;
  o.steps = 6;
  o.warmup = 2;
  o.eval_every = 0;
  o.final_eval_windows = 4;
  o.progress = false;
  return o;
}

/// Every parameter of a trainer, flattened.
std::vector<float> all_parameters(lm::Trainer<float>& t) {
  std::vector<float> out;
  auto add = [&](peer::Parameters<float>& p) {
    out.insert(out.end(), p.dense_data(), p.dense_data() + p.layout().dense_size());
    out.insert(out.end(), p.buffer_data(), p.buffer_data() + p.layout().buffer_size());
    for (const auto& s : p.layout().tables()) {
      const auto m = p.find(s.name);
      out.insert(out.end(), m.data(), m.data() + m.size());
    }
  };
  add(t.parameters());
  return out;
}

class Determinism : public ::testing::TestWithParam<lm::FfnKind> {};

TEST_P(Determinism, TrainingIsBitwiseIdenticalForOneAndTwoThreads) {
#if defined(_OPENMP)
  const lm::Corpus corpus = generated_corpus();
  const lm::LmConfig config = small_config(GetParam());
  const int saved = omp_get_max_threads(), saved_dynamic = omp_get_dynamic();
  omp_set_dynamic(0);
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    // The team the library's loop really gets (OMP_THREAD_LIMIT would silently make it 1).
    std::atomic<int> team{1};
    peer::parallel_for(64, 1, [&](peer::Index, peer::Index, int) {
      int n = omp_get_num_threads(), cur = team.load();
      while (n > cur && !team.compare_exchange_weak(cur, n)) {
      }
    });
    EXPECT_EQ(team.load(), threads) << "the parallel loop must really run on " << threads << " threads";
    lm::Trainer<float> trainer(config, short_options(), corpus);
    for (int s = 0; s < 4; ++s) trainer.train_step();
    results.push_back(all_parameters(trainer));
  }
  omp_set_num_threads(saved);
  omp_set_dynamic(saved_dynamic);
  ASSERT_EQ(results[0].size(), results[1].size());
  EXPECT_EQ(std::memcmp(results[0].data(), results[1].data(), results[0].size() * sizeof(float)), 0) << "bit patterns";
#else
  GTEST_SKIP() << "built without OpenMP";
#endif
}

TEST_P(Determinism, ResumedRunEqualsUninterruptedRun) {
  const lm::Corpus corpus = generated_corpus();
  const lm::LmConfig config = small_config(GetParam());
  const std::string path = ::testing::TempDir() + "lm_resume_" + lm::to_string(GetParam()) + ".ckpt";
  lm::Trainer<float> straight(config, short_options(), corpus);
  for (int s = 0; s < 6; ++s) straight.train_step();
  {
    lm::Trainer<float> first(config, short_options(), corpus);
    for (int s = 0; s < 3; ++s) first.train_step();
    first.save(path);
  }
  lm::Trainer<float> resumed(config, short_options(), corpus);
  resumed.train_step();  // moves parameters, moments and the step away from the checkpoint's
  resumed.train_step();
  resumed.load(path);
  EXPECT_EQ(resumed.step(), 3);
  for (int s = 0; s < 3; ++s) resumed.train_step();
  EXPECT_TRUE(all_parameters(straight) == all_parameters(resumed));
  std::remove(path.c_str());
}

/// The lines of a CSV file, each split at commas.
std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::vector<std::string>> rows;
  for (std::string line; std::getline(in, line);) {
    std::vector<std::string> cells;
    std::stringstream ss(line);
    for (std::string cell; std::getline(ss, cell, ',');) cells.push_back(cell);
    rows.push_back(cells);
  }
  return rows;
}

// What scripts/soak relies on: a run stopped with stop_after and resumed by another trainer (as another
// process would) ends where the uninterrupted run ends, and logs the same evaluations; the log names its
// columns, counts steps per process and non-finite parameters.
TEST(Checkpoint, StoppedAndResumedRunLogsWhatTheUninterruptedRunLogs) {
  const lm::Corpus corpus = generated_corpus();
  const lm::LmConfig config = small_config(lm::FfnKind::kPeer);
  const std::string dir = ::testing::TempDir();
  lm::TrainOptions o = short_options();
  o.eval_every = 1;
  o.eval_windows = 4;
  o.log_csv = dir + "lm_straight.csv";
  lm::Trainer<float> straight(config, o, corpus);
  straight.run();

  o.log_csv = dir + "lm_segments.csv";
  o.checkpoint = dir + "lm_segments.ckpt";
  o.stop_after = 4;
  {
    lm::Trainer<float> first(config, o, corpus);
    first.run();
    EXPECT_EQ(first.step(), 4);
  }
  o.stop_after = 0;
  lm::Trainer<float> second(config, o, corpus);
  second.load(o.checkpoint);
  second.run();
  EXPECT_EQ(second.step(), 6);
  EXPECT_TRUE(all_parameters(straight) == all_parameters(second));

  const auto a = read_csv(dir + "lm_straight.csv"), b = read_csv(dir + "lm_segments.csv");
  const std::vector<std::string> header = {"step", "tokens", "flops", "train_loss", "val_loss", "val_bpb", "seconds", "val_tokens",
                                           "process_steps", "rss_mib", "nonfinite_params", "usage_1", "unevenness_1"};
  ASSERT_EQ(a.size(), 8U);  // header, steps 0-5, the final evaluation at 6
  ASSERT_EQ(b.size(), 8U);  // the stopped run logs 0-4 and no final line; the resumed one 5 and the final 6
  EXPECT_EQ(a[0], header);
  EXPECT_EQ(b[0], header);
  for (std::size_t i = 1; i < a.size(); ++i) {
    ASSERT_EQ(a[i].size(), header.size());
    ASSERT_EQ(b[i].size(), header.size());
    EXPECT_EQ(a[i][0], b[i][0]);
    for (std::size_t c : {4, 5, 10, 11, 12}) EXPECT_EQ(a[i][c], b[i][c]) << "line " << i << ", " << header[c];
    EXPECT_EQ(a[i][10], "0");
    EXPECT_GT(std::stod(a[i][9]), 0.0);  // the resident set, in MiB
  }
  EXPECT_EQ(b[5][8], "4");  // the stopped process ran 4 steps
  EXPECT_EQ(b[6][8], "1");  // the resumed one starts counting again
  EXPECT_EQ(a[7][8], "6");

  EXPECT_EQ(second.count_nonfinite(), 0);
  const std::string table = second.parameters().layout().tables().at(0).name;  // the expert table
  second.parameters().find(table)(5, 3) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(second.count_nonfinite(), 1);
  for (const auto& f : {o.checkpoint, dir + "lm_straight.csv", dir + "lm_segments.csv"}) std::remove(f.c_str());
}

TEST(Checkpoint, LoadRejectsADifferentModel) {
  const lm::Corpus corpus = generated_corpus();
  const std::string path = ::testing::TempDir() + "lm_mismatch.ckpt";
  lm::Trainer<float> peer_trainer(small_config(lm::FfnKind::kPeer), short_options(), corpus);
  peer_trainer.save(path);
  lm::Trainer<float> dense_trainer(small_config(lm::FfnKind::kDense), short_options(), corpus);
  EXPECT_THROW(dense_trainer.load(path), std::runtime_error);
  std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(Kinds, Determinism, ::testing::ValuesIn(kAllKinds),
                         [](const auto& p) { return std::string(lm::to_string(p.param)); });

// ---- Data and costs ------------------------------------------------------------------------------------

TEST(Data, SplitHoldsOutEvenlySpreadChunksAndBatchesDependOnlyOnTheStep) {
  lm::Bytes text(100000);
  for (std::size_t i = 0; i < text.size(); ++i) text[i] = static_cast<std::uint8_t>(i % 251);
  const lm::Corpus c = lm::Corpus::split(text, 0.1, 1000);
  EXPECT_EQ(c.train.size() + c.validation.size(), text.size());
  EXPECT_EQ(c.validation.size(), 10000U);
  lm::TokenMatrix a, at, b, bt;
  lm::training_batch(c.train, 3, 8, 1, 5, a, at);
  lm::training_batch(c.train, 3, 8, 1, 5, b, bt);
  EXPECT_TRUE(a == b);
  for (Index r = 0; r < 3; ++r) {
    for (Index t = 0; t + 1 < 8; ++t) EXPECT_EQ(at(r, t), a(r, t + 1));
  }
  lm::training_batch(c.train, 3, 8, 1, 6, b, bt);
  EXPECT_FALSE(a == b);
  EXPECT_EQ(lm::evaluation_windows(c.validation, 8, 0).size(), (c.validation.size() - 1) / 8);
  EXPECT_NEAR(lm::unigram_entropy_bits(text), std::log2(251.0), 1e-3);
}

TEST(Costs, DenseModelFlopsMatchAHandCount) {
  lm::LmConfig c = tiny_config(lm::FfnKind::kDense, 64);
  c.context = 64;  // two causal tiles of 32: keys 32 and 64, mean 48
  lm::Transformer<float> model(c);
  const double d = 64, f = 12, v = 256, keys = 48;
  const double forward = 2 * (8 * d * d + 4 * d * keys + 4 * d * f) + 2 * d * v;
  EXPECT_DOUBLE_EQ(model.forward_flops_per_token(), forward);
  EXPECT_DOUBLE_EQ(model.backward_flops_per_token(), 2 * forward);
  EXPECT_DOUBLE_EQ(model.total_parameters(), static_cast<double>(model.own_layout().num_parameters()) +
                                                 2 * (2 * d * f + f + d));
  // The model set holds exactly those: the transformer's own tensors and both blocks' FFNs.
  EXPECT_DOUBLE_EQ(static_cast<double>(model.layout().num_parameters()), model.total_parameters());
}

}  // namespace
