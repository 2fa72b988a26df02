// SPDX-License-Identifier: MIT
#ifndef PEER_IO_SHARDED_CHECKPOINT_HPP
#define PEER_IO_SHARDED_CHECKPOINT_HPP

/// \file
/// ShardedCheckpoint: a TrainingCheckpoint whose tables (and their optimizer state) are split by rows over
/// P processes, saved as one file per process plus an index, and loadable by any number Q of processes,
/// one process included. Rows are placed cyclically, as peer::mpi::ExpertShards places experts: global row
/// i lives on rank i mod P as local row i div P.
///
/// Files, for an index at `path`:
///   `path`                      the index: "peer.kind" = "training-sharded", the rank count P, a save id,
///                               and "sharded.<tensor>" = its global row count for every sharded tensor;
///                               no tensors
///   `path`.shard-<r>-of-<P>     rank r's file (peer.kind "training-shard", its rank, P and the save id):
///                               the rows it holds of every sharded tensor; rank 0's also holds every
///                               replicated registration (configuration, values, dense tensors, counters,
///                               unsharded tables), which must be the same on every rank
///
/// A save writes the P shard files first (each atomically, see save_checkpoint) and the index last, so an
/// index names a complete set. All files of one save carry the same save id; a load refuses a shard file
/// of another save (a set mixed by an interrupted save, a file copied in from elsewhere) naming the file
/// and both ids. Rewriting a checkpoint in place therefore leaves the previous index pointing at shards of
/// the new save until the new index lands: such a set is refused, never loaded mixed.
///
/// Loading at Q processes, process q needs global rows i with i mod Q == q: for every shard file p that
/// holds any, it streams each sharded tensor's rows (CheckpointReader::stream) and copies row l (global
/// l P + p) to local row (l P + p) div Q when (l P + p) mod Q == q. When Q == P only the process's own file
/// and rank 0's are read. As with TrainingCheckpoint, everything a process reads (index, structure,
/// configuration, names, dtypes, shapes, every checksum of every file it reads) is validated before the
/// registered memory is touched; prepare() and fill() are the two halves, so that the MPI version
/// (peer/mpi/sharded_checkpoint.hpp) can agree on the validation on every rank before any rank writes.
///
/// Which registrations are sharded: the tables named by shard_table(name, global rows) before
/// add_parameters(), and the optimizer state (add_optimizer) marked per_row whose table is one of them
/// (moments, row-wise sums, bf16 master rows, lazy Adam's row steps). Everything else is replicated.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/io/checkpoint.hpp"
#include "peer/io/training_checkpoint.hpp"
#include "peer/optim/optimizer.hpp"
#include "peer/version.hpp"

namespace peer {

class ShardedCheckpoint {
 public:
  using Fields = TrainingCheckpoint::Fields;

  /// This process's place: rank `rank` of `ranks` (0 of 1 for a single process).
  explicit ShardedCheckpoint(int rank = 0, int ranks = 1) : rank_(rank), ranks_(ranks) {
    if (ranks < 1) detail::throw_invalid("ShardedCheckpoint ranks", ranks, "must be >= 1");
    if (rank < 0 || rank >= ranks) detail::throw_invalid("ShardedCheckpoint rank", rank, "must be in [0, " + detail::to_text(ranks) + ")");
  }

  int rank() const { return rank_; }
  int ranks() const { return ranks_; }

  /// Rows rank r of P holds of a `global_rows`-row table: ceil((N - r) / P).
  static Index rows_of(Index global_rows, int rank, int ranks) { return (global_rows - rank + ranks - 1) / ranks; }

  /// Marks the layout table `table_name` (its name in the Parameters' layout, without a prefix) as split
  /// over the ranks, `global_rows` rows in all. Call before add_parameters() and add_optimizer().
  void shard_table(const std::string& table_name, Index global_rows) {
    if (global_rows < ranks_) {
      detail::throw_invalid("ShardedCheckpoint::shard_table('" + table_name + "') global_rows", global_rows,
                            "must be >= the number of ranks (" + detail::to_text(ranks_) + ")");
    }
    if (!sharded_tables_.emplace(table_name, global_rows).second) {
      throw std::invalid_argument("ShardedCheckpoint: table '" + table_name + "' is sharded twice");
    }
  }

  /// Replicated registrations, as TrainingCheckpoint's.
  void add_config(const std::string& prefix, const Fields& fields) { replicated_.add_config(prefix, fields); }
  template <typename T>
  void add_tensor(const std::string& name, T* data, Index rows, Index cols) { add_replicated(name, data, rows, cols, false); }
  void add_counter(const std::string& name, std::int64_t* value) { add_replicated(name, value, 1, 1, false); }
  void add_value(const std::string& key, std::string* value) { replicated_.add_value(key, value); }

  /// Every dense tensor, buffer and table of `params` as "<prefix>.<name>"; sharded tables must have this
  /// rank's rows_of(N, rank, ranks) rows.
  template <typename Scalar>
  void add_parameters(const std::string& prefix, Parameters<Scalar>& params) {
    const ParameterLayout& layout = params.layout();
    for (const auto& s : layout.dense()) add_replicated(TrainingCheckpoint::join(prefix, s.name), params.dense_data() + s.offset, s.rows, s.cols, false);
    for (const auto& s : layout.buffers()) add_replicated(TrainingCheckpoint::join(prefix, s.name), params.buffer_data() + s.offset, s.rows, s.cols, false);
    for (std::size_t t = 0; t < layout.tables().size(); ++t) {
      const auto& s = layout.tables()[t];
      auto& table = params.table(TableHandle{static_cast<int>(t)});
      const std::string name = TrainingCheckpoint::join(prefix, s.name);
      const auto sharded = sharded_tables_.find(s.name);
      if (sharded == sharded_tables_.end()) {
        if (table.is_bf16()) add_replicated(name, table.bf16_data(), s.rows, s.cols, true);
        else add_replicated(name, table.data(), s.rows, s.cols, true);
      } else if (table.is_bf16()) {
        add_sharded(name, table.bf16_data(), s.rows, s.cols, sharded->second);
      } else {
        add_sharded(name, table.data(), s.rows, s.cols, sharded->second);
      }
    }
  }

  /// An optimizer's state (TrainingCheckpoint::add_optimizer); its per-row state of a sharded table is
  /// sharded with it.
  template <typename Optimizer>
  void add_optimizer(const std::string& prefix, Optimizer& optimizer) {
    const ParameterLayout& layout = optimizer.layout();
    auto sharded_rows = [&](bool per_row, const std::string& state) -> Index {
      if (!per_row) return -1;
      const auto it = sharded_tables_.find(detail::state_owner(layout, state));
      return it == sharded_tables_.end() ? -1 : it->second;
    };
    for (const auto& s : optimizer.state_tensors()) {
      const std::string name = TrainingCheckpoint::join(prefix, s.name);
      const Index global = sharded_rows(s.per_row, s.name);
      if (global < 0) {
        if (s.bf16 != nullptr) add_replicated(name, s.bf16, s.rows, s.cols, false);
        else add_replicated(name, s.data, s.rows, s.cols, false);
      } else if (s.bf16 != nullptr) {
        add_sharded(name, s.bf16, s.rows, s.cols, global);
      } else {
        add_sharded(name, s.data, s.rows, s.cols, global);
      }
    }
    for (const auto& c : optimizer.state_counters()) {
      const std::string name = TrainingCheckpoint::join(prefix, c.name);
      const Index global = sharded_rows(c.per_row, c.name);
      if (global < 0) add_replicated(name, c.data, c.size, Index{1}, false);
      else add_sharded(name, c.data, c.size, Index{1}, global);
    }
  }

  /// The file of rank r of P for the index at `path`.
  static std::string shard_path(const std::string& path, int rank, int ranks) {
    return path + ".shard-" + std::to_string(rank) + "-of-" + std::to_string(ranks);
  }

  /// A fresh save id: 16 hex digits from std::random_device and the clock.
  static std::string new_save_id() {
    std::random_device device;
    std::uint64_t v = (static_cast<std::uint64_t>(device()) << 32) ^ device() ^
                      static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    static const char* digits = "0123456789abcdef";
    std::string out(16, '0');
    for (int i = 15; i >= 0; --i, v >>= 4) out[static_cast<std::size_t>(i)] = digits[v & 15];
    return out;
  }

  /// A single process (ranks() == 1): its shard file, then the index.
  void save(const std::string& path) const {
    if (ranks_ != 1) throw std::logic_error("ShardedCheckpoint::save: with " + detail::to_text(ranks_) + " ranks use peer::mpi::save_sharded_checkpoint (or save_shard and save_index)");
    const std::string id = new_save_id();
    save_shard(path, id);
    save_index(path, id);
  }

  /// This rank's shard file, atomically (the same `save_id` on every rank).
  void save_shard(const std::string& path, const std::string& save_id) const {
    check_save_id(save_id);
    Fields metadata = rank_ == 0 ? replicated_.file_metadata(kShardKind) : Fields{{"peer.kind", kShardKind}, {"peer.version", version()}};
    metadata.emplace_back("peer.shard.rank", std::to_string(rank_));
    metadata.emplace_back("peer.shard.ranks", std::to_string(ranks_));
    metadata.emplace_back("peer.shard.save_id", save_id);
    std::vector<TensorView> views;
    if (rank_ == 0) views = replicated_.file_tensors();
    for (const auto& t : sharded_) views.push_back(TrainingCheckpoint::view(t.name, t.dtype, t.rows, t.cols, t.data));
    save_checkpoint(shard_path(path, rank_, ranks_), metadata, views);
  }

  /// The index (rank 0, after every rank's save_shard succeeded), atomically.
  void save_index(const std::string& path, const std::string& save_id) const {
    check_save_id(save_id);
    Fields metadata{{"peer.kind", kIndexKind},
                    {"peer.version", version()},
                    {"peer.shard.ranks", std::to_string(ranks_)},
                    {"peer.shard.save_id", save_id}};
    for (const auto& t : sharded_) metadata.emplace_back("sharded." + t.name, std::to_string(t.global_rows));
    save_checkpoint(path, metadata, {});
  }

  /// What prepare() found valid: the open files fill() reads from.
  struct Plan {
    int ranks = 0;                                  // P of the files
    std::vector<std::unique_ptr<CheckpointReader>> shards;  // [P]; null where this rank reads nothing
  };

  /// Every check of a load, no write: the index, every shard file's identity (kind, rank, P, save id), the
  /// replicated registrations against rank 0's file, every sharded tensor in every file it is read from,
  /// and the checksums of every file this rank reads. Throws std::runtime_error("checkpoint <file>: ...").
  Plan prepare(const std::string& path) const {
    const CheckpointReader index(path);
    const std::string where = "checkpoint " + path + ": ";
    if (!index.has_metadata("peer.kind") || index.metadata("peer.kind") != kIndexKind) {
      throw std::runtime_error(where + "not a sharded checkpoint index (metadata 'peer.kind' is not \"" + kIndexKind + "\")");
    }
    Plan plan;
    plan.ranks = static_cast<int>(parse_count(index, "peer.shard.ranks", 1, 1 << 20));
    const int p_count = plan.ranks;
    const std::string save_id = required(index, "peer.shard.save_id");
    // The sharded tensors: the same names with the same global rows.
    std::unordered_set<std::string> sharded_names;
    for (const auto& t : sharded_) {
      sharded_names.insert(t.name);
      const std::string key = "sharded." + t.name;
      if (!index.has_metadata(key)) throw std::runtime_error(where + "tensor '" + t.name + "' is not sharded in the checkpoint but is in the model");
      const auto rows = parse_count(index, key, 0, std::int64_t{1} << 40);
      if (rows != t.global_rows) {
        throw std::runtime_error(where + "sharded tensor '" + t.name + "' has " + std::to_string(rows) + " rows in the checkpoint but " +
                                 std::to_string(t.global_rows) + " in the model");
      }
    }
    for (const auto& kv : index.metadata()) {
      if (kv.first.rfind("sharded.", 0) == 0 && sharded_names.count(kv.first.substr(8)) == 0) {
        throw std::runtime_error(where + "tensor " + detail::quote_text(kv.first.substr(8)) + " is sharded in the checkpoint but not in the model");
      }
    }
    plan.shards.resize(static_cast<std::size_t>(p_count));
    for (int p = 0; p < p_count; ++p) {
      if (p != 0 && !reads_from(p, p_count)) continue;
      auto reader = std::make_unique<CheckpointReader>(shard_path(path, p, p_count));
      const std::string at = "checkpoint " + reader->path() + ": ";
      if (!reader->has_metadata("peer.kind") || reader->metadata("peer.kind") != kShardKind) {
        throw std::runtime_error(at + "not a shard of a sharded checkpoint (metadata 'peer.kind' is not \"" + kShardKind + "\")");
      }
      if (required(*reader, "peer.shard.save_id") != save_id) {
        throw std::runtime_error(at + "a shard of another save (save id " + detail::quote_text(reader->metadata("peer.shard.save_id")) +
                                 ", the index " + path + " has " + detail::quote_text(save_id) + ")");
      }
      if (parse_count(*reader, "peer.shard.rank", 0, p_count - 1) != p || parse_count(*reader, "peer.shard.ranks", 1, 1 << 20) != p_count) {
        throw std::runtime_error(at + "holds rank " + reader->metadata("peer.shard.rank") + " of " + reader->metadata("peer.shard.ranks") +
                                 ", not rank " + std::to_string(p) + " of " + std::to_string(p_count));
      }
      if (p == 0) {
        replicated_.check(*reader, kShardKind, sharded_names);
      } else {
        for (const auto& e : reader->tensors()) {
          if (sharded_names.count(e.name) == 0) throw std::runtime_error(at + "tensor " + detail::quote_text(e.name) + " is not a sharded tensor of the model");
        }
      }
      for (const auto& t : sharded_) {
        const Index rows = rows_of(t.global_rows, p, p_count);
        if (!reader->has(t.name)) throw std::runtime_error(at + "tensor '" + t.name + "' is missing");
        const TensorEntry& e = reader->entry(t.name);
        if (e.dtype != t.dtype || e.rows != rows || e.cols != t.cols) {
          throw std::runtime_error(at + "tensor '" + t.name + "' is " + dtype_name(e.dtype) + " [" + std::to_string(e.rows) + ", " +
                                   std::to_string(e.cols) + "] but rank " + std::to_string(p) + " of " + std::to_string(p_count) +
                                   " must hold " + dtype_name(t.dtype) + " [" + std::to_string(rows) + ", " + std::to_string(t.cols) + "]");
        }
      }
      reader->verify_all();
      plan.shards[static_cast<std::size_t>(p)] = std::move(reader);
    }
    return plan;
  }

  /// Fills the registered memory from a plan prepare() returned: the replicated registrations from rank
  /// 0's file, this rank's rows of every sharded tensor from the files that hold them.
  void fill(const Plan& plan) const {
    replicated_.fill(*plan.shards.at(0));
    const int p_count = plan.ranks;
    for (const auto& t : sharded_) {
      const std::size_t row_bytes = static_cast<std::size_t>(t.cols) * dtype_size(t.dtype);
      auto* dst = static_cast<unsigned char*>(t.data);
      for (int p = 0; p < p_count; ++p) {
        if (!reads_from(p, p_count)) continue;
        plan.shards[static_cast<std::size_t>(p)]->stream(
            t.name, t.dtype, rows_of(t.global_rows, p, p_count), t.cols, [&](std::int64_t r0, std::int64_t r1, const void* data) {
              const auto* in = static_cast<const unsigned char*>(data);
              for (std::int64_t l = r0; l < r1; ++l) {
                const std::int64_t global = l * p_count + p;
                if (global % ranks_ != rank_) continue;
                std::memcpy(dst + static_cast<std::size_t>(global / ranks_) * row_bytes, in + static_cast<std::size_t>(l - r0) * row_bytes, row_bytes);
              }
            });
      }
    }
  }

  /// prepare() then fill(): a single process, or every rank on its own.
  void load(const std::string& path) const { fill(prepare(path)); }

  static constexpr const char* kIndexKind = "training-sharded";
  static constexpr const char* kShardKind = "training-shard";

 private:
  struct Sharded {
    std::string name;
    DType dtype;
    Index rows, cols, global_rows;
    void* data;
  };

  template <typename T>
  void add_sharded(const std::string& name, T* data, Index rows, Index cols, Index global_rows) {
    const Index want = rows_of(global_rows, rank_, ranks_);
    if (rows != want) {
      throw std::invalid_argument("ShardedCheckpoint: sharded tensor '" + name + "' has " + detail::to_text(rows) + " rows but rank " +
                                  detail::to_text(rank_) + " of " + detail::to_text(ranks_) + " holds " + detail::to_text(want) +
                                  " of its " + detail::to_text(global_rows));
    }
    claim(name);
    sharded_.push_back(Sharded{name, dtype_of<T>(), rows, cols, global_rows, data});
  }

  template <typename T>
  void add_replicated(const std::string& name, T* data, Index rows, Index cols, bool table) {
    claim(name);
    if (table) replicated_.add_table(name, data, rows, cols);
    else replicated_.add_tensor(name, data, rows, cols);
  }

  // One namespace of tensor names for the sharded and the replicated registrations.
  void claim(const std::string& name) {
    if (!names_.insert(name).second) throw std::invalid_argument("ShardedCheckpoint: tensor '" + name + "' is registered twice (use distinct prefixes)");
  }

  // Whether shard file p of P holds any row this rank needs: l P + p == rank (mod Q) for some local row l
  // of that file; the residues repeat with period Q in l.
  bool reads_from(int p, int p_count) const {
    for (const auto& t : sharded_) {
      const Index rows = std::min<Index>(rows_of(t.global_rows, p, p_count), ranks_);
      for (Index l = 0; l < rows; ++l) {
        if ((l * p_count + p) % ranks_ == rank_) return true;
      }
    }
    return false;
  }

  static void check_save_id(const std::string& id) {
    if (id.empty() || id.size() > 64) detail::throw_invalid("ShardedCheckpoint save_id length", id.size(), "must be in [1, 64]");
  }

  static const std::string& required(const CheckpointReader& r, const std::string& key) {
    if (!r.has_metadata(key)) throw std::runtime_error("checkpoint " + r.path() + ": metadata '" + key + "' is missing");
    return r.metadata(key);
  }

  // A decimal count in [lo, hi] from metadata `key`; anything else is refused naming the key and the text.
  static std::int64_t parse_count(const CheckpointReader& r, const std::string& key, std::int64_t lo, std::int64_t hi) {
    const std::string& text = required(r, key);
    std::int64_t v = 0;
    bool ok = !text.empty() && text.size() <= 18;
    for (char c : text) {
      if (c < '0' || c > '9') ok = false;
      else v = v * 10 + (c - '0');
    }
    if (!ok || v < lo || v > hi) {
      throw std::runtime_error("checkpoint " + r.path() + ": metadata '" + key + "' is " + detail::quote_text(text) + ", not a count in [" +
                               std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return v;
  }

  int rank_ = 0, ranks_ = 1;
  TrainingCheckpoint replicated_;
  std::map<std::string, Index> sharded_tables_;
  std::vector<Sharded> sharded_;
  std::unordered_set<std::string> names_;
};

}  // namespace peer

#endif  // PEER_IO_SHARDED_CHECKPOINT_HPP
