// SPDX-License-Identifier: MIT
#ifndef PEER_EXPERTS_VALUE_MEMORY_HPP
#define PEER_EXPERTS_VALUE_MEMORY_HPP

/// \file
/// The value table of a product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys"):
/// N value vectors v_i in R^D, read by id and mixed by the router's weights. It is the PKM counterpart of
/// SingleNeuronExperts, with the same interface, so one layer template composes either (see
/// peer/layers/product_key_layer.hpp).
///
/// Storage: one table "values" [N, D], row i = v_i.
/// Forward, per token t with S = H * k slots (ids[t, s], gates g[t, s]):   y_t = sum_s g_s v_{id_s}.
/// Backward, with dy_t given:   dg_s = v_{id_s} . dy_t,   dv_i = sum over slots s holding i of g_s dy_t(s).
/// The output does not depend on x except through the router, so there is no dx term here; the row
/// gradient is row-sparse and summed deterministically (peer/core/row_scatter.hpp).

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
#include "peer/experts/single_neuron_experts.hpp"

namespace peer {

/// N value vectors in one [N, D] table; takes ids and gates from any router.
template <typename Scalar>
class ValueMemory {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "peer: Scalar must be float or double");

 public:
  /// Tokens per parallel chunk.
  static constexpr Index kTokenGrain = 16;
  /// How many slots ahead the kernels prefetch value rows (0: none; see PEER_PREFETCH_ROWS in row_table.hpp).
  static constexpr Index kPrefetchSlots = PEER_PREFETCH_ROWS;
  /// The table's parameter name in a layer.
  static constexpr const char* kTableName = "values";

  struct Workspace {
    std::vector<Scalar> coef;  // [B * S] g_s, the factor of dy_t in dv
    detail::RowScatterWorkspace<Scalar> scatter;
  };

  ValueMemory() = default;
  /// Uses num_experts (N) and model_dim (D); a value memory has no activation.
  explicit ValueMemory(const ExpertPoolConfig& config) : config_(config) {}

  const ExpertPoolConfig& config() const { return config_; }
  Index num_experts() const { return config_.num_experts; }
  Index model_dim() const { return config_.model_dim; }
  TableHandle table_handle() const { return table_; }

  /// Scalars per row: D.
  static Index row_cols(Index model_dim) { return model_dim; }
  /// FLOPs per slot: forward the axpy g v (2 D); backward v . dy and the dv axpy (4 D).
  static double forward_flops_per_slot(Index model_dim) { return 2.0 * static_cast<double>(model_dim); }
  static double backward_flops_per_slot(Index model_dim) { return 4.0 * static_cast<double>(model_dim); }

  void register_parameters(ParameterLayout& layout, const std::string& name) {
    table_ = layout.add_table(name, config_.num_experts, config_.model_dim, config_.storage);
  }

  /// v_i ~ N(0, 1/D) per entry, as Lample et al.'s implementation.
  void initialize(Parameters<Scalar>& params, std::uint64_t seed) const {
    detail::fill_table_normal(params.table(table_), seed, params.layout().spec(table_).name,
                              1.0 / std::sqrt(static_cast<double>(config_.model_dim)));
  }

  /// y_t = sum_s gates[t, s] v_{ids[t, s]}. x [B, D] is not read (kept for the shared interface); ids,
  /// gates [B, S]; y [B, D] assigned; z (the experts' pre-activations) is not used and not written.
  void forward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
               const ConstMatrixRef<Scalar>& gates, MatrixRef<Scalar> y, MatrixRef<Scalar> /*z*/) const {
    const Index b_count = x.rows(), slots = ids.cols(), d = model_dim();
    detail::check_shape("gates", gates.rows(), gates.cols(), b_count, slots);
    detail::check_shape("ids", ids.rows(), ids.cols(), b_count, slots);
    detail::check_shape("y", y.rows(), y.cols(), b_count, d);
    detail::check_ids(ids, num_experts());
    const auto& table = params.table(table_);
    parallel_for(b_count, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        y.row(t).setZero();
        Scalar* yt = y.row(t).data();
        for (Index s = 0; s < slots; ++s) {
          if (kPrefetchSlots > 0 && s + kPrefetchSlots < slots) table.prefetch(ids(t, s + kPrefetchSlots));
          table.axpy(ids(t, s), 0, gates(t, s), yt, d);
        }
      }
    });
  }

  /// Backward of forward with dL/dy [B, D]: dgates [B, S] assigned; the table's row-sparse gradient gets
  /// dv_i added for every touched row (each once). dx gets nothing (the values do not read x).
  void backward(const Parameters<Scalar>& params, const ConstMatrixRef<Scalar>& x, const ConstIdMatrixRef& ids,
                const ConstMatrixRef<Scalar>& gates, const ConstMatrixRef<Scalar>& /*z*/,
                const ConstMatrixRef<Scalar>& dy, MatrixRef<Scalar> /*dx*/, MatrixRef<Scalar> dgates,
                Gradients<Scalar>& grads, Workspace& ws) const {
    const Index b_count = x.rows(), slots = ids.cols(), d = model_dim();
    detail::check_shape("ids", ids.rows(), ids.cols(), b_count, slots);
    detail::check_shape("gates", gates.rows(), gates.cols(), b_count, slots);
    detail::check_shape("dy", dy.rows(), dy.cols(), b_count, d);
    detail::check_shape("dgates", dgates.rows(), dgates.cols(), b_count, slots);
    detail::check_ids(ids, num_experts());
    const auto& table = params.table(table_);
    ws.coef.resize(static_cast<std::size_t>(b_count * slots));
    parallel_for(b_count, kTokenGrain, [&](Index t0, Index t1, int) {
      for (Index t = t0; t < t1; ++t) {
        for (Index s = 0; s < slots; ++s) {
          if (kPrefetchSlots > 0 && s + kPrefetchSlots < slots) table.prefetch(ids(t, s + kPrefetchSlots));
          dgates(t, s) = table.dot(ids(t, s), 0, dy.row(t).data(), d);
          ws.coef[static_cast<std::size_t>(t * slots + s)] = gates(t, s);
        }
      }
    });
    detail::scatter_rows(ids, num_experts(), d, grads.table(table_), ws.scatter, [&](Index item, auto row) {
      row += ws.coef[static_cast<std::size_t>(item)] * dy.row(item / slots);
    });
  }

 private:
  ExpertPoolConfig config_;
  TableHandle table_;
};

}  // namespace peer

#endif  // PEER_EXPERTS_VALUE_MEMORY_HPP
