// Product-key retrieval against exhaustive retrieval over all N keys: ids and scores bit for bit.
#include "test_util.hpp"

namespace {

using namespace peer_test;

template <typename S>
struct RetrievalSetup {
  peer::ProductKeyRetrieval<S> keys;
  peer::ParameterLayout layout{static_cast<Index>(sizeof(S))};
  peer::Parameters<S> params;

  explicit RetrievalSetup(const peer::ProductKeyConfig& c) : keys(c) {
    keys.register_parameters(layout, "sub_keys.");
    params = peer::Parameters<S>(layout);
    keys.initialize(params, 11);
  }
};

peer::ProductKeyConfig pk_config(Index heads, Index dk, Index n, Index k, Index kk,
                                 peer::KeySharing sharing = peer::KeySharing::kShared) {
  peer::ProductKeyConfig c;
  c.num_heads = heads;
  c.key_dim = dk;
  c.num_sub_keys = n;
  c.top_k = k;
  c.sub_key_top_k = kk;
  c.key_sharing = sharing;
  return c;
}

// Searches with both methods and expects identical ids and scores; returns the fallback count.
template <typename S>
Index expect_equal_to_brute_force(RetrievalSetup<S>& setup, const Mat<S>& queries, const std::string& label) {
  const Index b = queries.rows(), hk = setup.keys.num_heads() * setup.keys.top_k();
  peer::IdMatrix ids(b, hk), ids_bf(b, hk);
  Mat<S> scores(b, hk), scores_bf(b, hk);
  typename peer::ProductKeyRetrieval<S>::Workspace ws, ws_bf;
  setup.keys.search(setup.params, queries, ids, scores, ws);
  peer::BruteForceRetrieval<S>(setup.keys).search(setup.params, queries, ids_bf, scores_bf, ws_bf);
  for (Index t = 0; t < b; ++t) {
    for (Index j = 0; j < hk; ++j) {
      EXPECT_EQ(ids(t, j), ids_bf(t, j)) << label << " token " << t << " slot " << j;
      EXPECT_EQ(scores(t, j), scores_bf(t, j)) << label << " token " << t << " slot " << j;
      if (ids(t, j) != ids_bf(t, j)) return ws.fallbacks;
    }
  }
  return ws.fallbacks;
}

template <typename S>
void random_configs_match_brute_force() {
  std::mt19937 gen(21);
  Index queries_total = 0, fallbacks = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const Index n = 2 + static_cast<Index>(gen() % 40);
    const Index heads = 1 + static_cast<Index>(gen() % 4);
    const Index dk = 2 * (1 + static_cast<Index>(gen() % 12));
    const Index k = 1 + static_cast<Index>(gen() % std::min<Index>(n * n, 20));
    Index kk = std::min(n, std::max<Index>(k, static_cast<Index>(std::ceil(std::sqrt(static_cast<double>(k))))));
    kk = std::min(n, kk + static_cast<Index>(gen() % 3));
    if (kk < k && kk < n) kk = std::min(n, k);  // exact regime: k' >= k or k' = n
    const auto sharing = gen() % 2 ? peer::KeySharing::kShared : peer::KeySharing::kPerHead;
    RetrievalSetup<S> setup(pk_config(heads, dk, n, k, kk, sharing));
    const Index b = 1 + static_cast<Index>(gen() % 40);
    const Mat<S> q = random_matrix<S>(b, heads * dk, static_cast<unsigned>(gen()));
    const std::string label = "n=" + std::to_string(n) + " H=" + std::to_string(heads) + " Dk=" + std::to_string(dk) +
                              " k=" + std::to_string(k) + " k'=" + std::to_string(kk) + " " + peer::to_string(sharing);
    fallbacks += expect_equal_to_brute_force(setup, q, label);
    queries_total += b * heads;
  }
  // On continuous random data the exact tie repair is rare.
  EXPECT_LE(fallbacks, queries_total / 20) << fallbacks << " of " << queries_total;
}

TEST(ProductKeys, EqualsBruteForceOnRandomConfigsFloat) { random_configs_match_brute_force<float>(); }
TEST(ProductKeys, EqualsBruteForceOnRandomConfigsDouble) { random_configs_match_brute_force<double>(); }

TEST(ProductKeys, EqualsBruteForceAtAMillionExperts) {
  // The paper's configuration: N = 1024^2, H = 8, k = k' = 16; a small batch keeps brute force quick.
  RetrievalSetup<float> setup(pk_config(8, 64, 1024, 16, 16));
  const Mat<float> q = random_matrix<float>(3, 8 * 64, 5);
  const Index fallbacks = expect_equal_to_brute_force(setup, q, "N=1024^2");
  EXPECT_EQ(fallbacks, 0);
}

TEST(ProductKeys, TiesAreBrokenTowardTheLowerIdLikeBruteForce) {
  // Integer-valued keys and queries make exact ties everywhere, at the cut and inside the kept set.
  std::mt19937 gen(4);
  Index fallbacks = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const Index n = 3 + static_cast<Index>(gen() % 20), heads = 1 + static_cast<Index>(gen() % 3);
    const Index k = 1 + static_cast<Index>(gen() % 12);
    const Index kk = std::min(n, k + static_cast<Index>(gen() % 2));
    RetrievalSetup<float> setup(pk_config(heads, 4, n, k, kk));
    for (const char* name : {"sub_keys.left", "sub_keys.right"}) {
      auto m = setup.params.find(name);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(static_cast<int>(gen() % 3) - 1);
    }
    Mat<float> q(6, heads * 4);
    for (Index i = 0; i < q.size(); ++i) q.data()[i] = static_cast<float>(static_cast<int>(gen() % 3) - 1);
    fallbacks += expect_equal_to_brute_force(setup, q, "integer ties trial " + std::to_string(trial));
  }
  EXPECT_GT(fallbacks, 0) << "the tie repair path was not exercised";
}

TEST(ProductKeys, SumsThatRoundToTheSameFloatAreRankedLikeBruteForce) {
  // s1 differs in its last bits while s2 is 2^12 larger, so many different (s1, s2) pairs round to the
  // same sum: ties that exist only after rounding. select() must still equal the exhaustive top-k.
  std::mt19937 gen(8);
  peer::ProductKeyRetrieval<float> keys(pk_config(1, 2, 64, 16, 16));
  typename peer::ProductKeyRetrieval<float>::TileScratch tile;
  Index repaired = 0;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> s1(64), s2(64);
    for (auto& v : s1) v = 1.0f + static_cast<float>(gen() % 64) * 0x1.0p-23f;
    for (auto& v : s2) v = 4096.0f + static_cast<float>(gen() % 8) * 0x1.0p-10f;
    std::vector<peer::ExpertId> ids(16), ids_bf(16);
    std::vector<float> sc(16), sc_bf(16);
    repaired += keys.select(s1.data(), s2.data(), tile, ids.data(), sc.data());
    peer::TopKBuffer<float, peer::ExpertId> best(16, sc_bf.data(), ids_bf.data());
    for (int a = 0; a < 64; ++a)
      for (int b = 0; b < 64; ++b) best.push(s1[static_cast<std::size_t>(a)] + s2[static_cast<std::size_t>(b)], a * 64 + b);
    ASSERT_EQ(ids, ids_bf) << "trial " << trial;
    ASSERT_EQ(sc, sc_bf) << "trial " << trial;
  }
  EXPECT_GT(repaired, 0);
}

TEST(ProductKeys, WithFewerSubKeysThanKItKeepsTheTopKOfTheCandidateGrid) {
  // k' < k is the usual two-stage approximation: the top k of the k' x k' candidates.
  RetrievalSetup<double> setup(pk_config(2, 6, 10, 9, 4));
  const Mat<double> q = random_matrix<double>(12, 12, 3);
  peer::IdMatrix ids(12, 18);
  Mat<double> scores(12, 18);
  typename peer::ProductKeyRetrieval<double>::Workspace ws;
  setup.keys.search(setup.params, q, ids, scores, ws);
  const auto left = setup.params.find("sub_keys.left");
  const auto right = setup.params.find("sub_keys.right");
  for (Index t = 0; t < 12; ++t) {
    for (Index h = 0; h < 2; ++h) {
      std::vector<double> s1(10), s2(10);
      for (Index a = 0; a < 10; ++a) {
        s1[static_cast<std::size_t>(a)] = q.row(t).segment(h * 6, 3).dot(left.row(a));
        s2[static_cast<std::size_t>(a)] = q.row(t).segment(h * 6 + 3, 3).dot(right.row(a));
      }
      std::vector<int> ia(4), ib(4);
      std::vector<double> va(4), vb(4);
      peer::top_k(s1.data(), 10, 4, ia.data(), va.data());
      peer::top_k(s2.data(), 10, 4, ib.data(), vb.data());
      std::vector<std::pair<double, int>> cand;
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) cand.push_back({va[static_cast<std::size_t>(i)] + vb[static_cast<std::size_t>(j)], ia[static_cast<std::size_t>(i)] * 10 + ib[static_cast<std::size_t>(j)]});
      std::sort(cand.begin(), cand.end(), [](auto& x, auto& y) { return x.first > y.first || (x.first == y.first && x.second < y.second); });
      for (Index j = 0; j < 9; ++j) {
        EXPECT_EQ(ids(t, h * 9 + j), cand[static_cast<std::size_t>(j)].second);
        EXPECT_NEAR(scores(t, h * 9 + j), cand[static_cast<std::size_t>(j)].first, 1e-12);
      }
    }
  }
}

TEST(ProductKeys, ScoresAreDotProductsWithTheFullKeys) {
  for (auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
    RetrievalSetup<double> setup(pk_config(3, 10, 7, 5, 5, sharing));
    const Mat<double> q = random_matrix<double>(9, 30, 6);
    peer::IdMatrix ids(9, 15);
    Mat<double> scores(9, 15);
    typename peer::ProductKeyRetrieval<double>::Workspace ws;
    setup.keys.search(setup.params, q, ids, scores, ws);
    const auto left = setup.params.find("sub_keys.left");
    const auto right = setup.params.find("sub_keys.right");
    for (Index t = 0; t < 9; ++t) {
      for (Index h = 0; h < 3; ++h) {
        const Index off = sharing == peer::KeySharing::kPerHead ? h * 7 : 0;
        for (Index j = 0; j < 5; ++j) {
          const int id = ids(t, h * 5 + j);
          double s = 0;
          for (Index i = 0; i < 5; ++i) s += q(t, h * 10 + i) * left(off + id / 7, i) + q(t, h * 10 + 5 + i) * right(off + id % 7, i);
          EXPECT_NEAR(scores(t, h * 5 + j), s, 1e-12);
          if (j > 0) {
            EXPECT_GE(scores(t, h * 5 + j - 1), scores(t, h * 5 + j));
          }
        }
      }
    }
  }
}

TEST(ProductKeys, BackwardMatchesCentralDifferences) {
  for (auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
    RetrievalSetup<double> setup(pk_config(2, 6, 5, 4, 4, sharing));
    Mat<double> q = random_matrix<double>(7, 12, 9);
    const Mat<double> r = random_matrix<double>(7, 8, 10);  // L = sum r * scores
    peer::IdMatrix ids(7, 8), ids_now(7, 8);
    Mat<double> scores(7, 8), scores_now(7, 8);
    typename peer::ProductKeyRetrieval<double>::Workspace ws;
    setup.keys.search(setup.params, q, ids, scores, ws);
    peer::Gradients<double> grads(setup.layout);
    Mat<double> dq = Mat<double>::Zero(7, 12);
    setup.keys.backward(setup.params, q, ids, r, dq, grads, ws);
    auto loss = [&] {
      setup.keys.search(setup.params, q, ids_now, scores_now, ws);
      return (scores_now.array() * r.array()).sum();
    };
    auto same = [&] { return ids_now == ids; };
    auto st = check_entries("dq", q.data(), q.size(), [&](Index e) { return dq.data()[e]; }, loss, same);
    EXPECT_GT(st.checked, q.size() * 9 / 10);
    for (const char* name : {"sub_keys.left", "sub_keys.right"}) {
      auto value = setup.params.find(name);
      auto grad = grads.find_dense(name);
      st = check_entries(name, value.data(), value.size(), [&](Index e) { return grad.data()[e]; }, loss, same);
      EXPECT_GT(st.checked, value.size() * 9 / 10);
    }
  }
}

TEST(ProductKeys, RejectsBadShapesAndNonFiniteValues) {
  RetrievalSetup<float> setup(pk_config(2, 4, 4, 3, 3));
  typename peer::ProductKeyRetrieval<float>::Workspace ws;
  peer::IdMatrix ids(5, 6);
  Mat<float> scores(5, 6);
  Mat<float> q = random_matrix<float>(5, 8, 1);
  Mat<float> wrong = random_matrix<float>(5, 7, 1);
  EXPECT_THROW(setup.keys.search(setup.params, wrong, ids, scores, ws), std::invalid_argument);
  peer::IdMatrix bad_ids(5, 5);
  EXPECT_THROW(setup.keys.search(setup.params, q, bad_ids, scores, ws), std::invalid_argument);
  q(2, 3) = std::numeric_limits<float>::quiet_NaN();
  try {
    setup.keys.search(setup.params, q, ids, scores, ws);
    FAIL() << "NaN query accepted";
  } catch (const std::domain_error& e) {
    EXPECT_NE(std::string(e.what()).find("queries"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[2, 3]"), std::string::npos) << e.what();
  }
  q(2, 3) = 0;
  setup.params.find("sub_keys.right")(1, 1) = std::numeric_limits<float>::infinity();
  EXPECT_THROW(setup.keys.search(setup.params, q, ids, scores, ws), std::domain_error);
}


// The sub-key gradients against a naive loop (per row, items in ascending order, summed from zero
// then added once into the gradient), with arbitrary ids (repeats within a token and across heads, rows kept
// by no item), a non-empty incoming gradient, one workspace reused across configurations and batch sizes,
// and 1 and 2 threads: bitwise.
template <typename S>
void subkey_grads_match_naive_loop() {
  std::mt19937 gen(5);
  typename peer::ProductKeyRetrieval<S>::Workspace ws;  // shared by every case below
  for (int trial = 0; trial < 24; ++trial) {
    const Index n = 2 + static_cast<Index>(gen() % 9);
    const Index heads = 1 + static_cast<Index>(gen() % 4);
    const Index dk = 2 * (1 + static_cast<Index>(gen() % 9));
    const Index k = 1 + static_cast<Index>(gen() % 5);
    const auto sharing = trial % 2 ? peer::KeySharing::kShared : peer::KeySharing::kPerHead;
    RetrievalSetup<S> setup(pk_config(heads, dk, n, k, std::min(n, k), sharing));
    const Index b = static_cast<Index>(gen() % 37);  // includes 0 sometimes
    const Mat<S> q = random_matrix<S>(b, heads * dk, static_cast<unsigned>(gen()));
    const Mat<S> ds = random_matrix<S>(b, heads * k, static_cast<unsigned>(gen()));
    peer::IdMatrix ids(b, heads * k);
    // Only a few experts, so rows repeat and many rows stay unused.
    for (Index i = 0; i < ids.size(); ++i) ids.data()[i] = static_cast<peer::ExpertId>(gen() % std::min<Index>(n * n, 5 + n));
    const Index rows = setup.keys.sub_key_rows(), half = dk / 2;
    // Naive oracle.
    Mat<S> init[2] = {random_matrix<S>(rows, half, 77), random_matrix<S>(rows, half, 78)};
    Mat<S> want[2] = {init[0], init[1]};
    for (int side = 0; side < 2; ++side) {
      for (Index r = 0; r < rows; ++r) {
        bool kept = false;
        Mat<S> acc = Mat<S>::Zero(1, half);
        for (Index t = 0; t < b; ++t) {
          for (Index h = 0; h < heads; ++h) {
            for (Index j = 0; j < k; ++j) {
              const Index id = ids(t, h * k + j);
              const Index row = (sharing == peer::KeySharing::kPerHead ? h * n : 0) + (side == 0 ? id / n : id % n);
              if (row != r) continue;
              kept = true;
              for (Index c = 0; c < half; ++c) acc(0, c) += ds(t, h * k + j) * q(t, h * dk + side * half + c);
            }
          }
        }
        if (kept) {
          for (Index c = 0; c < half; ++c) want[side](r, c) += acc(0, c);
        }
      }
    }
    for (int threads : {1, 2}) {
      peer_test::ThreadScope scope(threads);
#if defined(_OPENMP)
      ASSERT_EQ(peer_test::library_team_size(), threads) << "the parallel loop must really run on " << threads << " threads";
#endif
      peer::Gradients<S> grads(setup.layout);
      grads.find_dense("sub_keys.left") = init[0];
      grads.find_dense("sub_keys.right") = init[1];
      Mat<S> dq = Mat<S>::Zero(b, heads * dk);
      setup.keys.backward(setup.params, q, ids, ds, dq, grads, ws);
      const char* names[2] = {"sub_keys.left", "sub_keys.right"};
      for (int side = 0; side < 2; ++side) {
        const auto got = grads.find_dense(names[side]);
        for (Index r = 0; r < rows; ++r) {
          for (Index c = 0; c < half; ++c) {
            const S g_rc = got(r, c), w_rc = want[side](r, c);
            ASSERT_EQ(std::memcmp(&g_rc, &w_rc, sizeof(S)), 0)
                << "trial " << trial << " threads " << threads << " side " << side << " row " << r << " col " << c
                << " got " << got(r, c) << " want " << want[side](r, c);
          }
        }
      }
    }
  }
}
TEST(ProductKeys, SubKeyGradientsEqualANaiveLoopBitForBitWithOneWorkspaceAcrossShapes) {
  subkey_grads_match_naive_loop<float>();
  subkey_grads_match_naive_loop<double>();
}

}  // namespace
