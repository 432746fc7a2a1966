// Sampling the next token from a row of logits.
//
// Greedy when temperature is 0; otherwise softmax(logits / temperature)
// restricted to the top_k most likely tokens and then to the smallest set
// whose probability reaches top_p, drawn with the sequence's own seeded
// generator (so a seed reproduces a completion whatever else is batched).
// The reported logprob is the chosen token's log-probability under the
// model's unmodified distribution (before temperature, top-k and top-p).
//
// Thread-safety: a Sampler belongs to one sequence.
#ifndef STRATA_ENGINE_SAMPLER_H_
#define STRATA_ENGINE_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>

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

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

  SampledToken Sample(std::span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_SAMPLER_H_
