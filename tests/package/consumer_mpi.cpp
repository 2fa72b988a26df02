// The installed package's peer::mpi: one data-parallel all-reduce on one rank (an MPI singleton).
#include <peer/mpi/data_parallel.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [] {
    peer::ParameterLayout layout(4);
    layout.add_dense("w", 2, 3);
    layout.add_table("experts", 10, 4);
    peer::Gradients<float> grads(layout);
    grads.dense_data()[0] = 1.5f;
    const peer::mpi::Communicator comm;
    peer::mpi::DataParallel<float> dp(comm, layout);
    dp.all_reduce(grads);
    const bool ok = grads.dense_data()[0] == 1.5f * static_cast<float>(comm.size());
    std::printf("consumer_mpi: %s\n", ok ? "ok" : "wrong sum");
    return ok ? 0 : 1;
  });
  MPI_Finalize();
  return code;
}
