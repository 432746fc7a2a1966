#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora, tests/fuzz/corpus/<target>/, from
the repository's fixtures (small excerpts of them) and a few edge cases.

    python3 tests/fuzz/make_corpus.py [target...]   # default: every target

Deterministic; rerun after changing a fixture format. Needs protoc (for the
request_conversion_fuzzer seeds). Crash reproducers added by hand under
corpus/<target>/ are kept: only the files written here are replaced.
"""
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def write(target, name, data):
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# --- safetensors_fuzzer: whole files -----------------------------------------

def safetensors(header, data=b"", pad_to=None):
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad_to:  # writers pad the header with spaces to align the data
        text += b" " * (-len(text) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def make_safetensors():
    t = "safetensors_fuzzer"
    # An excerpt of a fixture model: its three smallest tensors, real bytes.
    header, data = read_safetensors(os.path.join(FIXTURES, "models", "llama_gqa", "model.safetensors"))
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])[:3]
    out_header, out_data = {"__metadata__": {"format": "pt"}}, b""
    for name, entry in entries:
        begin, end = entry["data_offsets"]
        out_header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                            "data_offsets": [len(out_data), len(out_data) + end - begin]}
        out_data += data[begin:end]
    write(t, "fixture_excerpt.safetensors", safetensors(out_header, out_data, pad_to=8))
    write(t, "empty_header.safetensors", safetensors({}))
    write(t, "dtypes.safetensors", safetensors({
        "f32": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "bf16": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
        "f16": {"dtype": "F16", "shape": [1, 1, 2], "data_offsets": [32, 36]},
        "i32": {"dtype": "I32", "shape": [], "data_offsets": [36, 40]},
    }, bytes(range(40))))
    write(t, "zero_dim.safetensors", safetensors({
        "empty": {"dtype": "F32", "shape": [0, 7], "data_offsets": [0, 0]},
        "one": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0\x80\x3f"))
    write(t, "overlap.safetensors", safetensors({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)))
    write(t, "truncated.safetensors", safetensors({
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(9)))
    write(t, "bad_dtype.safetensors", safetensors({
        "a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)))
    write(t, "huge_shape.safetensors", safetensors({
        "a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, bytes(4)))
    write(t, "header_too_long.safetensors", struct.pack("<Q", (1 << 64) - 1) + b"{}")


# --- model_config_fuzzer: config.json texts ----------------------------------

def make_model_config():
    t = "model_config_fuzzer"
    for name in ("llama_gqa", "qwen2_tied", "llama3_rope", "mistral_window"):
        with open(os.path.join(FIXTURES, "models", name, "config.json"), "rb") as f:
            write(t, name + ".json", f.read())
    with open(os.path.join(ROOT, "models", "tiny-llama", "config.json"), "rb") as f:
        tiny = f.read()
    write(t, "tiny_llama.json", tiny)
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    write(t, "rope_parameters.json", json.dumps(dict(base, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})))
    write(t, "linear_rope.json", json.dumps(dict(base, rope_scaling={"type": "linear", "factor": 2})))
    write(t, "eos_list.json", json.dumps(dict(base, bos_token_id=1, eos_token_id=[2, 3])))
    write(t, "eos_past_int32.json", json.dumps(dict(base, eos_token_id=4294967296)))
    write(t, "eos_negative.json", json.dumps(dict(base, bos_token_id=-1)))
    write(t, "sizes_at_limit.json", json.dumps(dict(
        base, vocab_size=1 << 30, hidden_size=1 << 30, num_attention_heads=1 << 21,
        num_key_value_heads=1 << 21, intermediate_size=1 << 30, num_hidden_layers=1 << 30)))


# --- tokenizer_json_fuzzer: small tokenizer.json files -----------------------

def shrink_tokenizer(path, keep_chars, max_merges):
    """The fixture with its vocabulary cut to tokens over `keep_chars` (in the
    byte alphabet) and the merges among them."""
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok["model"]
    added_ids = {a["id"] for a in tok.get("added_tokens") or []}
    vocab = {k: v for k, v in model["vocab"].items()
             if v in added_ids or all(c in keep_chars for c in k)}
    merges = []
    for m in model["merges"]:
        left, right = m.split(" ") if isinstance(m, str) else m
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(m)
        if len(merges) >= max_merges:
            break
    model["vocab"], model["merges"] = vocab, merges
    return json.dumps(tok, ensure_ascii=False, separators=(",", ":"))


def make_tokenizer_json():
    t = "tokenizer_json_fuzzer"
    keep = set("abcdefghilmnorstuwHT.,' 0123456789") | {"\u0120", "\u010a"}  # Ġ (space), Ċ (newline)
    for name in ("gpt2_bpe", "llama3_bpe", "qwen2_bpe"):
        path = os.path.join(FIXTURES, "tokenizers", name, "tokenizer.json")
        write(t, name + ".json", shrink_tokenizer(path, keep, 40))
    bytes_alphabet = {}
    n = 256
    for b in range(256):
        printable = 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or b >= 0xAE
        bytes_alphabet[chr(b) if printable else chr(n)] = b
        if not printable:
            n += 1
    # Every byte plus two merges, in the older "left right" merge form, with
    # a Roberta post processor, an unknown token and a Digits pre-tokenizer.
    vocab = dict(bytes_alphabet)
    vocab.update({"ab": 256, "abc": 257, "<unk>": 258, "<s>": 259, "</s>": 260})
    write(t, "full_alphabet.json", json.dumps({
        "added_tokens": [{"id": 259, "content": "<s>", "special": True},
                         {"id": 260, "content": "</s>", "special": True, "lstrip": True, "rstrip": True}],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "NFD"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "Split", "pattern": {"String": "x"}, "behavior": "MergedWithNext", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}]},
        "post_processor": {"type": "RobertaProcessing", "cls": ["<s>", 259], "sep": ["</s>", 260]},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "vocab": vocab,
                  "merges": ["a b", "ab c"]}}, separators=(",", ":")))
    write(t, "split_behaviors.json", json.dumps({
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": True},
            {"type": "Split", "pattern": {"Regex": "[a-z]"}, "behavior": "Contiguous"},
            {"type": "Split", "pattern": {"Regex": "b"}, "behavior": "MergedWithPrevious"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel"},
            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "a"}},
                                                      {"Sequence": {"id": "A"}},
                                                      {"SpecialToken": {"id": "b"}}],
             "special_tokens": {"b": {"ids": [1]}}}]},
        "model": {"type": "BPE", "ignore_merges": True, "vocab": {"a": 0, "b": 1, "ab": 2},
                  "merges": [["a", "b"]]}}, separators=(",", ":")))
    write(t, "id_too_large.json", '{"model":{"type":"BPE","vocab":{"a":18446744073709551615},"merges":[]}}')


# --- tokenizer_encode_fuzzer: texts (and, read as int32s, token ids) ---------

def make_tokenizer_encode():
    t = "tokenizer_encode_fuzzer"
    texts = set()
    for name in ("gpt2_bpe", "llama3_bpe", "qwen2_bpe", "sentencepiece"):
        with open(os.path.join(FIXTURES, "tokenizers", name, "cases.json"), encoding="utf-8") as f:
            texts.update(c["text"] for c in json.load(f))
    for i, text in enumerate(sorted(texts)):
        write(t, "case%02d.txt" % i, text)
    write(t, "invalid_utf8.bin", b"ok \xff\xfe \xc3( \xe2\x82 \xf0\x9f\x98 end")
    write(t, "nul_and_controls.bin", b"a\0b\x01\x1b[31m\x7f")
    write(t, "ids.bin", struct.pack("<8i", 0, 1, 2, 100, 799, 800, -1, 2**31 - 1))
    write(t, "nfc.txt", "e\u0301 \u212b \uff21 \ufb01")


# --- profile_fuzzer: profile YAML --------------------------------------------

def make_profile():
    t = "profile_fuzzer"
    write(t, "every_key.yaml", """name: long-doc-qa
kv_policy:
  type: clusterkv
  budget_tokens: 1024
  sink_tokens: 16
  window_tokens: 320
  tokens_per_cluster: 80
  kmeans_iterations: 20
  full_layers: 2
  quest_page_tokens: 16
codec: bf16
tiers:
  gpu_bytes: 8GiB
  host_bytes: 64 GB
  ssd_path: /var/lib/strata/kv
  ssd_bytes: 512GiB
  ssd_write_admission: cold
""")
    write(t, "minimal.yaml", "name: chat\n")
    write(t, "flow.yaml", "{name: s, kv_policy: {type: streaming, sink_tokens: 4, window_tokens: 64}}\n")
    write(t, "quest.yaml", "name: q\nkv_policy:\n  type: quest\n  quest_page_tokens: 32\ncodec: fp8_e4m3\n")
    write(t, "bad_values.yaml", "name: x\nkv_policy: {budget_tokens: -5}\ntiers: {gpu_bytes: 99999999999TiB}\n")
    write(t, "anchors.yaml", "base: &b {type: full}\nname: a\nkv_policy: *b\n")
    write(t, "not_a_map.yaml", "- a\n- [b, {c: d}]\n")
    write(t, "unclosed.yaml", "name: [unclosed\n")


# --- request_conversion_fuzzer: serialized strata.v1.GenerateRequest ---------

def make_requests():
    t = "request_conversion_fuzzer"
    requests = {
        "text.pb": 'request_id: "r1" text: "def parse(args):" sampling { temperature: 0.7 top_p: 0.9 top_k: 40 seed: 7 } '
                   'stopping { max_tokens: 32 stop: "\\n\\n" stop_token_ids: 2 }',
        "token_ids.pb": 'token_ids { ids: [1, 450, 4996, 17354] } stopping { max_tokens: 8 ignore_eos: true }',
        "profile.pb": 'text: "Return the value." profile: "long-doc" add_special_tokens: false return_logprobs: true',
        "unknown_profile.pb": 'text: "x" profile: "nope"',
        "bad_sampling.pb": 'text: "x" sampling { temperature: -1 top_p: 0 top_k: -3 }',
        "too_long.pb": 'token_ids { ids: [%s] }' % ", ".join(["5"] * 600),
        "bad_id.pb": 'token_ids { ids: [1, -7, 1000000] } stopping { stop_token_ids: -1 }',
        "max_tokens_zero.pb": 'text: "hello" stopping { max_tokens: 0 }',
        "special_text.pb": 'text: "<s></s> a\\t\\u00e9\\U0001F98A" stopping { stop: ["a", "b"] }',
        "empty.pb": '',
    }
    proto = os.path.join("strata", "v1", "generate.proto")
    for name, text in requests.items():
        data = subprocess.run(["protoc", "--proto_path=" + os.path.join(ROOT, "proto"),
                               "--encode=strata.v1.GenerateRequest", proto],
                              input=text.encode(), stdout=subprocess.PIPE, check=True).stdout
        write(t, name, data)


# --- kv_block_fuzzer: encoded KV blocks (kvtier/codec.h) ---------------------
#
# Written here independently of the C++ encoder: tests/kvtier/codec_test.cc
# checks that every valid_* block passes Codec::Inspect and decodes, so this
# is a second writer of the format. Scales and codes are arbitrary (any
# values are a valid payload); what matters is the layout and the CRC.

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask_crc(crc):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF


KV_CODECS = {"bf16": 0, "fp8_e4m3": 1, "int8": 2, "int4": 3}
KV_DTYPES = {"f32": (0, 4), "f16": (1, 2), "bf16": (2, 2), "f8_e4m3": (3, 1)}


def kv_payload_size(codec, dtype, n, d, key_group, value_group):
    e = n * d
    if codec == "bf16":
        return 2 * e * KV_DTYPES[dtype][1]
    if codec == "fp8_e4m3":
        return 2 * d + 2 * n + 2 * e
    codes = (e + 1) // 2 if codec == "int4" else e
    return 4 * -(-n // key_group) * d + 4 * n * -(-d // value_group) + 2 * codes


def kv_block(codec, dtype, n, d, payload, key_group=0, value_group=0, codec_byte=None,
             reserved=0):
    header = b"SKVB" + struct.pack(
        "<BBBBIIIHHI", 1, KV_CODECS[codec] if codec_byte is None else codec_byte,
        KV_DTYPES[dtype][0], 0, n, d, len(payload), key_group, value_group, reserved)
    return header + struct.pack("<I", mask_crc(crc32c(payload, crc32c(header)))) + payload


def fp16s(values):
    return b"".join(struct.pack("<e", v) for v in values)


def affine_payload(codec, n, d, key_group, value_group, seed):
    pairs = -(-n // key_group) * d + n * -(-d // value_group)
    params = fp16s([v for i in range(pairs) for v in (0.01 * (1 + i % 7), -0.05 * (i % 5))])
    e = n * d

    def codes(salt):
        c = bytearray((salt + 37 * i) % 256 for i in range((e + 1) // 2 if codec == "int4" else e))
        if codec == "int4" and e % 2:
            c[-1] &= 0x0F  # the padding nibble is 0
        return bytes(c)

    return params + codes(seed) + codes(seed + 101)


def make_kv_blocks():
    t = "kv_block_fuzzer"
    bf16 = b"".join(struct.pack("<H", 0x3F80 + 3 * i) for i in range(2 * 2 * 4))
    write(t, "valid_raw_bf16.skvb", kv_block("bf16", "bf16", 2, 4, bf16))
    f32 = b"".join(struct.pack("<f", 0.25 * i - 1) for i in range(2 * 1 * 3))
    write(t, "valid_raw_f32.skvb", kv_block("bf16", "f32", 1, 3, f32))
    n, d = 3, 4
    fp8 = fp16s([0.01, 0.02, 0.5, 1.0]) + fp16s([0.1, 0.2, 0.3]) + bytes(
        (11 * i) % 0x7F for i in range(2 * n * d))
    write(t, "valid_fp8.skvb", kv_block("fp8_e4m3", "bf16", n, d, fp8))
    affine = {  # name: codec, source dtype, tokens, head_dim, key_group, value_group
        "valid_int8.skvb": ("int8", "f16", 5, 6, 128, 32),
        "valid_int4_odd.skvb": ("int4", "f32", 3, 5, 128, 32),
        "valid_int4_small_groups.skvb": ("int4", "f8_e4m3", 4, 6, 2, 4),
        "valid_int8_two_key_groups.skvb": ("int8", "bf16", 130, 2, 128, 32),
    }
    for seed, (name, (codec, dtype, n, d, kg, vg)) in enumerate(affine.items()):
        write(t, name, kv_block(codec, dtype, n, d, affine_payload(codec, n, d, kg, vg, seed), kg, vg))
    good = kv_block("int8", "bf16", 2, 2, affine_payload("int8", 2, 2, 128, 32, 5), 128, 32)
    write(t, "bad_crc.skvb", good[:-1] + bytes([good[-1] ^ 1]))
    write(t, "truncated.skvb", good[:-3])
    write(t, "unknown_codec.skvb", kv_block("int8", "bf16", 2, 2, b"", codec_byte=7))
    write(t, "reserved_set.skvb", kv_block("bf16", "f32", 1, 1, bytes(8), reserved=1))
    write(t, "payload_size_mismatch.skvb", kv_block("int4", "f32", 2, 2, bytes(10), 128, 32))
    write(t, "short.skvb", b"SKVB\x01\x02\x00\x00" + bytes(4))


TARGETS = {
    "safetensors_fuzzer": make_safetensors,
    "model_config_fuzzer": make_model_config,
    "tokenizer_json_fuzzer": make_tokenizer_json,
    "tokenizer_encode_fuzzer": make_tokenizer_encode,
    "profile_fuzzer": make_profile,
    "request_conversion_fuzzer": make_requests,
    "kv_block_fuzzer": make_kv_blocks,
}


# --- kv_wire_fuzzer: KV block wire headers (kvtier/kv_wire.h) -------------------


def kv_wire_header(transfer=7, index=0, count=4, tokens=16, codec=0, dtype=2, layers=32,
                   heads=8, dim=128, page=16, upper=32, payload_crc=0, payload_bytes=None,
                   ranks=1, first_layer=0, part_layers=0):
    if payload_bytes is None:
        payload_bytes = ranks * 2 * (part_layers or layers) * page * heads * dim * 2
    head = struct.pack("<IHHQIIIBBHHHHHHBBIQ", 0x31564B53, 1, 1, transfer, index, count, tokens,
                       codec, dtype, ranks, layers, heads, dim, page, upper, first_layer,
                       part_layers, payload_crc, payload_bytes)
    return head + struct.pack("<II", mask_crc(crc32c(head)), 0)


def make_kv_wire():
    t = "kv_wire_fuzzer"
    write(t, "valid.skvh", kv_wire_header())
    write(t, "last_partial_page.skvh", kv_wire_header(index=3, tokens=5))
    write(t, "other_layout.skvh", kv_wire_header(heads=4, payload_bytes=2 * 32 * 16 * 4 * 128 * 2))
    write(t, "index_past_count.skvh", kv_wire_header(index=4))
    write(t, "coded.skvh", kv_wire_header(codec=2))
    write(t, "two_ranks.skvh", kv_wire_header(ranks=2))
    write(t, "layer_part.skvh", kv_wire_header(first_layer=8, part_layers=8))
    bad = bytearray(kv_wire_header())
    bad[20] ^= 1
    write(t, "bad_crc.skvh", bytes(bad))


TARGETS["kv_wire_fuzzer"] = make_kv_wire


def main(argv):
    for name in argv or TARGETS:
        if name not in TARGETS:
            sys.exit("make_corpus: no target %s (%s)" % (name, ", ".join(TARGETS)))
        TARGETS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
