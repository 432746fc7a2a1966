#include "engine/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata::engine {
namespace {

using Json = nlohmann::json;

// Debian's abseil has its own string_view class, so std::string_view does not
// convert implicitly; this bridges the two for lookups and messages.
absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Largest token id accepted from a file. Real vocabularies are < 2^18; the
// bound keeps a malformed file from asking for a huge id table.
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;
// Words longer than this are not cached (they are rare and would bloat it).
constexpr size_t kMaxCachedWordBytes = 256;
// The cache is dropped wholesale past this many words; simple and bounded.
constexpr size_t kMaxCacheEntries = 1 << 16;

// The pre-tokenisation regex of GPT-2, used by ByteLevel when use_regex.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

absl::Status FieldError(const std::string& path, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", field, ": ", what));
}

const Json* Find(const Json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

// Reads an optional boolean field; null or absent gives `fallback`.
absl::StatusOr<bool> GetBool(const Json& obj, const char* key, bool fallback,
                             const std::string& path, absl::string_view where) {
  const Json* v = Find(obj, key);
  if (v == nullptr || v->is_null()) return fallback;
  if (!v->is_boolean()) return FieldError(path, absl::StrCat(where, key), "not a boolean");
  return v->get<bool>();
}

// Reads an optional string field; null or absent gives nullopt.
absl::StatusOr<std::optional<std::string>> GetString(const Json& obj, const char* key,
                                                     const std::string& path,
                                                     absl::string_view where) {
  const Json* v = Find(obj, key);
  if (v == nullptr || v->is_null()) return std::optional<std::string>();
  if (!v->is_string()) return FieldError(path, absl::StrCat(where, key), "not a string");
  return std::optional<std::string>(v->get<std::string>());
}

absl::StatusOr<int32_t> GetId(const Json& v, const std::string& path, absl::string_view field) {
  if (!v.is_number_integer()) return FieldError(path, field, "token id is not an integer");
  // JSON integers past int64 are unsigned; reading them as int64 would wrap.
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(kMaxTokenId)) {
    return FieldError(path, field,
                      absl::StrCat("token id ", v.get<uint64_t>(), " is out of range"));
  }
  const int64_t id = v.get<int64_t>();
  if (id < 0 || id > kMaxTokenId) {
    return FieldError(path, field, absl::StrCat("token id ", id, " is out of range"));
  }
  return static_cast<int32_t>(id);
}

// ---------------------------------------------------------------------------
// UTF-8.

enum class Utf8Scan { kValid, kIncomplete, kInvalid };

// Classifies the sequence starting at p[0] (n > 0 bytes available), following
// the well-formed byte ranges of the Unicode standard (table 3-7). Sets *len
// to the sequence length (kValid), the bytes seen so far (kIncomplete), or
// the length of the maximal ill-formed subpart to replace (kInvalid).
Utf8Scan ScanUtf8(const unsigned char* p, size_t n, size_t* len) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) {
    *len = 1;
    return Utf8Scan::kValid;
  }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    need = 2;
  } else if (b0 == 0xED) {
    need = 2, hi = 0x9F;  // excludes the surrogates
  } else if (b0 == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    need = 3;
  } else if (b0 == 0xF4) {
    need = 3, hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *len = 1;
    return Utf8Scan::kInvalid;
  }
  for (size_t i = 1; i <= need; ++i) {
    if (i >= n) {
      *len = i;
      return Utf8Scan::kIncomplete;
    }
    const unsigned char c = p[i];
    const unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (c < l || c > h) {
      *len = i;
      return Utf8Scan::kInvalid;
    }
  }
  *len = need + 1;
  return Utf8Scan::kValid;
}

bool IsValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, len = 0;
  while (i < s.size()) {
    if (ScanUtf8(p + i, s.size() - i, &len) != Utf8Scan::kValid) return false;
    i += len;
  }
  return true;
}

// Length of the (valid) UTF-8 character starting at s[i].
size_t CharLen(std::string_view s, size_t i) {
  size_t len = 1;
  ScanUtf8(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i, &len);
  return len;
}

// Decodes the code point at s[*i] of a valid UTF-8 string and advances *i.
uint32_t NextCodePoint(std::string_view s, size_t* i) {
  const size_t len = CharLen(s, *i);
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + *i;
  *i += len;
  switch (len) {
    case 1:
      return p[0];
    case 2:
      return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3:
      return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default:
      return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) |
             (p[3] & 0x3Fu);
  }
}

void AppendCodePoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// ---------------------------------------------------------------------------
// The GPT-2 byte alphabet: every byte gets a printable, non-space character
// so that BPE can work on strings. Bytes that are already printable Latin-1
// ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the remaining 68
// bytes, in increasing order, take the code points 256, 257, ...

struct ByteAlphabet {
  std::string byte_to_utf8[256];
  int16_t code_point_to_byte[256 + 68];  // -1 where no byte maps
};

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet* const alphabet = [] {
    auto* a = new ByteAlphabet;
    std::fill(std::begin(a->code_point_to_byte), std::end(a->code_point_to_byte), int16_t{-1});
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? b : next++;
      AppendCodePoint(cp, &a->byte_to_utf8[b]);
      a->code_point_to_byte[cp] = static_cast<int16_t>(b);
    }
    return a;
  }();
  return *alphabet;
}

std::string BytesToAlphabet(std::string_view bytes) {
  const ByteAlphabet& a = Alphabet();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) out += a.byte_to_utf8[b];
  return out;
}

// Maps a vocabulary token back to raw bytes. A token with a character outside
// the byte alphabet is taken literally (its own UTF-8), as the reference
// ByteLevel decoder does.
std::string AlphabetToBytes(std::string_view token) {
  const ByteAlphabet& a = Alphabet();
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    const uint32_t cp = NextCodePoint(token, &i);
    if (cp >= std::size(a.code_point_to_byte) || a.code_point_to_byte[cp] < 0) {
      return std::string(token);
    }
    out.push_back(static_cast<char>(a.code_point_to_byte[cp]));
  }
  return out;
}

}  // namespace

size_t AppendValidUtf8(std::string_view bytes, bool hold_incomplete, std::string* out) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    size_t len = 0;
    switch (ScanUtf8(p + i, bytes.size() - i, &len)) {
      case Utf8Scan::kValid:
        out->append(bytes.data() + i, len);
        break;
      case Utf8Scan::kInvalid:
        out->append(kReplacement);
        break;
      case Utf8Scan::kIncomplete:
        if (hold_incomplete) return i;
        out->append(kReplacement);
        break;
    }
    i += len;
  }
  return i;
}

// ---------------------------------------------------------------------------
// Regex: a compiled PCRE2 pattern. Matching only reads the compiled code, so
// one Regex is shared by concurrent Encode calls (each call has its own
// match data).

namespace bpe_internal {

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern, bool literal) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    // PCRE2_LITERAL refuses PCRE2_UCP (which only changes how \d, \w and
    // the like match, meaningless for a literal).
    const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     options, &error_code, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error_code, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat("regex does not compile at offset ",
                                                     error_offset, ": ",
                                                     reinterpret_cast<const char*>(message)));
    }
    // JIT is only a speed-up; without it (or on failure) matching is
    // interpreted.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    return std::unique_ptr<Regex>(new Regex(code));
  }

  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [start, end) byte ranges of the successive non-empty
  // matches in `s`, which must be valid UTF-8.
  absl::Status FindAll(std::string_view s, std::vector<std::pair<size_t, size_t>>* matches) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    if (data == nullptr) return absl::ResourceExhaustedError("pcre2: out of memory");
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    // The input was validated once; checking it again on every call would
    // make the scan quadratic.
    uint32_t options = PCRE2_NO_UTF_CHECK;
    size_t offset = 0;
    bool not_empty_at_start = false;
    while (offset <= s.size()) {
      int rc = pcre2_match(code_, subject, s.size(), offset,
                           options | (not_empty_at_start ? PCRE2_NOTEMPTY_ATSTART : 0), data.get(),
                           nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !(options & PCRE2_NO_JIT)) {
        // Very long runs can exhaust the small default JIT stack; the
        // interpreter keeps its state on the heap instead.
        options |= PCRE2_NO_JIT;
        continue;
      }
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        return absl::InternalError(
            absl::StrCat("pcre2 match failed: ", reinterpret_cast<const char*>(message)));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
      const size_t start = ovector[0], end = ovector[1];
      if (end > start) {
        matches->emplace_back(start, end);
        offset = end;
        not_empty_at_start = false;
      } else {
        // An empty match: look again from the same place for a non-empty
        // one (Perl's iteration rule), so the loop always makes progress.
        offset = start;
        if (not_empty_at_start) {
          if (start >= s.size()) break;
          offset = start + CharLen(s, start);
          not_empty_at_start = false;
        } else {
          not_empty_at_start = true;
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

// One step of the pre-tokeniser pipeline ("Sequence" is flattened).
struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::unique_ptr<Regex> regex;  // null for ByteLevel without use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
};

}  // namespace bpe_internal

namespace {

using bpe_internal::PreTokenizerStep;
using bpe_internal::Regex;
using bpe_internal::SplitBehavior;

// Splits `piece` around the regex matches according to `behavior` and
// appends the non-empty results to `out`.
absl::Status SplitPiece(const std::string& piece, const Regex& regex, SplitBehavior behavior,
                        bool invert, std::vector<std::string>* out) {
  std::vector<std::pair<size_t, size_t>> matches;
  STRATA_RETURN_IF_ERROR(regex.FindAll(piece, &matches));
  struct Span {
    size_t begin, end;
    bool is_match;
  };
  std::vector<Span> spans;
  size_t pos = 0;
  for (const auto& [begin, end] : matches) {
    if (begin > pos) spans.push_back({pos, begin, invert});
    spans.push_back({begin, end, !invert});
    pos = end;
  }
  if (pos < piece.size()) spans.push_back({pos, piece.size(), invert});

  std::vector<std::pair<size_t, size_t>> parts;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& s : spans) parts.emplace_back(s.begin, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) parts.emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kMergedWithPrevious: {
      // A match joins the span before it, unless that one is a match too.
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !parts.empty()) {
          parts.back().second = s.end;
        } else {
          parts.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      // A match joins the span after it, unless that one is a match too.
      bool next_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !next_match && !parts.empty()) {
          parts.back().first = it->begin;
        } else {
          parts.emplace_back(it->begin, it->end);
        }
        next_match = it->is_match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      // Runs of consecutive matches become one piece.
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match && previous_match && !parts.empty()) {
          parts.back().second = s.end;
        } else {
          parts.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    }
  }
  for (const auto& [begin, end] : parts) {
    if (end > begin) out->push_back(piece.substr(begin, end - begin));
  }
  return absl::OkStatus();
}

absl::Status ParsePreTokenizer(const Json& node, const std::string& path, const std::string& field,
                               std::vector<std::unique_ptr<PreTokenizerStep>>* steps) {
  if (node.is_null()) return absl::OkStatus();
  if (!node.is_object()) return FieldError(path, field, "not an object");
  STRATA_ASSIGN_OR_RETURN(std::optional<std::string> type,
                          GetString(node, "type", path, field + "."));
  if (!type) return FieldError(path, field + ".type", "missing");
  if (*type == "Sequence") {
    const Json* list = Find(node, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return FieldError(path, field + ".pretokenizers", "missing or not a list");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      STRATA_RETURN_IF_ERROR(ParsePreTokenizer(
          (*list)[i], path, absl::StrCat(field, ".pretokenizers[", i, "]"), steps));
    }
    return absl::OkStatus();
  }
  auto step = std::make_unique<PreTokenizerStep>();
  if (*type == "Split") {
    const Json* pattern = Find(node, "pattern");
    const Json* regex = pattern != nullptr ? Find(*pattern, "Regex") : nullptr;
    const Json* literal = pattern != nullptr ? Find(*pattern, "String") : nullptr;
    const Json* text = regex != nullptr ? regex : literal;
    if (text == nullptr || !text->is_string()) {
      return FieldError(path, field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    auto compiled = Regex::Compile(text->get<std::string>(), literal == text);
    if (!compiled.ok()) {
      return FieldError(path, field + ".pattern", compiled.status().message());
    }
    step->regex = *std::move(compiled);
    STRATA_ASSIGN_OR_RETURN(std::optional<std::string> behavior,
                            GetString(node, "behavior", path, field + "."));
    if (!behavior || *behavior == "Isolated") {
      step->behavior = SplitBehavior::kIsolated;
    } else if (*behavior == "Removed") {
      step->behavior = SplitBehavior::kRemoved;
    } else if (*behavior == "MergedWithPrevious") {
      step->behavior = SplitBehavior::kMergedWithPrevious;
    } else if (*behavior == "MergedWithNext") {
      step->behavior = SplitBehavior::kMergedWithNext;
    } else if (*behavior == "Contiguous") {
      step->behavior = SplitBehavior::kContiguous;
    } else {
      return FieldError(path, field + ".behavior",
                        absl::StrCat("\"", *behavior, "\" is not supported"));
    }
    STRATA_ASSIGN_OR_RETURN(step->invert, GetBool(node, "invert", false, path, field + "."));
  } else if (*type == "Digits") {
    STRATA_ASSIGN_OR_RETURN(bool individual,
                            GetBool(node, "individual_digits", false, path, field + "."));
    STRATA_ASSIGN_OR_RETURN(step->regex, Regex::Compile(individual ? "\\p{N}" : "\\p{N}+", false));
  } else if (*type == "ByteLevel") {
    step->kind = PreTokenizerStep::Kind::kByteLevel;
    STRATA_ASSIGN_OR_RETURN(step->add_prefix_space,
                            GetBool(node, "add_prefix_space", true, path, field + "."));
    STRATA_ASSIGN_OR_RETURN(bool use_regex, GetBool(node, "use_regex", true, path, field + "."));
    if (use_regex) {
      STRATA_ASSIGN_OR_RETURN(step->regex, Regex::Compile(kGpt2Pattern, false));
    }
  } else {
    return FieldError(path, field + ".type", absl::StrCat("\"", *type, "\" is not supported"));
  }
  steps->push_back(std::move(step));
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------
// BpeTokenizer.

BpeTokenizer::BpeTokenizer() = default;
BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromJson(std::string_view json_text,
                                                                     const std::string& path) {
  std::unique_ptr<BpeTokenizer> tokenizer(new BpeTokenizer);
  STRATA_RETURN_IF_ERROR(tokenizer->Parse(json_text, path));
  return tokenizer;
}

absl::Status BpeTokenizer::Parse(std::string_view json_text, const std::string& path) {
  const Json root = Json::parse(json_text.begin(), json_text.end(), nullptr,
                                /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }

  // --- model ---
  const Json* model = Find(root, "model");
  if (model == nullptr || !model->is_object()) return FieldError(path, "model", "missing");
  STRATA_ASSIGN_OR_RETURN(std::optional<std::string> type,
                          GetString(*model, "type", path, "model."));
  if (!type) return FieldError(path, "model.type", "missing");
  if (*type != "BPE") {
    return FieldError(path, "model.type",
                      absl::StrCat("\"", *type, "\" is not supported (only \"BPE\" is)"));
  }
  STRATA_ASSIGN_OR_RETURN(bool byte_fallback,
                          GetBool(*model, "byte_fallback", false, path, "model."));
  if (byte_fallback) {
    return FieldError(path, "model.byte_fallback", "true is not supported (byte-level BPE only)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    STRATA_ASSIGN_OR_RETURN(std::optional<std::string> affix,
                            GetString(*model, key, path, "model."));
    if (affix && !affix->empty()) {
      return FieldError(path, absl::StrCat("model.", key), "is not supported");
    }
  }
  STRATA_ASSIGN_OR_RETURN(ignore_merges_, GetBool(*model, "ignore_merges", false, path, "model."));
  STRATA_ASSIGN_OR_RETURN(fuse_unk_, GetBool(*model, "fuse_unk", false, path, "model."));

  const Json* vocab = Find(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) {
    return FieldError(path, "model.vocab", "missing or not an object");
  }
  vocab_.reserve(vocab->size());
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    STRATA_ASSIGN_OR_RETURN(int32_t id, GetId(it.value(), path, "model.vocab"));
    vocab_[it.key()] = id;
    max_id = std::max<int64_t>(max_id, id);
  }

  // --- added tokens ---
  if (const Json* added = Find(root, "added_tokens"); added != nullptr && !added->is_null()) {
    if (!added->is_array()) return FieldError(path, "added_tokens", "not a list");
    for (size_t i = 0; i < added->size(); ++i) {
      const Json& entry = (*added)[i];
      const std::string where = absl::StrCat("added_tokens[", i, "]");
      const Json* id = Find(entry, "id");
      const Json* content = Find(entry, "content");
      if (id == nullptr || content == nullptr || !content->is_string()) {
        return FieldError(path, where, "needs \"id\" and a string \"content\"");
      }
      AddedToken token;
      STRATA_ASSIGN_OR_RETURN(token.id, GetId(*id, path, where + ".id"));
      token.content = content->get<std::string>();
      STRATA_ASSIGN_OR_RETURN(token.special, GetBool(entry, "special", false, path, where + "."));
      STRATA_ASSIGN_OR_RETURN(token.lstrip, GetBool(entry, "lstrip", false, path, where + "."));
      STRATA_ASSIGN_OR_RETURN(token.rstrip, GetBool(entry, "rstrip", false, path, where + "."));
      if (token.content.empty()) return FieldError(path, where + ".content", "is empty");
      max_id = std::max<int64_t>(max_id, token.id);
      added_by_id_[token.id] = added_.size();
      added_.push_back(std::move(token));
    }
  }
  // Longest first within a bucket, so the first hit is the longest match.
  added_by_first_byte_.assign(256, {});
  for (size_t i = 0; i < added_.size(); ++i) {
    added_by_first_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
  }
  for (auto& bucket : added_by_first_byte_) {
    std::stable_sort(bucket.begin(), bucket.end(), [this](size_t a, size_t b) {
      return added_[a].content.size() > added_[b].content.size();
    });
  }

  vocab_size_ = static_cast<int32_t>(max_id + 1);
  id_to_token_.assign(vocab_size_, std::string());
  id_to_bytes_.assign(vocab_size_, std::string());
  id_known_.assign(vocab_size_, false);
  for (const auto& [token, id] : vocab_) {
    id_to_token_[id] = token;
    id_to_bytes_[id] = AlphabetToBytes(token);
    id_known_[id] = true;
  }
  for (const AddedToken& token : added_) {
    id_to_token_[token.id] = token.content;
    id_to_bytes_[token.id] = token.content;
    id_known_[token.id] = true;
  }

  STRATA_ASSIGN_OR_RETURN(std::optional<std::string> unk,
                          GetString(*model, "unk_token", path, "model."));
  if (unk) {
    auto it = vocab_.find(*unk);
    if (it == vocab_.end()) return FieldError(path, "model.unk_token", "not in the vocabulary");
    unk_id_ = it->second;
  }

  // --- merges ---
  const Json* merges = Find(*model, "merges");
  if (merges == nullptr || !merges->is_array()) {
    return FieldError(path, "model.merges", "missing or not a list");
  }
  merges_.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const Json& merge = (*merges)[i];
    const std::string where = absl::StrCat("model.merges[", i, "]");
    std::string left, right;
    if (merge.is_string()) {
      // Older files: "left right"; tokens never contain a space here
      // because the byte alphabet maps it to 'Ġ'.
      const std::string& text = merge.get_ref<const std::string&>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        return FieldError(path, where, "expected \"left right\"");
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return FieldError(path, where, "expected \"left right\" or [\"left\", \"right\"]");
    }
    auto l = vocab_.find(left), r = vocab_.find(right), m = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end()) {
      return FieldError(
          path, where,
          absl::StrCat("references unknown token \"", l == vocab_.end() ? left : right, "\""));
    }
    if (m == vocab_.end()) {
      return FieldError(
          path, where, absl::StrCat("merged token \"", left, right, "\" is not in the vocabulary"));
    }
    const uint64_t key =
        (static_cast<uint64_t>(l->second) << 32) | static_cast<uint32_t>(r->second);
    // The first (highest priority) occurrence of a pair wins.
    merges_.try_emplace(key, static_cast<int32_t>(i), m->second);
  }

  // --- normalizer ---
  std::vector<const Json*> stack;
  if (const Json* normalizer = Find(root, "normalizer")) stack.push_back(normalizer);
  while (!stack.empty()) {
    const Json* node = stack.back();
    stack.pop_back();
    if (node->is_null()) continue;
    STRATA_ASSIGN_OR_RETURN(std::optional<std::string> ntype,
                            GetString(*node, "type", path, "normalizer."));
    if (!ntype) return FieldError(path, "normalizer.type", "missing");
    if (*ntype == "Sequence") {
      const Json* list = Find(*node, "normalizers");
      if (list == nullptr || !list->is_array()) {
        return FieldError(path, "normalizer.normalizers", "missing or not a list");
      }
      // Pushed in reverse so they are applied in order.
      for (auto it = list->rbegin(); it != list->rend(); ++it) stack.push_back(&*it);
    } else if (*ntype == "NFC") {
      normalizations_.push_back(Normalization::kNFC);
    } else if (*ntype == "NFD") {
      normalizations_.push_back(Normalization::kNFD);
    } else if (*ntype == "NFKC") {
      normalizations_.push_back(Normalization::kNFKC);
    } else if (*ntype == "NFKD") {
      normalizations_.push_back(Normalization::kNFKD);
    } else {
      return FieldError(path, "normalizer.type", absl::StrCat("\"", *ntype, "\" is not supported"));
    }
  }

  // --- pre_tokenizer ---
  if (const Json* pre = Find(root, "pre_tokenizer")) {
    STRATA_RETURN_IF_ERROR(ParsePreTokenizer(*pre, path, "pre_tokenizer", &pre_tokenizers_));
  }
  if (std::none_of(pre_tokenizers_.begin(), pre_tokenizers_.end(), [](const auto& step) {
        return step->kind == PreTokenizerStep::Kind::kByteLevel;
      })) {
    return FieldError(path, "pre_tokenizer",
                      "has no ByteLevel step; only byte-level BPE is supported");
  }

  // --- post_processor ---
  if (const Json* post = Find(root, "post_processor")) {
    std::vector<std::pair<const Json*, std::string>> todo = {{post, "post_processor"}};
    for (size_t n = 0; n < todo.size(); ++n) {
      const Json& node = *todo[n].first;
      const std::string field = todo[n].second;
      if (node.is_null()) continue;
      STRATA_ASSIGN_OR_RETURN(std::optional<std::string> ptype,
                              GetString(node, "type", path, field + "."));
      if (!ptype) return FieldError(path, field + ".type", "missing");
      std::vector<int32_t> prefix, suffix;
      if (*ptype == "ByteLevel") {
        // Only adjusts offsets; adds no tokens.
      } else if (*ptype == "Sequence") {
        const Json* list = Find(node, "processors");
        if (list == nullptr || !list->is_array()) {
          return FieldError(path, field + ".processors", "missing or not a list");
        }
        for (size_t i = 0; i < list->size(); ++i) {
          todo.emplace_back(&(*list)[i], absl::StrCat(field, ".processors[", i, "]"));
        }
      } else if (*ptype == "TemplateProcessing") {
        const Json* single = Find(node, "single");
        if (single == nullptr || !single->is_array()) {
          return FieldError(path, field + ".single", "missing or not a list");
        }
        const Json* specials = Find(node, "special_tokens");
        bool seen_sequence = false;
        for (size_t i = 0; i < single->size(); ++i) {
          const Json& item = (*single)[i];
          const std::string where = absl::StrCat(field, ".single[", i, "]");
          if (const Json* seq = Find(item, "Sequence")) {
            const Json* id = Find(*seq, "id");
            if (id == nullptr || !id->is_string() || id->get<std::string>() != "A") {
              return FieldError(path, where, "the single template may only use sequence A");
            }
            seen_sequence = true;
            continue;
          }
          const Json* special = Find(item, "SpecialToken");
          const Json* name = special != nullptr ? Find(*special, "id") : nullptr;
          if (name == nullptr || !name->is_string()) {
            return FieldError(path, where, "expected a SpecialToken or Sequence item");
          }
          const std::string token = name->get<std::string>();
          std::vector<int32_t> ids;
          const Json* entry = specials != nullptr ? Find(*specials, token.c_str()) : nullptr;
          const Json* entry_ids = entry != nullptr ? Find(*entry, "ids") : nullptr;
          if (entry_ids != nullptr && entry_ids->is_array()) {
            for (const Json& v : *entry_ids) {
              STRATA_ASSIGN_OR_RETURN(int32_t id, GetId(v, path, field + ".special_tokens"));
              ids.push_back(id);
            }
          } else if (std::optional<int32_t> id = TokenToId(token)) {
            ids.push_back(*id);
          } else {
            return FieldError(path, where, absl::StrCat("unknown special token \"", token, "\""));
          }
          std::vector<int32_t>& out = seen_sequence ? suffix : prefix;
          out.insert(out.end(), ids.begin(), ids.end());
        }
      } else if (*ptype == "RobertaProcessing" || *ptype == "BertProcessing") {
        for (const char* key : {"cls", "sep"}) {
          const Json* pair = Find(node, key);
          if (pair == nullptr || !pair->is_array() || pair->size() != 2) {
            return FieldError(path, absl::StrCat(field, ".", key), "expected [token, id]");
          }
          STRATA_ASSIGN_OR_RETURN(int32_t id, GetId((*pair)[1], path, field + "." + key));
          (std::strcmp(key, "cls") == 0 ? prefix : suffix).push_back(id);
        }
      } else {
        return FieldError(path, field + ".type", absl::StrCat("\"", *ptype, "\" is not supported"));
      }
      // Later processors wrap the output of earlier ones.
      prefix_ids_.insert(prefix_ids_.begin(), prefix.begin(), prefix.end());
      suffix_ids_.insert(suffix_ids_.end(), suffix.begin(), suffix.end());
    }
    for (int32_t id : prefix_ids_) {
      if (id >= vocab_size_ || !id_known_[id]) {
        return FieldError(path, "post_processor", absl::StrCat("token id ", id, " is not known"));
      }
    }
    for (int32_t id : suffix_ids_) {
      if (id >= vocab_size_ || !id_known_[id]) {
        return FieldError(path, "post_processor", absl::StrCat("token id ", id, " is not known"));
      }
    }
  }

  // --- decoder ---
  if (const Json* decoder = Find(root, "decoder"); decoder != nullptr && !decoder->is_null()) {
    STRATA_ASSIGN_OR_RETURN(std::optional<std::string> dtype,
                            GetString(*decoder, "type", path, "decoder."));
    if (!dtype || *dtype != "ByteLevel") {
      return FieldError(
          path, "decoder.type",
          absl::StrCat("\"", dtype.value_or(""), "\" is not supported (only ByteLevel)"));
    }
  }

  // Default bos: a single special token the template puts first.
  if (prefix_ids_.size() == 1) bos_id_ = prefix_ids_[0];
  return absl::OkStatus();
}

std::vector<BpeTokenizer::Segment> BpeTokenizer::SplitOnAddedTokens(std::string_view text) const {
  std::vector<Segment> segments;
  if (added_.empty()) {
    if (!text.empty()) segments.push_back({text, -1});
    return segments;
  }
  auto is_space = [](char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
  };
  size_t start = 0;  // start of the text not yet emitted
  size_t i = 0;
  while (i < text.size()) {
    const AddedToken* best = nullptr;
    for (size_t index : added_by_first_byte_[static_cast<unsigned char>(text[i])]) {
      const std::string& content = added_[index].content;
      if (text.compare(i, content.size(), content) == 0) {
        best = &added_[index];  // buckets are sorted longest first
        break;
      }
    }
    if (best == nullptr) {
      ++i;
      continue;
    }
    size_t begin = i, end = i + best->content.size();
    if (best->lstrip) {
      while (begin > start && is_space(text[begin - 1])) --begin;
    }
    if (best->rstrip) {
      while (end < text.size() && is_space(text[end])) ++end;
    }
    if (begin > start) segments.push_back({text.substr(start, begin - start), -1});
    segments.push_back({std::string_view(), best->id});
    start = i = end;
  }
  if (start < text.size()) segments.push_back({text.substr(start), -1});
  return segments;
}

absl::StatusOr<std::string> BpeTokenizer::Normalize(std::string_view text) const {
  std::string current(text);
  for (Normalization n : normalizations_) {
    int options = UTF8PROC_STABLE;
    switch (n) {
      case Normalization::kNFC:
        options |= UTF8PROC_COMPOSE;
        break;
      case Normalization::kNFD:
        options |= UTF8PROC_DECOMPOSE;
        break;
      case Normalization::kNFKC:
        options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
        break;
      case Normalization::kNFKD:
        options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
        break;
    }
    // utf8proc_map with an explicit length (the same options as
    // utf8proc_NFC & co.) so that embedded NULs survive.
    utf8proc_uint8_t* result = nullptr;
    const utf8proc_ssize_t len =
        utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(current.data()),
                     static_cast<utf8proc_ssize_t>(current.size()), &result,
                     static_cast<utf8proc_option_t>(options));
    if (len < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("normalisation failed: ", utf8proc_errmsg(len)));
    }
    current.assign(reinterpret_cast<const char*>(result), static_cast<size_t>(len));
    std::free(result);
  }
  return current;
}

absl::StatusOr<std::vector<std::string>> BpeTokenizer::PreTokenize(std::string text) const {
  std::vector<std::string> pieces;
  if (text.empty()) return pieces;
  pieces.push_back(std::move(text));
  std::vector<std::string> next;
  for (const auto& step : pre_tokenizers_) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step->kind == PreTokenizerStep::Kind::kByteLevel) {
        if (step->add_prefix_space && piece[0] != ' ') piece.insert(0, 1, ' ');
        if (step->regex == nullptr) {
          next.push_back(std::move(piece));
          continue;
        }
      }
      STRATA_RETURN_IF_ERROR(SplitPiece(piece, *step->regex, step->behavior, step->invert, &next));
    }
    pieces.swap(next);
  }
  // The byte alphabet is applied last: the regexes above must see the real
  // text (the reference applies it at the ByteLevel step, which is last in
  // every supported configuration).
  for (std::string& piece : pieces) piece = BytesToAlphabet(piece);
  return pieces;
}

std::vector<int32_t> BpeTokenizer::MergeWord(const std::string& word) const {
  struct Symbol {
    int32_t id;    // -1 once merged into its left neighbour
    int32_t prev;  // index of the previous live symbol, -1 at the start
    int32_t next;  // index of the next live symbol, -1 at the end
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  bool last_was_unk = false;
  for (size_t i = 0; i < word.size();) {
    const size_t len = CharLen(word, i);
    auto it = vocab_.find(absl::string_view(word.data() + i, len));
    i += len;
    int32_t id;
    if (it != vocab_.end()) {
      id = it->second;
      last_was_unk = false;
    } else if (unk_id_) {
      if (fuse_unk_ && last_was_unk) continue;
      id = *unk_id_;
      last_was_unk = true;
    } else {
      continue;  // no unknown token: the character is dropped
    }
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1});
    if (index > 0) symbols[index - 1].next = index;
  }

  // Candidate merges, best rank first and leftmost first among equal ranks.
  // Entries go stale as neighbours merge; they are checked when popped.
  struct Candidate {
    int32_t rank, pos, left_id, right_id, merged_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    const uint64_t key =
        (static_cast<uint64_t>(symbols[left].id) << 32) | static_cast<uint32_t>(symbols[right].id);
    auto it = merges_.find(key);
    if (it == merges_.end()) return;
    queue.push({it->second.first, left, symbols[left].id, symbols[right].id, it->second.second});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.id != top.left_id || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    if (right.id != top.right_id) continue;
    left.id = top.merged_id;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }

  std::vector<int32_t> ids;
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    ids.push_back(symbols[i].id);
  }
  return ids;
}

void BpeTokenizer::EncodeWord(const std::string& word, std::vector<int32_t>* ids) const {
  if (ignore_merges_) {
    // Llama-3: a word that is itself a token is taken whole, even when the
    // merges would not build it.
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    absl::ReaderMutexLock lock(&cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> merged = MergeWord(word);
  ids->insert(ids->end(), merged.begin(), merged.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();
    cache_.emplace(word, std::move(merged));
  }
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text,
                                                          bool add_special_tokens) const {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("Encode: text is not valid UTF-8");
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  for (const Segment& segment : SplitOnAddedTokens(text)) {
    if (segment.added_id >= 0) {
      ids.push_back(segment.added_id);
      continue;
    }
    STRATA_ASSIGN_OR_RETURN(std::string normalized, Normalize(segment.text));
    STRATA_ASSIGN_OR_RETURN(std::vector<std::string> words, PreTokenize(std::move(normalized)));
    for (const std::string& word : words) EncodeWord(word, &ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

absl::StatusOr<std::string> BpeTokenizer::Decode(const std::vector<int32_t>& ids,
                                                 bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size_ || !id_known_[id]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Decode: token id ", id, " is outside the vocabulary (size ", vocab_size_, ")"));
    }
    if (skip_special_tokens && IsSpecial(id)) continue;
    bytes += id_to_bytes_[id];
  }
  std::string text;
  text.reserve(bytes.size());
  AppendValidUtf8(bytes, /*hold_incomplete=*/false, &text);
  return text;
}

std::string BpeTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size_) return std::string();
  return id_to_bytes_[id];
}

bool BpeTokenizer::IsSpecial(int32_t id) const {
  auto it = added_by_id_.find(id);
  return it != added_by_id_.end() && added_[it->second].special;
}

std::optional<int32_t> BpeTokenizer::TokenToId(std::string_view token) const {
  for (const AddedToken& added : added_) {
    if (added.content == token) return added.id;
  }
  auto it = vocab_.find(AsAbsl(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

}  // namespace strata::engine
