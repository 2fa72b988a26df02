// Central-difference gradient checks in double of every parameter and input of the PEER layer:
// L = <y, R> with random R; the selected experts must not change between the two evaluations.
#include "test_util.hpp"

namespace {

using namespace peer_test;

struct Case {
  std::string name;
  peer::PeerConfig config;
  peer::Mode mode = peer::Mode::kTrain;
  bool mask = false;
};

// Layer: PeerLayer<double> or ProductKeyMemory<double>.
template <typename Layer = peer::PeerLayer<double>>
void run_gradient_check(const Case& tc) {
  SCOPED_TRACE(tc.name);
  using Memory = std::decay_t<decltype(std::declval<Layer>().experts())>;
  const std::string table_name = Memory::kTableName;
  const peer::PeerConfig& c = tc.config;
  Layer layer(c);
  auto params = layer.make_parameters(2024);
  const Index f = c.num_heads * c.key_dim;
  // Non-trivial norm and bias parameters, so their gradients are exercised away from the identity.
  if (c.query_bias == peer::Bias::kLearned) params.find("query.bias") = random_matrix<double>(1, f, 1, 0.5);
  if (c.query_norm != peer::QueryNorm::kNone) {
    const Index a = params.find("query.norm.weight").cols();  // H Dk, or Dk / 2 when shared by half-queries
    params.find("query.norm.weight") = random_matrix<double>(1, a, 2, 0.5).array() + 1.0;
    params.find("query.norm.bias") = random_matrix<double>(1, a, 3, 0.5);
  }
  if (c.query_norm == peer::QueryNorm::kBatchNorm) {
    params.find("query.norm.running_mean") = random_matrix<double>(1, f, 4, 0.3);
    params.find("query.norm.running_var") = random_matrix<double>(1, f, 5, 0.5).array() + 1.0;
  }
  const Index b = 7;
  Mat<double> x = random_matrix<double>(b, c.model_dim, 6);
  const Mat<double> r = random_matrix<double>(b, c.model_dim, 7);
  peer::RowMask mask = peer::RowMask::Constant(b, true);
  mask[1] = mask[4] = false;
  const peer::RowMask* m = tc.mask ? &mask : nullptr;

  typename Layer::Cache cache, probe;
  Mat<double> y(b, c.model_dim);
  layer.forward(params, x, y, cache, tc.mode, m);
  auto grads = layer.make_gradients();
  Mat<double> dx = Mat<double>::Zero(b, c.model_dim);
  layer.backward(params, cache, r, dx, grads);

  auto loss = [&] {
    Mat<double> yp(b, c.model_dim);
    layer.forward(params, x, yp, probe, tc.mode, m);
    return (yp.array() * r.array()).sum();
  };
  auto same = [&] { return probe.ids == cache.ids; };

  GradCheckStats st = check_entries("x", x.data(), x.size(), [&](Index e) { return dx.data()[e]; }, loss, same);
  EXPECT_GE(st.checked, x.size() * 4 / 5) << "x";
  for (const auto& spec : layer.layout().dense()) {
    auto value = params.find(spec.name);
    auto grad = grads.find_dense(spec.name);
    st = check_entries(spec.name, value.data(), value.size(), [&](Index e) { return grad.data()[e]; }, loss, same);
    EXPECT_GE(st.checked, value.size() * 4 / 5) << spec.name;
  }
  // Expert table: every entry; rows never selected must be absent from the row-sparse gradient and
  // have a numerical gradient of zero.
  auto table = params.find(table_name);
  const auto& g = grads.find_table(table_name);
  const Index cols = Memory::row_cols(c.model_dim);
  std::vector<peer::ExpertId> touched(cache.ids.data(), cache.ids.data() + cache.ids.size());
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  EXPECT_EQ(g.ids(), touched);
  st = check_entries(table_name, table.data(), table.size(),
                     [&](Index e) {
                       const double* row = g.find(static_cast<peer::ExpertId>(e / cols));
                       return row == nullptr ? 0.0 : row[e % cols];
                     },
                     loss, same);
  EXPECT_GE(st.checked, table.size() * 4 / 5) << table_name;
}

peer::PeerConfig base(Index n = 6) { return small_config(6, n, 2, 6, 3, 3); }

TEST(Gradients, EveryActivationAndGatingMode) {
  for (auto act : {peer::Activation::kReLU, peer::Activation::kGelu, peer::Activation::kGeluTanh,
                   peer::Activation::kSiLU}) {
    for (auto gate : {peer::Gating::kSoftmax, peer::Gating::kReLU, peer::Gating::kSigmoid}) {
      Case tc{std::string(peer::to_string(act)) + "/" + peer::to_string(gate), base()};
      tc.config.activation = act;
      tc.config.gating = gate;
      run_gradient_check(tc);
    }
  }
}

TEST(Gradients, BatchNormTrainingWithMaskAndEvaluation) {
  Case train{"batch_norm train", base()};
  run_gradient_check(train);
  Case masked{"batch_norm train + mask", base()};
  masked.mask = true;
  run_gradient_check(masked);
  Case eval{"batch_norm eval", base()};
  eval.mode = peer::Mode::kEval;
  run_gradient_check(eval);
  Case eval_masked{"batch_norm eval + mask", base()};
  eval_masked.mode = peer::Mode::kEval;
  eval_masked.mask = true;
  run_gradient_check(eval_masked);
}

TEST(Gradients, LayerNormNoNormBiasAndPerHeadKeys) {
  Case ln{"layer_norm + bias", base()};
  ln.config.query_norm = peer::QueryNorm::kLayerNorm;
  ln.config.query_bias = peer::Bias::kLearned;
  run_gradient_check(ln);
  Case half{"half layer_norm (one affine map per half-query width)", base()};
  half.config.query_norm = peer::QueryNorm::kHalfLayerNorm;
  run_gradient_check(half);
  Case none{"no norm + bias", base()};
  none.config.query_norm = peer::QueryNorm::kNone;
  none.config.query_bias = peer::Bias::kLearned;
  run_gradient_check(none);
  Case per_head{"per-head keys", base()};
  per_head.config.key_sharing = peer::KeySharing::kPerHead;
  run_gradient_check(per_head);
}

TEST(Gradients, SubKeysScoredInBf16WithTheExactRecheck) {
  // The kept scores are re-check dots of the double queries and keys, so every gradient is exact.
  for (auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
    Case tc{std::string("bf16_checked / ") + peer::to_string(sharing), base()};
    tc.config.sub_key_scoring = peer::SubKeyScoring::kBFloat16Checked;
    tc.config.key_sharing = sharing;
    run_gradient_check(tc);
  }
}

TEST(Gradients, TwoHeadsSelectingTheSameExpert) {
  // N = 9 experts, 4 heads of top 3: every token's heads overlap, so expert rows get several slots.
  Case tc{"shared experts across heads", small_config(6, 3, 4, 4, 3, 3)};
  peer::PeerLayer<double> layer(tc.config);
  auto params = layer.make_parameters(2024);
  peer::PeerLayer<double>::Cache cache;
  Mat<double> x = random_matrix<double>(7, 6, 6), y(7, 6);
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  bool shared = false;
  for (Index t = 0; t < 7; ++t) {
    std::vector<int> seen(cache.ids.row(t).data(), cache.ids.row(t).data() + 12);
    std::sort(seen.begin(), seen.end());
    shared |= std::adjacent_find(seen.begin(), seen.end()) != seen.end();
  }
  ASSERT_TRUE(shared) << "the case must have two heads choosing one expert";
  run_gradient_check(tc);
}

TEST(Gradients, ProductKeyMemoryEveryGatingNormAndKeySharing) {
  using Pkm = peer::ProductKeyMemory<double>;
  for (auto gate : {peer::Gating::kSoftmax, peer::Gating::kReLU, peer::Gating::kSigmoid}) {
    Case tc{std::string("pkm ") + peer::to_string(gate), base()};
    tc.config.gating = gate;
    run_gradient_check<Pkm>(tc);
  }
  Case masked{"pkm batch_norm train + mask", base()};
  masked.mask = true;
  run_gradient_check<Pkm>(masked);
  Case eval{"pkm batch_norm eval", base()};
  eval.mode = peer::Mode::kEval;
  run_gradient_check<Pkm>(eval);
  Case ln{"pkm layer_norm + bias, per-head keys", base()};
  ln.config.query_norm = peer::QueryNorm::kLayerNorm;
  ln.config.query_bias = peer::Bias::kLearned;
  ln.config.key_sharing = peer::KeySharing::kPerHead;
  run_gradient_check<Pkm>(ln);
  Case half{"pkm half layer_norm, per-head keys, relu (product-key-memory's function)", base()};
  half.config.query_norm = peer::QueryNorm::kHalfLayerNorm;
  half.config.key_sharing = peer::KeySharing::kPerHead;
  half.config.gating = peer::Gating::kReLU;
  run_gradient_check<Pkm>(half);
  // N = 9 values, 4 heads of top 3: value rows get several slots per token.
  run_gradient_check<Pkm>(Case{"pkm shared values across heads", small_config(6, 3, 4, 4, 3, 3)});
}

TEST(Gradients, DenseFfwPlainAndGlu) {
  for (auto kind : {peer::FfwKind::kPlain, peer::FfwKind::kGlu}) {
    SCOPED_TRACE(kind == peer::FfwKind::kGlu ? "glu" : "plain");
    peer::DenseFfwConfig c{5, 7, peer::Activation::kGelu, kind, peer::Bias::kLearned};
    peer::DenseFfw<double> ffw(c);
    auto params = ffw.make_parameters(3);
    for (const auto& spec : ffw.layout().dense()) params.find(spec.name) = random_matrix<double>(spec.rows, spec.cols, 9);
    Mat<double> x = random_matrix<double>(6, 5, 1), y(6, 5);
    const Mat<double> r = random_matrix<double>(6, 5, 2);
    peer::DenseFfw<double>::Cache cache, probe;
    ffw.forward(params, x, y, cache, peer::Mode::kTrain);
    auto grads = ffw.make_gradients();
    Mat<double> dx = Mat<double>::Zero(6, 5);
    ffw.backward(params, cache, r, dx, grads);
    auto loss = [&] {
      Mat<double> yp(6, 5);
      ffw.forward(params, x, yp, probe, peer::Mode::kTrain);
      return (yp.array() * r.array()).sum();
    };
    auto same = [] { return true; };
    check_entries("x", x.data(), x.size(), [&](Index e) { return dx.data()[e]; }, loss, same);
    for (const auto& spec : ffw.layout().dense()) {
      auto value = params.find(spec.name);
      auto grad = grads.find_dense(spec.name);
      const auto st = check_entries(spec.name, value.data(), value.size(), [&](Index e) { return grad.data()[e]; }, loss, same);
      EXPECT_EQ(st.checked, value.size());
    }
  }
}

}  // namespace
