// KMeansCosine: the CPU reference of ClusterKV's key clustering.
//
// ClusterKV groups keys by direction, because attention weight follows
// q . k and keys pointing the same way are recalled together. So:
//   - assignment: each key goes to the centroid of maximum cosine similarity
//     (key and centroid both normalised; a zero vector normalises to zero,
//     so its similarity is 0 to everything and never NaN);
//   - update: a centroid is the mean of the RAW (unnormalised) keys assigned
//     to it, since decode scores clusters by q . centroid and the raw mean is
//     what that dot product should approximate (the mean of q . k).
//
// Determinism (the CUDA kernels are tested against this, so every choice is
// spelled out):
//   - initialisation is farthest-first over cosine distance: the first
//     centroid is key `engine::SplitMix64(seed) % n` (engine/backend.h); each next one is the key whose
//     best cosine similarity to the centroids chosen so far is lowest (ties:
//     lowest key index). It is cheap, needs no random draws beyond the first
//     and spreads the start over distinct directions;
//   - assignment ties go to the lowest cluster index;
//   - an empty cluster (in ascending cluster order) is re-seeded with the key
//     least similar to its own centroid among clusters holding more than one
//     key (ties: lowest key index); the key moves there and the centroid
//     becomes that key. So with n >= clusters every cluster is non-empty;
//   - sums are accumulated in double, in key order.
// Each iteration assigns, re-seeds empties and recomputes the means; it stops
// early when no assignment changed. The returned centroids are exactly the
// raw means of the returned assignment.
//
// Thread-safety: a pure function. With a pool, the assignment step runs in
// parallel (each key independently), which does not change the result; the
// pool's own rule applies (one ParallelFor caller at a time).
#ifndef STRATA_KVTIER_KMEANS_H_
#define STRATA_KVTIER_KMEANS_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {
class ThreadPool;
}  // namespace strata

namespace strata::kvtier {

struct KMeansResult {
  int num_clusters = 0;             // min(requested clusters, n)
  std::vector<int32_t> assignment;  // [n], cluster of each key
  std::vector<float> centroids;     // [num_clusters, d], raw mean of members
  std::vector<int32_t> sizes;       // [num_clusters], members per cluster (all > 0)
};

// keys: [n, d] row-major, n = keys.size() / d. InvalidArgument when d < 1,
// keys.size() is not a multiple of d, clusters < 1 or iterations < 1, or a
// key is not finite. n <= clusters gives n singleton clusters (key i in
// cluster i); n == 0 gives no clusters.
absl::StatusOr<KMeansResult> KMeansCosine(std::span<const float> keys, int d, int clusters,
                                          int iterations, uint64_t seed,
                                          ThreadPool* pool = nullptr);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KMEANS_H_
