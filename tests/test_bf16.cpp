// bfloat16 tables, the optimizers' table state and fused table updates. This file is compiled three times: with the project's flags (the portable paths, plus
// the layer, optimizer and checkpoint tests), with -mavx2 -mfma and with -mavx512f (the conversion and row
// kernels and the one-pass optimizer row updates, PEER_TEST_BF16_KERNELS_ONLY): every vector path must equal
// the scalar definitions bit for bit (conversions, row updates) or to float rounding (dot, axpy). Vector
// builds skip on a CPU without the instructions.
#include <gtest/gtest.h>

#include "cpu_guard.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <peer/core/bfloat16.hpp>
#include <peer/core/row_blocks.hpp>
#include <peer/io/parameters_file.hpp>

#include "test_util.hpp"

namespace {

using peer::bfloat16;
using peer::Index;
namespace pd = peer::detail;

using peer_test::cpu_has_build_path;

#define PEER_REQUIRE_PATH() \
  if (!cpu_has_build_path()) GTEST_SKIP() << "this CPU lacks the instructions this build uses"
// Every test of the binary needs its instructions (tests/cpu_guard.hpp).
[[maybe_unused]] const ::testing::Environment* const kRequirePath =
    peer_test::skip_all_tests_unless(cpu_has_build_path, "this CPU lacks the instructions this build uses");

// The definitions, written as plainly as possible (the oracle of every path).
std::uint16_t ref_nearest(std::uint32_t b) {
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>(((b >> 16) & 0x8000u) | 0x7fc0u);
  const std::uint32_t upper = b >> 16, lower = b & 0xffffu;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) return static_cast<std::uint16_t>(upper + 1);
  return static_cast<std::uint16_t>(upper);
}
std::uint16_t ref_stochastic(std::uint32_t b, std::uint32_t r16) {
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>(((b >> 16) & 0x8000u) | 0x7fc0u);
  return static_cast<std::uint16_t>((static_cast<std::uint64_t>(b) + r16) >> 16);
}

// Floats covering every class: random normals of every binade, subnormals, ties, halfway +- 1, zeros,
// infinities, NaNs (quiet and signalling, both signs), the largest finite values.
std::vector<float> probe_values(std::size_t random_count) {
  std::vector<std::uint32_t> bits = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u,
                                     0x7f800001u, 0xff800001u, 0x7fffffffu, 0xffffffffu, 0x7f7fffffu, 0xff7fffffu,
                                     0x7f7f8000u, 0x7f7f7fffu, 0x00000001u, 0x80000001u, 0x00008000u, 0x00018000u,
                                     0x00007fffu, 0x007fffffu, 0x00800000u, 0x3f808000u, 0x3f818000u, 0x3f808001u,
                                     0x3f807fffu, 0xbf808000u, 0xbf818000u, 0x3f800000u};
  std::mt19937 gen(7);
  for (std::size_t i = 0; i < random_count; ++i) bits.push_back(static_cast<std::uint32_t>(gen()));
  std::vector<float> out;
  for (std::uint32_t b : bits) out.push_back(pd::float_from_bits(b));
  return out;
}

TEST(Bf16Conversion, WideningIsExactAndNarrowingItBackIsTheIdentityForEveryPattern) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const bfloat16 x = pd::bf16_from_bits(static_cast<std::uint16_t>(h));
    const float f = pd::widen_bf16(x);
    ASSERT_EQ(pd::float_bits(f), h << 16);
    const std::uint16_t back = pd::bf16_bits(pd::narrow_bf16_nearest(f));
    const bool nan = (h & 0x7fffu) > 0x7f80u;
    ASSERT_EQ(back, nan ? static_cast<std::uint16_t>((h & 0x8000u) | 0x7fc0u) : h) << std::hex << h;
  }
}

TEST(Bf16Conversion, NearestRoundsTiesToEvenKeepsSubnormalsInfAndNaN) {
  auto near = [](std::uint32_t b) { return pd::bf16_bits(pd::narrow_bf16_nearest(pd::float_from_bits(b))); };
  EXPECT_EQ(near(0x3f808000u), 0x3f80u);  // tie, even below
  EXPECT_EQ(near(0x3f818000u), 0x3f82u);  // tie, odd below: up
  EXPECT_EQ(near(0x3f808001u), 0x3f81u);
  EXPECT_EQ(near(0x3f807fffu), 0x3f80u);
  EXPECT_EQ(near(0xbf818000u), 0xbf82u);  // sign-magnitude: the same rule below zero
  EXPECT_EQ(near(0x00008000u), 0x0000u);  // subnormal tie to even zero, not flushed elsewhere:
  EXPECT_EQ(near(0x00018000u), 0x0002u);
  EXPECT_EQ(near(0x007fffffu), 0x0080u);  // the largest subnormal rounds up to the smallest normal
  EXPECT_EQ(near(0x7f800000u), 0x7f80u);
  EXPECT_EQ(near(0xff800000u), 0xff80u);
  EXPECT_EQ(near(0x7f7fffffu), 0x7f80u);  // beyond the largest bf16: inf
  EXPECT_EQ(near(0x7f7f7fffu), 0x7f7fu);
  EXPECT_EQ(near(0x7f800001u), 0x7fc0u);  // signalling NaN: quiet, never inf
  EXPECT_EQ(near(0xff800001u), 0xffc0u);
  EXPECT_EQ(near(0x7fffffffu), 0x7fc0u);  // never wraps to the sign bit
  EXPECT_EQ(near(0x80000000u), 0x8000u);
  // Eigen's conversion agrees on everything but NaN payloads (both give the canonical quiet NaN).
  for (float f : probe_values(100000)) {
    ASSERT_EQ(pd::bf16_bits(pd::narrow_bf16_nearest(f)), ref_nearest(pd::float_bits(f)));
    if (!std::isnan(f)) {
      ASSERT_EQ(pd::bf16_bits(pd::narrow_bf16_nearest(f)), pd::bf16_bits(bfloat16(f))) << f;
    }
  }
}

TEST(Bf16Conversion, StochasticRoundingIsUnbiasedAndNeverLeavesTheNeighbours) {
  // x between two neighbours lo < hi: every rounding is lo or hi, and the mean of M roundings is x
  // within 5 standard deviations of a Bernoulli mean, at fixed seeds.
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> mag(-30.0f, 30.0f);
  const int kM = 20000;
  for (int trial = 0; trial < 40; ++trial) {
    const float x = std::ldexp(1.0f + static_cast<float>(gen() % 1000) / 997.0f, static_cast<int>(mag(gen))) * (trial % 2 ? -1.0f : 1.0f);
    const std::uint32_t b = pd::float_bits(x);
    const float lo = pd::float_from_bits(b & 0xffff0000u), hi = pd::float_from_bits((b & 0xffff0000u) + 0x10000u);
    double sum = 0.0;
    for (int m = 0; m < kM; ++m) {
      const pd::RoundingStream s{static_cast<std::uint32_t>(m * 2654435761u + 17u)};
      const float r = pd::widen_bf16(pd::narrow_bf16_stochastic(x, pd::rounding_bits(s, static_cast<std::uint32_t>(trial))));
      ASSERT_TRUE(r == lo || r == hi) << x;
      sum += static_cast<double>(r);
    }
    const double p = static_cast<double>(x - lo) / static_cast<double>(hi - lo);
    const double sd = std::abs(static_cast<double>(hi - lo)) * std::sqrt(p * (1 - p) / kM);
    EXPECT_NEAR(sum / kM, static_cast<double>(x), 5 * sd + 1e-300) << "x = " << x;
  }
  // Exactly representable values never move; inf stays inf; NaN is quiet NaN.
  for (std::uint32_t r = 0; r < 65536; r += 97) {
    EXPECT_EQ(pd::widen_bf16(pd::narrow_bf16_stochastic(1.5f, r)), 1.5f);
    EXPECT_EQ(pd::bf16_bits(pd::narrow_bf16_stochastic(std::numeric_limits<float>::infinity(), r)), 0x7f80u);
    EXPECT_EQ(pd::bf16_bits(pd::narrow_bf16_stochastic(pd::float_from_bits(0x7f800001u), r)), 0x7fc0u);
  }
  // The two columns of one hash round independently: for x a quarter of the way up, both go up in a
  // sixteenth of the streams (within 5 standard deviations), for every pair of a row.
  {
    const float quarter = 1.0f + 1.0f / 512.0f;
    for (std::uint32_t pair = 0; pair < 8; ++pair) {
      int both = 0;
      for (int m = 0; m < kM; ++m) {
        const pd::RoundingStream s{static_cast<std::uint32_t>(m * 2654435761u + 3u)};
        const bool up0 = pd::widen_bf16(pd::narrow_bf16_stochastic(quarter, pd::rounding_bits(s, 2 * pair))) > quarter;
        const bool up1 = pd::widen_bf16(pd::narrow_bf16_stochastic(quarter, pd::rounding_bits(s, 2 * pair + 1))) > quarter;
        both += up0 && up1;
      }
      const double p = 1.0 / 16.0;
      EXPECT_NEAR(static_cast<double>(both) / kM, p, 5 * std::sqrt(p * (1 - p) / kM)) << "pair " << pair;
    }
  }
  // A negative control: the same test with the bits reused for every draw must fail the bound.
  const float x = 1.0f + 1.0f / 512.0f;  // a quarter of the way from 1 to the next bf16
  double sum = 0.0;
  for (int m = 0; m < kM; ++m) sum += pd::widen_bf16(pd::narrow_bf16_stochastic(x, pd::rounding_bits({5u}, 0)));
  EXPECT_GT(std::abs(sum / kM - static_cast<double>(x)), 1e-3);
}

// ---- Row kernels of the path this build compiles, against the scalar definitions ----------------------

TEST(Bf16Rows, WidenNarrowAndStochasticRowsEqualTheScalarDefinitionsBitForBit) {
  PEER_REQUIRE_PATH();
  const std::vector<float> values = probe_values(4000);
  for (Index n : {Index{1}, Index{7}, Index{16}, Index{17}, Index{31}, Index{32}, Index{48}, Index{64}, static_cast<Index>(values.size())}) {
    for (std::uint32_t first : {0u, 5u}) {  // the vector blocks start at even columns: an odd first shifts them
      std::vector<bfloat16> narrow(static_cast<std::size_t>(n)), stoch(static_cast<std::size_t>(n));
      pd::narrow_row_nearest(values.data(), narrow.data(), n);
      const pd::RoundingStream stream{0x12345678u};
      pd::narrow_row_stochastic(values.data(), stoch.data(), n, stream, first);
      std::vector<float> wide(static_cast<std::size_t>(n));
      pd::widen_row(narrow.data(), wide.data(), n);
      for (Index j = 0; j < n; ++j) {
        const std::uint32_t b = pd::float_bits(values[static_cast<std::size_t>(j)]);
        ASSERT_EQ(pd::bf16_bits(narrow[static_cast<std::size_t>(j)]), ref_nearest(b)) << "n " << n << " j " << j;
        // Columns 2i and 2i + 1 take the high and the low half of hash32(key + i * 0x9e3779b9).
        const std::uint32_t col = first + static_cast<std::uint32_t>(j);
        const std::uint32_t h = pd::hash32(stream.key + (col / 2) * 0x9e3779b9u);
        const std::uint32_t r = col % 2 == 0 ? h >> 16 : h & 0xffffu;
        ASSERT_EQ(pd::bf16_bits(stoch[static_cast<std::size_t>(j)]), ref_stochastic(b, r)) << "n " << n << " first " << first << " j " << j;
        ASSERT_EQ(pd::float_bits(wide[static_cast<std::size_t>(j)]), static_cast<std::uint32_t>(ref_nearest(b)) << 16);
      }
    }
  }
}

TEST(Bf16Rows, DotAndAxpyEqualDoubleReferencesToFloatRounding) {
  PEER_REQUIRE_PATH();
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (Index n : {Index{1}, Index{5}, Index{8}, Index{16}, Index{24}, Index{32}, Index{100}, Index{512}}) {
    std::vector<bfloat16> row(static_cast<std::size_t>(n));
    std::vector<float> x(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n));
    for (auto& r : row) r = pd::narrow_bf16_nearest(nd(gen));
    for (auto& v : x) v = nd(gen);
    for (auto& v : y) v = nd(gen);
    double ref = 0.0, scale = 0.0;
    for (Index j = 0; j < n; ++j) {
      const double p = static_cast<double>(pd::widen_bf16(row[static_cast<std::size_t>(j)])) * x[static_cast<std::size_t>(j)];
      ref += p;
      scale += std::abs(p);
    }
    const float got = pd::dot_bf16(row.data(), x.data(), n);
    EXPECT_LE(std::abs(static_cast<double>(got) - ref), static_cast<double>(n) * 6e-8 * scale + 1e-30) << "n " << n;
    const float a = 0.75f;
    std::vector<float> y2 = y;
    pd::axpy_bf16(a, row.data(), y2.data(), n);
    for (Index j = 0; j < n; ++j) {
      const double expect = static_cast<double>(y[static_cast<std::size_t>(j)]) +
                            0.75 * static_cast<double>(pd::widen_bf16(row[static_cast<std::size_t>(j)]));
      ASSERT_NEAR(static_cast<double>(y2[static_cast<std::size_t>(j)]), expect, 1.2e-7 * (std::abs(expect) + 1.0));
    }
    // The double versions (double activations on a bf16 table) against the same references.
    std::vector<double> xd(x.begin(), x.end());
    EXPECT_NEAR(pd::dot_bf16(row.data(), xd.data(), n), ref, 1e-12 * (scale + 1.0));
  }
}

// Bf16RowBlocks (the one-pass row update's loads and stores) against the row functions: loads are the
// widened row, stores in any block order and set() on the tail give bitwise what narrow_row_nearest and
// narrow_row_stochastic give for the whole row; the same for double values.
template <typename Scalar>
void check_row_blocks(const std::vector<float>& values, Index n, bool stochastic, bool shuffled) {
  const pd::RoundingStream stream{0x9abcdef1u};
  std::vector<bfloat16> row(static_cast<std::size_t>(n)), want(static_cast<std::size_t>(n));
  pd::narrow_row_nearest(values.data(), row.data(), n);
  std::vector<Scalar> in(values.begin(), values.begin() + n);
  if (stochastic) {
    pd::narrow_row_stochastic(in.data(), want.data(), n, stream);
  } else {
    pd::narrow_row_nearest(in.data(), want.data(), n);
  }
  pd::Bf16RowBlocks<Scalar> blocks(row.data(), n, stochastic, stream);
  const Index full = n / pd::kRowBlock * pd::kRowBlock;
  for (Index j = 0; j < full; j += pd::kRowBlock) {
    const auto b = blocks.load(j);
    for (Index l = 0; l < pd::kRowBlock; ++l) {
      ASSERT_EQ(pd::float_bits(static_cast<float>(b[l])), pd::float_bits(pd::widen_bf16(row[static_cast<std::size_t>(j + l)])));
    }
  }
  std::vector<Index> order;
  for (Index j = 0; j < full; j += pd::kRowBlock) order.push_back(j);
  if (shuffled) std::shuffle(order.begin(), order.end(), std::mt19937(static_cast<unsigned>(n)));
  for (Index j : order) blocks.store(j, Eigen::Map<const typename pd::Bf16RowBlocks<Scalar>::Block>(in.data() + j));
  for (Index j = full; j < n; ++j) blocks.set(j, in[static_cast<std::size_t>(j)]);
  for (Index j = 0; j < n; ++j) {
    ASSERT_EQ(pd::bf16_bits(row[static_cast<std::size_t>(j)]), pd::bf16_bits(want[static_cast<std::size_t>(j)]))
        << "n " << n << " stochastic " << stochastic << " shuffled " << shuffled << " j " << j;
    ASSERT_EQ(pd::float_bits(static_cast<float>(blocks.get(j))), pd::float_bits(pd::widen_bf16(want[static_cast<std::size_t>(j)])));
  }
}

TEST(Bf16Rows, RowBlocksEqualTheRowFunctionsBitForBit) {
  PEER_REQUIRE_PATH();
  const std::vector<float> values = probe_values(4000);
  for (Index n : {Index{16}, Index{24}, Index{32}, Index{40}, Index{48}, Index{520}, static_cast<Index>(values.size())}) {
    for (bool stochastic : {true, false}) {
      for (bool shuffled : {false, true}) {
        check_row_blocks<float>(values, n, stochastic, shuffled);
        check_row_blocks<double>(values, n, stochastic, shuffled);
      }
    }
  }
}

// ---- One-pass optimizer row updates (every build) ---------------------------------------------------

// The update of a bf16 table against a naive per-row loop: widen, the float optimizer's update (taken
// from a float table with the same values and gradient), round as the group asks.
// 40 columns: two blocks of 16 (the second rounds with the second half of the first block's pair hashes)
// and a tail of 8 set one column at a time.
struct Bf16Step {
  static constexpr Index kCols = 40;  // the default width
  Index cols;
  peer::ParameterLayout l16, l32;
  peer::Parameters<float> p16, p32;
  peer::Gradients<float> g16, g32;
  explicit Bf16Step(Index width = kCols) : cols(width) {
    l16.add_dense("w", 1, 3);
    l16.add_table("experts", 40, cols, peer::TableStorage::kBFloat16);
    l32.add_dense("w", 1, 3);
    l32.add_table("experts", 40, cols);
    p16 = peer::Parameters<float>(l16);
    p32 = peer::Parameters<float>(l32);
    g16 = peer::Gradients<float>(l16);
    g32 = peer::Gradients<float>(l32);
    const peer_test::Mat<float> init = peer_test::random_matrix<float>(40, cols, 4, 0.5);
    for (Index r = 0; r < 40; ++r) p16.table(peer::TableHandle{0}).write_row(r, init.row(r).data());
  }
  // Gradient of step s: rows 3 s mod 40 ... (a few rows, some repeated across steps).
  void fill(int s) {
    g16.zero();
    g32.zero();
    std::vector<peer::ExpertId> ids;
    for (int k = 0; k < 5; ++k) ids.push_back(static_cast<peer::ExpertId>((3 * s + 7 * k) % 40));
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    const peer_test::Mat<float> g = peer_test::random_matrix<float>(static_cast<Index>(ids.size()), cols, static_cast<unsigned>(100 * s), 1e-3);
    g16.table(peer::TableHandle{0}).add(ids, g.data());
    g32.table(peer::TableHandle{0}).add(ids, g.data());
  }
};

std::vector<peer::ParamGroup> groups_with(peer::Bf16Rounding rounding) {
  auto groups = peer::default_param_groups(1e-2, peer::LrSchedule(), 1e-2);
  for (auto& g : groups) {
    g.bf16_rounding = rounding;
    g.rounding_seed = 99;
  }
  return groups;
}

// Adam's and Sgd's rules update a bf16 row in one pass (peer/core/row_blocks.hpp); they must give what the
// float rule gives on the widened row, rounded by hand. Every Adam table rule, Adam's moments in bf16, both
// weight-decay modes, Sgd with momentum.
TEST(Bf16Tables, AdamAndSgdUpdatesEqualANaivePerRowLoopForEveryRounding) {
  PEER_REQUIRE_PATH();
  struct Rule {
    bool adam;
    peer::TableOptimizer rule;
    peer::TableStorage moments;
    peer::AdamConfig config;
  };
  peer::AdamConfig l2 = peer::AdamConfig();
  l2.weight_decay = peer::WeightDecay::kL2;
  const std::vector<Rule> rules = {
      {true, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, peer::AdamConfig::adamw()},
      {true, peer::TableOptimizer::kDefault, peer::TableStorage::kBFloat16, l2},
      {true, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kBFloat16, peer::AdamConfig::adamw()},
      {true, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kNative, l2},
      {true, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative, peer::AdamConfig::adamw()},
      {true, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative, l2},
      {false, peer::TableOptimizer::kDefault, peer::TableStorage::kNative, peer::AdamConfig()},
  };
  // Widths: a tail alone, one block and a tail, two blocks and a tail (the default), four blocks and a tail.
  for (const Index cols : {Index{1}, Index{17}, Bf16Step::kCols, Index{79}}) {
    for (auto rounding : {peer::Bf16Rounding::kStochastic, peer::Bf16Rounding::kNearest, peer::Bf16Rounding::kMasterRows}) {
      for (const Rule& rule : rules) {
        const bool adam = rule.adam;
        auto groups = groups_with(rounding);
        for (auto& g : groups) {
          g.table_optimizer = rule.rule;
          g.moment_storage = rule.moments;
          g.weight_decay = 0.01;  // decay moves every column: the decoupled and the L2 path both run
        }
        auto sgd_groups = groups_with(rounding);
        Bf16Step s(cols);
        peer::Adam<float> a16(s.l16, groups, rule.config), a32(s.l32, groups, rule.config);
        peer::Sgd<float> s16(s.l16, sgd_groups, 0.9), s32(s.l32, sgd_groups, 0.9);
        auto& t16 = s.p16.table(peer::TableHandle{0});
        auto& t32 = s.p32.table(peer::TableHandle{0});
        // The reference's float table follows the rule by hand: before each step it holds what the bf16
        // rule says the parameter is (the widened row, or the master).
        peer_test::Mat<float> master(40, cols);
        for (Index r = 0; r < 40; ++r) t16.read_row(r, master.row(r).data());
        const pd::TableRowWriter<float> keys(s.l16.tables()[0], rounding, 99);
        for (int step = 1; step <= 6; ++step) {
          s.fill(step);
          for (Index r = 0; r < 40; ++r) {
            if (rounding == peer::Bf16Rounding::kMasterRows) {
              std::copy(master.row(r).data(), master.row(r).data() + cols, t32.row(r));
            } else {
              t16.read_row(r, t32.row(r));
            }
          }
          if (adam) {
            a16.step(s.p16, s.g16);
            a32.step(s.p32, s.g32);
          } else {
            s16.step(s.p16, s.g16);
            s32.step(s.p32, s.g32);
          }
          for (Index r = 0; r < 40; ++r) {
            const bool touched = s.g32.table(peer::TableHandle{0}).find(static_cast<peer::ExpertId>(r)) != nullptr;
            for (Index j = 0; j < cols; ++j) {
              const float want = t32.row(r)[j];
              std::uint16_t expect;
              if (!touched) {
                continue;  // untouched rows: checked below to keep their bits
              } else if (rounding == peer::Bf16Rounding::kStochastic) {
                expect = ref_stochastic(pd::float_bits(want), pd::rounding_bits(keys.stream(step, r), static_cast<std::uint32_t>(j)));
              } else {
                expect = ref_nearest(pd::float_bits(want));
              }
              ASSERT_EQ(pd::bf16_bits(t16.bf16_row(r)[j]), expect) << to_string(rounding) << " cols " << cols << " adam " << adam << " rule "
                                                                    << to_string(rule.rule) << " step " << step << " row " << r << " col " << j;
            }
            if (rounding == peer::Bf16Rounding::kMasterRows && touched) std::copy(t32.row(r), t32.row(r) + cols, master.row(r).data());
          }
        }
      }
    }
  }
}

// Every upper half of a float with low halves that hit each rounding case, in rows whose length and
// first column put values in every lane of the vector blocks and the tails; the row functions and the row
// blocks (in any block order) against the scalar definitions, stochastic with two stream keys.
TEST(Bf16Rows, EveryUpperHalfRoundsLikeTheDefinitionsInEveryLaneAndTail) {
  PEER_REQUIRE_PATH();
  const std::uint32_t lows[] = {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xfffeu, 0xffffu, 0x1234u};
  std::vector<float> values;
  for (std::uint32_t hi = 0; hi < 0x10000u; ++hi) {
    for (std::uint32_t lo : lows) values.push_back(pd::float_from_bits((hi << 16) | lo));
  }
  const Index total = static_cast<Index>(values.size());
  for (const std::uint32_t key : {0x0u, 0xdeadbeefu}) {
    const pd::RoundingStream stream{key};
    for (const Index n : {Index{1}, Index{2}, Index{3}, Index{15}, Index{33}, Index{47}, Index{63}, Index{97}}) {
      for (const std::uint32_t first : {0u, 1u, 2u, 3u, 17u, 31u}) {
        std::vector<bfloat16> out(static_cast<std::size_t>(n)), outn(static_cast<std::size_t>(n));
        for (Index start = 0; start + n <= total; start += n) {
          const float* in = values.data() + start;
          pd::narrow_row_stochastic(in, out.data(), n, stream, first);
          if (first == 0) pd::narrow_row_nearest(in, outn.data(), n);
          for (Index j = 0; j < n; ++j) {
            const std::uint32_t b = pd::float_bits(in[j]);
            const std::uint32_t r = pd::rounding_bits(stream, first + static_cast<std::uint32_t>(j));
            ASSERT_EQ(pd::bf16_bits(out[static_cast<std::size_t>(j)]), ref_stochastic(b, r))
                << std::hex << "bits 0x" << b << std::dec << " n " << n << " first " << first << " j " << j;
            if (first == 0) {
              ASSERT_EQ(pd::bf16_bits(outn[static_cast<std::size_t>(j)]), ref_nearest(b)) << std::hex << "bits 0x" << b;
            }
          }
          if (n > 40 && start > 20000) break;  // long rows: a sample is enough, every lane is hit above
        }
      }
    }
    // Row blocks: whole rows of 16 k + tail over all of values, blocks stored in reverse order.
    for (const Index n : {Index{16}, Index{32}, Index{48}, Index{80}, Index{96}, Index{112}}) {
      for (bool stochastic : {true, false}) {
        for (Index start = 0; start + n <= total; start += n) {
          std::vector<bfloat16> row(static_cast<std::size_t>(n));
          pd::Bf16RowBlocks<float> blocks(row.data(), n, stochastic, stream);
          for (Index j = n - pd::kRowBlock; j >= 0; j -= pd::kRowBlock) {
            blocks.store(j, Eigen::Map<const Eigen::Array<float, pd::kRowBlock, 1>>(values.data() + start + j));
          }
          for (Index j = 0; j < n; ++j) {
            const std::uint32_t b = pd::float_bits(values[static_cast<std::size_t>(start + j)]);
            const std::uint16_t want = stochastic ? ref_stochastic(b, pd::rounding_bits(stream, static_cast<std::uint32_t>(j))) : ref_nearest(b);
            ASSERT_EQ(pd::bf16_bits(row[static_cast<std::size_t>(j)]), want)
                << std::hex << "bits 0x" << b << std::dec << " n " << n << " stochastic " << stochastic << " j " << j;
          }
        }
      }
    }
  }
}

// Double-precision Adam with a variant's state against the equations written as naive loops, 6 steps of
// sparse gradients, both weight-decay modes; in every build, since the rules' row sums are vector code.
TEST(TableState, PartialRowWiseAdamAndRowWiseAdagradEqualNaiveLoops) {
  PEER_REQUIRE_PATH();
  // Widths: tails alone; one block with and without a tail; two to four blocks around the first group of
  // four; five blocks; seven blocks and a tail (the per-row sum of squares runs four accumulators over whole
  // groups of four blocks, then the remaining blocks into the first accumulators in turn, then the tail).
  for (const Index cols : {Index{1}, Index{2}, Index{3}, Index{5}, Index{15}, Index{16}, Index{17}, Index{31}, Index{33},
                           Index{48}, Index{63}, Index{64}, Index{65}, Index{67}, Index{79}, Index{80}, Index{115}}) {
    for (auto rule : {peer::TableOptimizer::kPartialRowWiseAdam, peer::TableOptimizer::kRowWiseAdagrad}) {
      for (auto decay : {peer::WeightDecay::kL2, peer::WeightDecay::kDecoupled}) {
        peer::ParameterLayout l(8);
        l.add_table("experts", 12, cols);
        peer::Parameters<double> p(l);
        peer::Gradients<double> g(l);
        const peer_test::Mat<double> init = peer_test::random_matrix<double>(12, cols, 2);
        std::copy(init.data(), init.data() + init.size(), p.table(peer::TableHandle{0}).data());
        std::vector<peer::ParamGroup> groups{peer::ParamGroup{"experts", {""}, 0.05, 0.1, peer::LrSchedule(), peer::GroupKinds::kAll}};
        groups[0].table_optimizer = rule;
        peer::AdamConfig config{0.9, 0.99, 1e-8, decay};
        peer::Adam<double> adam(l, groups, config);
        peer_test::Mat<double> ref = init, m = peer_test::Mat<double>::Zero(12, cols);
        std::vector<double> v(12, 0.0);
        std::vector<int> t(12, 0);
        for (int step = 1; step <= 6; ++step) {
          std::vector<peer::ExpertId> ids;
          for (int k = 0; k < 4; ++k) ids.push_back(static_cast<peer::ExpertId>((5 * step + 3 * k) % 12));
          std::sort(ids.begin(), ids.end());
          ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
          const peer_test::Mat<double> grad = peer_test::random_matrix<double>(static_cast<Index>(ids.size()), cols, static_cast<unsigned>(step));
          g.zero();
          g.table(peer::TableHandle{0}).add(ids, grad.data());
          adam.step(p, g);
          for (std::size_t i = 0; i < ids.size(); ++i) {
            const Index r = ids[i];
            ++t[static_cast<std::size_t>(r)];
            const bool decoupled = decay == peer::WeightDecay::kDecoupled;
            double mean_sq = 0;
            std::vector<double> gj(static_cast<std::size_t>(cols));
            for (Index j = 0; j < cols; ++j) {
              gj[static_cast<std::size_t>(j)] = grad(static_cast<Index>(i), j) + (decoupled ? 0.0 : 0.1 * ref(r, j));
              mean_sq += gj[static_cast<std::size_t>(j)] * gj[static_cast<std::size_t>(j)] / static_cast<double>(cols);
            }
            double& vr = v[static_cast<std::size_t>(r)];
            if (rule == peer::TableOptimizer::kRowWiseAdagrad) {
              vr += mean_sq;
            } else {
              vr = 0.99 * vr + 0.01 * mean_sq;
            }
            for (Index j = 0; j < cols; ++j) {
              if (decoupled) ref(r, j) -= 0.05 * 0.1 * ref(r, j);
              if (rule == peer::TableOptimizer::kRowWiseAdagrad) {
                ref(r, j) -= 0.05 * gj[static_cast<std::size_t>(j)] / (std::sqrt(vr) + 1e-8);
              } else {
                const int tr = t[static_cast<std::size_t>(r)];
                m(r, j) = 0.9 * m(r, j) + 0.1 * gj[static_cast<std::size_t>(j)];
                ref(r, j) -= 0.05 * (m(r, j) / (1 - std::pow(0.9, tr))) / (std::sqrt(vr / (1 - std::pow(0.99, tr))) + 1e-8);
              }
            }
          }
          const auto got = p.table(peer::TableHandle{0}).matrix();
          ASSERT_LE((got - ref).cwiseAbs().maxCoeff(), 1e-13) << to_string(rule) << " cols " << cols << " step " << step;
        }
        // The state has the rule's shape: [N, 1] per-row accumulators, and m only for Adam.
        const auto state = adam.state_tensors();
        ASSERT_EQ(state.size(), rule == peer::TableOptimizer::kRowWiseAdagrad ? 1u : 2u);
        EXPECT_EQ(state.back().cols, 1);
      }
    }
  }
}

#if !defined(PEER_TEST_BF16_KERNELS_ONLY)
// ---- Tables, layers, optimizers and files (portable build only) --------------------------------------

using peer_test::Mat;

TEST(Bf16Tables, StorageIsHalfTheBytesAndMisuseIsRefusedWithAName) {
  peer::RowTable<float> t(10, 6, peer::TableStorage::kBFloat16);
  EXPECT_TRUE(t.is_bf16());
  EXPECT_EQ(t.row_bytes(), 12);
  EXPECT_EQ(t.bytes(), 120);
  EXPECT_THROW((void)t.row(0), std::logic_error);
  EXPECT_THROW((void)t.matrix(), std::logic_error);
  peer::RowTable<float> f(10, 6);
  EXPECT_THROW((void)f.bf16_row(0), std::logic_error);
  const std::vector<float> in = {1.0f, 1.00390625f, -2.5f, 3.0e-39f, 1e30f, 0.1f};
  t.write_row(3, in.data());
  std::vector<float> out(6);
  t.read_row(3, out.data());
  for (int j = 0; j < 6; ++j) EXPECT_EQ(out[static_cast<std::size_t>(j)], pd::widen_bf16(pd::narrow_bf16_nearest(in[static_cast<std::size_t>(j)])));

  // ExternalMemory must give bf16 tables bf16 memory, and native tables Scalar memory.
  peer::ParameterLayout layout;
  layout.add_table("experts", 4, 2, peer::TableStorage::kBFloat16);
  peer::Parameters<float>::ExternalMemory memory;
  std::vector<float> floats(8);
  memory.tables = {floats.data()};
  try {
    peer::Parameters<float> p(layout, memory);
    ADD_FAILURE() << "accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("table 'experts' is Scalar memory, but the table is stored as bfloat16"), std::string::npos) << e.what();
  }
  memory.tables = {nullptr};
  EXPECT_THROW(peer::Parameters<float>(layout, memory), std::invalid_argument);  // null data
  std::vector<bfloat16> mine(8);
  memory.tables = {mine.data()};
  peer::Parameters<float> view(layout, memory);
  EXPECT_EQ(view.table(peer::TableHandle{0}).bf16_data(), mine.data());
  // A layout with a bf16 table differs from the same layout in float.
  peer::ParameterLayout native;
  native.add_table("experts", 4, 2);
  EXPECT_NE(layout, native);
}

// A float layer with a bf16 table against the same layer with a float table holding the widened values:
// forward, dx, every gradient to float rounding (the bf16 kernels compute in float).
peer::PeerConfig bf16_config(peer::TableStorage storage) {
  peer::PeerConfig c = peer_test::small_config(16, 6, 2, 8, 3, 3);
  c.expert_storage = storage;
  return c;
}

void copy_widened_table(const peer::Parameters<float>& from, peer::Parameters<float>& to) {
  const auto& a = from.table(peer::TableHandle{0});
  auto& b = to.table(peer::TableHandle{0});
  for (Index r = 0; r < a.rows(); ++r) a.read_row(r, b.row(r));
  std::copy(from.dense_data(), from.dense_data() + from.layout().dense_size(), to.dense_data());
}

TEST(Bf16Tables, LayerWithBf16TableEqualsTheFloatLayerOnTheWidenedTable) {
  for (bool pkm : {false, true}) {
    auto run = [&](auto& layer) {
      using Layer = std::decay_t<decltype(layer)>;
      peer::Parameters<float> p16 = layer.make_parameters(5);
      EXPECT_TRUE(p16.table(peer::TableHandle{0}).is_bf16());
      Layer ref_layer(bf16_config(peer::TableStorage::kNative));
      peer::Parameters<float> p32 = ref_layer.make_parameters(1);
      copy_widened_table(p16, p32);
      const Mat<float> x = peer_test::random_matrix<float>(20, 16, 9);
      Mat<float> y16(20, 16), y32(20, 16), dx16 = Mat<float>::Zero(20, 16), dx32 = Mat<float>::Zero(20, 16);
      typename Layer::Cache c16, c32;
      layer.forward(p16, x, y16, c16, peer::Mode::kTrain);
      ref_layer.forward(p32, x, y32, c32, peer::Mode::kTrain);
      EXPECT_TRUE(c16.ids == c32.ids);
      EXPECT_LE((y16 - y32).cwiseAbs().maxCoeff(), 1e-5f * (1.0f + y32.cwiseAbs().maxCoeff()));
      const Mat<float> dy = peer_test::random_matrix<float>(20, 16, 10);
      peer::Gradients<float> g16 = layer.make_gradients(), g32 = ref_layer.make_gradients();
      layer.backward(p16, c16, dy, dx16, g16);
      ref_layer.backward(p32, c32, dy, dx32, g32);
      EXPECT_LE((dx16 - dx32).cwiseAbs().maxCoeff(), 1e-5f * (1.0f + dx32.cwiseAbs().maxCoeff()));
      const auto& t16 = g16.table(peer::TableHandle{0});
      const auto& t32 = g32.table(peer::TableHandle{0});
      ASSERT_EQ(t16.ids(), t32.ids());
      EXPECT_LE((t16.values() - t32.values()).cwiseAbs().maxCoeff(), 1e-5f * (1.0f + t32.values().cwiseAbs().maxCoeff()));
      for (Index i = 0; i < p16.layout().dense_size(); ++i) {
        ASSERT_NEAR(g16.dense_data()[i], g32.dense_data()[i], 1e-5f * (1.0f + std::abs(g32.dense_data()[i])));
      }
    };
    if (pkm) {
      peer::ProductKeyMemory<float> layer(bf16_config(peer::TableStorage::kBFloat16));
      run(layer);
    } else {
      peer::PeerLayer<float> layer(bf16_config(peer::TableStorage::kBFloat16));
      run(layer);
    }
  }
}

TEST(Bf16Tables, StochasticRoundingKeepsSmallUpdatesThatNearestLoses) {
  // SGD with steps far below half a bf16 ulp: nearest rounding never moves the row; stochastic rounding
  // moves it by the accumulated update in expectation; master rows track it exactly.
  auto run = [](peer::Bf16Rounding rounding) {
    peer::ParameterLayout l;
    l.add_table("experts", 1, 256, peer::TableStorage::kBFloat16);
    peer::Parameters<float> p(l);
    peer::Gradients<float> g(l);
    std::vector<float> ones(256, 1.0f), grad(256, 1.0f);
    p.table(peer::TableHandle{0}).write_row(0, ones.data());
    auto groups = groups_with(rounding);
    for (auto& gr : groups) gr.learning_rate = 1e-4;  // ulp(1) = 2^-7 = 7.8e-3: a step is 1/78 of it
    peer::Sgd<float> sgd(l, groups);
    for (int step = 0; step < 200; ++step) {
      g.zero();
      g.table(peer::TableHandle{0}).add({0}, grad.data());
      sgd.step(p, g);
    }
    std::vector<float> out(256);
    p.table(peer::TableHandle{0}).read_row(0, out.data());
    double mean = 0;
    for (float v : out) mean += v;
    return mean / 256.0;
  };
  const double target = 1.0 - 200 * 1e-4;  // 0.98
  EXPECT_EQ(run(peer::Bf16Rounding::kNearest), 1.0);
  EXPECT_NEAR(run(peer::Bf16Rounding::kStochastic), target, 1.5e-3);
  EXPECT_NEAR(run(peer::Bf16Rounding::kMasterRows), target, 4e-3);  // the row is nearest(master)
}

TEST(Bf16Tables, TrainingIsBitwiseIdenticalForOneTwoAndFourThreads) {
  auto train = [](int threads, int* team) {
    peer_test::ThreadScope scope(threads);
    *team = peer_test::library_team_size();
    peer::PeerLayer<float> layer(bf16_config(peer::TableStorage::kBFloat16));
    peer::Parameters<float> p = layer.make_parameters(3);
    peer::Gradients<float> g = layer.make_gradients();
    peer::Adam<float> opt(p.layout(), groups_with(peer::Bf16Rounding::kStochastic), peer::AdamConfig::adamw());
    peer::PeerLayer<float>::Cache cache;
    Mat<float> x, y(64, 16), none;
    for (int step = 0; step < 4; ++step) {
      x = peer_test::random_matrix<float>(64, 16, static_cast<unsigned>(step));
      layer.forward(p, x, y, cache, peer::Mode::kTrain);
      g.zero();
      layer.backward(p, cache, Mat<float>(y - x), none, g);
      opt.step(p, g);
    }
    return peer_test::storage_bytes(p);
  };
  int team1 = 0, team2 = 0, team4 = 0;
  const auto one = train(1, &team1), two = train(2, &team2), four = train(4, &team4);
  EXPECT_EQ(team1, 1);
#if defined(_OPENMP)
  EXPECT_EQ(team2, 2);
  EXPECT_EQ(team4, 4);
#endif
  EXPECT_TRUE(peer_test::same_bits(one, two));
  EXPECT_TRUE(peer_test::same_bits(one, four));
}

// A PEER layer with a bf16 table trained by AdamW with `groups`, and the checkpoint registrations of the run.
struct TableRun {
  peer::PeerLayer<float> layer{bf16_config(peer::TableStorage::kBFloat16)};
  peer::Parameters<float> p = layer.make_parameters(8);
  peer::Gradients<float> g = layer.make_gradients();
  peer::Adam<float> opt;
  peer::PeerLayer<float>::Cache cache;
  std::int64_t step = 0;
  explicit TableRun(const std::vector<peer::ParamGroup>& groups) : opt(p.layout(), groups, peer::AdamConfig::adamw()) {}
  void train(int n) {
    Mat<float> y(32, 16), none;
    for (int i = 0; i < n; ++i, ++step) {
      const Mat<float> x = peer_test::random_matrix<float>(32, 16, static_cast<unsigned>(step));
      layer.forward(p, x, y, cache, peer::Mode::kTrain);
      g.zero();
      layer.backward(p, cache, Mat<float>(y - x), none, g);
      opt.step(p, g);
    }
  }
  peer::TrainingCheckpoint ckpt() {
    peer::TrainingCheckpoint c;
    c.add_config("peer", layer.config().to_fields());
    c.add_parameters("peer", p);
    c.add_optimizer("opt", opt);
    c.add_counter("step", &step);
    return c;
  }
};

TEST(Bf16Tables, CheckpointsAndSafetensorsCarryBf16TablesAndMasterRowsBitForBit) {
  const std::string dir = ::testing::TempDir();
  for (auto rounding : {peer::Bf16Rounding::kStochastic, peer::Bf16Rounding::kMasterRows}) {
    auto make = [&]() { return std::make_unique<TableRun>(groups_with(rounding)); };
    auto straight = make();
    straight->train(6);
    auto first = make();
    first->train(3);
    const std::string path = dir + "/bf16_" + to_string(rounding) + ".ckpt";
    first->ckpt().save(path);
    {
      const peer::CheckpointReader reader(path);
      EXPECT_EQ(reader.entry("peer.experts").dtype, peer::DType::kBFloat16);
      EXPECT_EQ(reader.has("opt.bf16.master.experts"), rounding == peer::Bf16Rounding::kMasterRows);
    }
    auto resumed = make();
    resumed->ckpt().load(path);
    resumed->train(3);
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(straight->p), peer_test::storage_bytes(resumed->p)))
        << to_string(rounding);
    // A float model refuses the file by its configuration ("expert_storage" is only written for bf16).
    peer::PeerLayer<float> native(bf16_config(peer::TableStorage::kNative));
    peer::Parameters<float> pn = native.make_parameters(1);
    peer::TrainingCheckpoint c;
    c.add_config("peer", native.config().to_fields());
    c.add_parameters("peer", pn);
    EXPECT_THROW(c.load(path), std::runtime_error);

    // safetensors: written as BF16, read back bit for bit; a float file rounds into a bf16 table.
    peer::SafetensorsWriter w;
    peer::add_parameters(w, straight->p);
    const std::string st = dir + "/bf16.safetensors";
    w.save(st);
    const peer::SafetensorsFile f = peer::SafetensorsFile::open(st);
    EXPECT_EQ(f.tensor("experts").dtype, peer::SafetensorsDType::kBF16);
    peer::Parameters<float> back = straight->layer.make_parameters(123);
    peer::load_parameters(f, back);
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(straight->p), peer_test::storage_bytes(back)));
  }
}
// ---- Table state variants: bf16 moments, partial row-wise Adam, row-wise Adagrad ---------------------------

// bf16 moments: each step equals the Scalar-moment Adam run on the widened moments, with m and v then
// rounded stochastically from columns [cols, 3 cols) of the row's stream, bit for bit.
TEST(TableState, Bf16MomentsAreTheFloatUpdateStochasticallyRounded) {
  for (auto rule : {peer::TableOptimizer::kDefault, peer::TableOptimizer::kPartialRowWiseAdam}) {
    Bf16Step s;
    constexpr Index kCols = Bf16Step::kCols;
    auto groups = groups_with(peer::Bf16Rounding::kStochastic);
    auto ref_groups = groups;
    for (auto& g : groups) {
      g.table_optimizer = rule;
      g.moment_storage = peer::TableStorage::kBFloat16;
    }
    for (auto& g : ref_groups) g.table_optimizer = rule;
    // Float tables on both sides, so that only the moments differ in storage.
    peer::Parameters<float> pa(s.l32), pb(s.l32);
    const Mat<float> init = peer_test::random_matrix<float>(40, kCols, 4, 0.5);
    std::copy(init.data(), init.data() + init.size(), pa.table(peer::TableHandle{0}).data());
    std::copy(init.data(), init.data() + init.size(), pb.table(peer::TableHandle{0}).data());
    peer::Adam<float> a(s.l32, groups, peer::AdamConfig::adamw()), b(s.l32, ref_groups, peer::AdamConfig::adamw());
    const pd::TableRowWriter<float> keys(s.l32.tables()[0], peer::Bf16Rounding::kStochastic, 99);
    for (int step = 1; step <= 5; ++step) {
      s.fill(step);
      // The reference starts from the bf16 state, widened.
      auto sa = a.state_tensors(), sb = b.state_tensors();
      for (std::size_t k = 0; k < sa.size(); ++k) {
        if (sa[k].bf16 != nullptr) {
          pd::widen_row(sa[k].bf16, sb[k].data, sa[k].rows * sa[k].cols);
        } else if (sa[k].data != nullptr) {
          std::copy(sa[k].data, sa[k].data + sa[k].rows * sa[k].cols, sb[k].data);
        }
      }
      a.step(pa, s.g32);
      b.step(pb, s.g32);
      ASSERT_TRUE(peer_test::same_bits(Mat<float>(pa.table(peer::TableHandle{0}).matrix()), Mat<float>(pb.table(peer::TableHandle{0}).matrix())));
      const auto& grad = s.g32.table(peer::TableHandle{0});
      for (std::size_t k = 0; k < sa.size(); ++k) {
        if (sa[k].bf16 == nullptr || sa[k].rows != 40) continue;  // the dense tensor's moments, per-row v
        const std::uint32_t first = static_cast<std::uint32_t>(sa[k].name.find(".v.") != std::string::npos ? 2 * kCols : kCols);
        for (peer::ExpertId r : grad.ids()) {
          for (Index j = 0; j < kCols; ++j) {
            const float want = sb[k].data[r * kCols + j];
            const std::uint16_t expect = ref_stochastic(pd::float_bits(want), pd::rounding_bits(keys.stream(step, r), first + static_cast<std::uint32_t>(j)));
            ASSERT_EQ(pd::bf16_bits(sa[k].bf16[r * kCols + j]), expect) << sa[k].name << " step " << step << " row " << r;
          }
        }
      }
    }
  }
}

TEST(TableState, SgdRefusesAdamOnlyTableStateAndAdagradHasNoMomentsToStore) {
  peer::ParameterLayout l;
  l.add_table("experts", 4, 4);
  auto groups = peer::default_param_groups(1e-3);
  groups[0].table_optimizer = peer::TableOptimizer::kPartialRowWiseAdam;
  try {
    peer::Sgd<float> sgd(l, groups);
    ADD_FAILURE() << "accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("ParamGroup 'experts'.table_optimizer = partial_row_wise_adam needs Adam"), std::string::npos) << e.what();
  }
  groups[0].table_optimizer = peer::TableOptimizer::kRowWiseAdagrad;
  groups[0].moment_storage = peer::TableStorage::kBFloat16;
  EXPECT_THROW(peer::Adam<float>(l, groups), std::invalid_argument);
  groups[0].table_optimizer = peer::TableOptimizer::kDefault;
  EXPECT_THROW(peer::Sgd<float>(l, groups), std::invalid_argument);
}

// Every state variant, with bf16 tables: resumed after 3 of 6 steps it ends bit for bit where the
// uninterrupted run does, on 1 and 2 threads alike.
TEST(TableState, EveryVariantResumesBitForBitAndIsThreadCountIndependent) {
  struct Variant {
    peer::TableOptimizer rule;
    peer::TableStorage moments;
  };
  const std::string dir = ::testing::TempDir();
  for (const Variant& var : {Variant{peer::TableOptimizer::kDefault, peer::TableStorage::kBFloat16},
                             Variant{peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kNative},
                             Variant{peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kBFloat16},
                             Variant{peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative}}) {
    SCOPED_TRACE(std::string(to_string(var.rule)) + " / " + to_string(var.moments));
    auto groups = groups_with(peer::Bf16Rounding::kStochastic);
    for (auto& g : groups) {
      g.table_optimizer = var.rule;
      g.moment_storage = var.moments;
    }
    TableRun straight(groups);
    {
      peer_test::ThreadScope one(1);
      straight.train(6);
    }
    TableRun first(groups);
    first.train(3);
    const std::string path = dir + "/state_" + to_string(var.rule) + "_" + to_string(var.moments) + ".ckpt";
    first.ckpt().save(path);
    TableRun resumed(groups);
    resumed.ckpt().load(path);
    {
      peer_test::ThreadScope two(2);
#if defined(_OPENMP)
      EXPECT_EQ(peer_test::library_team_size(), 2);
#endif
      resumed.train(3);
    }
    EXPECT_TRUE(peer_test::same_bits(peer_test::storage_bytes(straight.p), peer_test::storage_bytes(resumed.p)));
    auto a = straight.opt.state_tensors(), b = resumed.opt.state_tensors();
    ASSERT_EQ(a.size(), b.size());
    for (std::size_t k = 0; k < a.size(); ++k) {
      const std::size_t n = static_cast<std::size_t>(a[k].rows * a[k].cols);
      if (a[k].bf16 != nullptr) {
        EXPECT_EQ(std::memcmp(a[k].bf16, b[k].bf16, n * 2), 0) << a[k].name;
      } else {
        EXPECT_EQ(std::memcmp(a[k].data, b[k].data, n * 4), 0) << a[k].name;
      }
    }
  }
}
// ---- Fused backward and update ---------------------------------------------------------------------------

// A few steps of a layer, fused or not: every parameter, every optimizer state tensor and counter.
template <typename Layer, typename Optimizer>
std::string train_steps(Layer& layer, Optimizer& opt, peer::Parameters<float>& p, peer::Gradients<float>& g, bool fused, int threads) {
  peer_test::ThreadScope scope(threads);
  typename Layer::Cache cache;
  Mat<float> y(48, 16), dx(48, 16);
  if (fused) opt.fuse_table_updates(p, g);
  for (int step = 0; step < 4; ++step) {
    const Mat<float> x = peer_test::random_matrix<float>(48, 16, static_cast<unsigned>(40 + step));
    layer.forward(p, x, y, cache, peer::Mode::kTrain);
    g.zero();
    dx.setZero();
    layer.backward(p, cache, Mat<float>(y - x), dx, g);
    if (fused) {
      EXPECT_TRUE(g.table(peer::TableHandle{0}).empty());  // no table gradient is written
    }
    opt.step(p, g);
  }
  const auto bytes = peer_test::storage_bytes(p);
  std::string out(bytes.begin(), bytes.end());
  for (const auto& s : opt.state_tensors()) {
    const std::size_t n = static_cast<std::size_t>(s.rows * s.cols);
    out.append(s.bf16 != nullptr ? reinterpret_cast<const char*>(s.bf16) : reinterpret_cast<const char*>(s.data), n * (s.bf16 != nullptr ? 2 : 4));
  }
  for (const auto& c : opt.state_counters()) out.append(reinterpret_cast<const char*>(c.data), static_cast<std::size_t>(c.size) * 8);
  return out;
}

TEST(FusedTableUpdate, BitwiseEqualToTheUnfusedStepForEveryStorageAndRule) {
  struct Case {
    const char* name;
    peer::TableStorage table;
    peer::Bf16Rounding rounding;
    peer::TableOptimizer rule;
    peer::TableStorage moments;
  };
  const Case cases[] = {
      {"float, Adam", peer::TableStorage::kNative, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative},
      {"bf16 stochastic, Adam", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kDefault, peer::TableStorage::kNative},
      {"bf16 master rows, Adam bf16 moments", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kMasterRows, peer::TableOptimizer::kDefault, peer::TableStorage::kBFloat16},
      {"bf16, partial row-wise Adam, bf16 m", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kStochastic, peer::TableOptimizer::kPartialRowWiseAdam, peer::TableStorage::kBFloat16},
      {"bf16, row-wise Adagrad", peer::TableStorage::kBFloat16, peer::Bf16Rounding::kNearest, peer::TableOptimizer::kRowWiseAdagrad, peer::TableStorage::kNative},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    auto groups = groups_with(k.rounding);
    for (auto& g : groups) {
      g.table_optimizer = k.rule;
      g.moment_storage = k.moments;
    }
    auto run = [&](bool pkm, bool fused, int threads) {
      if (pkm) {
        peer::ProductKeyMemory<float> layer(bf16_config(k.table));
        auto p = layer.make_parameters(6);
        auto g = layer.make_gradients();
        peer::Adam<float> opt(layer.layout(), groups, peer::AdamConfig::adamw());
        return train_steps(layer, opt, p, g, fused, threads);
      }
      peer::PeerLayer<float> layer(bf16_config(k.table));
      auto p = layer.make_parameters(6);
      auto g = layer.make_gradients();
      peer::Adam<float> opt(layer.layout(), groups, peer::AdamConfig::adamw());
      return train_steps(layer, opt, p, g, fused, threads);
    };
    for (bool pkm : {false, true}) {
      const std::string unfused = run(pkm, false, 1);
      EXPECT_TRUE(unfused == run(pkm, true, 1)) << (pkm ? "pkm" : "peer") << ", 1 thread";
      EXPECT_TRUE(unfused == run(pkm, true, 2)) << (pkm ? "pkm" : "peer") << ", 2 threads";
    }
  }
  // SGD with momentum too.
  peer::PeerLayer<float> layer(bf16_config(peer::TableStorage::kBFloat16));
  std::string results[2];
  for (bool fused : {false, true}) {
    auto p = layer.make_parameters(6);
    auto g = layer.make_gradients();
    peer::Sgd<float> sgd(layer.layout(), groups_with(peer::Bf16Rounding::kStochastic), 0.9);
    results[fused] = train_steps(layer, sgd, p, g, fused, 2);
  }
  EXPECT_TRUE(results[0] == results[1]) << "sgd";
}

TEST(FusedTableUpdate, WhatTheFusedPathCannotDoIsRefusedWithAReason) {
  peer::PeerLayer<float> layer(bf16_config(peer::TableStorage::kNative));
  auto p = layer.make_parameters(1);
  auto g = layer.make_gradients();
  peer::Adam<float> opt(layer.layout(), peer::default_param_groups(1e-3), peer::AdamConfig::adamw());
  peer::PeerLayer<float>::Cache cache;
  const Mat<float> x = peer_test::random_matrix<float>(8, 16, 1);
  Mat<float> y(8, 16), none;
  auto expect_message = [](auto&& f, const char* text) {
    try {
      f();
      ADD_FAILURE() << "no exception; expected: " << text;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  opt.fuse_table_updates(p, g);
  layer.forward(p, x, y, cache, peer::Mode::kTrain);
  layer.backward(p, cache, y, none, g);
  // A global clip cannot see the table gradient.
  expect_message([&] { peer::clip_gradient_norm(g, 1.0); }, "table 'experts' are fused into the backward");
  // Gradient accumulation: a second backward before the step.
  expect_message([&] { layer.backward(p, cache, y, none, g); }, "table 'experts' was already updated by a backward since the optimizer's last step");
  // Rows handed to the gradient by other code.
  const std::vector<float> row(32, 1.0f);
  expect_message([&] { g.table(peer::TableHandle{0}).add({3}, row.data()); }, "whose updates are fused into the backward");
  // A step with other gradients.
  auto other = layer.make_gradients();
  expect_message([&] { opt.step(p, other); }, "step() got other params or grads");
  opt.step(p, g);
  // After the step the next backward is accepted again; after unfusing, gradients are stored again.
  layer.forward(p, x, y, cache, peer::Mode::kTrain);
  EXPECT_NO_THROW(layer.backward(p, cache, y, none, g));
  opt.step(p, g);
  opt.unfuse_table_updates();
  g.zero();
  layer.forward(p, x, y, cache, peer::Mode::kTrain);
  layer.backward(p, cache, y, none, g);
  EXPECT_FALSE(g.table(peer::TableHandle{0}).empty());
  EXPECT_GT(peer::clip_gradient_norm(g, 1.0), 0.0);
}
#endif  // !PEER_TEST_BF16_KERNELS_ONLY

}  // namespace
