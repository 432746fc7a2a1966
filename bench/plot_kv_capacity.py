#!/usr/bin/env python3
"""Plots decode tokens/s against concurrent sequences from kv-capacity runs.

Usage: python3 bench/plot_kv_capacity.py OUT_PNG TITLE RUN.json [RUN.json ...]
Each RUN.json is `strata bench kv-capacity --json` output; every mode in
them becomes one line (the points where all sequences ran at once), so the
GPU-only modes and each host-tier codec can be compared on one chart.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    out, title, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    lines = {}
    for path in runs:
        with open(path) as f:
            run = json.load(f)
        for p in run["points"]:
            if p["fits"]:
                lines.setdefault(p["mode"], []).append((p["seqs"], p["decode_tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, points in lines.items():
        points.sort()
        xs, ys = zip(*points)
        style = "--" if "@host" not in mode else "-"
        ax.plot(xs, ys, style, marker="o", label=mode)
    ax.set_xlabel("concurrent sequences of 32k tokens (all decoding)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
