// SPDX-License-Identifier: MIT
#ifndef PEER_NN_ACTIVATION_HPP
#define PEER_NN_ACTIVATION_HPP

/// \file
/// The experts' activation sigma and its derivative. Forward and backward use the same formulas, so the
/// derivative is the exact derivative of what forward computed.

#include <cmath>
#include <stdexcept>
#include <string>

#include "peer/core/types.hpp"

namespace peer {

/// sigma in e_i(x) = sigma(u_i . x) v_i.
enum class Activation {
  kReLU,      ///< max(0, z); derivative 1 for z > 0, else 0
  kGelu,      ///< z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2)), exact (the library default)
  kGeluTanh,  ///< 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))), the common approximation
  kSiLU,      ///< z * logistic(z)
};

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::kReLU: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
    case Activation::kSiLU: return "silu";
  }
  return "unknown";
}

/// Parses "relu", "gelu", "gelu_tanh" or "silu".
inline Activation activation_from_string(const std::string& name) {
  for (Activation a : {Activation::kReLU, Activation::kGelu, Activation::kGeluTanh, Activation::kSiLU}) {
    if (name == to_string(a)) return a;
  }
  throw std::invalid_argument("activation = \"" + name + "\" must be one of relu, gelu, gelu_tanh, silu");
}

namespace detail {
template <typename Scalar>
struct ActivationConstants {
  static constexpr Scalar kInvSqrt2 = Scalar(0.70710678118654752440084436210485);
  static constexpr Scalar kInvSqrt2Pi = Scalar(0.39894228040143267793994605993438);
  static constexpr Scalar kSqrt2OverPi = Scalar(0.79788456080286535587989211986876);
  static constexpr Scalar kCubic = Scalar(0.044715);
};
}  // namespace detail

/// sigma(z).
template <typename Scalar>
inline Scalar activate(Activation a, Scalar z) {
  using C = detail::ActivationConstants<Scalar>;
  switch (a) {
    case Activation::kReLU: return z > Scalar(0) ? z : Scalar(0);
    case Activation::kGelu: return Scalar(0.5) * z * (Scalar(1) + std::erf(z * C::kInvSqrt2));
    case Activation::kGeluTanh:
      return Scalar(0.5) * z * (Scalar(1) + std::tanh(C::kSqrt2OverPi * (z + C::kCubic * z * z * z)));
    case Activation::kSiLU: return z / (Scalar(1) + std::exp(-z));
  }
  return z;
}

/// d sigma / dz at z.
template <typename Scalar>
inline Scalar activate_derivative(Activation a, Scalar z) {
  using C = detail::ActivationConstants<Scalar>;
  switch (a) {
    case Activation::kReLU: return z > Scalar(0) ? Scalar(1) : Scalar(0);
    case Activation::kGelu:
      // Phi(z) + z phi(z)
      return Scalar(0.5) * (Scalar(1) + std::erf(z * C::kInvSqrt2)) +
             z * C::kInvSqrt2Pi * std::exp(Scalar(-0.5) * z * z);
    case Activation::kGeluTanh: {
      const Scalar inner = C::kSqrt2OverPi * (z + C::kCubic * z * z * z);
      const Scalar t = std::tanh(inner);
      const Scalar dinner = C::kSqrt2OverPi * (Scalar(1) + Scalar(3) * C::kCubic * z * z);
      return Scalar(0.5) * (Scalar(1) + t) + Scalar(0.5) * z * (Scalar(1) - t * t) * dinner;
    }
    case Activation::kSiLU: {
      const Scalar s = Scalar(1) / (Scalar(1) + std::exp(-z));
      return s * (Scalar(1) + z * (Scalar(1) - s));
    }
  }
  return Scalar(1);
}

}  // namespace peer

#endif  // PEER_NN_ACTIVATION_HPP
