// Data-parallel PEER training over MPI (peer/mpi/data_parallel.hpp) on the demo's memorization task:
//   mpirun -np 2 build/dev/examples/peer_mpi_train      (and -np 1 for the single-process curve)
// Every step's global batch of B pairs is split into P slices, one per rank; gradients are all-reduced
// (dense: one flat buffer; the expert table: (ids, rows) only), every rank steps the same AdamW, and
// rank 0 prints the evaluation over all pairs, the step time and the bytes each rank sent per step.
// It checks itself (exit status 1): the replicas are identical at the end and the loss fell.
#include <peer/mpi/data_parallel.hpp>
#include <peer/peer.hpp>

#include "memorize.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using Mat = peer::RowMatrix<float>;

struct Options {
  long pairs = 8192, classes = 256, dim = 64, sub_keys = 32, steps = 600, batch = 256, every = 100;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](long& field) { field = demo::integer_option(argc, argv, i, 1); };
    if (a == "--pairs") value(o.pairs);
    else if (a == "--steps") value(o.steps);
    else if (a == "--batch") value(o.batch);
    else if (a == "--every") value(o.every);
    else if (a == "--sub-keys") value(o.sub_keys);
    else throw std::invalid_argument("unknown option " + a + " (options: --pairs --steps --batch --every --sub-keys)");
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [&]() -> int {
    const peer::mpi::Communicator comm;
    const Options o = parse(argc, argv);
    const int p = comm.size(), me = comm.rank();
    if (o.batch % p != 0) throw std::invalid_argument("--batch " + std::to_string(o.batch) + " must be a multiple of the rank count " + std::to_string(p));
    const long local = o.batch / p;
    peer::PeerConfig config;
    config.model_dim = o.dim;
    config.key_dim = 32;
    config.num_heads = 4;
    config.top_k = 8;
    config.sub_key_top_k = 8;
    config.num_experts = o.sub_keys * o.sub_keys;
    peer::mpi::require_same(comm, "PeerConfig", peer::mpi::fields_text(config.to_fields()));
    const peer::PeerLayer<float> layer(config);
    peer::Linear<float> readout(o.dim, o.classes, peer::Bias::kLearned);
    // One model: the PEER layer and the readout in one ModelLayout, so one all-reduce covers both.
    peer::ModelLayout model;
    const int l_peer = model.add_layer("peer.", layer.layout());
    peer::ParameterLayout readout_layout(4);
    readout.register_parameters(readout_layout, "");
    const int l_readout = model.add_layer("readout.", readout_layout);
    peer::Parameters<float> params(model.layout());
    peer::Gradients<float> grads(model.layout());
    peer::LayerViews<float> views(model, params, grads);
    layer.initialize(views.params(l_peer), 1);
    readout.initialize(views.params(l_readout), 1);
    peer::mpi::DataParallel<float> dp(comm, model.layout());
    dp.broadcast(params);
    peer::Adam<float> adam(model.layout(), peer::default_param_groups(3e-3, peer::LrSchedule::warmup(50), 1e-2),
                           peer::AdamConfig::adamw());

    const demo::PairSet data(o.pairs, o.dim, o.classes, 7);
    demo::Batches batches(data, o.batch);
    peer::PeerLayer<float>::Cache cache;
    peer::Linear<float>::Scratch scratch;
    Mat x, h(local, o.dim), logits(local, o.classes), dlogits, dh, none;
    std::vector<int> labels;
    if (me == 0) {
      std::printf("data-parallel PEER on %d rank(s): %ld experts, D = %ld, global batch %ld (%ld per rank), %ld pairs\n", p,
                  config.num_experts, o.dim, o.batch, local, o.pairs);
      std::printf("   step   eval loss   accuracy   ms/step   sent/step per rank (dense + table)\n");
    }
    double first_loss = -1, last_loss = 0, seconds = 0;
    std::int64_t dense_bytes = 0, table_bytes = 0;
    for (long step = 1; step <= o.steps; ++step) {
      Mat global;
      batches.next(step, global, labels);
      x = global.middleRows(me * local, local);
      const std::vector<int> mine(labels.begin() + me * local, labels.begin() + (me + 1) * local);
      const auto start = std::chrono::steady_clock::now();
      layer.forward(views.params(l_peer), x, h, cache, peer::Mode::kTrain);
      readout.forward(views.params(l_readout), h, logits);
      long correct = 0;
      demo::softmax_cross_entropy(logits, mine, dlogits, correct);
      dlogits /= static_cast<float>(p);  // the mean over the global batch, not the rank's slice
      grads.zero();
      dh.setZero(local, o.dim);
      readout.backward(views.params(l_readout), h, dlogits, dh, views.grads(l_readout), scratch);
      layer.backward(views.params(l_peer), cache, dh, none, views.grads(l_peer));
      dp.all_reduce(grads);
      adam.step(params, grads);
      dp.broadcast_buffers(params);
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      dense_bytes += dp.last_traffic().dense_bytes;
      table_bytes += dp.last_traffic().table_bytes;
      if (step % o.every == 0 || step == o.steps) {
        // Every replica is the same: rank 0 evaluates all pairs on its own.
        if (me == 0) {
          double loss = 0;
          long right = 0;
          for (long b0 = 0; b0 < o.pairs; b0 += 512) {
            const long n = std::min(512L, o.pairs - b0);
            Mat hb(n, o.dim), lb(n, o.classes), dl;
            const std::vector<int> yb(data.labels.begin() + b0, data.labels.begin() + b0 + n);
            layer.forward(views.params(l_peer), Mat(data.keys.middleRows(b0, n)), hb, cache, peer::Mode::kEval);
            readout.forward(views.params(l_readout), hb, lb);
            long c = 0;
            loss += demo::softmax_cross_entropy(lb, yb, dl, c) * static_cast<double>(n);
            right += c;
          }
          loss /= static_cast<double>(o.pairs);
          if (first_loss < 0) first_loss = loss;
          last_loss = loss;
          std::printf("%7ld   %9.4f   %7.1f%%   %7.2f   %.0f + %.0f KiB\n", step, loss, 100.0 * static_cast<double>(right) / static_cast<double>(o.pairs),
                      1e3 * seconds / static_cast<double>(step), static_cast<double>(dense_bytes) / static_cast<double>(step) / 1024.0,
                      static_cast<double>(table_bytes) / static_cast<double>(step) / 1024.0);
        }
      }
    }
    dp.require_identical(params);  // throws on every rank if the replicas drifted apart
    const int ok = me != 0 || (first_loss > 0 && last_loss < first_loss);
    if (me == 0) std::printf(ok ? "replicas identical on every rank; the loss fell\n" : "FAIL: the loss did not fall\n");
    return ok ? 0 : 1;
  });
  MPI_Finalize();
  return code;
}
