// Inputs and helpers the KV-tier tests share: random prompts, the small
// ClusterKV configuration that clusters llama_gqa's short prompts (a few
// dozen clusters, a budget well below the context), and serving one
// request to its end.
#ifndef STRATA_TESTS_KVTIER_KV_TEST_UTIL_H_
#define STRATA_TESTS_KVTIER_KV_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <vector>

#include "engine/batcher.h"
#include "gtest/gtest.h"
#include "kvtier/kv_policy.h"

namespace strata::testing_util {

// `len` token ids in [3, 503), the same for the same seed.
inline std::vector<int32_t> RandomPrompt(int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(len);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 500) + 3;
  return p;
}

// ClusterKV over 8-token clusters, a 24-token budget, 4 sinks, a 16-token
// window and the first layer dense.
inline kvtier::KvPolicyConfig SmallClusterKv() {
  kvtier::KvPolicyConfig c;
  c.type = "clusterkv";
  c.budget_tokens = 24;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.tokens_per_cluster = 8;
  c.full_layers = 1;
  return c;
}

inline std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A request served alone: its tokens, and how many of its prompt's tokens
// came from a stored prefix.
struct Served {
  std::vector<int32_t> tokens;
  int cached = 0;
};

inline Served Serve(engine::Batcher& batcher, const engine::GenerationRequest& r) {
  EXPECT_TRUE(batcher.Add(r).ok());
  Served out;
  for (int step = 0; batcher.HasWork() && step < 10000; ++step) {
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) {
      out.tokens.push_back(e.token_id);
      if (e.finish != engine::FinishReason::kNone) out.cached = e.cached_tokens;
    }
  }
  return out;
}

}  // namespace strata::testing_util

#endif  // STRATA_TESTS_KVTIER_KV_TEST_UTIL_H_
