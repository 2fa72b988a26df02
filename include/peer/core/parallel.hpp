// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_PARALLEL_HPP
#define PEER_CORE_PARALLEL_HPP

/// \file
/// The one parallel loop of the library. Every kernel splits its work into chunks whose boundaries depend
/// only on the problem size and a fixed grain, never on the thread count, and every chunk computes its
/// own outputs from scratch in a fixed order. So results are bitwise identical for any number of threads.
/// Reductions across chunks are done afterwards, in chunk order, by the caller.
///
/// OpenMP is used when the user compiles with it (-fopenmp); the library follows the caller's thread
/// count (OMP_NUM_THREADS, omp_set_num_threads) and never sets it. Called from inside an existing
/// parallel region (for example the user's own loop over sequences), the loop runs serially.
/// A future backend (a thread pool, or one rank of an MPI job) replaces only this header.

#include <algorithm>

#include "peer/core/types.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace peer {

/// Number of threads parallel_for may use from here: the size to give per-thread scratch.
inline int parallel_threads() {
#if defined(_OPENMP)
  if (omp_in_parallel()) return 1;
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// Calls body(begin, end, thread) once for every chunk [c * grain, min((c + 1) * grain, count)), where
/// thread < parallel_threads() identifies the calling thread (for its scratch). Chunks may run in any
/// order and concurrently; body must not throw (check everything before the loop).
template <typename Body>
void parallel_for(Index count, Index grain, Body&& body) {
  if (count <= 0) return;
  grain = std::max<Index>(1, grain);
  const Index chunks = (count + grain - 1) / grain;
#if defined(_OPENMP)
  if (chunks > 1 && parallel_threads() > 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (Index c = 0; c < chunks; ++c) {
      body(c * grain, std::min(count, (c + 1) * grain), omp_get_thread_num());
    }
    return;
  }
#endif
  for (Index c = 0; c < chunks; ++c) body(c * grain, std::min(count, (c + 1) * grain), 0);
}

}  // namespace peer

#endif  // PEER_CORE_PARALLEL_HPP
