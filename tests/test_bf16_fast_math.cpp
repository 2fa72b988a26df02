// The bf16 write-back's NaN rule under -Ofast (tests/CMakeLists.txt: this file is built three times, with
// the project's flags, with -mavx2 -mfma and with -mavx512f, each with -Ofast). -ffinite-math-only lets the
// compiler assume no NaN exists, which folds a float compare of x with itself to "not NaN"; the vector
// paths must find NaN lanes from their bit patterns, so that every NaN still becomes the quiet NaN with its
// sign, never inf and never a value wrapped into the other sign (as test_fast_math checks for the library's
// other non-finite tests).
#include <gtest/gtest.h>

#include "cpu_guard.hpp"

#include <cstdint>
#include <cstring>
#include <vector>

#include <peer/core/bfloat16.hpp>
#include <peer/core/row_blocks.hpp>

#if !defined(__FINITE_MATH_ONLY__) || __FINITE_MATH_ONLY__ != 1
#error "test_bf16_fast_math must be built with -ffinite-math-only (-Ofast)"
#endif

namespace {

namespace pd = peer::detail;
using peer::Index;

// Every test of the binary needs its instructions (tests/cpu_guard.hpp).
[[maybe_unused]] const ::testing::Environment* const kRequirePath =
    peer_test::skip_all_tests_unless(peer_test::cpu_has_build_path, "this CPU lacks the instructions this build uses");

float from_bits(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// A row of 40 columns (two 16-column blocks and a tail) of 1.5 (exact in bf16 under either rounding) with
// one NaN, at every position, for signalling, quiet and all-payload NaNs of both signs; written back by the
// row functions and by the optimizers' row blocks (Bf16RowBlocks), to nearest and stochastically.
TEST(Bf16FastMath, EveryNaNStillBecomesTheQuietNaNWithItsSign) {
  constexpr Index n = 40;
  constexpr std::uint16_t kOne5 = 0x3fc0;  // 1.5
  for (const std::uint32_t nan : {0x7f800001u, 0x7fc00000u, 0x7fffffffu, 0x7f80ffffu, 0xff800001u, 0xffffffffu}) {
    const std::uint16_t want = static_cast<std::uint16_t>(((nan >> 16) & 0x8000u) | 0x7fc0u);
    for (Index pos = 0; pos < n; ++pos) {
      std::vector<float> row(static_cast<std::size_t>(n), 1.5f);
      row[static_cast<std::size_t>(pos)] = from_bits(nan);
      const pd::RoundingStream stream{0x2545f491u};
      std::vector<std::vector<peer::bfloat16>> outs(4, std::vector<peer::bfloat16>(static_cast<std::size_t>(n)));
      pd::narrow_row_nearest(row.data(), outs[0].data(), n);
      pd::narrow_row_stochastic(row.data(), outs[1].data(), n, stream);
      for (int stochastic = 0; stochastic < 2; ++stochastic) {
        pd::Bf16RowBlocks<float> blocks(outs[static_cast<std::size_t>(2 + stochastic)].data(), n, stochastic == 1, stream);
        Index j = 0;
        for (; j + pd::kRowBlock <= n; j += pd::kRowBlock) {
          blocks.store(j, Eigen::Map<const Eigen::Array<float, pd::kRowBlock, 1>>(row.data() + j));
        }
        for (; j < n; ++j) blocks.set(j, row[static_cast<std::size_t>(j)]);
      }
      for (std::size_t o = 0; o < outs.size(); ++o) {
        for (Index j = 0; j < n; ++j) {
          ASSERT_EQ(pd::bf16_bits(outs[o][static_cast<std::size_t>(j)]), j == pos ? want : kOne5)
              << "writer " << o << ", NaN 0x" << std::hex << nan << std::dec << " at column " << pos << ", column " << j;
        }
      }
    }
  }
}

}  // namespace
