#include "engine/kmeans.h"

#include <cmath>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "common/thread_pool.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::engine {
namespace {

// Keys around `dirs` random directions with random lengths, in runs of
// `per_dir` (like the passages of a long prompt). plant[i] is key i's direction.
std::vector<float> PlantedKeys(int dirs, int per_dir, int d, uint64_t seed,
                               std::vector<int>* plant) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> length(0.5f, 3.0f);
  std::vector<float> centre(static_cast<size_t>(dirs) * d);
  for (float& v : centre) v = normal(rng);
  for (int k = 0; k < dirs; ++k) {
    float sq = 0;
    for (int j = 0; j < d; ++j) sq += centre[k * d + j] * centre[k * d + j];
    for (int j = 0; j < d; ++j) centre[k * d + j] /= std::sqrt(sq);
  }
  std::vector<float> keys;
  plant->clear();
  for (int k = 0; k < dirs; ++k) {
    for (int i = 0; i < per_dir; ++i) {
      const float len = length(rng);
      for (int j = 0; j < d; ++j) keys.push_back(len * (centre[k * d + j] + 0.05f * normal(rng)));
      plant->push_back(k);
    }
  }
  return keys;
}

// The raw mean of each cluster's keys, from the assignment.
std::vector<double> Means(const std::vector<float>& keys, int d, const KMeansResult& r) {
  std::vector<double> sum(static_cast<size_t>(r.num_clusters) * d, 0.0);
  std::vector<int> count(r.num_clusters, 0);
  for (size_t i = 0; i < r.assignment.size(); ++i) {
    ++count[r.assignment[i]];
    for (int j = 0; j < d; ++j) sum[r.assignment[i] * d + j] += keys[i * d + j];
  }
  for (int k = 0; k < r.num_clusters; ++k) {
    for (int j = 0; j < d; ++j) sum[k * d + j] = count[k] > 0 ? sum[k * d + j] / count[k] : 0.0;
  }
  return sum;
}

void ExpectConsistent(const std::vector<float>& keys, int d, const KMeansResult& r) {
  ASSERT_EQ(r.assignment.size(), keys.size() / d);
  ASSERT_EQ(r.sizes.size(), static_cast<size_t>(r.num_clusters));
  ASSERT_EQ(r.centroids.size(), static_cast<size_t>(r.num_clusters) * d);
  std::vector<int> count(r.num_clusters, 0);
  for (int32_t a : r.assignment) {
    ASSERT_GE(a, 0);
    ASSERT_LT(a, r.num_clusters);
    ++count[a];
  }
  for (int k = 0; k < r.num_clusters; ++k) {
    EXPECT_EQ(r.sizes[k], count[k]) << "cluster " << k;
  }
  const std::vector<double> means = Means(keys, d, r);
  for (size_t i = 0; i < means.size(); ++i) {
    ASSERT_FALSE(std::isnan(r.centroids[i]));
    if (r.sizes[i / d] == 0) continue;  // an empty cluster keeps its centroid
    EXPECT_NEAR(r.centroids[i], means[i], 1e-5) << "centroid value " << i;
  }
}

TEST(KMeansCosineTest, RecoversPlantedDirections) {
  const int d = 16;
  std::vector<int> plant;
  std::vector<float> keys = PlantedKeys(4, 50, d, 7, &plant);
  auto r = KMeansCosine(keys, d, 4, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectConsistent(keys, d, *r);
  // Same partition up to relabelling: the plant -> cluster map is a bijection.
  std::map<int, int> to_cluster;
  std::set<int> used;
  for (size_t i = 0; i < plant.size(); ++i) {
    auto [it, inserted] = to_cluster.emplace(plant[i], r->assignment[i]);
    if (inserted) used.insert(r->assignment[i]);
    EXPECT_EQ(it->second, r->assignment[i]) << "key " << i;
  }
  EXPECT_EQ(used.size(), 4u);
}

TEST(KMeansCosineTest, AssignsByDirectionNotDistance) {
  // Euclidean k-means would pair the short x-key with the y-keys (distance
  // ~1 rather than ~100); by cosine it joins the long x-key.
  const int d = 2;
  std::vector<float> keys = {100.0f, 0.0f, 0.01f, 0.0f, 0.0f, 1.0f, 0.0f, 1.1f};
  auto r = KMeansCosine(keys, d, 2, 10);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectConsistent(keys, d, *r);
  EXPECT_EQ(r->assignment[0], r->assignment[1]);
  EXPECT_EQ(r->assignment[2], r->assignment[3]);
  EXPECT_NE(r->assignment[0], r->assignment[2]);
  // Centroids are raw means, not normalised ones.
  const int x = r->assignment[0];
  EXPECT_FLOAT_EQ(r->centroids[x * d + 0], 50.005f);
  EXPECT_FLOAT_EQ(r->centroids[x * d + 1], 0.0f);
}

// A few keys unlike the rest (a needle in filler) get clusters of their own:
// the second half of the seeds are the keys least like the first half, which
// are spread over the positions. With every seed taken from the positions
// the needles would join filler clusters and their means.
TEST(KMeansCosineTest, KeysUnlikeTheSpreadSeedsSeedTheirOwnClusters) {
  const int d = 8, n = 300;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> keys(static_cast<size_t>(n) * d);
  for (int i = 0; i < n; ++i) {
    // Filler: around e0, then around e1; the needles point along e5 and e6.
    const int axis = i == 37 ? 5 : i == 250 ? 6 : i < n / 2 ? 0 : 1;
    for (int j = 0; j < d; ++j) keys[i * d + j] = (j == axis ? 1.0f : 0.0f) + 0.05f * normal(rng);
  }
  // C = 4: seeds 0 and 1 are keys 0 and 150, seeds 2 and 3 the needles.
  auto r = KMeansCosine(keys, d, 4, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectConsistent(keys, d, *r);
  EXPECT_EQ(r->assignment[37], 2);
  EXPECT_EQ(r->assignment[250], 3);
  EXPECT_EQ(r->sizes[2], 1);
  EXPECT_EQ(r->sizes[3], 1);
  // The filler splits by its two directions.
  for (int i = 0; i < n; ++i) {
    if (i != 37 && i != 250) {
      EXPECT_EQ(r->assignment[i], i < n / 2 ? 0 : 1) << "key " << i;
    }
  }
}

TEST(KMeansCosineTest, Deterministic) {
  const int d = 8;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> keys(500 * d);
  for (float& v : keys) v = normal(rng);
  auto a = KMeansCosine(keys, d, 7, 20);
  auto b = KMeansCosine(keys, d, 7, 20);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->assignment, b->assignment);
  EXPECT_EQ(a->centroids, b->centroids);
  EXPECT_EQ(a->sizes, b->sizes);
  ExpectConsistent(keys, d, *a);
  // A pool does not change the result.
  ThreadPool pool(2);
  auto c = KMeansCosine(keys, d, 7, 20, &pool);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(a->assignment, c->assignment);
  EXPECT_EQ(a->centroids, c->centroids);
}

TEST(KMeansCosineTest, FewerKeysThanClustersGivesSingletons) {
  std::vector<float> keys = {1, 2, 3, 4, 5, 6};
  auto r = KMeansCosine(keys, 2, 5, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->num_clusters, 3);
  EXPECT_THAT(r->assignment, ::testing::ElementsAre(0, 1, 2));
  EXPECT_THAT(r->sizes, ::testing::ElementsAre(1, 1, 1));
  EXPECT_EQ(r->centroids, keys);

  auto empty = KMeansCosine({}, 4, 3, 20);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->num_clusters, 0);
  EXPECT_TRUE(empty->assignment.empty());
}

TEST(KMeansCosineTest, ZeroVectorsGiveNoNaN) {
  const int d = 3;
  std::vector<float> keys = {0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0};
  auto r = KMeansCosine(keys, d, 3, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->num_clusters, 3);
  ExpectConsistent(keys, d, *r);

  std::vector<float> zeros(10 * d, 0.0f);
  auto z = KMeansCosine(zeros, d, 4, 20);
  ASSERT_TRUE(z.ok()) << z.status();
  ExpectConsistent(zeros, d, *z);
}

TEST(KMeansCosineTest, EmptyClustersKeepTheirCentroids) {
  // Identical keys all prefer cluster 0; the others empty out and keep their seeds.
  const int d = 4;
  std::vector<float> keys;
  for (int i = 0; i < 20; ++i) keys.insert(keys.end(), {1, 2, 3, 4});
  auto r = KMeansCosine(keys, d, 5, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->num_clusters, 5);
  ExpectConsistent(keys, d, *r);
  EXPECT_THAT(r->sizes, ::testing::ElementsAre(20, 0, 0, 0, 0));
}

TEST(KMeansCosineTest, RejectsBadInput) {
  std::vector<float> keys = {1, 2, 3, 4, 5, 6};
  EXPECT_EQ(KMeansCosine(keys, 0, 2, 20).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KMeansCosine(keys, 4, 2, 20).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KMeansCosine(keys, 2, 0, 20).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KMeansCosine(keys, 2, 2, 0).status().code(), absl::StatusCode::kInvalidArgument);
  keys[3] = std::nanf("");
  EXPECT_EQ(KMeansCosine(keys, 2, 2, 20).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata::engine
