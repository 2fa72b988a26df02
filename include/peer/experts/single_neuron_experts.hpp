// SPDX-License-Identifier: MIT
#ifndef PEER_EXPERTS_SINGLE_NEURON_EXPERTS_HPP
#define PEER_EXPERTS_SINGLE_NEURON_EXPERTS_HPP

/// \file
/// The pool of N single-neuron experts e_i(x) = sigma(u_i . x) v_i and its fused kernels.
///
/// Storage: one table "experts" [N, 2D], row i = [u_i | v_i]. Keeping u_i and v_i adjacent makes one
/// expert one contiguous 2D-scalar gather; measured on this project's machine it raised random-row
/// throughput by 39% at D = 128, 31% at 256 and 15% at 512 (7% lower at 1024), see docs/design.md.
///
/// Forward, per token t with S = H * k slots (expert ids[t, s], gates g[t, s]):
///   z_s = u_{id_s} . x_t,   y_t = sum_s g_s sigma(z_s) v_{id_s}
/// in two passes over the slots (the dots, then the axpys; forward_token says why): each half of an
/// expert row is read once and nothing of size [B, S, D] exists.
/// Backward, with dy_t given:
///   dh_s = v . dy_t,  dg_s = sigma(z_s) dh_s,  dz_s = g_s sigma'(z_s) dh_s,  dx_t += dz_s u,
///   du_i = sum over slots s holding i of dz_s x_t(s),   dv_i = sum of g_s sigma(z_s) dy_t(s).
/// The row gradients are row-sparse: slots are grouped by expert id (stable radix sort) and each touched
/// row is summed once, in slot order, by one thread: no atomics, identical for any thread count.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/row_scatter.hpp"
#include "peer/core/types.hpp"
#include "peer/nn/activation.hpp"
#include "peer/retrieval/product_keys.hpp"

namespace peer {

/// Shape of an expert pool.
struct ExpertPoolConfig {
  Index num_experts = 1024 * 1024;  ///< N
  Index model_dim = 256;            ///< D
  Activation activation = Activation::kGelu;
  /// How the table is stored: the layer's Scalar, or bfloat16 (half the bytes; computed in Scalar).
  TableStorage storage = TableStorage::kNative;
};

/// N single-neuron experts sharing one [N, 2D] table; a stage of its own: it takes ids and gates from any
/// router (the PEER layer's product keys, or the user's own).
template <typename Scalar>
class SingleNeuronExperts {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  /// Tokens per parallel chunk.
  static constexpr Index kTokenGrain = 16;
  /// How many slots ahead the kernels prefetch expert rows (0: none; see PEER_PREFETCH_ROWS in row_table.hpp).
  static constexpr Index kPrefetchSlots = PEER_PREFETCH_ROWS;
  /// The table's parameter name in a layer.
  static constexpr const char* kTableName = "experts";

  /// Scalars per row: [u_i | v_i], 2 D.
  static Index row_cols(Index model_dim) { return 2 * model_dim; }
  /// FLOPs per slot (2 per multiply-add; activations left out): forward u . x and the axpy of v (4 D);
  /// backward v . dy, dx += dz u, du += dz x and dv += g h dy (8 D).
  static double forward_flops_per_slot(Index model_dim) { return 4.0 * static_cast<double>(model_dim); }
  static double backward_flops_per_slot(Index model_dim) { return 8.0 * static_cast<double>(model_dim); }

  struct Workspace {
    std::vector<Scalar> coef_u, coef_v;  // [B * S] per-slot factors of du and dv rows
    detail::RowScatterWorkspace<Scalar> scatter;
  };

  SingleNeuronExperts() = default;
  explicit SingleNeuronExperts(const ExpertPoolConfig& config) : config_(config) {}

  const ExpertPoolConfig& config() const { return config_; }
  Index num_experts() const { return config_.num_experts; }
  Index model_dim() const { return config_.model_dim; }
  TableHandle table_handle() const { return table_; }

  void register_parameters(ParameterLayout& layout, const std::string& name) {
    table_ = layout.add_table(name, config_.num_experts, 2 * config_.model_dim, config_.storage);
  }

  /// u_i, v_i ~ N(0, 1/D), independently per entry (docs/design.md gives the reasons); a bf16 table
  /// holds the same draws rounded to nearest.
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    initialize_rows(params.table(table_), seed, params.layout().spec(table_).name, config_.model_dim);
  }

  /// The initialization's rows first_row, first_row + row_stride, ... of a table named `name` (a shard of
  /// it, ShardedExperts): every entry N(0, 1 / D), drawn from the entry's place in the whole table.
  static void initialize_rows(RowTable<Scalar>& table, std::uint64_t seed, const std::string& name, Index model_dim,
                              Index row_stride = 1, Index first_row = 0) {
    detail::fill_table_normal(table, seed, name, 1.0 / std::sqrt(static_cast<double>(model_dim)), row_stride, first_row);
  }

  /// y_t = sum_s gates[t, s] sigma(u_{ids[t, s]} . x_t) v_{ids[t, s]}.
  /// x [B, D]; ids, gates [B, S] (any S); y [B, D] assigned; z [B, S] assigned with the pre-activations
  /// u . x that backward needs. Throws std::invalid_argument for an id outside [0, N).
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
               const ConstMatrixRef<Scalar>& gates, MatrixRef<Scalar> y, MatrixRef<Scalar> z) const {
    const Index b_count = x.rows(), slots = ids.cols(), d = model_dim();
    check_forward_arguments(x, ids, gates, y, z, num_experts(), d);
    const auto& table = params.table(table_);
    const Activation act = config_.activation;
    parallel_for(b_count, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        y.row(t).setZero();
        forward_token(table, act, d, x.row(t).data(), ids.row(t).data(), gates.row(t).data(), slots, y.row(t).data(), z.row(t).data());
      }
    });
  }

  /// One token's forward over its c slots: z_j = u_{rows[j]} . x, then y += sum_j g_j sigma(z_j) v_{rows[j]}
  /// (y is added to). Two passes over the slots, all the dots first and then all the axpys: successive dots
  /// are independent, so the CPU overlaps the loads of several rows, where one pass of dot-then-axpy per
  /// slot made every row's loads wait behind the previous slot's axpy into y. Measured with
  /// bench_kernels' BM_ExpertForward_Fused at N = 1024^2, 2 threads: 22% less time with AVX-512 and 40%
  /// less in an AVX2 build (docs/benchmarks.md, "Two passes per token"). The sums and their order are
  /// those of the one-pass loop, so the results are bitwise the same. Each pass prefetches the half it
  /// reads, kPrefetchSlots slots ahead.
  static void forward_token(const RowTable<Scalar>& table, Activation act, Index d, const Scalar* x, const ExpertId* rows,
                            const Scalar* gates, Index c, Scalar* y, Scalar* z) {
    for (Index j = 0; j < c; ++j) {
      if (kPrefetchSlots > 0 && j + kPrefetchSlots < c) table.prefetch(rows[j + kPrefetchSlots], 0, d);
      z[j] = table.dot(rows[j], 0, x, d);  // u . x
    }
    for (Index j = 0; j < c; ++j) {
      if (kPrefetchSlots > 0 && j + kPrefetchSlots < c) table.prefetch(rows[j + kPrefetchSlots], d, d);
      table.axpy(rows[j], d, gates[j] * activate(act, z[j]), y, d);  // y += g sigma(z) v
    }
  }

  /// One token's backward over its c slots (forward_token's rows, gates and z; dy the token's dL/dy):
  /// dh_j = v . dy, dgates[j] = sigma(z_j) dh_j, coef_u[j] = dz_j = g_j sigma'(z_j) dh_j and
  /// coef_v[j] = g_j sigma(z_j) (the factors of du and dv), then dx += sum_j dz_j u_{rows[j]} unless dx is
  /// null. Two passes, the dots and then the axpys, for forward_token's reason; the same results bitwise.
  static void backward_token(const RowTable<Scalar>& table, Activation act, Index d, const Scalar* dy, const ExpertId* rows,
                             const Scalar* gates, const Scalar* z, Index c, Scalar* dx, Scalar* dgates, Scalar* coef_u,
                             Scalar* coef_v) {
    for (Index j = 0; j < c; ++j) {
      if (kPrefetchSlots > 0 && j + kPrefetchSlots < c) table.prefetch(rows[j + kPrefetchSlots], d, d);
      const Scalar dh = table.dot(rows[j], d, dy, d);  // v . dy
      const Scalar h = activate(act, z[j]);
      dgates[j] = h * dh;
      coef_u[j] = gates[j] * activate_derivative(act, z[j]) * dh;
      coef_v[j] = gates[j] * h;
    }
    if (dx == nullptr) return;
    for (Index j = 0; j < c; ++j) {
      if (kPrefetchSlots > 0 && j + kPrefetchSlots < c) table.prefetch(rows[j + kPrefetchSlots], 0, d);
      table.axpy(rows[j], 0, coef_u[j], dx, d);  // dx += dz u
    }
  }

  /// Backward of forward (same x, ids, gates, and the z it produced), with dL/dy [B, D]:
  /// dx += dL/dx (skipped when dx has no rows); dgates [B, S] assigned; the table's row-sparse gradient
  /// gets du_i | dv_i added for every touched expert i (each row once).
  void backward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
                const ConstMatrixRef<Scalar>& gates, const ConstMatrixRef<Scalar>& z, const ConstMatrixRef<Scalar>& dy,
                MatrixRef<Scalar> dx, MatrixRef<Scalar> dgates, Gradients<Scalar>& grads, Workspace& ws) const {
    const Index b_count = x.rows(), slots = ids.cols(), d = model_dim();
    check_backward_arguments(x, ids, gates, z, dy, dx, dgates, num_experts(), d);
    const auto& table = params.table(table_);
    const Activation act = config_.activation;
    const Index items = b_count * slots;
    ws.coef_u.resize(static_cast<std::size_t>(items));
    ws.coef_v.resize(static_cast<std::size_t>(items));
    const bool want_dx = dx.rows() > 0;
    parallel_for(b_count, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        const auto first = static_cast<std::size_t>(t * slots);
        backward_token(table, act, d, dy.row(t).data(), ids.row(t).data(), gates.row(t).data(), z.row(t).data(), slots,
                       want_dx ? dx.row(t).data() : nullptr, dgates.row(t).data(), ws.coef_u.data() + first,
                       ws.coef_v.data() + first);
      }
    });
    // Row gradients: du_i | dv_i, each touched row summed once, in slot order.
    detail::scatter_rows(ids, num_experts(), 2 * d, grads.table(table_), ws.scatter, [&](Index item, auto row) {
      const Index t = item / slots;
      row.head(d) += ws.coef_u[static_cast<std::size_t>(item)] * x.row(t);
      row.tail(d) += ws.coef_v[static_cast<std::size_t>(item)] * dy.row(t);
    });
  }

  /// forward()'s checks of its arguments (std::invalid_argument naming the first that is wrong).
  static void check_forward_arguments(const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
                                      const ConstMatrixRef<Scalar>& gates, const MatrixRef<Scalar>& y,
                                      const MatrixRef<Scalar>& z, Index num_experts, Index d) {
    const Index b_count = x.rows(), slots = ids.cols();
    detail::check_shape("x", x.rows(), x.cols(), b_count, d);
    detail::check_shape("gates", gates.rows(), gates.cols(), b_count, slots);
    detail::check_shape("ids", ids.rows(), ids.cols(), b_count, slots);
    detail::check_shape("y", y.rows(), y.cols(), b_count, d);
    detail::check_shape("z", z.rows(), z.cols(), b_count, slots);
    detail::check_ids(ids, num_experts);
  }
  /// backward()'s checks of its arguments.
  static void check_backward_arguments(const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
                                       const ConstMatrixRef<Scalar>& gates, const ConstMatrixRef<Scalar>& z,
                                       const ConstMatrixRef<Scalar>& dy, const MatrixRef<Scalar>& dx,
                                       const MatrixRef<Scalar>& dgates, Index num_experts, Index d) {
    const Index b_count = x.rows(), slots = ids.cols();
    detail::check_shape("x", x.rows(), x.cols(), b_count, d);
    detail::check_shape("ids", ids.rows(), ids.cols(), b_count, slots);
    detail::check_shape("gates", gates.rows(), gates.cols(), b_count, slots);
    detail::check_shape("z", z.rows(), z.cols(), b_count, slots);
    detail::check_shape("dy", dy.rows(), dy.cols(), b_count, d);
    if (dx.rows() > 0) detail::check_shape("dx", dx.rows(), dx.cols(), b_count, d);
    detail::check_shape("dgates", dgates.rows(), dgates.cols(), b_count, slots);
    detail::check_ids(ids, num_experts);
  }

 private:
  ExpertPoolConfig config_;
  TableHandle table_;
};

}  // namespace peer

#endif  // PEER_EXPERTS_SINGLE_NEURON_EXPERTS_HPP
