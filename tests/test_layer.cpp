// The whole PEER layer against the naive loop implementation of test_util.hpp.
#include "test_util.hpp"

namespace {

using namespace peer_test;

struct Variant {
  std::string name;
  std::function<void(peer::PeerConfig&)> apply;
};

std::vector<Variant> variants() {
  std::vector<Variant> v;
  for (auto act : {peer::Activation::kReLU, peer::Activation::kGelu, peer::Activation::kGeluTanh,
                   peer::Activation::kSiLU}) {
    for (auto gate : {peer::Gating::kSoftmax, peer::Gating::kReLU, peer::Gating::kSigmoid}) {
      v.push_back({std::string(peer::to_string(act)) + "/" + peer::to_string(gate), [=](peer::PeerConfig& c) {
                     c.activation = act;
                     c.gating = gate;
                   }});
    }
  }
  v.push_back({"layer_norm", [](peer::PeerConfig& c) { c.query_norm = peer::QueryNorm::kLayerNorm; }});
  v.push_back({"half_layer_norm", [](peer::PeerConfig& c) { c.query_norm = peer::QueryNorm::kHalfLayerNorm; }});
  v.push_back({"no_norm+bias", [](peer::PeerConfig& c) {
                 c.query_norm = peer::QueryNorm::kNone;
                 c.query_bias = peer::Bias::kLearned;
               }});
  v.push_back({"per_head_keys", [](peer::PeerConfig& c) { c.key_sharing = peer::KeySharing::kPerHead; }});
  v.push_back({"k'>k", [](peer::PeerConfig& c) { c.sub_key_top_k = c.top_k + 2; }});
  v.push_back({"bf16_checked_scoring", [](peer::PeerConfig& c) { c.sub_key_scoring = peer::SubKeyScoring::kBFloat16Checked; }});
  return v;
}

// Layer: PeerLayer<S> (default) or ProductKeyMemory<S>.
template <typename S, typename Layer = peer::PeerLayer<S>>
void compare_with_naive(peer::PeerConfig c, const std::string& label, peer::Mode mode, bool with_mask,
                        double tol, double min_margin) {
  Layer layer(c);
  auto params = layer.make_parameters(42);
  if (c.query_bias == peer::Bias::kLearned) params.find("query.bias") = random_matrix<S>(1, c.num_heads * c.key_dim, 77);
  if (c.query_norm != peer::QueryNorm::kNone) {
    const Index a = params.find("query.norm.weight").cols();  // H Dk, or Dk / 2 when shared by half-queries
    params.find("query.norm.weight") = random_matrix<S>(1, a, 78).array() + S(1.5);
    params.find("query.norm.bias") = random_matrix<S>(1, a, 79, 0.3);
  }
  if (mode == peer::Mode::kEval) {
    params.find("query.norm.running_mean") = random_matrix<S>(1, c.num_heads * c.key_dim, 80, 0.2);
    params.find("query.norm.running_var") = random_matrix<S>(1, c.num_heads * c.key_dim, 81, 0.5).array() + S(1);
  }
  const Index b = 23;
  const Mat<S> x = random_matrix<S>(b, c.model_dim, 5);
  peer::RowMask mask = peer::RowMask::Constant(b, true);
  for (Index t = 0; t < b; t += 4) mask[t] = false;
  const peer::RowMask* m = with_mask ? &mask : nullptr;
  const NaiveOutput naive = naive_peer_forward(c, params, x, mode, m);
  Mat<S> y(b, c.model_dim);
  y.setConstant(std::numeric_limits<S>::quiet_NaN());
  typename Layer::Cache cache;
  layer.forward(params, x, y, cache, mode, m);
  Index compared = 0;
  for (Index t = 0; t < b; ++t) {
    bool clear = true;
    for (Index h = 0; h < c.num_heads; ++h) clear &= naive.margin[static_cast<std::size_t>(t * c.num_heads + h)] > min_margin;
    if (!clear) continue;  // a near-tie at the cut: either choice is right up to rounding
    ++compared;
    for (Index h = 0; h < c.num_heads; ++h) {
      for (Index j = 0; j < c.top_k; ++j) {
        ASSERT_EQ(cache.ids(t, h * c.top_k + j), naive.ids[static_cast<std::size_t>(t * c.num_heads + h)][static_cast<std::size_t>(j)])
            << label << " token " << t << " head " << h << " rank " << j;
      }
    }
    for (Index i = 0; i < c.model_dim; ++i) {
      EXPECT_NEAR(static_cast<double>(y(t, i)), naive.y(t, i), tol * (1 + std::abs(naive.y(t, i))))
          << label << " token " << t << " dim " << i;
    }
  }
  EXPECT_GE(compared, b * 3 / 4) << label;
}

TEST(PeerLayer, EqualsNaiveLoopsDouble) {
  for (const auto& v : variants()) {
    peer::PeerConfig c = small_config(12, 6, 3, 8, 4, 4);
    v.apply(c);
    compare_with_naive<double>(c, v.name, peer::Mode::kTrain, false, 1e-11, 1e-9);
  }
}

TEST(PeerLayer, EqualsNaiveLoopsFloat) {
  for (const auto& v : variants()) {
    peer::PeerConfig c = small_config(12, 6, 3, 8, 4, 4);
    v.apply(c);
    compare_with_naive<float>(c, v.name, peer::Mode::kTrain, false, 2e-5, 1e-3);
  }
}

TEST(ProductKeyMemory, EqualsNaiveLoopsFloatAndDouble) {
  for (const auto& v : variants()) {
    if (v.name.rfind("relu/", 0) != 0) continue;  // the activation is not used: one per gating is enough
    peer::PeerConfig c = small_config(12, 6, 3, 8, 4, 4);
    v.apply(c);
    compare_with_naive<double, peer::ProductKeyMemory<double>>(c, "pkm " + v.name, peer::Mode::kTrain, false, 1e-11, 1e-9);
    compare_with_naive<float, peer::ProductKeyMemory<float>>(c, "pkm " + v.name, peer::Mode::kTrain, false, 2e-5, 1e-3);
  }
  for (const auto& v : variants()) {
    if (v.name.find('/') != std::string::npos) continue;
    peer::PeerConfig c = small_config(12, 6, 3, 8, 4, 4);
    v.apply(c);
    compare_with_naive<double, peer::ProductKeyMemory<double>>(c, "pkm " + v.name, peer::Mode::kTrain, false, 1e-11, 1e-9);
  }
  const peer::PeerConfig c = small_config(10, 5, 2, 6, 3, 3);
  compare_with_naive<double, peer::ProductKeyMemory<double>>(c, "pkm train+mask", peer::Mode::kTrain, true, 1e-11, 1e-9);
  compare_with_naive<double, peer::ProductKeyMemory<double>>(c, "pkm eval", peer::Mode::kEval, false, 1e-11, 1e-9);
}

TEST(PeerLayer, BatchNormModesAndMaskEqualNaiveLoops) {
  const peer::PeerConfig c = small_config(10, 5, 2, 6, 3, 3);
  compare_with_naive<double>(c, "train", peer::Mode::kTrain, false, 1e-11, 1e-9);
  compare_with_naive<double>(c, "train+mask", peer::Mode::kTrain, true, 1e-11, 1e-9);
  compare_with_naive<double>(c, "eval", peer::Mode::kEval, false, 1e-11, 1e-9);
  compare_with_naive<float>(c, "eval float", peer::Mode::kEval, false, 2e-5, 1e-3);
}

TEST(PeerLayer, TrainingModeUpdatesRunningStatisticsWithMomentum) {
  peer::PeerConfig c = small_config(6, 4, 2, 4, 2, 2);
  c.batch_norm_momentum = 0.25;
  peer::PeerLayer<double> layer(c);
  auto params = layer.make_parameters(1);
  const Mat<double> x = random_matrix<double>(9, 6, 2);
  peer::RowMask mask = peer::RowMask::Constant(9, true);
  mask[0] = mask[5] = false;
  Mat<double> y(9, 6);
  peer::PeerLayer<double>::Cache cache;
  layer.forward(params, x, y, cache, peer::Mode::kTrain, &mask);
  const Mat<double> pre = x * params.find("query.weight").transpose();
  for (Index o = 0; o < 8; ++o) {
    double mean = 0, var = 0;
    for (Index t = 0; t < 9; ++t) mean += mask[t] ? pre(t, o) : 0.0;
    mean /= 7;
    for (Index t = 0; t < 9; ++t) var += mask[t] ? (pre(t, o) - mean) * (pre(t, o) - mean) : 0.0;
    EXPECT_NEAR(params.find("query.norm.running_mean")(0, o), 0.25 * mean, 1e-14);
    EXPECT_NEAR(params.find("query.norm.running_var")(0, o), 0.75 + 0.25 * var / 6, 1e-14);  // unbiased
  }
  const Mat<double> before = params.find("query.norm.running_mean");
  layer.forward(params, x, y, cache, peer::Mode::kEval);
  EXPECT_EQ(before, params.find("query.norm.running_mean")) << "evaluation must not change running statistics";
}

TEST(PeerLayer, OutputMayOverwriteTheInput) {
  const peer::PeerConfig c = small_config();
  peer::PeerLayer<float> layer(c);
  auto params = layer.make_parameters(3);
  Mat<float> x = random_matrix<float>(7, 8, 4);
  Mat<float> y(7, 8);
  peer::PeerLayer<float>::Cache cache;
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  layer.forward(params, x, x, cache, peer::Mode::kTrain);
  EXPECT_EQ(x, y);
}

}  // namespace
