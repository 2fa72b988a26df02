#!/usr/bin/env python3
"""Writes the isoFLOP comparison's report (markdown) and plots (PNG) from the runs scripts/lm_compare made.

Each run directory holds summary.json and log.csv as examples/lm/lm_train writes them (--summary, --log).
Usage: lm_report.py --runs DIR --markdown FILE --images DIR --image-prefix lm- --title TEXT --command TEXT
"""
import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

KINDS = ["dense", "moe", "pkm", "peer"]
LABELS = {"dense": "dense FFW", "moe": "MoE", "pkm": "PKM", "peer": "PEER"}
COLORS = {"dense": "#444444", "moe": "#1f77b4", "pkm": "#2ca02c", "peer": "#d62728"}


def load_runs(root):
    runs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        summary = os.path.join(path, "summary.json")
        if not os.path.isfile(summary):
            continue
        with open(summary) as f:
            run = json.load(f)
        run["name"] = name
        run["curve"] = []
        log = os.path.join(path, "log.csv")
        if os.path.isfile(log):
            with open(log) as f:
                for row in csv.DictReader(f):
                    run["curve"].append((float(row["flops"]), float(row["val_loss"]), int(row["step"])))
        runs.append(run)
    return runs


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def millions(x):
    return f"{x / 1e6:.2f} M"


def plot_curves(runs, path, title):
    """Validation loss against training FLOPs. Periodic evaluations (a fixed subset of the validation windows)
    as lines, the final evaluation (all validation bytes) as a star. Left: every run; right: the best width
    of each kind."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    dims = sorted({r["dim"] for r in runs})
    styles = ["-", "--", ":", "-."]
    best = {}
    for r in runs:
        if r["kind"] not in best or r["val_loss"] < best[r["kind"]]["val_loss"]:
            best[r["kind"]] = r
    for ax, subset in ((axes[0], runs), (axes[1], list(best.values()))):
        for r in subset:
            periodic = [(f, l) for f, l, s in r["curve"][:-1] if s > 0]
            color = COLORS.get(r["kind"], "k")
            style = styles[dims.index(r["dim"]) % len(styles)] if subset is runs else "-"
            if periodic:
                ax.plot([p[0] for p in periodic], [p[1] / math.log(2) for p in periodic], style, color=color,
                        marker="o", markersize=3, label=f"{LABELS.get(r['kind'], r['kind'])}, D = {r['dim']}")
            if r["curve"]:
                f, l, _ = r["curve"][-1]
                ax.plot([f], [l / math.log(2)], "*", color=color, markersize=9)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if subset is runs else 1)
    axes[0].set_ylabel("validation loss (bits per byte)")
    axes[0].set_title("every run")
    axes[1].set_title("the best width of each kind")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_isoflop(runs, path, title):
    """Final validation loss of every run against its active and its total parameters."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, key, xlabel in ((axes[0], "active_parameters", "active parameters per token"),
                            (axes[1], "parameters", "total parameters")):
        for kind in KINDS:
            rs = sorted([r for r in runs if r["kind"] == kind], key=lambda r: r["dim"])
            if not rs:
                continue
            ax.plot([r[key] for r in rs], [r["val_bpb"] for r in rs], "-o", color=COLORS[kind], label=LABELS[kind])
            for r in rs:
                ax.annotate(f"D={r['dim']}", (r[key], r["val_bpb"]), fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x / 1e6:g} M"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(
            lambda x, _: f"{x / 1e6:g} M" if str(int(round(x / 10 ** math.floor(math.log10(x)))))[0] in "25" else ""))
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("final validation loss (bits per byte)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True)
    p.add_argument("--markdown", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--image-prefix", default="lm-")
    p.add_argument("--title", default="isoFLOP comparison")
    p.add_argument("--command", default="scripts/lm_compare")
    p.add_argument("--budget", type=float, default=0)
    a = p.parse_args()

    runs = load_runs(a.runs)
    if not runs:
        raise SystemExit(f"no runs with a summary.json under {a.runs}")
    runs.sort(key=lambda r: (KINDS.index(r["kind"]) if r["kind"] in KINDS else 9, r["dim"]))
    os.makedirs(a.images, exist_ok=True)
    curves = os.path.join(a.images, a.image_prefix + "loss-vs-flops.png")
    isoflop = os.path.join(a.images, a.image_prefix + "isoflop.png")
    budget = a.budget or max(r["flops"] for r in runs)
    plot_curves(runs, curves, f"Validation loss during training ({budget:.1e} FLOP budget)")
    plot_isoflop(runs, isoflop, f"isoFLOP: final validation loss at {budget:.1e} FLOPs")

    md_dir = os.path.dirname(os.path.abspath(a.markdown))
    rel = lambda path: os.path.relpath(os.path.abspath(path), md_dir)  # noqa: E731
    r0 = runs[0]
    lines = []
    lines.append(f"# {a.title}\n")
    lines.append("Generated by `scripts/lm_compare` (examples/lm/lm_report.py); the discussion is in "
                 "[lm.md](lm.md#the-comparison). Do not edit by hand: rerun the script.\n")
    lines.append(f"- date: {datetime.date.today().isoformat()}, commit {git_commit()}")
    lines.append(f"- machine: {machine()}; {r0['threads']} thread(s) per run")
    lines.append(f"- command: `{a.command}`")
    lines.append(f"- data: the King James Bible (Debian package bible-kjv), byte-level; "
                 f"{r0['val_tokens']:,} held-out validation bytes, unigram entropy {r0['unigram_bpb']:.3f} bits/byte")
    lines.append(f"- every run: {r0['layers']} blocks, context {r0['context']}, {r0['batch']} sequences per step, "
                 f"the same training budget of {budget:.2e} FLOPs (forward + backward, the layers' own counts), "
                 f"AdamW with a cosine schedule; the sparse kinds replace the middle block's FFW only")
    lines.append("")
    lines.append("## Best run of each kind (the isoFLOP optimum)\n")
    lines.append("| kind | D | validation bits/byte | perplexity (per byte) | parameters | active parameters | wall time |")
    lines.append("|---|---|---|---|---|---|---|")
    best = {}
    for kind in KINDS:
        rs = [r for r in runs if r["kind"] == kind]
        if rs:
            best[kind] = min(rs, key=lambda r: r["val_loss"])
    for kind, r in sorted(best.items(), key=lambda kv: kv[1]["val_loss"]):
        lines.append(f"| {LABELS[kind]} | {r['dim']} | **{r['val_bpb']:.4f}** | {r['val_ppl']:.4f} | "
                     f"{millions(r['parameters'])} | {millions(r['active_parameters'])} | {r['seconds']:.0f} s |")
    lines.append("")
    winner = min(best.items(), key=lambda kv: kv[1]["val_loss"])[0]
    if "dense" in best:
        base = best["dense"]["val_bpb"]
        diffs = ", ".join(f"{LABELS[k]} {100 * (r['val_bpb'] - base) / base:+.1f}%" for k, r in best.items() if k != "dense")
        lines.append(f"Lowest validation loss: **{LABELS[winner]}**. Relative to the best dense model: {diffs}.\n")
    lines.append("## Every run\n")
    lines.append("| kind | D | sparse block | parameters | active | train GFLOP/token | steps | tokens | "
                 "val loss (nats) | bits/byte | ppl | wall time | tokens/s | expert usage | unevenness |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        stats = r.get("expert_stats", [])
        usage = ", ".join(f"{100 * s['usage']:.1f}% of {s['experts']:,}" for s in stats) or "-"
        uneven = ", ".join(f"{s['unevenness']:.2f}" for s in stats) or "-"
        sparse = r.get("sparse_ffn", "") if r["kind"] != "dense" else "dense"
        lines.append(f"| {LABELS.get(r['kind'], r['kind'])} | {r['dim']} | {sparse} | {millions(r['parameters'])} | "
                     f"{millions(r['active_parameters'])} | {r['training_flops_per_token'] / 1e9:.4f} | {r['steps']} | "
                     f"{r['tokens'] / 1e6:.2f} M | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['val_ppl']:.3f} | "
                     f"{r['seconds']:.0f} s | {r['tokens_per_s']:.0f} | {usage} | {uneven} |")
    lines.append("")
    lines.append("Active parameters count every transformer weight (the tied embedding is the output head) plus "
                 "each FFN's per-token share; expert usage and unevenness (KL(z || uniform), He 2024 sec. 3.4) are "
                 "over the final validation pass. Wall time counts training steps only; it depends on the machine's "
                 "load (the cores are shared).\n")
    lines.append("## Plots\n")
    lines.append("Validation loss against training FLOPs (lines: a fixed subset of 256 validation windows during "
                 "training; stars: the final evaluation on every validation byte):\n")
    lines.append(f"![validation loss against training FLOPs]({rel(curves)})\n")
    lines.append("The isoFLOP view: final validation loss of every width at the same budget, against active and "
                 "total parameters:\n")
    lines.append(f"![final validation loss against active parameters]({rel(isoflop)})\n")
    samples = [r for r in runs if r.get("sample")]
    if samples:
        lines.append("## Samples (prompt \"And God said\", temperature 0.8)\n")
        for kind, r in best.items():
            if r.get("sample"):
                text = r["sample"].replace("\n", " / ")
                lines.append(f"- {LABELS[kind]}, D = {r['dim']}: `{text}`")
        lines.append("")
    with open(a.markdown, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {a.markdown}, {curves}, {isoflop}")


if __name__ == "__main__":
    main()
