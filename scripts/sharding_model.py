#!/usr/bin/env python3
"""The written model of expert sharding at 8-64 ranks (docs/distributed.md, "Scaling").

Per training step, each rank sends for its B tokens (peer/mpi/expert_sharded.hpp, counted exactly by
ShardedExperts' traffic counters and checked by tests/mpi/test_sharded.cpp):
  per remote (token, owner) pair with c slots, in float:
    forward  request 4 (1 + c) + 4 (D + c), reply 4 (D + c)
    backward request 4 (1 + c) + 4 (2 D + 2 c), reply 4 (D + c)
  that is 20 D + 8 + 28 c bytes per remote pair, and the slots of all remote pairs of a token add up to
  S (P - 1) / P on average, so per token: remote_pairs (20 D + 8) + 28 S (P - 1) / P;
  plus the all-reduce of the replicated tensors (query network, sub-keys): 2 (P - 1) / P of their bytes.
With S = H k slots routed uniformly over P owners, a token forms P (1 - (1 - 1/P)^S) pairs, of which a
fraction (P - 1) / P are remote. Data parallelism instead sends each touched table row (4 + 8 D bytes with
its id) to every other rank: (P - 1) rows (4 + 8 D) with rows = the rank's distinct touched rows.

Time on a network of bandwidth W and latency a: bytes / W + collectives x (P - 1) a (Open MPI's pairwise
all-to-all: P - 1 steps), with 8 all-to-all calls per sharded step (forward and backward: counts, ints,
scalars, replies). Compute: the rank's step at `tokens_per_s` (a measured single-process figure, or an
assumed faster node); communication is not overlapped with compute in this implementation.

Usage: python3 scripts/sharding_model.py [--dim 512] [--heads 8] [--top-k 16] [--tokens 2048]
                                         [--sub-keys 1024] [--key-dim 256] [--gbit 100] [--latency-us 5]
                                         [--tokens-per-s 2600 40000]
"""
import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    ap.add_argument("--sub-keys", type=int, default=1024)
    ap.add_argument("--key-dim", type=int, default=256)
    ap.add_argument("--gbit", type=float, default=100.0)
    ap.add_argument("--latency-us", type=float, default=5.0)
    ap.add_argument("--tokens-per-s", type=float, nargs="+", default=[2600.0, 40000.0],
                    help="one rank's training-step throughput without communication (one or more scenarios)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    a = ap.parse_args()

    d, s, b = a.dim, a.heads * a.top_k, a.tokens
    n = a.sub_keys * a.sub_keys
    w = a.gbit * 1e9 / 8
    # Query projection, the query norm's scale and shift, the shared sub-keys (two sets of n x Dk/2).
    dense_bytes = 4 * (d * a.heads * a.key_dim + 2 * a.heads * a.key_dim + a.sub_keys * a.key_dim)
    print(f"D = {d}, S = H k = {s}, {b} tokens per rank, N = {n:,}, {a.gbit:g} Gb/s, {a.latency_us:g} us; "
          f"replicated tensors {dense_bytes / 2**20:.1f} MiB; table state per rank = 12 N 2D / P bytes "
          f"({12 * n * 2 * d / 2**30:.1f} GiB at P = 1)")
    head = "| P | pairs per token | sharded: KiB sent per token | MiB per step | exchange ms | " + \
           " | ".join(f"share of a {t:,.0f} tokens/s step" for t in a.tokens_per_s) + \
           " | data parallel: MiB per step | exchange ms |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for p in a.ranks:
        pairs = p * (1 - (1 - 1 / p) ** s)
        remote = pairs * (p - 1) / p
        per_token = remote * (20 * d + 8) + 28 * s * (p - 1) / p + 2 * (p - 1) / p * dense_bytes / b
        step_bytes = per_token * b
        ms = 1e3 * (step_bytes / w + 8 * (p - 1) * a.latency_us * 1e-6)
        shares = []
        for t in a.tokens_per_s:
            compute_ms = 1e3 * b / t
            shares.append(f"{ms / (ms + compute_ms):.0%}")
        # Data parallel: the rank's distinct rows (expected over B S uniform draws from N) to each other rank.
        rows = n * (1 - (1 - 1 / n) ** (b * s))
        dp_bytes = (p - 1) * rows * (4 + 8 * d) + 2 * (p - 1) / p * dense_bytes
        dp_ms = 1e3 * (dp_bytes / w + 2 * (p - 1) * a.latency_us * 1e-6)
        print(f"| {p} | {pairs:.1f} | {per_token / 1024:.1f} | {step_bytes / 2**20:,.0f} | {ms:.1f} | " +
              " | ".join(shares) + f" | {dp_bytes / 2**20:,.0f} | {dp_ms:,.0f} |")


if __name__ == "__main__":
    main()
