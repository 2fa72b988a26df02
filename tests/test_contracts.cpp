// Contracts: what forward assigns and backward adds (sentinels), determinism across thread counts,
// every invalid configuration and shape rejected with its message, and a user-supplied query network.
#include "test_util.hpp"

namespace {

using namespace peer_test;

TEST(Contracts, ForwardAssignsAndBackwardAddsExactlyOnce) {
  const peer::PeerConfig c = small_config(8, 5, 2, 6, 3, 3);
  peer::PeerLayer<float> layer(c);
  auto params = layer.make_parameters(9);
  const Mat<float> x = random_matrix<float>(11, 8, 1);
  const Mat<float> dy = random_matrix<float>(11, 8, 2);
  peer::PeerLayer<float>::Cache cache;

  // Reference deltas from zeroed gradients.
  Mat<float> y(11, 8);
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  auto delta = layer.make_gradients();
  Mat<float> dx_delta = Mat<float>::Zero(11, 8);
  layer.backward(params, cache, dy, dx_delta, delta);

  // Same again with sentinels: NaN outputs, gradients pre-filled with 9.
  Mat<float> y2(11, 8);
  y2.setConstant(std::numeric_limits<float>::quiet_NaN());
  layer.forward(params, x, y2, cache, peer::Mode::kTrain);
  EXPECT_TRUE(y2.allFinite()) << "forward must assign every output";
  EXPECT_EQ(y2, y);
  auto grads = layer.make_gradients();
  std::fill(grads.dense_data(), grads.dense_data() + layer.layout().dense_size(), 9.0f);
  auto& table = grads.find_table("experts");
  const peer::ExpertId touched = delta.find_table("experts").ids().front();
  peer::ExpertId untouched = 0;
  while (delta.find_table("experts").find(untouched) != nullptr) ++untouched;
  std::vector<float> nines(static_cast<std::size_t>(2 * 2 * c.model_dim), 9.0f);
  table.add(touched < untouched ? std::vector<peer::ExpertId>{touched, untouched}
                                : std::vector<peer::ExpertId>{untouched, touched},
            nines.data());
  Mat<float> dx = Mat<float>::Constant(11, 8, 9.0f);
  layer.backward(params, cache, dy, dx, grads);

  EXPECT_EQ(dx, (dx_delta.array() + 9.0f).matrix()) << "dx must end as 9 + delta";
  for (const auto& spec : layer.layout().dense()) {
    EXPECT_EQ(grads.find_dense(spec.name), (delta.find_dense(spec.name).array() + 9.0f).matrix()) << spec.name;
  }
  const auto& d = delta.find_table("experts");
  for (peer::ExpertId id : d.ids()) {
    const float* got = table.find(id);
    const float* want = d.find(id);
    ASSERT_NE(got, nullptr);
    for (Index i = 0; i < 2 * c.model_dim; ++i) {
      EXPECT_EQ(got[i], want[i] + (id == touched ? 9.0f : 0.0f)) << "expert " << id;
    }
  }
  ASSERT_NE(table.find(untouched), nullptr);
  for (Index i = 0; i < 2 * c.model_dim; ++i) EXPECT_EQ(table.find(untouched)[i], 9.0f);
  EXPECT_EQ(table.size(), d.size() + 1);
}

TEST(Contracts, SkippingDxStillProducesParameterGradients) {
  const peer::PeerConfig c = small_config();
  peer::PeerLayer<double> layer(c);
  auto params = layer.make_parameters(1);
  const Mat<double> x = random_matrix<double>(5, 8, 1);
  Mat<double> y(5, 8), none;
  peer::PeerLayer<double>::Cache cache;
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  auto grads = layer.make_gradients();
  layer.backward(params, cache, y, none, grads);
  // The same gradients, bit for bit, as the backward that also computes dx.
  auto with_dx = layer.make_gradients();
  Mat<double> dx = Mat<double>::Zero(5, 8);
  layer.backward(params, cache, y, dx, with_dx);
  EXPECT_GT(dx.norm(), 0.0);
  const std::size_t dense = static_cast<std::size_t>(layer.layout().dense_size());
  EXPECT_EQ(std::memcmp(grads.dense_data(), with_dx.dense_data(), dense * sizeof(double)), 0);
  EXPECT_GT(grads.find_dense("query.weight").norm(), 0.0);
  const auto& a = grads.find_table("experts");
  const auto& b = with_dx.find_table("experts");
  EXPECT_EQ(a.ids(), b.ids());
  ASSERT_EQ(a.values().size(), b.values().size());
  EXPECT_EQ(std::memcmp(a.values().data(), b.values().data(), static_cast<std::size_t>(a.values().size()) * sizeof(double)), 0);
}

struct Outputs {
  Mat<float> y, dx;
  std::vector<float> dense, buffers, table_values;
  std::vector<peer::ExpertId> table_ids;
  int team = 0;  // threads the parallel loop really had
};

Outputs run_with_threads(int threads, peer::KeySharing sharing, peer::QueryNorm norm) {
  ThreadScope scope(threads);
  peer::PeerConfig c = small_config(48, 24, 4, 32, 8, 8);
  c.key_sharing = sharing;
  c.query_norm = norm;
  peer::PeerLayer<float> layer(c);
  auto params = layer.make_parameters(5);
  const Mat<float> x = random_matrix<float>(333, 48, 3);
  Outputs out;
  out.y.resize(333, 48);
  peer::PeerLayer<float>::Cache cache;
  layer.forward(params, x, out.y, cache, peer::Mode::kTrain);
  auto grads = layer.make_gradients();
  out.dx = Mat<float>::Zero(333, 48);
  layer.backward(params, cache, random_matrix<float>(333, 48, 4), out.dx, grads);
  layer.backward(params, cache, random_matrix<float>(333, 48, 5), out.dx, grads);  // merge path too
  out.dense.assign(grads.dense_data(), grads.dense_data() + layer.layout().dense_size());
  out.buffers.assign(params.buffer_data(), params.buffer_data() + layer.layout().buffer_size());
  const auto& t = grads.find_table("experts");
  out.table_ids = t.ids();
  out.table_values.assign(t.values().data(), t.values().data() + t.values().size());
  out.team = library_team_size();
  return out;
}

TEST(Contracts, BitwiseIdenticalForOneTwoAndFourThreads) {
  for (auto sharing : {peer::KeySharing::kShared, peer::KeySharing::kPerHead}) {
    for (auto norm : {peer::QueryNorm::kBatchNorm, peer::QueryNorm::kLayerNorm}) {
      const Outputs one = run_with_threads(1, sharing, norm);
      for (int threads : {2, 4}) {
        const Outputs many = run_with_threads(threads, sharing, norm);
        const std::string label = std::to_string(threads) + " threads, " + peer::to_string(sharing) + ", " + peer::to_string(norm);
#if defined(_OPENMP)
        ASSERT_EQ(many.team, threads) << label << ": the parallel loop must really run on that many threads";
#endif
        EXPECT_TRUE(same_bits(one.y, many.y)) << label;
        EXPECT_TRUE(same_bits(one.dx, many.dx)) << label;
        EXPECT_TRUE(same_bits(one.dense, many.dense)) << label;
        EXPECT_TRUE(same_bits(one.buffers, many.buffers)) << label;
        EXPECT_EQ(one.table_ids, many.table_ids) << label;
        EXPECT_TRUE(same_bits(one.table_values, many.table_values)) << label;
      }
    }
  }
#if !defined(_OPENMP)
  GTEST_SKIP() << "built without OpenMP: only one thread exists";
#endif
}

TEST(Contracts, EveryInvalidConfigurationIsRejectedWithItsRule) {
  auto bad = [](auto mutate, const std::string& text) {
    peer::PeerConfig c = small_config();
    mutate(c);
    expect_error<std::invalid_argument>([&] { peer::PeerLayer<float> layer(c); }, text);
  };
  bad([](peer::PeerConfig& c) { c.model_dim = 0; }, "PeerConfig.model_dim = 0 must be > 0");
  bad([](peer::PeerConfig& c) { c.num_experts = 0; }, "PeerConfig.num_experts = 0 must be > 0");
  bad([](peer::PeerConfig& c) { c.num_experts = 15; }, "PeerConfig.num_experts = 15 must be a perfect square");
  bad([](peer::PeerConfig& c) { c.num_experts = Index{1} << 32; }, "must be < 2^31");
  bad([](peer::PeerConfig& c) { c.num_heads = -1; }, "PeerConfig.num_heads = -1 must be > 0");
  bad([](peer::PeerConfig& c) { c.key_dim = 7; }, "PeerConfig.key_dim = 7 must be even");
  bad([](peer::PeerConfig& c) { c.key_dim = 0; }, "PeerConfig.key_dim = 0 must be even and > 0");
  bad([](peer::PeerConfig& c) { c.sub_key_top_k = 0; }, "PeerConfig.sub_key_top_k = 0 must be > 0");
  bad([](peer::PeerConfig& c) { c.sub_key_top_k = 5; }, "PeerConfig.sub_key_top_k = 5 must be <= num_sub_keys = sqrt(num_experts) = 4");
  bad([](peer::PeerConfig& c) { c.top_k = 0; }, "PeerConfig.top_k = 0 must be > 0");
  bad([](peer::PeerConfig& c) { c.top_k = 10; }, "PeerConfig.top_k = 10 must be <= sub_key_top_k^2 = 9");
  bad([](peer::PeerConfig& c) { c.batch_norm_momentum = 1.5; }, "PeerConfig.batch_norm_momentum = 1.5 must be in [0, 1]");
  bad([](peer::PeerConfig& c) { c.norm_epsilon = 0; }, "PeerConfig.norm_epsilon = 0 must be finite and > 0");
  bad([](peer::PeerConfig& c) { c.model_dim = Index{1} << 25; }, "must be <= 2^24");
  bad([](peer::PeerConfig& c) {
        c.key_dim = 65538;
        c.sub_key_scoring = peer::SubKeyScoring::kBFloat16Checked;
      },
      "PeerConfig.key_dim = 65538 must be <= 65536 with sub_key_scoring = bf16_checked");
  // The scoring mode is no part of the configuration a checkpoint must match.
  peer::PeerConfig checked;
  checked.sub_key_scoring = peer::SubKeyScoring::kBFloat16Checked;
  EXPECT_EQ(peer::PeerConfig().first_difference(checked), "");
  // The paper's configuration is valid.
  EXPECT_NO_THROW(peer::PeerConfig().validate());
  EXPECT_EQ(peer::PeerConfig().num_sub_keys(), 1024);
}

TEST(Contracts, EveryShapeAndStateErrorIsRejected) {
  const peer::PeerConfig c = small_config();
  peer::PeerLayer<float> layer(c);
  auto params = layer.make_parameters(1);
  peer::PeerLayer<float>::Cache cache;
  Mat<float> x = random_matrix<float>(6, 8, 1), y(6, 8);
  Mat<float> x_bad = random_matrix<float>(6, 9, 1), y_bad(5, 8);
  expect_error<std::invalid_argument>([&] { layer.forward(params, x_bad, y, cache, peer::Mode::kTrain); }, "x has shape [6, 9] but must be [6, 8]");
  expect_error<std::invalid_argument>([&] { layer.forward(params, x, y_bad, cache, peer::Mode::kTrain); }, "y has shape [5, 8] but must be [6, 8]");
  auto grads = layer.make_gradients();
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, x, grads); }, "the cache holds no forward pass");
  peer::RowMask mask = peer::RowMask::Constant(5, true);
  expect_error<std::invalid_argument>([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain, &mask); },
                                      "row mask size = 5 must equal the batch size 6");
  peer::RowMask one = peer::RowMask::Constant(6, false);
  one[2] = true;
  expect_error<std::invalid_argument>([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain, &one); },
                                      "unmasked rows = 1 must be >= 2");
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  Mat<float> dy_bad(6, 7), dx_bad(4, 8);
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, dy_bad, x, grads); }, "dy has shape [6, 7] but must be [6, 8]");
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, dx_bad, grads); }, "dx has shape [4, 8] but must be [6, 8]");
  peer::PeerConfig other = c;
  other.num_heads = 3;
  peer::PeerLayer<float> other_layer(other);
  auto other_params = other_layer.make_parameters(1);
  expect_error<std::invalid_argument>([&] { layer.forward(other_params, x, y, cache, peer::Mode::kTrain); }, "params were made for a different layout");
  auto other_grads = other_layer.make_gradients();
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, x, other_grads); }, "grads were made for a different layout");
  x(3, 4) = std::numeric_limits<float>::infinity();
  expect_error<std::domain_error>([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain); }, "x has a non-finite value inf at [3, 4]");
}

// A user's own query network: q = 2 * tanh(x W^T), implementing the documented interface.
template <typename S>
class TanhQuery {
 public:
  using ScalarType = S;
  struct Cache {
    Mat<S> t;
  };
  TanhQuery(Index in, Index out) : in_(in), out_(out) {}
  Index input_dim() const { return in_; }
  Index output_dim() const { return out_; }
  void register_parameters(peer::ParameterLayout& layout, const std::string& prefix) {
    w_ = layout.add_dense(prefix + "w", out_, in_);
  }
  void initialize(peer::Parameters<S>& p, std::uint64_t seed) const {
    p.dense(w_) = random_matrix<S>(out_, in_, static_cast<unsigned>(seed));
  }
  void forward(peer::Parameters<S>& p, const peer::ConstMatrixRef<S>& x, peer::MatrixRef<S> q, Cache& cache,
               peer::Mode, const peer::RowMask*) const {
    cache.t = (x * p.dense(w_).transpose()).array().tanh().matrix();
    q = 2 * cache.t;
  }
  void backward(const peer::Parameters<S>& p, const peer::ConstMatrixRef<S>& x, Cache& cache,
                const peer::ConstMatrixRef<S>& dq, peer::MatrixRef<S> dx, peer::Gradients<S>& grads) const {
    const Mat<S> dpre = (2 * dq.array() * (1 - cache.t.array().square())).matrix();
    grads.dense(w_) += dpre.transpose() * x;
    dx += dpre * p.dense(w_);
  }

 private:
  Index in_, out_;
  peer::DenseHandle w_;
};

TEST(Contracts, AUserQueryNetworkPlugsIn) {
  const peer::PeerConfig c = small_config(6, 5, 2, 4, 3, 3);
  peer::PeerLayer<double, TanhQuery<double>> layer(c, TanhQuery<double>(6, 8));
  EXPECT_EQ(layer.layout().dense().front().name, "query.w");
  auto params = layer.make_parameters(3);
  Mat<double> x = random_matrix<double>(5, 6, 1);
  const Mat<double> r = random_matrix<double>(5, 6, 2);
  Mat<double> y(5, 6);
  peer::PeerLayer<double, TanhQuery<double>>::Cache cache, probe;
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  auto grads = layer.make_gradients();
  Mat<double> dx = Mat<double>::Zero(5, 6);
  layer.backward(params, cache, r, dx, grads);
  auto loss = [&] {
    Mat<double> yp(5, 6);
    layer.forward(params, x, yp, probe, peer::Mode::kTrain);
    return (yp.array() * r.array()).sum();
  };
  auto same = [&] { return probe.ids == cache.ids; };
  auto w = params.find("query.w");
  auto gw = grads.find_dense("query.w");
  const auto st = check_entries("query.w", w.data(), w.size(), [&](Index e) { return gw.data()[e]; }, loss, same);
  EXPECT_GE(st.checked, w.size() * 4 / 5);
  check_entries("x", x.data(), x.size(), [&](Index e) { return dx.data()[e]; }, loss, same);
  expect_error<std::invalid_argument>(
      [&] { peer::PeerLayer<double, TanhQuery<double>> bad(c, TanhQuery<double>(6, 9)); },
      "query network output_dim() = 9 must equal num_heads * key_dim = 8");
}

}  // namespace
