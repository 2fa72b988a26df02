// Optimizers against naive reference updates; row-sparse against dense; schedules, groups, clipping.
#include "test_util.hpp"

namespace {

using namespace peer_test;

// A layout with the same [6, 4] values twice: as a dense tensor "dense.w" and as a table "table.w",
// plus a second dense tensor in its own group.
struct Twin {
  peer::ParameterLayout layout{8};
  peer::DenseHandle w, b;
  peer::TableHandle t;
  Twin() {
    w = layout.add_dense("dense.w", 6, 4);
    b = layout.add_dense("bias", 1, 3);
    t = layout.add_table("table.w", 6, 4);
  }
};

std::vector<peer::ParamGroup> twin_groups() {
  return {peer::ParamGroup{"bias", {"bias"}, 0.05, 0.0, peer::LrSchedule()},
          peer::ParamGroup{"rest", {""}, 0.1, 0.01, peer::LrSchedule::warmup(2)}};
}

void fill_step(Twin& tw, peer::Parameters<double>& p, peer::Gradients<double>& g, int step, bool all_rows) {
  g.zero();
  const Mat<double> gw = random_matrix<double>(6, 4, static_cast<unsigned>(100 + step));
  g.dense(tw.w) = gw;
  g.dense(tw.b) = random_matrix<double>(1, 3, static_cast<unsigned>(200 + step));
  std::vector<peer::ExpertId> ids;
  Mat<double> rows(0, 4);
  for (int r = 0; r < 6; ++r) {
    if (all_rows || r % 2 == step % 2) {
      ids.push_back(r);
      rows.conservativeResize(rows.rows() + 1, 4);
      rows.row(rows.rows() - 1) = gw.row(r);
    }
  }
  g.table(tw.t).add(ids, rows.data());
  (void)p;
}

template <typename Opt>
void sparse_equals_dense_when_all_rows_touched(Opt make) {
  Twin tw;
  peer::Parameters<double> p(tw.layout);
  p.dense(tw.w) = random_matrix<double>(6, 4, 1);
  p.table(tw.t).matrix() = p.dense(tw.w);
  peer::Gradients<double> g(tw.layout);
  auto opt = make(tw.layout);
  for (int s = 0; s < 5; ++s) {
    fill_step(tw, p, g, s, true);
    opt.step(p, g);
    ASSERT_EQ(Mat<double>(p.table(tw.t).matrix()), Mat<double>(p.dense(tw.w))) << "step " << s;
  }
}

TEST(Optimizers, RowSparseEqualsDenseWhenEveryRowIsTouched) {
  sparse_equals_dense_when_all_rows_touched([](const peer::ParameterLayout& l) { return peer::Sgd<double>(l, twin_groups()); });
  sparse_equals_dense_when_all_rows_touched([](const peer::ParameterLayout& l) { return peer::Sgd<double>(l, twin_groups(), 0.9); });
  sparse_equals_dense_when_all_rows_touched([](const peer::ParameterLayout& l) { return peer::Adam<double>(l, twin_groups()); });
  sparse_equals_dense_when_all_rows_touched(
      [](const peer::ParameterLayout& l) { return peer::Adam<double>(l, twin_groups(), peer::AdamConfig::adamw()); });
}

TEST(Optimizers, UntouchedRowsStayBitIdentical) {
  Twin tw;
  peer::Parameters<double> p(tw.layout);
  p.table(tw.t).matrix() = random_matrix<double>(6, 4, 2);
  peer::Gradients<double> g(tw.layout);
  peer::Adam<double> adam(tw.layout, twin_groups(), peer::AdamConfig::adamw());
  fill_step(tw, p, g, 0, false);  // touches rows 0, 2, 4
  const Mat<double> before = p.table(tw.t).matrix();
  adam.step(p, g);
  for (int r = 0; r < 6; ++r) {
    if (r % 2 == 1) {
      EXPECT_EQ(Mat<double>(p.table(tw.t).matrix().row(r)), Mat<double>(before.row(r))) << "row " << r;
      EXPECT_EQ(adam.row_steps(tw.t, r), 0);
    } else {
      EXPECT_NE(Mat<double>(p.table(tw.t).matrix().row(r)), Mat<double>(before.row(r))) << "row " << r;
      EXPECT_EQ(adam.row_steps(tw.t, r), 1);
    }
  }
  fill_step(tw, p, g, 1, false);  // rows 1, 3, 5: their first update uses t_r = 1 bias correction
  const Mat<double> row1 = p.table(tw.t).matrix().row(1);
  const Mat<double> g1 = g.table(tw.t).values().row(0);
  adam.step(p, g);
  // t_r = 1: m_hat = g, v_hat = g^2, so p <- (1 - lr wd) p - lr g / (|g| + eps), lr = 0.1 after warm-up.
  const Mat<double> expect = (1 - 0.1 * 0.01) * row1.array() - 0.1 * g1.array() / (g1.array().abs() + 1e-8);
  EXPECT_LT((Mat<double>(p.table(tw.t).matrix().row(1)) - expect).cwiseAbs().maxCoeff(), 1e-14);
  EXPECT_EQ(adam.row_steps(tw.t, 1), 1);
  EXPECT_EQ(adam.row_steps(tw.t, 0), 1);
  EXPECT_EQ(adam.steps(), 2);
}

// Naive references, written from the formulas in the papers / PyTorch docs.
TEST(Optimizers, SgdMatchesNaiveReference) {
  Twin tw;
  peer::Parameters<double> p(tw.layout);
  p.dense(tw.w) = random_matrix<double>(6, 4, 3);
  p.dense(tw.b) = random_matrix<double>(1, 3, 4);
  peer::Gradients<double> g(tw.layout);
  peer::Sgd<double> sgd(tw.layout, twin_groups(), 0.8);
  Mat<double> w = p.dense(tw.w), buf = Mat<double>::Zero(6, 4);
  for (int s = 0; s < 4; ++s) {
    fill_step(tw, p, g, s, true);
    const double lr = 0.1 * std::min(1.0, (s + 1) / 2.0);  // warm-up over 2 steps
    buf = 0.8 * buf + (Mat<double>(g.dense(tw.w)) + 0.01 * w);
    w -= lr * buf;
    sgd.step(p, g);
    EXPECT_LT((Mat<double>(p.dense(tw.w)) - w).cwiseAbs().maxCoeff(), 1e-14) << "step " << s;
  }
}

TEST(Optimizers, AdamAndAdamWMatchNaiveReference) {
  for (auto decay : {peer::WeightDecay::kL2, peer::WeightDecay::kDecoupled}) {
    Twin tw;
    peer::Parameters<double> p(tw.layout);
    p.dense(tw.w) = random_matrix<double>(6, 4, 3);
    peer::Gradients<double> g(tw.layout);
    peer::AdamConfig cfg{0.85, 0.99, 1e-6, decay};
    peer::Adam<double> adam(tw.layout, twin_groups(), cfg);
    Mat<double> w = p.dense(tw.w), m = Mat<double>::Zero(6, 4), v = Mat<double>::Zero(6, 4);
    for (int s = 1; s <= 4; ++s) {
      fill_step(tw, p, g, s, true);
      const double lr = 0.1 * std::min(1.0, s / 2.0), wd = 0.01;
      Mat<double> grad = g.dense(tw.w);
      if (decay == peer::WeightDecay::kDecoupled) {
        w -= lr * wd * w;
      } else {
        grad += wd * w;
      }
      m = 0.85 * m + 0.15 * grad;
      v = 0.99 * v + 0.01 * grad.cwiseProduct(grad);
      const Mat<double> mhat = m / (1 - std::pow(0.85, s));
      const Mat<double> vhat = v / (1 - std::pow(0.99, s));
      w.array() -= lr * mhat.array() / (vhat.array().sqrt() + 1e-6);
      adam.step(p, g);
      EXPECT_LT((Mat<double>(p.dense(tw.w)) - w).cwiseAbs().maxCoeff(), 1e-13) << "step " << s;
    }
  }
}

TEST(Optimizers, GroupsGiveEachTensorItsRateAndRejectOrphans) {
  Twin tw;
  peer::Adam<double> adam(tw.layout, twin_groups());
  EXPECT_EQ(adam.group_of("bias"), 0);
  EXPECT_EQ(adam.group_of("dense.w"), 1);
  EXPECT_EQ(adam.group_of("table.w"), 1);
  EXPECT_DOUBLE_EQ(adam.learning_rate(1, 1), 0.05);  // 0.1 x warm-up 1/2
  EXPECT_DOUBLE_EQ(adam.learning_rate(0, 1), 0.05);  // constant
  EXPECT_DOUBLE_EQ(adam.learning_rate(1, 2), 0.1);   // past the warm-up the groups differ, so a swap shows
  EXPECT_DOUBLE_EQ(adam.learning_rate(0, 2), 0.05);
  std::vector<peer::ParamGroup> orphan{{"only", {"dense"}, 0.1, 0, {}}};
  try {
    peer::Adam<double> bad(tw.layout, orphan);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'bias' belongs to no ParamGroup"), std::string::npos) << e.what();
  }
  std::vector<peer::ParamGroup> negative{{"g", {""}, -1.0, 0, {}}};
  EXPECT_THROW(peer::Sgd<double>(tw.layout, negative), std::invalid_argument);
  const auto defaults = peer::default_param_groups(3e-4);
  peer::PeerLayer<float> layer(small_config());
  peer::Adam<float> a2(layer.layout(), defaults);
  EXPECT_EQ(a2.group_of("experts"), 0);
  EXPECT_EQ(a2.group_of("query.weight"), 1);
  EXPECT_EQ(a2.group_of("sub_keys.left"), 1);
  // A product-key memory's value table is its row-sparse table: it goes with the experts' group.
  peer::ProductKeyMemory<float> pkm(small_config());
  peer::Adam<float> a3(pkm.layout(), defaults);
  EXPECT_EQ(a3.group_of("values"), 0);
  EXPECT_EQ(a3.group_of("query.weight"), 1);
}

TEST(Schedules, MatchHandComputedValues) {
  EXPECT_EQ(peer::LrSchedule::constant().factor(7), 1.0);
  const auto w = peer::LrSchedule::warmup(4);
  EXPECT_DOUBLE_EQ(w.factor(1), 0.25);
  EXPECT_DOUBLE_EQ(w.factor(4), 1.0);
  EXPECT_DOUBLE_EQ(w.factor(9), 1.0);
  const auto c = peer::LrSchedule::cosine(2, 12, 0.1);
  EXPECT_DOUBLE_EQ(c.factor(1), 0.5);
  EXPECT_DOUBLE_EQ(c.factor(2), 1.0);
  EXPECT_NEAR(c.factor(7), 0.1 + 0.9 * 0.5, 1e-15);  // halfway through the decay
  EXPECT_NEAR(c.factor(12), 0.1, 1e-15);
  EXPECT_NEAR(c.factor(100), 0.1, 1e-15);
  EXPECT_THROW(peer::LrSchedule::cosine(5, 5).validate("s"), std::invalid_argument);
}

TEST(Clipping, GlobalNormCountsDenseAndRowSparseGradients) {
  Twin tw;
  peer::Parameters<double> p(tw.layout);
  peer::Gradients<double> g(tw.layout);
  fill_step(tw, p, g, 0, false);
  double sq = g.dense(tw.w).squaredNorm() + g.dense(tw.b).squaredNorm() + g.table(tw.t).values().squaredNorm();
  EXPECT_NEAR(peer::gradient_norm(g), std::sqrt(sq), 1e-12);
  const double before = peer::clip_gradient_norm(g, 0.5);
  EXPECT_NEAR(before, std::sqrt(sq), 1e-12);
  EXPECT_NEAR(peer::gradient_norm(g), 0.5, 1e-12);
  EXPECT_NEAR(peer::clip_gradient_norm(g, 10.0), 0.5, 1e-12);  // below the bound: unchanged
  EXPECT_NEAR(peer::gradient_norm(g), 0.5, 1e-12);
}

TEST(ExpertStats, MatchHandComputedUsageAndUnevenness) {
  peer::ExpertStats stats(4);
  peer::IdMatrix ids(2, 2);
  ids << 0, 1, 0, 0;  // token 1 picks expert 0 with both heads
  Mat<double> gates(2, 2);
  gates << 0.5, 0.5, 0.25, 0.75;
  stats.add(ids, gates);
  // z' = (1.5, 0.5, 0, 0), z = (0.75, 0.25, 0, 0): usage 1/2, KL = log 4 + 0.75 log 0.75 + 0.25 log 0.25.
  EXPECT_DOUBLE_EQ(stats.weight(0), 1.5);
  EXPECT_EQ(stats.selections(0), 3);
  EXPECT_DOUBLE_EQ(stats.usage(), 0.5);
  EXPECT_NEAR(stats.unevenness(), std::log(4.0) + 0.75 * std::log(0.75) + 0.25 * std::log(0.25), 1e-15);
  EXPECT_EQ(stats.most_used(1).front().id, 0);
  EXPECT_EQ(stats.least_used(5).size(), 2u);
  EXPECT_EQ(stats.least_used(1).front().id, 1);
  EXPECT_EQ(stats.tokens(), 2);
  // A uniform pool has unevenness 0.
  peer::ExpertStats uniform(4);
  peer::IdMatrix all(1, 4);
  all << 3, 2, 1, 0;
  uniform.add(all, Mat<double>::Constant(1, 4, 0.25));
  EXPECT_NEAR(uniform.unevenness(), 0.0, 1e-15);
  EXPECT_DOUBLE_EQ(uniform.usage(), 1.0);
  ids(1, 1) = 4;
  EXPECT_THROW(stats.add(ids, gates), std::invalid_argument);
}

}  // namespace
