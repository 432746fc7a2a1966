#!/usr/bin/env python3
"""Trains the tiny Llama bundled in models/tiny-llama (under 5 MB).

The README's first command generates text with it on a machine with no
download, so it is small (about 1M parameters, bf16) but trained, so its
output is recognisably English rather than random tokens. It learns from
the docstrings of Python's standard library, which every machine with
Python has, so the corpus needs no download either.

Runs where PyTorch, transformers and tokenizers are installed; a GPU makes
it take about three minutes. Usage: python3 tools/make_tiny_model.py [OUT]
"""
import importlib
import inspect
import json
import os
import random
import sys
import time

import torch

OUT = sys.argv[1] if len(sys.argv) > 1 else "models/tiny-llama"
VOCAB = 2048
SEQ = 256
STEPS = int(os.environ.get("TINY_STEPS", "3000"))


def corpus():
    texts = []
    skip = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "antigravity", "this", "pydoc_data")
    # Standard-library modules only, so every Python 3.12 gives the same corpus.
    for mod in sorted(sys.stdlib_module_names):
        if mod.startswith(("_",) + skip):
            continue
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        for _, obj in sorted(vars(m).items(), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and len(doc) > 80 and getattr(obj, "__module__", mod) == mod:
                texts.append(doc.strip())
        if m.__doc__:
            texts.append(inspect.cleandoc(m.__doc__))
    texts = sorted(set(texts))
    random.Random(0).shuffle(texts)
    return texts


def main():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = corpus()
    print(f"corpus: {len(texts)} docstrings, {sum(map(len, texts)) / 1e6:.1f} MB", flush=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id(specials[0]), tok.token_to_id(specials[1])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])

    ids = []
    for t in texts:
        ids.extend(tok.encode(t).ids + [eos])
    data = torch.tensor(ids, dtype=torch.long)
    print(f"tokens: {len(data) / 1e6:.2f}M", flush=True)

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(STEPS):
        off = torch.randint(0, len(data) - SEQ - 1, (64,), generator=g)
        batch = torch.stack([data[o:o + SEQ] for o in off]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == STEPS - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)

    model = model.to(torch.bfloat16).cpu().eval()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": specials[0], "eos_token": specials[1], "add_bos_token": True,
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}, f, indent=1)
    prompt = "Return the number of"
    out = model.generate(torch.tensor([tok.encode(prompt).ids]), max_new_tokens=40, do_sample=False)
    print("sample:", tok.decode(out[0].tolist(), skip_special_tokens=True))
    print("files:", {f: os.path.getsize(os.path.join(OUT, f)) for f in sorted(os.listdir(OUT))})


if __name__ == "__main__":
    main()
