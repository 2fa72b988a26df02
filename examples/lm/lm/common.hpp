// Shared vocabulary of the language-model example: matrix types, token matrices and the switches the
// transformer pieces take. Example code, not part of peer's public API.
#ifndef PEER_EXAMPLES_LM_COMMON_HPP
#define PEER_EXAMPLES_LM_COMMON_HPP

#include <peer/peer.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lm {

using peer::Index;
template <typename Scalar>
using Mat = peer::RowMatrix<Scalar>;
template <typename Scalar>
using MatRef = peer::MatrixRef<Scalar>;
template <typename Scalar>
using ConstMatRef = peer::ConstMatrixRef<Scalar>;

/// Byte tokens, [B, T] row-major (int32, as peer's expert ids).
using TokenMatrix = peer::IdMatrix;

/// Bytes: the vocabulary of a byte-level model.
constexpr Index kVocab = 256;

/// How positions enter the model.
enum class PositionKind {
  kLearned,  ///< a learned [T, D] table added to the token embedding (GPT-2)
  kRotary,   ///< rotary embedding of queries and keys in every attention layer (RoFormer)
};

/// The pre-norm of every block and the final norm.
enum class NormKind {
  kRms,    ///< RMSNorm: x / rms(x) * g
  kLayer,  ///< LayerNorm: (x - mean) / std * g + b
};

inline const char* to_string(PositionKind p) { return p == PositionKind::kLearned ? "learned" : "rotary"; }
inline const char* to_string(NormKind n) { return n == NormKind::kRms ? "rms" : "layer"; }

inline PositionKind position_kind_from_string(const std::string& s) {
  if (s == "learned") return PositionKind::kLearned;
  if (s == "rotary") return PositionKind::kRotary;
  throw std::invalid_argument("positions = \"" + s + "\" must be one of learned, rotary");
}
inline NormKind norm_kind_from_string(const std::string& s) {
  if (s == "rms") return NormKind::kRms;
  if (s == "layer") return NormKind::kLayer;
  throw std::invalid_argument("norm = \"" + s + "\" must be one of rms, layer");
}

/// Fills a dense tensor with N(0, std^2), a pure function of (seed, tensor name) as peer's initializers are.
template <typename Scalar>
void fill_normal(peer::Parameters<Scalar>& params, peer::DenseHandle h, double std_dev, std::uint64_t seed) {
  const peer::CounterRng rng(seed, peer::stream_of(params.layout().spec(h).name));
  auto w = params.dense(h);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<Scalar>(std_dev * rng.normal(static_cast<std::uint64_t>(i)));
}

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_COMMON_HPP
