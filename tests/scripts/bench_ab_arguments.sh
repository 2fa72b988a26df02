#!/usr/bin/env bash
# scripts/bench_ab refuses bad arguments with a message that names them (exit 2), before it builds anything.
set -uo pipefail
script=$1
check() {  # check WANTED_TEXT ARGS...: bench_ab ARGS must exit 2 and print WANTED_TEXT
  local want=$1 out rc
  shift
  out=$("$script" "$@" 2>&1)
  rc=$?
  if [ "$rc" -ne 2 ] || [[ $out != *"$want"* ]]; then
    echo "FAIL: bench_ab $* exited $rc, wanted 2 and '$want'; it printed: $out"
    exit 1
  fi
}
check "--rounds must be a positive integer, got '0'" --rounds 0 a b c d
check "--rounds must be a positive integer, got 'x'" --rounds x a b c d
check "expected REV_A FILTER_A REV_B FILTER_B, got 3 arguments" a b c
check "unknown option '--bogus'" --bogus a b c d
check "'no-such-revision-xyz' is not a revision" no-such-revision-xyz f . f
"$script" --help | grep -q 'interleaved rounds' || { echo "FAIL: bench_ab --help does not describe itself"; exit 1; }
echo "bench_ab arguments: ok"
