// Built with -Ofast (tests/CMakeLists.txt), as C trainers such as llm.c build: -ffinite-math-only lets the
// compiler assume no NaN or infinity exists, which folds std::isfinite(x), x == x and x - x == 0 to
// "finite". The library's non-finite checks decide from bit patterns and must still fire here.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include <peer/layers/peer_layer.hpp>
#include <peer/optim/adam.hpp>

#if !defined(__FINITE_MATH_ONLY__) || __FINITE_MATH_ONLY__ != 1
#error "test_fast_math must be built with -ffinite-math-only (-Ofast)"
#endif

namespace {

template <typename S>
S from_bits(typename peer::detail::FloatBits<S>::Bits u) {
  S x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

TEST(FastMath, BitTestsClassifyEverySpecialValue) {
  using F = std::numeric_limits<float>;
  EXPECT_TRUE(peer::detail::is_finite(0.0f));
  EXPECT_TRUE(peer::detail::is_finite(-0.0f));
  EXPECT_TRUE(peer::detail::is_finite(F::denorm_min()));
  EXPECT_TRUE(peer::detail::is_finite(F::max()));
  EXPECT_TRUE(peer::detail::is_finite(-F::max()));
  EXPECT_FALSE(peer::detail::is_finite(from_bits<float>(0x7F800000u)));  // +inf
  EXPECT_FALSE(peer::detail::is_finite(from_bits<float>(0xFF800000u)));  // -inf
  EXPECT_FALSE(peer::detail::is_finite(from_bits<float>(0x7FC00000u)));  // quiet NaN
  EXPECT_FALSE(peer::detail::is_finite(from_bits<float>(0x7F800001u)));  // signalling NaN
  EXPECT_FALSE(peer::detail::is_finite(from_bits<float>(0xFFFFFFFFu)));  // negative NaN, all payload bits
  EXPECT_TRUE(peer::detail::is_finite(std::numeric_limits<double>::max()));
  EXPECT_FALSE(peer::detail::is_finite(from_bits<double>(0x7FF0000000000000ull)));
  EXPECT_FALSE(peer::detail::is_finite(from_bits<double>(0x7FF8000000000001ull)));
}

TEST(FastMath, NonFiniteInputIsStillRefusedByForwardAndInfer) {
  peer::PeerConfig c;
  c.model_dim = 8;
  c.num_experts = 36;
  c.num_heads = 2;
  c.key_dim = 8;
  c.top_k = 3;
  c.sub_key_top_k = 3;
  peer::PeerLayer<float> layer(c);
  auto params = layer.make_parameters(1);
  for (std::uint32_t bits : {0x7FC00000u, 0x7F800000u, 0xFF800000u}) {
    peer::RowMatrix<float> x = peer::RowMatrix<float>::Constant(6, 8, 0.25f), y(6, 8);
    x(3, 5) = from_bits<float>(bits);
    peer::PeerLayer<float>::Cache cache;
    try {
      layer.forward(params, x, y, cache, peer::Mode::kTrain);
      ADD_FAILURE() << "forward accepted a non-finite input (bits 0x" << std::hex << bits << ")";
    } catch (const std::domain_error& e) {
      EXPECT_NE(std::string(e.what()).find("at [3, 5]"), std::string::npos) << e.what();
    }
    peer::PeerLayer<float>::Workspace ws;
    EXPECT_THROW(layer.infer(params, x, y, ws), std::domain_error) << "infer, bits 0x" << std::hex << bits;
  }
}

TEST(FastMath, NaNAndInfiniteRatesAreStillRefused) {
  peer::ParameterLayout layout;
  layout.add_dense("w", 2, 2);
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    std::vector<peer::ParamGroup> groups{{"all", {""}, bad, 0.0, {}}};
    EXPECT_THROW(peer::Adam<float>(layout, groups), std::invalid_argument);
    groups[0].learning_rate = 1e-3;
    groups[0].weight_decay = bad;
    EXPECT_THROW(peer::Adam<float>(layout, groups), std::invalid_argument);
  }
  peer::PeerConfig c;
  c.norm_epsilon = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(c.validate(), std::invalid_argument);
}

}  // namespace
