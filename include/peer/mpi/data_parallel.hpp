// SPDX-License-Identifier: MIT
#ifndef PEER_MPI_DATA_PARALLEL_HPP
#define PEER_MPI_DATA_PARALLEL_HPP

/// \file
/// Data-parallel training over MPI: every rank holds the whole model and trains on its own batch; after
/// each backward, all_reduce() makes every rank's gradients the sum over ranks, so every rank takes the
/// same optimizer step and the replicas stay identical.
///
///   dense gradients (one flat buffer for a whole model): reduce-scatter then all-gather, each rank summing
///     one chunk of the buffer in rank order: sum = ((g_0 + g_1) + g_2) + ...
///   table gradients (row-sparse): each rank's (ids, rows) gathered by every rank, never a dense N x D
///     buffer, and coalesced in rank order: a row's sum is rank 0's row + rank 1's row + ... over the ranks
///     that hold it.
///
/// Determinism. The order of every sum is fixed by rank, not by MPI's reduction algorithm, so a step is
/// bitwise reproducible for a given number of ranks, and with P ranks it equals bitwise one process
/// accumulating the same P micro-batches in rank order (backward into the same Gradients P times, then the
/// step; tests/mpi checks it). Against one process on the concatenated batch it differs by the
/// reassociation of the sums: per entry at most about (P - 1) eps sum_r |g_r| (tested in double), and by
/// anything that is not a sum over tokens: batch-normalized queries use each rank's batch statistics, as
/// PyTorch's DistributedDataParallel does without SyncBatchNorm; broadcast_buffers() then gives every
/// rank rank 0's running statistics (DDP's broadcast_buffers), which keeps the replicas identical.
///
/// Refused with a message on every rank: gradients whose table updates are fused into the backward
/// (fuse_table_updates: the row-sparse gradient is never stored, so there is nothing to exchange), and
/// ranks whose layouts differ.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/io/checkpoint.hpp"
#include "peer/optim/optimizer.hpp"
#include "peer/mpi/communicator.hpp"

namespace peer {
namespace mpi {

/// A layout as the text ranks compare: every tensor's kind, name, shape, storage and offset, one per line;
/// a table named in `sharded` is "sharded" and its rows left out (each rank holds its own shard).
inline std::string layout_text(const ParameterLayout& layout, const std::vector<std::string>& sharded = {}) {
  std::string out = "scalar_bytes " + std::to_string(layout.scalar_bytes()) + "\n";
  const char* kinds[] = {"dense", "buffer", "table"};
  int k = 0;
  for (const auto* list : {&layout.dense(), &layout.buffers(), &layout.tables()}) {
    for (const auto& s : *list) {
      const bool shard = k == 2 && std::find(sharded.begin(), sharded.end(), s.name) != sharded.end();
      out += std::string(kinds[k]) + " " + s.name + (shard ? " sharded [rows, " : " [" + std::to_string(s.rows) + ", ") +
             std::to_string(s.cols) + "] " + to_string(s.storage) + " at " + std::to_string(s.offset) + "\n";
    }
    ++k;
  }
  return out;
}

/// Bytes this rank sent in one all_reduce (what docs/distributed.md's model counts).
struct Traffic {
  std::int64_t dense_bytes = 0;  ///< reduce-scatter and all-gather of the flat dense buffer
  std::int64_t table_bytes = 0;  ///< this rank's ids and rows, to every other rank
  std::int64_t table_rows = 0;   ///< rows this rank contributed
  std::int64_t merged_rows = 0;  ///< rows of the coalesced gradient (every rank holds them after the call)
};

template <typename Scalar>
class DataParallel {
 public:
  /// Collective: checks that every rank has the same layout (std::invalid_argument on every rank naming
  /// the first tensor that differs). `sharded` names the tables split by rows over the ranks (an
  /// expert-sharded layer's, peer/mpi/expert_sharded.hpp): their gradients are complete on their owners
  /// already, so all_reduce, broadcast and require_identical leave them alone, and gradient_norm adds up
  /// their shards. Each must be a table of the layout.
  DataParallel(const Communicator& comm, const ParameterLayout& layout, std::vector<std::string> sharded = {})
      : comm_(comm), layout_(layout), sharded_(std::move(sharded)) {
    for (const auto& name : sharded_) {  // the same names on every rank are checked below, with the layout
      bool found = false;
      for (const auto& s : layout_.tables()) found = found || s.name == name;
      if (!found) detail::throw_invalid("DataParallel sharded table", "'" + name + "'", "must name a table of the layout");
    }
    is_sharded_.resize(layout_.tables().size());
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      is_sharded_[t] = std::find(sharded_.begin(), sharded_.end(), layout_.tables()[t].name) != sharded_.end() ? 1 : 0;
    }
    require_same(comm_, "the parameter layout", layout_text(layout_, sharded_));
  }

  const Communicator& communicator() const { return comm_; }
  /// What the last all_reduce() sent from this rank.
  const Traffic& last_traffic() const { return traffic_; }

  /// Collective: `grads` (this rank's) becomes the sum over all ranks' gradients, identical on every rank
  /// (see the file comment for the order). Throws on every rank, before any exchange, when a table's
  /// updates are fused or a rank's gradients have another layout.
  void all_reduce(Gradients<Scalar>& grads) {
    const bool wrong_layout = grads.layout() != layout_;
    std::string fused;
    for (std::size_t t = 0; t < layout_.tables().size() && !wrong_layout; ++t) {
      if (is_sharded_[t] == 0 && grads.table(TableHandle{static_cast<int>(t)}).sink() != nullptr) fused = layout_.tables()[t].name;
    }
    // Agreed by all ranks first, so that a refusal on one rank is a refusal on every rank.
    const std::int64_t problem = comm_.max(wrong_layout ? 2 : fused.empty() ? 0 : 1);
    if (problem == 2) throw std::invalid_argument("peer::mpi::DataParallel::all_reduce: gradients of another layout than the DataParallel's (on some rank)");
    if (problem == 1) {
      throw std::logic_error("peer::mpi::DataParallel::all_reduce: table updates are fused into the backward (fuse_table_updates" +
                             std::string(fused.empty() ? ", on another rank" : ": table '" + fused + "'") +
                             "), so no table gradient is stored to exchange; train data-parallel with the unfused step");
    }
    traffic_ = Traffic();
    reduce_dense(grads.dense_data(), layout_.dense_size());
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      if (is_sharded_[t] == 0) reduce_table(grads.table(TableHandle{static_cast<int>(t)}));
    }
  }

  /// Collective: the global L2 norm of gradients after all_reduce (peer::gradient_norm of the whole
  /// model): the replicated tensors' part, the same on every rank, plus every rank's part of the sharded
  /// tables, added in rank order. The same value on every rank.
  double gradient_norm(const Gradients<Scalar>& grads) {
    if (grads.layout() != layout_) throw std::invalid_argument("peer::mpi::DataParallel::gradient_norm: gradients of another layout than the DataParallel's");
    double replicated = detail::sum_of_squares(grads.dense_data(), layout_.dense_size());
    double mine[2] = {0.0, 0.0};  // this rank's part of the sharded tables; 1 when a table's updates are fused
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      const auto& g = grads.table(TableHandle{static_cast<int>(t)});
      if (g.sink() != nullptr) mine[1] = 1.0;
      (is_sharded_[t] != 0 ? mine[0] : replicated) += detail::sum_of_squares(g.values().data(), g.values().size());
    }
    const std::vector<double> parts = comm_.all_gather(mine, 2);
    for (int r = 0; r < comm_.size(); ++r) {
      if (parts[static_cast<std::size_t>(2 * r + 1)] != 0.0) {
        throw std::logic_error("peer::mpi::DataParallel::gradient_norm: table updates are fused into the backward on rank " +
                               std::to_string(r) + ", so a table gradient is never stored and a global norm cannot include it");
      }
      replicated += parts[static_cast<std::size_t>(2 * r)];
    }
    return std::sqrt(replicated);
  }

  /// Collective: peer::clip_gradient_norm with the global norm of gradient_norm(); the same scale on every
  /// rank. Returns the norm before clipping.
  double clip_gradient_norm(Gradients<Scalar>& grads, double max_norm) {
    if (!(max_norm > 0.0)) detail::throw_invalid("clip_gradient_norm max_norm", max_norm, "must be > 0");
    const double norm = gradient_norm(grads);
    if (norm > max_norm) detail::scale_gradients(grads, static_cast<Scalar>(max_norm / norm));
    return norm;
  }

  /// Collective: root's parameters (dense tensors, buffers and every table) on every rank, for starting
  /// all replicas from one rank's initialization or checkpoint. Tables travel in pieces of at most 1 GiB.
  void broadcast(Parameters<Scalar>& params, int root = 0) {
    check_params(params, "broadcast");
    bcast_bytes(params.dense_data(), layout_.dense_size() * static_cast<Index>(sizeof(Scalar)), root);
    broadcast_buffers(params, root);
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      if (is_sharded_[t] != 0) continue;  // each rank's own rows
      RowTable<Scalar>& table = params.table(TableHandle{static_cast<int>(t)});
      void* data = table.is_bf16() ? static_cast<void*>(table.bf16_data()) : static_cast<void*>(table.data());
      bcast_bytes(data, table.bytes(), root);
    }
  }

  /// Collective: root's buffers (batch-norm running statistics) on every rank.
  void broadcast_buffers(Parameters<Scalar>& params, int root = 0) {
    check_params(params, "broadcast_buffers");
    bcast_bytes(params.buffer_data(), layout_.buffer_size() * static_cast<Index>(sizeof(Scalar)), root);
  }

  /// Collective: throws std::runtime_error (Error) on every rank when the replicas differ: a CRC-32C of
  /// every tensor's bytes, compared; the message names the first tensor that differs and a rank.
  void require_identical(const Parameters<Scalar>& params) {
    check_params(params, "require_identical");
    std::string text;
    const auto sb = static_cast<std::size_t>(sizeof(Scalar));
    for (const auto& s : layout_.dense()) text += s.name + " " + std::to_string(crc32c(params.dense_data() + s.offset, static_cast<std::size_t>(s.size()) * sb)) + "\n";
    for (const auto& s : layout_.buffers()) text += s.name + " " + std::to_string(crc32c(params.buffer_data() + s.offset, static_cast<std::size_t>(s.size()) * sb)) + "\n";
    for (std::size_t t = 0; t < layout_.tables().size(); ++t) {
      if (is_sharded_[t] != 0) continue;  // each rank's own rows
      const RowTable<Scalar>& table = params.table(TableHandle{static_cast<int>(t)});
      text += layout_.tables()[t].name + " " + std::to_string(crc32c(table.storage_data(), static_cast<std::size_t>(table.bytes()))) + "\n";
    }
    try {
      require_same(comm_, "the replicas' parameters (CRC-32C per tensor)", text);
    } catch (const std::invalid_argument& e) {
      throw Error(e.what());
    }
  }

 private:
  void check_params(const Parameters<Scalar>& params, const char* where) const {
    if (params.layout() != layout_) {
      throw std::invalid_argument(std::string("peer::mpi::DataParallel::") + where + ": parameters of another layout than the DataParallel's");
    }
  }

  void bcast_bytes(void* data, Index bytes, int root) {
    constexpr Index kPiece = Index{1} << 30;
    auto* p = static_cast<unsigned char*>(data);
    for (Index off = 0; off < bytes; off += kPiece) {
      const int n = static_cast<int>(std::min(kPiece, bytes - off));
      check(MPI_Bcast(p + off, n, MPI_BYTE, root, comm_.comm()), "MPI_Bcast");
    }
  }

  // Chunk r of a buffer of `size` scalars: [begin(r), begin(r + 1)).
  Index chunk_begin(Index size, int r) const { return size * r / comm_.size(); }

  // The flat dense buffer summed over ranks in rank order (reduce-scatter by MPI_Alltoallv, then
  // MPI_Allgatherv of the summed chunks).
  void reduce_dense(Scalar* g, Index size) {
    const int p = comm_.size(), me = comm_.rank();
    if (size == 0 || p == 1) return;
    std::vector<int> send_counts(static_cast<std::size_t>(p)), send_offsets(static_cast<std::size_t>(p)),
        recv_counts(static_cast<std::size_t>(p)), recv_offsets(static_cast<std::size_t>(p));
    const Index mine = chunk_begin(size, me + 1) - chunk_begin(size, me);
    for (int r = 0; r < p; ++r) {
      send_offsets[static_cast<std::size_t>(r)] = Communicator::to_int(static_cast<std::size_t>(chunk_begin(size, r)), "dense offset");
      send_counts[static_cast<std::size_t>(r)] = Communicator::to_int(static_cast<std::size_t>(chunk_begin(size, r + 1) - chunk_begin(size, r)), "dense count");
      recv_counts[static_cast<std::size_t>(r)] = static_cast<int>(mine);
      recv_offsets[static_cast<std::size_t>(r)] = static_cast<int>(mine * r);
    }
    chunks_.resize(static_cast<std::size_t>(mine * p));
    check(MPI_Alltoallv(g, send_counts.data(), send_offsets.data(), datatype<Scalar>(), chunks_.data(), recv_counts.data(),
                        recv_offsets.data(), datatype<Scalar>(), comm_.comm()),
          "MPI_Alltoallv");
    Scalar* sum = g + chunk_begin(size, me);  // this rank's chunk: rank 0's + rank 1's + ... in that order
    std::memcpy(sum, chunks_.data(), static_cast<std::size_t>(mine) * sizeof(Scalar));
    for (int r = 1; r < p; ++r) {
      const Scalar* part = chunks_.data() + mine * r;
      parallel_for(mine, 1 << 14, [&](Index b, Index e, int) {
        for (Index i = b; i < e; ++i) sum[i] += part[i];
      });
    }
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, datatype<Scalar>(), g, send_counts.data(), send_offsets.data(), datatype<Scalar>(),
                         comm_.comm()),
          "MPI_Allgatherv");
    traffic_.dense_bytes += static_cast<std::int64_t>((size - mine) + mine * (p - 1)) * static_cast<std::int64_t>(sizeof(Scalar));
  }

  // A row-sparse gradient summed over ranks: every rank's (ids, rows) gathered, then coalesced in rank
  // order into the union of the ids (ascending).
  void reduce_table(RowSparseGrad<Scalar>& grad) {
    const int p = comm_.size();
    const Index cols = grad.cols();
    traffic_.table_rows += grad.size();
    if (p == 1) {
      traffic_.merged_rows += grad.size();
      return;
    }
    comm_.all_gather_v(grad.ids(), ids_, id_counts_, id_offsets_);
    // The rows go straight from the gradient's storage (contiguous: rows of cols values).
    comm_.all_gather_v(grad.values().data(), static_cast<std::size_t>(grad.size() * cols), rows_, row_counts_, row_offsets_);
    traffic_.table_bytes += static_cast<std::int64_t>(p - 1) *
                            (grad.size() * static_cast<std::int64_t>(sizeof(ExpertId)) + grad.size() * cols * static_cast<std::int64_t>(sizeof(Scalar)));
    // The union of the ids, ascending.
    merged_ = ids_;
    std::sort(merged_.begin(), merged_.end());
    merged_.erase(std::unique(merged_.begin(), merged_.end()), merged_.end());
    traffic_.merged_rows += static_cast<std::int64_t>(merged_.size());
    filled_.assign(merged_.size(), 0);
    MatrixMap<Scalar> out = grad.reset(merged_);
    for (int r = 0; r < p; ++r) {  // rank order: each row's sum is (rank 0's + rank 1's) + ...
      const ExpertId* ids = ids_.data() + id_offsets_[static_cast<std::size_t>(r)];
      const Scalar* rows = rows_.data() + row_offsets_[static_cast<std::size_t>(r)];
      parallel_for(id_counts_[static_cast<std::size_t>(r)], 256, [&](Index b, Index e, int) {
        for (Index i = b; i < e; ++i) {  // a rank's ids are distinct: no two threads write one row
          const auto at = static_cast<Index>(std::lower_bound(merged_.begin(), merged_.end(), ids[i]) - merged_.begin());
          Scalar* dst = out.row(at).data();
          const Scalar* src = rows + i * cols;
          if (filled_[static_cast<std::size_t>(at)] == 0) {
            std::memcpy(dst, src, static_cast<std::size_t>(cols) * sizeof(Scalar));
            filled_[static_cast<std::size_t>(at)] = 1;
          } else {
            for (Index c = 0; c < cols; ++c) dst[c] += src[c];
          }
        }
      });
    }
  }

  Communicator comm_;
  ParameterLayout layout_;
  std::vector<std::string> sharded_;
  std::vector<unsigned char> is_sharded_;  // per table
  Traffic traffic_;
  std::vector<Scalar> chunks_, rows_;
  std::vector<ExpertId> ids_, merged_;
  std::vector<int> id_counts_, id_offsets_, row_counts_, row_offsets_;
  std::vector<unsigned char> filled_;
};

}  // namespace mpi
}  // namespace peer

#endif  // PEER_MPI_DATA_PARALLEL_HPP
