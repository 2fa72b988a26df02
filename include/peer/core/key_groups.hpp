// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_KEY_GROUPS_HPP
#define PEER_CORE_KEY_GROUPS_HPP

/// \file
/// Grouping items by an integer key: the reverse index behind every deterministic scatter-add.
///
/// Backward passes produce one contribution per (token, head, slot) to some row of a table (an expert's row
/// or a product-key memory's value row). Instead of atomics or per-thread copies, the items are grouped by
/// row with a stable radix sort; each row is then summed by one thread over its items in ascending item
/// order. The sum order depends only on the data, so gradients are bitwise identical for any thread
/// count. Cost O(M) per 11-bit digit of the key range, memory O(M): never O(number of rows).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "peer/core/error.hpp"
#include "peer/core/types.hpp"

namespace peer {
namespace detail {

/// Items grouped by key: group g has key keys[g] (strictly ascending) and items
/// order[starts[g] .. starts[g + 1]) (ascending item indices).
struct KeyGroups {
  std::vector<std::int32_t> keys;
  std::vector<std::int64_t> starts;
  std::vector<std::int32_t> order;
  std::vector<std::int32_t> scratch_keys, scratch_keys2, scratch_order;  // reused across calls

  Index num_groups() const { return static_cast<Index>(keys.size()); }
};

/// Groups items 0..count-1 by item_key[i] in [0, key_limit). Stable: within a group, items ascend.
inline void group_by_key(const std::int32_t* item_key, Index count, std::int64_t key_limit, KeyGroups& out) {
  if (count > INT32_MAX) detail::throw_invalid("group_by_key: count", count, "must be < 2^31");
  constexpr int kBits = 11;
  constexpr std::int64_t kRadix = std::int64_t{1} << kBits;
  const std::size_t n = static_cast<std::size_t>(count);
  std::vector<std::int32_t>& k0 = out.scratch_keys;
  std::vector<std::int32_t>& o0 = out.order;
  std::vector<std::int32_t>& k1 = out.scratch_keys2;
  std::vector<std::int32_t>& o1 = out.scratch_order;
  k1.resize(n);
  o1.resize(n);
  k0.assign(item_key, item_key + n);
  o0.resize(n);
  for (std::size_t i = 0; i < n; ++i) o0[i] = static_cast<std::int32_t>(i);
  std::int64_t histogram[kRadix];
  // LSD passes over as many digits as key_limit - 1 needs; each pass is a stable counting sort.
  for (int shift = 0; shift < 63 && (key_limit - 1) >> shift > 0; shift += kBits) {
    std::fill(histogram, histogram + kRadix, 0);
    for (std::size_t i = 0; i < n; ++i) ++histogram[(k0[i] >> shift) & (kRadix - 1)];
    std::int64_t sum = 0;
    for (std::int64_t d = 0; d < kRadix; ++d) {
      const std::int64_t c = histogram[d];
      histogram[d] = sum;
      sum += c;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t dst = histogram[(k0[i] >> shift) & (kRadix - 1)]++;
      k1[static_cast<std::size_t>(dst)] = k0[i];
      o1[static_cast<std::size_t>(dst)] = o0[i];
    }
    k0.swap(k1);
    o0.swap(o1);
  }
  out.keys.clear();
  out.starts.clear();
  out.keys.reserve(n);  // the most groups n items can form: a later call never grows them again
  out.starts.reserve(n + 1);
  for (std::size_t i = 0; i < n; ++i) {
    if (i == 0 || k0[i] != k0[i - 1]) {
      out.keys.push_back(k0[i]);
      out.starts.push_back(static_cast<std::int64_t>(i));
    }
  }
  out.starts.push_back(static_cast<std::int64_t>(n));
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_KEY_GROUPS_HPP
