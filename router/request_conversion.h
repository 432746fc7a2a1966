// Turning a public GenerateRequest into an engine request, with the
// validation the router owes every caller: each bad field is an
// InvalidArgument error whose message names the field.
//
// Thread-safety: pure functions over immutable inputs.
#ifndef STRATA_ROUTER_REQUEST_CONVERSION_H_
#define STRATA_ROUTER_REQUEST_CONVERSION_H_

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/batcher.h"
#include "engine/tokenizer.h"
#include "strata/v1/generate.pb.h"

namespace strata::router {

// The largest prompt text a request may carry.
inline constexpr size_t kMaxTextBytes = size_t{16} << 20;
// The largest serialized request by default: the largest text plus room
// for the other fields.
inline constexpr size_t kDefaultMaxRequestBytes = kMaxTextBytes + (size_t{1} << 20);
// The most stop token ids a request may give.
inline constexpr int kMaxStopTokenIds = 1024;

// What a request may ask for on this server.
struct RequestLimits {
  int context_length = 0;  // prompt + completion tokens
  int vocab_size = 0;
  int default_max_tokens = 256;
  // The largest serialized request this server reads (gRPC's own receive
  // limit is set from it, see transport_options.h).
  size_t max_request_bytes = kDefaultMaxRequestBytes;
  // The longest text one token stands for (MaxTokenBytes): a prompt longer
  // than the context allows is refused before it is tokenized. 0: unknown.
  int max_token_bytes = 0;
  // Names a request may give; a request's profile becomes its
  // GenerationRequest::kv_policy, the index in this list (0: the default).
  std::vector<std::string> profiles;
};

// Validates `request` and builds the engine request (without its id).
// `tokenizer` may be null (then text input is refused).
absl::StatusOr<engine::GenerationRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                          const engine::Tokenizer* tokenizer,
                                                          const RequestLimits& limits);

// Validates a Tokenize request and tokenizes its text.
absl::StatusOr<std::vector<int32_t>> TokenizeText(const v1::TokenizeRequest& request,
                                                  const engine::Tokenizer* tokenizer);

// The most bytes of text any one token of `tokenizer` decodes to (special
// tokens included), for RequestLimits::max_token_bytes.
int MaxTokenBytes(const engine::Tokenizer& tokenizer);

// At most `max_bytes` of user input, escaped, for an error message: a
// request's bytes are quoted back bounded and printable.
std::string QuoteUserInput(std::string_view input, size_t max_bytes = 64);

v1::FinishReason ToProtoFinishReason(engine::FinishReason reason);

}  // namespace strata::router

#endif  // STRATA_ROUTER_REQUEST_CONVERSION_H_
