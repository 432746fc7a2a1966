// The prefix index: chain keys that name whole prefixes and stay the same
// across processes, the longest stored prefix found, tokens compared so a
// key collision reuses nothing, and eviction that spares referenced
// entries and takes the least recently used first.
#include "kvtier/prefix_index.h"

#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

std::vector<int32_t> Tokens(int n, int32_t first = 1) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::string Hex(const PrefixKey& k) {
  char buf[33];
  std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(k.words[0]),
                static_cast<unsigned long long>(k.words[1]));
  return buf;
}

TEST(PrefixChainTest, KeysNameWholePrefixesAndAreStable) {
  const std::vector<int32_t> a = Tokens(70);
  const std::vector<PrefixKey> chain = PrefixChain("llama/bf16", a, 16);
  ASSERT_EQ(chain.size(), 4u) << "a partial last block has no key";
  // The same tokens, the same keys; another namespace, none the same.
  EXPECT_EQ(PrefixChain("llama/bf16", a, 16), chain);
  const std::vector<PrefixKey> other = PrefixChain("llama/fp8", a, 16);
  for (size_t i = 0; i < chain.size(); ++i) EXPECT_NE(other[i], chain[i]);
  // A token changed in block 2: blocks 0 and 1 keep their keys, every
  // later one changes (a key names the whole prefix).
  std::vector<int32_t> b = a;
  b[40] = 999;
  const std::vector<PrefixKey> changed = PrefixChain("llama/bf16", b, 16);
  EXPECT_EQ(changed[0], chain[0]);
  EXPECT_EQ(changed[1], chain[1]);
  EXPECT_NE(changed[2], chain[2]);
  EXPECT_NE(changed[3], chain[3]);
  // Stored prefixes outlive the process: the key of a known prefix is
  // fixed. This one is SHA-256 of (u64 10, "llama/bf16", 16 zero bytes,
  // int32 1..16), little-endian, as Python's hashlib computes it, its first
  // 16 bytes read as two little-endian u64 words.
  EXPECT_EQ(Hex(PrefixChain("llama/bf16", Tokens(16), 16)[0]), Hex(chain[0]));
  EXPECT_EQ(Hex(chain[0]), "b45378149b69df4cd4a09035829c6352") << "changed the key scheme?";
}

TEST(PrefixIndexTest, FindsTheLongestStoredPrefix) {
  PrefixIndex index(16);
  const std::vector<int32_t> t = Tokens(64);
  const std::vector<PrefixKey> chain = PrefixChain("m", t, 16);
  for (int b = 0; b < 3; ++b) {
    EXPECT_TRUE(index.Insert(chain[b], std::span(t).subspan(b * 16, 16), 100 + b));
  }
  EXPECT_FALSE(index.Insert(chain[0], std::span(t).first(16), 7)) << "stored once";
  EXPECT_EQ(index.Lookup(chain, t), (std::vector<int64_t>{100, 101, 102}));
  // A prompt that shares the first block only.
  std::vector<int32_t> u = t;
  u[20] = -5;
  EXPECT_EQ(index.Lookup(PrefixChain("m", u, 16), u), (std::vector<int64_t>{100}));
  // Nothing for a prompt shorter than one block.
  EXPECT_TRUE(index.Lookup(PrefixChain("m", std::span(t).first(10), 16), t).empty());
}

TEST(PrefixIndexTest, AKeyCollisionReusesNothing) {
  PrefixIndex index(4);
  const std::vector<int32_t> t = Tokens(4);
  const std::vector<PrefixKey> chain = PrefixChain("m", t, 4);
  ASSERT_TRUE(index.Insert(chain[0], t, 1));
  // Other tokens presented under the same key (as a collision would).
  const std::vector<int32_t> other = Tokens(4, 50);
  EXPECT_TRUE(index.Lookup(chain, other).empty());
}

TEST(PrefixIndexTest, EvictionSparesReferencedEntriesAndTakesTheOldestFirst) {
  PrefixIndex index(2);
  const std::vector<int32_t> t = Tokens(6);
  const std::vector<PrefixKey> chain = PrefixChain("m", t, 2);
  for (int b = 0; b < 3; ++b)
    ASSERT_TRUE(index.Insert(chain[b], std::span(t).subspan(b * 2, 2), b));
  // Block 0 and 1 looked up (referenced, and now the most recent).
  EXPECT_EQ(index.Lookup(std::span(chain).first(2), t), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(index.Evict().value().value, 2) << "the only unreferenced entry";
  EXPECT_FALSE(index.Evict().has_value()) << "the rest are referenced";
  index.Release(chain[1]);
  EXPECT_EQ(index.Evict().value().value, 1);
  index.Release(chain[0]);
  EXPECT_EQ(index.Evict().value().value, 0);
  EXPECT_EQ(index.size(), 0);
}

}  // namespace
}  // namespace strata::kvtier
