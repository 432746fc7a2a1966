#!/usr/bin/env python3
"""Creates the golden fixtures strata's engine tests compare against.

Runs where PyTorch, transformers, tokenizers and sentencepiece are installed
(a GPU is used when present but not needed). Writes, under OUT (default
tests/fixtures):

  models/<name>/        config.json, *.safetensors (some sharded), and
                        golden.safetensors: prompt_<i> (I32 ids),
                        logits_<i> (F32 [len, vocab], fp32 forward over the
                        saved weights) and greedy_<i> (I32, 32 greedy tokens
                        from transformers' generate), plus golden.json with a
                        summary (the smallest top-1/top-2 logit margin on the
                        greedy path, so a reader knows how robust it is).
  tokenizers/<name>/    tokenizer.json or tokenizer.model,
                        tokenizer_config.json, cases.json: [{text,
                        add_special_tokens, ids, decoded}] from the reference
                        libraries.

Usage: python3 tools/make_golden.py [OUT]
"""
import copy
import json
import os
import sys

import torch

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026 and we're serving models.",
    "Long contexts make decode slow: every step reads the whole KV cache, 32768 tokens!",
    "def forward(self, x):\n    return self.norm(x + self.attn(x))  # residual\n",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Übung.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Ça coûte très cher.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。我们正在为模型提供服务。",
    "素早い茶色の狐がのろまな犬を飛び越える。東京は大きい。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول",
    "Emoji test: 🦊🐶 🚀✨ 👩‍💻 🇩🇪 — done… “quotes” and ‘apostrophes’.",
    "Numbers 1234567 and 3.14159, tabs\tand\nnewlines\r\n   indented   spaces.",
    "I'm sure you'll see they've said she'd done it; WE'LL SEE. HE'S HERE.",
]
CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "Größe und Straße, ça coûte très cher",
    "敏捷的棕色狐狸跳过了懒狗",
    "東京は大きい。Быстрая лиса!",
    "Emoji: 🦊🐶🚀 👩‍💻 🇩🇪 ok",
    "numbers 1234567 3.14159",
    "line one\nline two\r\n\n\ttabbed",
    "I'm sure you'll see they've said WE'LL",
    "code: x = f(y) + g[z] // comment",
    "unseen: Ωμέγα ⅯⅯⅩⅩⅥ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def make_bpe_tokenizers():
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)

    specs = {
        # Llama-3 style: split regex + byte level, ignore_merges, bos added.
        "llama3_bpe": dict(pattern=LLAMA3_PATTERN, nfc=False, ignore_merges=True,
                           specials=["<|begin_of_text|>", "<|end_of_text|>",
                                     "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                           bos="<|begin_of_text|>", eos="<|end_of_text|>"),
        # Qwen2 style: NFC normaliser, single-digit split, no bos.
        "qwen2_bpe": dict(pattern=QWEN2_PATTERN, nfc=True, ignore_merges=False,
                          specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          bos=None, eos="<|im_end|>"),
        # GPT-2 style: the ByteLevel pre-tokenizer's own regex.
        "gpt2_bpe": dict(pattern=None, nfc=False, ignore_merges=False,
                         specials=["<|endoftext|>"], bos=None, eos="<|endoftext|>"),
    }
    for name, spec in specs.items():
        tok = Tokenizer(models.BPE(ignore_merges=spec["ignore_merges"]))
        if spec["nfc"]:
            tok.normalizer = normalizers.NFC()
        if spec["pattern"] is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=1,
                                      special_tokens=spec["specials"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(CORPUS * 4, trainer)
        if spec["bos"]:
            bos_id = tok.token_to_id(spec["bos"])
            tok.post_processor = processors.TemplateProcessing(
                single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
                special_tokens=[(spec["bos"], bos_id)])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        d = os.path.join(OUT, "tokenizers", name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        write_json(os.path.join(d, "tokenizer_config.json"), {
            "bos_token": spec["bos"], "eos_token": spec["eos"],
            "add_bos_token": spec["bos"] is not None,
            "tokenizer_class": "PreTrainedTokenizerFast"})
        cases = []
        texts = CASES + [f"{spec['specials'][0]}special in text{spec['eos']}"]
        for text in texts:
            for add in (True, False):
                ids = tok.encode(text, add_special_tokens=add).ids
                cases.append({"text": text, "add_special_tokens": add, "ids": ids,
                              "decoded": tok.decode(ids, skip_special_tokens=False)})
        write_json(os.path.join(d, "cases.json"), cases)
        print(f"tokenizer {name}: vocab {tok.get_vocab_size()}, {len(cases)} cases")


def make_sentencepiece():
    import io
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=600,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, split_digits=True, minloglevel=2)
    d = os.path.join(OUT, "tokenizers", "sentencepiece")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    write_json(os.path.join(d, "tokenizer_config.json"), {
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "tokenizer_class": "LlamaTokenizer"})
    cases = []
    for text in CASES:
        for add in (True, False):
            ids = sp.encode(text)
            if add:
                ids = [sp.bos_id()] + ids
            cases.append({"text": text, "add_special_tokens": add, "ids": ids,
                          "decoded": sp.decode(ids)})
    write_json(os.path.join(d, "cases.json"), cases)
    print(f"tokenizer sentencepiece: vocab {sp.get_piece_size()}, {len(cases)} cases")


def greedy_with_margin(model, ids, steps=32):
    """Greedy continuation and the smallest top-1/top-2 logit gap on its path."""
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=steps, do_sample=False,
                             min_new_tokens=steps, pad_token_id=0)
        full = model(out).logits[0, len(ids) - 1:-1].float()
        top2 = full.topk(2, dim=-1).values
    return out[0, len(ids):], (top2[:, 0] - top2[:, 1]).min().item()


def max_row_rel_error(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def save_golden(model, d, vocab, seed):
    """Writes golden.safetensors for two prompt lengths.

    A greedy path can only be compared across precisions where its top-1 /
    top-2 margins exceed the precision's rounding noise, so for each length
    the prompt with the widest smallest margin among 16 candidates is kept
    (its margin is recorded). bf16_error_<i> is transformers' own bf16
    forward's max row relative logit error against the fp32 reference: the
    yardstick the bf16 CUDA backend is held to.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    tensors, summary = {}, {"prompts": []}
    min_margin = float("inf")
    for i, length in enumerate((7, 40)):
        best = None
        for _ in range(16):
            # A counting run with a random prefix: the trained pattern plus noise.
            ids = torch.randint(3, vocab, (length,), generator=g)
            ids[length // 2:] = (ids[length // 2] + torch.arange(length - length // 2)) % vocab
            greedy, margin = greedy_with_margin(model, ids)
            if best is None or margin > best[2]:
                best = (ids, greedy, margin)
        ids, greedy, margin = best
        with torch.no_grad():
            logits = model(ids[None]).logits[0].float()
            logits_bf16 = model_bf16(ids[None]).logits[0].float()
        bf16_error = max_row_rel_error(logits_bf16, logits)
        min_margin = min(min_margin, margin)
        tensors[f"prompt_{i}"] = ids.to(torch.int32)
        tensors[f"logits_{i}"] = logits.contiguous()
        tensors[f"greedy_{i}"] = greedy.to(torch.int32).contiguous()
        tensors[f"bf16_error_{i}"] = torch.tensor([bf16_error], dtype=torch.float32)
        summary["prompts"].append({"length": length, "greedy_min_margin": margin,
                                   "transformers_bf16_max_row_rel_error": bf16_error})
    save_file(tensors, os.path.join(d, "golden.safetensors"))
    write_json(os.path.join(d, "golden.json"), summary)
    return min_margin


def train_briefly(model, vocab, steps=300):
    """Teaches the random model to count (next = previous + 1 mod vocab).

    A random model's next-token distribution is nearly flat, so greedy
    decoding flips on rounding noise; a model that has learned a pattern
    predicts with clear margins, and its greedy path can be compared across
    fp32 and bf16 backends. The logits tests stay as sensitive as before.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        start = torch.randint(0, vocab, (32, 1), generator=g)
        seq = (start + torch.arange(48)[None]) % vocab
        seq = seq.to(device)
        loss = model(seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"  trained {steps} steps, final loss {loss.item():.3f}")
    model.to("cpu").eval()


def make_models():
    from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig,
                              Qwen2Config)

    common = dict(vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                  initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    specs = {
        # GQA (4 query heads over 2 KV heads), fp32 weights, one file.
        "llama_gqa": (LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  rope_theta=10000.0, tie_word_embeddings=False, **common),
                      torch.float32, None),
        # q/k/v biases, tied embeddings, bf16 weights.
        "qwen2_tied": (Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1,
                                   rope_theta=1000000.0, tie_word_embeddings=True,
                                   use_sliding_window=False, **common),
                       torch.bfloat16, None),
        # Llama-3 rope scaling, head_dim (48) != hidden / heads, fp16, sharded.
        "llama3_rope": (LlamaConfig(hidden_size=128, intermediate_size=224, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                                    rope_theta=500000.0,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 32},
                                    tie_word_embeddings=False, **common),
                        torch.float16, "200KB"),
        # Mistral with a sliding window shorter than the longer prompt.
        "mistral_window": (MistralConfig(hidden_size=64, intermediate_size=160,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, sliding_window=16,
                                         rope_theta=10000.0, tie_word_embeddings=False,
                                         **common),
                           torch.float32, None),
    }
    for seed, (name, (config, dtype, shard)) in enumerate(specs.items()):
        torch.manual_seed(100 + seed)
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        train_briefly(model, config.vocab_size)
        model = model.to(dtype).eval()
        d = os.path.join(OUT, "models", name)
        os.makedirs(d, exist_ok=True)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, safe_serialization=True, **kwargs)
        # The reference: fp32 arithmetic over the weights exactly as saved.
        ref = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        margin = save_golden(ref, d, config.vocab_size, 1000 + seed)
        files = sorted(os.listdir(d))
        print(f"model {name}: {dtype}, files {files}, greedy min margin {margin:.4f}")
        print("  config:", open(os.path.join(d, "config.json")).read().replace("\n", " "))


if __name__ == "__main__":
    make_bpe_tokenizers()
    make_sentencepiece()
    make_models()
