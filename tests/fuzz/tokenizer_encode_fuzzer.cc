// Fuzzes Encode and Decode of fixed, valid tokenizers (the byte-level BPE
// fixtures of tests/fixtures/tokenizers and the SentencePiece one) with
// arbitrary input: the bytes are encoded as text, and read as int32 token ids
// to decode. Checked besides "no crash": byte-level BPE encodes exactly the
// valid UTF-8 texts, decoding gives the text back (for the fixtures without a
// normaliser), and IncrementalDetokenizer's pieces add up to Decode's text.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"

namespace {

using strata::engine::IncrementalDetokenizer;
using strata::engine::Tokenizer;

struct Fixture {
  std::unique_ptr<Tokenizer> tokenizer;
  bool byte_level = false;  // BPE: strict UTF-8 and the detokenizer property
  bool lossless = false;    // no normaliser: Decode(Encode(text)) == text
};

std::vector<Fixture>* fixtures = nullptr;

std::string Detokenize(const Tokenizer& t, const std::vector<int32_t>& ids, bool skip_special) {
  IncrementalDetokenizer detokenizer(&t, skip_special);
  std::string text;
  for (int32_t id : ids) text += detokenizer.Push(id);
  return text + detokenizer.Flush();
}

void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "tokenizer_encode_fuzzer: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fixtures = new std::vector<Fixture>;
  struct Spec {
    const char* dir;
    bool byte_level, lossless;
  } specs[] = {{"gpt2_bpe", true, true},
               {"llama3_bpe", true, true},
               {"qwen2_bpe", true, false},  // NFC normaliser
               {"sentencepiece", false, false}};
  for (const Spec& spec : specs) {
    const std::string dir = std::string(STRATA_SOURCE_DIR "/tests/fixtures/tokenizers/") + spec.dir;
    auto tokenizer = strata::engine::LoadTokenizer(dir);
    if (!tokenizer.ok()) {
      std::fprintf(stderr, "cannot load %s: %s\n", dir.c_str(),
                   std::string(tokenizer.status().message()).c_str());
      std::abort();
    }
    fixtures->push_back({*std::move(tokenizer), spec.byte_level, spec.lossless});
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<int32_t> raw_ids(size / sizeof(int32_t));
  if (!raw_ids.empty()) std::memcpy(raw_ids.data(), data, raw_ids.size() * sizeof(int32_t));

  for (const Fixture& f : *fixtures) {
    const Tokenizer& t = *f.tokenizer;
    for (bool special : {false, true}) {
      auto ids = t.Encode(text, special);
      if (!ids.ok()) continue;
      for (int32_t id : *ids)
        Check(id >= 0 && id < t.vocab_size(), "Encode gave an id outside the vocabulary");
      auto decoded = t.Decode(*ids, /*skip_special_tokens=*/false);
      Check(decoded.ok(), "Decode refused Encode's ids");
      if (f.lossless && !special) Check(*decoded == text, "Decode(Encode(text)) != text");
      if (f.byte_level) {
        Check(Detokenize(t, *ids, false) == *decoded, "detokenizer pieces != Decode");
        auto skipped = t.Decode(*ids, /*skip_special_tokens=*/true);
        Check(skipped.ok() && Detokenize(t, *ids, true) == *skipped,
              "detokenizer pieces != Decode (skipping special tokens)");
      }
    }
    // Arbitrary ids: refused or decoded, never a crash.
    (void)t.Decode(raw_ids, /*skip_special_tokens=*/false);
    (void)t.Decode(raw_ids, /*skip_special_tokens=*/true);
    (void)Detokenize(t, raw_ids, false);
    for (int32_t id : raw_ids) {
      (void)t.TokenBytes(id);
      (void)t.IsSpecial(id);
    }
  }
  return 0;
}
