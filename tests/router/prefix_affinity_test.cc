// PrefixAffinity: which decode worker the router remembers holding a
// prompt's leading blocks, bounded by each worker's reported capacity and
// by the number of workers.
#include "router/prefix_affinity.h"

#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata::router {
namespace {

std::vector<int32_t> Tokens(int n, int first = 1) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), first);
  return t;
}

using Holders = std::vector<std::pair<std::string, int64_t>>;

TEST(PrefixAffinityTest, KeysChainTheWholeBlocksOnly) {
  PrefixAffinity a({.block_tokens = 4});
  const std::vector<int32_t> t = Tokens(10);
  const std::vector<uint64_t> keys = a.Keys(t);
  ASSERT_EQ(keys.size(), 2u);  // tokens 8 and 9 make no whole block
  // A key stands for everything before it: the same second block after
  // another first block has another key.
  std::vector<int32_t> other = t;
  other[0] = 999;
  const std::vector<uint64_t> other_keys = a.Keys(other);
  EXPECT_NE(other_keys[0], keys[0]);
  EXPECT_NE(other_keys[1], keys[1]);
  EXPECT_EQ(a.Keys(std::span<const int32_t>(t).first(8)), keys);
  EXPECT_TRUE(a.Keys(std::span<const int32_t>(t).first(3)).empty());
}

TEST(PrefixAffinityTest, TheWorkerSentAPromptHoldsItsLeadingBlocks) {
  PrefixAffinity a({.block_tokens = 4});
  const std::vector<int32_t> document = Tokens(40);
  a.Record("decode-a", a.Keys(document), 1000);
  a.Record("decode-b", a.Keys(std::span<const int32_t>(document).first(12)), 1000);
  // The document with another question after it.
  std::vector<int32_t> asked = document;
  for (int i = 0; i < 6; ++i) asked.push_back(500 + i);
  EXPECT_EQ(a.Holders(a.Keys(asked)), (Holders{{"decode-a", 40}, {"decode-b", 12}}));
  // A prompt that diverges inside block 2 matches blocks 0 and 1 only.
  std::vector<int32_t> diverging = document;
  diverging[9] = 777;
  const Holders h = a.Holders(a.Keys(diverging));
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[0].second, 8);
  EXPECT_EQ(h[1].second, 8);
  // Another document: nobody.
  EXPECT_TRUE(a.Holders(a.Keys(Tokens(40, 5000))).empty());
  EXPECT_EQ(a.num_workers(), 2);
  EXPECT_EQ(a.num_keys(), 10 + 3);
}

TEST(PrefixAffinityTest, EachWorkerKeepsItsCapacityTheOldestPromptsGoFirst) {
  PrefixAffinity a({.block_tokens = 4});
  const std::vector<int32_t> first = Tokens(32, 1), second = Tokens(32, 1000);
  a.Record("w", a.Keys(first), 48);   // 12 blocks: all 8 of the first
  a.Record("w", a.Keys(second), 48);  // 8 more: 4 of the first's go, its last ones
  EXPECT_EQ(a.num_keys(), 12);
  EXPECT_EQ(a.Holders(a.Keys(second)), (Holders{{"w", 32}}));
  // The first document's head is kept longest: a match needs leading blocks.
  EXPECT_EQ(a.Holders(a.Keys(first)), (Holders{{"w", 16}}));
  // Routed again, the first document is the most recent: the second's tail goes.
  a.Record("w", a.Keys(first), 48);
  EXPECT_EQ(a.Holders(a.Keys(first)), (Holders{{"w", 32}}));
  EXPECT_EQ(a.Holders(a.Keys(second)), (Holders{{"w", 16}}));
  // A prompt longer than the capacity: only its head is remembered.
  a.Record("v", a.Keys(Tokens(100, 3000)), 20);
  EXPECT_EQ(a.Holders(a.Keys(Tokens(100, 3000))), (Holders{{"v", 20}}));
  // A worker that reports no prefix store is forgotten.
  a.Record("w", a.Keys(first), 0);
  EXPECT_TRUE(a.Holders(a.Keys(first)).empty());
  EXPECT_EQ(a.num_workers(), 1);
  EXPECT_EQ(a.num_keys(), 5);
}

TEST(PrefixAffinityTest, TheLeastRecentlyRoutedWorkerIsForgottenBeyondTheBound) {
  PrefixAffinity a({.block_tokens = 4, .max_workers = 2});
  const std::vector<int32_t> t = Tokens(8);
  a.Record("a", a.Keys(t), 100);
  a.Record("b", a.Keys(t), 100);
  a.Record("a", a.Keys(t), 100);  // b is now the least recent
  a.Record("c", a.Keys(t), 100);
  EXPECT_EQ(a.num_workers(), 2);
  EXPECT_EQ(a.num_keys(), 4);
  Holders h = a.Holders(a.Keys(t));
  std::sort(h.begin(), h.end());
  EXPECT_EQ(h, (Holders{{"a", 8}, {"c", 8}}));
}

}  // namespace
}  // namespace strata::router
