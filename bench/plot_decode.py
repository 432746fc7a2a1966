#!/usr/bin/env python3
"""Plots decode tokens/s against batch size from strata_kernel_bench output.

Usage: python3 bench/plot_decode.py STRATA_JSONL OUT_PNG [LABEL]
Reads the "decode bN ctx1k: throughput" lines and, for reference, the
roofline each batch could reach if every step only read the weights and KV
at the measured copy bandwidth ("... weights+KV read rate" lines give the
rate achieved; the ideal is the copy bandwidth).
"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    path, out = sys.argv[1], sys.argv[2]
    label = sys.argv[3] if len(sys.argv) > 3 else "strata (CUDA, bf16)"
    tok_s, rate, copy_bw = {}, {}, None
    for line in open(path):
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        fig = row.get("figure", "")
        if m := re.match(r"decode b(\d+) ctx1k: throughput", fig):
            tok_s[int(m.group(1))] = row["value"]
        elif m := re.match(r"decode step b(\d+) ctx1k: weights\+KV read rate", fig):
            rate[int(m.group(1))] = row["value"]
            copy_bw = row["limit"]
    batches = sorted(tok_s)
    ideal = [tok_s[b] * copy_bw / rate[b] for b in batches]  # same bytes at the copy rate
    plt.figure(figsize=(6, 4))
    plt.plot(batches, [tok_s[b] for b in batches], "o-", label=label)
    plt.plot(batches, ideal, "--", color="gray", label=f"roofline: weights + KV at {copy_bw:.2f} TB/s")
    plt.xscale("log", base=2)
    plt.yscale("log")
    plt.xticks(batches, [str(b) for b in batches])
    plt.xlabel("batch size (sequences, 1k context each)")
    plt.ylabel("decode output tokens/s")
    plt.title("Llama-3-8B shape, H100, decode throughput vs batch")
    plt.grid(True, which="both", alpha=0.3)
    plt.legend()
    plt.tight_layout()
    plt.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
