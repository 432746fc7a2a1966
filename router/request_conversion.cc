#include "router/request_conversion.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace strata::router {
namespace {

constexpr size_t kMaxRequestIdBytes = 128;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 256;
// Normalisation (NFKC, NFC) can shrink text before it is split into
// tokens, by at most 4 bytes to 1 (a 4-byte character to an ASCII letter);
// the early length check allows for it.
constexpr int64_t kMaxNormalizationShrink = 4;

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

}  // namespace

absl::StatusOr<engine::GenerationRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                          const engine::Tokenizer* tokenizer,
                                                          const RequestLimits& limits) {
  engine::GenerationRequest out;
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return Bad("request_id", absl::StrCat("longer than ", kMaxRequestIdBytes, " bytes"));
  }
  if (!request.profile().empty() && std::find(limits.profiles.begin(), limits.profiles.end(),
                                              request.profile()) == limits.profiles.end()) {
    return Bad("profile", absl::StrCat("unknown profile ", QuoteUserInput(request.profile()),
                                       " (available: ", absl::StrJoin(limits.profiles, ", "), ")"));
  }
  // The engine knows a profile by its index (profiles[0] is the default).
  if (!request.profile().empty()) {
    out.kv_policy = static_cast<int32_t>(
        std::find(limits.profiles.begin(), limits.profiles.end(), request.profile()) -
        limits.profiles.begin());
  }
  switch (request.input_case()) {
    case v1::GenerateRequest::kText: {
      if (request.text().empty()) return Bad("text", "the prompt is empty");
      if (request.text().size() > kMaxTextBytes) {
        return Bad("text", absl::StrCat("the prompt is ", request.text().size(), " bytes; at most ",
                                        kMaxTextBytes));
      }
      if (tokenizer == nullptr) return Bad("text", "this server has no tokenizer; send token_ids");
      // Tokenizing megabytes takes a while: refuse at once a text too long
      // to fit in the context whatever its tokens.
      if (limits.max_token_bytes > 0 &&
          static_cast<int64_t>(request.text().size()) >
              int64_t{limits.context_length} * limits.max_token_bytes * kMaxNormalizationShrink) {
        return Bad("text", absl::StrCat("the prompt is ", request.text().size(),
                                        " bytes, more than the context length ",
                                        limits.context_length, " tokens can hold"));
      }
      const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
      auto ids = tokenizer->Encode(request.text(), add_special);
      if (!ids.ok()) return Bad("text", std::string(ids.status().message()));
      out.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      if (request.token_ids().ids().empty()) return Bad("token_ids", "the prompt is empty");
      if (request.token_ids().ids_size() >= limits.context_length) {
        return Bad("token_ids",
                   absl::StrCat("the prompt has ", request.token_ids().ids_size(),
                                " tokens; the context length is ", limits.context_length));
      }
      for (int32_t id : request.token_ids().ids()) {
        if (id < 0 || id >= limits.vocab_size) {
          return Bad("token_ids", absl::StrCat("id ", id, " is outside the vocabulary [0, ",
                                               limits.vocab_size, ")"));
        }
      }
      out.prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    }
    default:
      return Bad("input", "set text or token_ids");
  }
  if (static_cast<int>(out.prompt.size()) >= limits.context_length) {
    return Bad(request.input_case() == v1::GenerateRequest::kText ? "text" : "token_ids",
               absl::StrCat("the prompt has ", out.prompt.size(), " tokens; the context length is ",
                            limits.context_length));
  }

  const v1::SamplingParams& s = request.sampling();
  out.sampling.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  out.sampling.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  out.sampling.top_k = s.has_top_k() ? s.top_k() : 0;
  out.sampling.seed = s.has_seed() ? s.seed() : 0;
  if (!std::isfinite(out.sampling.temperature) || out.sampling.temperature < 0 ||
      out.sampling.temperature > 100) {
    return Bad("sampling.temperature",
               absl::StrCat("must be in [0, 100], got ", out.sampling.temperature));
  }
  if (!(out.sampling.top_p > 0 && out.sampling.top_p <= 1)) {
    return Bad("sampling.top_p", absl::StrCat("must be in (0, 1], got ", out.sampling.top_p));
  }
  if (out.sampling.top_k < 0)
    return Bad("sampling.top_k", absl::StrCat("must be >= 0, got ", out.sampling.top_k));

  const v1::StoppingCriteria& stop = request.stopping();
  const int room = limits.context_length - static_cast<int>(out.prompt.size());
  if (stop.has_max_tokens()) {
    if (stop.max_tokens() == 0) return Bad("stopping.max_tokens", "must be at least 1");
    if (stop.max_tokens() >= static_cast<uint32_t>(limits.context_length)) {
      return Bad("stopping.max_tokens",
                 absl::StrCat("must be in [1, ", limits.context_length,
                              "), the context length; got ", stop.max_tokens()));
    }
    out.max_tokens = static_cast<int>(stop.max_tokens());
  } else {
    out.max_tokens = limits.default_max_tokens;
  }
  // The context bounds the completion: generation ends with "length" there.
  out.max_tokens = std::min(out.max_tokens, room);
  if (stop.stop_size() > kMaxStopStrings) {
    return Bad("stopping.stop", absl::StrCat("at most ", kMaxStopStrings, " stop strings"));
  }
  for (const std::string& str : stop.stop()) {
    if (str.empty() || str.size() > kMaxStopStringBytes) {
      return Bad("stopping.stop",
                 absl::StrCat("each stop string must be 1..", kMaxStopStringBytes, " bytes"));
    }
    if (tokenizer == nullptr) return Bad("stopping.stop", "this server has no tokenizer");
    out.stop_strings.push_back(str);
  }
  if (stop.stop_token_ids_size() > kMaxStopTokenIds) {
    return Bad("stopping.stop_token_ids", absl::StrCat("at most ", kMaxStopTokenIds, " ids, got ",
                                                       stop.stop_token_ids_size()));
  }
  for (int32_t id : stop.stop_token_ids()) {
    if (id < 0 || id >= limits.vocab_size) {
      return Bad("stopping.stop_token_ids", absl::StrCat("id ", id, " is outside the vocabulary"));
    }
    out.stop_token_ids.push_back(id);
  }
  out.ignore_eos = stop.ignore_eos();
  return out;
}

absl::StatusOr<std::vector<int32_t>> TokenizeText(const v1::TokenizeRequest& request,
                                                  const engine::Tokenizer* tokenizer) {
  if (tokenizer == nullptr) {
    return absl::FailedPreconditionError("this server has no tokenizer");
  }
  if (request.text().size() > kMaxTextBytes) {
    return Bad("text", absl::StrCat("the text is ", request.text().size(), " bytes; at most ",
                                    kMaxTextBytes));
  }
  const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
  auto ids = tokenizer->Encode(request.text(), add_special);
  if (!ids.ok()) return Bad("text", std::string(ids.status().message()));
  return ids;
}

int MaxTokenBytes(const engine::Tokenizer& tokenizer) {
  size_t longest = 1;
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    longest = std::max(longest, tokenizer.TokenBytes(id).size());
  }
  return static_cast<int>(std::min<size_t>(longest, 1 << 20));
}

std::string QuoteUserInput(std::string_view input, size_t max_bytes) {
  std::string out = absl::StrCat(
      "\"", absl::CHexEscape(absl::string_view(input.data(), std::min(input.size(), max_bytes))),
      "\"");
  if (input.size() > max_bytes) absl::StrAppend(&out, "... (", input.size(), " bytes)");
  return out;
}

v1::FinishReason ToProtoFinishReason(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kNone:
      return v1::FINISH_REASON_UNSPECIFIED;
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_ERROR;
}

}  // namespace strata::router
