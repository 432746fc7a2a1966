// Turning a public GenerateRequest into an engine request, with the
// validation the router owes every caller: each bad field is an
// InvalidArgument error whose message names the field.
//
// Thread-safety: pure functions over immutable inputs.
#ifndef STRATA_ROUTER_REQUEST_CONVERSION_H_
#define STRATA_ROUTER_REQUEST_CONVERSION_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/batcher.h"
#include "engine/tokenizer.h"
#include "strata/v1/generate.pb.h"

namespace strata::router {

// What a request may ask for on this server.
struct RequestLimits {
  int context_length = 0;  // prompt + completion tokens
  int vocab_size = 0;
  int default_max_tokens = 256;
  // Names a request may give; a request's profile becomes its
  // GenerationRequest::kv_policy, the index in this list (0: the default).
  std::vector<std::string> profiles;
};

// Validates `request` and builds the engine request (without its id).
// `tokenizer` may be null (then text input is refused).
absl::StatusOr<engine::GenerationRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                          const engine::Tokenizer* tokenizer,
                                                          const RequestLimits& limits);

v1::FinishReason ToProtoFinishReason(engine::FinishReason reason);

}  // namespace strata::router

#endif  // STRATA_ROUTER_REQUEST_CONVERSION_H_
