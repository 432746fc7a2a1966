#include "engine/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace strata::engine {
namespace {

TEST(SamplerTest, GreedyPicksArgmaxWithLogprob) {
  Sampler s({0.0f, 0, 1.0f, 0});
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f};
  const SampledToken t = s.Sample(logits);
  EXPECT_EQ(t.id, 1);
  const double z = std::log(std::exp(1.0) + std::exp(3.0) + std::exp(2.0));
  EXPECT_NEAR(t.logprob, 3.0 - z, 1e-6);
}

TEST(SamplerTest, SeedReproducesAndDistributionFollowsProbabilities) {
  const std::vector<float> logits = {0.0f, std::log(3.0f), -100.0f};
  Sampler a({1.0f, 0, 1.0f, 42}), b({1.0f, 0, 1.0f, 42});
  std::map<int, int> counts;
  for (int i = 0; i < 4000; ++i) {
    const int x = a.Sample(logits).id;
    EXPECT_EQ(x, b.Sample(logits).id);
    ++counts[x];
  }
  EXPECT_NEAR(counts[1] / 4000.0, 0.75, 0.03);
  EXPECT_EQ(counts[2], 0);
}

TEST(SamplerTest, TopKAndTopPRestrictTheSet) {
  const std::vector<float> logits = {2.0f, 1.9f, 1.8f, 0.0f, -1.0f};
  Sampler k({1.0f, 2, 1.0f, 1});
  for (int i = 0; i < 500; ++i) EXPECT_LT(k.Sample(logits).id, 2);
  // p(0) ~ 0.33, p(0)+p(1) ~ 0.63: top_p 0.5 keeps tokens 0 and 1.
  Sampler p({1.0f, 0, 0.5f, 1});
  for (int i = 0; i < 500; ++i) EXPECT_LT(p.Sample(logits).id, 2);
  // Logprob stays that of the unmodified distribution.
  Sampler hot({5.0f, 0, 1.0f, 3});
  const SampledToken t = hot.Sample(logits);
  double z = 0;
  for (float l : logits) z += std::exp(l);
  EXPECT_NEAR(t.logprob, logits[t.id] - std::log(z), 1e-5);
}

TEST(SamplerTest, ValidateNamesTheField) {
  EXPECT_FALSE(SamplingParams({-0.5f, 0, 1.0f, 0}).Validate().ok());
  EXPECT_FALSE(SamplingParams({1.0f, -1, 1.0f, 0}).Validate().ok());
  EXPECT_FALSE(SamplingParams({1.0f, 0, 1.5f, 0}).Validate().ok());
  EXPECT_FALSE(SamplingParams({NAN, 0, 1.0f, 0}).Validate().ok());
  EXPECT_TRUE(SamplingParams({0.7f, 40, 0.9f, 0}).Validate().ok());
}

}  // namespace
}  // namespace strata::engine
