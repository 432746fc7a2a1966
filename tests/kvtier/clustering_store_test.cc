// ClusteringStore: values come back as they were put, the least recently
// used go first when the budget is full, one larger than the budget is
// refused, and a value whose bytes changed is dropped, not returned.
#include "kvtier/clustering_store.h"

#include <vector>

#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

PrefixKey Key(uint64_t k) { return PrefixKey{{k, ~k}}; }

std::vector<uint8_t> Value(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

TEST(ClusteringStoreTest, KeepsTheMostRecentlyUsedWithinItsBudget) {
  ClusteringStore store(300);
  EXPECT_TRUE(store.Put(Key(1), Value(100, 1)));
  EXPECT_TRUE(store.Put(Key(2), Value(100, 2)));
  EXPECT_TRUE(store.Put(Key(3), Value(100, 3)));
  EXPECT_EQ(store.Take(Key(1)), Value(100, 1));   // now the most recent
  EXPECT_TRUE(store.Put(Key(4), Value(100, 4)));  // evicts 2, the least recent
  EXPECT_FALSE(store.Take(Key(2)).has_value());
  EXPECT_EQ(store.Take(Key(3)), Value(100, 3));
  EXPECT_EQ(store.Take(Key(4)), Value(100, 4));
  EXPECT_FALSE(store.Put(Key(5), Value(301, 5))) << "larger than the whole budget";
  EXPECT_TRUE(store.Put(Key(3), Value(50, 9))) << "replaces";
  EXPECT_EQ(store.Take(Key(3)), Value(50, 9));
  const ClusteringStore::Stats s = store.stats();
  EXPECT_EQ(s.entries, 3);
  EXPECT_EQ(s.bytes, 250);
  EXPECT_EQ(s.evicted, 1);
  EXPECT_EQ(s.refused, 1);
  EXPECT_EQ(s.hits, 4);
  EXPECT_EQ(s.misses, 1);
}

TEST(ClusteringStoreTest, AValueThatChangedIsDroppedNotReturned) {
  ClusteringStore store(1 << 20);
  ASSERT_TRUE(store.Put(Key(1), Value(64, 1)));
  ASSERT_TRUE(store.Put(Key(2), Value(8, 2)));
  EXPECT_EQ(store.FlipBitsForTesting(20), 1) << "only the value with a byte 20";
  EXPECT_FALSE(store.Take(Key(1)).has_value());
  EXPECT_FALSE(store.Take(Key(1)).has_value()) << "dropped";
  EXPECT_EQ(store.Take(Key(2)), Value(8, 2));
  EXPECT_EQ(store.stats().lost, 1);
  EXPECT_EQ(store.stats().entries, 1);
  EXPECT_EQ(store.stats().bytes, 8);
}

}  // namespace
}  // namespace strata::kvtier
