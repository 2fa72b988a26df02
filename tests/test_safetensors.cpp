// safetensors: round trips in every dtype, conversions, zero-copy views of mapped files, and a reader that
// rejects every malformed file with a named error (truncation at every offset, crafted headers).
#include <peer/io/parameters_file.hpp>
#include <peer/io/safetensors.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "test_util.hpp"

namespace {

using namespace peer_test;
namespace fs = std::filesystem;

std::string sample_bytes() {
  peer::SafetensorsWriter w;
  const std::vector<float> f{1.5f, -2.25f, 3.0f, 0.1f, 1e-3f, -7.0f};
  const std::vector<double> g{0.1, -1e300, 3.25};
  const std::vector<std::int32_t> i32{1, -2, 2147483647};
  const std::vector<std::int64_t> i64{-5, 1LL << 40};
  w.add("f32", f.data(), {2, 3});
  w.add("f64", g.data(), {3});
  w.add("bf16", f.data(), {3, 2}, peer::SafetensorsDType::kBF16);
  w.add("f16", f.data(), {6}, peer::SafetensorsDType::kF16);
  w.add("i32", i32.data(), {3});
  w.add("i64", i64.data(), {2, 1});
  w.add("empty", f.data(), {0, 4});
  w.add_metadata("format", "pt");
  return w.to_bytes();
}

/// A file from a header (JSON text) and a data buffer.
std::string craft(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
  return out + json + data;
}

void expect_rejected(const std::string& bytes, const std::string& text) {
  try {
    peer::SafetensorsFile::from_bytes(bytes);
    ADD_FAILURE() << "accepted; expected: " << text;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what() << "\nexpected: " << text;
    EXPECT_EQ(std::string(e.what()).rfind("safetensors (memory): ", 0), 0u) << e.what();
  }
}

TEST(Safetensors, RoundTripsEveryDtype) {
  const auto file = peer::SafetensorsFile::from_bytes(sample_bytes());
  EXPECT_EQ(file.tensors().size(), 7u);
  EXPECT_EQ(file.metadata().at("format"), "pt");
  const auto& t = file.tensor("f32");
  EXPECT_EQ(t.dtype, peer::SafetensorsDType::kF32);
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(t.numel, 6);
  const auto m = file.matrix<float>("f32", 2, 3);
  EXPECT_EQ(m(1, 0), 0.1f);
  EXPECT_EQ(m(0, 1), -2.25f);
  std::vector<double> g(3);
  file.read("f64", g.data(), 3);
  EXPECT_EQ(g[1], -1e300);
  // float -> bf16 rounds to nearest even; every value here but 0.1 and 1e-3 is exact in bf16 and f16.
  const auto bf = file.matrix<float>("bf16", 3, 2);
  EXPECT_EQ(bf(0, 0), 1.5f);
  EXPECT_EQ(bf(2, 1), -7.0f);
  EXPECT_NEAR(bf(1, 1), 0.1f, 0.1f / 128);
  EXPECT_NE(bf(1, 1), 0.1f);
  const auto hf = file.matrix<double>("f16");
  EXPECT_EQ(hf.rows(), 1);
  EXPECT_EQ(hf(0, 2), 3.0);
  EXPECT_NEAR(hf(0, 4), 1e-3, 1e-3 / 1024);
  std::vector<std::int64_t> i(3);
  file.read("i32", i.data(), 3);
  EXPECT_EQ(i[2], 2147483647);
  std::vector<std::int32_t> j(2);
  EXPECT_THROW(file.read("i64", j.data(), 2), std::runtime_error);  // 2^40 does not fit in int32
  EXPECT_EQ(file.tensor("empty").numel, 0);
  EXPECT_EQ(file.matrix<float>("empty").size(), 0);
  // Conversions that make no sense are refused, naming the tensor.
  try {
    file.matrix<float>("i32");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'i32' is I32, which does not convert to F32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(file.matrix<float>("f32", 3, 2), std::runtime_error);
  EXPECT_THROW(file.tensor("missing"), std::runtime_error);
  // bf16 conversions round to nearest even (the bits of 1 + 2^-8 lie halfway: rounds down to 1).
  peer::SafetensorsWriter w;
  const float halfway = 1.0f + 1.0f / 256;
  const float above = 1.0f + 1.0f / 256 + 1.0f / 65536;
  const std::vector<float> v{halfway, above};
  w.add("v", v.data(), {2}, peer::SafetensorsDType::kBF16);
  const auto back = peer::SafetensorsFile::from_bytes(w.to_bytes()).matrix<float>("v");
  EXPECT_EQ(back(0, 0), 1.0f);
  EXPECT_EQ(back(0, 1), 1.0f + 1.0f / 128);
}

TEST(Safetensors, MappedFilesAreViewedInPlaceAndSavesAreAtomic) {
  const fs::path path = fs::temp_directory_path() / ("peer_st_" + std::to_string(::getpid()) + ".safetensors");
  peer::SafetensorsWriter w;
  const Mat<double> m = random_matrix<double>(5, 7, 3);
  const Mat<float> f = random_matrix<float>(4, 4, 4);
  w.add_matrix<double>("m", m);
  w.add_matrix<float>("f", f);
  w.save(path.string());
  // No temporary file is left next to it.
  int entries = 0;
  for (const auto& e : fs::directory_iterator(fs::temp_directory_path())) {
    if (e.path().string().rfind(path.string() + ".tmp", 0) == 0) ++entries;
  }
  EXPECT_EQ(entries, 0);
  const auto file = peer::SafetensorsFile::open(path.string());
  const double* view = file.view<double>("m");
  ASSERT_NE(view, nullptr) << "an 8-byte aligned F64 tensor of a mapped file is viewed in place";
  EXPECT_EQ(std::memcmp(view, m.data(), sizeof(double) * 35), 0);
  EXPECT_EQ(file.view<float>("m"), nullptr);  // another dtype: no view
  EXPECT_EQ(file.matrix<float>("f", 4, 4), f);
  // The header is padded to a multiple of 8 bytes.
  std::ifstream in(path, std::ios::binary);
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  EXPECT_EQ(len[0] % 8, 0);
  std::remove(path.string().c_str());
  EXPECT_THROW(peer::SafetensorsFile::open(path.string()), std::runtime_error);
}

// Crash safety: SIGKILL at any point of a save leaves a complete file, the old or the new one (4 MB, so
// that kills land inside the write, the fsyncs and the rename).
TEST(Safetensors, KilledSavesLeaveTheOldOrTheNewFile) {
  const fs::path path = fs::temp_directory_path() / ("peer_st_killed_" + std::to_string(::getpid()) + ".safetensors");
  std::vector<float> values(1 << 20);
  auto save = [&](int trial) {
    std::fill(values.begin(), values.end(), static_cast<float>(trial));
    peer::SafetensorsWriter w;
    w.add("v", values.data(), {1024, 1024});
    w.add_metadata("trial", std::to_string(trial));
    w.save(path.string());
  };
  auto check = [&] {
    const auto file = peer::SafetensorsFile::open(path.string());  // validates the whole structure
    const Mat<float> v = file.matrix<float>("v", 1024, 1024);
    EXPECT_TRUE((v.array() == std::stof(file.metadata().at("trial"))).all()) << "a file mixing two saves";
  };
  const int killed = kill_during_saves(40, save, check);
  EXPECT_GT(killed, 5) << "most kills must land before the save finished";
  for (const auto& e : fs::directory_iterator(fs::temp_directory_path())) {
    if (e.path().string().rfind(path.string() + ".tmp", 0) == 0) fs::remove(e.path());  // a killed save's temporary
  }
  fs::remove(path);
}

TEST(Safetensors, TruncationAtEveryOffsetIsRejected) {
  const std::string bytes = sample_bytes();
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_THROW(peer::SafetensorsFile::from_bytes(bytes.substr(0, n)), std::runtime_error) << "accepted at " << n;
  }
  EXPECT_NO_THROW(peer::SafetensorsFile::from_bytes(bytes));
  // Flipping any header byte never crashes: it is rejected or parses to a consistent file.
  const std::size_t header = 8 + static_cast<unsigned char>(bytes[0]) + 256u * static_cast<unsigned char>(bytes[1]);
  int accepted = 0, rejected = 0;
  for (std::size_t i = 0; i < header; ++i) {
    std::string b = bytes;
    b[i] = static_cast<char>(b[i] ^ 0x5a);
    try {
      const auto f = peer::SafetensorsFile::from_bytes(b);
      for (const auto& t : f.tensors()) (void)f.bytes(t.name);
      ++accepted;
    } catch (const std::runtime_error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, static_cast<int>(header) / 2);
  EXPECT_EQ(accepted + rejected, static_cast<int>(header));
}

TEST(Safetensors, CraftedHeadersAreRejectedWithNamedErrors) {
  const std::string four(4, '\0'), eight(8, '\0');
  expect_rejected("", "the file is 0 bytes");
  expect_rejected(std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8), "exceeds the limit of 100000000 bytes");
  expect_rejected(craft("{}", "").substr(0, 9), "runs past the end of the file");
  expect_rejected(craft("{\"a\": ", ""), "the header is not valid JSON");
  expect_rejected(craft("[1, 2]", ""), "not an object");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", eight),
                  "names 'a' twice");
  expect_rejected(craft(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})", four), "dtype 'U8', not one of");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", four),
                  "shape holds 2 F32 elements but data_offsets span 4 bytes");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", four), "is past the data buffer (4 bytes)");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", four), "end 0 < begin 4");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}})", eight),
                  "overlaps the tensor before it");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", eight), "has a hole before tensor 'a'");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", eight), "the data buffer is 8 bytes but the tensors cover 4");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", four), "shape entries must be non-negative integers");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 4], "data_offsets": [0, 4]}})", four), "overflows");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", four), "array of two offsets");
  expect_rejected(craft(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}})", four), "unknown field 'extra'");
  expect_rejected(craft(R"({"a": 3})", ""), "tensor 'a' is not an object");
  expect_rejected(craft(R"({"__metadata__": {"k": 1}})", ""), "metadata 'k' is not a string");
  // File bytes in messages are quoted and escaped.
  expect_rejected(craft("{\"a\\n\\u0001\": {\"dtype\": \"X\", \"shape\": [], \"data_offsets\": [0, 0]}}", ""), "tensor 'a\\x0a\\x01'");
  // A valid minimal file: a header of spaces-padded {}, and a scalar tensor.
  EXPECT_NO_THROW(peer::SafetensorsFile::from_bytes(craft("{}      ", "")));
  const auto scalar = peer::SafetensorsFile::from_bytes(craft(R"({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}})", four));
  EXPECT_EQ(scalar.tensor("s").numel, 1);
}

TEST(Safetensors, WriterRefusesBadInput) {
  peer::SafetensorsWriter w;
  const float f = 1.0f;
  w.add("a", &f, {1});
  EXPECT_THROW(w.add("a", &f, {1}), std::invalid_argument);
  EXPECT_THROW(w.add("", &f, {1}), std::invalid_argument);
  EXPECT_THROW(w.add("__metadata__", &f, {1}), std::invalid_argument);
  EXPECT_THROW(w.add("b", &f, {-1}), std::invalid_argument);
  EXPECT_THROW(w.add("c", &f, {1}, peer::SafetensorsDType::kI32), std::invalid_argument);
  const float* null = nullptr;
  EXPECT_THROW(w.add("d", null, {2}), std::invalid_argument);
}

TEST(Safetensors, AWholeModelUnderOurNamesRoundTripsAndBadFilesChangeNothing) {
  peer::PeerLayer<float> layer(small_config());
  peer::DenseFfwConfig fc;
  fc.model_dim = 8;
  fc.hidden_dim = 12;
  peer::DenseFfw<float> ffw(fc);
  peer::ModelLayout model;
  const int a = model.add_layer("blocks.0.ffn.", layer.layout());
  const int b = model.add_layer("blocks.1.ffn.", ffw.layout());
  peer::Parameters<float> params(model.layout());
  peer::LayerViews<float> views(model, params);
  layer.initialize(views.params(a), 1);
  ffw.initialize(views.params(b), 2);
  params.find("blocks.0.ffn.query.norm.running_var").setConstant(3.0f);  // buffers travel too
  peer::SafetensorsWriter w;
  peer::add_parameters(w, params, "model.");
  const auto file = peer::SafetensorsFile::from_bytes(w.to_bytes());
  EXPECT_EQ(file.tensor("model.blocks.0.ffn.experts").shape, (std::vector<std::int64_t>{16, 16}));
  peer::Parameters<float> loaded(model.layout());
  peer::load_parameters(file, loaded, "model.");
  EXPECT_EQ(storage_bytes(loaded), storage_bytes(params));
  // Every failure is named and leaves the target untouched.
  auto expect_refused = [&](const std::string& bytes, const std::string& text) {
    peer::Parameters<float> target(model.layout());
    const auto before = storage_bytes(target);
    try {
      peer::load_parameters(peer::SafetensorsFile::from_bytes(bytes), target, "model.");
      ADD_FAILURE() << "accepted; expected: " << text;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    EXPECT_EQ(storage_bytes(target), before);
  };
  peer::SafetensorsWriter extra;
  peer::add_parameters(extra, params, "model.");
  const float one = 1.0f;
  extra.add("model.blocks.9.unknown", &one, {1});
  expect_refused(extra.to_bytes(), "the file's tensor 'model.blocks.9.unknown' is not a parameter here");
  peer::SafetensorsWriter other_prefix;
  peer::add_parameters(other_prefix, params, "net.");
  expect_refused(other_prefix.to_bytes(), "tensor 'model.blocks.0.ffn.query.weight' is not in the file");
  peer::PeerLayer<float> wide(small_config(8, 5));  // N = 25: another shape of the same name
  peer::SafetensorsWriter mixed;
  peer::ModelLayout wide_model;
  wide_model.add_layer("blocks.0.ffn.", wide.layout());
  wide_model.add_layer("blocks.1.ffn.", ffw.layout());
  peer::Parameters<float> wp(wide_model.layout());
  peer::add_parameters(mixed, wp, "model.");
  expect_refused(mixed.to_bytes(), "tensor 'model.blocks.0.ffn.sub_keys.left' has shape [5, 4], which does not view as a [4, 4] matrix");
  // Stored in BF16, the weights come back to bf16 precision.
  peer::SafetensorsWriter half;
  peer::add_parameters(half, params, "", peer::SafetensorsDType::kBF16);
  peer::Parameters<float> rounded(model.layout());
  peer::load_parameters(peer::SafetensorsFile::from_bytes(half.to_bytes()), rounded);
  const auto w0 = params.find("blocks.0.ffn.query.weight");
  const auto w1 = rounded.find("blocks.0.ffn.query.weight");
  EXPECT_LE((w0 - w1).cwiseAbs().maxCoeff(), w0.cwiseAbs().maxCoeff() / 128);
  EXPECT_GT((w0 - w1).cwiseAbs().maxCoeff(), 0.0f);
}

}  // namespace
