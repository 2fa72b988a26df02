// peer::top_k and its pieces against full sorts (ids and values, ties to the lower index, float and
// double). Built three times: portable, with -mavx2 -mfma and with -mavx512f (tests/CMakeLists.txt), since
// the mask compares and the survivors' compress have a path per instruction set.
#include "test_util.hpp"

#include <limits>

#include "cpu_guard.hpp"

namespace {

using namespace peer_test;

// Every test of the binary needs its instructions (tests/cpu_guard.hpp).
[[maybe_unused]] const ::testing::Environment* const kRequirePath =
    peer_test::skip_all_tests_unless(cpu_has_build_path, "this CPU lacks the instructions this build uses");

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
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n, 70));
    std::vector<float> v(static_cast<std::size_t>(n));
    std::normal_distribution<float> dist;
    for (auto& x : v) x = dist(gen);
    ASSERT_NO_FATAL_FAILURE(expect_top_k_equals_sort(v, k, "n=" + std::to_string(n) + " k=" + std::to_string(k)));
  }
}

// Every path of top_k in double too (the gradient checks' layers), on data shaped to reach each: short
// inputs (ranked whole), n >= 128 with few survivors (ranked), many equal survivors (the insertion pass),
// values sorted either way (the lane bound at its tightest and loosest), 32 and 64 lanes, k > 64 (the
// buffer).
TEST(TopK, EveryPathMatchesFullSortInDouble) {
  std::mt19937 gen(9);
  for (int trial = 0; trial < 400; ++trial) {
    const Index n = 1 + static_cast<Index>(gen() % 1100);
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n, 70));
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

// top_k's first-pass bound: the k-th largest of 32 or 64 lane maxima, against a sort (ties, infinities,
// double).
template <typename S, int L>
void expect_kth_largest_of_lanes() {
  std::mt19937 gen(4);
  for (int trial = 0; trial < 400; ++trial) {
    std::vector<S> m(L);
    for (auto& x : m) x = trial % 3 == 0 ? static_cast<S>(gen() % 5) : static_cast<S>(std::normal_distribution<double>()(gen));
    if (trial % 7 == 0) m[gen() % L] = -std::numeric_limits<S>::infinity();
    if (trial % 11 == 0) m[gen() % L] = std::numeric_limits<S>::infinity();
    if (trial % 13 == 0) std::fill(m.begin(), m.end(), static_cast<S>(-2.5));
    std::vector<S> sorted = m;
    std::sort(sorted.begin(), sorted.end(), [](S a, S b) { return a > b; });
    for (Index k = 1; k <= L; ++k) {
      ASSERT_EQ((peer::detail::kth_largest_of_lanes<L>(m.data(), k)), sorted[static_cast<std::size_t>(k - 1)]) << "L " << L << " trial " << trial << " k=" << k;
    }
  }
}
TEST(TopK, KthLargestOfLanesMatchesASort) {
  expect_kth_largest_of_lanes<float, 32>();
  expect_kth_largest_of_lanes<double, 32>();
  expect_kth_largest_of_lanes<float, 64>();
  expect_kth_largest_of_lanes<double, 64>();
}

TEST(TopK, LaneBoundIsTheKthLaneMaximumAndBoundsTheKthLargest) {
  // The oracle: the maxima of the L = bound_lanes(k) interleaved lanes over the whole blocks of L by a naive
  // loop, sorted; the bound must be their k-th largest, and at most the k-th largest of all values.
  std::mt19937 gen(17);
  for (int trial = 0; trial < 200; ++trial) {
    const Index k = 1 + static_cast<Index>(gen() % 64), lanes = peer::detail::bound_lanes(k);
    const Index n = 4 * lanes + static_cast<Index>(gen() % 2000);
    std::vector<float> v(static_cast<std::size_t>(n));
    const int levels = trial % 3 == 0 ? 4 : 1 << 20;  // heavy ties in every third trial
    for (auto& x : v) x = static_cast<float>(static_cast<int>(gen() % static_cast<unsigned>(levels)) - levels / 2);
    ASSERT_TRUE(peer::detail::has_lane_bound(n, k));
    std::vector<float> lane_max(static_cast<std::size_t>(lanes), -std::numeric_limits<float>::infinity());
    for (Index i = 0; i < n / lanes * lanes; ++i) {
      float& m = lane_max[static_cast<std::size_t>(i % lanes)];
      m = std::max(m, v[static_cast<std::size_t>(i)]);
    }
    std::sort(lane_max.begin(), lane_max.end(), std::greater<float>());
    const float bound = peer::detail::lane_bound(v.data(), n, k);
    EXPECT_EQ(bound, lane_max[static_cast<std::size_t>(k - 1)]) << "n " << n << " k " << k;
    std::vector<float> sorted = v;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    EXPECT_LE(bound, sorted[static_cast<std::size_t>(k - 1)]) << "n " << n << " k " << k;
  }
  EXPECT_FALSE(peer::detail::has_lane_bound(127, 16));
  EXPECT_FALSE(peer::detail::has_lane_bound(255, 25));
  EXPECT_TRUE(peer::detail::has_lane_bound(256, 64));
  EXPECT_FALSE(peer::detail::has_lane_bound(1024, 65));
}

}  // namespace
