// Tables mapped from checkpoint files (peer/io/mapped_parameters.hpp): bitwise the forward, backward and
// updates of in-memory tables in every mode; copy-on-write leaves the file's bytes alone; write-back
// survives close and reopen and a crash between flushes is detected; short, truncated, misaligned and
// mistyped files are rejected before anything is mapped; files of the unaligned layout still load.

#include "test_util.hpp"

#include <sys/stat.h>

#include <fstream>
#include <iterator>

namespace {

using peer_test::Mat;
using Index = peer::Index;

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

peer::PeerConfig config(peer::TableStorage storage) {
  peer::PeerConfig c = peer_test::small_config(16, 6, 2, 8, 3, 3);
  c.expert_storage = storage;
  return c;
}

std::vector<peer::ParamGroup> groups() {
  peer::ParamGroup tables{"tables", {""}, 1e-2, 0.0, peer::LrSchedule::constant(), peer::GroupKinds::kTables};
  peer::ParamGroup dense{"dense", {""}, 1e-3, 0.01, peer::LrSchedule::constant(), peer::GroupKinds::kDense};
  return {tables, dense};
}

/// A layer, its in-memory parameters saved as a training checkpoint, and training on any parameters.
struct TableFile {
  explicit TableFile(peer::TableStorage storage, const std::string& name)
      : layer(config(storage)), p(layer.make_parameters(5)), path(::testing::TempDir() + "mapped_" + name + ".ckpt") {
    peer::TrainingCheckpoint c;
    c.add_config("peer", layer.config().to_fields());
    c.add_parameters("peer", p);
    c.save(path);
  }
  ~TableFile() { std::remove(path.c_str()); }

  /// n AdamW steps of a regression to x on `params`, from step `from`; returns the last output.
  Mat<float> train(peer::Parameters<float>& params, peer::Adam<float>& opt, int n, int from = 0) const {
    peer::Gradients<float> g = layer.make_gradients();
    peer::PeerLayer<float>::Cache cache;
    Mat<float> y(24, 16), none;
    for (int i = from; i < from + n; ++i) {
      const Mat<float> x = peer_test::random_matrix<float>(24, 16, static_cast<unsigned>(100 + i));
      layer.forward(params, x, y, cache, peer::Mode::kTrain);
      g.zero();
      layer.backward(params, cache, Mat<float>(y - x), none, g);
      opt.step(params, g);
    }
    return y;
  }

  peer::PeerLayer<float> layer;
  peer::Parameters<float> p;
  std::string path;
};

const peer::TableStorage kStorages[] = {peer::TableStorage::kNative, peer::TableStorage::kBFloat16};

TEST(MappedParameters, ReadOnlyTablesServeTheInMemoryForwardAndBackwardAndRefuseWrites) {
  for (auto storage : kStorages) {
    SCOPED_TRACE(peer::to_string(storage));
    TableFile s(storage, std::string("ro_") + peer::to_string(storage));
    peer::MappedParameters<float> mapped(s.path, s.layer.layout(), "peer", {peer::MapMode::kReadOnly});
    peer::Parameters<float>& mp = mapped.parameters();
    const auto& table = mp.table(peer::TableHandle{0});
    EXPECT_TRUE(table.read_only());
    EXPECT_FALSE(table.owns_memory());  // a view of the mapping, not a copy
    EXPECT_EQ(mapped.mapped_bytes(), static_cast<std::uint64_t>(table.bytes()));
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(s.p), peer_test::storage_bytes(mp)));

    const Mat<float> x = peer_test::random_matrix<float>(24, 16, 3), dy = peer_test::random_matrix<float>(24, 16, 4);
    Mat<float> y1(24, 16), y2(24, 16), dx1 = Mat<float>::Zero(24, 16), dx2 = Mat<float>::Zero(24, 16);
    peer::PeerLayer<float>::Cache c1, c2;
    peer::Gradients<float> g1 = s.layer.make_gradients(), g2 = s.layer.make_gradients();
    s.layer.forward(s.p, x, y1, c1, peer::Mode::kTrain);
    s.layer.forward(mp, x, y2, c2, peer::Mode::kTrain);
    EXPECT_TRUE(peer_test::same_bits(y1, y2));
    g1.zero();
    g2.zero();
    s.layer.backward(s.p, c1, dy, dx1, g1);
    s.layer.backward(mp, c2, dy, dx2, g2);
    EXPECT_TRUE(peer_test::same_bits(dx1, dx2));
    EXPECT_EQ(std::memcmp(g1.dense_data(), g2.dense_data(), sizeof(float) * static_cast<std::size_t>(g1.layout().dense_size())), 0);

    // Writes are refused with messages, not faults.
    peer::Adam<float> opt(mp.layout(), groups(), peer::AdamConfig::adamw());
    try {
      opt.step(mp, g2);
      ADD_FAILURE() << "a step on a read-only table must throw";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("read-only"), std::string::npos) << e.what();
    }
    EXPECT_THROW(opt.fuse_table_updates(mp, g2), std::invalid_argument);
    auto& writable = mp.table(peer::TableHandle{0});
    if (storage == peer::TableStorage::kNative) {
      EXPECT_THROW(writable.row(0), std::logic_error);
      EXPECT_THROW(writable.data(), std::logic_error);
      EXPECT_THROW(mp.find(s.layer.layout().tables()[0].name), std::logic_error);
    } else {
      EXPECT_THROW(writable.bf16_row(0), std::logic_error);
    }
    std::vector<float> row(static_cast<std::size_t>(writable.cols()), 0.0f);
    EXPECT_THROW(writable.write_row(0, row.data()), std::logic_error);
    EXPECT_THROW(s.layer.initialize(mp, 1), std::logic_error);
    EXPECT_THROW(mapped.flush(), std::logic_error);
    EXPECT_NO_THROW(mapped.verify());
    // Evicted pages come back from the file: the same output.
    Mat<float> y3(24, 16);
    s.layer.forward(mp, x, y3, c2, peer::Mode::kEval);
    s.layer.forward(s.p, x, y1, c1, peer::Mode::kEval);
    EXPECT_TRUE(peer_test::same_bits(y1, y3)) << "before evict";
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(s.p), peer_test::storage_bytes(mp)));
    mapped.evict();
    s.layer.forward(mp, x, y3, c2, peer::Mode::kEval);
    s.layer.forward(s.p, x, y1, c1, peer::Mode::kEval);
    EXPECT_TRUE(peer_test::same_bits(y1, y3));
  }
}

TEST(MappedParameters, CopyOnWriteTrainsBitwiseLikeInMemoryAndLeavesTheFileUnchanged) {
  for (auto storage : kStorages) {
    SCOPED_TRACE(peer::to_string(storage));
    TableFile s(storage, std::string("cow_") + peer::to_string(storage));
    const std::string before = file_bytes(s.path);
    peer::MappedParameters<float> mapped(s.path, s.layer.layout(), "peer", {peer::MapMode::kCopyOnWrite});
    peer::Adam<float> a(s.p.layout(), groups(), peer::AdamConfig::adamw()), b(s.p.layout(), groups(), peer::AdamConfig::adamw());
    const Mat<float> y1 = s.train(s.p, a, 4), y2 = s.train(mapped.parameters(), b, 4);
    EXPECT_TRUE(peer_test::same_bits(y1, y2));
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(s.p), peer_test::storage_bytes(mapped.parameters())));
    EXPECT_EQ(file_bytes(s.path), before);  // the file never changed
    EXPECT_THROW(mapped.verify(), std::runtime_error);  // the private pages differ from the file's checksum
    EXPECT_THROW(mapped.flush(), std::logic_error);
    EXPECT_THROW(mapped.evict(), std::logic_error);  // would discard the changes
  }
}

TEST(MappedParameters, WriteBackSurvivesCloseAndReopenAndAnUnflushedChangeIsDetected) {
  for (auto storage : kStorages) {
    SCOPED_TRACE(peer::to_string(storage));
    TableFile s(storage, std::string("wb_") + peer::to_string(storage));
    peer::Adam<float> a(s.p.layout(), groups(), peer::AdamConfig::adamw()), b(s.p.layout(), groups(), peer::AdamConfig::adamw());
    s.train(s.p, a, 3);
    {
      peer::MappedParameters<float> mapped(s.path, s.layer.layout(), "peer", {peer::MapMode::kWriteBack});
      s.train(mapped.parameters(), b, 3);
      mapped.flush();
      EXPECT_NO_THROW(mapped.verify());
    }
    // The file is a valid checkpoint again: every checksum, and the trained table, after reopening.
    EXPECT_NO_THROW(peer::CheckpointReader(s.path).verify_all());
    peer::MapOptions verified{peer::MapMode::kReadOnly};
    verified.verify = true;
    {
      peer::MappedParameters<float> reopened(s.path, s.layer.layout(), "peer", verified);
      const auto& t1 = s.p.table(peer::TableHandle{0});
      const auto& t2 = reopened.parameters().table(peer::TableHandle{0});
      EXPECT_EQ(std::memcmp(t1.storage_data(), t2.storage_data(), static_cast<std::size_t>(t1.bytes())), 0);
    }
    // A change that was never flushed (a crash between flushes) leaves stale checksums: rejected on reading.
    {
      peer::MappedParameters<float> mapped(s.path, s.layer.layout(), "peer", {peer::MapMode::kWriteBack});
      peer::Adam<float> c(s.p.layout(), groups(), peer::AdamConfig::adamw());
      s.train(mapped.parameters(), c, 1, 50);
    }
    EXPECT_THROW(peer::CheckpointReader(s.path).verify_all(), std::runtime_error);
    EXPECT_THROW(peer::MappedParameters<float>(s.path, s.layer.layout(), "peer", verified), std::runtime_error);
    EXPECT_THROW(peer::MappedParameters<float>(s.path, s.layer.layout(), "peer", {peer::MapMode::kWriteBack}), std::runtime_error);
  }
}

// A table larger than RAM starts as a file of zeros, is initialized through a write-back mapping, and
// flush() leaves the whole parameter set (the in-memory dense tensors too) in the file.
TEST(MappedParameters, ACreatedFileInitializedThroughAWriteBackMappingEqualsMakeParameters) {
  for (auto storage : kStorages) {
    SCOPED_TRACE(peer::to_string(storage));
    peer::PeerLayer<float> layer(config(storage));
    const std::string path = ::testing::TempDir() + "created.ckpt";
    peer::create_parameters_file<float>(path, layer.layout(), "pool");
    {
      const peer::CheckpointReader r(path);
      EXPECT_NO_THROW(r.verify_all());
      EXPECT_EQ(r.entry("pool." + layer.layout().tables()[0].name).offset % peer::page_size(), 0U);
    }
    {
      peer::MappedParameters<float> mapped(path, layer.layout(), "pool", {peer::MapMode::kWriteBack});
      layer.initialize(mapped.parameters(), 7);
      mapped.flush();
    }
    peer::MapOptions verified;
    verified.verify = true;
    peer::MappedParameters<float> reopened(path, layer.layout(), "pool", verified);
    const peer::Parameters<float> expected = layer.make_parameters(7);
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(expected), peer_test::storage_bytes(reopened.parameters())));
    std::remove(path.c_str());
  }
}

/// Rewrites a checkpoint with every tensor at `alignment` (0: the format's 64 bytes), as files were written
/// before tables were aligned.
void rewrite(const std::string& from, const std::string& to, std::uint64_t alignment) {
  const peer::CheckpointReader r(from);
  std::vector<std::vector<unsigned char>> data;
  std::vector<peer::TensorView> views;
  for (const auto& e : r.tensors()) {
    data.emplace_back(static_cast<std::size_t>(e.bytes));
    r.read(e.name, e.dtype, e.rows, e.cols, data.back().data());
    peer::TensorView v;
    v.name = e.name;
    v.dtype = e.dtype;
    v.rows = e.rows;
    v.cols = e.cols;
    v.data = data.back().data();
    v.alignment = alignment;
    views.push_back(v);
  }
  peer::save_checkpoint(to, r.metadata(), views);
}

TEST(MappedParameters, BadFilesAreRejectedBeforeMappingAndTheUnalignedLayoutStillLoads) {
  TableFile s(peer::TableStorage::kNative, "bad");
  const std::string bytes = file_bytes(s.path), cut = s.path + ".cut";
  const peer::CheckpointReader reader(s.path);
  const std::uint64_t table_offset = reader.entry("peer." + s.layer.layout().tables()[0].name).offset;
  EXPECT_EQ(table_offset % (std::uint64_t{64} << 10), 0U);  // a small table: the largest common page size
  for (std::size_t len : {std::size_t{0}, std::size_t{7}, std::size_t{30}, std::size_t{200},
                          static_cast<std::size_t>(table_offset), static_cast<std::size_t>(table_offset) + 5, bytes.size() - 1}) {
    std::ofstream(cut, std::ios::binary | std::ios::trunc) << bytes.substr(0, len);
    EXPECT_THROW(peer::MappedParameters<float>(cut, s.layer.layout(), "peer"), std::runtime_error) << "length " << len;
  }
  std::remove(cut.c_str());

  // The unaligned layout: refused for mapping with the table's name and offset, loaded by a copy.
  const std::string old = s.path + ".old";
  rewrite(s.path, old, 0);
  try {
    peer::MappedParameters<float> m(old, s.layer.layout(), "peer");
    ADD_FAILURE() << "a table that is not page-aligned must be refused";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not a multiple of the page size"), std::string::npos) << e.what();
  }
  peer::Parameters<float> loaded = s.layer.make_parameters(99);
  peer::TrainingCheckpoint c;
  c.add_config("peer", s.layer.config().to_fields());
  c.add_parameters("peer", loaded);
  c.load(old);
  EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(s.p), peer_test::storage_bytes(loaded)));
  // Page alignment (not 2 MiB) is enough to map.
  rewrite(s.path, old, peer::page_size());
  EXPECT_NO_THROW(peer::MappedParameters<float>(old, s.layer.layout(), "peer"));
  std::remove(old.c_str());

  // Wrong dtype, wrong prefix, wrong shape, another storage.
  EXPECT_THROW(peer::MappedParameters<double>(s.path, s.layer.layout(), "peer"), std::runtime_error);
  EXPECT_THROW(peer::MappedParameters<float>(s.path, s.layer.layout(), "other"), std::runtime_error);
  peer::PeerLayer<float> bigger(peer_test::small_config(16, 7, 2, 8, 3, 3));
  EXPECT_THROW(peer::MappedParameters<float>(s.path, bigger.layout(), "peer"), std::runtime_error);
  peer::PeerLayer<float> bf16(config(peer::TableStorage::kBFloat16));
  EXPECT_THROW(peer::MappedParameters<float>(s.path, bf16.layout(), "peer"), std::runtime_error);
  EXPECT_THROW(peer::MappedParameters<float>(s.path + ".missing", s.layer.layout(), "peer"), std::runtime_error);
}

TEST(CheckpointAlignment, TrainingCheckpointsAlignTablesForMapping) {
  peer::ParameterLayout layout;
  layout.add_dense("w", 3, 5);
  layout.add_table("big", 512, 1024);                                   // 2 MiB of float: a huge page
  layout.add_table("small", 10, 8, peer::TableStorage::kBFloat16);     // below: 64 KiB
  peer::Parameters<float> p(layout);
  const std::string path = ::testing::TempDir() + "aligned_training.ckpt";
  for (std::uint64_t alignment : {peer::TrainingCheckpoint::kMapAligned, std::uint64_t{0}, std::uint64_t{4096}}) {
    peer::TrainingCheckpoint c;
    c.add_parameters("m", p);
    c.set_table_alignment(alignment);
    c.save(path);
    const peer::CheckpointReader r(path);
    const std::uint64_t big = r.entry("m.big").offset, small = r.entry("m.small").offset;
    if (alignment == peer::TrainingCheckpoint::kMapAligned) {
      EXPECT_EQ(big % peer::CheckpointFormat::kMapAlignment, 0U);
      EXPECT_EQ(small % (std::uint64_t{64} << 10), 0U);
      EXPECT_NO_THROW(peer::MappedParameters<float>(path, layout, "m"));
    } else if (alignment == 0) {
      EXPECT_LT(big, 4096U);  // right after the header and "w"
      EXPECT_EQ(small, big + (std::uint64_t{2} << 20));
    } else {
      EXPECT_EQ(big % 4096, 0U);
      EXPECT_EQ(small % 4096, 0U);
    }
    EXPECT_NO_THROW(r.verify_all());
  }
  std::remove(path.c_str());
}

TEST(MappedFileRange, OffsetsMustBePageAligned) {
  EXPECT_THROW(peer::MappedFileRange(0, 100, 10, peer::MapMode::kReadOnly, "x"), std::invalid_argument);
  const peer::MappedFileRange empty(0, 0, 0, peer::MapMode::kReadOnly, "x");
  EXPECT_EQ(empty.data(), nullptr);
}

TEST(CheckpointAlignment, TensorsStartWhereAskedThePaddingIsZeroAndBadAlignmentsAreRefused) {
  const std::string path = ::testing::TempDir() + "aligned.ckpt";
  std::vector<float> a(10, 1.5f), b(3000, -2.0f), c(5, 0.25f);
  std::vector<peer::TensorView> views(3);
  const std::uint64_t aligns[3] = {0, 4096, std::uint64_t{1} << 21};
  const std::vector<float>* data[3] = {&a, &b, &c};
  for (int i = 0; i < 3; ++i) {
    views[i].name = "t" + std::to_string(i);
    views[i].rows = 1;
    views[i].cols = static_cast<std::int64_t>(data[i]->size());
    views[i].data = data[i]->data();
    views[i].alignment = aligns[i];
  }
  peer::save_checkpoint(path, {}, views);
  const peer::CheckpointReader r(path);
  EXPECT_EQ(r.entry("t0").offset % 64, 0U);
  EXPECT_EQ(r.entry("t1").offset % 4096, 0U);
  EXPECT_EQ(r.entry("t2").offset % (std::uint64_t{1} << 21), 0U);
  EXPECT_GE(r.entry("t2").offset, std::uint64_t{1} << 21);
  EXPECT_NO_THROW(r.verify_all());  // every padding byte (the holes too) reads as zero
  std::vector<float> back(c.size());
  r.read("t2", peer::DType::kFloat32, 1, 5, back.data());
  EXPECT_EQ(back, c);
  // An empty last tensor after a long gap: the file still ends where the format says.
  views[2].rows = 0;
  views[2].data = nullptr;
  peer::save_checkpoint(path, {}, views);
  EXPECT_NO_THROW(peer::CheckpointReader(path).verify_all());
  for (std::uint64_t bad : {std::uint64_t{32}, std::uint64_t{100}, std::uint64_t{3} << 20, std::uint64_t{1} << 31}) {
    views[1].alignment = bad;
    try {
      peer::save_checkpoint(path, {}, views);
      ADD_FAILURE() << "alignment " << bad << " must be refused";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("tensors[1] ('t1').alignment = " + std::to_string(bad)), std::string::npos) << e.what();
    }
  }
  std::remove(path.c_str());
}

}  // namespace
