// The inference path: infer() on const parameters changes nothing, equals forward() in Mode::kEval bit for
// bit, and allocates nothing after the first call at a batch size (every allocation of the process is
// counted: malloc and its relatives are interposed below). Also routing held fixed (forward_routed) and
// the public gradient checker on every layer kind.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <malloc.h>

#include <peer/testing/gradient_check.hpp>

#include "test_util.hpp"

// ---- Counting every allocation of the process ----------------------------------------------------------
// The executable's malloc family takes precedence over glibc's for every library (libstdc++'s operator
// new, Eigen's aligned_malloc, libgomp), and forwards to glibc's own entry points. Sanitizers interpose
// malloc themselves, so there the counting is off and the no-allocation test is skipped (it runs in the
// dev preset).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PEER_TEST_COUNT_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define PEER_TEST_COUNT_ALLOCATIONS 0
#endif
#endif
#if !defined(PEER_TEST_COUNT_ALLOCATIONS) && defined(__GLIBC__)
#define PEER_TEST_COUNT_ALLOCATIONS 1
#endif
#if !defined(PEER_TEST_COUNT_ALLOCATIONS)
#define PEER_TEST_COUNT_ALLOCATIONS 0
#endif

namespace {
std::atomic<long> g_allocations{0};
std::atomic<bool> g_counting{false};
[[maybe_unused]] void count_one() {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

#if PEER_TEST_COUNT_ALLOCATIONS
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* malloc(std::size_t n) {
  count_one();
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t s) {
  count_one();
  return __libc_calloc(n, s);
}
void* realloc(void* p, std::size_t n) {
  count_one();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t a, std::size_t n) {
  count_one();
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  count_one();
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  count_one();
  void* p = __libc_memalign(a, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
}
#endif

namespace {

using namespace peer_test;

/// Allocations made while `body` runs (every thread).
template <typename Body>
long allocations_during(Body&& body) {
  g_allocations = 0;
  g_counting = true;
  body();
  g_counting = false;
  return g_allocations.load();
}

/// Trains running statistics away from their initial values, so evaluation differs from training.
template <typename Layer, typename S>
void warm_statistics(const Layer& layer, peer::Parameters<S>& params, Index d) {
  typename Layer::Cache cache;
  for (unsigned i = 0; i < 3; ++i) {
    const Mat<S> x = random_matrix<S>(32, d, 50 + i, 2.0);
    Mat<S> y(32, d);
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
  }
}

template <typename Layer, typename Config>
void check_inference(const Config& config, Index d) {
  Layer layer(config);
  peer::Parameters<float> params = layer.make_parameters(4);
  warm_statistics(layer, params, d);
  const peer::Parameters<float>& frozen = params;
  const auto before = storage_bytes(frozen);
  const Mat<float> x = random_matrix<float>(40, d, 8);
  Mat<float> y_eval(40, d), y_infer(40, d);
  typename Layer::Cache cache;
  layer.forward(params, x, y_eval, cache, peer::Mode::kEval);
  EXPECT_EQ(storage_bytes(frozen), before) << "forward in kEval changed the parameters";
  typename Layer::Workspace ws;
  layer.infer(frozen, x, y_infer, ws);
  EXPECT_TRUE(same_bits(y_eval, y_infer)) << "infer differs from forward(kEval)";
  EXPECT_EQ(storage_bytes(frozen), before) << "infer changed the parameters";
  // The training-mode forward differs (batch statistics), so the test above can tell the modes apart
  // wherever the layer has them.
  // An output overlapping the input is refused (infer does not copy x).
  Mat<float> inplace = x;
  try {
    layer.infer(frozen, inplace, inplace, ws);
    ADD_FAILURE() << "infer accepted y overlapping x";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("infer: y overlaps x"), std::string::npos) << e.what();
  }
}

TEST(Inference, EqualsEvalForwardBitwiseAndChangesNothing) {
  for (peer::QueryNorm norm : {peer::QueryNorm::kBatchNorm, peer::QueryNorm::kLayerNorm, peer::QueryNorm::kNone}) {
    auto c = small_config(8, 6, 2, 8, 3, 3);
    c.query_norm = norm;
    SCOPED_TRACE(peer::to_string(norm));
    check_inference<peer::PeerLayer<float>>(c, 8);
    check_inference<peer::ProductKeyMemory<float>>(c, 8);
  }
  peer::DenseFfwConfig f;
  f.model_dim = 8;
  f.hidden_dim = 20;
  check_inference<peer::DenseFfw<float>>(f, 8);
  f.kind = peer::FfwKind::kGlu;
  check_inference<peer::DenseFfw<float>>(f, 8);
  peer::MoeConfig m;
  m.model_dim = 8;
  m.num_experts = 4;
  m.expert_hidden = 6;
  check_inference<peer::MoeFfw<float>>(m, 8);
}

TEST(Inference, EvalDiffersFromTrainingWithBatchNormedQueries) {
  // Guards the test above: with batch norm, training and evaluation outputs must differ, or
  // "infer equals eval" would not tell eval from training.
  const auto c = small_config(8, 6, 2, 8, 3, 3);
  peer::PeerLayer<float> layer(c);
  auto params = layer.make_parameters(4);
  warm_statistics(layer, params, 8);
  const Mat<float> x = random_matrix<float>(40, 8, 8);
  Mat<float> y_train(40, 8), y_infer(40, 8);
  peer::PeerLayer<float>::Cache cache;
  peer::PeerLayer<float>::Workspace ws;
  layer.infer(params, x, y_infer, ws);
  layer.forward(params, x, y_train, cache, peer::Mode::kTrain);
  EXPECT_GT((y_train - y_infer).norm(), 1e-3);
}

TEST(Inference, AllocatesNothingAfterTheFirstCallAtABatchSize) {
#if !PEER_TEST_COUNT_ALLOCATIONS
  GTEST_SKIP() << "allocation counting is off under sanitizers (they interpose malloc); runs in the dev preset";
#else
  // The counter itself must see allocations, or a zero below would prove nothing.
  EXPECT_GT(allocations_during([] { std::vector<int> v(1000); (void)v; }), 0);
  EXPECT_GT(allocations_during([] { peer::RowMatrix<float> m(64, 64); (void)m; }), 0);
  auto c = small_config(16, 16, 4, 16, 8, 8);  // N = 256
  ThreadScope threads(2);
  peer::PeerLayer<float> layer(c);
  const auto params = layer.make_parameters(2);
  const Mat<float> x = random_matrix<float>(300, 16, 3);  // several chunks per parallel loop
  Mat<float> y(300, 16);
  peer::PeerLayer<float>::Workspace ws;
  layer.infer(params, x, y, ws);  // sizes the workspace
  EXPECT_EQ(allocations_during([&] { layer.infer(params, x, y, ws); }), 0);
  EXPECT_EQ(allocations_during([&] { layer.infer(params, x, y, ws); }), 0);
  // A smaller batch fits in what the workspace holds... Eigen resizes matrices to exact sizes, so a new
  // size allocates once; after that it is again free.
  const Mat<float> x2 = random_matrix<float>(100, 16, 4);
  Mat<float> y2(100, 16);
  layer.infer(params, x2, y2, ws);
  EXPECT_EQ(allocations_during([&] { layer.infer(params, x2, y2, ws); }), 0);
  for (peer::QueryNorm norm : {peer::QueryNorm::kLayerNorm, peer::QueryNorm::kNone}) {
    c.query_norm = norm;
    peer::ProductKeyMemory<float> pkm(c);
    const auto p2 = pkm.make_parameters(2);
    peer::ProductKeyMemory<float>::Workspace w2;
    pkm.infer(p2, x, y, w2);
    EXPECT_EQ(allocations_during([&] { pkm.infer(p2, x, y, w2); }), 0) << peer::to_string(norm);
  }
  // Sizes where Eigen's GEMM packing buffers exceed its 128 KiB stack limit (a [128, 512] query weight).
  {
    peer::PeerLayer<float> big(small_config(128, 16, 4, 128, 8, 8));
    const auto pb = big.make_parameters(2);
    const Mat<float> xb = random_matrix<float>(200, 128, 5);
    Mat<float> yb(200, 128);
    peer::PeerLayer<float>::Workspace wb;
    big.infer(pb, xb, yb, wb);
    EXPECT_EQ(allocations_during([&] { big.infer(pb, xb, yb, wb); }), 0);
  }
  peer::DenseFfwConfig f;
  f.model_dim = 16;
  f.hidden_dim = 64;
  peer::DenseFfw<float> ffw(f);
  const auto p3 = ffw.make_parameters(2);
  peer::DenseFfw<float>::Workspace w3;
  ffw.infer(p3, x, y, w3);
  EXPECT_EQ(allocations_during([&] { ffw.infer(p3, x, y, w3); }), 0);
#endif
}

TEST(RoutingHeldFixed, ForwardRoutedWithSearchedIdsIsTheForward) {
  auto c = small_config(8, 6, 2, 8, 3, 3);
  peer::PeerLayer<double> layer(c);
  auto params = layer.make_parameters(9);
  const Mat<double> x = random_matrix<double>(20, 8, 1);
  Mat<double> y(20, 8), yr(20, 8);
  peer::PeerLayer<double>::Cache cache, routed;
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  const peer::IdMatrix ids = cache.ids;
  layer.forward_routed(params, x, ids, yr, routed, peer::Mode::kTrain);
  EXPECT_EQ(routed.ids, cache.ids);
  EXPECT_LE((routed.scores - cache.scores).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LE((y - yr).cwiseAbs().maxCoeff(), 1e-12);
  // Other ids give another output: the ids are really used.
  peer::IdMatrix shifted = ids.unaryExpr([&](peer::ExpertId i) { return (i + 1) % static_cast<peer::ExpertId>(c.num_experts); });
  layer.forward_routed(params, x, shifted, yr, routed, peer::Mode::kTrain);
  EXPECT_GT((y - yr).norm(), 1e-6);
  peer::IdMatrix bad = ids;
  bad(3, 1) = static_cast<peer::ExpertId>(c.num_experts);
  EXPECT_THROW(layer.forward_routed(params, x, bad, yr, routed, peer::Mode::kTrain), std::invalid_argument);
  EXPECT_THROW(layer.forward_routed(params, x, ids.leftCols(2), yr, routed, peer::Mode::kTrain), std::invalid_argument);
  // A refused call leaves the cache of the last forward usable for its backward.
  layer.forward_routed(params, x, ids, yr, routed, peer::Mode::kTrain);
  EXPECT_THROW(layer.forward_routed(params, x, bad, yr, routed, peer::Mode::kTrain), std::invalid_argument);
  EXPECT_TRUE(routed.ready);
  auto grads = layer.make_gradients();
  Mat<double> dx = Mat<double>::Zero(20, 8);
  EXPECT_NO_THROW(layer.backward(params, routed, y, dx, grads));
}

TEST(RoutingHeldFixed, MoeForwardRoutedWithItsOwnRoutingIsTheForwardBitwise) {
  for (peer::MoeRouting routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
    peer::MoeConfig m;
    m.model_dim = 6;
    m.num_experts = 4;
    m.expert_hidden = 5;
    m.routing = routing;
    m.load_balance_weight = 0.01;
    peer::MoeFfw<double> moe(m);
    auto params = moe.make_parameters(2);
    const Mat<double> x = random_matrix<double>(16, 6, 3);
    Mat<double> y(16, 6), yr(16, 6);
    peer::MoeFfw<double>::Cache cache, routed;
    moe.forward(params, x, y, cache, peer::Mode::kTrain);
    moe.forward_routed(params, x, cache, yr, routed, peer::Mode::kTrain);
    EXPECT_TRUE(same_bits(y, yr)) << peer::to_string(routing);
    EXPECT_EQ(routed.expert, cache.expert);
    EXPECT_EQ(routed.aux_loss, cache.aux_loss);
    // Held while x moves far: the assignments stay, the output follows the new x.
    const Mat<double> x2 = random_matrix<double>(16, 6, 4);
    moe.forward_routed(params, x2, cache, yr, routed, peer::Mode::kTrain);
    EXPECT_EQ(routed.expert, cache.expert);
    EXPECT_GT((yr - y).norm(), 1e-3);
    const Mat<double> short_x = random_matrix<double>(8, 6, 4);
    Mat<double> short_y(8, 6);
    EXPECT_THROW(moe.forward_routed(params, short_x, cache, short_y, routed, peer::Mode::kTrain), std::invalid_argument);
  }
}

TEST(GradientChecker, EveryLayerKindPassesAndAWrongGradientFails) {
  for (peer::Mode mode : {peer::Mode::kTrain, peer::Mode::kEval}) {
    auto c = small_config(6, 4, 2, 6, 3, 3);
    peer::PeerLayer<double> peer_layer(c);
    auto p1 = peer_layer.make_parameters(3);
    auto r1 = peer::testing::check_layer_gradients(peer_layer, p1, random_matrix<double>(10, 6, 2), mode);
    EXPECT_TRUE(r1.ok()) << r1.report();
    EXPECT_EQ(r1.skipped, 0);  // routing held fixed: nothing to skip
    EXPECT_GT(r1.checked, 16 * 12);
    peer::ProductKeyMemory<double> pkm(c);
    auto p2 = pkm.make_parameters(3);
    auto r2 = peer::testing::check_layer_gradients(pkm, p2, random_matrix<double>(10, 6, 2), mode);
    EXPECT_TRUE(r2.ok()) << r2.report();
    peer::DenseFfwConfig f;
    f.model_dim = 6;
    f.hidden_dim = 7;
    peer::DenseFfw<double> ffw(f);
    auto p3 = ffw.make_parameters(3);
    auto r3 = peer::testing::check_layer_gradients(ffw, p3, random_matrix<double>(10, 6, 2), mode);
    EXPECT_TRUE(r3.ok()) << r3.report();
    for (peer::MoeRouting routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
      peer::MoeConfig m;
      m.model_dim = 6;
      m.num_experts = 4;
      m.expert_hidden = 5;
      m.routing = routing;
      peer::MoeFfw<double> moe(m);
      auto p4 = moe.make_parameters(3);
      auto r4 = peer::testing::check_layer_gradients(moe, p4, random_matrix<double>(10, 6, 2), mode);
      EXPECT_TRUE(r4.ok()) << peer::to_string(routing) << ": " << r4.report();
      EXPECT_EQ(r4.skipped, 0);
    }
  }
  // A deliberately wrong analytic gradient is caught.
  double v[3] = {0.3, -0.2, 0.5};
  auto loss = [&] { return v[0] * v[0] + std::sin(v[1]) + v[2] * v[0]; };
  auto right = [&](Index e) { return e == 0 ? 2 * v[0] + v[2] : e == 1 ? std::cos(v[1]) : v[0]; };
  auto wrong = [&](Index e) { return right(e) * (e == 1 ? 1.001 : 1.0); };
  EXPECT_TRUE(peer::testing::check_entries("v", v, 3, right, loss).ok());
  const auto bad = peer::testing::check_entries("v", v, 3, wrong, loss);
  ASSERT_EQ(bad.failures.size(), 1u);
  EXPECT_NE(bad.failures[0].find("v entry 1"), std::string::npos);
  EXPECT_EQ(v[1], -0.2);  // restored
}

}  // namespace

namespace {

// Training: forward, backward, a global clip and an AdamW step (lazy on the table) allocate nothing once a
// batch size has been seen (caches, row-sparse gradients and lazy optimizer state keep their memory).
template <typename Layer>
void check_training_allocations(const peer::PeerConfig& c) {
  Layer layer(c);
  auto params = layer.make_parameters(2);
  auto grads = layer.make_gradients();
  typename Layer::Cache cache;
  peer::Adam<float> adam(layer.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw());
  const Mat<float> x = random_matrix<float>(300, 16, 3), dy = random_matrix<float>(300, 16, 4);
  Mat<float> y(300, 16), dx(300, 16);
  auto step = [&] {
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    grads.zero();
    dx.setZero();
    layer.backward(params, cache, dy, dx, grads);
    peer::clip_gradient_norm(grads, 1.0);
    adam.step(params, grads);
  };
  step();
  step();
  EXPECT_EQ(allocations_during([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain); }), 0) << "forward";
  grads.zero();
  EXPECT_EQ(allocations_during([&] { layer.backward(params, cache, dy, dx, grads); }), 0) << "backward";
  EXPECT_EQ(allocations_during([&] { peer::clip_gradient_norm(grads, 1.0); }), 0) << "clip";
  EXPECT_EQ(allocations_during([&] { adam.step(params, grads); }), 0) << "adam";
  for (int i = 0; i < 3; ++i) EXPECT_EQ(allocations_during(step), 0) << "a whole step";
}

TEST(Inference, TrainingStepAllocatesNothingAfterTheFirstAtABatchSize) {
#if !PEER_TEST_COUNT_ALLOCATIONS
  GTEST_SKIP() << "allocation counting is off under sanitizers (they interpose malloc); runs in the dev preset";
#else
  ThreadScope threads(2);
  for (peer::QueryNorm norm : {peer::QueryNorm::kBatchNorm, peer::QueryNorm::kLayerNorm, peer::QueryNorm::kNone,
                               peer::QueryNorm::kHalfLayerNorm}) {
    SCOPED_TRACE(peer::to_string(norm));
    auto c = small_config(16, 16, 4, 16, 8, 8);  // N = 256
    c.query_norm = norm;
    check_training_allocations<peer::PeerLayer<float>>(c);
    c.query_bias = peer::Bias::kLearned;
    check_training_allocations<peer::ProductKeyMemory<float>>(c);
  }
  // Tables in bfloat16 (the row write-back's scratch is made at the first step, then reused).
  auto c = small_config(16, 16, 4, 16, 8, 8);
  c.expert_storage = peer::TableStorage::kBFloat16;
  check_training_allocations<peer::PeerLayer<float>>(c);
  check_training_allocations<peer::ProductKeyMemory<float>>(c);
#endif
}

}  // namespace
