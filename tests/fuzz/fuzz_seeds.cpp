// Writes the fuzz targets' seed corpora with the library's own writers (run by ctest before the targets):
//   fuzz_seeds DIR  ->  DIR/checkpoint/*, DIR/training_checkpoint/*, DIR/safetensors/*
#include <peer/io/maps/peer_pytorch_file.hpp>
#include <peer/io/parameters_file.hpp>

#include <cstdio>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "fuzz_util.hpp"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_seeds DIR\n");
    return 2;
  }
  try {
    const fs::path dir = argv[1];
    for (const char* sub : {"checkpoint", "training_checkpoint", "safetensors"}) fs::create_directories(dir / sub);
    // Checkpoints: metadata, several dtypes, an empty tensor.
    const std::vector<float> f{1.5f, -2.0f, 0.25f, 8.0f, 0.0f, -0.5f};
    const std::vector<double> d{1.0, -1.0 / 3.0};
    const std::vector<std::int64_t> i{7, -9, 1LL << 40};
    peer::save_checkpoint((dir / "checkpoint" / "small").string(), {{"kind", "seed"}, {"note", "two tensors"}},
                          {{"a", peer::DType::kFloat32, 2, 3, f.data(), {}}, {"b", peer::DType::kFloat64, 1, 2, d.data(), {}},
                           {"c", peer::DType::kInt64, 3, 1, i.data(), {}}, {"empty", peer::DType::kFloat32, 0, 4, nullptr, {}}});
    peer::save_checkpoint((dir / "checkpoint" / "nothing").string(), {}, {});
    // Training checkpoints of the target's own model, before and after a change of its state.
    peer_fuzz::SmallRun run;
    run.registrations().save((dir / "training_checkpoint" / "fresh").string());
    run.step = 4;
    run.note = "after a step";
    run.params.dense_data()[0] += 1.0f;
    run.registrations().save((dir / "training_checkpoint" / "stepped").string());
    // safetensors: our names for the small model; PEER-pytorch's for its small layer; every dtype.
    peer::SafetensorsWriter ours;
    peer::add_parameters(ours, run.params);
    ours.add_metadata("format", "pt");
    ours.save((dir / "safetensors" / "ours").string());
    const peer::PeerPytorchConfig t = peer_fuzz::small_peer_pytorch();
    peer::PeerLayer<float> torch_layer(peer::peer_pytorch_config(t));
    peer::SafetensorsWriter theirs;
    peer::add_peer_pytorch(theirs, t, torch_layer.make_parameters(3), "", peer::SafetensorsDType::kBF16);
    theirs.save((dir / "safetensors" / "peer_pytorch").string());
    peer::SafetensorsWriter dtypes;
    const std::vector<std::int32_t> i32{-1, 2};
    dtypes.add("f32", f.data(), {2, 3});
    dtypes.add("f64", d.data(), {2});
    dtypes.add("f16", f.data(), {6}, peer::SafetensorsDType::kF16);
    dtypes.add("i32", i32.data(), {2});
    dtypes.add("i64", i.data(), {3});
    dtypes.save((dir / "safetensors" / "dtypes").string());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
