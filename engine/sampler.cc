#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"

namespace strata::engine {

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature) || temperature > 100.0f) {
    return absl::InvalidArgumentError(absl::StrCat("temperature must be in [0, 100], got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  return absl::OkStatus();
}

SampledToken Sampler::Sample(std::span<const float> logits) {
  const int n = static_cast<int>(logits.size());
  // log-softmax of the raw logits, for the reported logprob.
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - max_logit));
  const double log_z = max_logit + std::log(sum);
  auto logprob = [&](int id) { return static_cast<float>(logits[id] - log_z); };

  if (params_.temperature == 0.0f) {
    // Ties go to the lowest id, as torch.argmax does.
    const int id = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    return {id, logprob(id)};
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  const int k = params_.top_k > 0 ? std::min(params_.top_k, n) : n;
  auto by_logit = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), by_logit);
  order.resize(k);
  std::vector<double> probs(k);
  const double inv_t = 1.0 / params_.temperature;
  double total = 0;
  for (int i = 0; i < k; ++i) {
    probs[i] = std::exp((logits[order[i]] - max_logit) * inv_t);
    total += probs[i];
  }
  // Nucleus: keep the smallest prefix whose mass reaches top_p.
  int keep = k;
  if (params_.top_p < 1.0f) {
    double mass = 0;
    for (int i = 0; i < k; ++i) {
      mass += probs[i] / total;
      if (mass >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept_total = 0;
  for (int i = 0; i < keep; ++i) kept_total += probs[i];
  std::uniform_real_distribution<double> uniform(0.0, kept_total);
  double u = uniform(rng_);
  int chosen = order[keep - 1];
  for (int i = 0; i < keep; ++i) {
    if (u < probs[i]) {
      chosen = order[i];
      break;
    }
    u -= probs[i];
  }
  return {chosen, logprob(chosen)};
}

}  // namespace strata::engine
