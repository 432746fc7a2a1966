// SizeKvCache at Llama-3-8B's shape: the GPU budget of twelve 32k contexts
// holds twelve sequences with every token on the GPU, and several times as
// many with their clusters in the host tier, as far as the host tier holds
// them.
#include "kvtier/kv_sizing.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

using ::testing::HasSubstr;

KvSizingInput Llama8b32k() {
  KvSizingInput in;
  in.config = engine::PresetModelConfig("llama-3-8b").value();
  in.kv_dtype = engine::DType::kBF16;
  in.page_size = 16;
  in.max_context = 32768 + 512;
  // Twelve contexts of every layer: 128 KiB per token.
  in.gpu_bytes = int64_t{12} * in.max_context * 128 * 1024;
  return in;
}

KvPolicyConfig ClusterKv() {
  KvPolicyConfig p;
  p.type = "clusterkv";
  return p;  // budget 1024, window 320, full_layers 2
}

TEST(KvSizingTest, EveryTokenOnTheGpu) {
  auto s = SizeKvCache(Llama8b32k());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->num_upper_pages, 0);
  EXPECT_EQ(s->sequences, 12);
  EXPECT_EQ(s->num_pages, 12 * (32768 + 512) / 16);
}

TEST(KvSizingTest, HostHomedClustersHoldSeveralTimesAsManySequences) {
  KvSizingInput in = Llama8b32k();
  in.tiered = KvSizingInput::Tiered{ClusterKv(), engine::KvCodecKind::kInt4, 0, int64_t{1} << 40};
  auto s = SizeKvCache(in);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->upper_first_layer, 2);
  EXPECT_GE(s->gpu_sequences, 48) << s->Describe();
  EXPECT_EQ(s->sequences, s->gpu_sequences);  // a terabyte of host memory
  EXPECT_EQ(s->num_pages, s->gpu_sequences * (32768 + 512) / 16);
  // Every byte of the budget is used by one group or the other.
  const int64_t layer_page = int64_t{2} * 16 * 8 * 128 * 2;
  const int64_t used = layer_page * (int64_t{s->num_pages} * 2 + int64_t{s->num_upper_pages} * 30);
  EXPECT_LE(used, in.gpu_bytes);
  EXPECT_GT(used, in.gpu_bytes - layer_page * 30);
  // The upper group holds every sequence's resident part and one whole
  // context being prefilled.
  EXPECT_GE(s->num_upper_pages, s->gpu_sequences * (s->resident_tokens / 16) + (32768 + 512) / 16);
}

TEST(KvSizingTest, TheHostTierCanBeTheLimit) {
  KvSizingInput in = Llama8b32k();
  const int64_t per_seq = HostBytesPerSequence(in.config, in.kv_dtype, 16, ClusterKv(),
                                               engine::KvCodecKind::kInt4, in.max_context);
  // int4 with a scale and zero per group of 32: 5/16 of the bf16 bytes of
  // the 30 sparse layers, plus piece headers and the records' rounding.
  const int64_t bf16 = int64_t{30} * in.max_context * 8 * 128 * 2 * 2;
  EXPECT_GT(per_seq, bf16 * 5 / 16);
  EXPECT_LT(per_seq, bf16 * 36 / 100);
  in.tiered = KvSizingInput::Tiered{ClusterKv(), engine::KvCodecKind::kInt4, 0, 20 * per_seq};
  auto s = SizeKvCache(in);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->host_sequences, 20);
  EXPECT_EQ(s->sequences, 20);
}

TEST(KvSizingTest, ABudgetBelowOneSequenceIsRefusedWithTheNumbers) {
  KvSizingInput in = Llama8b32k();
  in.gpu_bytes = int64_t{1} << 30;
  auto s = SizeKvCache(in);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("less than one context of 33280"));
  in.tiered = KvSizingInput::Tiered{ClusterKv(), engine::KvCodecKind::kInt4, 0, int64_t{1} << 40};
  s = SizeKvCache(in);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("cannot hold one sequence of 33280"));
  in.tiered->policy.full_layers = 32;
  EXPECT_THAT(std::string(SizeKvCache(in).status().message()), HasSubstr("no sparse layer"));
}

TEST(KvSizingTest, BudgetProblemsNameTheKeyAndTheNumbers) {
  KvSizingInput model = Llama8b32k();
  KvProfile p;
  p.name = "p";
  p.policy = ClusterKv();
  p.codec = "int4";
  p.tiers.gpu_bytes = int64_t{24} << 30;
  p.tiers.host_bytes = int64_t{64} << 30;
  EXPECT_TRUE(BudgetProblems(p, model).empty());
  // A GPU budget below the dense layers of one context, the resident part
  // and one prompt; a host tier below one sequence's clusters.
  p.tiers.gpu_bytes = int64_t{2} << 30;
  p.tiers.host_bytes = int64_t{1} << 30;
  std::vector<std::string> problems = BudgetProblems(p, model);
  ASSERT_EQ(problems.size(), 2u);
  EXPECT_THAT(problems[0], HasSubstr("tiers.host_bytes: 1073741824 bytes cannot hold"));
  EXPECT_THAT(problems[0], HasSubstr("in int4"));
  EXPECT_THAT(problems[1], HasSubstr("tiers.gpu_bytes:"));
  EXPECT_THAT(problems[1], HasSubstr("cannot hold one sequence of 33280"));
  // Exact attention: the budget must hold one whole context.
  p.policy.type = "full";
  problems = BudgetProblems(p, model);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_THAT(problems[0], HasSubstr("less than one context of 33280"));
  // A host tier for clusters, but no sparse layer to take them from.
  p.policy = ClusterKv();
  p.policy.full_layers = 32;
  problems = BudgetProblems(p, model);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_THAT(problems[0], HasSubstr("kv_policy.full_layers: 32 leaves none"));
}

}  // namespace
}  // namespace strata::kvtier
