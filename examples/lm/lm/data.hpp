// Byte-level data: any file is a sequence of bytes (UTF-8 text needs no tokenizer), split into training and
// held-out validation bytes, and batches of windows that are a pure function of (seed, step), so a resumed
// run sees exactly the batches an uninterrupted one would.
#ifndef PEER_EXAMPLES_LM_DATA_HPP
#define PEER_EXAMPLES_LM_DATA_HPP

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "lm/common.hpp"

namespace lm {

using Bytes = std::vector<std::uint8_t>;

inline Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// A text split into training and validation bytes: the text is cut into chunks of `chunk` bytes and
/// chunk c is held out when floor((c + 1) f) > floor(c f), so about a fraction f of the chunks, spread
/// evenly over the text, is validation.
struct Corpus {
  Bytes train, validation;

  static Corpus split(const Bytes& text, double validation_fraction, Index chunk = 16384) {
    if (!(validation_fraction > 0 && validation_fraction < 1)) {
      peer::detail::throw_invalid("validation fraction", validation_fraction, "must be in (0, 1)");
    }
    Corpus c;
    const Index n = static_cast<Index>(text.size());
    for (Index c0 = 0, i = 0; c0 < n; c0 += chunk, ++i) {
      const bool held_out = std::floor(static_cast<double>(i + 1) * validation_fraction) >
                            std::floor(static_cast<double>(i) * validation_fraction);
      Bytes& dst = held_out ? c.validation : c.train;
      dst.insert(dst.end(), text.begin() + c0, text.begin() + std::min(n, c0 + chunk));
    }
    return c;
  }
};

/// Entropy of the byte frequencies of `data`, in bits per byte: the loss of the best model that ignores
/// context (a unigram model fitted to the data itself).
inline double unigram_entropy_bits(const Bytes& data) {
  std::array<double, 256> count{};
  for (std::uint8_t b : data) count[b] += 1;
  double h = 0;
  const double n = static_cast<double>(data.size());
  for (double c : count) {
    if (c > 0) h -= c / n * std::log2(c / n);
  }
  return h;
}

/// A training batch: B windows of T + 1 bytes at random offsets, drawn from (seed, step) only.
/// inputs = window[0, T), targets = window[1, T + 1).
inline void training_batch(const Bytes& data, Index batch, Index seq, std::uint64_t seed, std::int64_t step,
                           TokenMatrix& inputs, TokenMatrix& targets) {
  const Index span = static_cast<Index>(data.size()) - seq;
  if (span < 1) peer::detail::throw_invalid("training bytes", data.size(), "must exceed the context + 1");
  const peer::CounterRng rng(seed, 0x6c6d5f64617461ULL);  // stream "lm_data"
  inputs.resize(batch, seq);
  targets.resize(batch, seq);
  for (Index b = 0; b < batch; ++b) {
    const std::uint64_t draw = static_cast<std::uint64_t>(step) * static_cast<std::uint64_t>(batch) + static_cast<std::uint64_t>(b);
    const Index start = static_cast<Index>(rng.bits(draw) % static_cast<std::uint64_t>(span));
    for (Index t = 0; t < seq; ++t) {
      inputs(b, t) = data[static_cast<std::size_t>(start + t)];
      targets(b, t) = data[static_cast<std::size_t>(start + t + 1)];
    }
  }
}

/// Start offsets of evaluation windows of T + 1 bytes (stride T, so every byte after the first is predicted
/// once): all of them, or `max_windows` spread evenly over the data when there are more.
inline std::vector<Index> evaluation_windows(const Bytes& data, Index seq, Index max_windows) {
  const Index all = (static_cast<Index>(data.size()) - 1) / seq;
  std::vector<Index> starts;
  const Index count = max_windows > 0 ? std::min(all, max_windows) : all;
  for (Index i = 0; i < count; ++i) starts.push_back((count == all ? i : i * all / count) * seq);
  return starts;
}

}  // namespace lm

#endif  // PEER_EXAMPLES_LM_DATA_HPP
