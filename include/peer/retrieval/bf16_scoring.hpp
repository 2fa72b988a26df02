// SPDX-License-Identifier: MIT
#ifndef PEER_RETRIEVAL_BF16_SCORING_HPP
#define PEER_RETRIEVAL_BF16_SCORING_HPP

/// \file
/// Sub-key scoring in bfloat16 with an exact re-check (SubKeyScoring::kBFloat16Checked).
///
/// The sub-key GEMM s = C q is most of a PEER forward's arithmetic (2 H n Dk FLOPs per token, four times
/// the query projection at the paper's shapes). AVX512_BF16's VDPBF16PS does twice the multiply-adds of an
/// fp32 FMA per instruction, on operands of half the bytes. Rounding q and the sub-keys to bf16 changes
/// the scores, so retrieval here never ranks by them: they only narrow the candidates, and the kept
/// sub-keys are ranked by exactly computed scores.
///
/// The bound. With q~, c~ the bf16 roundings (relative error u = 2^-8 each), d = Dk / 2 and a the
/// approximate score (products of bf16 are exact in fp32; d additions in fp32, each within 2^-23
/// relative, covering round-to-nearest and any directed rounding; denormals flushed, VDPBF16PS's DAZ/FTZ),
/// and r the re-check score (a fixed-order dot in Scalar, unit roundoff u_S):
///   |a - q.c| <= (2u + u^2 + g(d, 2^-23) (1 + u)^2) sum|q_i c_i| + 2^-124 (sqrt(d) (|q| + |c|) + d),
///   |r - q.c| <= g(d, u_S) sum|q_i c_i|,   g(d, v) = d v / (1 - d v),   sum|q_i c_i| <= |q| |c|,
/// so |a_j - r_j| <= E = bound(|q|, max_j |c_j|) for every sub-key j of the set (|.| the 2-norm; the
/// factor (1 + 2^-10) covers the bound's own rounding).
///
/// The candidates. Let tau be the k'-th largest approximate score (k' = the sub-keys kept per half plus
/// one). Every j with a_j < tau - 2E has r_j <= a_j + E < tau - E <= r_i for each of the k' sub-keys i whose
/// a_i >= tau: at least k' sub-keys beat it strictly, so it is not among the top k' by r whatever the tie
/// rule. The candidates {j : a_j >= tau - 2E} (a few more than k' on real data) are re-scored exactly and
/// their top k' kept: the same top k' (values and ids, ties to the lower id) as ranking all n by r.
/// The product-key stage above then proceeds unchanged on exact values; its rare tie repair re-scores
/// whole rows exactly. Search results therefore equal the exhaustive top k over r, bit for bit, which
/// BruteForceRetrieval checks (it scores with r in this mode).
///
/// Paths: with AMX-BF16 in the compiler's target as well (-mamx-tile -mamx-bf16, or -march= a CPU that
/// has it, e.g. sapphirerapids) and the kernel's permission for the tile state (Linux: asked once per
/// process), TDPBF16PS on 32 queries x 32 sub-keys per step: 16 times VDPBF16PS's multiply-adds per
/// instruction, where VDPBF16PS alone is no faster than fp32 FMAs (Intel issues it on one port); rows left
/// over (fewer than 16) and processes refused the permission use VDPBF16PS. With AVX512_BF16 only
/// (-mavx512bf16) the VDPBF16PS kernel, 4 queries x 64 sub-keys per step (twice an fp32 FMA's work on AMD
/// Zen 4). Elsewhere the same rounded operands widened to float through Eigen's GEMM (correct, within the
/// same bound, but no faster than kExact: the mode pays only on CPUs with the instructions). Every path
/// sums exact products of the same rounded operands in fp32 (in its own order), so the bound covers each,
/// and retrieval is the same on all of them: the re-check decides, never the approximate scores.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define PEER_BF16_DOT_INSTRUCTION 1
#else
#define PEER_BF16_DOT_INSTRUCTION 0
#endif
// AMX tiles: compiled in with the compiler's AMX-BF16 target on Linux (the tile state needs the kernel's
// permission); -DPEER_DISABLE_AMX=1 leaves them out.
#if PEER_BF16_DOT_INSTRUCTION && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && \
    !(defined(PEER_DISABLE_AMX) && PEER_DISABLE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#define PEER_BF16_AMX 1
#else
#define PEER_BF16_AMX 0
#endif

#include "peer/core/bfloat16.hpp"
#include "peer/core/gemm.hpp"
#include "peer/core/types.hpp"

namespace peer {

/// How sub-keys are scored before each half keeps its top k'. Both retrieve exactly: kExact ranks by the
/// fp32 (or double) GEMM's scores; kBFloat16Checked scores in bfloat16, then re-scores the candidates that
/// could be in the top k' with a fixed-order dot in the layer's Scalar and ranks by those (see
/// peer/retrieval/bf16_scoring.hpp for the bound). The two rank by values that may differ in the last
/// bits, so near-ties can resolve differently; each is exact for its own scores.
enum class SubKeyScoring { kExact, kBFloat16Checked };

inline const char* to_string(SubKeyScoring s) { return s == SubKeyScoring::kExact ? "exact" : "bf16_checked"; }

/// Whether this build scores kBFloat16Checked with the bf16 dot instruction (else the widened fallback).
constexpr bool bf16_dot_instruction() { return PEER_BF16_DOT_INSTRUCTION != 0; }

namespace detail {

/// Whether kBFloat16Checked scores on AMX tiles in this process: compiled in, and Linux granted the tile
/// data state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once, process-wide: every thread may then use
/// tiles). False on CPUs or kernels without AMX, which then score with VDPBF16PS. Asked only by the first
/// bf16-checked scoring, never in kExact. Once granted, Linux sizes signal frames for the tile state: an
/// alternate signal stack (sigaltstack) must then hold it (8 KiB of tile data more), or the kernel refuses to
/// install it; a program with small alternate stacks builds with -DPEER_DISABLE_AMX=1.
inline bool amx_scoring() {
#if PEER_BF16_AMX
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, Linux 5.16
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

/// Pairs of sub-key dimensions the kernels run over for d dimensions: ceil(d / 2), padded with zero pairs
/// to whole AMX tile rows (16 pairs, 64 bytes) where tiles are compiled in. Zero pairs add exact zeros.
constexpr Index bf16_kernel_pairs(Index d) { return PEER_BF16_AMX ? (d + 31) / 32 * 16 : (d + 1) / 2; }

/// The most sub-key dimensions (Dk / 2) the bound is kept for: g(d, 2^-23) stays below 2^-8.
constexpr Index kBf16ScoringMaxHalfDim = Index{1} << 15;

/// r = sum_j a[j] b[j] in Scalar, in one fixed order: 16 partial sums over j mod 16 (Eigen's fixed-size
/// arrays make them one vector loop on any SIMD width), added pairwise in lane order, then the tail. The
/// re-check score: the same wherever and on whichever thread it is computed.
template <typename Scalar>
Scalar recheck_dot(const Scalar* a, const Scalar* b, Index n) {
  using Lanes = Eigen::Array<Scalar, 16, 1>;
  Lanes part = Lanes::Zero();
  Index j = 0;
  for (; j + 16 <= n; j += 16) part += Eigen::Map<const Lanes>(a + j) * Eigen::Map<const Lanes>(b + j);
  Scalar l8[8];
  for (int l = 0; l < 8; ++l) l8[l] = part[l] + part[l + 8];
  Scalar sum = ((l8[0] + l8[4]) + (l8[2] + l8[6])) + ((l8[1] + l8[5]) + (l8[3] + l8[7]));
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

/// E of the file comment for |q| = q_norm and max |c| = key_norm over d = half dimensions, Scalar's unit
/// roundoff `scalar_roundoff`.
inline double bf16_score_bound(double q_norm, double key_norm, Index d, double scalar_roundoff) {
  const double u = std::ldexp(1.0, -8), dd = static_cast<double>(d);
  const auto g = [dd](double v) { return dd * v / (1.0 - dd * v); };
  const double rel = 2.0 * u + u * u + g(std::ldexp(1.0, -23)) * (1.0 + u) * (1.0 + u) + g(scalar_roundoff);
  const double abs = std::ldexp(1.0, -124) * (std::sqrt(dd) * (q_norm + key_norm) + dd);
  return (rel * q_norm * key_norm + abs) * (1.0 + std::ldexp(1.0, -10));
}

/// Largest |q|, max |c| and |q| max |c| the approximate scores are used for: beyond them a rounded operand,
/// product or sum could overflow (and inf * 0 is NaN), and the row is scored exactly instead.
constexpr double kBf16ScoringMaxProduct = 1e36;

/// One sub-key set in the kernel's layout: `groups` groups of n keys (1, or H with per-head keys), each
/// padded with zero keys to whole blocks of 16. Instruction path: packed [groups][blocks][pairs][16] of
/// bf16 pairs (c~[2p] in the low half of each 32-bit lane, c~[2p + 1] in the high half, zero pads beyond
/// d; pairs = bf16_kernel_pairs(d)). A block's 16 pairs from p on are one AMX B tile in its VNNI layout
/// (16 rows of 64 bytes, stride 64). Fallback: the rounded keys widened to float, [groups * n, 2 pairs].
struct Bf16SubKeys {
  Index groups = 0, keys = 0, dim = 0, pairs = 0, blocks = 0;
  std::vector<std::uint32_t> packed;
  RowMatrix<float> widened;
  std::vector<double> max_norm;  // [groups] max_j |c_j| of the unrounded keys

  Index padded() const { return blocks * 16; }
};

inline std::uint32_t bf16_pair(float lo, float hi) {
  return static_cast<std::uint32_t>(bf16_bits(narrow_bf16_nearest(lo))) |
         (static_cast<std::uint32_t>(bf16_bits(narrow_bf16_nearest(hi))) << 16);
}

/// Packs `keys` [groups * n, d] (group g = rows [g n, (g + 1) n)).
template <typename Scalar>
void pack_bf16_sub_keys(const ConstMatrixRef<Scalar>& keys, Index groups, Bf16SubKeys& out) {
  const Index n = keys.rows() / groups, d = keys.cols();
  out.groups = groups;
  out.keys = n;
  out.dim = d;
  out.pairs = bf16_kernel_pairs(d);
  out.blocks = (n + 15) / 16;
  out.max_norm.assign(static_cast<std::size_t>(groups), 0.0);
  for (Index g = 0; g < groups; ++g) {
    double m = 0;
    for (Index j = 0; j < n; ++j) m = std::max(m, keys.row(g * n + j).template cast<double>().norm());
    out.max_norm[static_cast<std::size_t>(g)] = m;
  }
  const auto at = [&](Index row, Index i) { return i < d ? static_cast<float>(keys(row, i)) : 0.0f; };
#if PEER_BF16_DOT_INSTRUCTION
  out.packed.assign(static_cast<std::size_t>(groups * out.blocks * out.pairs * 16), 0u);
  for (Index g = 0; g < groups; ++g) {
    for (Index j = 0; j < n; ++j) {
      std::uint32_t* block = out.packed.data() + ((g * out.blocks + j / 16) * out.pairs) * 16 + j % 16;
      for (Index p = 0; p < out.pairs; ++p) block[p * 16] = bf16_pair(at(g * n + j, 2 * p), at(g * n + j, 2 * p + 1));
    }
  }
#else
  out.widened.resize(groups * n, 2 * out.pairs);
  for (Index r = 0; r < groups * n; ++r) {
    for (Index i = 0; i < 2 * out.pairs; ++i) out.widened(r, i) = widen_bf16(narrow_bf16_nearest(at(r, i)));
  }
#endif
}

/// Queries in the kernel's layout: m rows of d rounded to bf16 (zero pads to 2 bf16_kernel_pairs(d)),
/// which in memory are the kernel's pairs already (little-endian: element 2p in the low half of 32-bit word
/// p), and 16 rows from a multiple of 16 pairs on are one AMX A tile (stride 4 pairs bytes); the fallback
/// widens them to float.
struct Bf16Queries {
  Index rows = 0, pairs = 0;
  std::vector<bfloat16> packed;  // [rows][2 pairs]
  RowMatrix<float> widened;      // [rows, 2 pairs], fallback only

  void resize(Index m, Index d) {
    rows = m;
    pairs = bf16_kernel_pairs(d);
    if (static_cast<Index>(packed.size()) < m * 2 * pairs) packed.resize(static_cast<std::size_t>(m * 2 * pairs));
#if !PEER_BF16_DOT_INSTRUCTION
    if (widened.rows() < m || widened.cols() != 2 * pairs) widened.resize(m, 2 * pairs);
#endif
  }
  /// Row i = q[0, d), rounded to nearest.
  template <typename Scalar>
  void set_row(Index i, const Scalar* q, Index d) {
    bfloat16* row = packed.data() + i * 2 * pairs;
    narrow_row_nearest(q, row, d);
    std::fill(row + d, row + 2 * pairs, bf16_from_bits(0));
#if !PEER_BF16_DOT_INSTRUCTION
    widen_row(row, widened.row(i).data(), 2 * pairs);
#endif
  }
  const bfloat16* row(Index i) const { return packed.data() + i * 2 * pairs; }
};

#if PEER_BF16_DOT_INSTRUCTION
// GCC 12 reports its own AVX-512 intrinsics as maybe-uninitialized once inlined (bug 105593, as in
// bfloat16.hpp): false, and silenced for this kernel only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// R queries x C blocks of 16 sub-keys: R * C accumulators over all pairs, then stored.
template <int R, int C>
inline void bf16_score_kernel(const bfloat16* a, Index pairs, const std::uint32_t* b, float* out, Index stride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (Index p = 0; p < pairs; ++p) {
    __m512i kb[C];
    for (int c = 0; c < C; ++c) kb[c] = _mm512_loadu_si512(b + (c * pairs + p) * 16);
    for (int r = 0; r < R; ++r) {
      std::int32_t word;  // query elements 2p, 2p + 1 as one 32-bit lane (memcpy: no aliasing of bf16 storage)
      std::memcpy(&word, a + 2 * (r * pairs + p), sizeof(word));
      const __m512i qa = _mm512_set1_epi32(word);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)qa, (__m512bh)kb[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * stride + c * 16, acc[r][c]);
  }
}

template <int C>
inline void bf16_score_rows(const bfloat16* a, Index m, Index pairs, const std::uint32_t* b, float* out, Index stride) {
  Index i = 0;
  for (; i + 4 <= m; i += 4) bf16_score_kernel<4, C>(a + 2 * i * pairs, pairs, b, out + i * stride, stride);
  for (; i < m; ++i) bf16_score_kernel<1, C>(a + 2 * i * pairs, pairs, b, out + i * stride, stride);
}

#if PEER_BF16_AMX
/// The tile configuration (palette 1): tiles 0-3 accumulate scores C (16 queries x 16 sub-keys, fp32), 4-5
/// hold queries A (16 rows x 16 pairs), 6-7 sub-keys B (16 pairs x 16 sub-keys, VNNI): all 16 rows of 64 bytes.
struct alignas(64) AmxTileConfig {
  std::uint8_t palette = 1, start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// 16 R queries x C blocks of 16 sub-keys (R, C in {1, 2}): C = A B over every pair, 16 pairs per TDPBF16PS
// (C[i][j] += a[i][2p] b[p][2j] + a[i][2p + 1] b[p][2j + 1]), then stored.
template <int R, int C>
inline void amx_score_tile(const bfloat16* a, Index pairs, const std::uint32_t* b, float* out, Index stride) {
  _tile_zero(0);
  if constexpr (C > 1) _tile_zero(1);
  if constexpr (R > 1) _tile_zero(2);
  if constexpr (R > 1 && C > 1) _tile_zero(3);
  const Index a_stride = 4 * pairs;  // bytes per query row
  for (Index p = 0; p < pairs; p += 16) {
    _tile_loadd(4, a + 2 * p, a_stride);
    if constexpr (R > 1) _tile_loadd(5, a + 2 * (16 * pairs + p), a_stride);
    _tile_loadd(6, b + p * 16, 64);
    if constexpr (C > 1) _tile_loadd(7, b + (pairs + p) * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (C > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (R > 1 && C > 1) _tile_dpbf16ps(3, 5, 7);
  }
  const Index s = stride * static_cast<Index>(sizeof(float));
  _tile_stored(0, out, s);
  if constexpr (C > 1) _tile_stored(1, out + 16, s);
  if constexpr (R > 1) _tile_stored(2, out + 16 * stride, s);
  if constexpr (R > 1 && C > 1) _tile_stored(3, out + 16 * stride + 16, s);
}

template <int R>
inline void amx_score_blocks(const bfloat16* a, Index pairs, const std::uint32_t* b, Index blocks, float* out,
                             Index stride) {
  Index c = 0;
  for (; c + 2 <= blocks; c += 2) amx_score_tile<R, 2>(a, pairs, b + c * pairs * 16, out + c * 16, stride);
  if (c < blocks) amx_score_tile<R, 1>(a, pairs, b + c * pairs * 16, out + c * 16, stride);
}

// The first m - m % 16 query rows on tiles (32 at a time: each B tile serves two A tiles and each A tile two
// B tiles); returns how many rows it scored. pairs % 16 == 0 (bf16_kernel_pairs).
inline Index amx_score_rows(const bfloat16* a, Index m, Index pairs, const std::uint32_t* b, Index blocks, float* out,
                            Index stride) {
  if (m < 16) return 0;
  const AmxTileConfig config;
  _tile_loadconfig(&config);  // per thread: the configuration is thread state
  Index i = 0;
  for (; i + 32 <= m; i += 32) amx_score_blocks<2>(a + 2 * i * pairs, pairs, b, blocks, out + i * stride, stride);
  if (i + 16 <= m) {
    amx_score_blocks<1>(a + 2 * i * pairs, pairs, b, blocks, out + i * stride, stride);
    i += 16;
  }
  _tile_release();
  return i;
}
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

/// out[i, j] (row stride `stride` >= keys.padded()) = the approximate score of query row i of
/// q.rows [row0, row0 + m) against sub-key j of group g, for j < keys.padded() (pads score 0). `tiles`:
/// whether AMX may be used where amx_scoring() (false: VDPBF16PS only, for tests and benchmarks).
inline void bf16_score(const Bf16Queries& q, Index row0, Index m, const Bf16SubKeys& keys, Index g, float* out,
                       Index stride, bool tiles = true) {
#if PEER_BF16_DOT_INSTRUCTION
  const Index pairs = keys.pairs, blocks = keys.blocks;
  const bfloat16* a = q.row(row0);
  const std::uint32_t* b = keys.packed.data() + g * blocks * pairs * 16;
#if PEER_BF16_AMX
  if (tiles && amx_scoring()) {
    const Index done = amx_score_rows(a, m, pairs, b, blocks, out, stride);
    a += 2 * done * pairs;
    out += done * stride;
    m -= done;
  }
#else
  (void)tiles;
#endif
  // Four blocks (64 sub-keys, pairs * 256 bytes: L1-resident) against every query row, then the next four.
  Index c = 0;
  for (; c + 4 <= blocks; c += 4) bf16_score_rows<4>(a, m, pairs, b + c * pairs * 16, out + c * 16, stride);
  switch (blocks - c) {
    case 3: bf16_score_rows<3>(a, m, pairs, b + c * pairs * 16, out + c * 16, stride); break;
    case 2: bf16_score_rows<2>(a, m, pairs, b + c * pairs * 16, out + c * 16, stride); break;
    case 1: bf16_score_rows<1>(a, m, pairs, b + c * pairs * 16, out + c * 16, stride); break;
    default: break;
  }
#else
  (void)tiles;
  MatrixMap<float> c(out, m, keys.keys, Eigen::OuterStride<>(stride));
  gemm(q.widened.middleRows(row0, m), keys.widened.middleRows(g * keys.keys, keys.keys).transpose(), c, 1.0f,
       GemmUpdate::kAssign);
#endif
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_RETRIEVAL_BF16_SCORING_HPP
