// SPDX-License-Identifier: MIT
#ifndef PEER_TESTING_GRADIENT_CHECK_HPP
#define PEER_TESTING_GRADIENT_CHECK_HPP

/// \file
/// Central-difference gradient checks, for the library's own tests and for users' layers and models (as
/// dlib's test_layer and mlpack's JacobianTest are for theirs).
///
/// For a scalar loss L(theta) and an entry e of theta, the check compares
///   numeric(e) = (L(theta + eps u_e) - L(theta - eps u_e)) / (2 eps)
/// with the analytic gradient a(e), and passes when |numeric - a| <= atol + rtol max(|numeric|, |a|).
/// In double with eps = 1e-6 the truncation error is O(eps^2 L''') and the rounding error O(1e-16 L / eps),
/// so agreement to 1e-6 relative is expected of a correct gradient and fails for a wrong one.
///
/// Sparse layers select experts by top-k, which is discontinuous: a perturbation that changes the
/// selection compares two different functions. Either hold the routing fixed (ProductKeyLayer's
/// forward_routed(), which check_layer_gradients uses by itself) or pass `same_routing`, and entries whose
/// perturbation changes the routing are skipped and counted.
///
/// Nothing here depends on a test framework: results are returned, and GradientCheckResult::report()
/// lists the failures for the caller's assertion.

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peer/core/gradients.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace testing {

struct GradientCheckOptions {
  double epsilon = 1e-6;
  double rtol = 1e-6;
  double atol = 1e-8;
  /// Entries checked per tensor (evenly spread over it); 0 checks all.
  Index max_entries = 0;
};

struct GradientCheckResult {
  Index checked = 0;
  Index skipped = 0;    ///< perturbations that changed the routing
  double max_error = 0; ///< largest |numeric - analytic| among the checked entries
  std::vector<std::string> failures;

  bool ok() const { return failures.empty(); }
  /// The first failures, one a line.
  std::string report(std::size_t max_lines = 20) const {
    std::ostringstream out;
    out << checked << " checked, " << skipped << " skipped, " << failures.size() << " failed, max error " << max_error;
    for (std::size_t i = 0; i < failures.size() && i < max_lines; ++i) out << "\n  " << failures[i];
    return out.str();
  }
  void merge(const GradientCheckResult& other) {
    checked += other.checked;
    skipped += other.skipped;
    max_error = std::max(max_error, other.max_error);
    failures.insert(failures.end(), other.failures.begin(), other.failures.end());
  }
};

/// Checks entries of `values` (count doubles, perturbed in place and restored bit for bit) against
/// analytic(e). loss() recomputes L from the current values; same_routing (optional) says whether the
/// last loss() call routed as the unperturbed one did.
inline GradientCheckResult check_entries(const std::string& what, double* values, Index count,
                                         const std::function<double(Index)>& analytic,
                                         const std::function<double()>& loss,
                                         const std::function<bool()>& same_routing = {},
                                         const GradientCheckOptions& options = {}) {
  GradientCheckResult result;
  const Index stride = options.max_entries > 0 ? std::max<Index>(1, count / options.max_entries) : 1;
  for (Index e = 0; e < count; e += stride) {
    const double saved = values[e];
    values[e] = saved + options.epsilon;
    const double lp = loss();
    const bool same_p = !same_routing || same_routing();
    values[e] = saved - options.epsilon;
    const double lm = loss();
    const bool same_m = !same_routing || same_routing();
    values[e] = saved;
    if (!same_p || !same_m) {
      ++result.skipped;
      continue;
    }
    const double numeric = (lp - lm) / (2 * options.epsilon);
    const double a = analytic(e);
    const double err = std::abs(numeric - a);
    result.max_error = std::max(result.max_error, err);
    if (!(err <= options.atol + options.rtol * std::max(std::abs(numeric), std::abs(a)))) {
      std::ostringstream msg;
      msg.precision(10);
      msg << what << " entry " << e << ": numeric " << numeric << ", analytic " << a;
      result.failures.push_back(msg.str());
    }
    ++result.checked;
  }
  return result;
}

/// Checks every trained tensor of `params` (dense tensors, every entry of every table) against `grads`,
/// which must hold dL/dparams for the current values (a table's rows not in its row-sparse gradient have
/// gradient 0, and are checked as such). Buffers are not trained and not checked.
inline GradientCheckResult check_parameters(Parameters<double>& params, const Gradients<double>& grads,
                                            const std::function<double()>& loss,
                                            const std::function<bool()>& same_routing = {},
                                            const GradientCheckOptions& options = {}) {
  GradientCheckResult result;
  const ParameterLayout& layout = params.layout();
  for (std::size_t i = 0; i < layout.dense().size(); ++i) {
    const TensorSpec& s = layout.dense()[i];
    const double* g = grads.dense_data() + s.offset;
    result.merge(check_entries(s.name, params.dense_data() + s.offset, s.size(), [g](Index e) { return g[e]; }, loss,
                               same_routing, options));
  }
  for (std::size_t t = 0; t < layout.tables().size(); ++t) {
    const TableHandle h{static_cast<int>(t)};
    const RowSparseGrad<double>& g = grads.table(h);
    const Index cols = layout.tables()[t].cols;
    result.merge(check_entries(
        layout.tables()[t].name, params.table(h).data(), layout.tables()[t].size(),
        [&g, cols](Index e) {
          const double* row = g.find(static_cast<ExpertId>(e / cols));
          return row == nullptr ? 0.0 : row[e % cols];
        },
        loss, same_routing, options));
  }
  return result;
}

namespace detail {

// forward_routed(params, x, ids, y, cache, mode): the product-key layers hold their experts.
template <typename Layer, typename = void>
struct HoldsIds : std::false_type {};
template <typename Layer>
struct HoldsIds<Layer, std::void_t<decltype(std::declval<const Layer&>().forward_routed(
                           std::declval<Parameters<double>&>(), std::declval<const RowMatrix<double>&>(),
                           std::declval<const IdMatrix&>(), std::declval<RowMatrix<double>&>(),
                           std::declval<typename Layer::Cache&>(), Mode::kTrain))>> : std::true_type {};
// forward_routed(params, x, routed cache, y, cache, mode): the coarse MoE holds its assignments.
template <typename Layer, typename = void>
struct HoldsCache : std::false_type {};
template <typename Layer>
struct HoldsCache<Layer, std::void_t<decltype(std::declval<const Layer&>().forward_routed(
                             std::declval<Parameters<double>&>(), std::declval<const RowMatrix<double>&>(),
                             std::declval<const typename Layer::Cache&>(), std::declval<RowMatrix<double>&>(),
                             std::declval<typename Layer::Cache&>(), Mode::kTrain))>> : std::true_type {};

}  // namespace detail

/// dlib's test_layer for this library's layer interface: with L = <y, R> for a random R (seeded), checks
/// dL/dx and dL/dparams from one backward against central differences of forward in `mode`. A layer
/// with forward_routed() (the product-key layers, the coarse MoE) is checked with the routing of the
/// first forward held fixed, so no entry is skipped. Layer in double. A MoE's load-balancing loss is not
/// part of L here: check it with load_balance_weight = 0 or through check_entries.
template <typename Layer>
GradientCheckResult check_layer_gradients(const Layer& layer, Parameters<double>& params, const RowMatrix<double>& x,
                                          Mode mode, std::uint64_t seed = 1, const GradientCheckOptions& options = {}) {
  const Index b = x.rows(), d = x.cols();
  RowMatrix<double> r(b, d);
  const CounterRng rng(seed, 0x7e57);
  for (Index i = 0; i < r.size(); ++i) r.data()[i] = rng.uniform(static_cast<std::uint64_t>(i), -1.0, 1.0);
  typename Layer::Cache cache;
  RowMatrix<double> y(b, d);
  layer.forward(params, x, y, cache, mode);
  IdMatrix ids;
  if constexpr (detail::HoldsIds<Layer>::value) ids = cache.ids;
  Gradients<double> grads = layer.make_gradients();
  RowMatrix<double> dx = RowMatrix<double>::Zero(b, d);
  layer.backward(params, cache, r, dx, grads);
  RowMatrix<double> xv = x;
  auto loss = [&] {
    typename Layer::Cache probe;
    RowMatrix<double> yp(b, d);
    if constexpr (detail::HoldsIds<Layer>::value) {
      layer.forward_routed(params, xv, ids, yp, probe, mode);
    } else if constexpr (detail::HoldsCache<Layer>::value) {
      layer.forward_routed(params, xv, cache, yp, probe, mode);
    } else {
      layer.forward(params, xv, yp, probe, mode);
    }
    return (yp.array() * r.array()).sum();
  };
  GradientCheckResult result = check_entries("x", xv.data(), xv.size(), [&](Index e) { return dx.data()[e]; }, loss, {}, options);
  result.merge(check_parameters(params, grads, loss, {}, options));
  return result;
}

}  // namespace testing
}  // namespace peer

#endif  // PEER_TESTING_GRADIENT_CHECK_HPP
