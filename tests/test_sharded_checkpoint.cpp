// Sharded checkpoints without MPI (peer/io/sharded_checkpoint.hpp): P writers simulated in one process,
// loaded by Q readers for every Q from 1 to P + 2. Every row of every sharded tensor (table, moments,
// row-wise sums, master rows, row steps) carries its global row id in its value, so a row placed wrong is
// seen; replicated registrations come from rank 0. Then every way a set of files can be wrong.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <peer/peer.hpp>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace {

namespace fs = std::filesystem;
using peer::Index;

constexpr Index kRows = 37;  // global table rows: shards of different sizes for most P
constexpr Index kCols = 6;

// Exactly representable in float and bfloat16 (6 significant bits), different for every (kind, row, column).
float pattern(int kind, Index row, Index col) { return std::ldexp(static_cast<float>(row + 1), static_cast<int>(col % 4) + 4 * kind); }

struct Options {
  peer::TableStorage storage = peer::TableStorage::kNative;
  peer::TableOptimizer rule = peer::TableOptimizer::kDefault;
  peer::TableStorage moments = peer::TableStorage::kNative;
  peer::Bf16Rounding rounding = peer::Bf16Rounding::kStochastic;
};

// One rank's model: a dense tensor, a sharded table of kRows rows, Adam on both, a step counter, a value.
struct Shard {
  int rank, ranks;
  Index global_rows;
  peer::ParameterLayout layout;
  std::unique_ptr<peer::Parameters<float>> params;
  std::unique_ptr<peer::Adam<float>> adam;
  std::int64_t step = 0;
  std::string note;

  Shard(int r, int p, const Options& o, Index rows = kRows) : rank(r), ranks(p), global_rows(rows) {
    layout.add_dense("w", 3, 4);
    layout.add_table("experts", peer::ShardedCheckpoint::rows_of(rows, r, p), kCols, o.storage);
    params = std::make_unique<peer::Parameters<float>>(layout);
    auto groups = peer::default_param_groups(1e-2);
    groups[0].table_optimizer = o.rule;
    groups[0].moment_storage = o.moments;
    groups[0].bf16_rounding = o.rounding;
    adam = std::make_unique<peer::Adam<float>>(layout, groups);
  }

  peer::ShardedCheckpoint registrations() {
    peer::ShardedCheckpoint c(rank, ranks);
    c.shard_table("experts", global_rows);
    c.add_config("model", {{"cols", std::to_string(kCols)}});
    c.add_parameters("p", *params);
    c.add_optimizer("adam", *adam);
    c.add_counter("step", &step);
    c.add_value("note", &note);
    return c;
  }

  // Calls f(kind, row pointer as float or bfloat16, local rows, cols, per_row) for the table and every
  // state tensor; g(kind, counter, size, per_row) for every counter.
  template <typename F, typename G>
  void each(F&& f, G&& g) {
    auto& table = params->table(peer::TableHandle{0});
    f(0, table.is_bf16() ? nullptr : table.data(), table.is_bf16() ? table.bf16_data() : nullptr, table.rows(), table.cols(), true);
    f(1, params->dense_data(), nullptr, Index{3}, Index{4}, false);
    int kind = 2;
    for (const auto& s : adam->state_tensors()) f(kind++, s.data, s.bf16, s.rows, s.cols, s.per_row);
    for (const auto& c : adam->state_counters()) g(kind++, c.data, c.size, c.per_row);
  }

  // Every value from its global row (per-row state) or its index (replicated state).
  void fill() {
    each(
        [&](int kind, float* f, peer::bfloat16* b, Index rows, Index cols, bool per_row) {
          for (Index l = 0; l < rows; ++l) {
            for (Index c = 0; c < cols; ++c) {
              const float v = pattern(kind, per_row ? l * ranks + rank : l, c);
              if (f != nullptr) f[l * cols + c] = v;
              else b[l * cols + c] = peer::bfloat16(v);
            }
          }
        },
        [&](int kind, std::int64_t* c, Index size, bool per_row) {
          for (Index l = 0; l < size; ++l) c[l] = 1000 * kind + (per_row ? l * ranks + rank : l);
        });
    step = 17;
    note = "saved";
  }

  // The number of values that differ from fill()'s for this rank's place.
  int mismatches() {
    int bad = 0;
    each(
        [&](int kind, float* f, peer::bfloat16* b, Index rows, Index cols, bool per_row) {
          for (Index l = 0; l < rows; ++l) {
            for (Index c = 0; c < cols; ++c) {
              const float v = pattern(kind, per_row ? l * ranks + rank : l, c);
              bad += (f != nullptr ? f[l * cols + c] : static_cast<float>(b[l * cols + c])) != v;
            }
          }
        },
        [&](int kind, std::int64_t* c, Index size, bool per_row) {
          for (Index l = 0; l < size; ++l) bad += c[l] != 1000 * kind + (per_row ? l * ranks + rank : l);
        });
    return bad + (step != 17) + (note != "saved");
  }
};

class ShardedCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("peer_sharded_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // What P ranks write: every shard file with one save id, then the index.
  std::string save(int p, const Options& o, const std::string& name = "ckpt", const std::string& id = "0123456789abcdef") {
    const std::string path = (dir_ / name).string();
    for (int r = 0; r < p; ++r) {
      Shard s(r, p, o);
      s.fill();
      s.registrations().save_shard(path, id);
    }
    Shard(0, p, o).registrations().save_index(path, id);
    return path;
  }

  // Loads `path` at every rank of Q and counts the values placed wrong.
  static int load_mismatches(const std::string& path, int q, const Options& o) {
    int bad = 0;
    for (int r = 0; r < q; ++r) {
      Shard s(r, q, o);
      s.registrations().load(path);
      bad += s.mismatches();
    }
    return bad;
  }

  fs::path dir_;
};

void expect_load_error(Shard& s, const std::string& path, const std::string& text) {
  try {
    s.registrations().load(path);
    ADD_FAILURE() << "the load did not throw; expected: " << text;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what() << "\nexpected: " << text;
  }
  EXPECT_EQ(s.step, 0) << "a refused load wrote the model";
  EXPECT_EQ(s.params->table(peer::TableHandle{0}).row(0)[0], 0.0f) << "a refused load wrote the model";
}

TEST_F(ShardedCheckpointTest, EveryRowLandsOnItsOwnerAtEveryRankCount) {
  for (int p : {1, 2, 3, 4}) {
    const std::string path = save(p, Options(), "p" + std::to_string(p));
    for (int q = 1; q <= p + 2; ++q) EXPECT_EQ(load_mismatches(path, q, Options()), 0) << "written by " << p << ", loaded by " << q;
  }
}

TEST_F(ShardedCheckpointTest, Bf16TablesMomentsMasterRowsAndRowWiseStateAreSharded) {
  for (const auto rule : {peer::TableOptimizer::kDefault, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableOptimizer::kRowWiseAdagrad}) {
    Options o;
    o.storage = peer::TableStorage::kBFloat16;
    o.moments = rule == peer::TableOptimizer::kRowWiseAdagrad ? peer::TableStorage::kNative : peer::TableStorage::kBFloat16;  // Adagrad: no moments
    o.rounding = peer::Bf16Rounding::kMasterRows;
    o.rule = rule;
    const std::string path = save(4, o, std::string("bf16_") + peer::to_string(rule));
    // The shard files hold per-row state split, bfloat16 where it is bfloat16.
    const peer::CheckpointReader r1(peer::ShardedCheckpoint::shard_path(path, 1, 4));
    EXPECT_EQ(r1.entry("p.experts").dtype, peer::DType::kBFloat16);
    EXPECT_EQ(r1.entry("p.experts").rows, 9);
    EXPECT_EQ(r1.entry("adam.adam.row_steps.experts").rows, 9);
    EXPECT_EQ(r1.entry("adam.bf16.master.experts").rows, 9);
    EXPECT_FALSE(r1.has("p.w")) << "replicated tensors are in rank 0's file only";
    EXPECT_TRUE(peer::CheckpointReader(peer::ShardedCheckpoint::shard_path(path, 0, 4)).has("adam.optimizer.step"));
    for (int q : {1, 2, 3, 5}) EXPECT_EQ(load_mismatches(path, q, o), 0) << peer::to_string(rule) << " loaded by " << q;
  }
}

TEST_F(ShardedCheckpointTest, ASingleProcessSavesAndLoadsThroughTheSameFiles) {
  const std::string path = (dir_ / "single").string();
  Shard a(0, 1, Options());
  a.fill();
  a.registrations().save(path);
  EXPECT_TRUE(fs::exists(peer::ShardedCheckpoint::shard_path(path, 0, 1)));
  Shard b(0, 1, Options());
  b.registrations().load(path);
  EXPECT_EQ(b.mismatches(), 0);
  EXPECT_EQ(load_mismatches(path, 3, Options()), 0);  // and three ranks load it
  Shard c(0, 2, Options());
  EXPECT_THROW(c.registrations().save(path), std::logic_error);  // two ranks need MPI's save
}

TEST_F(ShardedCheckpointTest, ReadsOnlyTheFilesItNeeds) {
  const std::string path = save(3, Options());
  // At the same rank count, rank 2 reads its own file and rank 0's: rank 1's may be gone.
  fs::remove(peer::ShardedCheckpoint::shard_path(path, 1, 3));
  Shard s(2, 3, Options());
  s.registrations().load(path);
  EXPECT_EQ(s.mismatches(), 0);
  Shard t(0, 2, Options());
  expect_load_error(t, path, path + ".shard-1-of-3");  // at 2 ranks rank 0 needs rows from every file
}

TEST_F(ShardedCheckpointTest, MismatchedMissingAndCorruptedShardsAreRefusedAndTheModelUntouched) {
  const std::string path = save(3, Options());
  const std::string other = save(3, Options(), "other", "fedcba9876543210");
  Shard s(0, 1, Options());
  // A shard file of another save.
  fs::copy_file(peer::ShardedCheckpoint::shard_path(other, 2, 3), peer::ShardedCheckpoint::shard_path(path, 2, 3),
                fs::copy_options::overwrite_existing);
  expect_load_error(s, path, "a shard of another save (save id 'fedcba9876543210', the index " + path + " has '0123456789abcdef')");
  // A shard file renamed to another rank's place.
  fs::copy_file(peer::ShardedCheckpoint::shard_path(path, 0, 3), peer::ShardedCheckpoint::shard_path(path, 2, 3),
                fs::copy_options::overwrite_existing);
  expect_load_error(s, path, "holds rank 0 of 3, not rank 2 of 3");
  // Missing.
  fs::remove(peer::ShardedCheckpoint::shard_path(path, 2, 3));
  expect_load_error(s, path, path + ".shard-2-of-3");
  // Corrupted data: one flipped byte in the last tensor of a shard file.
  const std::string path2 = save(3, Options(), "flip");
  const std::string victim = peer::ShardedCheckpoint::shard_path(path2, 1, 3);
  std::string bytes;
  {
    std::ifstream in(victim, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  bytes[bytes.size() - 3] = static_cast<char>(bytes[bytes.size() - 3] ^ 0x10);
  {
    std::ofstream out(victim, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  expect_load_error(s, path2, "checksum mismatch");
  // Not an index; an index of another shape.
  expect_load_error(s, peer::ShardedCheckpoint::shard_path(path2, 0, 3), "not a sharded checkpoint index");
}

TEST_F(ShardedCheckpointTest, ModelsThatDifferAreRefusedNamingTheField) {
  const std::string path = save(2, Options());
  {
    Shard s(0, 1, Options(), 40);  // another number of experts
    expect_load_error(s, path, "sharded tensor 'p.experts' has 37 rows in the checkpoint but 40 in the model");
  }
  {
    Shard s(0, 1, Options());
    peer::ShardedCheckpoint c(0, 1);  // the table not sharded in the model
    c.add_parameters("p", *s.params);
    EXPECT_THROW(c.load(path), std::runtime_error);
  }
  {
    Options o;
    o.rule = peer::TableOptimizer::kRowWiseAdagrad;  // other optimizer state
    Shard s(0, 1, o);
    expect_load_error(s, path, "tensor 'adam.adagrad.row_sum.experts' is not sharded in the checkpoint");
  }
  {
    Shard s(0, 1, Options());
    auto c = s.registrations();
    c.add_config("extra", {{"k", "v"}});
    try {
      c.load(path);
      ADD_FAILURE() << "an extra configuration field was accepted";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("configuration field 'extra.k' is missing"), std::string::npos) << e.what();
    }
  }
}

TEST_F(ShardedCheckpointTest, RegistrationsAreChecked) {
  EXPECT_THROW(peer::ShardedCheckpoint(2, 2), std::invalid_argument);
  EXPECT_THROW(peer::ShardedCheckpoint(0, 0), std::invalid_argument);
  Shard s(1, 3, Options());
  peer::ShardedCheckpoint wrong(1, 3);
  wrong.shard_table("experts", 40);  // rank 1 of 3 holds 13 of 40 rows, the layout has 12 of 37
  try {
    wrong.add_parameters("p", *s.params);
    ADD_FAILURE() << "a shard of the wrong size was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("sharded tensor 'p.experts' has 12 rows but rank 1 of 3 holds 13 of its 40"), std::string::npos) << e.what();
  }
  peer::ShardedCheckpoint twice(0, 3);
  twice.shard_table("experts", 37);
  EXPECT_THROW(twice.shard_table("experts", 37), std::invalid_argument);
  EXPECT_THROW(twice.shard_table("small", 2), std::invalid_argument);  // fewer rows than ranks
  Shard r0(0, 3, Options());
  twice.add_parameters("p", *r0.params);
  std::int64_t counter = 0;
  EXPECT_THROW(twice.add_counter("p.experts", &counter), std::invalid_argument);  // a name taken by a sharded tensor
}

TEST(CheckpointReaderStream, HandsWholeRowsInOrderAndChecksTheChecksum) {
  const fs::path path = fs::temp_directory_path() / ("peer_stream_" + std::to_string(::getpid()));
  const Index rows = 3000, cols = 129;  // about 1.5 MiB: chunks of whole rows across the 1 MiB chunk size
  std::vector<float> data(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  peer::save_checkpoint(path.string(), {}, {{"t", peer::DType::kFloat32, rows, cols, data.data(), {}}});
  const peer::CheckpointReader reader(path.string());
  std::vector<float> got;
  std::int64_t next = 0, chunks = 0;
  reader.stream("t", peer::DType::kFloat32, rows, cols, [&](std::int64_t r0, std::int64_t r1, const void* p) {
    EXPECT_EQ(r0, next);
    EXPECT_GT(r1, r0);
    next = r1;
    ++chunks;
    const auto* f = static_cast<const float*>(p);
    got.insert(got.end(), f, f + (r1 - r0) * cols);
  });
  EXPECT_EQ(next, rows);
  EXPECT_EQ(chunks, 2);
  EXPECT_TRUE(got == data);
  EXPECT_THROW(reader.stream("t", peer::DType::kFloat32, rows, cols + 1, [](std::int64_t, std::int64_t, const void*) {}), std::runtime_error);
  fs::remove(path);
}

}  // namespace
