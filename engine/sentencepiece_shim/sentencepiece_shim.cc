// The sentencepiece shim: engine::SentencePieceProcessor implemented with
// libsentencepiece, built as its own shared library and loaded with dlopen
// (see engine/sentencepiece_library.h for why).
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sentencepiece_library.h"

// sentencepiece_processor.h declares `namespace absl { using std::string_view; }`
// and was built with absl::string_view == std::string_view, but Debian's
// abseil defines its own absl::string_view class, so the two cannot meet in
// one translation unit. Renaming the header's `absl` keeps its declarations
// (std::string_view underneath, hence the same symbols) out of abseil's way.
#define absl strata_sentencepiece_absl
#include <sentencepiece_processor.h>
#undef absl

namespace strata::engine {
namespace {

class ShimProcessor final : public SentencePieceProcessor {
 public:
  bool Load(const std::string& model_proto, std::string* error) override {
    const auto status = sp_.LoadFromSerializedProto(std::string_view(model_proto));
    if (!status.ok()) *error = status.ToString();
    return status.ok();
  }
  int GetPieceSize() const override { return sp_.GetPieceSize(); }
  std::string IdToPiece(int id) const override { return sp_.IdToPiece(id); }
  int PieceToId(const std::string& piece) const override { return sp_.PieceToId(piece); }
  bool IsControl(int id) const override { return sp_.IsControl(id); }
  bool IsUnknown(int id) const override { return sp_.IsUnknown(id); }
  bool IsByte(int id) const override { return sp_.IsByte(id); }
  int bos_id() const override { return sp_.bos_id(); }
  int eos_id() const override { return sp_.eos_id(); }
  bool Encode(const std::string& text, std::vector<int>* ids, std::string* error) const override {
    const auto status = sp_.Encode(std::string_view(text), ids);
    if (!status.ok()) *error = status.ToString();
    return status.ok();
  }
  bool Decode(const std::vector<int>& ids, std::string* text, std::string* error) const override {
    const auto status = sp_.Decode(ids, text);
    if (!status.ok()) *error = status.ToString();
    return status.ok();
  }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

}  // namespace
}  // namespace strata::engine

extern "C" __attribute__((visibility("default"))) strata::engine::SentencePieceProcessor*
StrataCreateSentencePieceProcessor() {
  return new strata::engine::ShimProcessor();
}
