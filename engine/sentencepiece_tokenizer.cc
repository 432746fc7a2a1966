#include "engine/sentencepiece_tokenizer.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace strata::engine {
namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581, sentencepiece's space
// What sentencepiece prints for the unknown token: " ⁇ ".
constexpr std::string_view kUnknownSurface = " \xE2\x81\x87 ";

// Minimal protobuf wire-format reader, just enough to find
// ModelProto.normalizer_spec (field 3).add_dummy_prefix (field 3), which the
// processor does not expose without the generated proto headers.
class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}

  bool done() const { return pos_ >= data_.size(); }

  bool ReadVarint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) return false;
      const uint8_t byte = static_cast<uint8_t>(data_[pos_++]);
      *value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }

  // Reads one field; for length-delimited fields *payload is set.
  bool ReadField(uint32_t* field, uint32_t* wire_type, uint64_t* varint,
                 std::string_view* payload) {
    uint64_t tag;
    if (!ReadVarint(&tag)) return false;
    *field = static_cast<uint32_t>(tag >> 3);
    *wire_type = static_cast<uint32_t>(tag & 7);
    switch (*wire_type) {
      case 0:
        return ReadVarint(varint);
      case 1:
        return Skip(8);
      case 5:
        return Skip(4);
      case 2: {
        uint64_t len;
        if (!ReadVarint(&len) || len > data_.size() - pos_) return false;
        *payload = data_.substr(pos_, len);
        pos_ += len;
        return true;
      }
      default:
        return false;  // groups are not used by sentencepiece
    }
  }

 private:
  bool Skip(size_t n) {
    if (n > data_.size() - pos_) return false;
    pos_ += n;
    return true;
  }

  std::string_view data_;
  size_t pos_ = 0;
};

// add_dummy_prefix of the model's normalizer; the proto default (true) when
// the field is absent or the bytes cannot be read.
bool ReadAddDummyPrefix(std::string_view model_proto) {
  WireReader model(model_proto);
  bool result = true;
  uint32_t field, wire_type;
  uint64_t varint;
  std::string_view payload;
  while (!model.done()) {
    if (!model.ReadField(&field, &wire_type, &varint, &payload)) return true;
    if (field != 3 || wire_type != 2) continue;
    WireReader spec(payload);
    while (!spec.done()) {
      if (!spec.ReadField(&field, &wire_type, &varint, &payload)) return true;
      if (field == 3 && wire_type == 0) result = varint != 0;
    }
  }
  return result;
}

std::string ReplaceSpaceMarkers(const std::string& piece) {
  std::string out;
  out.reserve(piece.size());
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, kSpaceMarker.size(), kSpaceMarker) == 0) {
      out.push_back(' ');
      i += kSpaceMarker.size();
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

// "<0xE3>" -> "\xE3"; nullopt for anything else.
std::optional<char> ParseBytePiece(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return std::nullopt;
  int value = 0;
  for (int i = 3; i < 5; ++i) {
    const char c = piece[i];
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return std::nullopt;
    }
    value = value * 16 + digit;
  }
  return static_cast<char>(value);
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer() = default;
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::FromSerializedProto(
    const std::string& model_proto, const std::string& path, Options options) {
  std::unique_ptr<SentencePieceTokenizer> tokenizer(new SentencePieceTokenizer);
  auto processor = CreateSentencePieceProcessor();
  if (!processor.ok()) return processor.status();
  tokenizer->processor_ = *std::move(processor);
  std::string error;
  if (!tokenizer->processor_->Load(model_proto, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a valid sentencepiece model: ", error));
  }
  const SentencePieceProcessor& sp = *tokenizer->processor_;
  tokenizer->options_ = options;
  tokenizer->add_dummy_prefix_ = ReadAddDummyPrefix(model_proto);
  const int size = sp.GetPieceSize();
  if (size <= 0) return absl::InvalidArgumentError(absl::StrCat(path, ": empty vocabulary"));
  tokenizer->token_bytes_.resize(size);
  tokenizer->is_control_.assign(size, false);
  for (int id = 0; id < size; ++id) {
    const std::string piece = sp.IdToPiece(id);
    std::string& bytes = tokenizer->token_bytes_[id];
    if (sp.IsControl(id)) {
      bytes = piece;
      tokenizer->is_control_[id] = true;
      if (!piece.empty()) tokenizer->control_pieces_.emplace_back(piece, id);
    } else if (sp.IsUnknown(id)) {
      bytes = std::string(kUnknownSurface);
    } else if (std::optional<char> byte = sp.IsByte(id) ? ParseBytePiece(piece) : std::nullopt) {
      bytes = std::string(1, *byte);
    } else {
      bytes = ReplaceSpaceMarkers(piece);
    }
  }
  std::stable_sort(tokenizer->control_pieces_.begin(), tokenizer->control_pieces_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  if (sp.bos_id() >= 0) tokenizer->bos_id_ = sp.bos_id();
  if (sp.eos_id() >= 0) tokenizer->eos_ids_ = {sp.eos_id()};
  return tokenizer;
}

absl::StatusOr<std::vector<int32_t>> SentencePieceTokenizer::Encode(std::string_view text,
                                                                    bool add_special_tokens) const {
  std::vector<int32_t> ids;
  if (add_special_tokens && options_.add_bos && bos_id_) ids.push_back(*bos_id_);
  std::vector<int> piece_ids;
  auto encode_text = [&](std::string_view segment) -> absl::Status {
    if (segment.empty()) return absl::OkStatus();
    piece_ids.clear();
    std::string error;
    if (!processor_->Encode(std::string(segment), &piece_ids, &error)) {
      return absl::InternalError(absl::StrCat("sentencepiece Encode failed: ", error));
    }
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    return absl::OkStatus();
  };
  // Cut out control pieces written in the text (leftmost, then longest).
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    const std::pair<std::string, int32_t>* hit = nullptr;
    for (const auto& control : control_pieces_) {
      if (control.first[0] == text[i] &&
          text.compare(i, control.first.size(), control.first) == 0) {
        hit = &control;
        break;
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    if (absl::Status s = encode_text(text.substr(start, i - start)); !s.ok()) return s;
    ids.push_back(hit->second);
    i += hit->first.size();
    start = i;
  }
  if (absl::Status s = encode_text(text.substr(start)); !s.ok()) return s;
  if (add_special_tokens && options_.add_eos && !eos_ids_.empty()) ids.push_back(eos_ids_[0]);
  return ids;
}

absl::StatusOr<std::string> SentencePieceTokenizer::Decode(const std::vector<int32_t>& ids,
                                                           bool skip_special_tokens) const {
  // The processor drops control tokens whatever skip_special_tokens says.
  (void)skip_special_tokens;
  std::vector<int> piece_ids;
  piece_ids.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Decode: token id ", id, " is outside the vocabulary (size ", vocab_size(), ")"));
    }
    piece_ids.push_back(id);
  }
  std::string text;
  std::string error;
  if (!processor_->Decode(piece_ids, &text, &error)) {
    return absl::InternalError(absl::StrCat("sentencepiece Decode failed: ", error));
  }
  return text;
}

std::string SentencePieceTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return std::string();
  return token_bytes_[id];
}

bool SentencePieceTokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && is_control_[id];
}

std::optional<int32_t> SentencePieceTokenizer::TokenToId(std::string_view token) const {
  const int id = processor_->PieceToId(std::string(token));
  // PieceToId answers unk_id for pieces it does not know.
  if (id < 0 || id >= vocab_size()) return std::nullopt;
  if (processor_->IdToPiece(id) != token) return std::nullopt;
  return id;
}

}  // namespace strata::engine
