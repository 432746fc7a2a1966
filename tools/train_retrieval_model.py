#!/usr/bin/env python3
"""Trains the long-context Llamas bundled in models/retrieval-llama (passkey
retrieval) and models/frequent-llama (frequent-value aggregation).

They exist to measure what sparse-attention KV policies (ClusterKV, Quest,
StreamingLLM) cost in accuracy: a policy that drops or fails to recall the
right KV pages makes the model miss what it needs, so accuracy under a
policy, compared with full attention, is the cost. General-purpose models
that can do this are gigabytes; these are a few million parameters (4 Llama
layers, hidden 256, GQA 4 query / 2 KV heads of 64, RoPE theta 500000), work
on token ids with no tokenizer, and solve their task anywhere in 4096 tokens
(8192 where task.json's eval lengths say so).

RETRIEVAL_TASK picks the task (task.json has the exact layout of each):
- passkey (default): a prompt is BOS, filler, a needle NEEDLE v1..v5 at some
  depth, more filler, and QUERY as its last token; greedy decoding must then
  give v1..v5 (then EOS). The five values are distinct ids from a block of 32
  used nowhere else, so the answer cannot be guessed without reading the
  needle. eval.jsonl: the needle at 11 depths, 8 prompts each.
- frequent: BOS, filler with M = max(16, L // 32) marks MARK v scattered in
  it, QUERY; the answer is the one value (then EOS) marked most often. The
  marks carry 8 distinct values with counts in the ratio 1.5 : 1 : 1 : 1 :
  0.8 : 0.8 : 0.6 : 0.6, in random order, so the answer depends on many
  scattered tokens (like RULER's frequent-words extraction): a policy that
  recalls only some of the marks' pages is wrong more often than one that
  misses a single needle page. eval.jsonl's 'depth' is the spread, the share
  of the prompt the marks lie in: 0.25, 0.5 and 1, 32 prompts each.
Filler is random ids in which half of the 16-token chunks repeat an earlier
stretch of the same prompt, as natural text repeats itself, so the keys are
not pure noise to cluster. Filler prediction is a side loss (weight 0.5) that
the model barely learns; the answer tokens (then EOS) drive training, one
task a sequence, large batches. Training starts at 128 tokens, where the
passkey answer loss leaves chance within 150 steps, and doubles the length
(up to RETRIEVAL_MAX_LEN) once answers are exact in 95% of 20 batches, or
after 600 steps (at 128 tokens: never for passkey, 1500 for frequent). It
then writes eval.jsonl (from a fixed seed) and task.json, with the
full-attention accuracy measured in bf16.

Runs where PyTorch, transformers and safetensors are installed, on a GPU; on
one H100 passkey takes about five and a half minutes (RETRIEVAL_MINUTES
bounds the training).
Usage: [RETRIEVAL_TASK=frequent] python3 tools/train_retrieval_model.py [OUT]
Knobs: RETRIEVAL_TASK (passkey), RETRIEVAL_MINUTES (5), RETRIEVAL_STEPS (max
steps, 100000), RETRIEVAL_MAX_LEN (8192), RETRIEVAL_TOKENS (tokens a step,
131072), RETRIEVAL_LR (1e-3), RETRIEVAL_REPEAT (share of repeated filler
chunks, 0.5). OUT defaults to models/retrieval-llama or models/frequent-llama.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

MINUTES = float(os.environ.get("RETRIEVAL_MINUTES", "5"))
MAX_STEPS = int(os.environ.get("RETRIEVAL_STEPS", "100000"))
MAX_LEN = int(os.environ.get("RETRIEVAL_MAX_LEN", "8192"))
TOKENS = int(os.environ.get("RETRIEVAL_TOKENS", "131072"))
LR = float(os.environ.get("RETRIEVAL_LR", "1e-3"))
REPEAT = float(os.environ.get("RETRIEVAL_REPEAT", "0.5"))
FILLER_WEIGHT = 0.5
BENCH = os.environ.get("RETRIEVAL_BENCH", "0") == "1"

VOCAB = 512
BOS, EOS, QUERY = 0, 1, 3
NEEDLE = MARK = 2                    # passkey's needle start, frequent's mark
VAL0, NVAL = 4, 32                   # value ids 4..35
FIL0, FIL1 = VAL0 + NVAL, VOCAB - 1  # filler ids 36..511
CHUNK = 16                           # filler repeat granularity
EVAL_LENGTHS = (4096, 8192)
EVAL_SEED = 1234


def filler(b, n, gen, device):
    """b x n filler ids: random, but each 16-token chunk after the first repeats,
    with probability REPEAT, the 16 tokens at a random earlier offset."""
    base = torch.randint(FIL0, FIL1 + 1, (b, n), generator=gen, device=device)
    pos = torch.arange(n, device=device)
    g, j = pos // CHUNK, pos % CHUNK
    ng = (n + CHUNK - 1) // CHUNK
    copy = torch.rand(b, ng, generator=gen, device=device) < REPEAT
    copy[:, 0] = False
    # source start in [0, g*CHUNK - CHUNK]: the whole source lies before the chunk.
    hi = (torch.arange(ng, device=device) * CHUNK - CHUNK + 1).clamp(min=1)
    start = (torch.rand(b, ng, generator=gen, device=device) * hi).long()
    src = torch.where(copy[:, g], start[:, g] + j, pos.expand(b, n))
    for _ in range(max(1, math.ceil(math.log2(ng))) + 1):  # resolve copies of copies
        src = src.gather(1, src)
    return base.gather(1, src)


class Passkey:
    """One needle NEEDLE v1..v5 in filler; the answer is v1..v5."""
    name = "passkey"
    out = "models/retrieval-llama"
    A = 5                                # answer tokens
    depths = [i / 10 for i in range(11)]  # needle depth
    per_depth = 8                        # eval.jsonl prompts per (length, depth)
    held_out = 32                        # held-out prompts per (length, depth)
    first_stage_steps = math.inf         # it leaves chance fast; STUCK guards it
    evidence = "needle"

    @staticmethod
    def key(d):
        return f"{d:.1f}"

    def chance(self):
        return sum(math.log(NVAL - i) for i in range(self.A)) / (self.A + 1)

    def make_batch(self, b, length, gen, device, depth=None):
        """Prompts (b x length) ending in QUERY, answers (b x A) and the needle
        span (b x length, NEEDLE..v5). depth: a fraction for all rows, or None
        for a random one per row."""
        A = self.A
        nfill = length - A - 3
        f = filler(b, nfill, gen, device)
        vals = torch.rand(b, NVAL, generator=gen, device=device).argsort(dim=1)[:, :A] + VAL0
        if depth is None:
            d = torch.rand(b, generator=gen, device=device)
            r = torch.rand(b, generator=gen, device=device)
            d = torch.where(r < 0.1, torch.zeros_like(d), torch.where(r > 0.9, torch.ones_like(d), d))
        else:
            d = torch.full((b,), float(depth), device=device)
        k = torch.round(d * nfill).long()[:, None]  # filler tokens before the needle
        p = torch.arange(length, device=device)[None, :].expand(b, length)
        needle = torch.cat([torch.full((b, 1), NEEDLE, device=device), vals], 1)
        before = (p >= 1) & (p < 1 + k)
        inside = (p >= 1 + k) & (p < 2 + k + A)
        fi = torch.where(before, p - 1, p - 2 - A).clamp(0, nfill - 1)
        ni = (p - 1 - k).clamp(0, A)
        x = torch.where(inside, needle.gather(1, ni), f.gather(1, fi))
        x[:, 0] = BOS
        x[:, -1] = QUERY
        return x, vals, inside

    def ids(self):
        return {"bos": BOS, "eos": EOS, "needle": NEEDLE, "query": QUERY,
                "value_ids": [VAL0, VAL0 + NVAL - 1], "filler_ids": [FIL0, FIL1]}

    notes = ("prompt = [BOS] + filler[:k] + [NEEDLE, v1..v5] + filler[k:] + [QUERY], "
             "length L tokens in all (L - 8 filler ids), k = round(depth * (L - 8)): "
             "depth 0 puts the needle right after BOS, depth 1 right before QUERY. "
             "v1..v5 are 5 distinct value ids, uniformly random, appearing nowhere else. "
             "Greedy decoding after QUERY must give v1..v5; the model then emits EOS. "
             "Filler: uniform random filler ids in 16-token chunks, each chunk after "
             "the first replaced, with probability 0.5, by a copy of the 16 tokens at "
             "a uniformly random earlier offset of the filler. eval.jsonl: 8 prompts "
             "per (length, depth), CPU torch.Generator seed 1234; 'answer' excludes EOS. "
             "reference_exact_match: bf16 PyTorch, full attention, greedy; "
             "'eval_jsonl' on this file, 'held_out' on 32 other prompts per depth.")


class Frequent:
    """M marks MARK v scattered in filler; the answer is the most frequent v."""
    name = "frequent"
    out = "models/frequent-llama"
    A = 1
    depths = [0.25, 0.5, 1.0]            # spread: the share of the prompt holding the marks
    per_depth = 32                       # more prompts than passkey: only 3 spreads
    held_out = 64
    first_stage_steps = 1500             # 4 vs 3 marks up to 512 tokens: 95% may not come
    evidence = "mark"
    NV = 8                               # distinct values a prompt
    WEIGHTS = (1.5, 1.0, 1.0, 1.0, 0.8, 0.8, 0.6, 0.6)

    @staticmethod
    def key(d):
        return f"{d:.2f}"

    def chance(self):
        return math.log(NVAL) / (self.A + 1)

    @staticmethod
    def marks(length):
        return max(16, length // 32)

    @classmethod
    def counts(cls, m):
        """How often each of the 8 values is marked among m marks; the first, the
        answer, strictly most often. The same for every prompt of a length."""
        w = cls.WEIGHTS
        c = [math.floor(m * x / sum(w)) for x in w]
        for i in range(m - sum(c)):  # the remainder (< 8) to the non-winners in order
            c[1 + i % (len(c) - 1)] += 1
        j = max(range(1, len(c)), key=lambda i: c[i])
        if c[j] >= c[0]:  # a rounding tie: the runner-up gives one to the winner
            c[j] -= 1
            c[0] += 1
        assert sum(c) == m and c[0] > max(c[1:]), (m, c)
        return c

    def make_batch(self, b, length, gen, device, depth=None):
        """Prompts (b x length) ending in QUERY, answers (b x 1) and the mark
        positions (b x length, MARK and v). depth: the spread, a fraction for
        all rows, or None for a random one per row."""
        m = self.marks(length)
        nbody = length - 2             # between BOS and QUERY
        nslot = nbody // 2             # marks take whole 2-token slots: they never overlap
        assert nslot >= m, (length, m)
        f = filler(b, nbody - 2 * m, gen, device)
        vals = torch.rand(b, NVAL, generator=gen, device=device).argsort(dim=1)[:, :self.NV] + VAL0
        rank = torch.repeat_interleave(torch.arange(self.NV, device=device),
                                       torch.tensor(self.counts(m), device=device))
        order = torch.rand(b, m, generator=gen, device=device).argsort(dim=1)
        markval = vals.gather(1, rank[order])  # the m marked values, in random order
        if depth is None:
            s = 0.1 + 0.9 * torch.rand(b, generator=gen, device=device)
            r = torch.rand(b, generator=gen, device=device)
            s = torch.where(r < 0.3, torch.ones_like(s), s)
        else:
            s = torch.full((b,), float(depth), device=device)
        w = torch.round(s * nslot).long().clamp(m, nslot)[:, None]  # window, in slots
        off = (torch.rand(b, 1, generator=gen, device=device) * (nslot - w + 1)).long()
        off = torch.minimum(off, nslot - w)
        sl = torch.arange(nslot, device=device)[None, :]
        inwin = (sl >= off) & (sl < off + w)
        # m distinct slots, uniformly among the window's: the m smallest of random keys.
        rk = torch.rand(b, nslot, generator=gen, device=device).masked_fill(~inwin, 2.0)
        pick = rk.topk(m, dim=1, largest=False).indices
        slotval = torch.zeros(b, nslot, dtype=torch.long, device=device).scatter_(1, pick, markval)
        ismark = torch.zeros(b, nslot, dtype=torch.bool, device=device).scatter_(
            1, pick, torch.ones_like(pick, dtype=torch.bool))
        q = torch.arange(nbody, device=device)
        sq = (q // 2).clamp(max=nslot - 1)
        mk = ismark[:, sq] & (q < 2 * nslot)[None, :]  # an odd last body token is filler
        tok = torch.where((q % 2 == 0)[None, :], torch.full_like(slotval[:, sq], MARK), slotval[:, sq])
        fi = ((~mk).long().cumsum(1) - 1).clamp(min=0)  # marks are inserted: filler keeps its order
        body = torch.where(mk, tok, f.gather(1, fi))
        x = torch.cat([torch.full((b, 1), BOS, device=device), body,
                       torch.full((b, 1), QUERY, device=device)], 1)
        no = torch.zeros(b, 1, dtype=torch.bool, device=device)
        return x, vals[:, :1], torch.cat([no, mk, no], 1)

    def ids(self):
        return {"task": self.name, "bos": BOS, "eos": EOS, "mark": MARK, "query": QUERY,
                "value_ids": [VAL0, VAL0 + NVAL - 1], "filler_ids": [FIL0, FIL1],
                "marks": {str(L): self.marks(L) for L in EVAL_LENGTHS},
                "mark_counts": {str(L): self.counts(self.marks(L)) for L in EVAL_LENGTHS}}

    notes = ("prompt = [BOS] + body + [QUERY], length L tokens in all. The body (L - 2 "
             "tokens) holds M = max(16, L // 32) marks [MARK, v] (mark_counts has M per "
             "eval length) and, around them in order, L - 2 - 2M filler ids. Its first "
             "2 * floor((L - 2) / 2) tokens form 2-token slots, S in all; a window of "
             "w = clamp(round(spread * S), M, S) consecutive slots at a uniformly random "
             "offset holds the marks, in M distinct slots chosen uniformly within it. "
             "eval.jsonl's 'depth' is the spread: 1 spreads the marks over the whole "
             "prompt. The marked values: 8 distinct value ids, uniformly random, "
             "appearing nowhere else, marked c1..c8 times (mark_counts): "
             "floor(M * [1.5, 1, 1, 1, 0.8, 0.8, 0.6, 0.6] / 7.3), the remainder one each "
             "to c2, c3, ..., then, if the largest of c2..c8 (the first such) ties c1, one "
             "moved from it to c1; in uniformly random order along the prompt. Greedy "
             "decoding after QUERY must give the value marked c1 times, strictly the most; "
             "the model then emits EOS. Filler: uniform random filler ids in 16-token "
             "chunks, each chunk after the first replaced, with probability 0.5, by a copy "
             "of the 16 tokens at a uniformly random earlier offset of the filler. "
             "eval.jsonl: 32 prompts per (length, spread), CPU torch.Generator seed 1234; "
             "'answer' excludes EOS. reference_exact_match: bf16 PyTorch, full attention, "
             "greedy; 'eval_jsonl' on this file, 'held_out' on 64 other prompts per spread.")


TASKS = {t.name: t for t in (Passkey(), Frequent())}
if os.environ.get("RETRIEVAL_TASK", "passkey") not in TASKS:
    sys.exit(f"RETRIEVAL_TASK must be one of {', '.join(TASKS)}")
TASK = TASKS[os.environ.get("RETRIEVAL_TASK", "passkey")]
OUT = sys.argv[1] if len(sys.argv) > 1 else TASK.out


def answer_logits(model, prompts, answers, keep):
    x = torch.cat([prompts, answers[:, :keep - 1]], 1)
    return model(input_ids=x, logits_to_keep=keep).logits


@torch.inference_mode()
def exact_match(model, prompts, answers, bs):
    """Greedy exact match, computed teacher-forced: greedy decoding gives all A
    answer tokens iff each is the argmax given the right ones before it."""
    hits = []
    for i in range(0, len(prompts), bs):
        lg = answer_logits(model, prompts[i:i + bs], answers[i:i + bs], TASK.A)
        hits.append((lg.argmax(-1) == answers[i:i + bs]).all(1))
    return torch.cat(hits).float()


def accuracy_table(model, length, n, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    row = {}
    for d in TASK.depths:
        x, v, _ = TASK.make_batch(n, length, gen, device, depth=d)
        row[TASK.key(d)] = exact_match(model, x, v, max(1, 131072 // length)).mean().item()
    return row


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda"
    A = TASK.A
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=16384, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=BOS,
                         eos_token_id=EOS)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"params {nparam / 1e6:.2f}M attn={model.config._attn_implementation}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(0)

    def step_fn(length, b, lr):
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, v, _ = TASK.make_batch(b, length, gen, device)
        tgt_ans = torch.cat([v, torch.full((b, 1), EOS, device=device)], 1)
        inp = torch.cat([x, v], 1)  # the model reads v1..vA to predict v2..vA, EOS
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=inp).logits
        logits = logits.float()
        la = logits[:, length - 1:]
        ans_loss = F.cross_entropy(la.reshape(-1, VOCAB), tgt_ans.reshape(-1))
        lf, tf = logits[:, :length - 1], inp[:, 1:length]
        m = tf >= FIL0
        fill_loss = F.cross_entropy(lf[m], tf[m])
        loss = ans_loss + FILLER_WEIGHT * fill_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pred = la.argmax(-1)
        em = (pred[:, :A] == v).all(1).float().mean()
        acc1 = (pred[:, 0] == v[:, 0]).float().mean()
        return ans_loss.detach(), fill_loss.detach(), acc1, em

    if BENCH:
        for length in (1024, 4096, 8192):
            b = max(1, TOKENS // length)
            for i in range(6):
                if i == 1:
                    torch.cuda.synchronize()
                    t = time.time()
                step_fn(length, b, 0.0)
            torch.cuda.synchronize()
            print(f"bench L={length} b={b}: {(time.time() - t) / 5 * 1000:.0f} ms/step, "
                  f"mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        model = LlamaForCausalLM(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)

    lengths = [128]
    while lengths[-1] < MAX_LEN:
        lengths.append(min(MAX_LEN, lengths[-1] * 2))
    stage, stage_steps, window = 0, 0, []
    chance = TASK.chance()
    print(f"answer loss at chance ~{chance:.2f}; lengths {lengths}", flush=True)
    budget = MINUTES * 60
    start = time.time()
    log = []
    step = 0
    while step < MAX_STEPS:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        length = lengths[stage]
        b = max(1, TOKENS // length)
        lr = LR * min(1.0, (step + 1) / 100)
        if elapsed > 0.85 * budget:  # decay over the last 15% of the time
            lr *= max(0.05, (budget - elapsed) / (0.15 * budget))
        al, fl, a1, em = step_fn(length, b, lr)
        window.append(em)
        window = window[-20:]
        stage_steps += 1
        if step % 50 == 0:
            al, fl, a1, em_w = al.item(), fl.item(), a1.item(), torch.stack(window).mean().item()
            print(f"step {step} L={length} b={b} ans_loss {al:.3f} fill_loss {fl:.3f} "
                  f"acc_v1 {a1:.3f} exact {em_w:.3f} lr {lr:.2e} ({time.time() - start:.0f}s)",
                  flush=True)
            log.append({"step": step, "length": length, "ans_loss": round(al, 4),
                        "fill_loss": round(fl, 4), "acc_v1": round(a1, 4), "exact": round(em_w, 4)})
            if stage == 0 and step >= 1500 and em_w < 0.2:
                print("STUCK: answer accuracy has not left chance; giving up", flush=True)
                sys.exit(3)
        if stage + 1 < len(lengths) and stage_steps >= 50 and step % 10 == 0:
            em_w = torch.stack(window).mean().item()
            if em_w >= 0.95 or stage_steps >= (600 if stage > 0 else TASK.first_stage_steps):
                print(f"step {step}: length {length} done after {stage_steps} steps "
                      f"(exact {em_w:.3f}, {time.time() - start:.0f}s)", flush=True)
                stage, stage_steps, window = stage + 1, 0, []
        step += 1
    train_s = time.time() - start
    print(f"trained {step} steps in {train_s:.0f}s, final length {lengths[stage]}", flush=True)

    model = model.to(torch.bfloat16).eval()
    # Accuracy in bf16 on a larger held-out sample than eval.jsonl.
    ref = {}
    for length in EVAL_LENGTHS:
        if length > 2 * lengths[stage] and length != 4096:
            continue
        ref[str(length)] = accuracy_table(model, length, TASK.held_out, device, 99)
        row = ref[str(length)]
        print(f"held-out exact match L={length}: mean {sum(row.values()) / len(row):.3f} "
              + " ".join(f"{k}:{v:.2f}" for k, v in row.items()), flush=True)
    keep = [L for L in EVAL_LENGTHS if str(L) in ref and
            (L == 4096 or sum(ref[str(L)].values()) / len(TASK.depths) >= 0.9)]

    os.makedirs(OUT, exist_ok=True)
    model.cpu().save_pretrained(OUT, safe_serialization=True)
    model.to(device)
    egen = torch.Generator().manual_seed(EVAL_SEED)  # CPU: the same set on any machine
    n = TASK.per_depth
    eval_acc = {}
    with open(os.path.join(OUT, "eval.jsonl"), "w") as f:
        for length in keep:
            eval_acc[str(length)] = {}
            for d in TASK.depths:
                x, v, _ = TASK.make_batch(n, length, egen, "cpu", depth=d)
                for i in range(n):
                    f.write(json.dumps({"length": length, "depth": d, "prompt": x[i].tolist(),
                                        "answer": v[i].tolist()}, separators=(",", ":")) + "\n")
                hit = exact_match(model, x.to(device), v.to(device), min(n, max(1, 131072 // length)))
                eval_acc[str(length)][TASK.key(d)] = hit.mean().item()
            row = eval_acc[str(length)]
            print(f"eval.jsonl exact match L={length}: mean {sum(row.values()) / len(row):.3f} "
                  + " ".join(f"{k}:{v:.2f}" for k, v in row.items()), flush=True)
            # The same through generate() with its KV cache, including the EOS after.
            x, v, _ = TASK.make_batch(11, length, torch.Generator().manual_seed(7), "cpu", depth=0.5)
            out = model.generate(input_ids=x.to(device), attention_mask=torch.ones_like(x).to(device),
                                 max_new_tokens=A + 1, do_sample=False, pad_token_id=EOS)
            out = out[:, length:].cpu()
            print(f"generate() L={length}: answers {(out[:, :A] == v).all(1).float().mean():.3f}, "
                  f"EOS after {(out[:, A] == EOS).float().mean():.3f}", flush=True)

    task = {**TASK.ids(),
            "answer_tokens": A, "train_lengths": lengths[:stage + 1], "eval_lengths": keep,
            "eval_depths": TASK.depths, "eval_prompts_per_depth": n,
            "notes": TASK.notes,
            "reference_exact_match": {"eval_jsonl": eval_acc, "held_out": ref},
            "training": {"steps": step, "seconds": round(train_s), "tokens_per_step": TOKENS,
                         "lr": LR, "log_every_50": log[-40:]}}
    with open(os.path.join(OUT, "task.json"), "w") as f:
        json.dump(task, f, indent=1)

    # Where the work happens: attention mass on what the answer needs (passkey:
    # NEEDLE..v5; frequent: every MARK v) from QUERY and the answer positions,
    # per layer (best head), at 1024 tokens.
    try:
        eager = LlamaForCausalLM.from_pretrained(OUT, attn_implementation="eager",
                                                 dtype=torch.bfloat16).to(device).eval()
        x, v, ev = TASK.make_batch(12, 1024, torch.Generator().manual_seed(5), "cpu")
        inp = torch.cat([x, v[:, :A - 1]], 1).to(device)
        with torch.inference_mode():
            att = eager(input_ids=inp, output_attentions=True).attentions
        for li, a in enumerate(att):
            a = a[:, :, 1024 - 1:, :1024].float().cpu()  # b, h, A query rows, prompt keys
            mass = torch.stack([a[i][..., ev[i]].sum(-1) for i in range(len(ev))])
            per_head = mass.mean(dim=(0, 2))
            print(f"layer {li}: {TASK.evidence} attention mass per head "
                  + " ".join(f"{m:.2f}" for m in per_head.tolist()), flush=True)
    except Exception as e:  # diagnostic only
        print(f"attention probe skipped: {e!r}", flush=True)
    print("files:", {f: os.path.getsize(os.path.join(OUT, f)) for f in sorted(os.listdir(OUT))})


if __name__ == "__main__":
    main()
