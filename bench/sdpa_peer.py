#!/usr/bin/env python3
"""The peer for bench/kernel_bench.cc: PyTorch on the same shapes.

scaled_dot_product_attention (FlashAttention kernels) for the decode and
prefill attention shapes, and a Hugging Face transformers forward over an
8k prompt at the Llama-3-8B shape (random weights, bf16, eager attention
off: sdpa). Prints one JSON object per figure. Timed with CUDA events,
median of repeats after warm-up.
"""
import json
import sys

import torch
import torch.nn.functional as F


def median_ms(fn, reps=20, warmup=3, inner=1):
    """Median ms per call over `reps` timed groups of `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    times.sort()
    return times[len(times) // 2]


def report(figure, ms, **extra):
    print(json.dumps({"figure": figure, "ms": ms, **extra}), flush=True)


def main():
    dev = "cuda"
    torch.manual_seed(0)
    # Decode: batch 16, one query token, 32k keys, 32 query / 8 KV heads, d 128.
    q = torch.randn(16, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(16, 8, 32768, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    # 20 calls back to back per timed group, as strata's decode figures: a
    # single call would also count the Python dispatch before the kernel.
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), inner=20)
    report("sdpa decode b16 ctx32k", ms, kv_tb_s=16 * 32768 * 8 * 128 * 2 * 2 / (ms / 1e3) / 1e12)
    del q, k, v
    # Prefill: one causal sequence of 8k and 32k tokens.
    for s in (8192, 32768):
        q = torch.randn(1, 32, s, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, s, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                       reps=10 if s > 8192 else 20)
        report(f"sdpa prefill causal {s // 1024}k", ms, tflops=4 * s * s / 2 * 32 * 128 / (ms / 1e3) / 1e12)
        del q, k, v
    torch.cuda.empty_cache()
    if "--no-transformers" in sys.argv:
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128256, (1, 8192), device=dev)
    with torch.no_grad():
        ms = median_ms(lambda: model(ids, logits_to_keep=1), reps=5, warmup=2)
    report("transformers forward 8k prompt llama-3-8b", ms)


if __name__ == "__main__":
    main()
