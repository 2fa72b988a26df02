// libFuzzer target for TrainingCheckpoint::load (peer/io/training_checkpoint.hpp) on in-memory bytes: a
// small PEER layer with AdamW, a counter and a value is registered; any input is either rejected with
// std::runtime_error (nothing written) or loaded. Seeds: that model's own checkpoints (fuzz_seeds).
#include <cstddef>
#include <cstdint>

#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static peer_fuzz::SmallRun run;
  static const peer::TrainingCheckpoint registrations = run.registrations();
  const int fd = peer_fuzz::memfd_of(data, size);
  try {
    registrations.load(peer::CheckpointReader(fd, "fuzz"));
  } catch (const std::runtime_error&) {
  }
  ::close(fd);
  return 0;
}
