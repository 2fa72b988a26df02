// SPDX-License-Identifier: MIT
#ifndef PEER_CORE_FIELDS_HPP
#define PEER_CORE_FIELDS_HPP

/// \file
/// Configurations as (key, value) text pairs: what checkpoints store as metadata and compare on load.

#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace peer {

/// A configuration as ordered (key, value) text pairs.
using Fields = std::vector<std::pair<std::string, std::string>>;

namespace detail {

/// A double as text with 17 significant digits, so that it reads back exactly.
inline std::string exact_text(double v) {
  std::ostringstream out;
  out.precision(17);
  out << v;
  return out.str();
}

/// The first field whose value differs between a and b (same keys in the same order), as
/// "field: a's value vs b's value", or "" if none.
inline std::string first_difference(const Fields& a, const Fields& b) {
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i].first != b[i].first) return a[i].first + ": field vs " + b[i].first;
    if (a[i].second != b[i].second) return a[i].first + ": " + a[i].second + " vs " + b[i].second;
  }
  if (a.size() != b.size()) return "number of fields: " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  return "";
}

}  // namespace detail
}  // namespace peer

#endif  // PEER_CORE_FIELDS_HPP
