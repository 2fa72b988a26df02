#!/usr/bin/env python3
"""Report of scripts/bench: Google Benchmark JSON -> markdown tables and PNG plots.

Reads <results>/bench_{machine,kernels,retrieval,layers}.json (--benchmark_out format, with or without
repetitions: medians are used when present) and <results>/meta.txt (written by scripts/bench: date,
command, commit, compiler, CPU model and flags), and writes:

- the block between the markers <!-- generated:begin --> and <!-- generated:end --> of --doc (appended
  at the end of the file when the markers are missing; nothing outside them changes), or, without --doc,
  <results>/report.md;
- retrieval_time_per_token.png and layers_tokens_per_second.png into --img (when matplotlib is there).

From `scripts/bench --storage` (<results>/bench_storage.json, BM_Storage cases each run in a process of
its own and merged with --merge), it writes the block between <!-- generated:storage:begin --> and
<!-- generated:storage:end --> instead, and storage_tokens_per_second.png.

The kernels and layers are also stated as fractions of the machine measurements of the same run: expert
traffic as a share of the random-gather bandwidth, GEMM-bound work as a share of the GEMM rate.
Standard library only, plus matplotlib for the plots.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

BEGIN = "<!-- generated:begin -->"
END = "<!-- generated:end -->"
STORAGE_BEGIN = "<!-- generated:storage:begin -->"
STORAGE_END = "<!-- generated:storage:end -->"
BINARIES = ["bench_machine", "bench_kernels", "bench_retrieval", "bench_layers", "bench_storage"]
RETRIEVAL_PNG = "retrieval_time_per_token.png"
LAYERS_PNG = "layers_tokens_per_second.png"
STORAGE_PNG = "storage_tokens_per_second.png"
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
STANDARD_KEYS = {
    "name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
    "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit", "aggregate_name",
    "aggregate_unit", "items_per_second", "bytes_per_second", "label", "error_occurred", "error_message",
}
PHASES = ["forward", "forward + backward", "training step"]
NA = "—"


# ---- Loading ---------------------------------------------------------------------------------------

class Run:
    """One benchmark instance: real time per iteration (ms), counters, parsed name."""

    def __init__(self, run_name, ms, counters, cv, label=""):
        self.run_name = run_name
        self.label = label
        self.ms = ms
        self.counters = counters
        self.cv = cv  # coefficient of variation of the real time over repetitions, or None
        parts = run_name.split("/")
        self.family = parts[0]
        self.named = {}
        self.pos = []
        for part in parts[1:]:
            if part in ("real_time", "process_time", "manual_time") or part.startswith(("min_time:", "repeats:")):
                continue
            if ":" in part:
                key, value = part.split(":", 1)
                self.named[key] = to_number(value)
            else:
                self.pos.append(to_number(part))

    def c(self, key):
        return self.counters.get(key)


def to_number(text):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def load_binary(path):
    """Runs of one JSON file, keyed by run name, and its context."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    groups = {}
    errors = []
    for entry in data.get("benchmarks", []):
        if entry.get("error_occurred"):
            errors.append(f"{entry.get('name')}: {entry.get('error_message', 'error')}")
            continue
        groups.setdefault(entry.get("run_name", entry["name"]), []).append(entry)
    runs = {}
    for run_name, entries in groups.items():
        aggregates = {e.get("aggregate_name"): e for e in entries if e.get("run_type") == "aggregate"}
        iterations = [e for e in entries if e.get("run_type", "iteration") == "iteration"]
        cv = None
        if "median" in aggregates:
            chosen = [aggregates["median"]]
            if "cv" in aggregates:
                cv = aggregates["cv"]["real_time"]
        elif iterations:
            chosen = iterations
            times = [e["real_time"] for e in iterations]
            if len(times) > 1 and statistics.mean(times) > 0:
                cv = statistics.stdev(times) / statistics.mean(times)
        else:
            continue
        ms = statistics.median(e["real_time"] * TO_MS.get(e.get("time_unit", "ns"), 1e-6) for e in chosen)
        keys = {k for e in chosen for k, v in e.items() if k not in STANDARD_KEYS and isinstance(v, (int, float))}
        counters = {k: statistics.median(e[k] for e in chosen if k in e) for k in keys}
        runs[run_name] = Run(run_name, ms, counters, cv, chosen[0].get("label", ""))
    return runs, data.get("context", {}), sorted(set(errors))


class Results:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.runs = {}
        self.contexts = {}
        self.errors = []
        for binary in BINARIES:
            path = self.folder / f"{binary}.json"
            if path.exists():
                self.runs[binary], self.contexts[binary], errors = load_binary(path)
                self.errors += [f"{binary} {e}" for e in errors]
        self.meta = {}
        meta_path = self.folder / "meta.txt"
        if meta_path.exists():
            for line in meta_path.read_text(encoding="utf-8").splitlines():
                if ":" in line:
                    key, value = line.split(":", 1)
                    self.meta[key.strip()] = value.strip()

    def find(self, binary, family, pos=None, **named):
        """The run of `family` whose positional arguments start with `pos` and whose named arguments
        include `named`, or None."""
        for run in self.runs.get(binary, {}).values():
            if run.family != family:
                continue
            if pos is not None and run.pos[: len(pos)] != list(pos):
                continue
            if all(run.named.get(k) == v for k, v in named.items()):
                return run
        return None

    def family(self, binary, family):
        return [r for r in self.runs.get(binary, {}).values() if r.family == family]

    def context(self):
        for binary in BINARIES:
            if binary in self.contexts:
                return self.contexts[binary]
        return {}


# ---- Formatting ------------------------------------------------------------------------------------

def sig(x, digits=3):
    """x with `digits` significant digits, thousands separated, or a dash."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return NA
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{decimals}f}"


def integer(x):
    return NA if x is None else f"{x:,.0f}"


def pct(x):
    return NA if x is None else f"{100 * x:.0f}%"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def times(x):
    return NA if x is None else f"{x:.1f}x" if x < 100 else f"{x:,.0f}x"


def n_label(num_experts):
    root = int(round(math.sqrt(num_experts)))
    return f"{root}^2" if root * root == num_experts else f"{num_experts:,}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def flags_summary(flags):
    have = set(flags.split())
    parts = []
    if "avx2" in have:
        parts.append("AVX2" + (" + FMA" if "fma" in have else ""))
    avx512 = [(f, name) for f, name in [
        ("avx512f", "F"), ("avx512dq", "DQ"), ("avx512cd", "CD"), ("avx512bw", "BW"), ("avx512vl", "VL"),
        ("avx512ifma", "IFMA"), ("avx512vbmi", "VBMI"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"),
        ("avx512_fp16", "FP16")] if f in have]
    if avx512:
        parts.append("AVX-512 (" + ", ".join(name for _, name in avx512) + ")")
    else:
        parts.append("no AVX-512")
    amx = [name for f, name in [("amx_tile", "tile"), ("amx_bf16", "BF16"), ("amx_int8", "INT8")] if f in have]
    if amx:
        parts.append("AMX (" + ", ".join(amx) + ")")
    return ", ".join(parts)


def size_label(num_bytes):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"


# ---- Machine references ----------------------------------------------------------------------------

def gather_bandwidth(res, d, threads):
    """Best random-gather GB/s (with or without prefetch) at row width 2 D and `threads`."""
    values = [r.c("GB/s") for r in res.family("bench_machine", "BM_Gather")
              if r.named.get("D") == d and r.named.get("threads") == threads and r.c("GB/s")]
    return max(values) if values else None


def gemm_rate(res, family, key, value, threads):
    """Best GFLOP/s over the GEMM variants of a shape."""
    values = [r.c("GFLOP/s") for f in (family + "_Peer", family + "_Eigen", family + "_EigenWhole")
              for r in res.family("bench_machine", f)
              if r.named.get(key) == value and r.named.get("threads") == threads and r.c("GFLOP/s")]
    return max(values) if values else None


def peer_gemm_rate(res, family, key, value, threads):
    run = res.find("bench_machine", family + "_Peer", **{key: value, "threads": threads})
    return run.c("GFLOP/s") if run else None


# ---- Sections --------------------------------------------------------------------------------------

def section_header(res, doc_command):
    meta, ctx = res.meta, res.context()
    mode = meta.get("mode", "unknown")
    date = meta.get("date", ctx.get("date", "unknown date"))
    title = {"quick": "smoke run", "storage": "table storage and state"}.get(mode, "full suite")
    lines = [f"## Generated: {title} of {date[:10]}", ""]
    if mode == "quick":
        lines += ["> **Smoke run** (`scripts/bench --quick`): subsets of every binary with min_time 0.01 s. These",
                  "> figures check that the suite runs; they are not figures for the record.", ""]
    caches = []
    for c in ctx.get("caches", []):
        if c.get("type") == "Instruction":
            continue
        share = c.get("num_sharing", 1)
        where = " per core" if share == 1 else f" shared by {share}"
        caches.append(f"L{c.get('level')} {size_label(c.get('size', 0))}{where}")
    mem = meta.get("mem_total_kib")
    mem_text = f", {int(mem) / (1 << 20):.1f} GiB" if mem and mem.isdigit() else ""
    cpu = meta.get("cpu_model", "unknown CPU")
    thp = meta.get("thp", "unknown")
    thp = re.search(r"\[(\w+)\]", thp).group(1) if re.search(r"\[(\w+)\]", thp) else thp
    lines.append(f"- Machine: {cpu}, {ctx.get('num_cpus', '?')} logical CPUs at {ctx.get('mhz_per_cpu', '?')} MHz, "
                 f"{flags_summary(meta.get('cpu_flags', ''))}; {'; '.join(caches)}{mem_text}; "
                 f"{meta.get('kernel', 'unknown kernel')}; transparent huge pages: {thp}.")
    lines.append(f"- Build: {meta.get('compiler', 'unknown compiler')}, `{meta.get('flags', '?')}`, float, OpenMP; "
                 f"commit {meta.get('commit', 'unknown')}.")
    args = meta.get("args", "")
    if mode == "storage":
        lines.append(f"- Command: `{meta.get('command', doc_command).strip()}`: every `BM_Storage` case ran alone as "
                     f"`{meta.get('build', 'build/bench')}/benchmarks/bench_layers {args} --benchmark_filter='^<case>$'`, one after another.")
    else:
        lines.append(f"- Command: `{meta.get('command', doc_command).strip()}`: each binary ran as "
                     f"`{meta.get('build', 'build/bench')}/benchmarks/<binary> {args}`" +
                     (" with a filter (see meta.txt)." if mode == "quick" else "."))
    reps = re.search(r"--benchmark_repetitions=(\d+)", args)
    worst = None
    for binary, runs in res.runs.items():
        for run in runs.values():
            if run.cv is not None and (worst is None or run.cv > worst[0]):
                worst = (run.cv, run.run_name)
    if reps:
        spread = f" The largest coefficient of variation of a time was {pct(worst[0])} ({worst[1]})." if worst else ""
        lines.append(f"- Times are medians of {reps.group(1)} repetitions, wall-clock.{spread}")
    expected = ["bench_storage"] if mode == "storage" else [b for b in BINARIES if b != "bench_storage"]
    missing = [b for b in expected if b not in res.runs]
    if missing:
        lines.append(f"- Not in this run: {', '.join(missing)}.")
    for error in res.errors:
        lines.append(f"- **Failed:** {error}.")
    busy = []
    for b in BINARIES:
        try:
            busy.append((b, float(meta[f"busy_{b}"])))
        except (KeyError, ValueError):
            pass
    if busy:
        text = ", ".join(f"{b} {pct(x)}" for b, x in busy)
        lines.append(f"- Share of the CPUs busy with other work in the second before each binary: {text}." +
                     (" **The machine was not idle: figures may be low.**" if any(x > 0.1 for _, x in busy) else ""))
    return lines


def section_machine(res):
    lines = ["### Machine limits (bench_machine)", ""]
    if "bench_machine" not in res.runs:
        return lines + ["Not in this run.", ""]
    shapes = [
        ("BM_GemmQuery", "D", 256, "query projection, D = 256: [1024, 256] x [256, 2048]"),
        ("BM_GemmQuery", "D", 512, "query projection, D = 512: [1024, 512] x [512, 4096]"),
        ("BM_GemmSubKeys", "Dk", 256, "sub-key tile, Dk = 256: 64 x [128, 128] x [128, 1024]"),
        ("BM_GemmSubKeys", "Dk", 512, "sub-key tile, Dk = 512: 64 x [128, 256] x [256, 1024]"),
    ]
    impls = [("_Peer", "`peer::detail::gemm`, row blocks"), ("_Eigen", "Eigen `noalias() +=`, row blocks"),
             ("_EigenWhole", "Eigen `noalias() +=`, whole (Eigen threads)")]
    rows = []
    for family, key, value, label in shapes:
        for suffix, impl in impls:
            r1 = res.find("bench_machine", family + suffix, **{key: value, "threads": 1})
            r2 = res.find("bench_machine", family + suffix, **{key: value, "threads": 2})
            if not r1 and not r2:
                continue
            g1 = r1.c("GFLOP/s") if r1 else None
            g2 = r2.c("GFLOP/s") if r2 else None
            rows.append([label, impl, sig(g1), sig(g2), pct(ratio(g1, gemm_rate(res, family, key, value, 1))),
                         pct(ratio(g2, gemm_rate(res, family, key, value, 2))), times(ratio(g2, g1))])
    if rows:
        lines += ["fp32 GEMM, c += a b, GFLOP/s. Row blocks: 64 rows (the query projection's grain) or one",
                  "16-token tile of 128 rows per call (the sub-key scoring), spread over the threads by",
                  "`parallel_for` as the library does; \"whole\" is one Eigen product over all rows, threaded",
                  "by Eigen. \"% of best\": of the fastest variant at that shape and thread count.", "",
                  table(["shape", "product", "GFLOP/s, 1 thread", "2 threads", "% of best, 1 thread",
                         "% of best, 2 threads", "2 vs 1 thread"], rows), ""]
    rows = []
    for d in (256, 512):
        for prefetch in (0, 1):
            cells = []
            for threads in (1, 2):
                r = res.find("bench_machine", "BM_Gather", D=d, prefetch=prefetch, threads=threads)
                cells += [sig(r.c("GB/s")) if r else NA, sig(r.c("rows/s") / 1e6) if r else NA]
            if any(c != NA for c in cells):
                rows.append([str(d), size_label(1024 * 1024 * 2 * d * 4), "2 rows ahead" if prefetch else "none"] + cells)
    stream = [res.find("bench_machine", "BM_StreamRead", threads=t) for t in (1, 2)]
    if rows or any(stream):
        lines += ["Random row gathers: 1024 tokens x 128 rows of [u | v] (2 D floats) from a table of 1024^2 rows,",
                  "each token's rows summed; GB/s of rows read. Sequential read: the sum of 1 GiB.", ""]
        if any(stream):
            rows.append(["sequential read", "1 GiB", NA,
                         sig(stream[0].c("GB/s")) if stream[0] else NA, NA,
                         sig(stream[1].c("GB/s")) if stream[1] else NA, NA])
        lines += [table(["D", "table", "prefetch", "GB/s, 1 thread", "M rows/s, 1 thread", "GB/s, 2 threads",
                         "M rows/s, 2 threads"], rows), ""]
    return lines


def section_kernels(res):
    lines = ["### Kernels against naive versions (bench_kernels)", ""]
    if "bench_kernels" not in res.runs:
        return lines + ["Not in this run.", ""]
    rows = []
    notes = []
    for direction in ("Forward", "Backward"):
        for num in sorted({r.named.get("N") for r in res.family("bench_kernels", f"BM_Expert{direction}_Fused")}):
            for threads in (1, 2):
                fused = res.find("bench_kernels", f"BM_Expert{direction}_Fused", N=num, threads=threads)
                naive = res.find("bench_kernels", f"BM_Expert{direction}_Naive", N=num, threads=threads)
                if not fused and not naive:
                    continue
                d = int((fused or naive).c("D") or 256)
                gather = gather_bandwidth(res, d, threads)
                fused_gbs = fused.c("GB/s") if fused else None
                share = ratio(fused_gbs, gather)
                rows.append([direction.lower(), n_label(num), str(threads), sig(fused.ms) if fused else NA,
                             sig(naive.ms) if naive else NA, times(ratio(naive.ms if naive else None, fused.ms if fused else None)),
                             integer(fused.c("tokens/s")) if fused else NA, sig(fused_gbs), pct(share)])
                if direction == "Forward" and num == 1024 * 1024 and threads == 2 and share is not None:
                    notes.append(f"At N = 1024^2 on 2 threads the fused forward reads expert rows at {sig(fused_gbs)} GB/s, "
                                 f"{pct(share)} of the best random-gather bandwidth measured above ({sig(gather)} GB/s at D = {d}).")
    if rows:
        lines += ["Single-neuron experts, D = 256, B = 1024 tokens x 128 slots, random ids. Fused:",
                  "`SingleNeuronExperts::forward` / `backward`. Naive: gather the rows into a dense [B S, 2D]",
                  "matrix first, compute on it (the backward reuses the forward's gathered matrix, materializes",
                  "the per-slot row gradients, then reduces them by id). GB/s: expert rows read (2 D floats per",
                  "slot), as a share of the random-gather bandwidth above at the same D and thread count (the better",
                  "of with and without prefetch; N = 128^2 is a 32 MiB table, mostly in cache, so its share can",
                  "pass 100%).", "",
                  table(["pass", "N", "threads", "fused ms", "naive ms", "fused speedup", "fused tokens/s",
                         "fused GB/s", "% of gather"], rows), ""]
        lines += notes + ([""] if notes else [])
    rows = []
    for num in sorted({r.named.get("n") for r in res.family("bench_kernels", "BM_TopK_Peer")}):
        for k in sorted({r.named.get("k") for r in res.family("bench_kernels", "BM_TopK_Peer") if r.named.get("n") == num}):
            runs = [res.find("bench_kernels", f, n=num, k=k) for f in ("BM_TopK_Peer", "BM_TopK_PartialSort", "BM_TopK_NthElement")]
            us = [1e6 / r.c("selections/s") if r and r.c("selections/s") else None for r in runs]
            std_best = min((u for u in us[1:] if u is not None), default=None)
            rows.append([str(num), str(k)] + [sig(u) for u in us] + [times(ratio(std_best, us[0])),
                         sig(runs[0].c("ns/element")) if runs[0] else NA])
    if rows:
        lines += ["Top-k of n random normal values with indices, sorted (value descending, ties to the lower index),",
                  "1 thread; the std baselines work on a copy of (value, index) pairs.", "",
                  table(["n", "k", "peer::top_k us", "std::partial_sort us", "nth_element + sort us",
                         "speedup over best std", "peer ns/element"], rows), ""]
    return lines


def section_retrieval(res):
    lines = ["### Retrieval against brute force (bench_retrieval)", ""]
    if "bench_retrieval" not in res.runs:
        return lines + ["Not in this run.", ""]
    rows = []
    ns = sorted({r.pos[0] for r in res.runs["bench_retrieval"].values() if r.pos})
    threads = None
    for n in ns:
        pk = res.find("bench_retrieval", "BM_ProductKeys", pos=[n])
        bf = res.find("bench_retrieval", "BM_BruteForce", pos=[n])
        if pk and pk.c("threads"):
            threads = int(pk.c("threads"))
        gemm = peer_gemm_rate(res, "BM_GemmSubKeys", "Dk", 256, threads or 2)
        pk_us = pk.c("us/token") if pk else None
        bf_us = bf.c("us/token") if bf else None
        rows.append([f"{n}^2 = {n * n:,}", sig(pk_us), integer(pk.c("tokens/s")) if pk else NA, sig(bf_us),
                     sig(bf.c("tokens/s")) if bf else NA, times(ratio(bf_us, pk_us)),
                     pct(ratio(pk.c("GFLOP/s") if pk else None, gemm))])
    lines += [f"H = 8, k = k' = 16, Dk = 256 (halves of 128), shared sub-keys, float, {threads or 'all'} threads.",
              "Product keys search 1024 tokens per iteration; brute force, which scores all N keys of every",
              "head, 32 tokens (one 16-token tile per thread): compare per token.",
              "\"Scoring share\": the time the sub-key scoring GEMMs would take at the GEMM rate measured above",
              "(`peer::detail::gemm`, Dk = 256, n = 1024 tile) as a share of the product-key time per token.", "",
              table(["N", "product keys us/token", "tokens/s", "brute force us/token", "tokens/s",
                     "brute force / product keys", "scoring share"], rows), ""]
    return lines


LAYER_KINDS = {  # BM_Layer labels
    "peer": "PEER, N = 1024^2", "pkm": "PKM, N = 1024^2", "dense_4d": "dense FFW D -> 4D -> D",
    "dense_equal_flops": "dense FFW, PEER's FLOPs", "moe_equal_flops": "MoE, PEER's FLOPs",
}


def phase_of(run):
    """The phase argument: named "phase", else the last positional argument."""
    if "phase" in run.named:
        return run.named["phase"]
    return run.pos[-1] if run.pos else None


def layer_key(run, num_cpus):
    """(sort key, description) of a layer run without its phase: label, D, threads, B."""
    pos = run.pos[:-1] if "phase" not in run.named else list(run.pos)
    named = {k: v for k, v in run.named.items() if k != "phase"}
    d = named.pop("D", pos[0] if pos and isinstance(pos[0], int) else None)
    threads = int(run.c("threads") or named.pop("threads", None) or num_cpus)
    named.pop("threads", None)
    b = named.pop("B", None)
    if b is None and run.c("tokens/s") and run.ms:
        b = int(round(run.c("tokens/s") * run.ms / 1000))
    if run.family == "BM_Peer" and len(pos) >= 2:
        kind, label = "peer", f"PEER, N = {pos[1]}^2"
    elif run.family == "BM_Pkm" and len(pos) >= 2:
        kind, label = "pkm", f"PKM, N = {pos[1]}^2"
    elif run.family == "BM_DenseFfw":
        kind, label = "dense_4d", LAYER_KINDS["dense_4d"]
    elif run.family == "BM_Layer" and run.label:
        kind = run.label
        label = LAYER_KINDS.get(run.label, run.label)
    else:
        kind = run.label or run.family
        name = run.family[3:] if run.family.startswith("BM_") else run.family
        extra = [str(x) for x in pos[1:]] + [f"{k} = {v}" for k, v in named.items() if k != "kind"]
        label = f"{name}{' ' + run.label if run.label else ''}" + (f" ({', '.join(extra)})" if extra else "")
    if kind == "dense_4d" and isinstance(d, int):
        label = f"dense FFW {d} -> {4 * d} -> {d}"
    family_rank = {"BM_Peer": 0, "BM_Pkm": 1, "BM_DenseFfw": 2, "BM_Layer": 3}
    kind_rank = list(LAYER_KINDS).index(kind) if kind in LAYER_KINDS else 9
    sort = (family_rank.get(run.family, 9), d or 0, threads, b or 0, kind_rank,
            pos[1] if len(pos) > 1 and isinstance(pos[1], int) else 0, label)
    return sort, {"label": label, "kind": kind, "d": d, "threads": threads, "b": b}


def layer_fraction(res, desc, fwd):
    """The forward as a share of a machine limit: gather bandwidth for the table layers, the library GEMM
    rate at the query-projection shape for the GEMM-bound ones."""
    d, threads = desc["d"], desc["threads"]
    if not fwd or not isinstance(d, int):
        return NA
    if desc["kind"] in ("peer", "pkm"):
        share = ratio(fwd.c("GB/s"), gather_bandwidth(res, d, threads))
        return f"{pct(share)} of gather GB/s" if share is not None else NA
    if desc["kind"].startswith(("dense", "moe")):
        share = ratio(fwd.c("GFLOP/s"), peer_gemm_rate(res, "BM_GemmQuery", "D", d, threads))
        return f"{pct(share)} of GEMM GFLOP/s" if share is not None else NA
    return NA


def layer_groups(res):
    num_cpus = int(res.contexts.get("bench_layers", {}).get("num_cpus", 2))
    groups = {}
    for run in res.runs.get("bench_layers", {}).values():
        phase = phase_of(run)
        if phase not in (0, 1, 2) or run.family == "BM_Storage":
            continue
        sort, desc = layer_key(run, num_cpus)
        group = groups.setdefault(sort, {"desc": desc, "phases": {}})
        group["phases"][phase] = run
    return [groups[k] for k in sorted(groups)]


def section_layers(res):
    lines = ["### Layers (bench_layers)", ""]
    if "bench_layers" not in res.runs:
        return lines + ["Not in this run.", ""]
    rows = []
    for g in layer_groups(res):
        desc, ph = g["desc"], [g["phases"].get(p) for p in range(3)]
        rows.append([desc["label"], str(desc["d"] or NA), str(desc["threads"]), integer(desc["b"])] +
                    [sig(r.ms) if r else NA for r in ph] + [integer(r.c("tokens/s")) if r else NA for r in ph] +
                    [layer_fraction(res, desc, ph[0])])
    lines += ["Float, batch-normed queries, softmax gates, GELU; phases: forward, forward + backward, training step",
              "(forward + backward + AdamW / lazy Adam). Last column: the forward's parameter traffic (PEER, PKM)",
              "as a share of the random-gather bandwidth at the same D and thread count, or the forward GFLOP/s",
              "(dense FFW, MoE) as a share of the library GEMM's at the query-projection shape of the same D.", "",
              table(["layer", "D", "threads", "B", "forward ms", "fwd + bwd ms", "step ms", "forward tokens/s",
                     "fwd + bwd tokens/s", "step tokens/s", "forward vs machine"], rows), ""]
    return lines


STORAGE_WORDS = [  # BM_Storage label fragments -> words, applied in order
    ("bf16_checked_scoring", "bf16-checked scoring"),
    ("partial_row_wise_adam", "partial row-wise Adam"), ("row_wise_adagrad", "row-wise Adagrad"),
    ("master_rows", "master rows"), ("bf16_m", "bf16 m"), ("adam", "Adam"),
]


def storage_name(run):
    """A readable name of a BM_Storage case; the forward has no optimizer, so only its storage and scoring."""
    label = run.label
    table_text = "bf16 table" if label.startswith("bf16") else "float table"
    rest = label.split("_", 1)[1] if "_" in label else ""
    scoring = ", bf16-checked scoring" if "bf16_checked_scoring" in rest else ""
    if run.named.get("phase") == 0:
        return table_text + scoring
    if run.named.get("phase") == 3:
        return table_text + scoring + ", no table update (rows summed, then dropped)"
    for fragment, words in STORAGE_WORDS:
        rest = rest.replace(fragment, words.replace(" ", "\x00"))
    parts = [p.replace("\x00", " ") for p in rest.split("_") if p]
    return ", ".join([table_text] + parts)


def storage_runs(res, d):
    """BM_Storage runs at model_dim d, ordered: forward, step variants, then the no-update floor."""
    runs = [r for r in res.runs.get("bench_storage", {}).values() if r.family == "BM_Storage" and r.named.get("D") == d]
    order = {0: 0, 2: 1, 3: 2}
    return sorted(runs, key=lambda r: (order.get(r.named.get("phase"), 9), r.named.get("variant", 0)))


def storage_dims(res):
    return sorted({r.named.get("D") for r in res.runs.get("bench_storage", {}).values() if r.family == "BM_Storage"})


def storage_baseline(res, d, phase):
    """The float table with Adam at the same D: the forward's or the step's (phase 3 compares with the step)."""
    return res.find("bench_storage", "BM_Storage", D=d, phase=0 if phase == 0 else 2, variant=0)


def section_storage(res):
    lines = ["### Table storage and state (BM_Storage)", ""]
    if "bench_storage" not in res.runs:
        return lines + ["Not in this run.", ""]
    lines += ["The PEER layer at N = 1024^2, H = 8, k = k' = 16, Dk = D, float activations, 2 threads; AdamW on the",
              "dense tensors. Phases: forward (B = 2048), training step (B = 2048 at D = 256, 256 at D = 512 and 1024),",
              "and the fastest small-state step's forward and backward with its table rows summed and then dropped",
              "(no table update at all: the floor under any table rule or storage). \"vs float\": tokens/s against the",
              "float table with Adam in the same phase (the step for the floor); at D = 1024 that case is not run (its",
              "24 GiB of state do not fit this machine). \"state\": the table's bytes plus its optimizer state, per",
              "expert parameter. \"peak\": the process's peak resident set (each case ran alone).", ""]
    for d in storage_dims(res):
        rows = []
        for r in storage_runs(res, d):
            phase = r.named.get("phase")
            base = storage_baseline(res, d, phase)
            vs = ratio(r.c("tokens/s"), base.c("tokens/s") if base else None)
            rows.append([storage_name(r), {0: "forward", 2: "step", 3: "floor"}.get(phase, str(phase)),
                         integer(r.named.get("B")), integer(r.c("tokens/s")), pct(r.cv) if r.cv is not None else NA,
                         f"{vs:.2f} x" if vs is not None else NA, sig(r.c("table_B_per_param")),
                         sig(r.c("model_GiB")), sig(r.c("peak_GiB"))])
        lines += [f"D = {d}:", "",
                  table(["case", "phase", "B", "tokens/s", "cv", "vs float", "state B/param", "model GiB", "peak GiB"], rows), ""]
    return lines


# ---- Plots -----------------------------------------------------------------------------------------

def n_ticks(ax, values):
    """x ticks at the measured N, labelled n^2."""
    if values:
        ax.set_xticks(values)
        ax.set_xticklabels([n_label(int(v)) for v in values])
        ax.minorticks_off()


def plots(res, img_dir):
    """Writes the PNGs it has data for; returns their paths (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_report: matplotlib not found, no plots (Debian: python3-matplotlib)", file=sys.stderr)
        return {}
    img_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    series = {}
    for family, label in (("BM_ProductKeys", "product keys (exact top-k)"), ("BM_BruteForce", "brute force (all N keys)")):
        pts = sorted((r.pos[0] ** 2, r.c("us/token")) for r in res.family("bench_retrieval", family)
                     if r.pos and r.c("us/token"))
        if pts:
            series[label] = pts
    if series:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for (label, pts), marker in zip(series.items(), ("o", "s")):
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        n_ticks(ax, sorted({p[0] for pts in series.values() for p in pts}))
        ax.set_xlabel("N (experts)")
        ax.set_ylabel("time per token (us)")
        ax.set_title("Retrieval, H = 8, k = 16, Dk = 256")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = img_dir / RETRIEVAL_PNG
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written["retrieval"] = path
    groups = layer_groups(res)
    sweep = [g for g in groups if g["desc"]["kind"] == "peer" and g["desc"]["label"] != LAYER_KINDS["peer"]]
    if not sweep:  # no N sweep: the PEER rows of the comparison
        sweep = [g for g in groups if g["desc"]["kind"] == "peer"]
    dims = sorted({g["desc"]["d"] for g in sweep if isinstance(g["desc"]["d"], int)})
    if dims:
        fig, axes = plt.subplots(1, len(dims), figsize=(5.6 * len(dims), 4.4), squeeze=False)
        for ax, d in zip(axes[0], dims):
            threads = max(g["desc"]["threads"] for g in sweep if g["desc"]["d"] == d)
            for phase, color in zip(range(3), ("C0", "C1", "C2")):
                pts = sorted((p.c("N"), p.c("tokens/s")) for g in sweep
                             if g["desc"]["d"] == d and g["desc"]["threads"] == threads
                             for p in [g["phases"].get(phase)] if p and p.c("N") and p.c("tokens/s"))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
                            label=f"PEER, {PHASES[phase]}")
                for g in groups:
                    r = g["phases"].get(phase)
                    if (r and r.c("tokens/s") and g["desc"]["d"] == d and g["desc"]["threads"] == threads
                            and g["desc"]["kind"] in ("dense_4d", "dense_equal_flops")):
                        style = "--" if g["desc"]["kind"] == "dense_4d" else ":"
                        name = f"dense {d} -> {4 * d} -> {d}" if style == "--" else "dense, PEER's FLOPs"
                        ax.axhline(r.c("tokens/s"), color=color, linestyle=style, label=f"{name}, {PHASES[phase]}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            n_ticks(ax, sorted({p.c("N") for g in sweep if g["desc"]["d"] == d for p in g["phases"].values() if p.c("N")}))
            ax.set_xlabel("N (experts)")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"D = {d}, {threads} threads: PEER against N, dense FFW (horizontal)", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = img_dir / LAYERS_PNG
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written["layers"] = path
    dims = storage_dims(res)
    if dims:
        bars = [max(1, sum(1 for r in storage_runs(res, d) if r.named.get("phase") == 2)) for d in dims]
        fig, axes = plt.subplots(len(dims), 1, figsize=(9.0, sum(1.1 + 0.26 * n for n in bars)), squeeze=False,
                                 gridspec_kw={"height_ratios": [1.1 + 0.26 * n for n in bars]})
        for ax, d in zip(axes[:, 0], dims):
            steps = [r for r in storage_runs(res, d) if r.named.get("phase") == 2 and r.c("tokens/s")]
            names = [f"{storage_name(r)} ({sig(r.c('table_B_per_param'))} B/param)" for r in steps]
            ax.barh(range(len(steps)), [r.c("tokens/s") for r in steps], color=["C1" if r.label.startswith("bf16") else "C0" for r in steps])
            ax.set_yticks(range(len(steps)))
            ax.set_yticklabels(names, fontsize=7)
            ax.invert_yaxis()
            base = storage_baseline(res, d, 2)
            if base and base.c("tokens/s"):
                ax.axvline(2 * base.c("tokens/s"), color="C3", linestyle="--", label="2 x the float Adam step (issue 12's target)")
            floor = res.find("bench_storage", "BM_Storage", D=d, phase=3)
            if floor and floor.c("tokens/s"):
                ax.axvline(floor.c("tokens/s"), color="k", linestyle=":", label="no table update at all (floor)")
            ax.set_xlabel("training step, tokens/s")
            b = steps[0].named.get("B") if steps else None
            ax.set_title(f"D = {d}, N = 1024^2, B = {b}, 2 threads", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
        fig.tight_layout()
        path = img_dir / STORAGE_PNG
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written["storage"] = path
    return written


# ---- Output ----------------------------------------------------------------------------------------

def build_block(res, images, md_dir):
    """The generated block: of the storage comparison (scripts/bench --storage) or of the full suite."""
    def image(key, alt):
        return [f"![{alt}]({os.path.relpath(images[key], md_dir)})", ""] if key in images else []

    if res.meta.get("mode") == "storage":
        begin, end, source, command = STORAGE_BEGIN, STORAGE_END, res.folder.as_posix(), "scripts/bench --storage"
        body = section_storage(res) + image("storage", "training-step tokens/s of every table storage and state")
    else:
        begin, end, source, command = BEGIN, END, res.folder.as_posix(), "scripts/bench"
        body = (section_machine(res) + section_kernels(res) + section_retrieval(res) +
                image("retrieval", "time per token against N, product keys and brute force") +
                section_layers(res) + image("layers", "PEER and dense FFW tokens/s against N"))
    lines = [begin, f"<!-- Written by scripts/bench_report.py from {source}; edit the script, not this block. -->", ""]
    lines += section_header(res, command) + [""] + body
    while lines and lines[-1] == "":
        lines.pop()
    lines.append(end)
    return "\n".join(lines) + "\n"


def write_doc(doc, block):
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    begin, end_marker = (STORAGE_BEGIN, STORAGE_END) if block.startswith(STORAGE_BEGIN) else (BEGIN, END)
    start, end = text.find(begin), text.find(end_marker)
    if start >= 0 and end > start:
        new = text[:start] + block.rstrip("\n") + text[end + len(end_marker):]
    else:
        new = text.rstrip("\n") + "\n\n" + block
    if not new.endswith("\n"):
        new += "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, doc)


def merge_json(paths, out):
    merged = None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if merged is None:
            merged = {"context": data.get("context", {}), "benchmarks": []}
        merged["benchmarks"] += data.get("benchmarks", [])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1), encoding="utf-8")
    os.replace(tmp, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="build/bench/results", help="folder of the JSON files")
    parser.add_argument("--doc", help="markdown file whose generated block to rewrite (default: none, "
                                      "the report goes to <results>/report.md)")
    parser.add_argument("--img", help="folder for the PNG plots (default: the results folder)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge these Google Benchmark JSON files "
                        "(the context of the first, the benchmarks of all, in order) into --out, then stop")
    parser.add_argument("--out", help="the merged file (with --merge)")
    args = parser.parse_args()
    if args.merge:
        if not args.out:
            sys.exit("bench_report: --merge needs --out")
        merge_json(args.merge, Path(args.out))
        return
    res = Results(args.results)
    if not res.runs:
        sys.exit(f"bench_report: no bench_*.json in {args.results} (run scripts/bench first)")
    images = plots(res, Path(args.img or args.results))
    target = Path(args.doc) if args.doc else Path(args.results) / "report.md"
    block = build_block(res, images, target.parent)
    if args.doc:
        write_doc(target, block)
    else:
        target.write_text(block, encoding="utf-8")
    print(block, end="")
    print(f"bench_report: wrote {target}" + "".join(f", {p}" for p in images.values()), file=sys.stderr)


if __name__ == "__main__":
    main()
