# Shared by scripts/demo, scripts/test and scripts/bench: install what is missing, from Debian's packages.
# shellcheck shell=bash

# The Debian packages the project builds with.
PEER_PACKAGES=(cmake ninja-build g++ libeigen3-dev libgtest-dev libbenchmark-dev nlohmann-json3-dev python3-numpy)
# What scripts/test adds: clang with its OpenMP and sanitizer runtimes for the sanitizer stage, Open MPI for
# the MPI tests.
PEER_TEST_PACKAGES=(clang libomp-14-dev libclang-rt-14-dev libopenmpi-dev openmpi-bin)

# ensure_packages PKG...: installs the missing ones with apt-get when root; otherwise prints the exact
# command to run and exits non-zero.
ensure_packages() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "peer: missing Debian packages: ${missing[*]}" >&2
    echo "peer: install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "peer: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Number of parallel build jobs: all cores.
build_jobs() { nproc 2>/dev/null || echo 2; }

# ensure_corpus: writes build/data/kjv.txt (the King James Bible from Debian's bible-kjv, one verse per
# line without its reference: "Ge1:1 In the beginning..." -> "In the beginning...") unless it is there, and
# sets CORPUS to its path. The caller ensures the bible-kjv package.
ensure_corpus() {
  CORPUS=build/data/kjv.txt
  [ -s "$CORPUS" ] && return 0
  mkdir -p "$(dirname "$CORPUS")"
  bible -f Gen1:1-Rev22:21 | sed 's/^[^ ]* //' > "$CORPUS.tmp"
  mv "$CORPUS.tmp" "$CORPUS"
  echo "peer: wrote $CORPUS ($(wc -c < "$CORPUS") bytes) from Debian's bible-kjv"
}
