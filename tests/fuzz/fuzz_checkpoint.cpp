// libFuzzer target for the checkpoint reader (peer/io/checkpoint.hpp), on in-memory bytes (a memfd): any
// input is either rejected with std::runtime_error or opens, verifies and reads every tensor. Built and run
// by ctest in the asan-ubsan preset (fuzz.checkpoint, PEER_FUZZ_SECONDS); seeds from the library's writer
// (fuzz_seeds), dictionary checkpoint.dict.
#include <peer/io/checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int fd = peer_fuzz::memfd_of(data, size);
  try {
    peer::CheckpointReader reader(fd, "fuzz");
    for (const auto& m : reader.metadata()) (void)reader.metadata(m.first);
    reader.verify_all();
    for (const auto& e : reader.tensors()) {
      if (e.bytes > (std::uint64_t{1} << 24)) continue;  // in range (checked by the reader), just large
      std::vector<unsigned char> out(static_cast<std::size_t>(e.bytes));
      reader.read(e.name, e.dtype, e.rows, e.cols, out.data());
    }
  } catch (const std::runtime_error&) {
  }
  ::close(fd);
  return 0;
}
