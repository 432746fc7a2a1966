// Fuzzes the tokenizer.json loader (engine/bpe_tokenizer.h,
// BpeTokenizer::FromJson). A tokenizer that loads must then encode and decode
// a few fixed texts and answer for every id of its vocabulary without
// crashing.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/bpe_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto tokenizer = strata::engine::BpeTokenizer::FromJson(text, "tokenizer.json");
  if (!tokenizer.ok()) return 0;
  const strata::engine::BpeTokenizer& t = **tokenizer;
  for (std::string_view sample :
       {std::string_view("Hello world, it's 2024!\n\n  x"),
        std::string_view("<|endoftext|> caf\xC3\xA9 \xE4\xB8\xAD"), std::string_view("")}) {
    for (bool special : {false, true}) {
      auto ids = t.Encode(sample, special);
      if (!ids.ok()) continue;
      (void)t.Decode(*ids, /*skip_special_tokens=*/false);
      (void)t.Decode(*ids, /*skip_special_tokens=*/true);
    }
  }
  // The whole id space, a step at a time for big vocabularies.
  const int32_t vocab = t.vocab_size();
  const int32_t step = vocab > 4096 ? vocab / 4096 : 1;
  std::vector<int32_t> ids;
  for (int32_t id = -1; id <= vocab; id += step) {
    (void)t.TokenBytes(id);
    (void)t.IsSpecial(id);
    if (id >= 0 && id < vocab) ids.push_back(id);
  }
  (void)t.Decode(ids, /*skip_special_tokens=*/false);
  (void)t.bos_id();
  (void)t.eos_ids();
  return 0;
}
