// SPDX-License-Identifier: MIT
#ifndef PEER_MPI_COMMUNICATOR_HPP
#define PEER_MPI_COMMUNICATOR_HPP

/// \file
/// The MPI side of peer (optional: target peer::mpi, CMake option PEER_WITH_MPI; Debian's Open MPI):
/// a communicator whose calls throw instead of returning codes, agreement checks that fail on every rank
/// at once, and run_or_abort(), which turns an exception on one rank into the end of every rank with its
/// message instead of a hang.
///
/// Failure model. A collective call only returns when every rank has entered it, so a rank that throws
/// while the others wait in a collective would leave them waiting forever. Two rules prevent that:
/// - what every rank can check together (configurations, layouts, shapes) is checked collectively
///   (require_same): every rank learns the outcome and throws the same exception, so all leave together;
/// - anything else that fails on one rank (a file it cannot read, an input of its own) ends the job:
///   run_or_abort() catches the exception, prints "peer: rank r of P: <message>" to stderr and calls
///   MPI_Abort, which makes mpirun end every rank (tests/mpi proves both finish within their timeouts).

#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/fields.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace mpi {

/// An MPI call failed (its error class's text), or ranks disagree on something they must share.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Throws Error naming the call and MPI's text for `code` unless code == MPI_SUCCESS.
inline void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error(std::string("peer::mpi: ") + call + " failed: " + std::string(text, static_cast<std::size_t>(length)));
}

/// The MPI datatype of a Scalar.
template <typename Scalar>
MPI_Datatype datatype();
template <>
inline MPI_Datatype datatype<float>() { return MPI_FLOAT; }
template <>
inline MPI_Datatype datatype<double>() { return MPI_DOUBLE; }
template <>
inline MPI_Datatype datatype<std::int32_t>() { return MPI_INT32_T; }
template <>
inline MPI_Datatype datatype<std::int64_t>() { return MPI_INT64_T; }
template <>
inline MPI_Datatype datatype<char>() { return MPI_CHAR; }

/// A view of an MPI communicator (not owned: the caller initializes and finalizes MPI). Construction sets
/// its error handler to MPI_ERRORS_RETURN, so failed calls come back here and are thrown as Error.
class Communicator {
 public:
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized == 0) throw Error("peer::mpi: MPI is not initialized (call MPI_Init first)");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  /// Every rank's `count` values of `mine`, rank by rank (the same result on every rank).
  template <typename T>
  std::vector<T> all_gather(const T* mine, int count) const {
    std::vector<T> out(static_cast<std::size_t>(count) * static_cast<std::size_t>(size_));
    check(MPI_Allgather(mine, count, datatype<T>(), out.data(), count, datatype<T>(), comm_), "MPI_Allgather");
    return out;
  }

  /// Every rank's `mine` (any length), concatenated rank by rank into `out`; `counts` and `offsets` get
  /// each rank's length and start. The same on every rank.
  template <typename T>
  void all_gather_v(const std::vector<T>& mine, std::vector<T>& out, std::vector<int>& counts, std::vector<int>& offsets) const {
    all_gather_v(mine.data(), mine.size(), out, counts, offsets);
  }
  /// The same from `size` values at `mine` (sent from there, without a copy).
  template <typename T>
  void all_gather_v(const T* mine, std::size_t size, std::vector<T>& out, std::vector<int>& counts, std::vector<int>& offsets) const {
    const int n = to_int(size, "all_gather_v count");
    counts = all_gather(&n, 1);
    offsets.assign(static_cast<std::size_t>(size_), 0);
    std::int64_t total = 0;
    for (int r = 0; r < size_; ++r) {
      offsets[static_cast<std::size_t>(r)] = to_int(static_cast<std::size_t>(total), "all_gather_v offset");
      total += counts[static_cast<std::size_t>(r)];
    }
    out.resize(static_cast<std::size_t>(total));
    check(MPI_Allgatherv(mine, n, datatype<T>(), out.data(), counts.data(), offsets.data(), datatype<T>(), comm_),
          "MPI_Allgatherv");
  }

  /// The largest of every rank's value.
  std::int64_t max(std::int64_t mine) const {
    std::int64_t out = 0;
    check(MPI_Allreduce(&mine, &out, 1, MPI_INT64_T, MPI_MAX, comm_), "MPI_Allreduce");
    return out;
  }

  void barrier() const { check(MPI_Barrier(comm_), "MPI_Barrier"); }

  /// MPI counts are int: refuses a larger one with the quantity's name.
  static int to_int(std::size_t n, const char* what) {
    if (n > static_cast<std::size_t>(INT32_MAX)) detail::throw_invalid(std::string("peer::mpi: ") + what, n, "must be < 2^31 (MPI counts are int)");
    return static_cast<int>(n);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

/// Collective: every rank passes its `text` (a configuration's fields as text, a layout's description);
/// if any rank's differs from rank 0's, EVERY rank throws the same std::invalid_argument naming `what`,
/// the first rank that differs and the first line where it does. Nothing is thrown when all agree.
inline void require_same(const Communicator& comm, const std::string& what, const std::string& text) {
  std::vector<char> mine(text.begin(), text.end()), all;
  std::vector<int> counts, offsets;
  comm.all_gather_v(mine, all, counts, offsets);
  const std::string first(all.data(), static_cast<std::size_t>(counts[0]));
  for (int r = 1; r < comm.size(); ++r) {
    const std::string other(all.data() + offsets[static_cast<std::size_t>(r)], static_cast<std::size_t>(counts[static_cast<std::size_t>(r)]));
    if (other == first) continue;
    // The first differing line of the two texts.
    std::size_t a = 0, b = 0;
    std::string la, lb;
    while (a <= first.size() || b <= other.size()) {
      const std::size_t ea = first.find('\n', a), eb = other.find('\n', b);
      la = first.substr(a, ea == std::string::npos ? std::string::npos : ea - a);
      lb = other.substr(b, eb == std::string::npos ? std::string::npos : eb - b);
      if (la != lb || ea == std::string::npos || eb == std::string::npos) break;
      a = ea + 1;
      b = eb + 1;
    }
    throw std::invalid_argument("peer::mpi: " + what + " differs between ranks: rank 0 has '" + la + "', rank " +
                                std::to_string(r) + " has '" + lb + "'");
  }
}

/// Collective: runs body() on every rank, then every rank learns whether it threw anywhere. If it did,
/// EVERY rank throws std::runtime_error: a rank that failed with its own message, the others with
/// "peer::mpi: rank r failed: <r's message>" for the first rank r that failed. For work that may fail on
/// some ranks only (files) and must not leave them in different states.
template <typename Body>
void all_or_none(const Communicator& comm, Body&& body) {
  std::string mine;
  try {
    body();
  } catch (const std::exception& e) {
    mine = e.what()[0] == '\0' ? std::string("failed") : std::string(e.what());
  }
  const int failed = mine.empty() ? 0 : 1;
  const std::vector<int> flags = comm.all_gather(&failed, 1);
  int first = -1;
  for (int r = 0; r < comm.size() && first < 0; ++r) {
    if (flags[static_cast<std::size_t>(r)] != 0) first = r;
  }
  if (first < 0) return;
  // Only the first failing rank's text travels.
  std::vector<char> text(first == comm.rank() ? mine.begin() : mine.end(), mine.end()), all;
  std::vector<int> counts, offsets;
  comm.all_gather_v(text, all, counts, offsets);
  if (!mine.empty()) throw std::runtime_error(mine);
  throw std::runtime_error("peer::mpi: rank " + std::to_string(first) + " failed: " +
                           std::string(all.data() + offsets[static_cast<std::size_t>(first)], static_cast<std::size_t>(counts[static_cast<std::size_t>(first)])));
}

/// Fields (a configuration's to_fields()) as the text require_same compares: one "key = value" per line.
inline std::string fields_text(const Fields& fields) {
  std::string out;
  for (const auto& f : fields) out += f.first + " = " + f.second + "\n";
  return out;
}

/// Runs body(); returns its result (0 when it returns void). An exception escaping it on any rank prints
/// "peer: rank r of P: <message>" to stderr and calls MPI_Abort(comm, 1): every rank of the job ends with
/// that message instead of waiting in a collective for the rank that left.
template <typename Body>
int run_or_abort(MPI_Comm comm, Body&& body) {
  try {
    if constexpr (std::is_void<decltype(body())>::value) {
      body();
      return 0;
    } else {
      return static_cast<int>(body());
    }
  } catch (const std::exception& e) {
    int rank = -1, size = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    std::fprintf(stderr, "peer: rank %d of %d: %s\n", rank, size, e.what());
    std::fflush(stderr);
    MPI_Abort(comm, 1);
    return 1;
  }
}

}  // namespace mpi
}  // namespace peer

#endif  // PEER_MPI_COMMUNICATOR_HPP
