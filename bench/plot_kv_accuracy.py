#!/usr/bin/env python3
"""Plots task accuracy against token budget per KV policy.

Usage: python3 bench/plot_kv_accuracy.py RESULTS_JSON [RESULTS_JSON ...] OUT_PNG
Each RESULTS_JSON is `strata bench kv-policies --json` output; one panel per
file (e.g. full_layers 2 and 0), one line per sparse policy, and the dense
(`full`) accuracy as a horizontal reference.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    paths, out = sys.argv[1:-1], sys.argv[-1]
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4), squeeze=False)
    for ax, path in zip(axes[0], paths):
        data = json.load(open(path))
        lines = {}
        for row in data["results"]:
            if row["policy"] == "full":
                ax.axhline(row["accuracy"], color="black", linestyle="--", label="full")
                continue
            lines.setdefault(row["policy"], []).append((row["budget"], row["accuracy"]))
        for policy, points in sorted(lines.items()):
            points.sort()
            ax.plot([b for b, _ in points], [a for _, a in points], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token budget (sinks and window excluded)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.02)
        model = os.path.basename(os.path.normpath(data.get("model", "retrieval-llama")))
        query = ", question in decode" if data.get("query_in_decode", 0) else ""
        ax.set_title(f"{model}, full_layers {data['full_layers']}{query}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
