// SentencePieceTokenizer: a tokenizer.model (Llama-2, Mistral, Gemma style)
// run through libsentencepiece (loaded via the shim of
// engine/sentencepiece_library.h).
//
// Encoding is the processor's, plus the bos/eos the loader asks for. Control
// pieces written in the text (e.g. "<s>") are cut out first and become their
// single id; the text between them is encoded piece by piece, each getting
// the model's dummy prefix (the behaviour of the "legacy" Hugging Face slow
// tokenizer). Decoding is the processor's, so control tokens never appear in
// the decoded text (as with sentencepiece); TokenBytes still gives their
// piece so a caller that streams tokens can show them.
//
// Thread-safety: immutable after construction (the processor is only used
// through its const methods); every method is const and may be called
// concurrently. The setters are for the loader only and must not race with
// other calls.
#ifndef STRATA_ENGINE_SENTENCEPIECE_TOKENIZER_H_
#define STRATA_ENGINE_SENTENCEPIECE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/sentencepiece_library.h"
#include "engine/tokenizer.h"

namespace strata::engine {

class SentencePieceTokenizer : public Tokenizer {
 public:
  struct Options {
    bool add_bos = true;   // when Encode's add_special_tokens is set
    bool add_eos = false;  // likewise
  };

  // Loads a serialized ModelProto (the contents of tokenizer.model); `path`
  // only names the file in error messages.
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> FromSerializedProto(
      const std::string& model_proto, const std::string& path, Options options);

  ~SentencePieceTokenizer() override;
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                     bool skip_special_tokens) const override;
  std::string TokenBytes(int32_t id) const override;
  bool StripsLeadingSpace() const override { return add_dummy_prefix_; }
  bool IsSpecial(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(token_bytes_.size()); }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::vector<int32_t> eos_ids() const override { return eos_ids_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override;

  // Loader hooks (tokenizer_config.json / generation_config.json).
  void set_bos_id(std::optional<int32_t> id) { bos_id_ = id; }
  void set_eos_ids(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }

 private:
  SentencePieceTokenizer();

  std::unique_ptr<SentencePieceProcessor> processor_;
  Options options_;
  bool add_dummy_prefix_ = true;
  std::vector<std::string> token_bytes_;  // TokenBytes per id
  std::vector<bool> is_control_;
  // Control pieces matched in the text, longest first.
  std::vector<std::pair<std::string, int32_t>> control_pieces_;
  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_SENTENCEPIECE_TOKENIZER_H_
