// The C++ side of the cross-language safetensors test (tests/python/test_safetensors.py):
//   safetensors_tool write FILE   writes a fixed set of tensors, one per dtype, and metadata
//   safetensors_tool dump FILE    prints every tensor: name, dtype, shape, then its values (%.17g)
//   safetensors_tool check FILE   exit 0 if the file is accepted; 1 with the reader's message if not
#include <peer/io/safetensors.hpp>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

/// The values the writer stores: v_i = (i - 3) * 0.75 + 0.125 (exact in bf16 and f16 for i < 12).
std::vector<double> values(std::size_t n) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = (static_cast<double>(i) - 3.0) * 0.75 + 0.125;
  return v;
}

int write(const std::string& path) {
  peer::SafetensorsWriter w;
  const auto d = values(6);
  const std::vector<float> f(d.begin(), d.end());
  const std::vector<std::int32_t> i32{-7, 0, 2147483647};
  const std::vector<std::int64_t> i64{-(1LL << 40), 5};
  w.add("f32", f.data(), {2, 3});
  w.add("f64", d.data(), {3, 2});
  w.add("bf16", f.data(), {6}, peer::SafetensorsDType::kBF16);
  w.add("f16", d.data(), {1, 6}, peer::SafetensorsDType::kF16);
  w.add("i32", i32.data(), {3});
  w.add("i64", i64.data(), {2});
  w.add_metadata("written_by", "peer");
  w.save(path);
  return 0;
}

int dump(const std::string& path) {
  const auto file = peer::SafetensorsFile::open(path);
  for (const auto& [key, value] : file.metadata()) std::printf("meta %s %s\n", key.c_str(), value.c_str());
  for (const auto& t : file.tensors()) {
    std::printf("tensor %s %s", t.name.c_str(), peer::to_string(t.dtype));
    for (auto s : t.shape) std::printf(" %lld", static_cast<long long>(s));
    std::printf(" :");
    const std::size_t n = static_cast<std::size_t>(t.numel);
    if (t.dtype == peer::SafetensorsDType::kI32 || t.dtype == peer::SafetensorsDType::kI64) {
      std::vector<std::int64_t> v(n);
      file.read(t.name, v.data(), n);
      for (auto x : v) std::printf(" %lld", static_cast<long long>(x));
    } else {
      std::vector<double> v(n);
      file.read(t.name, v.data(), n);
      for (auto x : v) std::printf(" %.17g", x);
    }
    std::printf("\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: safetensors_tool write|dump|check FILE\n");
    return 2;
  }
  const std::string verb = argv[1], path = argv[2];
  try {
    if (verb == "write") return write(path);
    if (verb == "dump") return dump(path);
    if (verb == "check") {
      const auto file = peer::SafetensorsFile::open(path);
      std::printf("accepted %zu tensors\n", file.tensors().size());
      return 0;
    }
  } catch (const std::exception& e) {
    std::printf("rejected: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "unknown verb %s\n", verb.c_str());
  return 2;
}
