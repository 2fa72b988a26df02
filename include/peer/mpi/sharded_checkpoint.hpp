// SPDX-License-Identifier: MIT
#ifndef PEER_MPI_SHARDED_CHECKPOINT_HPP
#define PEER_MPI_SHARDED_CHECKPOINT_HPP

/// \file
/// Sharded checkpoints over MPI: every rank writes its shard file, rank 0 the index, and every rank loads
/// its rows of a checkpoint written by any number of ranks (peer/io/sharded_checkpoint.hpp has the files
/// and the row placement). The ranks must see the same file system at the same path.
///
/// Both calls are collective and all-or-none: a failure on any rank (an unwritable directory, a missing
/// or mismatched shard file, a configuration that differs) makes every rank throw std::runtime_error with
/// that rank's message (all_or_none), and a load writes no rank's memory unless every rank's validation
/// passed. A save that fails leaves no index for the new save (the previous index, if any, then names
/// shards of two saves and is refused on load rather than loaded mixed).

#include <string>
#include <vector>

#include "peer/io/sharded_checkpoint.hpp"
#include "peer/mpi/communicator.hpp"

namespace peer {
namespace mpi {

// Throws unless `ckpt` was built for this rank of `comm`.
inline void check_shard_place(const Communicator& comm, const ShardedCheckpoint& ckpt) {
  if (ckpt.rank() != comm.rank() || ckpt.ranks() != comm.size()) {
    throw std::invalid_argument("peer::mpi: the ShardedCheckpoint is rank " + std::to_string(ckpt.rank()) + " of " +
                                std::to_string(ckpt.ranks()) + " but this process is rank " + std::to_string(comm.rank()) +
                                " of " + std::to_string(comm.size()) + " (build it as ShardedCheckpoint(comm.rank(), comm.size()))");
  }
}

/// Collective: writes every rank's shard of `ckpt` and then the index at `path`, all with one save id
/// (rank 0's, broadcast).
inline void save_sharded_checkpoint(const Communicator& comm, const ShardedCheckpoint& ckpt, const std::string& path) {
  all_or_none(comm, [&] { check_shard_place(comm, ckpt); });
  std::vector<char> id(16, '0');
  if (comm.rank() == 0) {
    const std::string fresh = ShardedCheckpoint::new_save_id();
    id.assign(fresh.begin(), fresh.end());
  }
  check(MPI_Bcast(id.data(), static_cast<int>(id.size()), MPI_CHAR, 0, comm.comm()), "MPI_Bcast");
  const std::string save_id(id.begin(), id.end());
  all_or_none(comm, [&] { ckpt.save_shard(path, save_id); });
  all_or_none(comm, [&] {
    if (comm.rank() == 0) ckpt.save_index(path, save_id);
  });
}

/// Collective: every rank validates its part of the checkpoint at `path` (written by any number of ranks),
/// the ranks agree, and only then does each fill its registered memory.
inline void load_sharded_checkpoint(const Communicator& comm, const ShardedCheckpoint& ckpt, const std::string& path) {
  ShardedCheckpoint::Plan plan;
  all_or_none(comm, [&] {
    check_shard_place(comm, ckpt);
    plan = ckpt.prepare(path);
  });
  all_or_none(comm, [&] { ckpt.fill(plan); });
}

}  // namespace mpi
}  // namespace peer

#endif  // PEER_MPI_SHARDED_CHECKPOINT_HPP
