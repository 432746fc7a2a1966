#include "kvtier/cluster_index.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

std::vector<float> RandomKeys(int n, int d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> keys(static_cast<size_t>(n) * d);
  for (float& v : keys) v = normal(rng);
  return keys;
}

ClusterIndexOptions Options(int sink, int tokens_per_cluster) {
  ClusterIndexOptions o;
  o.sink_tokens = sink;
  o.tokens_per_cluster = tokens_per_cluster;
  return o;
}

// Every position of every cluster, in cluster order.
std::vector<int32_t> AllPositions(const ClusterIndex& index) {
  std::vector<int32_t> out;
  for (int k = 0; k < index.num_clusters(); ++k) {
    auto p = index.positions(k);
    EXPECT_TRUE(std::is_sorted(p.begin(), p.end())) << "cluster " << k;
    EXPECT_GT(p.size(), 0u) << "cluster " << k;
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

std::vector<int32_t> Range(int32_t begin, int32_t end) {
  std::vector<int32_t> r(end - begin);
  std::iota(r.begin(), r.end(), begin);
  return r;
}

TEST(ClusterIndexTest, BuildKeepsSinksAsideAndClustersTheRest) {
  const int d = 8;
  std::vector<float> keys = RandomKeys(16 + 170, d, 1);
  auto index = ClusterIndex::Build(keys, d, Options(16, 80));
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ(index->num_clusters(), 3);  // ceil(170 / 80)
  EXPECT_EQ(index->num_clustered_tokens(), 170);
  EXPECT_EQ(index->next_position(), 186);
  std::vector<int32_t> all = AllPositions(*index);
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, Range(16, 186));
  EXPECT_EQ(index->cluster_offsets().size(), 4u);
  EXPECT_EQ(index->centroids().size(), 3u * d);

  // Only sinks: nothing to cluster.
  auto small = ClusterIndex::Build(RandomKeys(10, d, 2), d, Options(16, 80));
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(small->num_clusters(), 0);
  EXPECT_EQ(small->next_position(), 10);
}

TEST(ClusterIndexTest, FromPolicy) {
  KvPolicyConfig policy;
  policy.sink_tokens = 4;
  policy.tokens_per_cluster = 64;
  policy.kmeans_iterations = 7;
  ClusterIndexOptions o = ClusterIndexOptions::FromPolicy(policy);
  EXPECT_EQ(o.sink_tokens, 4);
  EXPECT_EQ(o.tokens_per_cluster, 64);
  EXPECT_EQ(o.kmeans_iterations, 7);
  EXPECT_EQ(o.clusters_per_window, 8);
}

TEST(ClusterIndexTest, RejectsBadInput) {
  const int d = 4;
  std::vector<float> keys = RandomKeys(40, d, 3);
  EXPECT_FALSE(ClusterIndex::Build(keys, 0, Options(4, 8)).ok());
  EXPECT_FALSE(ClusterIndex::Build(keys, 3, Options(4, 8)).ok());
  EXPECT_FALSE(ClusterIndex::Build(keys, d, Options(-1, 8)).ok());
  EXPECT_FALSE(ClusterIndex::Build(keys, d, Options(4, 0)).ok());
  auto index = ClusterIndex::Build(keys, d, Options(4, 8));
  ASSERT_TRUE(index.ok());
  std::vector<float> q(d, 1.0f);
  EXPECT_EQ(index->Select(q, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(index->Select(std::vector<float>(d + 1, 1.0f), 10).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(index->Select({}, 10).status().code(), absl::StatusCode::kInvalidArgument);
  q[0] = std::nanf("");
  EXPECT_EQ(index->Select(q, 10).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClusterIndexTest, BudgetIsExactAndTruncatesTheLastClusterToItsEarliestTokens) {
  const int d = 16;
  std::vector<float> keys = RandomKeys(16 + 1000, d, 4);
  auto index = ClusterIndex::Build(keys, d, Options(16, 80));
  ASSERT_TRUE(index.ok()) << index.status();
  std::vector<float> queries = RandomKeys(4, d, 5);  // a group of 4 query heads
  for (int64_t budget : {0, 1, 79, 300, 999}) {
    auto sel = index->Select(queries, budget);
    ASSERT_TRUE(sel.ok()) << sel.status();
    EXPECT_EQ(sel->num_tokens, budget);
    int64_t total = 0;
    for (size_t i = 0; i < sel->clusters.size(); ++i) {
      const SelectedCluster& s = sel->clusters[i];
      total += s.tokens;
      if (i > 0) {
        EXPECT_GE(sel->clusters[i - 1].score, s.score);
      }
      // All but the last are whole.
      if (i + 1 < sel->clusters.size()) {
        EXPECT_EQ(s.tokens, index->size(s.cluster));
      }
      EXPECT_GT(s.tokens, 0);
    }
    EXPECT_EQ(total, budget);
    if (budget == 0) {
      EXPECT_TRUE(sel->clusters.empty());
      continue;
    }
    // The truncated cluster contributes its earliest positions.
    const SelectedCluster& last = sel->clusters.back();
    auto attend = index->TokensToAttend(*sel, 1016, 0, 0);
    ASSERT_TRUE(attend.ok()) << attend.status();
    std::set<int32_t> got(attend->begin(), attend->end());
    auto pos = index->positions(last.cluster);
    for (int32_t i = 0; i < static_cast<int32_t>(pos.size()); ++i) {
      EXPECT_EQ(got.count(pos[i]) == 1, i < last.tokens) << "position " << pos[i];
    }
    EXPECT_EQ(attend->size(), static_cast<size_t>(budget) + 1);  // + the current token
  }
  // A budget beyond the clustered tokens takes every cluster whole.
  auto all = index->Select(queries, 5000);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->num_tokens, 1000);
  EXPECT_EQ(all->clusters.size(), static_cast<size_t>(index->num_clusters()));
}

TEST(ClusterIndexTest, ScoresSumOverTheQueryGroup) {
  // Two clusters with centroids x = (1, 0) and y = (0, 1).
  const int d = 2;
  std::vector<float> keys;
  for (int i = 0; i < 4; ++i) keys.insert(keys.end(), {1.0f, 0.0f, 0.0f, 1.0f});
  auto index = ClusterIndex::Build(keys, d, Options(0, 4));
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->num_clusters(), 2);
  const int x = index->centroid(0)[0] > 0.5f ? 0 : 1;
  const int y = 1 - x;
  // Head 0 alone wants x most (10 > any other head-cluster score), so a
  // per-head max would pick x first; the group sum prefers y: x scores
  // 10 - 9 = 1, y scores 0 + 3 = 3.
  std::vector<float> queries = {10.0f, 0.0f, -9.0f, 3.0f};
  auto sel = index->Select(queries, 8);
  ASSERT_TRUE(sel.ok()) << sel.status();
  ASSERT_EQ(sel->clusters.size(), 2u);
  EXPECT_EQ(sel->clusters[0].cluster, y);
  EXPECT_FLOAT_EQ(sel->clusters[0].score, 3.0f);
  EXPECT_EQ(sel->clusters[1].cluster, x);
  EXPECT_FLOAT_EQ(sel->clusters[1].score, 1.0f);
}

TEST(ClusterIndexTest, AppendWindowAddsClustersOfTheWindow) {
  const int d = 8;
  auto index = ClusterIndex::Build(RandomKeys(16 + 400, d, 6), d, Options(16, 80));
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->num_clusters(), 5);
  std::vector<float> window = RandomKeys(320, d, 7);
  std::vector<int32_t> pos = Range(416, 736);
  ASSERT_TRUE(index->AppendWindow(window, pos).ok());
  EXPECT_EQ(index->num_clusters(), 13);
  EXPECT_EQ(index->next_position(), 736);
  EXPECT_EQ(index->num_clustered_tokens(), 720);
  std::vector<int32_t> appended;
  for (int k = 5; k < 13; ++k) {
    auto p = index->positions(k);
    EXPECT_TRUE(std::is_sorted(p.begin(), p.end()));
    appended.insert(appended.end(), p.begin(), p.end());
  }
  std::sort(appended.begin(), appended.end());
  EXPECT_EQ(appended, pos);
  std::vector<int32_t> all = AllPositions(*index);
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, Range(16, 736));

  // Bad windows leave the index unchanged.
  EXPECT_FALSE(index->AppendWindow(window, Range(700, 1020)).ok());  // already indexed
  std::vector<int32_t> unsorted = Range(736, 1056);
  std::swap(unsorted[3], unsorted[4]);
  EXPECT_FALSE(index->AppendWindow(window, unsorted).ok());
  EXPECT_FALSE(index->AppendWindow(window, Range(736, 1000)).ok());  // size mismatch
  EXPECT_EQ(index->num_clusters(), 13);
  EXPECT_TRUE(index->AppendWindow({}, {}).ok());
  EXPECT_EQ(index->num_clusters(), 13);

  // A window shorter than clusters_per_window gives singletons.
  ASSERT_TRUE(index->AppendWindow(RandomKeys(3, d, 8), Range(736, 739)).ok());
  EXPECT_EQ(index->num_clusters(), 16);
  EXPECT_EQ(index->next_position(), 739);
}

TEST(ClusterIndexTest, TokensToAttendMergesSinksSelectionWindowAndCurrent) {
  const int d = 4;
  auto index = ClusterIndex::Build(RandomKeys(30, d, 9), d, Options(2, 7));
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->num_clusters(), 4);  // ceil(28 / 7)
  // Clusters picked by hand: two whole, one truncated to its first token.
  Selection sel;
  sel.clusters.push_back({0, 0.0f, index->size(0)});
  sel.clusters.push_back({2, 0.0f, index->size(2)});
  sel.clusters.push_back({3, 0.0f, 1});
  std::set<int32_t> want = {0, 1};                    // sinks
  for (int32_t p = 24; p <= 30; ++p) want.insert(p);  // window of 6 + current (30)
  for (int32_t p : index->positions(0)) want.insert(p);
  for (int32_t p : index->positions(2)) want.insert(p);
  want.insert(index->positions(3)[0]);
  auto got = index->TokensToAttend(sel, 30, 2, 6);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(*got, ElementsAreArray(want.begin(), want.end()));

  // Overlaps: a window reaching the sinks, a selection inside the window.
  auto small = index->TokensToAttend(sel, 3, 2, 6);
  EXPECT_FALSE(small.ok());  // selected positions beyond the context
  Selection none;
  auto overlap = index->TokensToAttend(none, 3, 2, 6);
  ASSERT_TRUE(overlap.ok());
  EXPECT_THAT(*overlap, ElementsAre(0, 1, 2, 3));
  auto no_context = index->TokensToAttend(none, 0, 16, 320);
  ASSERT_TRUE(no_context.ok());
  EXPECT_THAT(*no_context, ElementsAre(0));

  // Selections that do not fit the index.
  Selection bad;
  bad.clusters.push_back({9, 0.0f, 1});
  EXPECT_FALSE(index->TokensToAttend(bad, 30, 2, 6).ok());
  bad.clusters = {{0, 0.0f, index->size(0) + 1}};
  EXPECT_FALSE(index->TokensToAttend(bad, 30, 2, 6).ok());
  EXPECT_FALSE(index->TokensToAttend(none, -1, 2, 6).ok());
}

TEST(ClusterIndexTest, QueryAlongACentroidRecallsThatClusterFirst) {
  const int d = 32;
  auto index = ClusterIndex::Build(RandomKeys(16 + 2000, d, 10), d, Options(16, 80));
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->num_clusters(), 25);
  for (int k = 0; k < index->num_clusters(); ++k) {
    auto c = index->centroid(k);
    float norm = 0;
    for (float v : c) norm += v * v;
    norm = std::sqrt(norm);
    // Two query heads both along the centroid direction.
    std::vector<float> q;
    for (int h = 0; h < 2; ++h) {
      for (float v : c) q.push_back(v / norm);
    }
    auto sel = index->Select(q, 1);
    ASSERT_TRUE(sel.ok()) << sel.status();
    ASSERT_EQ(sel->clusters.size(), 1u);
    EXPECT_EQ(sel->clusters[0].cluster, k);
  }
}

}  // namespace
}  // namespace strata::kvtier
