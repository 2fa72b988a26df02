// Checks for the MPI tests: they only count failures (a failed check must not change which collectives a
// rank enters); the ranks agree on the count at the end (finish()).
#ifndef PEER_TESTS_MPI_CHECK_HPP
#define PEER_TESTS_MPI_CHECK_HPP

#include <peer/mpi/communicator.hpp>
#include <peer/peer.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace peer_mpi_test {

using Index = peer::Index;
template <typename S>
using Mat = peer::RowMatrix<S>;

inline int failures = 0;
inline int rank_ = 0;

inline void check(bool ok, const std::string& what) {
  if (ok) return;
  ++failures;
  std::fprintf(stderr, "FAILED on rank %d: %s\n", rank_, what.c_str());
}

template <typename S>
Mat<S> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  Mat<S> m(rows, cols);
  const peer::CounterRng rng(seed, 1);
  std::vector<double> v(static_cast<std::size_t>(rows * cols));
  peer::fill_normal(rng, 0, rows * cols, 1.0, v.data());
  for (Index i = 0; i < rows * cols; ++i) m.data()[i] = static_cast<S>(v[static_cast<std::size_t>(i)]);
  return m;
}

template <typename S>
std::vector<unsigned char> bytes_of(const peer::Parameters<S>& p) {
  std::vector<unsigned char> out;
  const auto* d = reinterpret_cast<const unsigned char*>(p.dense_data());
  out.insert(out.end(), d, d + p.layout().dense_size() * static_cast<Index>(sizeof(S)));
  const auto* b = reinterpret_cast<const unsigned char*>(p.buffer_data());
  out.insert(out.end(), b, b + p.layout().buffer_size() * static_cast<Index>(sizeof(S)));
  for (std::size_t t = 0; t < p.layout().tables().size(); ++t) {
    const auto& table = p.table(peer::TableHandle{static_cast<int>(t)});
    const auto* c = static_cast<const unsigned char*>(table.storage_data());
    out.insert(out.end(), c, c + table.bytes());
  }
  return out;
}

template <typename E, typename F>
void expect_error_everywhere(const std::string& text, F&& call) {
  std::string got = "no exception";
  try {
    call();
  } catch (const E& e) {
    got = e.what();
  }
  check(got.find(text) != std::string::npos, "expected an error containing '" + text + "', got: " + got);
}

// Collective: every rank's failure count agreed; prints the verdict on rank 0; the exit code.
inline int finish(const peer::mpi::Communicator& comm, const char* what) {
  const std::int64_t worst = comm.max(failures);
  if (comm.rank() == 0) std::printf("%s %s on %d ranks\n", what, worst == 0 ? "passed" : "FAILED", comm.size());
  return worst == 0 ? 0 : 1;
}

}  // namespace peer_mpi_test

#endif  // PEER_TESTS_MPI_CHECK_HPP
