// SPDX-License-Identifier: MIT
#ifndef PEER_LAYERS_GATING_HPP
#define PEER_LAYERS_GATING_HPP

/// \file
/// Router weights g from one head's k kept scores s (sorted descending). Experts that were not kept have
/// weight exactly 0 in every mode.

#include <cmath>
#include <stdexcept>
#include <string>

#include "peer/core/types.hpp"

namespace peer {

/// How a head turns its k kept scores into expert weights.
enum class Gating {
  kSoftmax,  ///< g = softmax(s) over the head's k kept scores (the paper)
  kReLU,     ///< g = max(s, 0), non-competing (PEER-pytorch's default)
  kSigmoid,  ///< g = 1 / (1 + exp(-s)), non-competing
};

inline const char* to_string(Gating g) {
  switch (g) {
    case Gating::kSoftmax: return "softmax";
    case Gating::kReLU: return "relu";
    case Gating::kSigmoid: return "sigmoid";
  }
  return "unknown";
}

/// Parses "softmax", "relu" or "sigmoid".
inline Gating gating_from_string(const std::string& name) {
  for (Gating g : {Gating::kSoftmax, Gating::kReLU, Gating::kSigmoid}) {
    if (name == to_string(g)) return g;
  }
  throw std::invalid_argument("gating = \"" + name + "\" must be one of softmax, relu, sigmoid");
}

/// gates[0..k) from scores[0..k).
template <typename Scalar>
inline void gate_forward(Gating mode, const Scalar* scores, Index k, Scalar* gates) {
  switch (mode) {
    case Gating::kSoftmax: {
      // Shift by the maximum for range safety: softmax(s) = softmax(s - max s).
      Scalar max = scores[0];
      for (Index j = 1; j < k; ++j) max = scores[j] > max ? scores[j] : max;
      Scalar sum = 0;
      for (Index j = 0; j < k; ++j) {
        gates[j] = std::exp(scores[j] - max);
        sum += gates[j];
      }
      const Scalar inv = Scalar(1) / sum;
      for (Index j = 0; j < k; ++j) gates[j] *= inv;
      return;
    }
    case Gating::kReLU:
      for (Index j = 0; j < k; ++j) gates[j] = scores[j] > Scalar(0) ? scores[j] : Scalar(0);
      return;
    case Gating::kSigmoid:
      for (Index j = 0; j < k; ++j) gates[j] = Scalar(1) / (Scalar(1) + std::exp(-scores[j]));
      return;
  }
}

/// dscores[0..k) (assigned) from the gates forward produced and dL/dgates.
///   softmax: ds_j = g_j (dg_j - sum_i g_i dg_i);  relu: ds_j = dg_j [s_j > 0];  sigmoid: ds_j = dg_j g_j (1 - g_j).
template <typename Scalar>
inline void gate_backward(Gating mode, const Scalar* scores, const Scalar* gates, const Scalar* dgates, Index k,
                          Scalar* dscores) {
  switch (mode) {
    case Gating::kSoftmax: {
      Scalar dot = 0;
      for (Index j = 0; j < k; ++j) dot += gates[j] * dgates[j];
      for (Index j = 0; j < k; ++j) dscores[j] = gates[j] * (dgates[j] - dot);
      return;
    }
    case Gating::kReLU:
      for (Index j = 0; j < k; ++j) dscores[j] = scores[j] > Scalar(0) ? dgates[j] : Scalar(0);
      return;
    case Gating::kSigmoid:
      for (Index j = 0; j < k; ++j) dscores[j] = dgates[j] * gates[j] * (Scalar(1) - gates[j]);
      return;
  }
}

}  // namespace peer

#endif  // PEER_LAYERS_GATING_HPP
