// PEER training over MPI on the demo's memorization task, data-parallel (peer/mpi/data_parallel.hpp) or
// with the expert table sharded by rows over the ranks (--sharded, peer/mpi/expert_sharded.hpp):
//   mpirun -np 2 build/dev/examples/peer_mpi_train [--sharded]   (and -np 1 for the single-process curve)
// Every step's global batch of B pairs is split into P slices, one per rank. Data parallel: gradients are
// all-reduced (dense: one flat buffer; the expert table: (ids, rows) only). Sharded: the replicated tensors
// are all-reduced, each rank holds and updates 1/P of the table, tokens travel to the rows' owners. Every
// rank steps AdamW; rank 0 prints the evaluation over all pairs, the step time, the bytes each rank sent
// per step, the table bytes a rank holds and the largest peak resident set of the ranks. It checks itself
// (exit status 1): the replicated tensors are identical on every rank at the end and the loss fell.
// --save PATH writes a sharded checkpoint after the last step (peer/mpi/sharded_checkpoint.hpp: one file
// per rank and an index); --resume PATH loads one, written by any number of ranks, and continues from its
// step to --steps.
#include <peer/mpi/data_parallel.hpp>
#include <peer/mpi/expert_sharded.hpp>
#include <peer/mpi/sharded_checkpoint.hpp>
#include <peer/peer.hpp>

#include "memorize.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <sys/resource.h>

namespace {

using Mat = peer::RowMatrix<float>;

struct Options {
  long pairs = 8192, classes = 256, dim = 64, sub_keys = 32, heads = 4, top_k = 8, steps = 600, batch = 256, every = 100;
  bool sharded = false, layer_norm = false;
  std::string save, resume;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](long& field) { field = demo::integer_option(argc, argv, i, 1); };
    if (a == "--sharded") o.sharded = true;
    else if (a == "--layer-norm") o.layer_norm = true;
    else if (a == "--pairs") value(o.pairs);
    else if (a == "--steps") value(o.steps);
    else if (a == "--batch") value(o.batch);
    else if (a == "--every") value(o.every);
    else if (a == "--sub-keys") value(o.sub_keys);
    else if (a == "--dim") value(o.dim);
    else if (a == "--heads") value(o.heads);
    else if (a == "--top-k") value(o.top_k);
    else if ((a == "--save" || a == "--resume") && i + 1 < argc) (a == "--save" ? o.save : o.resume) = argv[++i];
    else throw std::invalid_argument("unknown option " + a + " (options: --sharded --layer-norm --pairs --steps --batch --every --sub-keys --dim --heads --top-k --save PATH --resume PATH)");
  }
  return o;
}

// Bytes the sharded table's exchanges sent from this rank in the last step (0 for data parallel, whose
// table bytes DataParallel counts).
std::int64_t table_exchange_bytes(const peer::PeerLayer<float>&) { return 0; }
std::int64_t table_exchange_bytes(const peer::mpi::ShardedPeerLayer<float>& layer) {
  return layer.experts().last_forward_traffic().bytes_sent + layer.experts().last_backward_traffic().bytes_sent;
}

// The training loop, for a PeerLayer (data parallel) or a ShardedPeerLayer.
template <typename Layer>
int train(const peer::mpi::Communicator& comm, const Options& o, const peer::PeerConfig& config, const Layer& layer) {
  const int p = comm.size(), me = comm.rank();
  const long local = o.batch / p;
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
  const std::vector<std::string> sharded = o.sharded ? std::vector<std::string>{"peer.experts"} : std::vector<std::string>{};
  peer::mpi::DataParallel<float> dp(comm, model.layout(), sharded);
  dp.broadcast(params);
  peer::Adam<float> adam(model.layout(), peer::default_param_groups(3e-3, peer::LrSchedule::warmup(50), 1e-2),
                         peer::AdamConfig::adamw());
  // The checkpoint: the model (its table split over the ranks when sharded), AdamW's state, the step.
  std::int64_t done = 0;
  peer::ShardedCheckpoint ckpt(me, p);
  if (o.sharded) ckpt.shard_table("peer.experts", config.num_experts);
  ckpt.add_config("peer", config.to_fields());
  ckpt.add_parameters("", params);
  ckpt.add_optimizer("adam", adam);
  ckpt.add_counter("step", &done);
  if (!o.resume.empty()) peer::mpi::load_sharded_checkpoint(comm, ckpt, o.resume);

  const demo::PairSet data(o.pairs, o.dim, o.classes, 7);
  demo::Batches batches(data, o.batch);
  typename Layer::Cache cache;
  peer::Linear<float>::Scratch scratch;
  Mat x, h(local, o.dim), logits(local, o.classes), dlogits, dh, none;
  std::vector<int> labels;
  if (me == 0) {
    std::printf("%s PEER on %d rank(s): %ld experts, D = %ld, global batch %ld (%ld per rank), %ld pairs; rank 0 holds %.0f KiB of the table\n",
                o.sharded ? "expert-sharded" : "data-parallel", p, config.num_experts, o.dim, o.batch, local, o.pairs,
                static_cast<double>(views.params(l_peer).table(peer::TableHandle{0}).bytes()) / 1024.0);
    if (!o.resume.empty()) std::printf("resumed from %s at step %lld\n", o.resume.c_str(), static_cast<long long>(done));
    std::printf("   step   eval loss   accuracy   ms/step   sent/step per rank (dense + table)\n");
  }
  double first_loss = -1, last_loss = 0, seconds = 0;
  std::int64_t dense_bytes = 0, table_bytes = 0;
  const long first = static_cast<long>(done) + 1;
  for (long step = first; step <= o.steps; ++step) {
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
    done = step;
    dense_bytes += dp.last_traffic().dense_bytes;
    table_bytes += dp.last_traffic().table_bytes + table_exchange_bytes(layer);
    if (step % o.every == 0 || step == o.steps) {
      // Every replica is the same: rank 0 evaluates all pairs on its own (sharded: every rank takes part
      // in the forward, which is collective, and rank 0 prints).
      if (me == 0 || o.sharded) {
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
        if (me == 0) std::printf("%7ld   %9.4f   %7.1f%%   %7.2f   %.0f + %.0f KiB\n", step, loss, 100.0 * static_cast<double>(right) / static_cast<double>(o.pairs),
                    1e3 * seconds / static_cast<double>(step - first + 1), static_cast<double>(dense_bytes) / static_cast<double>(step - first + 1) / 1024.0,
                    static_cast<double>(table_bytes) / static_cast<double>(step - first + 1) / 1024.0);
      }
    }
  }
  dp.require_identical(params);  // throws on every rank if the replicated tensors drifted apart
  if (!o.save.empty()) {
    peer::mpi::save_sharded_checkpoint(comm, ckpt, o.save);
    if (me == 0) std::printf("saved step %lld to %s (%d shard file(s) and the index)\n", static_cast<long long>(done), o.save.c_str(), p);
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const std::int64_t peak_kib = comm.max(static_cast<std::int64_t>(usage.ru_maxrss));  // Linux: KiB
  if (me == 0) std::printf("largest peak resident set of the %d rank(s): %.1f MiB\n", p, static_cast<double>(peak_kib) / 1024.0);
  // A resumed run may start at its best; it must then at least not be worse than where it started.
  const int ok = me != 0 || (first_loss > 0 && (o.resume.empty() ? last_loss < first_loss : last_loss <= first_loss));
  if (me == 0) std::printf(ok ? "replicated tensors identical on every rank; the loss fell\n" : "FAIL: the loss did not fall\n");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int code = peer::mpi::run_or_abort(MPI_COMM_WORLD, [&]() -> int {
    const peer::mpi::Communicator comm;
    const Options o = parse(argc, argv);
    if (o.batch % comm.size() != 0) {
      throw std::invalid_argument("--batch " + std::to_string(o.batch) + " must be a multiple of the rank count " + std::to_string(comm.size()));
    }
    peer::PeerConfig config;
    config.model_dim = o.dim;
    config.key_dim = 32;
    config.num_heads = o.heads;
    config.top_k = o.top_k;
    config.sub_key_top_k = o.top_k;
    // Batch-normed queries (the paper's) use each rank's own batch statistics; layer-normed ones make
    // every rank count train the same function as one process.
    if (o.layer_norm) config.query_norm = peer::QueryNorm::kLayerNorm;
    config.num_experts = o.sub_keys * o.sub_keys;
    if (o.sharded) return train(comm, o, config, peer::mpi::make_sharded_peer_layer<float>(config, comm));
    peer::mpi::require_same(comm, "PeerConfig", peer::mpi::fields_text(config.to_fields()));
    return train(comm, o, config, peer::PeerLayer<float>(config));
  });
  MPI_Finalize();
  return code;
}
