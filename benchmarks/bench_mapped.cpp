// Serving a PEER layer from tables mapped from files (peer/io/mapped_parameters.hpp), against the same layer
// in RAM in the same run: inference (Mode::kEval) on batches of 256 random tokens, bf16 expert tables, the
// paper's retrieval (H = 8 heads, top-16, Dk = 256), D = 512.
//
//   BM_ServeInRam/side:S          the table in memory (make_parameters)
//   BM_ServeMapped/side:S/warm    mapped read-only, after one pass over the same 64 batches (their rows cached)
//   BM_ServeMapped/side:S/cold    mapped read-only, every page evicted before each batch (rows from the disk)
//
// S = --side (1024 by default: N = 1024^2, a 2 GiB table, which fits in RAM; the file is written next to
// --dir). With --pool=FILE (made by --create), also the cold and warm cases on that pool: scripts/bench_mapped
// builds a 4096^2 = 16.8 M expert pool (32 GiB, more than this machine's memory) and runs them.
// Counters: tokens/s, major and minor page faults per token, the resident set, the table's bytes in memory
// (mincore) and its size.
//
//   bench_mapped [--side=S] [--dir=DIR] [--pool=FILE] [benchmark flags]
//   bench_mapped --create=FILE --side=S     writes a pool: zeros, then initialized through a write-back mapping
#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include "bench_common.hpp"

namespace {

using Mat = peer::RowMatrix<float>;
constexpr long kBatch = 256, kBatches = 64, kDim = 512;

peer::PeerConfig pool_config(long side) {
  peer::PeerConfig c;
  c.model_dim = kDim;
  c.num_experts = side * side;
  c.expert_storage = peer::TableStorage::kBFloat16;
  return c;
}

struct Faults {
  long major = 0, minor = 0;
  static Faults now() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return {u.ru_majflt, u.ru_minflt};
  }
};

double resident_mib() {
  std::ifstream statm("/proc/self/statm");
  long long size = 0, resident = 0;
  statm >> size >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

const std::vector<Mat>& batches() {
  static const std::vector<Mat> xs = [] {
    std::vector<Mat> out;
    for (long b = 0; b < kBatches; ++b) out.push_back(bench::random(kBatch, kDim, 1000 + static_cast<std::uint64_t>(b)));
    return out;
  }();
  return xs;
}

/// Runs the benchmark loop over the batches; `before` runs untimed before each batch.
template <typename Before>
void serve(benchmark::State& state, const peer::PeerLayer<float>& layer, peer::Parameters<float>& params, Before&& before,
           const peer::MappedParameters<float>* mapped, long count = kBatches) {
  Mat y(kBatch, kDim);
  peer::PeerLayer<float>::Cache cache;
  const auto& xs = batches();
  Faults faults;
  long i = 0;
  for (auto _ : state) {
    state.PauseTiming();
    before();
    const Faults f0 = Faults::now();
    state.ResumeTiming();
    layer.forward(params, xs[static_cast<std::size_t>(i++ % count)], y, cache, peer::Mode::kEval);
    benchmark::DoNotOptimize(y.data());
    state.PauseTiming();
    const Faults f1 = Faults::now();
    faults.major += f1.major - f0.major;
    faults.minor += f1.minor - f0.minor;
    state.ResumeTiming();
  }
  const double tokens = static_cast<double>(state.iterations()) * kBatch;
  bench::set_rate(state, "tokens/s", kBatch);
  state.SetItemsProcessed(static_cast<std::int64_t>(tokens));
  state.counters["major_faults/token"] = static_cast<double>(faults.major) / tokens;
  state.counters["minor_faults/token"] = static_cast<double>(faults.minor) / tokens;
  state.counters["rss_MiB"] = resident_mib();
  const auto& table = params.table(peer::TableHandle{0});
  state.counters["table_GiB"] = static_cast<double>(table.bytes()) / (1024.0 * 1024.0 * 1024.0);
  if (mapped != nullptr) state.counters["table_resident_MiB"] = static_cast<double>(mapped->resident_bytes()) / (1024.0 * 1024.0);
}

/// One pass over the first `count` batches (their rows are then in memory); once per parameter set, not at
/// each of Google Benchmark's calls.
void warm_up(const peer::PeerLayer<float>& layer, peer::Parameters<float>& params, long count) {
  static std::vector<const void*> done;
  if (std::find(done.begin(), done.end(), &params) != done.end()) return;
  done.push_back(&params);
  Mat y(kBatch, kDim);
  peer::PeerLayer<float>::Cache cache;
  for (long b = 0; b < count; ++b) layer.forward(params, batches()[static_cast<std::size_t>(b)], y, cache, peer::Mode::kEval);
}

/// The warm and cold cases of the file at `path`: warm cycles over `count` batches after one pass over them,
/// cold evicts every page before each batch; /huge_pages adds the cold case with MADV_HUGEPAGE.
void register_mapped(const std::string& name, long side, const std::string& path, long count, bool huge_pages_case) {
  auto layer = std::make_shared<peer::PeerLayer<float>>(pool_config(side));
  auto open = [=](bool huge) {
    static std::map<std::pair<std::string, bool>, std::unique_ptr<peer::MappedParameters<float>>> opened;
    auto& m = opened[{path, huge}];
    peer::MapOptions options;
    options.huge_pages = huge;
    if (!m) m = std::make_unique<peer::MappedParameters<float>>(path, layer->layout(), "pool", options);
    return m.get();
  };
  benchmark::RegisterBenchmark((name + "/warm").c_str(), [=](benchmark::State& state) {
    auto* m = open(false);
    warm_up(*layer, m->parameters(), count);
    serve(state, *layer, m->parameters(), [] {}, m, count);
  })->Unit(benchmark::kMillisecond)->UseRealTime();
  for (bool huge : {false, true}) {
    if (huge && !huge_pages_case) continue;
    benchmark::RegisterBenchmark((name + (huge ? "/cold/huge_pages" : "/cold")).c_str(), [=](benchmark::State& state) {
      auto* m = open(huge);
      serve(state, *layer, m->parameters(), [=] { m->evict(); }, m);
    })->Unit(benchmark::kMillisecond)->UseRealTime();
  }
}

/// A pool file for `side`: zeros streamed to disk, mapped write-back, initialized, flushed.
void create_pool(const std::string& path, long side) {
  const peer::PeerLayer<float> layer(pool_config(side));
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  peer::create_parameters_file<float>(path, layer.layout(), "pool");
  const auto t1 = Clock::now();
  peer::MappedParameters<float> mapped(path, layer.layout(), "pool", {peer::MapMode::kWriteBack});
  const auto t2 = Clock::now();
  layer.initialize(mapped.parameters(), 1);
  const auto t3 = Clock::now();
  mapped.flush();
  const auto t4 = Clock::now();
  auto s = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  std::printf("pool %s: N = %ld^2, D = %ld, bf16 table %.2f GiB; zeros written in %.1f s, verified and mapped in %.1f s, "
              "initialized in %.1f s, flushed (written back, checksummed) in %.1f s\n",
              path.c_str(), side, kDim, static_cast<double>(mapped.mapped_bytes()) / (1024.0 * 1024.0 * 1024.0), s(t1 - t0),
              s(t2 - t1), s(t3 - t2), s(t4 - t3));
}

}  // namespace

int main(int argc, char** argv) {
  long side = 1024;
  std::string dir = "/tmp", pool, create;
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) { return a.rfind(flag, 0) == 0 ? a.substr(std::string(flag).size()) : std::string(); };
    if (!value("--side=").empty()) {
      side = std::stol(value("--side="));
    } else if (!value("--dir=").empty()) {
      dir = value("--dir=");
    } else if (!value("--pool=").empty()) {
      pool = value("--pool=");
    } else if (!value("--create=").empty()) {
      create = value("--create=");
    } else {
      rest.push_back(argv[i]);
    }
  }
  try {
    if (!create.empty()) {
      create_pool(create, side);
      return 0;
    }
    // The in-RAM layer and the same values in a file (a training checkpoint, as a user's would be).
    auto layer = std::make_shared<peer::PeerLayer<float>>(pool_config(side));
    const std::string file = dir + "/bench_mapped_" + std::to_string(side) + ".ckpt";
    auto params = std::make_shared<peer::Parameters<float>>(layer->make_parameters(1));
    {
      peer::TrainingCheckpoint ckpt;
      ckpt.add_parameters("pool", *params);
      ckpt.save(file);
    }
    const std::string in_ram = "BM_ServeInRam/side:" + std::to_string(side);
    benchmark::RegisterBenchmark(in_ram.c_str(), [=](benchmark::State& state) {
      warm_up(*layer, *params, kBatches);
      serve(state, *layer, *params, [] {}, nullptr);
    })->Unit(benchmark::kMillisecond)->UseRealTime();
    register_mapped("BM_ServeMapped/side:" + std::to_string(side), side, file, kBatches, true);
    if (!pool.empty()) {
      const peer::CheckpointReader r(pool);
      const long pool_side = static_cast<long>(std::lround(std::sqrt(static_cast<double>(r.entry("pool.experts").rows))));
      // Warm: 8 batches (262,144 row reads), a working set that fits; the pool itself does not.
      register_mapped("BM_ServeMapped/side:" + std::to_string(pool_side) + "/pool", pool_side, pool, 8, false);
    }
    int n = static_cast<int>(rest.size());
    benchmark::Initialize(&n, rest.data());
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    std::remove(file.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_mapped: %s\n", e.what());
    return 2;
  }
  return 0;
}
