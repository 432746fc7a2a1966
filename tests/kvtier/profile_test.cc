#include "kvtier/profile.h"

#include <algorithm>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

using ::testing::HasSubstr;

TEST(ProfileTest, ParsesEveryKey) {
  auto p = ParseProfile(R"(
name: long-doc
kv_policy:
  type: clusterkv
  budget_tokens: 2048
  sink_tokens: 8
  window_tokens: 256
  tokens_per_cluster: 64
  kmeans_iterations: 10
  full_layers: 1
  quest_page_tokens: 32
codec: int4
tiers:
  gpu_bytes: 8GiB
  host_bytes: 64 GB
  ssd_path: /tmp/kv
  ssd_bytes: 1TiB
  ssd_write_admission: always
)",
                        "p.yaml");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->name, "long-doc");
  EXPECT_EQ(p->policy.type, "clusterkv");
  EXPECT_EQ(p->policy.budget_tokens, 2048);
  EXPECT_EQ(p->policy.tokens_per_cluster, 64);
  EXPECT_EQ(p->codec, "int4");
  EXPECT_EQ(p->tiers.gpu_bytes, int64_t{8} << 30);
  EXPECT_EQ(p->tiers.host_bytes, 64000000000);
  EXPECT_EQ(p->tiers.ssd_bytes, int64_t{1} << 40);
  EXPECT_TRUE(CheckSupported(*p, "p.yaml").ok());  // an SSD tier below a host tier
  // Not without the host tier, and the key that is the reason is named.
  p->tiers.host_bytes = 0;
  absl::Status s = CheckSupported(*p, "p.yaml");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tiers.ssd_path"));
  p->tiers = {};
  EXPECT_TRUE(CheckSupported(*p, "p.yaml").ok());  // int4 is built
  p->tiers.host_bytes = int64_t{8} << 30;          // so is a host tier
  p->tiers.gpu_bytes = int64_t{8} << 30;           // and a GPU budget
  EXPECT_TRUE(CheckSupported(*p, "p.yaml").ok());
}

TEST(ProfileTest, DefaultsAreTheDefaultProfile) {
  auto p = ParseProfile("name: chat\n", "p.yaml");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->policy.type, "full");
  EXPECT_EQ(p->policy.sink_tokens, 16);
  EXPECT_EQ(p->policy.window_tokens, 320);
  EXPECT_EQ(p->codec, "bf16");
  EXPECT_TRUE(CheckSupported(*p, "p.yaml").ok());
  EXPECT_TRUE(CheckSupported(DefaultProfile(), "default").ok());
}

TEST(ProfileTest, ErrorsNameTheFileAndKey) {
  struct Case {
    std::string yaml, message;
  } cases[] = {
      {"kv_policy: {type: full}\n", "name: is required"},
      {"name: a b\n", "name: may hold only"},
      {"name: x\ncodec: fp4\n", "codec: \"fp4\" is not one of"},
      {"name: x\nkv_policy: {type: h2o}\n", "kv_policy.type: \"h2o\" is not one of"},
      {"name: x\nkv_policy: {budget_tokens: -5}\n", "kv_policy.budget_tokens: must be in [1,"},
      {"name: x\nkv_policy: {budget_tokens: lots}\n",
       "kv_policy.budget_tokens: must be an integer"},
      {"name: x\nkv_policy: {budgett_tokens: 5}\n", "kv_policy.budgett_tokens: unknown key"},
      {"name: x\ncolor: red\n", "color: unknown key"},
      {"name: x\ntiers: {gpu_bytes: 8XB}\n", "tiers.gpu_bytes: \"8XB\": unknown unit"},
      {"name: x\ntiers: {ssd_bytes: 1GiB}\n", "tiers.ssd_bytes: needs ssd_path"},
      {"name: x\ntiers: {host_bytes: 1GiB, prefix_bytes: 2GiB}\n",
       "tiers.prefix_bytes: is more than host_bytes"},
      {"name: x\ntiers: [1, 2]\n", "tiers: must be a map"},
      {"name: [unclosed\n", "invalid YAML at line"},
      {"- a\n- b\n", "a profile must be a YAML map"},
  };
  for (const auto& c : cases) {
    auto p = ParseProfile(c.yaml, "dir/p.yaml");
    ASSERT_FALSE(p.ok()) << c.yaml;
    EXPECT_THAT(std::string(p.status().message()), HasSubstr(c.message)) << c.yaml;
    EXPECT_THAT(std::string(p.status().message()), HasSubstr("dir/p.yaml")) << c.yaml;
  }
  EXPECT_EQ(LoadProfile("/nonexistent.yaml").status().code(), absl::StatusCode::kNotFound);
}

TEST(ProfileTest, EveryErrorIsListedOnItsOwnLine) {
  auto p = ParseProfile(
      "name: x\ncodec: fp4\nkv_policy: {budget_tokens: lots, colour: red}\n"
      "tiers: {gpu_bytes: 8XB}\nextra: 1\n",
      "p.yaml");
  ASSERT_FALSE(p.ok());
  const std::string m(p.status().message());
  EXPECT_THAT(m, HasSubstr("p.yaml: codec: \"fp4\" is not one of"));
  EXPECT_THAT(m, HasSubstr("p.yaml: kv_policy.budget_tokens: must be an integer"));
  EXPECT_THAT(m, HasSubstr("p.yaml: kv_policy.colour: unknown key"));
  EXPECT_THAT(m, HasSubstr("p.yaml: tiers.gpu_bytes: \"8XB\": unknown unit"));
  EXPECT_THAT(m, HasSubstr("p.yaml: extra: unknown key"));
  EXPECT_EQ(std::count(m.begin(), m.end(), '\n'), 4) << m;
}

TEST(ProfileTest, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("1024"), 1024);
  EXPECT_EQ(*ParseByteSize("2 KiB"), 2048);
  EXPECT_EQ(*ParseByteSize("3MB"), 3000000);
  EXPECT_FALSE(ParseByteSize("").ok());
  EXPECT_FALSE(ParseByteSize("GiB").ok());
  EXPECT_FALSE(ParseByteSize("99999999999TiB").ok());
}

}  // namespace
}  // namespace strata::kvtier
