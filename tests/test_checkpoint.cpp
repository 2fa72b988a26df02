// Checkpoint files: CRC-32C against known vectors, round trips of every dtype, atomic saves (no temporary
// file left, an existing file untouched on failure), and a reader that rejects every truncation, every
// single-byte corruption and every crafted header that breaks a rule, with a message naming the problem.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <peer/io/checkpoint.hpp>
#include <peer/layers/peer_layer.hpp>
#include <peer/version.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
using peer::CheckpointReader;
using peer::DType;
using peer::TensorView;
using Metadata = std::vector<std::pair<std::string, std::string>>;

// ---- Helpers ------------------------------------------------------------------------------------------

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::string& bytes) {
  // A new file each time: truncating an existing one makes ext4 flush it on close (auto_da_alloc).
  std::error_code ignored;
  fs::remove(path, ignored);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<std::string> files_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Expects `call` to throw E whose message contains every fragment of `texts`; returns the message.
template <typename E, typename F>
std::string expect_error(F&& call, const std::vector<std::string>& texts) {
  try {
    call();
  } catch (const E& e) {
    const std::string message = e.what();
    for (const auto& text : texts) {
      EXPECT_NE(message.find(text), std::string::npos) << "message: " << message << "\nexpected: " << text;
    }
    return message;
  }
  ADD_FAILURE() << "no exception; expected: " << (texts.empty() ? std::string() : texts.front());
  return "";
}

// The reader's full check: constructor, then verify_all.
void open_and_verify(const fs::path& path) {
  CheckpointReader reader(path.string());
  reader.verify_all();
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// A fresh directory per test, removed afterwards.
class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("peer_checkpoint_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

// A small checkpoint of every dtype (about 600 bytes), used by the corruption tests.
struct SmallCheckpoint {
  std::vector<float> f32{1.5f, -0.0f, std::numeric_limits<float>::infinity(), 3.25f, -7.0f, 1e-30f};
  std::vector<double> f64{2.0, -1.0 / 3.0, 1e300};
  std::vector<std::int32_t> i32{std::numeric_limits<std::int32_t>::min(), -1, 0, 7};
  std::vector<std::int64_t> i64{std::numeric_limits<std::int64_t>::max(), -5};
  std::vector<std::uint8_t> u8{0, 1, 128, 255, 42};
  Metadata metadata{{"model", "peer-small"}, {"step", "1234"}, {"empty", ""}};

  std::vector<TensorView> views() const {
    return {{"weights", DType::kFloat32, 2, 3, f32.data(), {}}, {"empty", DType::kFloat64, 0, 4, nullptr, {}},
            {"scales", DType::kFloat64, 3, 1, f64.data(), {}},  {"ids", DType::kInt32, 2, 2, i32.data(), {}},
            {"steps", DType::kInt64, 1, 2, i64.data(), {}},     {"bytes", DType::kUInt8, 1, 5, u8.data(), {}}};
  }
  void save(const std::string& path) const { peer::save_checkpoint(path, metadata, views()); }
};

// ---- CRC-32C ------------------------------------------------------------------------------------------

// Bit-at-a-time CRC-32C, the definition.
std::uint32_t crc32c_bitwise(const unsigned char* p, std::size_t n) {
  std::uint32_t crc = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ ((crc & 1u) ? 0x82F63B78u : 0u);
  }
  return ~crc;
}

TEST(Crc32c, KnownVectors) {
  auto crc = [](const std::string& s) { return peer::crc32c(s.data(), s.size()); };
  EXPECT_EQ(crc(""), 0x00000000u);
  EXPECT_EQ(crc("a"), 0xC1D04330u);
  EXPECT_EQ(crc("123456789"), 0xE3069283u);  // the CRC catalogue's check value
  EXPECT_EQ(crc("The quick brown fox jumps over the lazy dog"), 0x22620404u);
  // RFC 3720 (iSCSI), appendix B.4.
  std::string zeros(32, '\0'), ones(32, '\xFF'), up(32, '\0'), down(32, '\0');
  for (int i = 0; i < 32; ++i) {
    up[static_cast<std::size_t>(i)] = static_cast<char>(i);
    down[static_cast<std::size_t>(i)] = static_cast<char>(31 - i);
  }
  EXPECT_EQ(crc(zeros), 0x8A9136AAu);
  EXPECT_EQ(crc(ones), 0x62A8AB43u);
  EXPECT_EQ(crc(up), 0x46DD794Eu);
  EXPECT_EQ(crc(down), 0x113FDB5Cu);
}

TEST(Crc32c, MatchesTheBitwiseDefinitionAndExtendsAcrossSplits) {
  std::mt19937 gen(7);
  std::vector<unsigned char> buffer(300);
  for (auto& b : buffer) b = static_cast<unsigned char>(gen());
  for (std::size_t start = 0; start < 9; ++start) {  // every alignment of the 8-byte steps
    for (std::size_t n = 0; n + start <= buffer.size(); n += 1 + n / 7) {
      const unsigned char* p = buffer.data() + start;
      const std::uint32_t whole = peer::crc32c(p, n);
      ASSERT_EQ(whole, crc32c_bitwise(p, n)) << "start " << start << " n " << n;
      const std::size_t split = n / 3;
      ASSERT_EQ(peer::crc32c(p + split, n - split, peer::crc32c(p, split)), whole);
    }
  }
}

// ---- Round trips --------------------------------------------------------------------------------------

TEST_F(CheckpointTest, RoundTripsEveryDtypeEmptyTensorsAndMetadata) {
  SmallCheckpoint small;
  // Bit patterns that a value comparison would hide: a NaN payload, negative zero.
  std::uint32_t nan_bits = 0x7FC01234u;
  std::memcpy(&small.f32[4], &nan_bits, 4);
  small.metadata.push_back(
      {"gr\xC3\xB6\xC3\x9F"
       "e",
       std::string("bin\0\xFF\x01", 6)});  // UTF-8 key, binary value
  const std::string file = path("small.ckpt");
  small.save(file);
  EXPECT_EQ(files_in(dir_), std::vector<std::string>{"small.ckpt"});

  CheckpointReader reader(file);
  reader.verify_all();
  EXPECT_EQ(reader.metadata(), small.metadata);
  EXPECT_EQ(reader.metadata("step"), "1234");
  EXPECT_EQ(reader.metadata("empty"), "");
  EXPECT_EQ(reader.metadata("gr\xC3\xB6\xC3\x9F"
                            "e"),
            std::string("bin\0\xFF\x01", 6));
  EXPECT_TRUE(reader.has_metadata("model"));
  EXPECT_FALSE(reader.has_metadata("nope"));

  const auto views = small.views();
  ASSERT_EQ(reader.tensors().size(), views.size());
  for (std::size_t t = 0; t < views.size(); ++t) {
    const auto& e = reader.tensors()[t];
    const auto& v = views[t];
    SCOPED_TRACE(v.name);
    EXPECT_EQ(e.name, v.name);  // file order is the written order
    EXPECT_EQ(e.dtype, v.dtype);
    EXPECT_EQ(e.rows, v.rows);
    EXPECT_EQ(e.cols, v.cols);
    EXPECT_EQ(e.bytes, static_cast<std::uint64_t>(v.rows * v.cols) * peer::dtype_size(v.dtype));
    EXPECT_EQ(e.offset % 64, 0u);
    EXPECT_EQ(e.crc32c, peer::crc32c(v.data, static_cast<std::size_t>(e.bytes)));
    EXPECT_TRUE(reader.has(v.name));
    std::vector<unsigned char> out(static_cast<std::size_t>(e.bytes) + 1, 0xAB);
    reader.read(v.name, v.dtype, v.rows, v.cols, out.data());
    if (e.bytes > 0) {
      EXPECT_EQ(std::memcmp(out.data(), v.data, static_cast<std::size_t>(e.bytes)), 0);
    }
    EXPECT_EQ(out.back(), 0xAB) << "read wrote past the tensor";
  }
  EXPECT_FALSE(reader.has("nope"));
  reader.read("empty", DType::kFloat64, 0, 4, nullptr);  // nothing to read: no destination needed
  EXPECT_EQ(reader.file_size(), reader.tensors().back().offset + reader.tensors().back().bytes);
  EXPECT_EQ(reader.file_size(), fs::file_size(file));
  EXPECT_EQ(peer::dtype_of<float>(), DType::kFloat32);
  EXPECT_EQ(peer::dtype_of<std::int64_t>(), DType::kInt64);
  EXPECT_EQ(peer::dtype_of<std::uint8_t>(), DType::kUInt8);
}

TEST_F(CheckpointTest, RoundTripsAFileWithoutTensorsOrMetadata) {
  peer::save_checkpoint(path("nothing.ckpt"), {}, {});
  CheckpointReader reader(path("nothing.ckpt"));
  reader.verify_all();
  EXPECT_TRUE(reader.metadata().empty());
  EXPECT_TRUE(reader.tensors().empty());
  EXPECT_EQ(reader.file_size(), 24u + 8u + 4u);  // prefix, two counts, header checksum
}

TEST_F(CheckpointTest, LargeTensorsAndProducersCrossChunkBoundaries) {
  constexpr std::size_t kChunk = peer::CheckpointFormat::kChunkBytes;
  // 1000 x 787 float32: 3,148,000 bytes, three chunk boundaries; rows of 3,148 bytes do not divide a chunk.
  const std::int64_t rows = 1000, cols = 787;
  std::vector<float> table(static_cast<std::size_t>(rows * cols));
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (auto& x : table) x = dist(gen);

  std::vector<std::pair<std::int64_t, std::int64_t>> calls;
  TensorView produced{
      "produced", DType::kFloat32, rows, cols, nullptr, [&](std::int64_t begin, std::int64_t end, void* dst) {
        calls.push_back({begin, end});
        std::memcpy(dst, table.data() + begin * cols, static_cast<std::size_t>((end - begin) * cols) * sizeof(float));
      }};
  // A row larger than a chunk: one row per call.
  const std::int64_t wide_cols = static_cast<std::int64_t>(kChunk / sizeof(double)) + 3;
  std::vector<double> wide(static_cast<std::size_t>(2 * wide_cols));
  for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = static_cast<double>(i) * 0.5;
  int wide_calls = 0;
  TensorView wide_view{
      "wide", DType::kFloat64, 2, wide_cols, nullptr, [&](std::int64_t begin, std::int64_t end, void* dst) {
        ++wide_calls;
        EXPECT_EQ(end - begin, 1);
        std::memcpy(dst, wide.data() + begin * wide_cols, static_cast<std::size_t>(wide_cols) * sizeof(double));
      }};
  const std::string file = path("large.ckpt");
  peer::save_checkpoint(file, {{"kind", "large"}},
                        {{"direct", DType::kFloat32, rows, cols, table.data(), {}}, produced, wide_view});

  // The producer saw [0, rows) in order, in calls of at most one chunk.
  ASSERT_FALSE(calls.empty());
  EXPECT_EQ(calls.front().first, 0);
  EXPECT_EQ(calls.back().second, rows);
  for (std::size_t i = 0; i < calls.size(); ++i) {
    if (i > 0) {
      EXPECT_EQ(calls[i].first, calls[i - 1].second);
    }
    EXPECT_LE(static_cast<std::size_t>(calls[i].second - calls[i].first) * static_cast<std::size_t>(cols) * 4, kChunk);
  }
  EXPECT_GE(calls.size(), 4u);
  EXPECT_EQ(wide_calls, 2);

  CheckpointReader reader(file);
  reader.verify_all();
  const std::uint32_t expected_crc = peer::crc32c(table.data(), table.size() * sizeof(float));
  EXPECT_EQ(reader.entry("direct").crc32c, expected_crc);
  EXPECT_EQ(reader.entry("produced").crc32c, expected_crc);
  for (const char* name : {"direct", "produced"}) {
    std::vector<float> back(table.size(), -1.0f);
    reader.read(name, DType::kFloat32, rows, cols, back.data());
    EXPECT_EQ(std::memcmp(back.data(), table.data(), table.size() * sizeof(float)), 0) << name;
  }
  std::vector<double> wide_back(wide.size());
  reader.read("wide", DType::kFloat64, 2, wide_cols, wide_back.data());
  EXPECT_EQ(wide_back, wide);
}

// The intended use: save a layer's parameters, then load them following the documented sequence.
TEST_F(CheckpointTest, SavesAndLoadsAPeerLayersParameters) {
  peer::PeerConfig config;
  config.model_dim = 8;
  config.num_experts = 16;
  config.num_heads = 2;
  config.key_dim = 8;
  config.top_k = 3;
  config.sub_key_top_k = 3;
  peer::PeerLayer<float> layer(config);
  auto params = layer.make_parameters(5);
  const peer::ParameterLayout& layout = layer.layout();
  std::vector<peer::TensorSpec> specs = layout.dense();
  specs.insert(specs.end(), layout.buffers().begin(), layout.buffers().end());
  specs.insert(specs.end(), layout.tables().begin(), layout.tables().end());

  std::vector<TensorView> views;
  for (const auto& s : specs)
    views.push_back({s.name, DType::kFloat32, s.rows, s.cols, params.find(s.name).data(), {}});
  peer::save_checkpoint(path("layer.ckpt"), {{"peer.version", peer::version()}}, views);

  peer::Parameters<float> loaded(layout);
  CheckpointReader reader(path("layer.ckpt"));
  reader.verify_all();
  for (const auto& s : specs) {
    ASSERT_TRUE(reader.has(s.name)) << s.name;
    const auto& e = reader.entry(s.name);
    ASSERT_TRUE(e.dtype == DType::kFloat32 && e.rows == s.rows && e.cols == s.cols) << s.name;
  }
  for (const auto& s : specs) reader.read(s.name, DType::kFloat32, s.rows, s.cols, loaded.find(s.name).data());
  for (const auto& s : specs) EXPECT_EQ(loaded.find(s.name), params.find(s.name)) << s.name;
}

// ---- Atomic saves -------------------------------------------------------------------------------------

TEST_F(CheckpointTest, SaveReplacesAnExistingFileAndLeavesNoTemporaryFile) {
  const std::string file = path("model.ckpt");
  SmallCheckpoint first;
  first.save(file);
  SmallCheckpoint second;
  second.metadata[1].second = "5678";
  second.f32[0] = 99.0f;
  second.save(file);
  EXPECT_EQ(files_in(dir_), std::vector<std::string>{"model.ckpt"});
  CheckpointReader reader(file);
  reader.verify_all();
  EXPECT_EQ(reader.metadata("step"), "5678");
  std::vector<float> w(6);
  reader.read("weights", DType::kFloat32, 2, 3, w.data());
  EXPECT_EQ(w[0], 99.0f);
}

TEST_F(CheckpointTest, FailedSavesLeaveNoTemporaryFileAndTheOldFileUntouched) {
  const std::string file = path("model.ckpt");
  SmallCheckpoint small;
  small.save(file);
  const std::string before = read_file(file);

  // Into a directory that does not exist: nothing is created, the message names the path and errno text.
  const std::string missing = path("missing/model.ckpt");
  expect_error<std::runtime_error>(
      [&] { small.save(missing); },
      {"checkpoint " + missing + ": cannot create temporary file", "No such file or directory"});
  EXPECT_FALSE(fs::exists(dir_ / "missing"));

  // rows * cols overflows: rejected before any file is created.
  float dummy = 0.0f;
  expect_error<std::invalid_argument>(
      [&] {
        peer::save_checkpoint(file, {},
                              {{"huge", DType::kFloat32, std::int64_t{1} << 40, std::int64_t{1} << 40, &dummy, {}}});
      },
      {"checkpoint " + file + ": tensors[0] ('huge').rows * cols = 1099511627776 * 1099511627776", "too large"});

  // A producer that fails after data was written: its exception propagates, the temporary file goes.
  int produced = 0;  // 600000 float rows, 2.4 MB: the producer is called more than once
  TensorView failing{
      "failing", DType::kFloat32, 600000, 1, nullptr, [&](std::int64_t begin, std::int64_t end, void* dst) {
        if (++produced == 2) throw std::logic_error("producer failed");
        std::memset(dst, 0, static_cast<std::size_t>(end - begin) * sizeof(float));
      }};
  expect_error<std::logic_error>(
      [&] {
        peer::save_checkpoint(file, {}, {small.views()[0], failing});
      },
      {"producer failed"});
  EXPECT_EQ(produced, 2);

  // The rename fails (the path is a non-empty directory) after the whole file was written and synced.
  fs::create_directories(dir_ / "occupied" / "inner");
  expect_error<std::runtime_error>([&] { small.save(path("occupied")); },
                                   {"checkpoint " + path("occupied") + ": cannot rename temporary file"});

  EXPECT_EQ(files_in(dir_), (std::vector<std::string>{"model.ckpt", "occupied"}));
  EXPECT_EQ(read_file(file), before);
  open_and_verify(file);
}

TEST_F(CheckpointTest, SaveRejectsInvalidArgumentsNamingTheFieldAndRule) {
  const std::string file = path("bad.ckpt");
  float x[4] = {1, 2, 3, 4};
  auto tensor = [&](const std::string& name) { return TensorView{name, DType::kFloat32, 2, 2, x, {}}; };
  auto save = [&](const Metadata& m, const std::vector<TensorView>& t) { peer::save_checkpoint(file, m, t); };
  using V = std::vector<TensorView>;
  const std::string where = "checkpoint " + file + ": ";

  expect_error<std::invalid_argument>([&] { save({}, V{tensor("")}); },
                                      {where + "tensors[0].name = '' must not be empty"});
  expect_error<std::invalid_argument>([&] { save({}, V{tensor(std::string(4097, 'n'))}); },
                                      {"tensors[0].name", "is 4097 bytes long, the limit is 4096"});
  expect_error<std::invalid_argument>([&] { save({}, V{tensor(std::string("a\0b", 3))}); },
                                      {"tensors[0].name = 'a\\x00b' contains a NUL byte at byte 1"});
  for (const char* bad : {"\xC3\x28", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82", "\xFF"}) {
    expect_error<std::invalid_argument>([&] { save({}, V{tensor(bad)}); }, {"tensors[0].name", "is not valid UTF-8"});
  }
  expect_error<std::invalid_argument>(
      [&] {
        save({}, V{tensor("w"), tensor("w")});
      },
      {"tensors[1].name = 'w' is a duplicate"});
  expect_error<std::invalid_argument>(
      [&] {
        save({{"k", "1"}, {"k", "2"}}, {});
      },
      {"metadata[1].first (key) = 'k' is a duplicate"});
  expect_error<std::invalid_argument>(
      [&] {
        save({{"", "1"}}, {});
      },
      {"metadata[0].first (key) = '' must not be empty"});
  expect_error<std::invalid_argument>(
      [&] {
        save({{"k", std::string((1 << 20) + 1, 'v')}}, {});
      },
      {"metadata[0].second.size() (value) = 1048577 must be <= 1048576"});
  auto with = [&](auto change) {
    TensorView v = tensor("w");
    change(v);
    return V{v};
  };
  expect_error<std::invalid_argument>([&] { save({}, with([](TensorView& v) { v.rows = -1; })); },
                                      {"tensors[0] ('w').rows = -1 must be >= 0"});
  expect_error<std::invalid_argument>([&] { save({}, with([](TensorView& v) { v.cols = -3; })); },
                                      {"tensors[0] ('w').cols = -3 must be >= 0"});
  expect_error<std::invalid_argument>([&] { save({}, with([](TensorView& v) { v.dtype = static_cast<DType>(9); })); },
                                      {"tensors[0] ('w').dtype = 9 is not a DType"});
  expect_error<std::invalid_argument>([&] { save({}, with([](TensorView& v) { v.data = nullptr; })); },
                                      {"tensors[0] ('w').data = null and no producer is set"});
  expect_error<std::invalid_argument>(
      [&] { save({}, with([](TensorView& v) { v.producer = [](std::int64_t, std::int64_t, void*) {}; })); },
      {"tensors[0] ('w').data = non-null and a producer are set"});
  EXPECT_TRUE(files_in(dir_).empty());

  // The limits are inclusive, and an empty tensor needs no data.
  save({{std::string(4096, 'k'), std::string(1 << 20, 'v')}},
       {tensor(std::string(4096, 'n')), {"none", DType::kInt64, 5, 0, nullptr, {}}});
  open_and_verify(file);
}

// ---- Damaged files ------------------------------------------------------------------------------------

TEST_F(CheckpointTest, TruncationAtEveryOffsetIsRejected) {
  const std::string file = path("small.ckpt");
  SmallCheckpoint().save(file);
  const std::string bytes = read_file(file);
  ASSERT_GT(bytes.size(), 300u);
  ASSERT_LT(bytes.size(), 1000u);
  const std::string cut = path("cut.ckpt");
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    write_file(cut, bytes.substr(0, size));
    const std::string message =
        expect_error<std::runtime_error>([&] { open_and_verify(cut); }, {"checkpoint " + cut + ": truncated"});
    if (HasFailure()) FAIL() << "at size " << size << ": " << message;
  }
}

TEST_F(CheckpointTest, EveryByteFlipIsDetected) {
  const std::string file = path("small.ckpt");
  SmallCheckpoint().save(file);
  const std::string bytes = read_file(file);
  std::uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data() + 16, 8);
  const std::size_t data_begin = static_cast<std::size_t>(24 + header_length + 4);
  std::vector<peer::TensorEntry> entries = CheckpointReader(file).tensors();

  // What each byte is, hence which error a flip must produce.
  auto expected = [&](std::size_t i) -> std::string {
    if (i < 8) return "bad magic";
    if (i < 12) return "format version";
    if (i < 16) return "endianness marker";
    if (i < 24) return "";  // the header length: too long, truncated, or the checksum lands elsewhere
    if (i < data_begin) return "header checksum mismatch";
    for (const auto& e : entries) {
      if (i >= e.offset && i < e.offset + e.bytes) return "checksum mismatch in tensor '" + e.name + "'";
    }
    return "padding byte " + std::to_string(i);
  };
  const std::string bad = path("flipped.ckpt");
  std::size_t data_flips = 0, padding_flips = 0;
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    for (unsigned mask : {0xFFu, 0x01u}) {
      std::string flipped = bytes;
      flipped[i] = static_cast<char>(static_cast<unsigned char>(flipped[i]) ^ mask);
      write_file(bad, flipped);
      const std::string what = expected(i);
      const std::string message =
          expect_error<std::runtime_error>([&] { open_and_verify(bad); }, {"checkpoint " + bad + ": ", what});
      if (HasFailure()) FAIL() << "byte " << i << " mask " << int(mask) << ": " << message;
      data_flips += what.rfind("checksum mismatch in tensor", 0) == 0;
      padding_flips += what.rfind("padding", 0) == 0;
    }
  }
  EXPECT_GT(data_flips, 0u);
  EXPECT_GT(padding_flips, 0u);
}

TEST_F(CheckpointTest, ReportsByteOrderVersionMagicAndOpenErrors) {
  const std::string file = path("small.ckpt");
  SmallCheckpoint().save(file);
  const std::string bytes = read_file(file);
  const std::string bad = path("bad.ckpt");
  auto patched = [&](std::size_t at, auto value) {
    std::string b = bytes;
    std::memcpy(&b[at], &value, sizeof(value));
    write_file(bad, b);
  };
  patched(12, std::uint32_t{0x04030201u});
  expect_error<std::runtime_error>([&] { open_and_verify(bad); },
                                   {"checkpoint " + bad + ": written on a machine of the other byte order"});
  patched(12, std::uint32_t{0x01020305u});
  expect_error<std::runtime_error>([&] { open_and_verify(bad); }, {"bad endianness marker 0x01020305"});
  patched(8, std::uint32_t{7});
  expect_error<std::runtime_error>([&] { open_and_verify(bad); },
                                   {"checkpoint " + bad + ": format version 7 is not supported (this build reads 1)"});
  patched(16, std::uint64_t{(256u << 20) + 1});
  expect_error<std::runtime_error>([&] { open_and_verify(bad); },
                                   {"header length 268435457 exceeds the limit 268435456"});
  write_file(bad, "# not a checkpoint\n");
  expect_error<std::runtime_error>([&] { open_and_verify(bad); }, {"checkpoint " + bad + ": bad magic"});
  write_file(bad, "");
  expect_error<std::runtime_error>([&] { open_and_verify(bad); }, {"truncated: the fixed prefix needs bytes [0, 24)"});
  expect_error<std::runtime_error>([&] { open_and_verify(path("absent.ckpt")); },
                                   {"checkpoint " + path("absent.ckpt") + ": cannot open: No such file or directory"});
  expect_error<std::runtime_error>([&] { open_and_verify(dir_); }, {"not a regular file"});
}

// ---- Crafted headers with valid checksums (an adversary recomputes them) --------------------------------

struct RawTensor {
  std::string name;
  std::uint8_t dtype;
  std::int64_t rows, cols;
  std::uint64_t offset;
  std::string payload;
  std::optional<std::uint64_t> length;  // default: payload.size()
  std::optional<std::uint32_t> crc;     // default: CRC-32C of the payload
};

struct RawFile {
  Metadata metadata{{"step", "12"}};
  std::vector<RawTensor> tensors{{"a", 1, 2, 2, 512, std::string(16, '\x11'), {}, {}},
                                 {"b", 5, 1, 3, 576, "xyz", {}, {}}};
  std::optional<std::uint32_t> metadata_count, tensor_count;
  std::string header_extra;    // appended to the header's fields
  std::size_t header_cut = 0;  // bytes cut from the end of the header's fields
  std::string trailing;        // appended to the file

  std::string build() const {
    std::string body;
    put(body, metadata_count.value_or(static_cast<std::uint32_t>(metadata.size())));
    for (const auto& [key, value] : metadata) {
      put(body, static_cast<std::uint32_t>(key.size()));
      body += key;
      put(body, static_cast<std::uint32_t>(value.size()));
      body += value;
    }
    put(body, tensor_count.value_or(static_cast<std::uint32_t>(tensors.size())));
    for (const auto& t : tensors) {
      put(body, static_cast<std::uint32_t>(t.name.size()));
      body += t.name;
      put(body, t.dtype);
      put(body, t.rows);
      put(body, t.cols);
      put(body, t.offset);
      put(body, t.length.value_or(t.payload.size()));
      put(body, t.crc.value_or(peer::crc32c(t.payload.data(), t.payload.size())));
    }
    body += header_extra;
    body.resize(body.size() - header_cut);
    std::string file = "PEERCKPT";
    put(file, std::uint32_t{1});
    put(file, std::uint32_t{0x01020304u});
    put(file, static_cast<std::uint64_t>(body.size()));
    file += body;
    put(file, peer::crc32c(file.data(), file.size()));
    for (const auto& t : tensors) {
      if (file.size() < t.offset) file.resize(static_cast<std::size_t>(t.offset), '\0');
      file += t.payload;
    }
    return file + trailing;
  }
};

TEST_F(CheckpointTest, RejectsCraftedHeadersThatBreakARule) {
  const std::string file = path("crafted.ckpt");
  const std::string where = "checkpoint " + file + ": ";
  auto rejects = [&](const RawFile& raw, const std::string& text) {
    write_file(file, raw.build());
    expect_error<std::runtime_error>([&] { CheckpointReader reader(file); }, {where + text});
  };
  // The baseline is valid.
  write_file(file, RawFile().build());
  open_and_verify(file);

  auto raw = [](auto change) {
    RawFile r;
    change(r);
    return r;
  };
  rejects(raw([](RawFile& r) { r.tensors[1].dtype = 0; }), "tensor 'b' has unknown dtype 0");
  rejects(raw([](RawFile& r) { r.tensors[1].dtype = 7; }), "tensor 'b' has unknown dtype 7");  // 6 is bfloat16
  rejects(raw([](RawFile& r) { r.tensors[0].rows = -1; }), "tensor 'a' rows = -1 must be >= 0");
  rejects(raw([](RawFile& r) { r.tensors[0].cols = -2; }), "tensor 'a' cols = -2 must be >= 0");
  rejects(raw([](RawFile& r) { r.tensors[0].rows = r.tensors[0].cols = std::int64_t{1} << 31; }),
          "tensor 'a' rows * cols = 2147483648 * 2147483648 is too large");
  rejects(raw([](RawFile& r) { r.tensors[0].length = 15; }),
          "tensor 'a' data length 15 should be 16 for float32 [2, 2]");
  rejects(raw([](RawFile& r) { r.tensors[0].offset = 520; }), "tensor 'a' data offset 520 is not a multiple of 64");
  rejects(raw([](RawFile& r) { r.tensors[0].offset = 64; }),
          "tensor 'a' data offset 64 overlaps the header, which ends at");
  rejects(raw([](RawFile& r) { r.tensors[1].offset = 512; }),
          "tensor 'b' data offset 512 overlaps the previous tensor, which ends at 528");
  rejects(raw([](RawFile& r) {
            r.tensors[1].rows = 1000;
            r.tensors[1].length = 3000;
          }),
          "truncated: tensor 'b' needs bytes [576, 3576) but the file has 579");
  rejects(raw([](RawFile& r) { r.tensors[1].name = "a"; }), "duplicate tensor name 'a'");
  rejects(raw([](RawFile& r) { r.metadata.push_back({"step", "13"}); }), "duplicate metadata key 'step'");
  rejects(raw([](RawFile& r) { r.tensors[1].name = std::string("b\0", 2); }),
          "tensor 1 name 'b\\x00' contains a NUL byte at byte 1");
  rejects(raw([](RawFile& r) { r.tensors[1].name = "\xC0\x80"; }),
          "tensor 1 name '\xC0\x80' is not valid UTF-8 at byte 0");
  rejects(raw([](RawFile& r) {
            r.tensors[0].name = "aaaaaaaaaa";  // so that the tensor count still fits the header length
            r.tensors[1].name = "";
          }),
          "tensor 1 name '' must not be empty");
  rejects(raw([](RawFile& r) { r.metadata[0].first = "\xED\xBF\xBF"; }), "metadata entry 0 key");
  rejects(raw([](RawFile& r) { r.tensors[0].name = std::string(5000, 'n'); }),
          "tensor 0 name length 5000 exceeds the limit 4096");
  rejects(raw([](RawFile& r) { r.metadata[0].second = std::string((1 << 20) + 1, 'v'); }),
          "metadata entry 0 value length 1048577 exceeds the limit 1048576");
  rejects(raw([](RawFile& r) { r.metadata_count = 70000; }), "metadata count 70000 exceeds the limit 65536");
  rejects(raw([](RawFile& r) { r.metadata_count = 60000; }), "metadata count 60000 does not fit in the header length");
  rejects(raw([](RawFile& r) { r.tensor_count = (1u << 20) + 1; }), "tensor count 1048577 exceeds the limit 1048576");
  rejects(raw([](RawFile& r) { r.tensor_count = 1000; }), "tensor count 1000 does not fit in the header length");
  rejects(raw([](RawFile& r) { r.tensor_count = 1; }), "header length is 106 but its fields end at header byte 64");
  rejects(raw([](RawFile& r) { r.header_extra = "xyz"; }),
          "header length is 109 but its fields end at header byte 106");
  rejects(raw([](RawFile& r) { r.header_cut = 3; }), "tensor count 2 does not fit in the header length 103");
  rejects(raw([](RawFile& r) {
            r.tensors[1].name = "bbbbbbbbbb";
            r.header_cut = 3;
          }),
          "the header ends inside tensor 'bbbbbbbbbb' checksum (4 bytes needed at header byte 111, header length 112)");
  rejects(raw([](RawFile& r) { r.trailing = "!"; }),
          "the file has 580 bytes but its data ends at 579 (1 trailing bytes)");

  // Data problems are found by verify_all (and by read).
  auto verify_rejects = [&](const RawFile& r, const std::string& text) {
    write_file(file, r.build());
    CheckpointReader reader(file);
    expect_error<std::runtime_error>([&] { reader.verify_all(); }, {where + text});
  };
  verify_rejects(raw([](RawFile& r) { r.tensors[0].crc = 0x12345678u; }),
                 "checksum mismatch in tensor 'a' (stored 0x12345678, computed ");
  RawFile padded;
  std::string built = padded.build();
  built[300] = '\x01';  // padding between the header and tensor 'a'
  write_file(file, built);
  CheckpointReader reader(file);
  expect_error<std::runtime_error>([&] { reader.verify_all(); }, {"padding byte 300 before tensor 'a' is 1, not 0"});
}

// Random header edits with the checksum recomputed: every outcome is success or a runtime_error, never a
// crash, a huge allocation or another exception type (the asan-ubsan preset runs this too).
TEST_F(CheckpointTest, RandomHeaderEditsWithValidChecksumsNeverCrash) {
  const std::string file = path("small.ckpt");
  SmallCheckpoint().save(file);
  const std::string bytes = read_file(file);
  std::uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data() + 16, 8);
  const std::size_t header_end = static_cast<std::size_t>(24 + header_length);
  const std::string bad = path("edited.ckpt");
  std::mt19937 gen(11);
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string b = bytes;
    const int edits = 1 + static_cast<int>(gen() % 3);
    for (int k = 0; k < edits; ++k) {
      const std::size_t at = 24 + gen() % (header_end - 24);
      b[at] = static_cast<char>(gen() % 4 == 0 ? static_cast<unsigned char>(b[at]) ^ (1u << (gen() % 8)) : gen());
    }
    const std::uint32_t crc = peer::crc32c(b.data(), header_end);
    std::memcpy(&b[header_end], &crc, 4);
    write_file(bad, b);
    try {
      CheckpointReader reader(bad);
      reader.verify_all();
      for (const auto& e : reader.tensors()) {
        std::vector<unsigned char> out(static_cast<std::size_t>(e.bytes));
        reader.read(e.name, e.dtype, e.rows, e.cols, out.data());
      }
      ++accepted;
    } catch (const std::runtime_error&) {
      ++rejected;
    } catch (const std::exception& e) {  // any other type breaks the reader's contract
      ADD_FAILURE() << "trial " << trial << ": " << typeid(e).name() << ": " << e.what();
    }
  }
  EXPECT_GT(rejected, 1000);
  std::printf("random header edits: %d accepted, %d rejected\n", accepted, rejected);
}

// ---- read() -------------------------------------------------------------------------------------------

TEST_F(CheckpointTest, ReadChecksDtypeAndShapeAndNamesBoth) {
  const std::string file = path("small.ckpt");
  SmallCheckpoint().save(file);
  CheckpointReader reader(file);
  reader.verify_all();
  std::vector<double> out(6);
  const std::string where = "checkpoint " + file + ": ";
  expect_error<std::runtime_error>(
      [&] { reader.read("weights", DType::kFloat64, 2, 3, out.data()); },
      {where + "tensor 'weights' is float32 [2, 3] but the caller expects float64 [2, 3]"});
  expect_error<std::runtime_error>([&] { reader.read("weights", DType::kFloat32, 3, 2, out.data()); },
                                   {"tensor 'weights' is float32 [2, 3] but the caller expects float32 [3, 2]"});
  expect_error<std::runtime_error>([&] { reader.read("nope", DType::kFloat32, 2, 3, out.data()); },
                                   {where + "no tensor named 'nope'"});
  expect_error<std::runtime_error>([&] { (void)reader.metadata("nope"); }, {where + "no metadata key 'nope'"});
  expect_error<std::invalid_argument>([&] { reader.read("weights", DType::kFloat32, 2, 3, nullptr); }, {"dst is null"});
}

TEST_F(CheckpointTest, ReadRechecksTheChecksumIfTheFileChangesInPlace) {
  const std::string file = path("small.ckpt");
  SmallCheckpoint small;
  small.save(file);
  CheckpointReader reader(file);
  reader.verify_all();
  const auto offset = static_cast<std::streamoff>(reader.entry("scales").offset + 3);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(offset);
    f.put('\x5A');
  }
  std::vector<double> out(3);
  expect_error<std::runtime_error>([&] { reader.read("scales", DType::kFloat64, 3, 1, out.data()); },
                                   {"checksum mismatch in tensor 'scales'", "while reading it"});
  std::vector<float> w(6);
  reader.read("weights", DType::kFloat32, 2, 3, w.data());  // other tensors are intact
  EXPECT_EQ(w, small.f32);
}

TEST_F(CheckpointTest, AnOpenReaderKeepsReadingTheFileItOpenedWhenASaveReplacesIt) {
  const std::string file = path("model.ckpt");
  SmallCheckpoint first;
  first.save(file);
  CheckpointReader reader(file);
  SmallCheckpoint second;
  second.f32.assign(6, 0.0f);
  second.save(file);
  reader.verify_all();
  std::vector<float> w(6);
  reader.read("weights", DType::kFloat32, 2, 3, w.data());
  EXPECT_EQ(w, first.f32);

  CheckpointReader moved(std::move(reader));  // move-only
  reader = CheckpointReader(file);
  moved.read("weights", DType::kFloat32, 2, 3, w.data());
  EXPECT_EQ(w, first.f32);
  reader.read("weights", DType::kFloat32, 2, 3, w.data());
  EXPECT_EQ(w, second.f32);
}

}  // namespace
