// Sub-key scoring in bf16 with the exact re-check (SubKeyScoring::kBFloat16Checked). Compiled three times:
// with the project's flags (the widened fallback unless the flags enable AVX512_BF16), with -mavx512bf16
// (the VDPBF16PS kernel; skipped on a CPU without it) and with -mamx-tile -mamx-bf16 as well (AMX tiles
// where the CPU and kernel have them, VDPBF16PS elsewhere). Oracles: double dots of the unrounded and of the
// rounded operands for the kernel, and exhaustive retrieval over the re-check scores for the search.
#include <gtest/gtest.h>

#include "cpu_guard.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <peer/core/parallel.hpp>
#include <peer/retrieval/brute_force.hpp>
#include <peer/retrieval/product_keys.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using peer::Index;
namespace pd = peer::detail;
template <typename S>
using Mat = peer::RowMatrix<S>;

bool cpu_has_path() {
#if PEER_BF16_DOT_INSTRUCTION
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return true;
#endif
}

// The CPU has AMX-BF16 and AMX-TILE (CPUID.(7, 0):EDX bits 22, 24) and the kernel enabled the tile state
// in XCR0 (bits 17, 18; Linux does from 5.16, where it grants the permission on request).
#if PEER_BF16_AMX
bool cpu_and_kernel_have_amx() {
  unsigned a = 7, b = 0, c = 0, d = 0;
  __asm__("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  if ((d & (1u << 22)) == 0 || (d & (1u << 24)) == 0) return false;
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & (3u << 17)) == (3u << 17);
}
#endif

#define PEER_REQUIRE_PATH() \
  if (!cpu_has_path()) GTEST_SKIP() << "this CPU lacks AVX512_BF16, which this build uses"
// Every test of the binary needs its instructions (tests/cpu_guard.hpp).
[[maybe_unused]] const ::testing::Environment* const kRequirePath =
    peer_test::skip_all_tests_unless(cpu_has_path, "this CPU lacks AVX512_BF16, which this build uses");

template <typename S>
Mat<S> random_matrix(Index rows, Index cols, unsigned seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, scale);
  Mat<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen));
  return m;
}

double rounded(double x) { return static_cast<double>(pd::widen_bf16(pd::narrow_bf16_nearest(static_cast<float>(x)))); }

TEST(Bf16Scoring, ApproximateScoresAreWithinTheBound) {
  PEER_REQUIRE_PATH();
  std::mt19937 gen(3);
  for (int trial = 0; trial < 40; ++trial) {
    const Index d = 1 + static_cast<Index>(gen() % 150), n = 1 + static_cast<Index>(gen() % 90);
    // Fewer than 16 rows (the dot-instruction kernel alone) and more (AMX tiles, where built in, then the
    // dot instruction for the rows left over).
    const Index groups = 1 + static_cast<Index>(gen() % 3);
    const Index m = trial % 2 == 0 ? 1 + static_cast<Index>(gen() % 11) : 16 + static_cast<Index>(gen() % 56);
    const double key_scale = trial % 5 == 0 ? 1e-39 : 0.1 + static_cast<double>(gen() % 100) / 10.0;
    Mat<float> keys = random_matrix<float>(groups * n, d, static_cast<unsigned>(gen()), key_scale);
    Mat<float> q = random_matrix<float>(m, d, static_cast<unsigned>(gen()), trial % 7 == 0 ? 1e-30 : 3.0);
    if (trial % 3 == 0) keys(0, 0) = 0.0f;
    pd::Bf16SubKeys packed;
    pd::pack_bf16_sub_keys<float>(keys, groups, packed);
    ASSERT_EQ(packed.padded() % 16, 0);
    ASSERT_GE(packed.padded(), n);
    pd::Bf16Queries bq;
    bq.resize(m, d);
    for (Index i = 0; i < m; ++i) bq.set_row(i, q.row(i).data(), d);
    Mat<float> out(m, packed.padded());
    for (Index pass = 0; pass < groups * 2; ++pass) {
      // Each group twice: tiles allowed, then the dot instruction alone.
      const Index g = pass / 2;
      const bool tiles = pass % 2 == 0;
      out.setConstant(std::numeric_limits<float>::quiet_NaN());  // every score must be written
      pd::bf16_score(bq, 0, m, packed, g, out.data(), out.cols(), tiles);
      const double key_norm = packed.max_norm[static_cast<std::size_t>(g)];
      for (Index i = 0; i < m; ++i) {
        const double q_norm = q.row(i).cast<double>().norm();
        const double bound = pd::bf16_score_bound(q_norm, key_norm, d, 0.0);
        for (Index j = 0; j < n; ++j) {
          double exact = 0, of_rounded = 0, abs_rounded = 0;
          for (Index c = 0; c < d; ++c) {
            const double qc = q(i, c), kc = keys(g * n + j, c);
            exact += qc * kc;
            of_rounded += rounded(qc) * rounded(kc);
            abs_rounded += std::abs(rounded(qc) * rounded(kc));
          }
          const double a = out(i, j);
          ASSERT_LE(std::abs(a - exact), bound)
              << "d=" << d << " n=" << n << " m=" << m << " g=" << g << " i=" << i << " j=" << j << " tiles " << tiles;
          // The kernel sums the rounded products: only float accumulation (and flushed denormals) apart.
          ASSERT_LE(std::abs(a - of_rounded), 2.0 * static_cast<double>(d) * 0x1p-23 * abs_rounded + 0x1p-120 * static_cast<double>(d))
              << "d=" << d << " m=" << m << " i=" << i << " j=" << j << " tiles " << tiles;
        }
      }
    }
  }
}

// AMX tiles are used exactly where they are built in and the CPU and kernel have them (else VDPBF16PS).
TEST(Bf16Scoring, TilesAreUsedWhereTheCpuAndKernelHaveThem) {
#if PEER_BF16_AMX
  EXPECT_EQ(pd::amx_scoring(), cpu_and_kernel_have_amx());
  EXPECT_EQ(pd::bf16_kernel_pairs(1), 16);
  EXPECT_EQ(pd::bf16_kernel_pairs(32), 16);
  EXPECT_EQ(pd::bf16_kernel_pairs(33), 32);
#else
  EXPECT_FALSE(pd::amx_scoring());
  EXPECT_EQ(pd::bf16_kernel_pairs(7), 4);
  EXPECT_EQ(pd::bf16_kernel_pairs(32), 16);
#endif
}

TEST(Bf16Scoring, RecheckDotIsOneOrderAtAnyAlignment) {
  std::mt19937 gen(5);
  for (Index n : {1, 7, 16, 31, 64, 128, 129}) {
    const Mat<float> a = random_matrix<float>(1, n, static_cast<unsigned>(gen()));
    const Mat<float> b = random_matrix<float>(1, n, static_cast<unsigned>(gen()));
    const float r = pd::recheck_dot(a.data(), b.data(), n);
    double exact = 0, abs_sum = 0;
    for (Index j = 0; j < n; ++j) {
      exact += static_cast<double>(a(0, j)) * b(0, j);
      abs_sum += std::abs(static_cast<double>(a(0, j)) * b(0, j));
    }
    EXPECT_LE(std::abs(r - exact), static_cast<double>(n) * 0x1p-23 * abs_sum);
    for (int shift = 1; shift < 4; ++shift) {
      std::vector<float> sa(static_cast<std::size_t>(n + shift)), sb(static_cast<std::size_t>(n + 2 * shift));
      std::copy(a.data(), a.data() + n, sa.begin() + shift);
      std::copy(b.data(), b.data() + n, sb.begin() + 2 * shift);
      const float r2 = pd::recheck_dot(sa.data() + shift, sb.data() + 2 * shift, n);
      EXPECT_EQ(std::memcmp(&r, &r2, sizeof r), 0) << "n=" << n << " shift " << shift;
    }
  }
}

template <typename S>
struct KeysSetup {
  peer::ProductKeyRetrieval<S> keys;
  peer::ParameterLayout layout{static_cast<Index>(sizeof(S))};
  peer::Parameters<S> params;
  explicit KeysSetup(const peer::ProductKeyConfig& c) : keys(c) {
    keys.register_parameters(layout, "sub_keys.");
    params = peer::Parameters<S>(layout);
    keys.initialize(params, 11);
  }
};

peer::ProductKeyConfig checked_config(Index heads, Index dk, Index n, Index k, Index kk, peer::KeySharing sharing) {
  peer::ProductKeyConfig c;
  c.num_heads = heads;
  c.key_dim = dk;
  c.num_sub_keys = n;
  c.top_k = k;
  c.sub_key_top_k = kk;
  c.key_sharing = sharing;
  c.scoring = peer::SubKeyScoring::kBFloat16Checked;
  return c;
}

// Search and brute force over the re-check scores: identical ids and scores. Returns the tie repairs.
template <typename S>
Index expect_search_equals_brute_force(KeysSetup<S>& s, const Mat<S>& q, const std::string& label) {
  const Index b = q.rows(), hk = s.keys.num_heads() * s.keys.top_k();
  peer::IdMatrix ids(b, hk), ids_bf(b, hk);
  Mat<S> sc(b, hk), sc_bf(b, hk), rescored(b, hk);
  typename peer::ProductKeyRetrieval<S>::Workspace ws, ws_bf;
  s.keys.search(s.params, q, ids, sc, ws);
  peer::BruteForceRetrieval<S>(s.keys).search(s.params, q, ids_bf, sc_bf, ws_bf);
  s.keys.score(s.params, q, ids, rescored);  // score() of the kept experts: the same re-check sums
  for (Index t = 0; t < b; ++t) {
    for (Index j = 0; j < hk; ++j) {
      EXPECT_EQ(ids(t, j), ids_bf(t, j)) << label << " token " << t << " slot " << j;
      EXPECT_EQ(sc(t, j), sc_bf(t, j)) << label << " token " << t << " slot " << j;
      EXPECT_EQ(sc(t, j), rescored(t, j)) << label << " token " << t << " slot " << j;
      if (ids(t, j) != ids_bf(t, j)) return ws.fallbacks;
    }
  }
  return ws.fallbacks;
}

template <typename S>
void random_configs() {
  std::mt19937 gen(21);
  for (int trial = 0; trial < 50; ++trial) {
    const Index n = 2 + static_cast<Index>(gen() % 40), heads = 1 + static_cast<Index>(gen() % 4);
    const Index dk = 2 * (1 + static_cast<Index>(gen() % 12));  // odd halves too
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n * n, 20));
    Index kk = std::min(n, std::max<Index>(k, static_cast<Index>(std::ceil(std::sqrt(static_cast<double>(k))))));
    kk = std::min(n, kk + static_cast<Index>(gen() % 3));
    if (kk < k && kk < n) kk = std::min(n, k);
    const auto sharing = gen() % 2 ? peer::KeySharing::kShared : peer::KeySharing::kPerHead;
    KeysSetup<S> s(checked_config(heads, dk, n, k, kk, sharing));
    const Index b = 1 + static_cast<Index>(gen() % 40);
    const Mat<S> q = random_matrix<S>(b, heads * dk, static_cast<unsigned>(gen()));
    expect_search_equals_brute_force(s, q, "n=" + std::to_string(n) + " H=" + std::to_string(heads) + " Dk=" +
                                               std::to_string(dk) + " k=" + std::to_string(k) + " k'=" +
                                               std::to_string(kk) + " " + peer::to_string(sharing));
  }
}

TEST(Bf16Scoring, SearchEqualsBruteForceOverRecheckScoresFloat) {
  PEER_REQUIRE_PATH();
  random_configs<float>();
}
TEST(Bf16Scoring, SearchEqualsBruteForceOverRecheckScoresDouble) {
  PEER_REQUIRE_PATH();
  random_configs<double>();
}

TEST(Bf16Scoring, SearchEqualsBruteForceAtAMillionExperts) {
  PEER_REQUIRE_PATH();
  // The paper's shapes (N = 1024^2, H = 8, k = k' = 16) at Dk = 256, queries of unit-variance entries.
  for (auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
    KeysSetup<float> s(checked_config(8, 256, 1024, 16, 16, sharing));
    const Mat<float> q = random_matrix<float>(2, 8 * 256, 5);
    EXPECT_EQ(expect_search_equals_brute_force(s, q, peer::to_string(sharing)), 0);
  }
}

TEST(Bf16Scoring, OrdersThatBf16RoundingScramblesAreRankedExactly) {
  PEER_REQUIRE_PATH();
  // Sub-keys that differ from one base key by about one bf16 ulp: the bf16 scores rank them nearly at
  // random, the re-check scores in their true order. A candidate set without the bound's margin misses.
  // 64 sub-keys take the candidates' floor from the approximate top k' + 1, 160 from the 32-lane bound, 320
  // with k' = 30 from the 64-lane bound.
  std::mt19937 gen(12);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int trial = 0; trial < 12; ++trial) {
    const Index n = trial % 6 < 2 ? 64 : trial % 6 < 4 ? 160 : 320, k = n == 320 ? 30 : 8;
    KeysSetup<float> s(checked_config(2, 32, n, k, k, trial % 2 ? peer::KeySharing::kShared : peer::KeySharing::kPerHead));
    for (const char* name : {"sub_keys.left", "sub_keys.right"}) {
      auto m = s.params.find(name);
      std::vector<double> base(static_cast<std::size_t>(m.cols()));
      for (auto& v : base) v = normal(gen);
      for (Index r = 0; r < m.rows(); ++r) {
        for (Index c = 0; c < m.cols(); ++c) {
          const double b = base[static_cast<std::size_t>(c)];
          m(r, c) = static_cast<float>(b * (1.0 + 0x1p-8 * normal(gen)));
        }
      }
    }
    const Mat<float> q = random_matrix<float>(20, 2 * 32, static_cast<unsigned>(gen()));
    expect_search_equals_brute_force(s, q, "near-equal sub-keys, trial " + std::to_string(trial));
  }
}

TEST(Bf16Scoring, ExactTiesAreRepairedLikeBruteForce) {
  PEER_REQUIRE_PATH();
  // Integer keys and queries: exact ties at every cut, so candidates tie with the k'-th and the repair runs.
  std::mt19937 gen(4);
  Index repairs = 0;
  for (int trial = 0; trial < 30; ++trial) {
    const Index n = 3 + static_cast<Index>(gen() % 20), heads = 1 + static_cast<Index>(gen() % 3);
    const Index k = 1 + static_cast<Index>(gen() % 12), kk = std::min(n, k + static_cast<Index>(gen() % 2));
    KeysSetup<float> s(checked_config(heads, 4, n, k, kk, peer::KeySharing::kShared));
    for (const char* name : {"sub_keys.left", "sub_keys.right"}) {
      auto m = s.params.find(name);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(static_cast<int>(gen() % 3) - 1);
    }
    Mat<float> q(6, heads * 4);
    for (Index i = 0; i < q.size(); ++i) q.data()[i] = static_cast<float>(static_cast<int>(gen() % 3) - 1);
    repairs += expect_search_equals_brute_force(s, q, "trial " + std::to_string(trial));
  }
  EXPECT_GT(repairs, 0) << "the tie repair path was not exercised";
}

TEST(Bf16Scoring, AgreesWithExactScoringAwayFromNearTies) {
  PEER_REQUIRE_PATH();
  // Both modes are exact for their own scores, which differ only in rounding: on continuous random data
  // they keep the same experts, with scores equal to float rounding.
  KeysSetup<float> checked(checked_config(8, 128, 256, 16, 16, peer::KeySharing::kShared));
  peer::ProductKeyConfig exact_config = checked.keys.config();
  exact_config.scoring = peer::SubKeyScoring::kExact;
  KeysSetup<float> exact(exact_config);  // the same sub-keys (same layout and seed)
  ASSERT_EQ(exact.params.find("sub_keys.left"), checked.params.find("sub_keys.left"));
  const Mat<float> q = random_matrix<float>(16, 8 * 128, 9);
  peer::IdMatrix ids(16, 128), ids_exact(16, 128);
  Mat<float> sc(16, 128), sc_exact(16, 128);
  peer::ProductKeyRetrieval<float>::Workspace ws, ws_exact;
  checked.keys.search(checked.params, q, ids, sc, ws);
  exact.keys.search(exact.params, q, ids_exact, sc_exact, ws_exact);
  EXPECT_EQ(ids, ids_exact);
  EXPECT_LE((sc - sc_exact).cwiseAbs().maxCoeff(), 1e-5f * sc_exact.cwiseAbs().maxCoeff());
}

TEST(Bf16Scoring, HugeQueriesAreScoredExactly) {
  PEER_REQUIRE_PATH();
  // |q| |c| beyond the approximate path's range: the rows are re-scored in full, still exact.
  KeysSetup<float> s(checked_config(2, 8, 12, 4, 4, peer::KeySharing::kShared));
  const Mat<float> q = random_matrix<float>(5, 16, 3, 1e36);
  expect_search_equals_brute_force(s, q, "huge queries");
  // Queries near the float maximum (their bf16 roundings are infinite) against zero sub-keys: no NaN.
  for (const char* name : {"sub_keys.left", "sub_keys.right"}) s.params.find(name).setZero();
  Mat<float> q_max = Mat<float>::Constant(5, 16, 3.39e38f);
  expect_search_equals_brute_force(s, q_max, "queries near FLT_MAX, zero keys");
}

TEST(Bf16Scoring, BitwiseIdenticalForAnyThreadCount) {
  PEER_REQUIRE_PATH();
#if defined(_OPENMP)
  KeysSetup<float> s(checked_config(4, 64, 64, 8, 8, peer::KeySharing::kShared));
  const Mat<float> q = random_matrix<float>(200, 4 * 64, 8);
  std::vector<std::vector<unsigned char>> runs;
  int most = 1;
  for (int threads : {1, 2, 4}) {
    const int saved = omp_get_max_threads(), saved_dynamic = omp_get_dynamic();
    omp_set_dynamic(0);
    omp_set_num_threads(threads);
    std::atomic<int> team{1};
    peer::parallel_for(64, 1, [&](Index, Index, int) {
      int cur = team.load();
      const int now = omp_get_num_threads();
      while (now > cur && !team.compare_exchange_weak(cur, now)) {
      }
    });
    most = std::max(most, team.load());
    peer::IdMatrix ids(200, 32);
    Mat<float> sc(200, 32);
    peer::ProductKeyRetrieval<float>::Workspace ws;
    s.keys.search(s.params, q, ids, sc, ws);
    std::vector<unsigned char> bytes(static_cast<std::size_t>(ids.size()) * sizeof(peer::ExpertId) +
                                     static_cast<std::size_t>(sc.size()) * sizeof(float));
    std::memcpy(bytes.data(), ids.data(), static_cast<std::size_t>(ids.size()) * sizeof(peer::ExpertId));
    std::memcpy(bytes.data() + static_cast<std::size_t>(ids.size()) * sizeof(peer::ExpertId), sc.data(),
                static_cast<std::size_t>(sc.size()) * sizeof(float));
    runs.push_back(bytes);
    omp_set_num_threads(saved);
    omp_set_dynamic(saved_dynamic);
  }
  EXPECT_GT(most, 1) << "only one thread ran";
  EXPECT_EQ(runs[0], runs[1]);
  EXPECT_EQ(runs[0], runs[2]);
#else
  GTEST_SKIP() << "built without OpenMP";
#endif
}

}  // namespace
