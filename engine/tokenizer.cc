#include "engine/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/bpe_tokenizer.h"
#include "engine/mapped_file.h"
#include "engine/sentencepiece_tokenizer.h"
#include "nlohmann/json.hpp"

namespace strata::engine {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

// Whether `path` names something (following symlinks). Whatever is there is
// then read with ReadFileToString, which refuses anything but a regular file
// (a FIFO, device or directory) with an error naming the path, so a
// tokenizer.json that is not a file is reported rather than skipped.
bool Exists(const fs::path& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

absl::StatusOr<Json> ReadJsonObject(const std::string& path) {
  STRATA_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  Json json = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return json;
}

// What tokenizer_config.json and generation_config.json say about the
// special tokens. Absent keys leave the tokenizer's own defaults.
struct SpecialTokenConfig {
  std::string config_path;
  bool has_bos = false;
  std::optional<std::string> bos_token;  // nullopt with has_bos: no bos
  bool has_eos = false;
  std::optional<std::string> eos_token;
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  std::string generation_path;
  std::vector<int64_t> generation_eos_ids;
};

// A token field is a string, an AddedToken object {"content": ...}, or null.
absl::Status ReadTokenField(const Json& config, const char* key, const std::string& path,
                            bool* present, std::optional<std::string>* token) {
  auto it = config.find(key);
  if (it == config.end()) return absl::OkStatus();
  *present = true;
  if (it->is_null()) return absl::OkStatus();
  if (it->is_string()) {
    *token = it->get<std::string>();
    return absl::OkStatus();
  }
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      *token = content->get<std::string>();
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": ", key, ": expected a string, {\"content\": ...} or null"));
}

absl::Status ReadOptionalBool(const Json& config, const char* key, const std::string& path,
                              std::optional<bool>* value) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, ": not a boolean"));
  }
  *value = it->get<bool>();
  return absl::OkStatus();
}

absl::StatusOr<SpecialTokenConfig> ReadSpecialTokenConfig(const fs::path& dir) {
  SpecialTokenConfig config;
  config.config_path = (dir / "tokenizer_config.json").string();
  if (Exists(config.config_path)) {
    STRATA_ASSIGN_OR_RETURN(Json json, ReadJsonObject(config.config_path));
    STRATA_RETURN_IF_ERROR(
        ReadTokenField(json, "bos_token", config.config_path, &config.has_bos, &config.bos_token));
    STRATA_RETURN_IF_ERROR(
        ReadTokenField(json, "eos_token", config.config_path, &config.has_eos, &config.eos_token));
    STRATA_RETURN_IF_ERROR(
        ReadOptionalBool(json, "add_bos_token", config.config_path, &config.add_bos_token));
    STRATA_RETURN_IF_ERROR(
        ReadOptionalBool(json, "add_eos_token", config.config_path, &config.add_eos_token));
  }
  config.generation_path = (dir / "generation_config.json").string();
  if (Exists(config.generation_path)) {
    STRATA_ASSIGN_OR_RETURN(Json json, ReadJsonObject(config.generation_path));
    auto it = json.find("eos_token_id");
    if (it != json.end() && !it->is_null()) {
      // Either one id or a list of them (Llama-3 lists eot_id too).
      std::vector<const Json*> values;
      if (it->is_array()) {
        for (const Json& v : *it) values.push_back(&v);
      } else {
        values.push_back(&*it);
      }
      for (const Json* v : values) {
        if (!v->is_number_integer()) {
          return absl::InvalidArgumentError(absl::StrCat(
              config.generation_path, ": eos_token_id: expected an integer or a list of them"));
        }
        // Ids past int64 (JSON unsigned) or int32 are refused here, not
        // truncated; the vocabulary check follows once the tokenizer is
        // loaded.
        if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t{INT32_MAX}) {
          return absl::InvalidArgumentError(absl::StrCat(config.generation_path, ": eos_token_id ",
                                                         v->get<uint64_t>(),
                                                         " is outside [0, 2147483647]"));
        }
        const int64_t id = v->get<int64_t>();
        if (id < 0 || id > INT32_MAX) {
          return absl::InvalidArgumentError(absl::StrCat(config.generation_path, ": eos_token_id ",
                                                         id, " is outside [0, 2147483647]"));
        }
        config.generation_eos_ids.push_back(id);
      }
    }
  }
  return config;
}

// Applies the configured bos/eos to a freshly loaded tokenizer (either
// implementation; both have the same two setters).
template <typename T>
absl::Status ApplySpecialTokens(const SpecialTokenConfig& config, T* tokenizer) {
  auto lookup = [&](const std::string& token, const char* key) -> absl::StatusOr<int32_t> {
    std::optional<int32_t> id = tokenizer->TokenToId(token);
    if (!id) {
      return absl::InvalidArgumentError(absl::StrCat(config.config_path, ": ", key, ": \"", token,
                                                     "\" is not in the vocabulary"));
    }
    return *id;
  };
  if (config.has_bos) {
    std::optional<int32_t> bos;
    if (config.bos_token) {
      STRATA_ASSIGN_OR_RETURN(bos, lookup(*config.bos_token, "bos_token"));
    }
    tokenizer->set_bos_id(bos);
  }
  std::vector<int32_t> eos = tokenizer->eos_ids();
  if (config.has_eos) {
    eos.clear();
    if (config.eos_token) {
      STRATA_ASSIGN_OR_RETURN(int32_t id, lookup(*config.eos_token, "eos_token"));
      eos.push_back(id);
    }
  }
  for (int64_t id : config.generation_eos_ids) {
    if (id < 0 || id >= tokenizer->vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(config.generation_path, ": eos_token_id ", id,
                                                     " is outside the vocabulary (size ",
                                                     tokenizer->vocab_size(), ")"));
    }
    if (std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(static_cast<int32_t>(id));
  }
  tokenizer->set_eos_ids(std::move(eos));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir) {
  std::error_code ec;
  const fs::path dir(model_dir);
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(model_dir, ": no such model directory"));
  }
  STRATA_ASSIGN_OR_RETURN(SpecialTokenConfig config, ReadSpecialTokenConfig(dir));

  const std::string json_path = (dir / "tokenizer.json").string();
  if (Exists(json_path)) {
    STRATA_ASSIGN_OR_RETURN(std::string text, ReadFileToString(json_path));
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<BpeTokenizer> tokenizer,
                            BpeTokenizer::FromJson(text, json_path));
    // add_bos_token is not consulted here: for tokenizer.json the post
    // processor's template decides what add_special_tokens adds.
    STRATA_RETURN_IF_ERROR(ApplySpecialTokens(config, tokenizer.get()));
    return std::unique_ptr<Tokenizer>(std::move(tokenizer));
  }

  const std::string model_path = (dir / "tokenizer.model").string();
  if (Exists(model_path)) {
    STRATA_ASSIGN_OR_RETURN(std::string proto, ReadFileToString(model_path));
    SentencePieceTokenizer::Options options;
    options.add_bos = config.add_bos_token.value_or(true);
    options.add_eos = config.add_eos_token.value_or(false);
    STRATA_ASSIGN_OR_RETURN(
        std::unique_ptr<SentencePieceTokenizer> tokenizer,
        SentencePieceTokenizer::FromSerializedProto(proto, model_path, options));
    STRATA_RETURN_IF_ERROR(ApplySpecialTokens(config, tokenizer.get()));
    return std::unique_ptr<Tokenizer>(std::move(tokenizer));
  }
  return absl::NotFoundError(
      absl::StrCat(model_dir, ": neither tokenizer.json nor tokenizer.model is present"));
}

// ---------------------------------------------------------------------------
// IncrementalDetokenizer.

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDetokenizer::Push(int32_t id) {
  const bool special = tokenizer_->IsSpecial(id);
  if (special && skip_special_tokens_) return std::string();
  std::string bytes = tokenizer_->TokenBytes(id);
  // SentencePiece's dummy prefix: the first real token's leading space is an
  // artefact of encoding, not text. Special tokens (e.g. a leading bos) do
  // not count as the first token, matching the sentencepiece decoder.
  if (at_start_ && !special) {
    at_start_ = false;
    if (tokenizer_->StripsLeadingSpace() && !bytes.empty() && bytes[0] == ' ') bytes.erase(0, 1);
  }
  pending_ += bytes;
  std::string out;
  const size_t consumed = AppendValidUtf8(pending_, /*hold_incomplete=*/true, &out);
  pending_.erase(0, consumed);
  return out;
}

std::string IncrementalDetokenizer::Flush() {
  std::string out;
  AppendValidUtf8(pending_, /*hold_incomplete=*/false, &out);
  pending_.clear();
  return out;
}

}  // namespace strata::engine
