// KMeansCosine: ClusterKV's key clustering, the CPU reference of the CUDA
// kernel behind Backend::ClusterKeys (both follow this exact recipe, so they
// agree wherever no similarity is a near-tie or near a seeding bucket's
// edge).
//
// ClusterKV groups keys by direction, because attention weight follows
// q . k and keys pointing the same way are recalled together. So:
//   - assignment: each key goes to the centroid of maximum cosine similarity
//     (a zero vector normalises to zero, so its similarity is 0 to
//     everything and never NaN; ties go to the lowest cluster index);
//   - update: a centroid is the mean of the RAW keys assigned to it, since
//     decode scores clusters by q . centroid and the raw mean is what that
//     dot product should approximate (the mean of q . k). An empty cluster
//     keeps its centroid.
//   - initialisation, in two halves. First c0 = ceil(C / 2) seeds spread
//     over the positions: seed j is key floor(j * n / c0) (keys of nearby
//     positions tend to be alike, so this spreads them over the directions
//     too). Then the other C - c0 seeds are the keys least like all of
//     those: the C - c0 of lowest maximum cosine similarity to the first
//     seeds, taken in ascending key order. Similarities are compared in
//     buckets (SeedSimilarityBucket; ties to the lower index), which keeps
//     the GPU's radix sort at 16 key bits for 8 heads; the first seeds
//     themselves rank last, so none is taken twice. Without
//     them a few keys unlike the rest (a needle among filler) join a large
//     cluster whose mean dilutes them, and decode never recalls them; the
//     paper's code seeds by k-means++ (D^2 sampling), whose C sequential
//     passes over 32k keys are too slow on a GPU, so this is its one-pass,
//     deterministic form. (Retrieval accuracy at budget 1024: 95.5% with
//     position seeds only, 98.9% with these; bench/RESULTS.md.)
// Each iteration assigns, then updates; it stops early when no assignment
// changed. The returned centroids are the raw means of the returned
// assignment (or the kept centroid of an empty cluster). Sums are fp64.
//
// Thread-safety: a pure function. With a pool, the assignment step runs in
// parallel (each key independently), which does not change the result.
#ifndef STRATA_ENGINE_KMEANS_H_
#define STRATA_ENGINE_KMEANS_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {
class ThreadPool;
}  // namespace strata

namespace strata::engine {

// The seeding's similarity buckets (see above): floor((cos + 1) / 2 *
// (2^kSeedSimilarityBits - 2)) of the cosine clamped to [-1, 1]; the top
// bucket, 2^kSeedSimilarityBits - 1, is the first seeds' own. The CUDA
// kernel uses the same (cuda/kernels/kv_cluster.h).
inline constexpr int kSeedSimilarityBits = 13;
uint32_t SeedSimilarityBucket(float cosine);

struct KMeansResult {
  int num_clusters = 0;             // min(requested clusters, n)
  std::vector<int32_t> assignment;  // [n], cluster of each key
  std::vector<float> centroids;     // [num_clusters, d]
  std::vector<int32_t> sizes;       // [num_clusters], members per cluster (may be 0)
};

// keys: [n, d] row-major, n = keys.size() / d. InvalidArgument when d < 1,
// keys.size() is not a multiple of d, clusters < 1 or iterations < 1, or a
// key is not finite. n == 0 gives no clusters.
absl::StatusOr<KMeansResult> KMeansCosine(std::span<const float> keys, int d, int clusters,
                                          int iterations, ThreadPool* pool = nullptr);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_KMEANS_H_
