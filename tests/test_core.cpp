// Core pieces against simple oracles: top-k, grouping by key, row-sparse gradients, layouts, GEMM, RNG.
#include "test_util.hpp"

#include <limits>

namespace {

using namespace peer_test;

// Reference: full sort by (value desc, index asc).
template <typename S>
std::vector<std::pair<S, int>> sorted_reference(const std::vector<S>& v) {
  std::vector<std::pair<S, int>> all;
  for (std::size_t i = 0; i < v.size(); ++i) all.push_back({v[i], static_cast<int>(i)});
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  return all;
}

// peer::top_k(v, k) against the first k of the full sort: ids and values.
template <typename S>
void expect_top_k_equals_sort(const std::vector<S>& v, Index k, const std::string& label) {
  std::vector<int> idx(static_cast<std::size_t>(k));
  std::vector<S> val(static_cast<std::size_t>(k));
  peer::top_k(v.data(), static_cast<Index>(v.size()), k, idx.data(), val.data());
  const auto ref = sorted_reference(v);
  for (Index j = 0; j < k; ++j) {
    ASSERT_EQ(idx[static_cast<std::size_t>(j)], ref[static_cast<std::size_t>(j)].second) << label << " j=" << j;
    ASSERT_EQ(val[static_cast<std::size_t>(j)], ref[static_cast<std::size_t>(j)].first) << label << " j=" << j;
  }
}

TEST(TopK, MatchesFullSortOnRandomData) {
  std::mt19937 gen(1);
  for (int trial = 0; trial < 300; ++trial) {
    const Index n = 1 + static_cast<Index>(gen() % 700);
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n, 40));
    std::vector<float> v(static_cast<std::size_t>(n));
    std::normal_distribution<float> dist;
    for (auto& x : v) x = dist(gen);
    ASSERT_NO_FATAL_FAILURE(expect_top_k_equals_sort(v, k, "n=" + std::to_string(n) + " k=" + std::to_string(k)));
  }
}

// Every path of top_k in double too (the gradient checks' layers), on data shaped to reach each: short
// inputs (ranked whole), n >= 128 with few survivors (ranked), many equal survivors (the insertion pass),
// values sorted either way (the lane bound at its tightest and loosest), k > 32 (the buffer).
TEST(TopK, EveryPathMatchesFullSortInDouble) {
  std::mt19937 gen(9);
  for (int trial = 0; trial < 400; ++trial) {
    const Index n = 1 + static_cast<Index>(gen() % 1100);
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n, 40));
    std::vector<double> v(static_cast<std::size_t>(n));
    std::normal_distribution<double> dist;
    for (auto& x : v) x = trial % 4 == 1 ? static_cast<double>(gen() % 3) : dist(gen);
    if (trial % 4 == 2) std::sort(v.begin(), v.end());
    if (trial % 4 == 3) std::sort(v.rbegin(), v.rend());
    ASSERT_NO_FATAL_FAILURE(expect_top_k_equals_sort(
        v, k, "trial " + std::to_string(trial) + " n=" + std::to_string(n) + " k=" + std::to_string(k)));
  }
}

TEST(TopK, TiesGoToTheLowerIndex) {
  std::mt19937 gen(2);
  for (int trial = 0; trial < 300; ++trial) {
    const Index n = 1 + static_cast<Index>(gen() % 300);
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n, 20));
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = static_cast<float>(gen() % 4);  // heavy ties
    std::vector<int> idx(static_cast<std::size_t>(k));
    std::vector<float> val(static_cast<std::size_t>(k));
    peer::top_k(v.data(), n, k, idx.data(), val.data());
    const auto ref = sorted_reference(v);
    for (Index j = 0; j < k; ++j) ASSERT_EQ(idx[static_cast<std::size_t>(j)], ref[static_cast<std::size_t>(j)].second);
  }
  // All equal: the first k indices, in order.
  std::vector<float> same(50, 1.0f);
  std::vector<int> idx(7);
  std::vector<float> val(7);
  peer::top_k(same.data(), 50, 7, idx.data(), val.data());
  for (int j = 0; j < 7; ++j) EXPECT_EQ(idx[static_cast<std::size_t>(j)], j);
}

// top_k's first-pass bound: the k-th largest of 32 lane maxima, against a sort (ties, infinities, double).
template <typename S>
void expect_kth_largest_of_32() {
  std::mt19937 gen(4);
  for (int trial = 0; trial < 400; ++trial) {
    std::vector<S> m(32);
    for (auto& x : m) x = trial % 3 == 0 ? static_cast<S>(gen() % 5) : static_cast<S>(std::normal_distribution<double>()(gen));
    if (trial % 7 == 0) m[gen() % 32] = -std::numeric_limits<S>::infinity();
    if (trial % 11 == 0) m[gen() % 32] = std::numeric_limits<S>::infinity();
    if (trial % 13 == 0) std::fill(m.begin(), m.end(), static_cast<S>(-2.5));
    std::vector<S> sorted = m;
    std::sort(sorted.begin(), sorted.end(), [](S a, S b) { return a > b; });
    for (Index k = 1; k <= 32; ++k) {
      ASSERT_EQ(peer::detail::kth_largest_of_32(m.data(), k), sorted[static_cast<std::size_t>(k - 1)]) << "trial " << trial << " k=" << k;
    }
  }
}
TEST(TopK, KthLargestOf32MatchesASort) {
  expect_kth_largest_of_32<float>();
  expect_kth_largest_of_32<double>();
}

TEST(TopK, LaneBoundIsTheKthLaneMaximumAndBoundsTheKthLargest) {
  // The oracle: the maxima of the 32 interleaved lanes over the whole blocks of 32 by a naive loop, sorted;
  // the bound must be their k-th largest, and at most the k-th largest of all values.
  std::mt19937 gen(17);
  for (int trial = 0; trial < 200; ++trial) {
    const Index n = 128 + static_cast<Index>(gen() % 2000), k = 1 + static_cast<Index>(gen() % 32);
    std::vector<float> v(static_cast<std::size_t>(n));
    const int levels = trial % 3 == 0 ? 4 : 1 << 20;  // heavy ties in every third trial
    for (auto& x : v) x = static_cast<float>(static_cast<int>(gen() % static_cast<unsigned>(levels)) - levels / 2);
    ASSERT_TRUE(peer::detail::has_lane_bound(n, k));
    std::vector<float> lane_max(32, -std::numeric_limits<float>::infinity());
    for (Index i = 0; i < n / 32 * 32; ++i) lane_max[static_cast<std::size_t>(i % 32)] = std::max(lane_max[static_cast<std::size_t>(i % 32)], v[static_cast<std::size_t>(i)]);
    std::sort(lane_max.begin(), lane_max.end(), std::greater<float>());
    const float bound = peer::detail::lane_bound(v.data(), n, k);
    EXPECT_EQ(bound, lane_max[static_cast<std::size_t>(k - 1)]) << "n " << n << " k " << k;
    std::vector<float> sorted = v;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    EXPECT_LE(bound, sorted[static_cast<std::size_t>(k - 1)]) << "n " << n << " k " << k;
  }
  EXPECT_FALSE(peer::detail::has_lane_bound(127, 16));
  EXPECT_FALSE(peer::detail::has_lane_bound(1024, 33));
}

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
