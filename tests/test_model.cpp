// The model-level parameter set: ModelLayout, layer views, shared tables, one optimizer and one checkpoint
// over a stack of layers.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>

#include <peer/model/feed_forward.hpp>
#include <peer/model/model_layout.hpp>
#include <peer/model/raw_views.hpp>

#include "test_util.hpp"

namespace {

using namespace peer_test;
namespace fs = std::filesystem;

peer::DenseFfwConfig small_ffw(Index d = 8) {
  peer::DenseFfwConfig c;
  c.model_dim = d;
  c.hidden_dim = 12;
  return c;
}

TEST(ModelLayout, LaysLayersEndToEndWithTheirOwnOffsets) {
  peer::PeerLayer<float> peer0(small_config());
  peer::DenseFfw<float> ffw(small_ffw());
  peer::ModelLayout model;
  const int l0 = model.add_layer("blocks.0.ffn.", peer0.layout());
  const int l1 = model.add_layer("blocks.1.ffn.", ffw.layout());
  EXPECT_EQ(l0, 0);
  EXPECT_EQ(l1, 1);
  const auto& m = model.layout();
  ASSERT_EQ(m.dense().size(), peer0.layout().dense().size() + ffw.layout().dense().size());
  ASSERT_EQ(m.buffers().size(), peer0.layout().buffers().size());
  ASSERT_EQ(m.tables().size(), 1u);
  EXPECT_EQ(m.tables()[0].name, "blocks.0.ffn.experts");
  EXPECT_EQ(m.dense()[0].name, "blocks.0.ffn.query.weight");
  EXPECT_EQ(m.find("blocks.1.ffn.ffw.up.weight").second, peer::ParamKind::kDense);
  // Every tensor sits at its layer's block start plus the offset it has in the layer's own layout, and
  // each block starts on a 64-byte boundary.
  for (int l = 0; l < model.num_layers(); ++l) {
    const auto& s = model.slot(l);
    EXPECT_EQ(s.dense_offset % 16, 0);
    for (const auto& t : s.layout.dense()) {
      const auto found = m.find(s.prefix + t.name);
      ASSERT_GE(found.first, 0) << t.name;
      EXPECT_EQ(m.dense()[static_cast<std::size_t>(found.first)].offset, s.dense_offset + t.offset) << t.name;
    }
    for (const auto& t : s.layout.buffers()) {
      const auto found = m.find(s.prefix + t.name);
      EXPECT_EQ(m.buffers()[static_cast<std::size_t>(found.first)].offset, s.buffer_offset + t.offset) << t.name;
    }
  }
  EXPECT_EQ(model.find_layer("blocks.1.ffn."), 1);
  EXPECT_EQ(model.find_layer("nope"), -1);
  EXPECT_EQ(m.num_parameters(), peer0.layout().num_parameters() + ffw.layout().num_parameters());
}

TEST(ModelLayout, RejectsBadRegistrationsAndLeavesTheModelUnchanged) {
  peer::PeerLayer<float> peer0(small_config());
  peer::PeerLayer<float> wide(small_config(8, 5));  // N = 25: a table of another shape
  peer::PeerLayer<double> in_double(small_config());
  peer::ModelLayout model;
  model.add_layer("a.", peer0.layout());
  const auto before = model.layout();
  auto expect_message = [&](auto&& call, const std::string& text) {
    try {
      call();
      ADD_FAILURE() << "no exception; expected: " << text;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    EXPECT_TRUE(model.layout() == before);
    EXPECT_EQ(model.num_layers(), 1);
  };
  expect_message([&] { model.add_layer("a.", peer0.layout()); }, "prefix 'a.' is used twice");
  expect_message([&] { model.add_layer("", before); }, "tensor name 'a.experts' is used twice");
  expect_message([&] { model.add_layer("b.", in_double.layout()); }, "scalar_bytes = 8 must equal the model's 4");
  expect_message([&] { model.add_layer("b.", peer0.layout(), {{"values", "a.experts"}}); },
                 "SharedTable.table 'values' is not a table of the layer");
  expect_message([&] { model.add_layer("b.", peer0.layout(), {{"experts", "a.query.weight"}}); },
                 "SharedTable.model_table 'a.query.weight' is not a table of the model");
  expect_message([&] { model.add_layer("b.", wide.layout(), {{"experts", "a.experts"}}); },
                 "table 'experts' is [25, 16] but the shared model table 'a.experts' is [16, 16]");
  EXPECT_THROW(model.slot(3), std::invalid_argument);
}

TEST(ModelLayout, ViewsAliasTheModelStorageAndComputeAsOwnedParameters) {
  const auto config = small_config();
  peer::PeerLayer<double> layer(config);
  peer::DenseFfw<double> ffw(small_ffw());
  peer::ModelLayout model(8);
  model.add_layer("ffw.", ffw.layout());
  const int l = model.add_layer("peer.", layer.layout());
  peer::Parameters<double> params(model.layout());
  peer::Gradients<double> grads(model.layout());
  peer::LayerViews<double> views(model, params, grads);
  layer.initialize(views.params(l), 5);
  // The same values in the layer's own objects.
  peer::Parameters<double> own = layer.make_parameters(5);
  peer::Gradients<double> own_grads = layer.make_gradients();
  for (const auto& s : layer.layout().dense()) {
    EXPECT_EQ(params.find("peer." + s.name), own.find(s.name)) << s.name;
  }
  EXPECT_EQ(params.find("peer.experts"), own.find("experts"));
  const Mat<double> x = random_matrix<double>(12, config.model_dim, 3);
  const Mat<double> dy = random_matrix<double>(12, config.model_dim, 4);
  Mat<double> y1(12, config.model_dim), y2(12, config.model_dim), dx1 = Mat<double>::Zero(12, config.model_dim), dx2 = dx1;
  peer::PeerLayer<double>::Cache c1, c2;
  layer.forward(views.params(l), x, y1, c1, peer::Mode::kTrain);
  layer.forward(own, x, y2, c2, peer::Mode::kTrain);
  EXPECT_EQ(y1, y2);
  // Training mode wrote the running statistics through the view into the model's buffers.
  EXPECT_EQ(params.find("peer.query.norm.running_mean"), own.find("query.norm.running_mean"));
  EXPECT_NE(params.find("peer.query.norm.running_mean").norm(), 0.0);
  layer.backward(views.params(l), c1, dy, dx1, views.grads(l));
  layer.backward(own, c2, dy, dx2, own_grads);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(grads.find_dense("peer.query.weight"), own_grads.find_dense("query.weight"));
  EXPECT_EQ(grads.find_table("peer.experts").ids(), own_grads.find_table("experts").ids());
  EXPECT_EQ(grads.find_table("peer.experts").values(), own_grads.find_table("experts").values());
  // The other layer's block is untouched by this layer's backward.
  EXPECT_EQ(grads.find_dense("ffw.ffw.up.weight").norm(), 0.0);
  // zero() through a view clears only the layer's part.
  grads.find_dense("ffw.ffw.down.bias").setConstant(2.0);
  views.grads(l).zero();
  EXPECT_EQ(grads.find_dense("peer.query.weight").norm(), 0.0);
  EXPECT_TRUE(grads.find_table("peer.experts").empty());
  EXPECT_EQ(grads.find_dense("ffw.ffw.down.bias")(0, 0), 2.0);
  // A view of parameters made for another model is refused.
  peer::ModelLayout other(8);
  other.add_layer("peer.", layer.layout());
  EXPECT_THROW(peer::layer_parameters(params, other, 0), std::invalid_argument);
}

// A residual stack of three layers, the last sharing the first's expert table:
//   h1 = x + PEER_0(x),  h2 = h1 + FFW(h1),  out = h2 + PEER_2(h2),  L = 1/2 |out - target|^2 / B.
template <typename S>
struct Stack {
  peer::PeerLayer<S> peer0, peer2;
  peer::DenseFfw<S> ffw;
  peer::ModelLayout model;
  int l0, l1, l2;

  explicit Stack(const peer::PeerConfig& c)
      : peer0(c), peer2(c), ffw(small_ffw(c.model_dim)), model(static_cast<Index>(sizeof(S))) {
    l0 = model.add_layer("blocks.0.ffn.", peer0.layout());
    l1 = model.add_layer("blocks.1.ffn.", ffw.layout());
    l2 = model.add_layer("blocks.2.ffn.", peer2.layout(), {{"experts", "blocks.0.ffn.experts"}});
  }

  struct State {
    peer::Parameters<S> params;
    peer::Gradients<S> grads;
    peer::LayerViews<S> views;
    typename peer::PeerLayer<S>::Cache c0, c2;
    typename peer::DenseFfw<S>::Cache c1;
    Mat<S> h1, h2, out, d;
    State(const peer::ModelLayout& m, peer::Parameters<S> p)
        : params(std::move(p)), grads(m.layout()), views(m, params, grads) {}
  };

  State make_state(std::uint64_t seed) const {
    State s(model, peer::Parameters<S>(model.layout()));
    peer0.initialize(s.views.params(l0), seed);
    ffw.initialize(s.views.params(l1), seed + 1);
    peer2.initialize(s.views.params(l2), seed + 2);  // also re-initializes the shared table
    return s;
  }

  double forward(State& s, const Mat<S>& x, const Mat<S>& target, peer::Mode mode) const {
    const Index b = x.rows(), d = x.cols();
    Mat<S> f(b, d);
    peer0.forward(s.views.params(l0), x, f, s.c0, mode);
    s.h1 = x + f;
    ffw.forward(s.views.params(l1), s.h1, f, s.c1, mode);
    s.h2 = s.h1 + f;
    peer2.forward(s.views.params(l2), s.h2, f, s.c2, mode);
    s.out = s.h2 + f;
    s.d = (s.out - target) / static_cast<S>(b);
    return 0.5 * static_cast<double>((s.out - target).squaredNorm()) / static_cast<double>(b);
  }

  void backward(State& s) const {
    const Index b = s.d.rows(), d = s.d.cols();
    Mat<S> dh2 = s.d, dh1(b, d), dx = Mat<S>::Zero(b, d);
    peer2.backward(s.views.params(l2), s.c2, s.d, dh2, s.views.grads(l2));
    dh1 = dh2;
    ffw.backward(s.views.params(l1), s.c1, dh2, dh1, s.views.grads(l1));
    peer0.backward(s.views.params(l0), s.c0, dh1, dx, s.views.grads(l0));
  }

  std::vector<int> routing(const State& s) const {
    std::vector<int> r(s.c0.ids.data(), s.c0.ids.data() + s.c0.ids.size());
    r.insert(r.end(), s.c2.ids.data(), s.c2.ids.data() + s.c2.ids.size());
    return r;
  }
};

TEST(ModelStack, SharedTableHasOneValueOneGradientAndOneOptimizerState) {
  const auto config = small_config();
  Stack<float> stack(config);
  ASSERT_EQ(stack.model.layout().tables().size(), 1u);
  auto s = stack.make_state(11);
  const Mat<float> x = random_matrix<float>(16, config.model_dim, 1);
  const Mat<float> target = random_matrix<float>(16, config.model_dim, 2);
  stack.forward(s, x, target, peer::Mode::kTrain);
  stack.backward(s);
  // The shared gradient is layer 2's rows merged with layer 0's (backward order: existing + new, bitwise).
  peer::Gradients<float> g0 = stack.peer0.make_gradients(), g2 = stack.peer2.make_gradients();
  Mat<float> dh2 = s.d, dh1 = Mat<float>::Zero(16, config.model_dim), unused(0, config.model_dim);
  {
    auto c2 = s.c2;
    stack.peer2.backward(s.views.params(stack.l2), c2, s.d, dh2, g2);
    dh1 = dh2;
    auto c1 = s.c1;
    peer::Gradients<float> gf = stack.ffw.make_gradients();
    stack.ffw.backward(s.views.params(stack.l1), c1, dh2, dh1, gf);
    auto c0 = s.c0;
    stack.peer0.backward(s.views.params(stack.l0), c0, dh1, unused, g0);
  }
  const auto& shared = s.grads.find_table("blocks.0.ffn.experts");
  const auto& a = g2.find_table("experts");
  const auto& b = g0.find_table("experts");
  std::size_t both = 0;
  std::vector<peer::ExpertId> expected_ids;
  for (peer::ExpertId id = 0; id < config.num_experts; ++id) {
    const float* ra = a.find(id);
    const float* rb = b.find(id);
    const float* rs = shared.find(id);
    if (ra == nullptr && rb == nullptr) {
      EXPECT_EQ(rs, nullptr) << id;
      continue;
    }
    expected_ids.push_back(id);
    ASSERT_NE(rs, nullptr) << id;
    both += (ra != nullptr && rb != nullptr) ? 1 : 0;
    for (Index c = 0; c < shared.cols(); ++c) {
      const float want = ra != nullptr && rb != nullptr ? ra[c] + rb[c] : ra != nullptr ? ra[c] : rb[c];
      EXPECT_EQ(std::memcmp(&rs[c], &want, sizeof(float)), 0) << "row " << id << " col " << c;
    }
  }
  EXPECT_EQ(shared.ids(), expected_ids);
  EXPECT_GT(both, 0u) << "the test needs rows touched by both layers";
  // One optimizer over everything: a row touched by both layers advances its lazy step once.
  peer::Adam<float> adam(stack.model.layout(), peer::default_param_groups(1e-2));
  EXPECT_EQ(adam.group_of("blocks.2.ffn.query.weight"), 1);
  EXPECT_EQ(adam.group_of("blocks.0.ffn.experts"), 0);
  adam.step(s.params, s.grads);
  for (peer::ExpertId id : shared.ids()) EXPECT_EQ(adam.row_steps(peer::TableHandle{0}, id), 1);
  // Both layers see the updated shared table: it is one table.
  EXPECT_EQ(s.views.params(stack.l0).table(peer::TableHandle{0}).data(),
            s.views.params(stack.l2).table(peer::TableHandle{0}).data());
}

TEST(ModelStack, TheWholeModelCanLiveInUserMemory) {
  Stack<float> stack(small_config());
  const auto& m = stack.model.layout();
  std::vector<float> dense(static_cast<std::size_t>(m.dense_size()), 0.0f), buffers(static_cast<std::size_t>(m.buffer_size()), 0.0f),
      table(static_cast<std::size_t>(m.tables()[0].size()), 0.0f);
  peer::Parameters<float>::ExternalMemory memory{dense.data(), buffers.data(), {table.data()}};
  peer::Parameters<float> params(m, memory);
  peer::LayerViews<float> views(stack.model, params);
  stack.peer0.initialize(views.params(stack.l0), 1);
  stack.ffw.initialize(views.params(stack.l1), 2);
  // Every layer's tensors are where the model layout says, in the user's one flat array.
  for (const auto& s : m.dense()) {
    EXPECT_EQ(params.find(s.name).data(), dense.data() + s.offset) << s.name;
  }
  const auto w = views.params(stack.l1).find("ffw.up.weight");
  EXPECT_EQ(w.data(), dense.data() + m.dense()[static_cast<std::size_t>(m.find("blocks.1.ffn.ffw.up.weight").first)].offset);
  EXPECT_NE(w.norm(), 0.0f);
  EXPECT_EQ(views.params(stack.l2).table(peer::TableHandle{0}).data(), table.data());
  EXPECT_NE(std::count(table.begin(), table.end(), 0.0f), static_cast<long>(table.size()));
  EXPECT_TRUE(views.made_from(params));
  peer::Parameters<float> other(m);
  EXPECT_FALSE(views.made_from(other));
}

TEST(ModelStack, WholeStackGradientsMatchCentralDifferences) {
  const auto config = small_config();
  Stack<double> stack(config);
  auto s = stack.make_state(3);
  const Mat<double> x = random_matrix<double>(10, config.model_dim, 5);
  const Mat<double> target = random_matrix<double>(10, config.model_dim, 6);
  stack.forward(s, x, target, peer::Mode::kTrain);
  const auto routing = stack.routing(s);
  s.grads.zero();
  stack.backward(s);
  // A dense copy of the shared table's gradient.
  const auto& tg = s.grads.find_table("blocks.0.ffn.experts");
  Mat<double> table_grad = Mat<double>::Zero(config.num_experts, tg.cols());
  for (std::size_t r = 0; r < tg.ids().size(); ++r) table_grad.row(tg.ids()[r]) = tg.values().row(static_cast<Index>(r));
  auto loss = [&] { return stack.forward(s, x, target, peer::Mode::kTrain); };
  auto same = [&] { return stack.routing(s) == routing; };
  int checked = 0;
  for (const auto& spec : stack.model.layout().dense()) {
    auto p = s.params.find(spec.name);
    auto g = s.grads.find_dense(spec.name);
    const Index count = std::min<Index>(p.size(), 12);
    checked += check_entries(spec.name, p.data(), count, [&](Index e) { return g.data()[e]; }, loss, same).checked;
  }
  auto table = s.params.find("blocks.0.ffn.experts");
  // Rows touched by both layers carry both contributions: check every entry of the touched rows.
  for (peer::ExpertId id : tg.ids()) {
    checked += check_entries("experts row " + std::to_string(id), table.row(id).data(), table.cols(),
                             [&](Index e) { return table_grad(id, e); }, loss, same)
                   .checked;
  }
  EXPECT_GT(checked, 200);
}

TEST(ModelStack, TrainsThroughOneOptimizerAndResumesBitForBitFromOneCheckpoint) {
  const auto config = small_config();
  Stack<float> stack(config);
  const Mat<float> target = random_matrix<float>(16, config.model_dim, 9);
  auto batch = [&](std::int64_t step) { return random_matrix<float>(16, config.model_dim, 100 + static_cast<unsigned>(step % 4)); };
  auto make_adam = [&] {
    return peer::Adam<float>(stack.model.layout(), peer::default_param_groups(1e-2, peer::LrSchedule::warmup(3), 3e-2),
                             peer::AdamConfig::adamw());
  };
  auto train = [&](decltype(stack.make_state(0))& s, peer::Adam<float>& adam, std::int64_t& step, int steps) {
    double last = 0;
    for (int i = 0; i < steps; ++i, ++step) {
      s.grads.zero();
      last = stack.forward(s, batch(step), target, peer::Mode::kTrain);
      stack.backward(s);
      peer::clip_gradient_norm(s.grads, 1.0);
      adam.step(s.params, s.grads);
    }
    return last;
  };
  auto straight = stack.make_state(21);
  auto adam = make_adam();
  std::int64_t step = 0;
  const double first_loss = stack.forward(straight, batch(0), target, peer::Mode::kEval);
  train(straight, adam, step, 40);
  const double trained_loss = stack.forward(straight, batch(0), target, peer::Mode::kEval);
  EXPECT_LT(trained_loss, 0.7 * first_loss) << "the stack did not learn";

  const fs::path file = fs::temp_directory_path() / ("peer_model_" + std::to_string(::getpid()) + ".ckpt");
  auto register_all = [&](peer::TrainingCheckpoint& ckpt, decltype(straight)& s, peer::Adam<float>& opt, std::int64_t* st) {
    ckpt.add_config("blocks.0.ffn", stack.peer0.config().to_fields());
    ckpt.add_config("blocks.2.ffn", stack.peer2.config().to_fields());
    ckpt.add_parameters("model", s.params);
    ckpt.add_optimizer("adam", opt);
    ckpt.add_counter("step", st);
  };
  // Run A: 6 steps, checkpoint, 6 more. Run B: load the checkpoint into fresh objects, 6 steps.
  auto a = stack.make_state(21);
  auto adam_a = make_adam();
  std::int64_t step_a = 0;
  train(a, adam_a, step_a, 6);
  {
    peer::TrainingCheckpoint ckpt;
    register_all(ckpt, a, adam_a, &step_a);
    ckpt.save(file.string());
    // One table in the file, under its one model name.
    const auto names = ckpt.tensor_names();
    EXPECT_EQ(std::count(names.begin(), names.end(), "model.blocks.0.ffn.experts"), 1);
    EXPECT_EQ(std::count(names.begin(), names.end(), "model.blocks.2.ffn.experts"), 0);
  }
  train(a, adam_a, step_a, 6);
  auto b = stack.make_state(999);  // different initial values: all must come from the file
  auto adam_b = make_adam();
  std::int64_t step_b = 0;
  {
    peer::TrainingCheckpoint ckpt;
    register_all(ckpt, b, adam_b, &step_b);
    ckpt.load(file.string());
  }
  EXPECT_EQ(step_b, 6);
  EXPECT_EQ(adam_b.steps(), 6);
  train(b, adam_b, step_b, 6);
  EXPECT_EQ(storage_bytes(a.params), storage_bytes(b.params));
  std::remove(file.string().c_str());
}

TEST(ParamGroups, PatternsAndKindsChooseTheGroup) {
  EXPECT_TRUE(peer::matches_pattern("", "anything"));
  EXPECT_TRUE(peer::matches_pattern("blocks.1", "blocks.12.x"));  // a prefix, as before
  EXPECT_TRUE(peer::matches_pattern("blocks.*.experts", "blocks.12.ffn.experts"));
  EXPECT_FALSE(peer::matches_pattern("blocks.*.experts", "blocks.12.ffn.experts.extra"));
  EXPECT_TRUE(peer::matches_pattern("*norm*", "blocks.0.ffn.query.norm.weight"));
  EXPECT_FALSE(peer::matches_pattern("*.bias", "blocks.0.ffn.query.weight"));
  EXPECT_TRUE(peer::matches_pattern("a*b*c", "aXXbYYbc"));
  EXPECT_FALSE(peer::matches_pattern("a*b*c", "aXXbYYb"));
  Stack<float> stack(small_config());
  std::vector<peer::ParamGroup> groups{
      {"tables", {""}, 1e-3, 0.0, {}, peer::GroupKinds::kTables},
      {"norms", {"*.norm.*"}, 2e-3, 0.0, {}, peer::GroupKinds::kDense},
      {"second", {"blocks.2."}, 3e-3, 0.0, {}, peer::GroupKinds::kAll},
      {"rest", {""}, 4e-3, 0.1, {}, peer::GroupKinds::kDense}};
  peer::Adam<float> adam(stack.model.layout(), groups);
  EXPECT_EQ(adam.group_of("blocks.0.ffn.experts"), 0);
  EXPECT_EQ(adam.group_of("blocks.2.ffn.query.norm.weight"), 1);
  EXPECT_EQ(adam.group_of("blocks.2.ffn.query.weight"), 2);
  EXPECT_EQ(adam.group_of("blocks.0.ffn.query.weight"), 3);
  EXPECT_EQ(adam.group_of("blocks.1.ffn.ffw.up.bias"), 3);
  adam.set_learning_rate(adam.group_index("rest"), 0.5);
  EXPECT_DOUBLE_EQ(adam.learning_rate(3, 1), 0.5);
  EXPECT_THROW(adam.set_learning_rate(3, -1.0), std::invalid_argument);
  EXPECT_THROW(adam.group_index("missing"), std::invalid_argument);
  // A table no group admits is an error naming it.
  std::vector<peer::ParamGroup> dense_only{{"d", {""}, 1e-3, 0.0, {}, peer::GroupKinds::kDense}};
  try {
    peer::Adam<float> bad(stack.model.layout(), dense_only);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'blocks.0.ffn.experts' belongs to no ParamGroup"), std::string::npos);
  }
}

TEST(RawViews, StridedHostArraysWorkWithoutACopyAndGapsStayUntouched) {
  const auto config = small_config();
  peer::PeerLayer<float> layer(config);
  auto params = layer.make_parameters(2);
  auto grads = layer.make_gradients();
  const Index b = 10, d = config.model_dim, stride = d + 5;  // rows inside a wider host buffer
  std::vector<float> x(static_cast<std::size_t>(b * stride), 7.0f), y(x.size(), -3.0f), dy(x.size(), 0.5f), dx(x.size(), 9.0f);
  const Mat<float> xm = random_matrix<float>(b, d, 4);
  for (Index r = 0; r < b; ++r) {
    for (Index c = 0; c < d; ++c) x[static_cast<std::size_t>(r * stride + c)] = xm(r, c);
  }
  peer::PeerLayer<float>::Cache cache;
  layer.forward(params, peer::rows_view(x.data(), b, d, stride), peer::rows_view(y.data(), b, d, stride), cache,
                peer::Mode::kTrain);
  layer.backward(params, cache, peer::rows_view(static_cast<const float*>(dy.data()), b, d, stride),
                 peer::rows_view(dx.data(), b, d, stride), grads);
  // The same computation on contiguous matrices.
  auto params2 = layer.make_parameters(2);
  auto grads2 = layer.make_gradients();
  Mat<float> ym(b, d), dxm = Mat<float>::Constant(b, d, 9.0f);
  peer::PeerLayer<float>::Cache cache2;
  layer.forward(params2, xm, ym, cache2, peer::Mode::kTrain);
  layer.backward(params2, cache2, Mat<float>::Constant(b, d, 0.5f), dxm, grads2);
  for (Index r = 0; r < b; ++r) {
    for (Index c = 0; c < stride; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * stride + c);
      if (c < d) {
        EXPECT_EQ(y[i], ym(r, c));
        EXPECT_EQ(dx[i], dxm(r, c));
      } else {
        EXPECT_EQ(y[i], -3.0f) << "gap written at " << r << ", " << c;
        EXPECT_EQ(dx[i], 9.0f);
      }
    }
  }
  float* null = nullptr;
  EXPECT_THROW(peer::rows_view(null, 2, 3), std::invalid_argument);
  EXPECT_NO_THROW(peer::rows_view(null, 0, 3));
  try {
    peer::rows_view(x.data(), 2, 8, 5);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("rows_view row_stride = 5 must be 0 (= cols) or >= cols = 8"), std::string::npos) << e.what();
  }
}

peer::DenseFfwConfig config_for_other() { return small_ffw(); }

template <typename Layer, typename Config>
void check_adapter(const Config& config, peer::FeedForwardKind kind) {
  std::unique_ptr<peer::FeedForward<double>> ffn;
  if constexpr (std::is_same<Config, peer::PeerConfig>::value) {
    ffn = peer::make_feed_forward<double>(config, kind);
  } else {
    ffn = peer::make_feed_forward<double>(config);
  }
  ASSERT_EQ(ffn->kind(), kind);
  Layer layer(config);
  auto p1 = ffn->make_parameters(3);
  auto p2 = layer.make_parameters(3);
  auto g1 = ffn->make_gradients();
  auto g2 = layer.make_gradients();
  const Mat<double> x = random_matrix<double>(12, 8, 1), dy = random_matrix<double>(12, 8, 2);
  Mat<double> y1(12, 8), y2(12, 8), dx1 = Mat<double>::Zero(12, 8), dx2 = dx1;
  auto c1 = ffn->make_cache();
  typename Layer::Cache c2;
  ffn->forward(p1, x, y1, *c1, peer::Mode::kTrain);
  layer.forward(p2, x, y2, c2, peer::Mode::kTrain);
  EXPECT_EQ(y1, y2);
  ffn->backward(p1, *c1, dy, dx1, g1);
  layer.backward(p2, c2, dy, dx2, g2);
  EXPECT_EQ(dx1, dx2);
  for (const auto& s : layer.layout().dense()) EXPECT_EQ(g1.find_dense(s.name), g2.find_dense(s.name)) << s.name;
  auto w = ffn->make_workspace();
  Mat<double> y3(12, 8);
  ffn->forward(p1, x, y1, *c1, peer::Mode::kEval);
  ffn->infer(p1, x, y3, *w);
  EXPECT_EQ(y1, y3);
  // Held routing: the same output as the forward whose routing it holds.
  auto held = ffn->make_cache();
  ffn->forward(p1, x, y1, *c1, peer::Mode::kTrain);
  ffn->forward_held(p1, x, y3, *held, peer::Mode::kTrain, *c1);
  EXPECT_LE((y1 - y3).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_EQ(ffn->routing(*held), ffn->routing(*c1));
  EXPECT_EQ(ffn->config_fields().front().second, peer::to_string(kind));
  EXPECT_EQ(ffn->total_parameters(), static_cast<double>(layer.total_parameters()));
  // Another block's cache or workspace is refused.
  auto other = peer::make_feed_forward<double>(config_for_other());
  auto foreign = other->make_cache();
  EXPECT_THROW(ffn->forward(p1, x, y1, *foreign, peer::Mode::kTrain), std::invalid_argument);
  auto foreign_ws = other->make_workspace();
  EXPECT_THROW(ffn->infer(p1, x, y3, *foreign_ws), std::invalid_argument);
}

TEST(FeedForwardAdapter, EveryKindComputesExactlyAsItsLayer) {
  check_adapter<peer::DenseFfw<double>>(small_ffw(), peer::FeedForwardKind::kDense);
  check_adapter<peer::PeerLayer<double>>(small_config(), peer::FeedForwardKind::kPeer);
  check_adapter<peer::ProductKeyMemory<double>>(small_config(), peer::FeedForwardKind::kPkm);
  peer::MoeConfig m;
  m.model_dim = 8;
  m.num_experts = 4;
  m.expert_hidden = 6;
  check_adapter<peer::MoeFfw<double>>(m, peer::FeedForwardKind::kMoe);
  EXPECT_EQ(peer::feed_forward_kind_from_string("pkm"), peer::FeedForwardKind::kPkm);
  EXPECT_THROW(peer::feed_forward_kind_from_string("ffn"), std::invalid_argument);
  EXPECT_THROW(peer::make_feed_forward<float>(small_config(), peer::FeedForwardKind::kMoe), std::invalid_argument);
}

}  // namespace
