// SPDX-License-Identifier: MIT
#ifndef PEER_MPI_EXPERT_SHARDED_HPP
#define PEER_MPI_EXPERT_SHARDED_HPP

/// \file
/// Expert-sharded PEER over MPI: the expert table [N, 2D] and its optimizer state split by rows over the
/// P ranks of a communicator, retrieval where the tokens are.
///
/// Ownership is cyclic: expert i lives on rank i mod P as local row i div P (ExpertShards). Product-key
/// ids are i = a n + b for left and right sub-keys a, b; a split into P contiguous blocks would give each
/// rank whole ranges of left sub-keys, so a popular left key would load one rank. Cyclically, each left
/// key's n experts spread over all ranks.
///
/// ShardedExperts is the memory of a ProductKeyLayer (ShardedPeerLayer): the query network and sub-keys
/// are replicated (their gradients are all-reduced by DataParallel like any dense tensor), each rank
/// routes its own tokens, and the experts' part runs where the rows are:
///
///   forward: for every (token t, owner o) pair with at least one of t's S slots on o, t's rank sends
///     x_t (D scalars), the c slots' local rows and gates to o, once (MPI_Alltoallv); o returns
///     sum over those slots of g sigma(u . x_t) v (one D-vector) and the c pre-activations z;
///     y_t = the owners' sums added in ascending owner order.
///   backward: the same pairs; t's rank sends x_t, dy_t and the slots' gates and z (the owner keeps
///     nothing between the calls, so forward and backward pair by their arguments, not by call order:
///     gradient accumulation and evaluation between them stay correct); o returns sum of dz u (one
///     D-vector) and the c gate gradients, and adds du | dv into its own rows' gradient. Each owner
///     updates only its own rows; no table row or row gradient ever crosses ranks.
///
/// Determinism. The pairs are ordered by (source rank, token, slot), so an owner sums each row's gradient
/// over the same items in the same order as one process on the ranks' batches concatenated in rank order:
/// the table gradient, z and the gate gradients equal that process's bitwise for the same routing and gates
/// (tests/mpi checks it). y and dx are sums over owners instead of over slots: per entry they differ from
/// one process by reassociation only (at most about S eps sum_s |term_s|); with P = 1 they are bitwise
/// equal. Every sum has a fixed order, so a step is bitwise reproducible for a given P, whatever the
/// thread count of each rank.
///
/// Collective: every rank calls forward and backward together, with its own batch (any size, also 0).
/// Invalid input on one rank (shapes, ids) is found before any exchange and agreed on in the first one: every
/// rank throws std::invalid_argument, the offending rank with its message.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/row_scatter.hpp"
#include "peer/core/types.hpp"
#include "peer/experts/single_neuron_experts.hpp"
#include "peer/layers/product_key_layer.hpp"
#include "peer/mpi/communicator.hpp"
#include "peer/nn/activation.hpp"

namespace peer {
namespace mpi {

/// Cyclic row ownership of an N-row table over P ranks: row i on rank i mod P as local row i div P.
struct ExpertShards {
  Index num_experts = 0;  ///< N
  int ranks = 1;          ///< P

  ExpertShards() = default;
  /// Throws std::invalid_argument unless 1 <= P <= N.
  ExpertShards(Index n, int p) : num_experts(n), ranks(p) {
    if (p < 1) detail::throw_invalid("ExpertShards ranks", p, "must be >= 1");
    if (n < p) detail::throw_invalid("ExpertShards num_experts", n, "must be >= the number of ranks (" + detail::to_text(p) + ")");
  }
  int owner(Index id) const { return static_cast<int>(id % ranks); }
  Index local_row(Index id) const { return id / ranks; }
  Index global_id(int rank, Index local) const { return local * ranks + rank; }
  /// Rows rank r holds: ceil((N - r) / P).
  Index rows_of(int rank) const { return (num_experts - rank + ranks - 1) / ranks; }
};

/// What one forward or backward sent from this rank (to other ranks; what stays on the rank is not counted).
struct ShardTraffic {
  std::int64_t pairs = 0;       ///< (token, owner) pairs this rank's tokens formed, itself included
  std::int64_t remote_pairs = 0;  ///< those with another rank
  std::int64_t bytes_sent = 0;  ///< requests and replies this rank sent to other ranks
};

/// N single-neuron experts e_i(x) = sigma(u_i . x) v_i whose table is split by rows over the ranks of a
/// communicator (see the file comment). The memory of a ShardedPeerLayer; the table each rank holds is its
/// shard, [rows_of(rank), 2 D], named kTableName like the unsharded one.
///
/// Not for concurrent calls from several threads of one rank (its exchange buffers are its own; MPI's
/// collectives are ordered per communicator anyway).
template <typename Scalar>
class ShardedExperts {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");
  using Local = SingleNeuronExperts<Scalar>;

 public:
  static constexpr const char* kTableName = Local::kTableName;
  static Index row_cols(Index model_dim) { return Local::row_cols(model_dim); }
  static double forward_flops_per_slot(Index model_dim) { return Local::forward_flops_per_slot(model_dim); }
  static double backward_flops_per_slot(Index model_dim) { return Local::backward_flops_per_slot(model_dim); }

  struct Workspace {
    std::vector<Scalar> coef_u, coef_v;  // per received slot: factors of its du and dv rows
    std::vector<std::int64_t> item_pair;  // per received slot: its pair
    IdMatrix keys;                        // [received slots, 1] local rows
    detail::RowScatterWorkspace<Scalar> scatter;
  };

  /// Collective only in what it checks: every rank must build it with the same config (ShardedPeerLayer's
  /// factory checks that with require_same).
  ShardedExperts(const ExpertPoolConfig& config, const Communicator& comm)
      : config_(config), comm_(comm), shards_(config.num_experts, comm.size()) {}

  const ExpertPoolConfig& config() const { return config_; }
  const Communicator& communicator() const { return comm_; }
  const ExpertShards& shards() const { return shards_; }
  Index num_experts() const { return config_.num_experts; }
  Index model_dim() const { return config_.model_dim; }
  Index local_rows() const { return shards_.rows_of(comm_.rank()); }
  TableHandle table_handle() const { return table_; }
  const ShardTraffic& last_forward_traffic() const { return ex_.forward_traffic; }
  const ShardTraffic& last_backward_traffic() const { return ex_.backward_traffic; }

  void register_parameters(ParameterLayout& layout, const std::string& name) {
    table_ = layout.add_table(name, local_rows(), 2 * config_.model_dim, config_.storage);
  }

  /// The rows of the whole table's initialization that this rank owns (SingleNeuronExperts::initialize):
  /// a sharded model starts from exactly the unsharded one's values.
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    Local::initialize_rows(params.table(table_), seed, params.layout().spec(table_).name, config_.model_dim, shards_.ranks, comm_.rank());
  }

  /// Collective. SingleNeuronExperts::forward with global ids in [0, N): y [B, D] and z [B, S] assigned.
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
               const ConstMatrixRef<Scalar>& gates, MatrixRef<Scalar> y, MatrixRef<Scalar> z) const {
    const Index slots = ids.cols(), d = model_dim();
    const std::string refused = first_error([&] { Local::check_forward_arguments(x, ids, gates, y, z, num_experts(), d); });
    Exchange& e = ex_;
    plan(refused.empty() ? ids : ConstIdMatrixRef(IdMatrix(0, slots)));
    // Requests: per pair x_t | the c gates.
    pack_requests(e, 1, [&](std::int64_t p, Scalar* out) {
      std::memcpy(out, x.row(e.pair_token[static_cast<std::size_t>(p)]).data(), static_cast<std::size_t>(d) * sizeof(Scalar));
      Scalar* g = out + d;
      for_slots(e, p, [&](std::int64_t j, Index s) { g[j] = gates(e.pair_token[static_cast<std::size_t>(p)], s); });
    });
    exchange_requests(e, 1, refused, "forward");
    // Owner: per received pair, sum_j g_j sigma(u_j . x) v_j and the z_j, as SingleNeuronExperts does.
    const auto& table = params.table(table_);
    const Activation act = config_.activation;
    serve(e, [&](std::int64_t, const Scalar* in, const ExpertId* rows, std::int64_t c, Scalar* out) {
      const Scalar* g = in + d;
      Scalar* zs = out + d;
      std::fill(out, out + d, Scalar(0));
      Local::forward_token(table, act, d, in, rows, g, static_cast<Index>(c), out, zs);
    });
    return_replies(e);
    // Requester: y_t = the owners' sums in ascending owner order; z from its owner.
    y.setZero();
    unpack_replies(e, [&](std::int64_t p, const Scalar* in) {
      const Index t = e.pair_token[static_cast<std::size_t>(p)];
      y.row(t) += Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(in, d);
      for_slots(e, p, [&](std::int64_t j, Index s) { z(t, s) = in[d + j]; });
    });
    e.forward_traffic = e.traffic;
  }

  /// Collective. SingleNeuronExperts::backward: dx += dL/dx (skipped when dx has no rows), dgates assigned,
  /// and this rank's shard of the table gradient gets du | dv added for every row of its own that any
  /// rank's tokens touched (each row once, in (rank, token, slot) order).
  void backward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
                const ConstMatrixRef<Scalar>& gates, const ConstMatrixRef<Scalar>& z, const ConstMatrixRef<Scalar>& dy,
                MatrixRef<Scalar> dx, MatrixRef<Scalar> dgates, Gradients<Scalar>& grads, Workspace& ws) const {
    const Index slots = ids.cols(), d = model_dim();
    const std::string refused = first_error([&] { Local::check_backward_arguments(x, ids, gates, z, dy, dx, dgates, num_experts(), d); });
    Exchange& e = ex_;
    plan(refused.empty() ? ids : ConstIdMatrixRef(IdMatrix(0, slots)));
    // Requests: per pair x_t | dy_t | the c gates | the c z.
    pack_requests(e, 2, [&](std::int64_t p, Scalar* out) {
      const Index t = e.pair_token[static_cast<std::size_t>(p)];
      const std::int64_t c = e.pair_begin[static_cast<std::size_t>(p) + 1] - e.pair_begin[static_cast<std::size_t>(p)];
      std::memcpy(out, x.row(t).data(), static_cast<std::size_t>(d) * sizeof(Scalar));
      std::memcpy(out + d, dy.row(t).data(), static_cast<std::size_t>(d) * sizeof(Scalar));
      for_slots(e, p, [&](std::int64_t j, Index s) {
        out[2 * d + j] = gates(t, s);
        out[2 * d + c + j] = z(t, s);
      });
    });
    exchange_requests(e, 2, refused, "backward");
    // Owner: per received slot dh = v . dy, dz = g sigma'(z) dh, the gate's gradient sigma(z) dh, and
    // dx_part += dz u; the factors of du = dz x and dv = g sigma(z) dy are kept for the row sums.
    const auto& table = params.table(table_);
    const Activation act = config_.activation;
    const auto items = static_cast<std::size_t>(e.recv_slots);
    ws.coef_u.resize(items);
    ws.coef_v.resize(items);
    ws.item_pair.resize(items);
    ws.keys.resize(static_cast<Index>(items), 1);
    serve(e, [&](std::int64_t q, const Scalar* in, const ExpertId* rows, std::int64_t c, Scalar* out) {
      const Scalar* dyq = in + d;
      const Scalar* g = in + 2 * d;
      const Scalar* zq = in + 2 * d + c;
      Scalar* dg = out + d;
      std::fill(out, out + d, Scalar(0));
      const std::int64_t first = e.recv_slot_begin[static_cast<std::size_t>(q)];
      Local::backward_token(table, act, d, dyq, rows, g, zq, static_cast<Index>(c), out, dg,
                            ws.coef_u.data() + first, ws.coef_v.data() + first);  // out: dx_part += dz u
      for (std::int64_t j = 0; j < c; ++j) {
        const auto item = static_cast<std::size_t>(first + j);
        ws.item_pair[item] = q;
        ws.keys(static_cast<Index>(item), 0) = rows[j];
      }
    });
    // This rank's rows: du_i | dv_i, each summed once over its items in (source rank, token, slot) order.
    using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
    detail::scatter_rows(ws.keys, local_rows(), 2 * d, grads.table(table_), ws.scatter, [&](Index item, auto row) {
      const Scalar* in = e.recv_scalars.data() + e.recv_scalar_begin[static_cast<std::size_t>(ws.item_pair[static_cast<std::size_t>(item)])];
      row.head(d) += ws.coef_u[static_cast<std::size_t>(item)] * Eigen::Map<const RowVec>(in, d);
      row.tail(d) += ws.coef_v[static_cast<std::size_t>(item)] * Eigen::Map<const RowVec>(in + d, d);
    });
    return_replies(e);
    const bool want_dx = dx.rows() > 0;
    unpack_replies(e, [&](std::int64_t p, const Scalar* in) {
      const Index t = e.pair_token[static_cast<std::size_t>(p)];
      if (want_dx) dx.row(t) += Eigen::Map<const RowVec>(in, d);
      for_slots(e, p, [&](std::int64_t j, Index s) { dgates(t, s) = in[d + j]; });
    });
    e.backward_traffic = e.traffic;
  }

 private:
  // Buffers of one exchange, reused between calls. "Pairs" are this rank's (token, owner) pairs, grouped by
  // owner (owner 0's first), tokens ascending within an owner, slots ascending within a pair.
  struct Exchange {
    std::vector<Index> pair_token;        // per pair: its token
    std::vector<std::int64_t> pair_begin;  // per pair: its first slot in slot_col (one past the end last)
    std::vector<Index> slot_col;          // per slot: its column in ids
    std::vector<ExpertId> slot_row;       // per slot: its local row on the owner
    std::vector<std::int64_t> owner_pairs;  // [P + 1] first pair of each owner
    std::vector<Index> owner_last;        // scratch: per owner, the last token that opened a pair
    // Requests sent and received: ints (per pair c, then c local rows), scalars (per pair its payload).
    std::vector<ExpertId> send_ints, recv_ints;
    std::vector<Scalar> send_scalars, recv_scalars;
    std::vector<int> send_int_counts, send_int_offsets, recv_int_counts, recv_int_offsets;
    std::vector<int> send_counts, send_offsets, recv_counts, recv_offsets;
    // Received pairs (the owner's side), in source-rank order: where each pair's scalars, rows and reply are.
    std::vector<std::int64_t> recv_scalar_begin, recv_row_begin, recv_slot_begin, reply_begin;
    std::vector<std::int64_t> recv_pair_count;  // per source rank
    std::int64_t recv_slots = 0;
    // Replies: per pair a D-vector then c scalars, sent back along the pairs' way.
    std::vector<Scalar> replies, send_replies;
    std::vector<std::int64_t> pair_reply_begin;  // per pair of this rank: its reply in send_replies
    std::vector<int> reply_counts, reply_offsets, back_counts, back_offsets;
    ShardTraffic traffic, forward_traffic, backward_traffic;
  };

  // The message of the first exception `checks` throws (empty when none): a refusal must not leave this
  // rank before the exchange where every rank learns of it.
  template <typename Checks>
  static std::string first_error(Checks&& checks) {
    try {
      checks();
    } catch (const std::exception& error) {
      return error.what()[0] == '\0' ? std::string("invalid input") : std::string(error.what());
    }
    return std::string();
  }

  template <typename F>
  void for_slots(const Exchange& e, std::int64_t p, F&& f) const {
    const std::int64_t b = e.pair_begin[static_cast<std::size_t>(p)], end = e.pair_begin[static_cast<std::size_t>(p) + 1];
    for (std::int64_t i = b; i < end; ++i) f(i - b, e.slot_col[static_cast<std::size_t>(i)]);
  }

  // The pairs of `ids`, grouped by owner. Two passes over the slots: count per owner, then place.
  void plan(const ConstIdMatrixRef& ids) const {
    Exchange& e = ex_;
    const int p_count = shards_.ranks;
    const Index b_count = ids.rows(), slots = ids.cols();
    std::vector<std::int64_t> owner_slots(static_cast<std::size_t>(p_count) + 1, 0);
    e.owner_pairs.assign(static_cast<std::size_t>(p_count) + 1, 0);
    e.owner_last.assign(static_cast<std::size_t>(p_count), -1);
    for (Index t = 0; t < b_count; ++t) {
      for (Index s = 0; s < slots; ++s) {
        const int o = shards_.owner(ids(t, s));
        ++owner_slots[static_cast<std::size_t>(o) + 1];
        if (e.owner_last[static_cast<std::size_t>(o)] != t) {
          e.owner_last[static_cast<std::size_t>(o)] = t;
          ++e.owner_pairs[static_cast<std::size_t>(o) + 1];
        }
      }
    }
    for (int o = 0; o < p_count; ++o) {
      owner_slots[static_cast<std::size_t>(o) + 1] += owner_slots[static_cast<std::size_t>(o)];
      e.owner_pairs[static_cast<std::size_t>(o) + 1] += e.owner_pairs[static_cast<std::size_t>(o)];
    }
    const auto pairs = static_cast<std::size_t>(e.owner_pairs.back());
    const auto total = static_cast<std::size_t>(owner_slots.back());
    e.pair_token.resize(pairs);
    e.pair_begin.resize(pairs + 1);
    e.slot_col.resize(total);
    e.slot_row.resize(total);
    std::vector<std::int64_t> next_pair(e.owner_pairs.begin(), e.owner_pairs.end() - 1);
    std::vector<std::int64_t> next_slot(owner_slots.begin(), owner_slots.end() - 1);
    e.owner_last.assign(static_cast<std::size_t>(p_count), -1);
    for (Index t = 0; t < b_count; ++t) {
      for (Index s = 0; s < slots; ++s) {
        const Index id = ids(t, s);
        const auto o = static_cast<std::size_t>(shards_.owner(id));
        if (e.owner_last[o] != t) {  // t opens a pair with o
          e.owner_last[o] = t;
          const auto pair = static_cast<std::size_t>(next_pair[o]++);
          e.pair_token[pair] = t;
          e.pair_begin[pair] = next_slot[o];
        }
        const auto at = static_cast<std::size_t>(next_slot[o]++);
        e.slot_col[at] = s;
        e.slot_row[at] = static_cast<ExpertId>(shards_.local_row(id));
      }
    }
    e.pair_begin[pairs] = static_cast<std::int64_t>(total);
  }

  // The request buffers: per pair, c and its local rows (ints) and `vectors` D-vectors plus `vectors` c
  // scalars (fill(p, out) writes them).
  template <typename Fill>
  void pack_requests(Exchange& e, int vectors, Fill&& fill) const {
    const int p_count = shards_.ranks;
    const Index d = model_dim();
    e.send_int_counts.assign(static_cast<std::size_t>(p_count), 0);
    e.send_counts.assign(static_cast<std::size_t>(p_count), 0);
    e.send_int_offsets.assign(static_cast<std::size_t>(p_count), 0);
    e.send_offsets.assign(static_cast<std::size_t>(p_count), 0);
    std::vector<std::int64_t> scalar_begin(e.pair_token.size() + 1, 0);
    std::int64_t ints = 0, scalars = 0;
    for (int o = 0; o < p_count; ++o) {
      const std::int64_t ints0 = ints, scalars0 = scalars;
      for (std::int64_t p = e.owner_pairs[static_cast<std::size_t>(o)]; p < e.owner_pairs[static_cast<std::size_t>(o) + 1]; ++p) {
        const std::int64_t c = e.pair_begin[static_cast<std::size_t>(p) + 1] - e.pair_begin[static_cast<std::size_t>(p)];
        scalar_begin[static_cast<std::size_t>(p)] = scalars;
        ints += 1 + c;
        scalars += vectors * (d + c);
      }
      e.send_int_offsets[static_cast<std::size_t>(o)] = Communicator::to_int(static_cast<std::size_t>(ints0), "request offset");
      e.send_int_counts[static_cast<std::size_t>(o)] = Communicator::to_int(static_cast<std::size_t>(ints - ints0), "request count");
      e.send_offsets[static_cast<std::size_t>(o)] = Communicator::to_int(static_cast<std::size_t>(scalars0), "request offset");
      e.send_counts[static_cast<std::size_t>(o)] = Communicator::to_int(static_cast<std::size_t>(scalars - scalars0), "request count");
    }
    e.send_ints.resize(static_cast<std::size_t>(ints));
    e.send_scalars.resize(static_cast<std::size_t>(scalars));
    std::int64_t at = 0;
    for (std::size_t p = 0; p < e.pair_token.size(); ++p) {
      const std::int64_t b = e.pair_begin[p], end = e.pair_begin[p + 1];
      e.send_ints[static_cast<std::size_t>(at++)] = static_cast<ExpertId>(end - b);
      for (std::int64_t i = b; i < end; ++i) e.send_ints[static_cast<std::size_t>(at++)] = e.slot_row[static_cast<std::size_t>(i)];
    }
    parallel_for(static_cast<Index>(e.pair_token.size()), 64, [&](Index p0, Index p1, int) {
      for (Index p = p0; p < p1; ++p) fill(p, e.send_scalars.data() + scalar_begin[static_cast<std::size_t>(p)]);
    });
  }

  // Counts (and the refusal flag) with MPI_Alltoall, then the requests with MPI_Alltoallv; every rank
  // throws when any rank refused its input. Afterwards the received pairs are indexed.
  void exchange_requests(Exchange& e, int vectors, const std::string& refused, const char* where) const {
    const int p_count = shards_.ranks, me = comm_.rank();
    const Index d = model_dim();
    std::vector<int> counts_out(static_cast<std::size_t>(3 * p_count)), counts_in(static_cast<std::size_t>(3 * p_count));
    for (int o = 0; o < p_count; ++o) {
      counts_out[static_cast<std::size_t>(3 * o)] = e.send_int_counts[static_cast<std::size_t>(o)];
      counts_out[static_cast<std::size_t>(3 * o + 1)] = e.send_counts[static_cast<std::size_t>(o)];
      counts_out[static_cast<std::size_t>(3 * o + 2)] = refused.empty() ? 0 : 1;
    }
    check(MPI_Alltoall(counts_out.data(), 3, MPI_INT, counts_in.data(), 3, MPI_INT, comm_.comm()), "MPI_Alltoall");
    for (int r = 0; r < p_count; ++r) {
      if (counts_in[static_cast<std::size_t>(3 * r + 2)] == 0) continue;
      if (r == me) throw std::invalid_argument(refused);
      throw std::invalid_argument(std::string("peer::mpi::ShardedExperts::") + where + ": rank " + std::to_string(r) +
                                  " refused its input (its own exception names it)");
    }
    if (!refused.empty()) throw std::invalid_argument(refused);  // unreachable: this rank's flag is in counts_in
    e.recv_int_counts.resize(static_cast<std::size_t>(p_count));
    e.recv_counts.resize(static_cast<std::size_t>(p_count));
    e.recv_int_offsets.resize(static_cast<std::size_t>(p_count));
    e.recv_offsets.resize(static_cast<std::size_t>(p_count));
    std::int64_t ints = 0, scalars = 0;
    for (int r = 0; r < p_count; ++r) {
      e.recv_int_offsets[static_cast<std::size_t>(r)] = Communicator::to_int(static_cast<std::size_t>(ints), "received offset");
      e.recv_offsets[static_cast<std::size_t>(r)] = Communicator::to_int(static_cast<std::size_t>(scalars), "received offset");
      e.recv_int_counts[static_cast<std::size_t>(r)] = counts_in[static_cast<std::size_t>(3 * r)];
      e.recv_counts[static_cast<std::size_t>(r)] = counts_in[static_cast<std::size_t>(3 * r + 1)];
      ints += e.recv_int_counts[static_cast<std::size_t>(r)];
      scalars += e.recv_counts[static_cast<std::size_t>(r)];
    }
    e.recv_ints.resize(static_cast<std::size_t>(ints));
    e.recv_scalars.resize(static_cast<std::size_t>(scalars));
    check(MPI_Alltoallv(e.send_ints.data(), e.send_int_counts.data(), e.send_int_offsets.data(), datatype<ExpertId>(),
                        e.recv_ints.data(), e.recv_int_counts.data(), e.recv_int_offsets.data(), datatype<ExpertId>(), comm_.comm()),
          "MPI_Alltoallv");
    check(MPI_Alltoallv(e.send_scalars.data(), e.send_counts.data(), e.send_offsets.data(), datatype<Scalar>(),
                        e.recv_scalars.data(), e.recv_counts.data(), e.recv_offsets.data(), datatype<Scalar>(), comm_.comm()),
          "MPI_Alltoallv");
    // Index the received pairs (source rank order); a malformed count is refused, never read past.
    e.recv_scalar_begin.clear();
    e.recv_row_begin.clear();
    e.recv_slot_begin.clear();
    e.reply_begin.clear();
    e.recv_pair_count.assign(static_cast<std::size_t>(p_count), 0);
    e.reply_counts.assign(static_cast<std::size_t>(p_count), 0);
    e.reply_offsets.assign(static_cast<std::size_t>(p_count), 0);
    std::int64_t slot = 0, reply = 0;
    for (int r = 0; r < p_count; ++r) {
      std::int64_t i = e.recv_int_offsets[static_cast<std::size_t>(r)];
      const std::int64_t i_end = i + e.recv_int_counts[static_cast<std::size_t>(r)];
      std::int64_t sc = e.recv_offsets[static_cast<std::size_t>(r)];
      const std::int64_t sc_end = sc + e.recv_counts[static_cast<std::size_t>(r)];
      const std::int64_t reply0 = reply;
      while (i < i_end) {
        const std::int64_t c = e.recv_ints[static_cast<std::size_t>(i)];
        if (c < 1 || i + 1 + c > i_end) throw Error("peer::mpi::ShardedExperts: a malformed request from rank " + std::to_string(r));
        e.recv_row_begin.push_back(i + 1);
        e.recv_scalar_begin.push_back(sc);
        e.recv_slot_begin.push_back(slot);
        e.reply_begin.push_back(reply);
        sc += vectors * (d + c);
        slot += c;
        reply += d + c;
        i += 1 + c;
        ++e.recv_pair_count[static_cast<std::size_t>(r)];
      }
      if (sc != sc_end) throw Error("peer::mpi::ShardedExperts: requests from rank " + std::to_string(r) + " do not match their counts");
      e.reply_offsets[static_cast<std::size_t>(r)] = Communicator::to_int(static_cast<std::size_t>(reply0), "reply offset");
      e.reply_counts[static_cast<std::size_t>(r)] = Communicator::to_int(static_cast<std::size_t>(reply - reply0), "reply count");
    }
    e.recv_slots = slot;
    e.replies.resize(static_cast<std::size_t>(reply));
    // Traffic: what this rank sends to others (requests now, replies in return_replies()).
    e.traffic = ShardTraffic();
    e.traffic.pairs = static_cast<std::int64_t>(e.pair_token.size());
    for (int o = 0; o < p_count; ++o) {
      if (o == me) continue;
      e.traffic.remote_pairs += e.owner_pairs[static_cast<std::size_t>(o) + 1] - e.owner_pairs[static_cast<std::size_t>(o)];
      e.traffic.bytes_sent += static_cast<std::int64_t>(e.send_int_counts[static_cast<std::size_t>(o)]) * static_cast<std::int64_t>(sizeof(ExpertId)) +
                              static_cast<std::int64_t>(e.send_counts[static_cast<std::size_t>(o)]) * static_cast<std::int64_t>(sizeof(Scalar));
    }
  }

  // The owner's work: serve(q, request scalars, local rows, c, reply) for every received pair, in parallel
  // over pairs (each writes only its own reply).
  template <typename Serve>
  void serve(Exchange& e, Serve&& f) const {
    parallel_for(static_cast<Index>(e.recv_row_begin.size()), 16, [&](Index q0, Index q1, int) {
      for (Index q = q0; q < q1; ++q) {
        const auto i = static_cast<std::size_t>(q);
        const std::int64_t c = e.recv_ints[static_cast<std::size_t>(e.recv_row_begin[i]) - 1];
        f(q, e.recv_scalars.data() + e.recv_scalar_begin[i], e.recv_ints.data() + e.recv_row_begin[i], c, e.replies.data() + e.reply_begin[i]);
      }
    });
  }

  // Replies back to the pairs' ranks: each rank receives, per owner, its pairs' replies in its pair order.
  void return_replies(Exchange& e) const {
    const int p_count = shards_.ranks, me = comm_.rank();
    const Index d = model_dim();
    e.back_counts.assign(static_cast<std::size_t>(p_count), 0);
    e.back_offsets.assign(static_cast<std::size_t>(p_count), 0);
    e.pair_reply_begin.resize(e.pair_token.size());
    std::int64_t total = 0;
    for (int o = 0; o < p_count; ++o) {
      const std::int64_t t0 = total;
      for (std::int64_t p = e.owner_pairs[static_cast<std::size_t>(o)]; p < e.owner_pairs[static_cast<std::size_t>(o) + 1]; ++p) {
        e.pair_reply_begin[static_cast<std::size_t>(p)] = total;
        total += d + (e.pair_begin[static_cast<std::size_t>(p) + 1] - e.pair_begin[static_cast<std::size_t>(p)]);
      }
      e.back_offsets[static_cast<std::size_t>(o)] = Communicator::to_int(static_cast<std::size_t>(t0), "reply offset");
      e.back_counts[static_cast<std::size_t>(o)] = Communicator::to_int(static_cast<std::size_t>(total - t0), "reply count");
    }
    e.send_replies.resize(static_cast<std::size_t>(total));
    check(MPI_Alltoallv(e.replies.data(), e.reply_counts.data(), e.reply_offsets.data(), datatype<Scalar>(), e.send_replies.data(),
                        e.back_counts.data(), e.back_offsets.data(), datatype<Scalar>(), comm_.comm()),
          "MPI_Alltoallv");
    for (int r = 0; r < p_count; ++r) {
      if (r != me) e.traffic.bytes_sent += static_cast<std::int64_t>(e.reply_counts[static_cast<std::size_t>(r)]) * static_cast<std::int64_t>(sizeof(Scalar));
    }
  }

  // The requester's side of the replies: f(p, reply) for every pair, owner by owner in ascending order, in
  // parallel within an owner (an owner's pairs have distinct tokens).
  template <typename F>
  void unpack_replies(Exchange& e, F&& f) const {
    for (int o = 0; o < shards_.ranks; ++o) {
      const std::int64_t p0 = e.owner_pairs[static_cast<std::size_t>(o)], p1 = e.owner_pairs[static_cast<std::size_t>(o) + 1];
      parallel_for(static_cast<Index>(p1 - p0), 64, [&](Index a, Index b, int) {
        for (Index p = p0 + a; p < p0 + b; ++p) f(p, e.send_replies.data() + e.pair_reply_begin[static_cast<std::size_t>(p)]);
      });
    }
  }

  ExpertPoolConfig config_;
  Communicator comm_;
  ExpertShards shards_;
  TableHandle table_;
  mutable Exchange ex_;
};

/// A PEER layer whose expert table is sharded over a communicator's ranks (ShardedExperts).
template <typename Scalar, typename QueryNet = QueryNetwork<Scalar>>
using ShardedPeerLayer = ProductKeyLayer<Scalar, ShardedExperts<Scalar>, QueryNet>;

/// Collective: a ShardedPeerLayer over `comm`, after checking that every rank has the same config
/// (std::invalid_argument on every rank naming the first field that differs). Its layout holds this
/// rank's shard of the table; pass the table's name to DataParallel as sharded.
template <typename Scalar>
ShardedPeerLayer<Scalar> make_sharded_peer_layer(const PeerConfig& config, const Communicator& comm) {
  config.validate();
  require_same(comm, "PeerConfig", fields_text(config.to_fields()));
  return ShardedPeerLayer<Scalar>(config, QueryNetwork<Scalar>(query_network_config(config)),
                                  ShardedExperts<Scalar>(expert_pool_config(config), comm));
}

}  // namespace mpi
}  // namespace peer

#endif  // PEER_MPI_EXPERT_SHARDED_HPP
