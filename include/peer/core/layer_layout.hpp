// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_LAYER_LAYOUT_HPP
#define PEER_CORE_LAYER_LAYOUT_HPP

/// \file
/// detail::LayerLayout: what every layer shares about its tensors. A layer owns the ParameterLayout its
/// components register into, makes owned parameters (initialized by its own initialize()) and gradients
/// from it, and checks that the parameters and gradients it is handed were made for it (from
/// make_parameters()/make_gradients(), from layout(), or as a view of a model's: peer/model).

#include <cstdint>
#include <stdexcept>
#include <string>

#include "peer/core/gradients.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace detail {

/// CRTP base: Layer implements initialize(Parameters<Scalar>&, std::uint64_t seed) const.
template <typename Layer, typename Scalar>
class LayerLayout {
 public:
  /// The named list of the layer's tensors (name, shape, kind).
  const ParameterLayout& layout() const { return layout_; }

  /// Owned parameters, initialized from `seed` (see the layer's initialize()).
  Parameters<Scalar> make_parameters(std::uint64_t seed) const {
    Parameters<Scalar> params(layout_);
    static_cast<const Layer&>(*this).initialize(params, seed);
    return params;
  }

  /// Owned, zeroed gradients.
  Gradients<Scalar> make_gradients() const { return Gradients<Scalar>(layout_); }

 protected:
  LayerLayout() : layout_(static_cast<Index>(sizeof(Scalar))) {}

  /// Throws std::invalid_argument unless `other` is this layer's layout; `what` names the argument
  /// ("params", "grads").
  void check_layout(const ParameterLayout& other, const char* what) const {
    if (other != layout_) {
      throw std::invalid_argument(std::string(what) +
                                  " were made for a different layout than this layer's (make them with "
                                  "make_parameters()/make_gradients() or from layout())");
    }
  }

  ParameterLayout layout_;
};

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_LAYER_LAYOUT_HPP
