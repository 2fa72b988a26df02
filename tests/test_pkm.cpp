// The product-key memory baseline (Lample et al. 2019) beside the PEER layer: its contracts and
// determinism, the paper's configuration, and the cost functions of both product-key layers against
// hand counts. (Its forward against naive loops is in test_layer.cpp, its gradients in test_gradients.cpp.)
#include <tuple>

#include "test_util.hpp"

namespace {

using namespace peer_test;

TEST(ProductKeyMemory, HasAValueTableOfNRowsOfD) {
  const peer::PeerConfig c = small_config(8, 4, 2, 6, 3, 3);
  peer::ProductKeyMemory<float> pkm(c);
  const auto& tables = pkm.layout().tables();
  ASSERT_EQ(tables.size(), 1u);
  EXPECT_EQ(tables[0].name, "values");
  EXPECT_EQ(tables[0].rows, 16);
  EXPECT_EQ(tables[0].cols, 8);
  // The same query network and retrieval parameters as the PEER layer.
  peer::PeerLayer<float> peer_layer(c);
  ASSERT_EQ(pkm.layout().dense().size(), peer_layer.layout().dense().size());
  for (std::size_t i = 0; i < pkm.layout().dense().size(); ++i) {
    EXPECT_EQ(pkm.layout().dense()[i].name, peer_layer.layout().dense()[i].name);
  }
}

TEST(ProductKeyMemory, PaperConfigurationIsValid) {
  const peer::PeerConfig c = peer::pkm_config(512);
  EXPECT_NO_THROW(c.validate());
  EXPECT_EQ(c.num_experts, 1024 * 1024);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.top_k, 32);
  EXPECT_EQ(c.model_dim, 512);
  EXPECT_EQ(c.query_norm, peer::QueryNorm::kBatchNorm);
}

TEST(ProductKeyMemory, ForwardAssignsAndBackwardAddsExactlyOnce) {
  const peer::PeerConfig c = small_config(8, 5, 2, 6, 3, 3);
  peer::ProductKeyMemory<float> layer(c);
  auto params = layer.make_parameters(9);
  const Mat<float> x = random_matrix<float>(11, 8, 1), dy = random_matrix<float>(11, 8, 2);
  peer::ProductKeyMemory<float>::Cache cache;
  Mat<float> y(11, 8);
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  auto delta = layer.make_gradients();
  Mat<float> dx_delta = Mat<float>::Zero(11, 8);
  layer.backward(params, cache, dy, dx_delta, delta);
  EXPECT_GT(dx_delta.norm(), 0.0f) << "x reaches the output through the queries";

  Mat<float> y2 = Mat<float>::Constant(11, 8, std::numeric_limits<float>::quiet_NaN());
  layer.forward(params, x, y2, cache, peer::Mode::kTrain);
  EXPECT_EQ(y2, y);
  auto grads = layer.make_gradients();
  std::fill(grads.dense_data(), grads.dense_data() + layer.layout().dense_size(), 9.0f);
  const auto& d = delta.find_table("values");
  auto& table = grads.find_table("values");
  std::vector<float> nines(static_cast<std::size_t>(8), 9.0f);
  table.add({d.ids().front()}, nines.data());
  Mat<float> dx = Mat<float>::Constant(11, 8, 9.0f);
  layer.backward(params, cache, dy, dx, grads);
  EXPECT_EQ(dx, (dx_delta.array() + 9.0f).matrix());
  for (const auto& spec : layer.layout().dense()) {
    EXPECT_EQ(grads.find_dense(spec.name), (delta.find_dense(spec.name).array() + 9.0f).matrix()) << spec.name;
  }
  ASSERT_EQ(table.ids(), d.ids());
  for (peer::ExpertId id : d.ids()) {
    for (Index i = 0; i < 8; ++i) {
      EXPECT_EQ(table.find(id)[i], d.find(id)[i] + (id == d.ids().front() ? 9.0f : 0.0f)) << "value " << id;
    }
  }
}

TEST(ProductKeyMemory, BitwiseIdenticalForOneTwoAndFourThreads) {
  auto run = [](int threads) {
    ThreadScope scope(threads);
    peer::ProductKeyMemory<float> layer(small_config(40, 20, 4, 16, 8, 8));
    auto params = layer.make_parameters(5);
    const Mat<float> x = random_matrix<float>(301, 40, 3);
    Mat<float> y(301, 40), dx = Mat<float>::Zero(301, 40);
    peer::ProductKeyMemory<float>::Cache cache;
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    auto grads = layer.make_gradients();
    layer.backward(params, cache, random_matrix<float>(301, 40, 4), dx, grads);
    layer.backward(params, cache, random_matrix<float>(301, 40, 6), dx, grads);  // the merge path
    const auto& t = grads.find_table("values");
    std::vector<float> all(grads.dense_data(), grads.dense_data() + layer.layout().dense_size());
    all.insert(all.end(), t.values().data(), t.values().data() + t.values().size());
    all.insert(all.end(), y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    return std::make_tuple(all, t.ids(), library_team_size());
  };
  const auto one = run(1);
  for (int threads : {2, 4}) {
    const auto many = run(threads);
#if defined(_OPENMP)
    ASSERT_EQ(std::get<2>(many), threads) << "the parallel loop must really run on " << threads << " threads";
#endif
    EXPECT_EQ(std::get<1>(one), std::get<1>(many)) << threads << " threads";
    EXPECT_TRUE(same_bits(std::get<0>(one), std::get<0>(many))) << threads << " threads";
  }
#if !defined(_OPENMP)
  GTEST_SKIP() << "built without OpenMP: only one thread exists";
#endif
}

// Hand counts for D = 8, N = 4^2, H = 2, Dk = 6, k = 3, batch-normed queries without bias, shared keys:
//   query.weight 12 x 8 = 96, norm weight + bias 2 x 12 = 24, sub-keys 2 x 4 x 3 = 24: 144 dense;
//   experts 16 x 16 = 256 (PEER), values 16 x 8 = 128 (PKM); S = H k = 6 slots.
TEST(CostFunctions, MatchHandCountsForPeerAndPkm) {
  const peer::PeerConfig c = small_config(8, 4, 2, 6, 3, 3);
  peer::PeerLayer<float> peer_layer(c);
  EXPECT_EQ(peer_layer.total_parameters(), 144 + 256);
  EXPECT_EQ(peer_layer.active_parameters_per_token(), 144 + 6 * 16);
  // 2 D H Dk = 192, 2 H n Dk = 96, S 4 D = 192.
  EXPECT_DOUBLE_EQ(peer_layer.forward_flops_per_token(), 192 + 96 + 192);
  EXPECT_DOUBLE_EQ(peer_layer.forward_flops_per_token(), c.forward_flops_per_token());
  // 4 D H Dk = 384, S (4 Dk + 8 D) = 6 x 88 = 528.
  EXPECT_DOUBLE_EQ(peer_layer.backward_flops_per_token(), 384 + 528);
  EXPECT_DOUBLE_EQ(peer_layer.parameter_bytes_per_token(), (144 + 6 * 16) * 4);

  peer::ProductKeyMemory<double> pkm(c);
  EXPECT_EQ(pkm.total_parameters(), 144 + 128);
  EXPECT_EQ(pkm.active_parameters_per_token(), 144 + 6 * 8);
  EXPECT_DOUBLE_EQ(pkm.forward_flops_per_token(), 192 + 96 + 6 * 16);
  EXPECT_DOUBLE_EQ(pkm.backward_flops_per_token(), 384 + 6 * (24 + 32));
  EXPECT_DOUBLE_EQ(pkm.parameter_bytes_per_token(), (144 + 6 * 8) * 8);

  // Per-head keys: H times the sub-keys, the same scoring work per token.
  peer::PeerConfig per_head = c;
  per_head.key_sharing = peer::KeySharing::kPerHead;
  peer::PeerLayer<float> ph(per_head);
  EXPECT_EQ(ph.total_parameters(), 144 + 24 + 256);
  EXPECT_DOUBLE_EQ(ph.forward_flops_per_token(), peer_layer.forward_flops_per_token());
}

TEST(CostFunctions, MatchHandCountsForDenseFfw) {
  // D = 5, F = 7 with biases: up 35 + 7, down 35 + 5 = 82; GLU adds gate 35 + 7 = 124.
  peer::DenseFfw<float> plain(peer::DenseFfwConfig{5, 7, peer::Activation::kGelu, peer::FfwKind::kPlain, peer::Bias::kLearned});
  EXPECT_EQ(plain.total_parameters(), 82);
  EXPECT_EQ(plain.active_parameters_per_token(), 82);
  EXPECT_DOUBLE_EQ(plain.forward_flops_per_token(), 2 * 2 * 35);
  EXPECT_DOUBLE_EQ(plain.backward_flops_per_token(), 4 * 2 * 35);
  EXPECT_DOUBLE_EQ(plain.parameter_bytes_per_token(), 82 * 4);
  peer::DenseFfw<double> glu(peer::DenseFfwConfig{5, 7, peer::Activation::kGelu, peer::FfwKind::kGlu, peer::Bias::kLearned});
  EXPECT_EQ(glu.total_parameters(), 124);
  EXPECT_DOUBLE_EQ(glu.forward_flops_per_token(), 3 * 2 * 35);
  EXPECT_DOUBLE_EQ(glu.parameter_bytes_per_token(), 124 * 8);
}

TEST(CostFunctions, PaperScaleFiguresAreConsistent) {
  // The paper's PEER layer at D = 256: N = 2^20 experts of 2 D floats; a token reads H k = 128 of them.
  peer::PeerConfig c;
  c.model_dim = 256;
  c.key_dim = 256;
  peer::PeerLayer<float> layer(c);
  const double dense = 2048.0 * 256 + 2 * 2048 + 2 * 1024 * 128;
  EXPECT_EQ(layer.total_parameters(), static_cast<Index>(dense) + (Index{1} << 20) * 512);
  EXPECT_DOUBLE_EQ(layer.parameter_bytes_per_token(), (dense + 128.0 * 512) * 4);
  EXPECT_DOUBLE_EQ(layer.forward_flops_per_token(), 2.0 * 256 * 2048 + 2.0 * 8 * 1024 * 256 + 128.0 * 1024);
}

}  // namespace
