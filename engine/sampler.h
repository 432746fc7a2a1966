// Sampling parameters of a request and the sampled token.
//
// Greedy when temperature is 0 (ties to the lowest id, like torch.argmax);
// otherwise softmax(logits / temperature) restricted to the top_k most likely
// tokens, then to the smallest prefix of them (descending probability, ties
// by lower id) whose renormalised mass reaches top_p, drawn from the
// renormalised kept set. The draw is a function of (seed, counter) only,
// where the counter is the number of tokens the sequence has generated, so a
// seed reproduces a completion whatever else is batched. The reported
// logprob is the chosen token's log-probability under the model's unmodified
// distribution (log_softmax of the raw logits).
//
// Backend::SampleTokens (engine/backend.h) implements this on the device;
// the CPU backend's operator is the reference.
#ifndef STRATA_ENGINE_SAMPLER_H_
#define STRATA_ENGINE_SAMPLER_H_

#include <cstdint>

#include "absl/status/status.h"

namespace strata::engine {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: all tokens
  float top_p = 1.0f;        // 1: no nucleus cut
  uint64_t seed = 0;

  // InvalidArgument naming the field when a value is out of range.
  absl::Status Validate() const;
};

// One row of a sampling step: the sequence's parameters and its counter.
struct SamplingRow {
  SamplingParams params;
  uint32_t counter = 0;  // tokens generated so far by the sequence
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_SAMPLER_H_
