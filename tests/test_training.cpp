// Training checkpoints: a run resumed from a checkpoint continues bit for bit, and a file that is truncated,
// corrupted or written by a different model is rejected with a message naming the problem while the model,
// the optimizer and the caller's counters stay untouched.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <peer/peer.hpp>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace {

namespace fs = std::filesystem;
using Mat = peer::RowMatrix<float>;

peer::PeerConfig tiny_config() {
  peer::PeerConfig c;
  c.model_dim = 8;
  c.num_experts = 36;
  c.num_heads = 2;
  c.key_dim = 4;
  c.top_k = 3;
  c.sub_key_top_k = 3;
  return c;
}

// One training run: a layer with Adam (or SGD with momentum) on a regression to a fixed random map. The
// data of step s depends on s only, so a resumed run sees the same batches as an uninterrupted one.
template <typename Optimizer>
struct TrainingRun {
  peer::PeerLayer<float> layer;
  peer::Parameters<float> params;
  peer::Gradients<float> grads;
  Optimizer opt;
  std::int64_t step = 0;
  std::string note;  // a caller's free-form value, restored on load
  peer::PeerLayer<float>::Cache cache;

  TrainingRun(const peer::PeerConfig& config, std::uint64_t seed, Optimizer optimizer)
      : layer(config), params(layer.make_parameters(seed)), grads(layer.make_gradients()), opt(std::move(optimizer)) {}

  void train(int steps) {
    const peer::Index b = 12, d = layer.config().model_dim;
    Mat x(b, d), y(b, d), dy(b, d), none;
    for (int i = 0; i < steps; ++i) {
      ++step;
      peer::fill_normal(peer::CounterRng(1000, 0), static_cast<std::uint64_t>(step * x.size()), x.size(), 1.0, x.data());
      layer.forward(params, x, y, cache, peer::Mode::kTrain);
      dy = y - x.reverse();  // loss 0.5 |y - target|^2 with a target the layer can move toward
      grads.zero();
      layer.backward(params, cache, dy, none, grads);
      opt.step(params, grads);
    }
    note = "after step " + std::to_string(step);
  }

  peer::TrainingCheckpoint registrations() {
    peer::TrainingCheckpoint ckpt;
    ckpt.add_config("peer", layer.config().to_fields());
    ckpt.add_parameters("peer", params);
    ckpt.add_optimizer("opt", opt);
    ckpt.add_counter("step", &step);
    ckpt.add_value("note", &note);
    return ckpt;
  }

  // Every byte that a checkpoint holds: parameters, buffers, tables, optimizer state, counters.
  std::string snapshot() {
    std::string out;
    auto add = [&out](const void* p, std::size_t n) { out.append(static_cast<const char*>(p), n); };
    const auto& l = params.layout();
    for (const auto& s : l.dense()) add(params.dense_data() + s.offset, static_cast<std::size_t>(s.size()) * 4);
    for (const auto& s : l.buffers()) add(params.buffer_data() + s.offset, static_cast<std::size_t>(s.size()) * 4);
    for (std::size_t t = 0; t < l.tables().size(); ++t) {
      add(params.table(peer::TableHandle{static_cast<int>(t)}).data(), static_cast<std::size_t>(l.tables()[t].size()) * 4);
    }
    for (const auto& s : opt.state_tensors()) add(s.data, static_cast<std::size_t>(s.rows * s.cols) * 4);
    for (const auto& c : opt.state_counters()) add(c.data, static_cast<std::size_t>(c.size) * 8);
    add(&step, sizeof(step));
    out += note;
    return out;
  }
};

peer::Adam<float> make_adam(const peer::PeerLayer<float>& layer) {
  return peer::Adam<float>(layer.layout(), peer::default_param_groups(3e-3, peer::LrSchedule::cosine(3, 40, 0.1), 1e-2),
                           peer::AdamConfig::adamw());
}
peer::Sgd<float> make_sgd(const peer::PeerLayer<float>& layer) {
  return peer::Sgd<float>(layer.layout(), peer::default_param_groups(1e-2, peer::LrSchedule::warmup(4), 5e-2), 0.9);
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void write_bytes(const fs::path& p, const std::string& bytes) {
  std::error_code ignored;
  fs::remove(p, ignored);
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Expects load to throw std::runtime_error whose message contains `text`.
template <typename R>
void expect_rejected(R& run, const fs::path& path, const std::string& text) {
  try {
    run.registrations().load(path.string());
    ADD_FAILURE() << "load of " << path << " did not throw; expected: " << text;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what() << "\nexpected: " << text;
  }
}

class TrainingCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("peer_training_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

template <typename MakeOptimizer>
void check_resume(const fs::path& file, MakeOptimizer make, int k) {
  const auto config = tiny_config();
  peer::PeerLayer<float> layer(config);
  TrainingRun<decltype(make(layer))> straight(config, 7, make(layer));
  straight.train(2 * k);

  TrainingRun<decltype(make(layer))> first(config, 7, make(layer));
  first.train(k);
  first.registrations().save(file.string());
  // A fresh process would start from other values: a different seed, a new optimizer, step 0.
  TrainingRun<decltype(make(layer))> resumed(config, 99, make(layer));
  ASSERT_NE(resumed.snapshot(), first.snapshot());
  resumed.registrations().load(file.string());
  EXPECT_EQ(resumed.snapshot(), first.snapshot());
  EXPECT_EQ(resumed.step, k);
  EXPECT_EQ(resumed.note, "after step " + std::to_string(k));
  resumed.train(k);
  EXPECT_EQ(resumed.step, 2 * k);
  // Bitwise: every parameter, buffer (batch-norm running statistics), moment and step count.
  EXPECT_TRUE(resumed.snapshot() == straight.snapshot());
  // The runs really trained: the parameters moved from their initial values.
  TrainingRun<decltype(make(layer))> untrained(config, 7, make(layer));
  EXPECT_NE(untrained.snapshot(), straight.snapshot());
}

TEST_F(TrainingCheckpointTest, AdamWRunResumesBitForBit) { check_resume(dir_ / "adam.ckpt", make_adam, 6); }

TEST_F(TrainingCheckpointTest, SgdMomentumRunResumesBitForBit) { check_resume(dir_ / "sgd.ckpt", make_sgd, 5); }

TEST_F(TrainingCheckpointTest, FileHoldsEveryStateTensorUnderItsName) {
  const auto config = tiny_config();
  peer::PeerLayer<float> layer(config);
  TrainingRun<peer::Adam<float>> run(config, 1, make_adam(layer));
  run.train(2);
  const fs::path file = dir_ / "names.ckpt";
  run.registrations().save(file.string());
  peer::CheckpointReader reader(file.string());
  for (const char* name : {"peer.query.weight", "peer.query.norm.running_mean", "peer.query.norm.running_var",
                           "peer.sub_keys.left", "peer.experts", "opt.adam.m.experts", "opt.adam.v.query.weight",
                           "opt.optimizer.step", "opt.adam.row_steps.experts", "step"}) {
    EXPECT_TRUE(reader.has(name)) << name;
  }
  EXPECT_EQ(reader.entry("peer.experts").rows, 36);
  EXPECT_EQ(reader.entry("peer.experts").cols, 16);
  EXPECT_EQ(reader.metadata("config.peer.num_experts"), "36");
  EXPECT_EQ(reader.metadata("peer.kind"), "training");
  EXPECT_EQ(reader.metadata("value.note"), "after step 2");
}

TEST_F(TrainingCheckpointTest, MismatchedModelsAreRejectedAndLeftUntouched) {
  const auto config = tiny_config();
  peer::PeerLayer<float> layer(config);
  TrainingRun<peer::Adam<float>> saved(config, 1, make_adam(layer));
  saved.train(3);
  const fs::path file = dir_ / "model.ckpt";
  saved.registrations().save(file.string());

  // Same shapes, different behaviour: the configuration catches it.
  auto gelu_tanh = config;
  gelu_tanh.activation = peer::Activation::kGeluTanh;
  TrainingRun<peer::Adam<float>> other_activation(gelu_tanh, 2, make_adam(layer));
  const std::string before = other_activation.snapshot();
  expect_rejected(other_activation, file, "configuration field 'peer.activation' is 'gelu' in the file but gelu_tanh in the model");
  EXPECT_EQ(other_activation.snapshot(), before);

  // Text from the file reaches the message escaped: a newline and a terminal escape stay inert.
  peer::Fields hostile_fields = config.to_fields();
  for (auto& f : hostile_fields) {
    if (f.first == "activation") f.second = "gelu\n\x1b[2J";
  }
  peer::TrainingCheckpoint hostile;
  hostile.add_config("peer", hostile_fields);
  const fs::path hostile_file = dir_ / "hostile.ckpt";
  hostile.save(hostile_file.string());
  TrainingRun<peer::Adam<float>> victim(config, 2, make_adam(layer));
  expect_rejected(victim, hostile_file, "configuration field 'peer.activation' is 'gelu\\x0a\\x1b[2J' in the file but gelu in the model");

  auto bigger = config;
  bigger.num_experts = 64;
  peer::PeerLayer<float> big_layer(bigger);
  TrainingRun<peer::Adam<float>> big(bigger, 2, make_adam(big_layer));
  expect_rejected(big, file, "configuration field 'peer.num_experts' is '36' in the file but 64 in the model");

  // Another optimizer: its state tensors are not in the file.
  TrainingRun<peer::Sgd<float>> sgd(config, 2, make_sgd(layer));
  const std::string sgd_before = sgd.snapshot();
  expect_rejected(sgd, file, "tensor 'opt.sgd.momentum.query.weight' is missing");
  EXPECT_EQ(sgd.snapshot(), sgd_before);

  // A model that registers less than the file holds.
  TrainingRun<peer::Adam<float>> fewer(config, 2, make_adam(layer));
  peer::TrainingCheckpoint partial;
  partial.add_config("peer", config.to_fields());
  partial.add_parameters("peer", fewer.params);
  try {
    partial.load(file.string());
    ADD_FAILURE() << "load did not throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("is not part of the model"), std::string::npos) << e.what();
  }

  // A value the file lacks, a configuration the file lacks, a file of another kind.
  TrainingRun<peer::Adam<float>> extra(config, 2, make_adam(layer));
  auto ckpt = extra.registrations();
  std::string cursor;
  ckpt.add_value("data_cursor", &cursor);
  EXPECT_THROW(ckpt.load(file.string()), std::runtime_error);
  auto ckpt2 = extra.registrations();
  ckpt2.add_config("readout", {{"classes", "10"}});
  try {
    ckpt2.load(file.string());
    ADD_FAILURE() << "load did not throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("configuration field 'readout.classes' is missing"), std::string::npos) << e.what();
  }
  peer::save_checkpoint((dir_ / "plain.ckpt").string(), {}, {});
  expect_rejected(extra, dir_ / "plain.ckpt", "not a training checkpoint");
  EXPECT_EQ(extra.snapshot(), TrainingRun<peer::Adam<float>>(config, 2, make_adam(layer)).snapshot());
}

TEST_F(TrainingCheckpointTest, RegistrationsRejectDuplicatesAndBadTensors) {
  peer::TrainingCheckpoint ckpt;
  std::int64_t a = 0;
  ckpt.add_counter("a", &a);
  EXPECT_THROW(ckpt.add_counter("a", &a), std::invalid_argument);
  ckpt.add_config("m", {{"x", "1"}});
  EXPECT_THROW(ckpt.add_config("m", {{"x", "1"}}), std::invalid_argument);
  float* null = nullptr;
  EXPECT_THROW(ckpt.add_tensor("t", null, 2, 2), std::invalid_argument);
  float f = 0;
  EXPECT_THROW(ckpt.add_tensor("u", &f, -1, 1), std::invalid_argument);
  EXPECT_THROW(ckpt.add_value("v", nullptr), std::invalid_argument);
}

TEST_F(TrainingCheckpointTest, EveryTruncationAndByteFlipIsRejectedAndTheModelStaysUntouched) {
  auto config = tiny_config();
  config.num_experts = 4;
  config.top_k = 2;
  config.sub_key_top_k = 2;
  config.model_dim = 4;
  peer::PeerLayer<float> layer(config);
  TrainingRun<peer::Adam<float>> saved(config, 1, make_adam(layer));
  saved.train(2);
  const fs::path file = dir_ / "small.ckpt", bad = dir_ / "bad.ckpt";
  auto compact = saved.registrations();
  compact.set_table_alignment(0);  // every byte of the file is tried: without the 64 KiB gap of a mappable table
  compact.save(file.string());
  const std::string bytes = read_bytes(file);
  ASSERT_GT(bytes.size(), 1000u);
  ASSERT_LT(bytes.size(), 20000u);

  TrainingRun<peer::Adam<float>> target(config, 2, make_adam(layer));
  const std::string before = target.snapshot();
  auto ckpt = target.registrations();
  std::size_t rejected = 0;
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    write_bytes(bad, bytes.substr(0, size));
    try {
      ckpt.load(bad.string());
    } catch (const std::runtime_error&) {
      ++rejected;
    }
  }
  EXPECT_EQ(rejected, bytes.size()) << "a truncated file was accepted";
  EXPECT_EQ(target.snapshot(), before);
  rejected = 0;
  for (std::size_t at = 0; at < bytes.size(); ++at) {
    std::string flipped = bytes;
    flipped[at] = static_cast<char>(flipped[at] ^ 0x10);
    write_bytes(bad, flipped);
    try {
      ckpt.load(bad.string());
    } catch (const std::runtime_error&) {
      ++rejected;
    }
  }
  EXPECT_EQ(rejected, bytes.size()) << "a corrupted file was accepted";
  EXPECT_EQ(target.snapshot(), before);
  // The intact file still loads.
  ckpt.load(file.string());
  EXPECT_EQ(target.snapshot(), saved.snapshot());
}

}  // namespace

// Crash safety: a process SIGKILLed at any point of a save leaves at the path a complete checkpoint, the
// old one or the new one, that loads (never a partial file). 4 MB of parameters, so that a save takes long
// enough for the kills to land inside its writes, fsyncs and rename.
TEST_F(TrainingCheckpointTest, KilledSavesLeaveTheOldOrTheNewCheckpoint) {
  peer::ParameterLayout layout;
  layout.add_dense("w", 1024, 1024);
  peer::Parameters<float> params(layout);
  std::int64_t step = 0;
  peer::TrainingCheckpoint ckpt;
  ckpt.add_parameters("m", params);
  ckpt.add_counter("step", &step);
  const std::string file = (dir_ / "killed.ckpt").string();
  auto save = [&](int trial) {
    step = trial;
    std::fill(params.dense_data(), params.dense_data() + layout.dense_size(), static_cast<float>(trial));
    ckpt.save(file);
  };
  int checked = 0;
  auto check = [&] {
    peer::Parameters<float> back(layout);
    std::int64_t back_step = -1;
    peer::TrainingCheckpoint reader;
    reader.add_parameters("m", back);
    reader.add_counter("step", &back_step);
    ASSERT_NO_THROW(reader.load(file)) << "after a killed save";
    const float v = back.dense_data()[0];
    EXPECT_EQ(v, static_cast<float>(back_step));
    EXPECT_TRUE(std::all_of(back.dense_data(), back.dense_data() + layout.dense_size(), [&](float x) { return x == v; }));
    ++checked;
  };
  const int killed = peer_test::kill_during_saves(40, save, check);
  EXPECT_GT(killed, 5) << "most kills must land before the save finished";
  EXPECT_EQ(checked, 42);  // the first save, the unkilled child, then every trial
  // A killed save may leave its temporary file (path.tmp.<pid>.<n>) behind, never a partial file at the path.
  std::printf("killed %d of 40 saves; the checkpoint loaded after every one\n", killed);
}
