// SPDX-License-Identifier: MIT
#ifndef PEER_VERSION_HPP
#define PEER_VERSION_HPP

/// \file
/// Library version (kept in step with project(VERSION) in CMakeLists.txt).

#define PEER_VERSION_MAJOR 0
#define PEER_VERSION_MINOR 1
#define PEER_VERSION_PATCH 0

namespace peer {
/// "major.minor.patch"
inline const char* version() { return "0.1.0"; }
}  // namespace peer

#endif  // PEER_VERSION_HPP
