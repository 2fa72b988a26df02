// libFuzzer target for the safetensors reader: any bytes are either rejected with std::runtime_error or
// parsed into a file every tensor of which can be read (converted) without reading past the input.
//   clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -Iinclude -isystem /usr/include/eigen3 \
//       tests/fuzz/fuzz_safetensors.cpp -o fuzz_safetensors && ./fuzz_safetensors -max_total_time=60
#include <peer/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = peer::SafetensorsFile::from_memory(data, size);
    for (const auto& t : file.tensors()) {
      if (t.numel > (1 << 20)) continue;  // in range (checked by the reader), just large to convert
      const std::size_t n = static_cast<std::size_t>(t.numel);
      if (t.dtype == peer::SafetensorsDType::kI32 || t.dtype == peer::SafetensorsDType::kI64) {
        std::vector<std::int64_t> v(n);
        file.read(t.name, v.data(), n);
      } else {
        std::vector<double> v(n);
        file.read(t.name, v.data(), n);
        (void)file.view<float>(t.name);
      }
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
