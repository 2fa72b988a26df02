// Core pieces against simple oracles: grouping by key, row-sparse gradients, layouts, GEMM, RNG (top-k:
// test_top_k.cpp).
#include "test_util.hpp"

#include <limits>

namespace {

using namespace peer_test;

TEST(GroupByKey, IsAStableSortByKey) {
  std::mt19937 gen(3);
  for (std::int64_t limit : {1LL, 7LL, 2048LL, 5000LL, 1LL << 22, (1LL << 31) - 1}) {
    const Index m = 1 + static_cast<Index>(gen() % 3000);
    std::vector<std::int32_t> keys(static_cast<std::size_t>(m));
    for (auto& x : keys) x = static_cast<std::int32_t>(gen() % static_cast<std::uint64_t>(std::min<std::int64_t>(limit, 40)) * (limit / 40 + 1) % limit);
    peer::detail::KeyGroups g;
    peer::detail::group_by_key(keys.data(), m, limit, g);
    std::vector<std::int32_t> order(static_cast<std::size_t>(m));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return keys[static_cast<std::size_t>(a)] < keys[static_cast<std::size_t>(b)]; });
    ASSERT_EQ(g.order, order) << "limit " << limit;
    ASSERT_EQ(g.starts.size(), g.keys.size() + 1);
    for (std::size_t gi = 0; gi < g.keys.size(); ++gi) {
      if (gi > 0) {
        ASSERT_LT(g.keys[gi - 1], g.keys[gi]);
      }
      for (auto p = g.starts[gi]; p < g.starts[gi + 1]; ++p) {
        ASSERT_EQ(keys[static_cast<std::size_t>(g.order[static_cast<std::size_t>(p)])], g.keys[gi]);
      }
    }
  }
}

TEST(RowSparseGrad, AddMergesSortedRowsAndSumsDuplicates) {
  peer::RowSparseGrad<double> g(2);
  EXPECT_TRUE(g.empty());
  const double first[] = {1, 2, 3, 4};
  g.add({3, 10}, first);
  const double second[] = {10, 20, 30, 40, 50, 60};
  g.add({1, 3, 12}, second);
  ASSERT_EQ(g.ids(), (std::vector<peer::ExpertId>{1, 3, 10, 12}));
  EXPECT_EQ(g.values()(0, 0), 10);
  EXPECT_EQ(g.values()(1, 0), 1 + 30);
  EXPECT_EQ(g.values()(1, 1), 2 + 40);
  EXPECT_EQ(g.values()(2, 1), 4);
  EXPECT_EQ(g.values()(3, 1), 60);
  EXPECT_EQ(g.find(10)[0], 3);
  EXPECT_EQ(g.find(11), nullptr);
  // Reserving room keeps the stored rows and their values.
  g.reserve_rows(1000);
  ASSERT_EQ(g.ids(), (std::vector<peer::ExpertId>{1, 3, 10, 12}));
  EXPECT_EQ(g.values()(1, 1), 2 + 40);
  EXPECT_EQ(g.values()(3, 1), 60);
  g.clear();
  EXPECT_TRUE(g.empty());
}

TEST(ParameterLayout, AlignsOffsetsAndRejectsBadTensors) {
  peer::ParameterLayout layout(4);
  auto a = layout.add_dense("a", 3, 5);
  auto b = layout.add_dense("b", 1, 1);
  auto t = layout.add_table("t", 10, 4);
  auto r = layout.add_buffer("r", 1, 3);
  EXPECT_EQ(layout.spec(a).offset, 0);
  EXPECT_EQ(layout.spec(b).offset, 16);  // 15 floats rounded up to 64 bytes
  EXPECT_EQ(layout.dense_size(), 17);
  EXPECT_EQ(layout.spec(t).rows, 10);
  EXPECT_EQ(layout.spec(r).offset, 0);
  EXPECT_EQ(layout.num_parameters(), 15 + 1 + 40);
  EXPECT_THROW(layout.add_dense("a", 1, 1), std::invalid_argument);
  EXPECT_THROW(layout.add_dense("", 1, 1), std::invalid_argument);
  EXPECT_THROW(layout.add_dense("neg", -1, 1), std::invalid_argument);
}

TEST(Parameters, CanLiveInUserMemory) {
  peer::ParameterLayout layout(4);
  auto a = layout.add_dense("a", 2, 3);
  auto t = layout.add_table("t", 4, 2);
  std::vector<float> dense(static_cast<std::size_t>(layout.dense_size()), 1.0f);
  std::vector<float> table(8, 2.0f);
  peer::Parameters<float>::ExternalMemory memory;
  memory.dense = dense.data();
  memory.tables = {table.data()};
  peer::Parameters<float> p(layout, memory);
  p.dense(a)(1, 2) = 5.0f;
  p.table(t).row(3)[1] = 7.0f;
  EXPECT_EQ(dense[5], 5.0f);
  EXPECT_EQ(table[7], 7.0f);
  EXPECT_FALSE(p.table(t).owns_memory());
  memory.tables.clear();
  EXPECT_THROW((peer::Parameters<float>(layout, memory)), std::invalid_argument);
}

TEST(Gemm, MatchesNaiveProductForEveryStorageOrder) {
  const Mat<double> a = random_matrix<double>(37, 300, 1);
  const Mat<double> b = random_matrix<double>(300, 29, 2);
  const Mat<double> bt = b.transpose();
  Mat<double> naive = Mat<double>::Zero(37, 29);
  for (Index i = 0; i < 37; ++i)
    for (Index j = 0; j < 29; ++j)
      for (Index l = 0; l < 300; ++l) naive(i, j) += a(i, l) * b(l, j);
  Mat<double> c(37, 29);
  peer::detail::gemm(a, b, c, 1.0, peer::detail::GemmUpdate::kAssign);
  EXPECT_LT((c - naive).cwiseAbs().maxCoeff(), 1e-11);
  peer::detail::gemm(a, bt.transpose(), c, 2.0, peer::detail::GemmUpdate::kAccumulate);  // c = naive + 2 naive
  EXPECT_LT((c - 3 * naive).cwiseAbs().maxCoeff(), 1e-11);
}

TEST(CounterRng, IsAPureFunctionOfSeedStreamAndCounter) {
  const peer::CounterRng a(5, 9), b(5, 9), c(6, 9);
  double mean = 0, sq = 0;
  for (std::uint64_t i = 0; i < 20000; ++i) {
    EXPECT_EQ(a.bits(i), b.bits(i));
    const double z = a.normal(i);
    mean += z;
    sq += z * z;
  }
  EXPECT_NE(a.bits(0), c.bits(0));
  EXPECT_NEAR(mean / 20000, 0.0, 0.03);
  EXPECT_NEAR(sq / 20000, 1.0, 0.05);
  double z0, z1;
  a.normal_pair(17, z0, z1);
  EXPECT_EQ(z0, a.normal(17));
}

TEST(Activation, DerivativesMatchCentralDifferences) {
  for (auto act : {peer::Activation::kReLU, peer::Activation::kGelu, peer::Activation::kGeluTanh,
                   peer::Activation::kSiLU}) {
    for (double z : {-3.0, -1.2, -0.3, 0.4, 1.1, 2.7}) {
      const double eps = 1e-6;
      const double numeric = (peer::activate(act, z + eps) - peer::activate(act, z - eps)) / (2 * eps);
      EXPECT_NEAR(peer::activate_derivative(act, z), numeric, 1e-8) << peer::to_string(act) << " at " << z;
    }
    EXPECT_EQ(peer::activation_from_string(peer::to_string(act)), act);
  }
  EXPECT_NEAR(peer::activate(peer::Activation::kGelu, 1.0), 0.8413447460685429, 1e-15);
  EXPECT_THROW(peer::activation_from_string("tanh"), std::invalid_argument);
}

TEST(Gating, BackwardMatchesCentralDifferences) {
  const double s[] = {1.3, 0.2, -0.4, -1.1};
  const double r[] = {0.7, -1.9, 0.35, 1.2};  // L = sum r_j g_j
  for (auto mode : {peer::Gating::kSoftmax, peer::Gating::kReLU, peer::Gating::kSigmoid}) {
    double g[4], ds[4];
    peer::gate_forward(mode, s, 4, g);
    peer::gate_backward(mode, s, g, r, 4, ds);
    for (int j = 0; j < 4; ++j) {
      double sp[4], sm[4], gp[4], gm[4];
      std::copy(s, s + 4, sp);
      std::copy(s, s + 4, sm);
      sp[j] += 1e-6;
      sm[j] -= 1e-6;
      peer::gate_forward(mode, sp, 4, gp);
      peer::gate_forward(mode, sm, 4, gm);
      double lp = 0, lm = 0;
      for (int i = 0; i < 4; ++i) {
        lp += r[i] * gp[i];
        lm += r[i] * gm[i];
      }
      EXPECT_NEAR(ds[j], (lp - lm) / 2e-6, 1e-8) << peer::to_string(mode) << " score " << j;
    }
  }
  double g[4];
  peer::gate_forward(peer::Gating::kSoftmax, s, 4, g);
  EXPECT_NEAR(g[0] + g[1] + g[2] + g[3], 1.0, 1e-15);
}

}  // namespace
