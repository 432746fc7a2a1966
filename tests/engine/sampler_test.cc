// The sampling semantics (engine/sampler.h), checked on the CPU backend's
// SampleTokens operator, the reference the CUDA kernel is compared with.
#include "engine/sampler.h"

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu_backend.h"
#include "engine/sample_math.h"
#include "gtest/gtest.h"

namespace strata::engine {
namespace {

SamplingRow Row(float temperature, int top_k, float top_p, uint64_t seed, uint32_t counter) {
  return {{temperature, top_k, top_p, seed}, counter};
}

double LogSumExp(const std::vector<float>& l) {
  double m = l[0];
  for (float v : l) m = std::max<double>(m, v);
  double s = 0;
  for (float v : l) s += std::exp(v - m);
  return m + std::log(s);
}

class SampleTokensTest : public ::testing::Test {
 protected:
  SampleTokensTest() : backend_(CreateCpuBackend(2)) {}

  // Samples each row of `logits` ([rows.size(), V] row-major).
  absl::StatusOr<std::vector<SampledToken>> Sample(const std::vector<float>& logits,
                                                   const std::vector<SamplingRow>& rows) {
    const int64_t r = static_cast<int64_t>(rows.size());
    const int64_t v = r == 0 ? 1 : static_cast<int64_t>(logits.size()) / r;
    absl::StatusOr<Tensor> l = backend_->Allocate(DType::kF32, {r, v});
    absl::StatusOr<Tensor> p = backend_->Allocate(DType::kI32, {r, kSamplingFields});
    absl::StatusOr<Tensor> ids = backend_->Allocate(DType::kI32, {r});
    absl::StatusOr<Tensor> lp = backend_->Allocate(DType::kF32, {r});
    if (!l.ok() || !p.ok() || !ids.ok() || !lp.ok()) return absl::InternalError("allocation");
    if (absl::Status s = backend_->CopyFromHost(logits.data(), DType::kF32, r * v, *l, 0);
        !s.ok()) {
      return s;
    }
    SamplingTable table;
    table.host_params = EncodeSamplingRows(rows);
    table.params = *p;
    if (absl::Status s = backend_->CopyFromHost(table.host_params.data(), DType::kI32,
                                                r * kSamplingFields, table.params, 0);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = backend_->SampleTokens(*l, table, *ids, *lp); !s.ok()) return s;
    std::vector<int32_t> host_ids(r);
    std::vector<float> host_lp(r);
    if (absl::Status s = backend_->CopyToHost(*ids, host_ids.data()); !s.ok()) return s;
    if (absl::Status s = backend_->CopyToHost(*lp, host_lp.data()); !s.ok()) return s;
    std::vector<SampledToken> out(r);
    for (int64_t i = 0; i < r; ++i) out[i] = {host_ids[i], host_lp[i]};
    return out;
  }

  // One logits row sampled at counters [0, n): the ids drawn.
  std::vector<int32_t> Draws(const std::vector<float>& logits, SamplingParams params, int n) {
    std::vector<float> all;
    std::vector<SamplingRow> rows;
    for (int c = 0; c < n; ++c) {
      all.insert(all.end(), logits.begin(), logits.end());
      rows.push_back({params, static_cast<uint32_t>(c)});
    }
    absl::StatusOr<std::vector<SampledToken>> t = Sample(all, rows);
    EXPECT_TRUE(t.ok()) << t.status();
    std::vector<int32_t> ids;
    if (t.ok()) {
      for (const SampledToken& s : *t) ids.push_back(s.id);
    }
    return ids;
  }

  std::unique_ptr<Backend> backend_;
};

TEST_F(SampleTokensTest, GreedyIsArgmaxWithTiesToLowestIdAndLogprobIsLogSoftmax) {
  const std::vector<float> a = {1.0f, 3.0f, 2.0f, 3.0f};
  const std::vector<float> b = {-1.0f, -0.0f, 0.0f, -2.0f};  // -0 and +0 tie
  std::vector<float> both = a;
  both.insert(both.end(), b.begin(), b.end());
  auto t = Sample(both, {Row(0, 0, 1, 0, 0), Row(0, 0, 1, 0, 0)});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)[0].id, 1);
  EXPECT_NEAR((*t)[0].logprob, 3.0 - LogSumExp(a), 1e-6);
  EXPECT_EQ((*t)[1].id, 1);
  EXPECT_NEAR((*t)[1].logprob, 0.0 - LogSumExp(b), 1e-6);
}

TEST_F(SampleTokensTest, LogprobIsThatOfTheUnmodifiedDistribution) {
  const std::vector<float> l = {2.0f, 1.9f, 1.8f, 0.0f, -1.0f};
  for (uint32_t c = 0; c < 20; ++c) {
    auto t = Sample(l, {Row(5.0f, 3, 0.9f, 3, c)});
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_NEAR((*t)[0].logprob, l[(*t)[0].id] - LogSumExp(l), 1e-6);
  }
}

TEST_F(SampleTokensTest, TopK1AndTinyTopPEqualGreedy) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> l(1000);
  for (float& v : l) v = normal(rng);
  const int argmax = static_cast<int>(std::max_element(l.begin(), l.end()) - l.begin());
  for (int id : Draws(l, {1.5f, 1, 1.0f, 11}, 300)) EXPECT_EQ(id, argmax);
  for (int id : Draws(l, {1.5f, 0, 1e-6f, 12}, 300)) EXPECT_EQ(id, argmax);
}

TEST_F(SampleTokensTest, SameSeedAndCounterDrawTheSameTokenWhateverIsBatched) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::vector<float> l(64);
  for (float& v : l) v = uniform(rng);
  const SamplingRow row = Row(1.0f, 0, 1.0f, 99, 5);
  auto alone = Sample(l, {row});
  ASSERT_TRUE(alone.ok());
  std::vector<float> batch;
  for (int i = 0; i < 3; ++i) batch.insert(batch.end(), l.begin(), l.end());
  auto batched = Sample(batch, {Row(0.7f, 5, 0.9f, 1, 0), row, Row(1.0f, 0, 1.0f, 98, 5)});
  ASSERT_TRUE(batched.ok());
  EXPECT_EQ((*batched)[1].id, (*alone)[0].id);
  // Other seeds and counters give other draws.
  std::map<int, int> distinct;
  for (uint32_t c = 0; c < 50; ++c) ++distinct[(*Sample(l, {Row(1.0f, 0, 1.0f, 99, c)}))[0].id];
  EXPECT_GT(distinct.size(), 10u);
}

// The empirical distribution over counters follows softmax(logits / T),
// renormalised over the top-k set.
TEST_F(SampleTokensTest, DrawsFollowTheTemperedSoftmax) {
  const std::vector<float> l = {0.0f, std::log(3.0f), 1.0f, -0.5f, -100.0f};
  struct Case {
    float temperature;
    int top_k;
  };
  for (const Case c : {Case{1.0f, 0}, Case{2.0f, 0}, Case{0.5f, 3}}) {
    const int n = 20000;
    std::vector<double> expected(l.size());
    double z = 0;
    for (size_t i = 0; i < l.size(); ++i) {
      const bool kept = c.top_k == 0 || i == 0 || i == 1 || i == 2;  // the 3 largest
      expected[i] = kept ? std::exp(l[i] / c.temperature) : 0.0;
      z += expected[i];
    }
    std::vector<int> counts(l.size());
    for (int id : Draws(l, {c.temperature, c.top_k, 1.0f, 2024}, n)) ++counts[id];
    for (size_t i = 0; i < l.size(); ++i) {
      const double p = expected[i] / z;
      const double sd = std::sqrt(p * (1 - p) / n);
      EXPECT_NEAR(counts[i] / static_cast<double>(n), p, 5 * sd + 1e-9)
          << "token " << i << " at T=" << c.temperature << " top_k=" << c.top_k;
    }
  }
}

TEST_F(SampleTokensTest, TopKAndTopPSetsAreExactOnTies) {
  auto seen = [&](const std::vector<float>& l, SamplingParams p) {
    std::map<int, int> counts;
    for (int id : Draws(l, p, 2000)) ++counts[id];
    std::vector<int> ids;
    for (const auto& [id, n] : counts) ids.push_back(id);
    return ids;
  };
  // top_k 2 among three tied maxima keeps the two lower ids.
  EXPECT_EQ(seen({1.0f, 2.0f, 2.0f, 2.0f, 0.0f}, {1.0f, 2, 1.0f, 1}), (std::vector<int>{1, 2}));
  // Four equal tokens: top_p 0.5 is reached by exactly two, 0.51 needs three.
  EXPECT_EQ(seen({0.5f, 0.5f, 0.5f, 0.5f}, {1.0f, 0, 0.5f, 2}), (std::vector<int>{0, 1}));
  EXPECT_EQ(seen({0.5f, 0.5f, 0.5f, 0.5f}, {1.0f, 0, 0.51f, 2}), (std::vector<int>{0, 1, 2}));
  // top_p applies to the top-k set's renormalised mass: 3 kept, 0.6 of
  // them is two tokens.
  EXPECT_EQ(seen({5.0f, 5.0f, 5.0f, 5.0f, 5.0f}, {1.0f, 3, 0.6f, 3}), (std::vector<int>{0, 1}));
  // p = (0.33, 0.30, 0.27, ...): top_p 0.5 keeps two; the third needs 0.64.
  EXPECT_EQ(seen({2.0f, 1.9f, 1.8f, 0.0f, -1.0f}, {1.0f, 0, 0.5f, 4}), (std::vector<int>{0, 1}));
  EXPECT_EQ(seen({2.0f, 1.9f, 1.8f, 0.0f, -1.0f}, {1.0f, 0, 0.9f, 4}), (std::vector<int>{0, 1, 2}));
}

TEST_F(SampleTokensTest, BadArgumentsAreRejectedNamingTheOp) {
  const std::vector<float> l = {0.0f, 1.0f};
  for (const SamplingRow& bad :
       {Row(-0.5f, 0, 1.0f, 0, 0), Row(NAN, 0, 1.0f, 0, 0), Row(101.0f, 0, 1.0f, 0, 0),
        Row(1.0f, -1, 1.0f, 0, 0), Row(1.0f, 0, 0.0f, 0, 0), Row(1.0f, 0, 1.5f, 0, 0)}) {
    auto t = Sample(l, {bad});
    ASSERT_FALSE(t.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(t.status()));
    EXPECT_NE(t.status().message().find("SampleTokens"), std::string::npos) << t.status();
  }
  // Shapes: a table with the wrong number of rows, outputs of the wrong size.
  Tensor logits = *backend_->Allocate(DType::kF32, {2, 3});
  Tensor params = *backend_->Allocate(DType::kI32, {2, kSamplingFields});
  Tensor ids = *backend_->Allocate(DType::kI32, {2});
  Tensor lp = *backend_->Allocate(DType::kF32, {2});
  Tensor short_ids = *backend_->Allocate(DType::kI32, {1});
  SamplingTable one{params, EncodeSamplingRows(std::vector<SamplingRow>{Row(0, 0, 1, 0, 0)})};
  SamplingTable two{params, EncodeSamplingRows(std::vector<SamplingRow>(2, Row(0, 0, 1, 0, 0)))};
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->SampleTokens(logits, one, ids, lp)));
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->SampleTokens(logits, two, short_ids, lp)));
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->SampleTokens(logits, two, ids, ids)));
  EXPECT_TRUE(backend_->SampleTokens(logits, two, ids, lp).ok());
}

TEST(SampleMathTest, ExpLogAndNoiseAreAccurate) {
  for (float x = -24.0f; x <= 0.0f; x += 0.01f) {
    EXPECT_NEAR(sample_math::Exp(x) / std::exp(static_cast<double>(x)), 1.0, 3e-7) << x;
  }
  for (float x = 1e-8f; x < 40.0f; x *= 1.37f) {
    const double want = std::log(static_cast<double>(x));
    EXPECT_NEAR(sample_math::Log(x), want, 3e-7 + 1e-7 * std::fabs(want)) << x;
  }
  float lo = 100, hi = -100;
  for (uint32_t i = 0; i < 100000; ++i) {
    const float g = sample_math::Gumbel(sample_math::RowKey(5, 1), i);
    lo = std::min(lo, g);
    hi = std::max(hi, g);
  }
  EXPECT_GT(lo, -2.83f);
  EXPECT_LT(hi, 16.7f);
  EXPECT_LT(lo, -2.0f);  // the noise spans its range
  EXPECT_GT(hi, 8.0f);
}

TEST(SamplingParamsTest, ValidateNamesTheField) {
  EXPECT_FALSE(SamplingParams({-0.5f, 0, 1.0f, 0}).Validate().ok());
  EXPECT_FALSE(SamplingParams({1.0f, -1, 1.0f, 0}).Validate().ok());
  EXPECT_FALSE(SamplingParams({1.0f, 0, 1.5f, 0}).Validate().ok());
  EXPECT_FALSE(SamplingParams({NAN, 0, 1.0f, 0}).Validate().ok());
  EXPECT_NE(SamplingParams({1.0f, 0, 0.0f, 0}).Validate().message().find("top_p"),
            std::string::npos);
  EXPECT_TRUE(SamplingParams({0.7f, 40, 0.9f, 0}).Validate().ok());
}

}  // namespace
}  // namespace strata::engine
