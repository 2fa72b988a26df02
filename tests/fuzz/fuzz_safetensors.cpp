// libFuzzer target for the safetensors reader and what reads through it: any bytes are either rejected
// with std::runtime_error or parsed into a file every tensor of which can be read (converted) without
// reading past the input; then our own names (load_parameters) and PEER-pytorch's (import_peer_pytorch)
// are loaded from it into a small layer, accepted or refused with std::runtime_error. Built and run by
// ctest in the asan-ubsan preset (fuzz.safetensors); seeds from the library's writers (fuzz_seeds).
#include <peer/io/maps/peer_pytorch_file.hpp>
#include <peer/io/parameters_file.hpp>
#include <peer/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static peer_fuzz::SmallRun run;
  static const peer::PeerPytorchConfig torch = peer_fuzz::small_peer_pytorch();
  static peer::PeerLayer<float> torch_layer(peer::peer_pytorch_config(torch));
  static peer::Parameters<float> torch_params = torch_layer.make_parameters(2);
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
    try {
      peer::load_parameters(file, run.params);
    } catch (const std::runtime_error&) {
    }
    peer::import_peer_pytorch(torch, file, torch_params);
  } catch (const std::runtime_error&) {
  }
  return 0;
}
