// SPDX-License-Identifier: MIT
#ifndef PEER_IO_TRAINING_CHECKPOINT_HPP
#define PEER_IO_TRAINING_CHECKPOINT_HPP

/// \file
/// TrainingCheckpoint: everything a training run needs to continue bit for bit, in one checkpoint file
/// (peer/io/checkpoint.hpp, docs/checkpoint-format.md): layer configurations, every parameter and buffer
/// (batch-norm running statistics included), the optimizers' state (moments, momentum buffers, global and
/// per-row step counts), and the caller's own tensors, counters and values (a data cursor, an RNG seed).
///
/// A TrainingCheckpoint is a list of registrations: names bound to live memory the caller owns. save()
/// writes the registered memory; load() fills it. The same registration code runs before both, so a model
/// registers itself once:
///
///     peer::TrainingCheckpoint ckpt;
///     ckpt.add_config("peer", layer.config().to_fields());
///     ckpt.add_parameters("peer", params);
///     ckpt.add_optimizer("adam", optimizer);
///     ckpt.add_counter("step", &step);
///     ckpt.save(path);   // or ckpt.load(path)
///
/// In the file: tensor "<prefix>.<tensor name>" per parameter and optimizer state tensor, an int64 tensor
/// per counter array, metadata "config.<prefix>.<field>" per configuration field, "value.<key>" per value,
/// and "peer.kind" = "training", "peer.version". Parameter tables start at multiples of 2 MiB (tables of
/// 2 MiB or more: a huge page) or of 64 KiB (smaller ones: the largest common page size), so that
/// MappedParameters can map them from the checkpoint instead of reading them (peer/io/mapped_parameters.hpp);
/// the gaps are file holes. set_table_alignment(0) writes them at the format's 64 bytes instead (smaller
/// files; the tables can then only be loaded).
///
/// load() validates everything before it writes anything: the file's structure and every checksum
/// (CheckpointReader::verify_all), its kind, every configuration field (equal text; a missing or extra
/// field is a mismatch), the set of tensors (none missing, none extra), each tensor's dtype and shape, and
/// every value's presence. The first problem throws std::runtime_error("checkpoint <path>: ...") naming the
/// field or tensor with the file's and the model's values, and the registered memory is left untouched.
/// Only then are the tensors read, in chunks, straight into the registered memory: a 1024^2 x 512 expert
/// table is never copied whole (saving streams it the same way).
///
/// Registrations keep pointers: the registered objects must outlive the TrainingCheckpoint's use, and an
/// optimizer or Parameters object must not be re-created in between (register again if it is).

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"
#include "peer/io/checkpoint.hpp"
#include "peer/version.hpp"

namespace peer {

class TrainingCheckpoint {
 public:
  using Fields = std::vector<std::pair<std::string, std::string>>;

  /// Configuration fields that must match on load (e.g. PeerConfig::to_fields()).
  void add_config(const std::string& prefix, const Fields& fields) {
    for (const auto& f : fields) add_meta("config." + join(prefix, f.first), f.second, nullptr);
  }

  /// Every dense tensor, buffer and table of `params`, as "<prefix>.<name>".
  template <typename Scalar>
  void add_parameters(const std::string& prefix, Parameters<Scalar>& params) {
    const ParameterLayout& layout = params.layout();
    for (const auto& s : layout.dense()) add_tensor(join(prefix, s.name), params.dense_data() + s.offset, s.rows, s.cols);
    for (const auto& s : layout.buffers()) add_tensor(join(prefix, s.name), params.buffer_data() + s.offset, s.rows, s.cols);
    for (std::size_t t = 0; t < layout.tables().size(); ++t) {
      const auto& s = layout.tables()[t];
      auto& table = params.table(TableHandle{static_cast<int>(t)});
      if (table.is_bf16()) {
        add_table(join(prefix, s.name), table.bf16_data(), s.rows, s.cols);
      } else {
        add_table(join(prefix, s.name), table.data(), s.rows, s.cols);
      }
    }
  }

  /// A parameter table's rows as a tensor (add_tensor, aligned in the file for mapping: set_table_alignment).
  template <typename T>
  void add_table(const std::string& name, T* data, Index rows, Index cols) {
    add_tensor(name, data, rows, cols);
    tensors_.back().table = true;
  }

  /// The data alignment of parameter tables in saved files: kMapAligned (the default, see the file
  /// comment), 0 for the format's 64 bytes, or a power of two from 64 to 2^30.
  static constexpr std::uint64_t kMapAligned = ~std::uint64_t{0};
  void set_table_alignment(std::uint64_t alignment) { table_alignment_ = alignment; }

  /// The state of an optimizer with state_tensors() and state_counters() (Sgd, Adam), as
  /// "<prefix>.<state name>"; for example "adam.adam.m.experts" and "adam.optimizer.step".
  template <typename Optimizer>
  void add_optimizer(const std::string& prefix, Optimizer& optimizer) {
    for (const auto& s : optimizer.state_tensors()) {
      if (s.bf16 != nullptr) {
        add_tensor(join(prefix, s.name), s.bf16, s.rows, s.cols);
      } else {
        add_tensor(join(prefix, s.name), s.data, s.rows, s.cols);
      }
    }
    for (const auto& c : optimizer.state_counters()) add_tensor(join(prefix, c.name), c.data, c.size, Index{1});
  }

  /// A caller's tensor: rows * cols contiguous row-major elements of float, double, int32, int64, uint8 or
  /// bfloat16.
  template <typename T>
  void add_tensor(const std::string& name, T* data, Index rows, Index cols) {
    if (rows < 0 || cols < 0) {
      throw std::invalid_argument("TrainingCheckpoint: tensor '" + name + "' has a negative shape");
    }
    if (data == nullptr && rows * cols > 0) {
      throw std::invalid_argument("TrainingCheckpoint: tensor '" + name + "' has no data");
    }
    claim(tensor_names_, name, "tensor");
    tensors_.push_back(Tensor{name, dtype_of<T>(), rows, cols, data});
  }

  /// One int64 counter (a step count, a data cursor), stored as a [1, 1] tensor.
  void add_counter(const std::string& name, std::int64_t* value) { add_tensor(name, value, 1, 1); }

  /// A free-form value restored on load (stored as metadata "value.<key>").
  void add_value(const std::string& key, std::string* value) {
    if (value == nullptr) throw std::invalid_argument("TrainingCheckpoint: value '" + key + "' is null");
    add_meta("value." + key, std::string(), value);
  }

  /// Writes every registration to `path` atomically (see save_checkpoint).
  void save(const std::string& path) const { save_checkpoint(path, file_metadata("training"), file_tensors()); }

  /// Validates `path` against every registration, then fills the registered memory (see the file comment).
  void load(const std::string& path) const { load(CheckpointReader(path)); }

  /// The same from an open reader (for example one made from a descriptor: CheckpointReader(fd, name)).
  void load(const CheckpointReader& reader) const {
    check(reader, "training", {});
    reader.verify_all();
    fill(reader);
  }

  // The pieces of save() and load(), for files that hold these registrations and more (ShardedCheckpoint,
  // peer/io/sharded_checkpoint.hpp).

  /// The metadata save() writes, with "peer.kind" = `kind`.
  Fields file_metadata(const std::string& kind) const {
    Fields metadata{{"peer.kind", kind}, {"peer.version", version()}};
    for (const auto& m : meta_) metadata.emplace_back(m.key, m.target != nullptr ? *m.target : m.expected);
    return metadata;
  }

  /// The tensors save() writes, in registration order (views of the registered memory).
  std::vector<TensorView> file_tensors() const {
    std::vector<TensorView> views;
    views.reserve(tensors_.size());
    for (const auto& t : tensors_) {
      views.push_back(view(t.name, t.dtype, t.rows, t.cols, t.data));
      if (t.table) {
        const auto bytes = static_cast<std::uint64_t>(t.rows * t.cols) * dtype_size(t.dtype);
        views.back().alignment = table_alignment_ != kMapAligned ? table_alignment_ : CheckpointFormat::map_alignment(bytes);
      }
    }
    return views;
  }

  /// A view of rows * cols elements at `data` (null for an empty tensor), at the format's alignment.
  static TensorView view(const std::string& name, DType dtype, Index rows, Index cols, const void* data) {
    TensorView v;
    v.name = name;
    v.dtype = dtype;
    v.rows = rows;
    v.cols = cols;
    v.data = rows * cols > 0 ? data : nullptr;
    return v;
  }

  /// load()'s checks short of the data's checksums: the kind, every configuration field and value, the set
  /// of tensors (the file may also hold the tensors named in `also_in_file`, which the caller checks), each
  /// tensor's dtype and shape. Throws std::runtime_error("checkpoint <path>: ...") on the first problem.
  void check(const CheckpointReader& reader, const std::string& kind, const std::unordered_set<std::string>& also_in_file) const {
    const std::string where = "checkpoint " + reader.path() + ": ";
    auto fail = [&](const std::string& what) { throw std::runtime_error(where + what); };
    if (!reader.has_metadata("peer.kind") || reader.metadata("peer.kind") != kind) {
      fail("not a " + kind + " checkpoint (metadata 'peer.kind' is not \"" + kind + "\")");
    }
    // Configuration: the same fields with the same text.
    std::unordered_set<std::string> known;
    for (const auto& m : meta_) {
      known.insert(m.key);
      if (!reader.has_metadata(m.key)) {
        fail(m.target != nullptr ? "value '" + m.key.substr(6) + "' is missing"
                                 : "configuration field '" + m.key.substr(7) + "' is missing (the model has " +
                                       m.expected + ")");
      }
      const std::string& in_file = reader.metadata(m.key);
      if (m.target == nullptr && in_file != m.expected) {
        fail("configuration field '" + m.key.substr(7) + "' is " + detail::quote_text(in_file) + " in the file but " +
             m.expected + " in the model");
      }
    }
    for (const auto& kv : reader.metadata()) {
      if (kv.first.rfind("config.", 0) == 0 && known.count(kv.first) == 0) {
        fail("configuration field " + detail::quote_text(kv.first.substr(7)) + " (= " + detail::quote_text(kv.second) +
             ") is not part of the model");
      }
    }
    // Tensors: the same set, each with the registered dtype and shape.
    for (const auto& t : tensors_) {
      if (!reader.has(t.name)) fail("tensor '" + t.name + "' is missing");
      const TensorEntry& e = reader.entry(t.name);
      if (e.dtype != t.dtype || e.rows != t.rows || e.cols != t.cols) {
        fail("tensor '" + t.name + "' is " + dtype_name(e.dtype) + " [" + std::to_string(e.rows) + ", " +
             std::to_string(e.cols) + "] in the file but " + dtype_name(t.dtype) + " [" + std::to_string(t.rows) +
             ", " + std::to_string(t.cols) + "] in the model");
      }
    }
    for (const auto& e : reader.tensors()) {
      if (tensor_names_.count(e.name) == 0 && also_in_file.count(e.name) == 0) fail("tensor " + detail::quote_text(e.name) + " is not part of the model");
    }
  }

  /// load()'s writes: every registered tensor and value from `reader`, which check() has accepted.
  void fill(const CheckpointReader& reader) const {
    // Everything is valid: only now touch the caller's memory.
    for (const auto& t : tensors_) {
      if (t.rows * t.cols > 0) reader.read(t.name, t.dtype, t.rows, t.cols, t.data);
    }
    for (const auto& m : meta_) {
      if (m.target != nullptr) *m.target = reader.metadata(m.key);
    }
  }

  /// "<prefix>.<name>", or `name` for an empty prefix: the file's name of a registered tensor.
  static std::string join(const std::string& prefix, const std::string& name) {
    return prefix.empty() ? name : prefix + "." + name;
  }

  /// Names of the registered tensors, in registration (and file) order.
  std::vector<std::string> tensor_names() const {
    std::vector<std::string> out;
    for (const auto& t : tensors_) out.push_back(t.name);
    return out;
  }

 private:
  struct Tensor {
    std::string name;
    DType dtype;
    Index rows, cols;
    void* data;
    bool table = false;  // a parameter table: aligned for mapping (table_alignment_)
  };
  struct Meta {
    std::string key;
    std::string expected;  // configuration fields
    std::string* target;   // values (null for configuration fields)
  };

  static void claim(std::unordered_set<std::string>& names, const std::string& name, const char* kind) {
    if (!names.insert(name).second) {
      throw std::invalid_argument(std::string("TrainingCheckpoint: ") + kind + " '" + name +
                                  "' is registered twice (use distinct prefixes)");
    }
  }

  void add_meta(const std::string& key, const std::string& expected, std::string* target) {
    claim(meta_names_, key, "metadata key");
    meta_.push_back(Meta{key, expected, target});
  }

  std::vector<Tensor> tensors_;
  std::uint64_t table_alignment_ = kMapAligned;
  std::vector<Meta> meta_;
  std::unordered_set<std::string> tensor_names_, meta_names_;
};

}  // namespace peer

#endif  // PEER_IO_TRAINING_CHECKPOINT_HPP
