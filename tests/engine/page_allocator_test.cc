// PageAllocator: every page handed out once at a time, all-or-nothing
// allocation, LIFO reuse, and frees of pages not handed out refused.
#include "engine/page_allocator.h"

#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::engine {
namespace {

using ::testing::HasSubstr;

TEST(PageAllocatorTest, HandsOutEveryPageOnceThenRefuses) {
  PageAllocator pages(8);
  EXPECT_EQ(pages.num_pages(), 8);
  EXPECT_EQ(pages.num_free(), 8);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(pages.Allocate(5, a));
  ASSERT_TRUE(pages.Allocate(3, b));
  EXPECT_EQ(pages.num_free(), 0);
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 8u);  // distinct
  EXPECT_EQ(*all.begin(), 0);
  EXPECT_EQ(*all.rbegin(), 7);
  std::vector<int32_t> c;
  EXPECT_FALSE(pages.Allocate(1, c));
  EXPECT_TRUE(c.empty());
}

TEST(PageAllocatorTest, AllocationIsAllOrNothing) {
  PageAllocator pages(4);
  std::vector<int32_t> a = {};
  ASSERT_TRUE(pages.Allocate(3, a));
  std::vector<int32_t> b = {};
  EXPECT_FALSE(pages.Allocate(2, b));  // only 1 free
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(pages.num_free(), 1);
  EXPECT_FALSE(pages.Allocate(-1, b));
  EXPECT_TRUE(pages.Allocate(0, b));
  EXPECT_TRUE(b.empty());
}

TEST(PageAllocatorTest, AllocateAppendsToTheBlockTable) {
  PageAllocator pages(4);
  std::vector<int32_t> table;
  ASSERT_TRUE(pages.Allocate(1, table));
  ASSERT_TRUE(pages.Allocate(2, table));
  EXPECT_EQ(table.size(), 3u);
  EXPECT_EQ(table[0], 0);
}

TEST(PageAllocatorTest, FreedPagesAreReusedLastInFirstOut) {
  PageAllocator pages(6);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(pages.Allocate(2, a));
  ASSERT_TRUE(pages.Allocate(2, b));
  const std::vector<int32_t> freed = b;
  ASSERT_TRUE(pages.Free(b).ok());
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(pages.num_free(), 4);
  std::vector<int32_t> c;
  ASSERT_TRUE(pages.Allocate(2, c));
  EXPECT_EQ(c, freed);  // the warm pages, in the same order
}

TEST(PageAllocatorTest, DoubleFreeIsRefusedAndNeverHandsOutAPageTwice) {
  PageAllocator pages(4);
  std::vector<int32_t> a;
  ASSERT_TRUE(pages.Allocate(2, a));
  std::vector<int32_t> copy = a;
  ASSERT_TRUE(pages.Free(a).ok());
  const absl::Status twice = pages.Free(copy);
  EXPECT_EQ(twice.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(twice.message(), HasSubstr("not handed out"));
  EXPECT_EQ(pages.num_free(), 4);  // not 6
  std::vector<int32_t> all;
  ASSERT_TRUE(pages.Allocate(4, all));
  EXPECT_EQ(std::set<int32_t>(all.begin(), all.end()).size(), 4u);
  std::vector<int32_t> more;
  EXPECT_FALSE(pages.Allocate(1, more));
}

TEST(PageAllocatorTest, FreeingAPageOutOfRangeIsRefusedAndTheRestFreed) {
  PageAllocator pages(4);
  std::vector<int32_t> a;
  ASSERT_TRUE(pages.Allocate(2, a));
  a.push_back(99);
  a.push_back(-1);
  EXPECT_EQ(pages.Free(a).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(pages.num_free(), 4);
}

TEST(PageAllocatorTest, EmptyPool) {
  PageAllocator pages(0);
  std::vector<int32_t> a;
  EXPECT_FALSE(pages.Allocate(1, a));
  EXPECT_TRUE(pages.Allocate(0, a));
  EXPECT_TRUE(pages.Free(a).ok());
}

}  // namespace
}  // namespace strata::engine
