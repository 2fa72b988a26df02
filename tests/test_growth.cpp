// A pool that grows (peer/layers/pool_growth.hpp): every row, optimizer state and statistic checked against
// a naive re-derivation of its new place (a n + b -> a n' + b, per head h n + a -> h n' + a); the outputs
// right after growth within the derived bound on random inputs (softmax and non-competing gates), and the
// bound broken when new experts' v are not zero; a growth from n to n carries everything (training goes on
// bitwise as if nothing happened); training after growth picks and moves the new experts; refusals.

#include "test_util.hpp"

#include <cstring>
#include <set>

namespace {

using peer_test::Mat;
using Index = peer::Index;

template <typename S>
std::vector<unsigned char> row_bytes(const peer::RowTable<S>& t, Index r) {
  const auto* p = static_cast<const unsigned char*>(t.storage_data()) + r * t.row_bytes();
  return std::vector<unsigned char>(p, p + t.row_bytes());
}

template <typename S>
bool same_row(const S* a, const S* b, Index cols) {
  return std::memcmp(a, b, static_cast<std::size_t>(cols) * sizeof(S)) == 0;
}

template <typename S, typename Layer, typename Opt>
void train(const Layer& layer, peer::Parameters<S>& p, Opt& opt, int steps, unsigned seed, Index batch = 24) {
  peer::Gradients<S> g = layer.make_gradients();
  typename Layer::Cache cache;
  const Index d = layer.config().model_dim;
  Mat<S> y(batch, d), none;
  for (int i = 0; i < steps; ++i) {
    const Mat<S> x = peer_test::random_matrix<S>(batch, d, seed + static_cast<unsigned>(i));
    layer.forward(p, x, y, cache, peer::Mode::kTrain);
    g.zero();
    layer.backward(p, cache, Mat<S>(y - x), none, g);
    opt.step(p, g);
  }
}

std::vector<peer::ParamGroup> groups(peer::TableOptimizer rule = peer::TableOptimizer::kDefault,
                                     peer::TableStorage moments = peer::TableStorage::kNative,
                                     peer::Bf16Rounding rounding = peer::Bf16Rounding::kStochastic) {
  peer::ParamGroup tables{"tables", {""}, 3e-2, 0.0, peer::LrSchedule::constant(), peer::GroupKinds::kTables};
  tables.table_optimizer = rule;
  tables.moment_storage = moments;
  tables.bf16_rounding = rounding;
  tables.rounding_seed = 7;
  peer::ParamGroup dense{"dense", {""}, 1e-2, 0.01, peer::LrSchedule::constant(), peer::GroupKinds::kDense};
  return {tables, dense};
}

// Checks `grown` against `old` row by row from the definition: sub-key row h n + a at h n' + a, expert
// a n + b at a n' + b, new rows as `fresh` (the grown layer's initialization) but v = 0; the rest equal.
template <typename S, typename Layer>
void expect_grown(const Layer& old_layer, const peer::Parameters<S>& old, const Layer& grown_layer,
                  const peer::Parameters<S>& grown, const peer::Parameters<S>& fresh, const std::string& prefix = "") {
  const Index n = old_layer.config().num_sub_keys(), n2 = grown_layer.config().num_sub_keys();
  const Index d = old_layer.config().model_dim;
  const auto& ol = old.layout();
  const auto& gl = grown.layout();
  for (const auto& s : gl.dense()) {
    const auto& o = ol.dense()[static_cast<std::size_t>(ol.find(s.name).first)];
    const S* from = old.dense_data() + o.offset;
    const S* to = grown.dense_data() + s.offset;
    const S* init = fresh.dense_data() + s.offset;
    if (s.name == prefix + "sub_keys.left" || s.name == prefix + "sub_keys.right") {
      const Index blocks = o.rows / n;
      ASSERT_EQ(s.rows, blocks * n2) << s.name;
      for (Index h = 0; h < blocks; ++h) {
        for (Index a = 0; a < n2; ++a) {
          const S* want = a < n ? from + (h * n + a) * s.cols : init + (h * n2 + a) * s.cols;
          EXPECT_TRUE(same_row(to + (h * n2 + a) * s.cols, want, s.cols)) << s.name << " block " << h << " row " << a;
        }
      }
    } else {
      ASSERT_EQ(s.size(), o.size());
      EXPECT_TRUE(same_row(to, from, s.size())) << s.name;
    }
  }
  for (const auto& s : gl.buffers()) {
    const auto& o = ol.buffers()[static_cast<std::size_t>(ol.find(s.name).first)];
    EXPECT_TRUE(same_row(grown.buffer_data() + s.offset, old.buffer_data() + o.offset, s.size())) << s.name;
  }
  for (std::size_t t = 0; t < gl.tables().size(); ++t) {
    const auto& s = gl.tables()[t];
    const auto& from = old.table(peer::TableHandle{ol.find(s.name).first});
    const auto& to = grown.table(peer::TableHandle{static_cast<int>(t)});
    const auto& init = fresh.table(peer::TableHandle{static_cast<int>(t)});
    if (s.rows == from.rows()) {  // a table that did not grow
      for (Index r = 0; r < s.rows; ++r) EXPECT_EQ(row_bytes(to, r), row_bytes(from, r)) << s.name << " row " << r;
      continue;
    }
    std::vector<S> row(static_cast<std::size_t>(s.cols)), want(static_cast<std::size_t>(s.cols));
    for (Index a = 0; a < n2; ++a) {
      for (Index b = 0; b < n2; ++b) {
        const Index id = a * n2 + b;
        if (a < n && b < n) {
          EXPECT_EQ(row_bytes(to, id), row_bytes(from, a * n + b)) << s.name << " expert (" << a << ", " << b << ")";
          continue;
        }
        to.read_row(id, row.data());
        init.read_row(id, want.data());
        for (Index c = 0; c < s.cols; ++c) {
          const S expect = c >= s.cols - d ? S(0) : want[static_cast<std::size_t>(c)];
          ASSERT_EQ(row[static_cast<std::size_t>(c)], expect) << s.name << " new expert (" << a << ", " << b << ") column " << c;
        }
      }
    }
  }
}

template <typename Layer>
void grow_and_check(const peer::PeerConfig& c) {
  using S = float;
  const Layer layer(c);
  auto p = layer.make_parameters(3);
  peer::Adam<S> adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  train<S>(layer, p, adam, 3, 11);  // batch-norm running statistics and every tensor moved off its initialization
  const peer::PoolGrowth growth(layer, c.num_sub_keys() + 3);
  const Layer grown_layer(growth.grown_config());
  const auto fresh = grown_layer.make_parameters(9);
  auto grown = grown_layer.make_parameters(9);
  peer::grow_parameters({growth}, p, grown);
  expect_grown(layer, p, grown_layer, grown, fresh);
}

TEST(Growth, MovesEveryRowWhereANaiveDerivationPutsIt) {
  for (const auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
    for (const auto storage : {peer::TableStorage::kNative, peer::TableStorage::kBFloat16}) {
      SCOPED_TRACE(std::string(peer::to_string(sharing)) + " keys, " + peer::to_string(storage) + " table");
      peer::PeerConfig c = peer_test::small_config(8, 5, 2, 8, 3, 3);
      c.key_sharing = sharing;
      c.expert_storage = storage;
      grow_and_check<peer::PeerLayer<float>>(c);
      grow_and_check<peer::ProductKeyMemory<float>>(c);
    }
  }
}

TEST(Growth, IdsAndStatisticsFollowTheirExperts) {
  const peer::PeerLayer<double> layer(peer_test::small_config(8, 4, 2, 8, 3, 3));
  const peer::PoolGrowth growth(layer, 7);
  EXPECT_EQ(growth.grown_config().num_experts, 49);
  std::set<peer::ExpertId> images;
  for (peer::ExpertId a = 0; a < 4; ++a) {
    for (peer::ExpertId b = 0; b < 4; ++b) {
      EXPECT_EQ(growth.expert(a * 4 + b), a * 7 + b);
      EXPECT_FALSE(growth.is_new(a * 7 + b));
      images.insert(growth.expert(a * 4 + b));
    }
  }
  int fresh = 0;
  for (peer::ExpertId id = 0; id < 49; ++id) fresh += growth.is_new(id) && images.count(id) == 0;
  EXPECT_EQ(fresh, 49 - 16);  // every id is an image or new, never both

  peer::ExpertStats stats(16);
  peer::IdMatrix ids(2, 3);
  ids << 0, 5, 15, 5, 3, 12;
  Mat<double> gates(2, 3);
  gates << 0.5, 0.25, 0.25, 0.125, 0.5, 0.375;
  stats.add(ids, gates);
  const peer::ExpertStats moved = growth.grow(stats);
  ASSERT_EQ(moved.num_experts(), 49);
  EXPECT_EQ(moved.tokens(), 2);
  for (peer::ExpertId id = 0; id < 16; ++id) {
    EXPECT_EQ(moved.weight(id / 4 * 7 + id % 4), stats.weight(id));
    EXPECT_EQ(moved.selections(id / 4 * 7 + id % 4), stats.selections(id));
  }
  EXPECT_DOUBLE_EQ(moved.usage() * 49, stats.usage() * 16);
  EXPECT_THROW(growth.grow(peer::ExpertStats(25)), std::invalid_argument);

  peer::IdMatrix grown_ids(1, 3);
  grown_ids << 0, 4, 45;  // (0, 0) old, (0, 4) and (6, 3) new
  Mat<double> g(1, 3);
  g << 0.5, 0.25, 0.25;
  EXPECT_DOUBLE_EQ(growth.new_expert_share(grown_ids, g), 0.5);
}

// Every state tensor and counter of `grown` against `old`'s by a naive loop over (a, b) and (h, a).
template <typename S, typename Opt>
void expect_state_moved(Opt& old, Opt& grown, Index n, Index n2, const peer::Parameters<S>& grown_params) {
  auto ot = old.state_tensors();
  auto gt = grown.state_tensors();
  ASSERT_EQ(ot.size(), gt.size());
  for (std::size_t i = 0; i < gt.size(); ++i) {
    const auto& s = gt[i];
    const auto& o = ot[i];
    ASSERT_EQ(s.name, o.name);
    const Index es = s.bf16 != nullptr ? 2 : static_cast<Index>(sizeof(S));
    const auto* to = s.bf16 != nullptr ? reinterpret_cast<const unsigned char*>(s.bf16) : reinterpret_cast<const unsigned char*>(s.data);
    const auto* from = o.bf16 != nullptr ? reinterpret_cast<const unsigned char*>(o.bf16) : reinterpret_cast<const unsigned char*>(o.data);
    const std::size_t rb = static_cast<std::size_t>(s.cols * es);
    const bool table = s.name.size() > 8 && s.name.compare(s.name.size() - 8, 8, ".experts") == 0;
    const bool keys = s.name.find("sub_keys.") != std::string::npos;
    if (table) {
      ASSERT_EQ(s.rows, n2 * n2) << s.name;
      const bool master = s.name.rfind("bf16.master.", 0) == 0;
      std::vector<S> row(static_cast<std::size_t>(s.cols));
      for (Index a = 0; a < n2; ++a) {
        for (Index b = 0; b < n2; ++b) {
          const Index id = a * n2 + b;
          if (a < n && b < n) {
            EXPECT_EQ(std::memcmp(to + id * static_cast<Index>(rb), from + (a * n + b) * static_cast<Index>(rb), rb), 0) << s.name << " expert " << id;
          } else if (master) {
            grown_params.table(peer::TableHandle{0}).read_row(id, row.data());
            EXPECT_TRUE(same_row(s.data + id * s.cols, row.data(), s.cols)) << s.name << " new expert " << id;
          } else {
            for (std::size_t c = 0; c < rb; ++c) ASSERT_EQ(to[id * static_cast<Index>(rb) + static_cast<Index>(c)], 0) << s.name << " new expert " << id;
          }
        }
      }
    } else if (keys) {
      const Index blocks = o.rows / n;
      ASSERT_EQ(s.rows, blocks * n2) << s.name;
      for (Index h = 0; h < blocks; ++h) {
        for (Index a = 0; a < n2; ++a) {
          const unsigned char* got = to + (h * n2 + a) * static_cast<Index>(rb);
          if (a < n) {
            EXPECT_EQ(std::memcmp(got, from + (h * n + a) * static_cast<Index>(rb), rb), 0) << s.name;
          } else {
            for (std::size_t c = 0; c < rb; ++c) ASSERT_EQ(got[c], 0) << s.name << " new sub-key " << a;
          }
        }
      }
    } else {
      ASSERT_EQ(s.rows, o.rows) << s.name;
      EXPECT_EQ(std::memcmp(to, from, static_cast<std::size_t>(s.rows) * rb), 0) << s.name;
    }
  }
  auto oc = old.state_counters();
  auto gc = grown.state_counters();
  ASSERT_EQ(oc.size(), gc.size());
  for (std::size_t i = 0; i < gc.size(); ++i) {
    ASSERT_EQ(gc[i].name, oc[i].name);
    if (gc[i].name.rfind("adam.row_steps.", 0) == 0) {
      ASSERT_EQ(gc[i].size, n2 * n2);
      for (Index a = 0; a < n2; ++a) {
        for (Index b = 0; b < n2; ++b) {
          EXPECT_EQ(gc[i].data[a * n2 + b], a < n && b < n ? oc[i].data[a * n + b] : 0) << gc[i].name;
        }
      }
    } else {
      ASSERT_EQ(gc[i].size, oc[i].size);
      for (Index j = 0; j < gc[i].size; ++j) EXPECT_EQ(gc[i].data[j], oc[i].data[j]) << gc[i].name;
    }
  }
}

TEST(Growth, OptimizerStateMovesWithItsExperts) {
  using S = float;
  struct Variant {
    const char* what;
    peer::TableStorage table;
    peer::TableOptimizer rule;
    peer::TableStorage moments;
    peer::Bf16Rounding rounding;
  };
  const Variant variants[] = {
      {"fp32 Adam", peer::TableStorage::kNative, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, peer::Bf16Rounding::kStochastic},
      {"bf16 table, bf16 moments", peer::TableStorage::kBFloat16, peer::TableOptimizer::kDefault, peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic},
      {"bf16 table, partial row-wise Adam", peer::TableStorage::kBFloat16, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kNative, peer::Bf16Rounding::kNearest},
      {"row-wise Adagrad", peer::TableStorage::kNative, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative, peer::Bf16Rounding::kStochastic},
      {"bf16 table, master rows", peer::TableStorage::kBFloat16, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, peer::Bf16Rounding::kMasterRows},
  };
  for (const auto& v : variants) {
    for (const auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
      SCOPED_TRACE(std::string(v.what) + ", " + peer::to_string(sharing) + " keys");
      peer::PeerConfig c = peer_test::small_config(8, 5, 2, 8, 3, 3);
      c.expert_storage = v.table;
      c.key_sharing = sharing;
      const peer::PeerLayer<S> layer(c);
      auto p = layer.make_parameters(3);
      peer::Adam<S> adam(layer.layout(), groups(v.rule, v.moments, v.rounding), peer::AdamConfig::adamw());
      train<S>(layer, p, adam, 4, 21);
      const peer::PoolGrowth growth(layer, 8);
      const peer::PeerLayer<S> grown_layer(growth.grown_config());
      auto grown = grown_layer.make_parameters(4);
      peer::grow_parameters({growth}, p, grown);
      peer::Adam<S> grown_adam(grown_layer.layout(), groups(v.rule, v.moments, v.rounding), peer::AdamConfig::adamw());
      peer::grow_optimizer_state({growth}, adam, grown_adam, grown);
      expect_state_moved<S>(adam, grown_adam, 5, 8, grown);
      EXPECT_EQ(grown_adam.steps(), 4);
      // Something was really moved: some old expert had been updated.
      std::int64_t updated = 0;
      for (Index id = 0; id < 64; ++id) updated += grown_adam.row_steps(peer::TableHandle{0}, id);
      EXPECT_GT(updated, 0);
    }
  }
  // Sgd with momentum: its buffers move the same way.
  const peer::PeerLayer<S> layer(peer_test::small_config(8, 5, 2, 8, 3, 3));
  auto p = layer.make_parameters(3);
  peer::Sgd<S> sgd(layer.layout(), groups(), 0.9);
  train<S>(layer, p, sgd, 3, 31);
  const peer::PoolGrowth growth(layer, 6);
  const peer::PeerLayer<S> grown_layer(growth.grown_config());
  auto grown = grown_layer.make_parameters(4);
  peer::grow_parameters({growth}, p, grown);
  peer::Sgd<S> grown_sgd(grown_layer.layout(), groups(), 0.9);
  peer::grow_optimizer_state({growth}, sgd, grown_sgd, grown);
  expect_state_moved<S>(sgd, grown_sgd, 5, 6, grown);
}

// Growth from n to n carries everything: training the grown copy goes on bitwise as the original does.
TEST(Growth, GrowingToTheSameSizeChangesNothing) {
  using S = float;
  for (const auto storage : {peer::TableStorage::kNative, peer::TableStorage::kBFloat16}) {
    SCOPED_TRACE(peer::to_string(storage));
    peer::PeerConfig c = peer_test::small_config(8, 5, 2, 8, 3, 3);
    c.expert_storage = storage;
    const peer::PeerLayer<S> layer(c);
    auto p = layer.make_parameters(3);
    const auto g = groups(peer::TableOptimizer::kDefault, storage, storage == peer::TableStorage::kNative ? peer::Bf16Rounding::kStochastic
                                                                                                      : peer::Bf16Rounding::kMasterRows);
    peer::Adam<S> adam(layer.layout(), g, peer::AdamConfig::adamw());
    train<S>(layer, p, adam, 3, 41);
    const peer::PoolGrowth growth(layer, 5);
    const peer::PeerLayer<S> same(growth.grown_config());
    auto copy = same.make_parameters(77);
    peer::grow_parameters({growth}, p, copy);
    peer::Adam<S> copy_adam(same.layout(), g, peer::AdamConfig::adamw());
    peer::grow_optimizer_state({growth}, adam, copy_adam, copy);
    train<S>(layer, p, adam, 3, 51);
    train<S>(same, copy, copy_adam, 3, 51);
    EXPECT_EQ(peer_test::storage_bytes(copy), peer_test::storage_bytes(p));
  }
}

// |y' - y|_inf per token against the bound of pool_growth.hpp, on random inputs in double.
struct BoundResult {
  int tokens_with_new = 0, tokens_without = 0, violations = 0;
  double largest_change = 0, largest_unaffected_change = 0;
};

BoundResult check_bound(peer::Gating gating, bool zero_v) {
  using S = double;
  peer::PeerConfig c = peer_test::small_config(8, 6, 2, 8, 4, 4);
  c.gating = gating;
  c.query_norm = peer::QueryNorm::kNone;
  const peer::PeerLayer<S> layer(c);
  auto p = layer.make_parameters(5);
  peer::Adam<S> adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  train<S>(layer, p, adam, 5, 61);
  const peer::PoolGrowth growth(layer, 8);
  const peer::PeerLayer<S> grown_layer(growth.grown_config());
  auto grown = grown_layer.make_parameters(6);
  peer::grow_parameters({growth}, p, grown);
  if (!zero_v) {  // the negative control: new experts with a random v
    auto& t = grown.table(peer::TableHandle{0});
    for (Index id = 0; id < 64; ++id) {
      if (growth.is_new(static_cast<peer::ExpertId>(id))) {
        for (Index j = 8; j < 16; ++j) t.row(id)[j] = 0.5 * std::sin(static_cast<double>(id * 16 + j));
      }
    }
  }
  const Index b = 1000, d = 8, heads = 2, k = 4;
  const Mat<S> x = peer_test::random_matrix<S>(b, d, 71);
  Mat<S> y(b, d), y2(b, d);
  peer::PeerLayer<S>::Cache cache, cache2;
  layer.forward(p, x, y, cache, peer::Mode::kEval);
  grown_layer.forward(grown, x, y2, cache2, peer::Mode::kEval);
  const auto& table = p.table(peer::TableHandle{0});
  BoundResult r;
  for (Index t = 0; t < b; ++t) {
    double bound = 0;
    bool touched = false;
    for (Index h = 0; h < heads; ++h) {
      // |e_j|_inf = |sigma(z_j)| max |v_j| over the old top k.
      std::vector<double> e(static_cast<std::size_t>(k));
      std::set<peer::ExpertId> kept;
      for (Index j = 0; j < k; ++j) kept.insert(cache2.ids(t, h * k + j));
      double largest = 0, dropped = 0, fresh = 0;
      for (Index j = 0; j < k; ++j) {
        const peer::ExpertId id = cache.ids(t, h * k + j);
        double vmax = 0;
        for (Index col = d; col < 2 * d; ++col) vmax = std::max(vmax, std::abs(table.row(id)[col]));
        const double ej = std::abs(peer::activate(c.activation, cache.z(t, h * k + j))) * vmax;
        largest = std::max(largest, ej);
        if (kept.count(growth.expert(id)) == 0) dropped += cache.gates(t, h * k + j) * ej;
      }
      for (Index j = 0; j < k; ++j) {
        if (growth.is_new(cache2.ids(t, h * k + j))) fresh += cache2.gates(t, h * k + j);
      }
      touched = touched || fresh > 0 || dropped > 0;
      bound += gating == peer::Gating::kSoftmax ? fresh * largest : dropped;
    }
    const double change = (y2.row(t) - y.row(t)).cwiseAbs().maxCoeff();
    r.largest_change = std::max(r.largest_change, change);
    if (touched) {
      ++r.tokens_with_new;
    } else {
      ++r.tokens_without;
      r.largest_unaffected_change = std::max(r.largest_unaffected_change, change);
    }
    if (change > bound + 1e-13) ++r.violations;
  }
  return r;
}

TEST(Growth, OutputsMoveWithinTheDerivedBound) {
  for (const auto gating : {peer::Gating::kSoftmax, peer::Gating::kReLU, peer::Gating::kSigmoid}) {
    SCOPED_TRACE(peer::to_string(gating));
    const BoundResult r = check_bound(gating, true);
    EXPECT_EQ(r.violations, 0);
    EXPECT_GT(r.tokens_with_new, 50);  // the bound is exercised: new experts entered many tokens' top k
    EXPECT_GT(r.tokens_without, 20);   // and some tokens kept their experts
    EXPECT_GT(r.largest_change, 1e-6); // outputs did move (the test is not of a no-op)
    EXPECT_LE(r.largest_unaffected_change, 1e-13);
    // The negative control: new experts with v != 0 break the bound on some token.
    EXPECT_GT(check_bound(gating, false).violations, 0);
  }
}

// After growth, training picks the new experts and moves their v off zero; the loss keeps falling.
TEST(Growth, TrainingAfterGrowthUsesTheNewExperts) {
  using S = float;
  const peer::PeerLayer<S> layer(peer_test::small_config(8, 4, 2, 8, 3, 3));
  auto p = layer.make_parameters(3);
  peer::Adam<S> adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  train<S>(layer, p, adam, 10, 81);
  const peer::PoolGrowth growth(layer, 8);
  const peer::PeerLayer<S> grown_layer(growth.grown_config());
  auto grown = grown_layer.make_parameters(4);
  peer::grow_parameters({growth}, p, grown);
  peer::Adam<S> grown_adam(grown_layer.layout(), groups(), peer::AdamConfig::adamw());
  peer::grow_optimizer_state({growth}, adam, grown_adam, grown);
  train<S>(grown_layer, grown, grown_adam, 20, 91);
  const auto& t = grown.table(peer::TableHandle{0});
  int moved = 0;
  for (Index id = 0; id < 64; ++id) {
    if (!growth.is_new(static_cast<peer::ExpertId>(id))) continue;
    bool nonzero = false;
    for (Index j = 8; j < 16; ++j) nonzero = nonzero || t.row(id)[j] != 0.0f;
    moved += nonzero;
  }
  EXPECT_GT(moved, 5);
  peer::PeerLayer<S>::Cache cache;
  Mat<S> x = peer_test::random_matrix<S>(64, 8, 5), y(64, 8);
  grown_layer.forward(grown, x, y, cache, peer::Mode::kEval);
  EXPECT_GT(growth.new_expert_share(cache.ids, cache.gates), 0.0);
}

// Growing one layer of a two-layer model: the other layer's tensors and state are copied, names matched
// whole (blocks.1's sub-keys are not blocks.0's).
TEST(Growth, GrowsOneLayerOfAModel) {
  using S = float;
  const peer::PeerLayer<S> a(peer_test::small_config(8, 4, 2, 8, 3, 3)), b(peer_test::small_config(8, 5, 2, 8, 3, 3));
  const peer::PoolGrowth growth(a, 6, "blocks.0.ffn.");
  const peer::PeerLayer<S> a2(growth.grown_config());
  peer::ModelLayout model, grown_model;
  const int a0 = model.add_layer("blocks.0.ffn.", a.layout()), b0 = model.add_layer("blocks.1.ffn.", b.layout());
  grown_model.add_layer("blocks.0.ffn.", a2.layout());
  grown_model.add_layer("blocks.1.ffn.", b.layout());
  peer::Parameters<S> p(model.layout()), grown(grown_model.layout()), fresh(grown_model.layout());
  peer::Gradients<S> g(model.layout());
  peer::LayerViews<S> views(model, p, g);
  a.initialize(views.params(a0), 1);
  b.initialize(views.params(b0), 2);
  {
    peer::Gradients<S> gg(grown_model.layout());
    peer::LayerViews<S> gv(grown_model, grown, gg), fv(grown_model, fresh, gg);
    a2.initialize(gv.params(0), 3);
    b.initialize(gv.params(1), 4);
    a2.initialize(fv.params(0), 3);
    b.initialize(fv.params(1), 4);
  }
  peer::Adam<S> adam(model.layout(), groups(), peer::AdamConfig::adamw());
  {  // one step through both layers
    peer::PeerLayer<S>::Cache ca, cb;
    const Mat<S> x = peer_test::random_matrix<S>(16, 8, 3);
    Mat<S> h(16, 8), y(16, 8), dh = Mat<S>::Zero(16, 8), none;
    a.forward(views.params(a0), x, h, ca, peer::Mode::kTrain);
    b.forward(views.params(b0), h, y, cb, peer::Mode::kTrain);
    b.backward(views.params(b0), cb, Mat<S>(y - x), dh, views.grads(b0));
    a.backward(views.params(a0), ca, dh, none, views.grads(a0));
    adam.step(p, g);
  }
  peer::grow_parameters({growth}, p, grown);
  for (const auto& s : grown_model.layout().tables()) {
    const auto& from = p.table(peer::TableHandle{model.layout().find(s.name).first});
    const auto& to = grown.table(peer::TableHandle{grown_model.layout().find(s.name).first});
    if (s.name == "blocks.1.ffn.experts") {
      ASSERT_EQ(to.rows(), 25);
      for (Index r = 0; r < 25; ++r) EXPECT_EQ(row_bytes(to, r), row_bytes(from, r));
    } else {
      ASSERT_EQ(to.rows(), 36);
      for (Index r = 0; r < 16; ++r) EXPECT_EQ(row_bytes(to, r / 4 * 6 + r % 4), row_bytes(from, r));
    }
  }
  for (const char* name : {"blocks.1.ffn.sub_keys.left", "blocks.1.ffn.query.weight", "blocks.0.ffn.query.weight"}) {
    const auto& o = model.layout().dense()[static_cast<std::size_t>(model.layout().find(name).first)];
    const auto& s = grown_model.layout().dense()[static_cast<std::size_t>(grown_model.layout().find(name).first)];
    EXPECT_TRUE(same_row(grown.dense_data() + s.offset, p.dense_data() + o.offset, o.size())) << name;
  }
  peer::Adam<S> grown_adam(grown_model.layout(), groups(), peer::AdamConfig::adamw());
  peer::grow_optimizer_state({growth}, adam, grown_adam, grown);
  auto gc = grown_adam.state_counters();
  auto oc = adam.state_counters();
  for (std::size_t i = 0; i < gc.size(); ++i) {
    if (gc[i].name == "adam.row_steps.blocks.1.ffn.experts") {
      for (Index r = 0; r < 25; ++r) EXPECT_EQ(gc[i].data[r], oc[i].data[r]);
    } else if (gc[i].name == "adam.row_steps.blocks.0.ffn.experts") {
      ASSERT_EQ(gc[i].size, 36);
      for (Index r = 0; r < 16; ++r) EXPECT_EQ(gc[i].data[r / 4 * 6 + r % 4], oc[i].data[r]);
    }
  }
  auto gt = grown_adam.state_tensors();
  auto ot = adam.state_tensors();
  for (std::size_t i = 0; i < gt.size(); ++i) {
    if (gt[i].name == "adam.m.blocks.1.ffn.sub_keys.left") {
      EXPECT_EQ(gt[i].rows, 5);
      EXPECT_TRUE(same_row(gt[i].data, ot[i].data, 5 * 4));
    } else if (gt[i].name == "adam.m.blocks.0.ffn.sub_keys.left") {
      EXPECT_EQ(gt[i].rows, 6);
      EXPECT_TRUE(same_row(gt[i].data, ot[i].data, 4 * 4));
    }
  }
}

// The grown parameters may live in a file: a pool grown into a write-back mapping (a pool larger than RAM
// grows the same way), flushed, reopened read-only, equals the pool grown in memory bit for bit.
TEST(Growth, GrowsIntoAWriteBackMappedFile) {
  using S = float;
  const peer::PeerLayer<S> layer(peer_test::small_config(8, 5, 2, 8, 3, 3));
  auto p = layer.make_parameters(3);
  peer::Adam<S> adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  train<S>(layer, p, adam, 3, 101);
  const peer::PoolGrowth growth(layer, 9);
  const peer::PeerLayer<S> grown_layer(growth.grown_config());
  auto in_memory = grown_layer.make_parameters(4);
  peer::grow_parameters({growth}, p, in_memory);
  const std::string path = ::testing::TempDir() + "growth_mapped.ckpt";
  peer::create_parameters_file<S>(path, grown_layer.layout(), "peer");
  {
    peer::MappedParameters<S> mapped(path, grown_layer.layout(), "peer", {peer::MapMode::kWriteBack});
    grown_layer.initialize(mapped.parameters(), 4);
    peer::grow_parameters({growth}, p, mapped.parameters());
    mapped.flush();
  }
  peer::MapOptions verified{peer::MapMode::kReadOnly};
  verified.verify = true;
  peer::MappedParameters<S> reopened(path, grown_layer.layout(), "peer", verified);
  EXPECT_EQ(peer_test::storage_bytes(reopened.parameters()), peer_test::storage_bytes(in_memory));
  std::remove(path.c_str());
}

TEST(Growth, RefusesWhatItCannotGrow) {
  using S = float;
  const peer::PeerLayer<S> layer(peer_test::small_config(8, 5, 2, 8, 3, 3));
  auto p = layer.make_parameters(1);
  peer_test::expect_error<std::invalid_argument>([&] { (void)peer::PoolGrowth(layer, 4); }, "new_sub_keys");
  const peer::PoolGrowth growth(layer, 7);
  // Grown parameters of another size than the growth says, and old parameters of another layer.
  const peer::PeerLayer<S> wrong(peer_test::small_config(8, 8, 2, 8, 3, 3));
  auto wrong_params = wrong.make_parameters(1);
  const std::vector<unsigned char> before = peer_test::storage_bytes(wrong_params);
  peer_test::expect_error<std::invalid_argument>([&] { peer::grow_parameters({growth}, p, wrong_params); }, "sub_keys.left");
  EXPECT_EQ(peer_test::storage_bytes(wrong_params), before);  // refused before writing anything
  const peer::PeerLayer<S> grown_layer(growth.grown_config());
  auto grown = grown_layer.make_parameters(1);
  auto other = wrong.make_parameters(1);
  peer_test::expect_error<std::invalid_argument>([&] { peer::grow_parameters({growth}, other, grown); }, "rows of 'sub_keys.left'");
  // Another storage in the grown layer.
  peer::PeerConfig bf = growth.grown_config();
  bf.expert_storage = peer::TableStorage::kBFloat16;
  const peer::PeerLayer<S> bf_layer(bf);
  auto bf_params = bf_layer.make_parameters(1);
  peer_test::expect_error<std::invalid_argument>([&] { peer::grow_parameters({growth}, p, bf_params); }, "experts");
  // A growth whose prefix names nothing in the parameters.
  const peer::PoolGrowth elsewhere(layer, 7, "blocks.0.ffn.");
  peer_test::expect_error<std::invalid_argument>([&] { peer::grow_parameters({elsewhere}, p, grown); }, "blocks.0.ffn.sub_keys.left");
  // Optimizers with different state.
  peer::grow_parameters({growth}, p, grown);
  peer::Adam<S> adam(layer.layout(), groups(), peer::AdamConfig::adamw());
  peer::Adam<S> rowwise(grown_layer.layout(), groups(peer::TableOptimizer::kRowWiseAdagrad), peer::AdamConfig::adamw());
  peer_test::expect_error<std::invalid_argument>([&] { peer::grow_optimizer_state({growth}, adam, rowwise, grown); }, "state");
  peer::Adam<S> grown_adam(grown_layer.layout(), groups(), peer::AdamConfig::adamw());
  peer_test::expect_error<std::invalid_argument>([&] { peer::grow_optimizer_state({growth}, adam, grown_adam, p); }, "layout");
}

}  // namespace
