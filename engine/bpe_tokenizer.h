// BpeTokenizer: the byte-level BPE of a Hugging Face tokenizer.json, as used
// by GPT-2, Llama-3 and Qwen2.
//
// Encoding follows the tokenizers pipeline: the text is first split on the
// added tokens (each becomes its own id), the rest is normalised (NFC & co),
// pre-tokenised (Split regexes, ByteLevel), mapped to the GPT-2 byte alphabet
// and merged word by word with the ranked merges; the post processor's
// template then adds its special tokens. Decoding maps the byte alphabet back
// to raw bytes. Only what byte-level models use is supported; anything else
// in the file is refused at load time with an error naming the field.
//
// Thread-safety: immutable after construction except for an internal word
// cache guarded by a mutex; every method is const and may be called
// concurrently. The two setters are for the loader only and must not race
// with other calls.
#ifndef STRATA_ENGINE_BPE_TOKENIZER_H_
#define STRATA_ENGINE_BPE_TOKENIZER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/tokenizer.h"

namespace strata::engine {

namespace bpe_internal {
class Regex;
struct PreTokenizerStep;
}  // namespace bpe_internal

class BpeTokenizer : public Tokenizer {
 public:
  // Parses the contents of a tokenizer.json; `path` only names the file in
  // error messages.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromJson(std::string_view json_text,
                                                                const std::string& path);

  ~BpeTokenizer() override;
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                     bool skip_special_tokens) const override;
  std::string TokenBytes(int32_t id) const override;
  bool IsSpecial(int32_t id) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::vector<int32_t> eos_ids() const override { return eos_ids_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override;

  // Loader hooks (tokenizer_config.json / generation_config.json override
  // what tokenizer.json implies). Not thread-safe; call before sharing.
  void set_bos_id(std::optional<int32_t> id) { bos_id_ = id; }
  void set_eos_ids(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }

 private:
  struct AddedToken {
    std::string content;
    int32_t id = 0;
    bool special = false;
    bool lstrip = false;
    bool rstrip = false;
  };
  // A piece of input after the added-token split: either text still to be
  // tokenised, or the id of an added token.
  struct Segment {
    std::string_view text;
    int32_t added_id = -1;
  };
  enum class Normalization { kNFC, kNFD, kNFKC, kNFKD };

  BpeTokenizer();

  absl::Status Parse(std::string_view json_text, const std::string& path);

  std::vector<Segment> SplitOnAddedTokens(std::string_view text) const;
  absl::StatusOr<std::string> Normalize(std::string_view text) const;
  absl::StatusOr<std::vector<std::string>> PreTokenize(std::string text) const;
  // Appends the ids of one pre-tokenised word (already in the byte alphabet).
  void EncodeWord(const std::string& word, std::vector<int32_t>* ids) const;
  std::vector<int32_t> MergeWord(const std::string& word) const;

  // Model.
  absl::flat_hash_map<std::string, int32_t> vocab_;
  // (left id << 32 | right id) -> (rank, merged id).
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  std::vector<std::string> id_to_token_;  // "" for holes in the id space
  std::vector<std::string> id_to_bytes_;  // decoded bytes per id
  std::vector<bool> id_known_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  int32_t vocab_size_ = 0;

  // Added tokens, indexed by the first byte of their content for matching.
  std::vector<AddedToken> added_;
  std::vector<std::vector<size_t>> added_by_first_byte_;
  absl::flat_hash_map<int32_t, size_t> added_by_id_;

  // Normaliser and pre-tokeniser pipeline.
  std::vector<Normalization> normalizations_;
  std::vector<std::unique_ptr<bpe_internal::PreTokenizerStep>> pre_tokenizers_;

  // Post processor: ids around the sequence when add_special_tokens.
  std::vector<int32_t> prefix_ids_;
  std::vector<int32_t> suffix_ids_;

  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;

  // word -> ids. Bounded: cleared when it grows past a limit.
  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

// Appends `bytes` to `out` as valid UTF-8. Each maximal ill-formed subpart
// becomes one U+FFFD (the Unicode "substitution of maximal subparts"
// practice, which is also what the reference decoders' lossy conversion
// does). With `hold_incomplete`, a sequence at the end that is still valid
// but unfinished is left unconsumed. Returns the number of bytes consumed.
// Shared by the BPE decoder and IncrementalDetokenizer.
size_t AppendValidUtf8(std::string_view bytes, bool hold_incomplete, std::string* out);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_BPE_TOKENIZER_H_
