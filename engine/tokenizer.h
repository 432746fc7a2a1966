// Tokenizer: text <-> token ids for a model directory.
//
// LoadTokenizer picks the implementation from the files present:
//  - tokenizer.json (Hugging Face tokenizers): byte-level BPE as used by
//    GPT-2, Llama-3 and Qwen2 (engine/bpe_tokenizer.h);
//  - tokenizer.model (SentencePiece), through libsentencepiece
//    (engine/sentencepiece_tokenizer.h).
// tokenizer_config.json (when present) names the bos/eos tokens and whether
// a bos is added.
//
// Thread-safety: all methods are const and safe to call concurrently.
#ifndef STRATA_ENGINE_TOKENIZER_H_
#define STRATA_ENGINE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace strata::engine {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Encodes text. add_special_tokens adds what the tokenizer's template adds
  // (e.g. the bos token for Llama). Special tokens written in the text (e.g.
  // "<|eot_id|>") are recognised as single tokens.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special_tokens) const = 0;

  // Decodes a whole sequence to text. Invalid UTF-8 produced by byte tokens
  // is replaced with U+FFFD. Ids outside the vocabulary are an error.
  virtual absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                             bool skip_special_tokens) const = 0;

  // The raw bytes token `id` stands for, as they appear in the middle of a
  // decoded sequence (may be a partial UTF-8 sequence). Special tokens give
  // their content. Ids outside the vocabulary give an empty string.
  virtual std::string TokenBytes(int32_t id) const = 0;

  // True when the first token's leading space is dropped on decoding
  // (SentencePiece's dummy prefix).
  virtual bool StripsLeadingSpace() const { return false; }

  virtual bool IsSpecial(int32_t id) const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  // End-of-sequence tokens declared by the tokenizer (may be several).
  virtual std::vector<int32_t> eos_ids() const = 0;
  // Looks up a token by its exact string form (e.g. "<|eot_id|>").
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
};

// Loads the tokenizer of a Hugging Face model directory. Errors name the file
// and what is wrong (missing, bad JSON, unsupported model type, ...).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir);

// Turns a stream of token ids into text pieces that are always complete
// UTF-8: bytes of a character split across tokens are held back until the
// character is complete. Bytes that can never form a valid character are
// emitted as U+FFFD.
//
// Thread-safety: one instance per sequence; not thread-safe.
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens);

  // Adds one token; returns the text that became complete (may be empty).
  std::string Push(int32_t id);
  // Returns whatever is held back (as U+FFFD for incomplete sequences).
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  bool at_start_ = true;
  std::string pending_;  // bytes not yet emitted
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_TOKENIZER_H_
