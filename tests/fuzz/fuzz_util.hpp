// Shared by the fuzz targets and their seed writer: in-memory bytes as a descriptor, and the one small
// model whose training checkpoints the training-checkpoint target loads.
#ifndef PEER_TESTS_FUZZ_FUZZ_UTIL_HPP
#define PEER_TESTS_FUZZ_FUZZ_UTIL_HPP

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <peer/io/maps/peer_pytorch.hpp>
#include <peer/io/training_checkpoint.hpp>
#include <peer/layers/peer_layer.hpp>
#include <peer/optim/adam.hpp>

namespace peer_fuzz {

/// A memfd holding `data` (read with pread like a file, never on disk); aborts if the kernel refuses.
inline int memfd_of(const std::uint8_t* data, std::size_t size) {
  const int fd = ::memfd_create("peer_fuzz", MFD_CLOEXEC);
  if (fd < 0) std::abort();
  for (std::size_t done = 0; done < size;) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) std::abort();
    done += static_cast<std::size_t>(n);
  }
  return fd;
}

/// A small PEER layer with AdamW, a step counter and a note: what the training-checkpoint target
/// registers, and what the seed writer saves.
struct SmallRun {
  static peer::PeerConfig config() {
    peer::PeerConfig c;
    c.model_dim = 4;
    c.num_experts = 9;
    c.num_heads = 2;
    c.key_dim = 4;
    c.top_k = 2;
    c.sub_key_top_k = 2;
    return c;
  }
  peer::PeerLayer<float> layer{config()};
  peer::Parameters<float> params = layer.make_parameters(1);
  peer::Adam<float> adam{layer.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw()};
  std::int64_t step = 3;
  std::string note = "seed";

  peer::TrainingCheckpoint registrations() {
    peer::TrainingCheckpoint ckpt;
    ckpt.add_config("peer", layer.config().to_fields());
    ckpt.add_parameters("peer", params);
    ckpt.add_optimizer("adam", adam);
    ckpt.add_counter("step", &step);
    ckpt.add_value("note", &note);
    ckpt.set_table_alignment(0);  // seeds without the 64 KiB gap before a mappable table
    return ckpt;
  }
};

/// The PEER-pytorch configuration of the safetensors target's second layer.
inline peer::PeerPytorchConfig small_peer_pytorch() {
  peer::PeerPytorchConfig t;
  t.dim = 4;
  t.heads = 2;
  t.num_experts = 9;
  t.num_experts_per_head = 2;
  t.dim_key = 2;
  return t;
}

}  // namespace peer_fuzz

#endif  // PEER_TESTS_FUZZ_FUZZ_UTIL_HPP
