#include "kvtier/kmeans.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/thread_pool.h"
#include "engine/backend.h"

namespace strata::kvtier {
namespace {

// Below this norm a vector counts as zero: its normalised form is all zeros,
// so its cosine similarity is 0 to everything instead of NaN.
constexpr double kMinNorm = 1e-30;

// Writes row / |row| (or zeros) into out.
void Normalise(const float* row, int d, float* out) {
  double sq = 0.0;
  for (int j = 0; j < d; ++j) sq += static_cast<double>(row[j]) * row[j];
  const double norm = std::sqrt(sq);
  const double inv = norm > kMinNorm ? 1.0 / norm : 0.0;
  for (int j = 0; j < d; ++j) out[j] = static_cast<float>(row[j] * inv);
}

float Dot(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int j = 0; j < d; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace

absl::StatusOr<KMeansResult> KMeansCosine(std::span<const float> keys, int d, int clusters,
                                          int iterations, uint64_t seed, ThreadPool* pool) {
  if (d < 1) return absl::InvalidArgumentError(absl::StrCat("kmeans: d must be >= 1, got ", d));
  if (keys.size() % static_cast<size_t>(d) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kmeans: ", keys.size(), " values are not a whole number of rows of ", d));
  }
  if (clusters < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("kmeans: clusters must be >= 1, got ", clusters));
  }
  if (iterations < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("kmeans: iterations must be >= 1, got ", iterations));
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!std::isfinite(keys[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("kmeans: key ", i / d, " has a non-finite value"));
    }
  }
  const int64_t n = static_cast<int64_t>(keys.size() / d);
  KMeansResult r;

  // Too few keys to split further: each key is its own cluster.
  if (n <= clusters) {
    r.num_clusters = static_cast<int>(n);
    r.assignment.resize(n);
    for (int64_t i = 0; i < n; ++i) r.assignment[i] = static_cast<int32_t>(i);
    r.centroids.assign(keys.begin(), keys.end());
    r.sizes.assign(n, 1);
    return r;
  }

  const int c = clusters;
  std::vector<float> kn(keys.size());  // normalised keys
  for (int64_t i = 0; i < n; ++i) Normalise(&keys[i * d], d, &kn[i * d]);

  // Farthest-first initialisation over cosine distance.
  std::vector<float> cn(static_cast<size_t>(c) * d);  // normalised centroids
  {
    std::vector<float> best(n, -std::numeric_limits<float>::infinity());
    std::vector<char> chosen(n, 0);
    int64_t pick = static_cast<int64_t>(engine::SplitMix64(seed) % static_cast<uint64_t>(n));
    for (int k = 0; k < c; ++k) {
      chosen[pick] = 1;
      std::copy(&kn[pick * d], &kn[pick * d] + d, &cn[static_cast<size_t>(k) * d]);
      if (k + 1 == c) break;
      int64_t next = -1;
      float next_sim = std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        const float s = Dot(&kn[i * d], &kn[pick * d], d);
        if (s > best[i]) best[i] = s;
        if (!chosen[i] && best[i] < next_sim) {
          next_sim = best[i];
          next = i;
        }
      }
      pick = next;  // n > c, so an unchosen key exists
    }
  }

  r.num_clusters = c;
  r.assignment.assign(n, -1);
  r.sizes.assign(c, 0);
  r.centroids.assign(static_cast<size_t>(c) * d, 0.0f);
  std::vector<float> sim(n);  // similarity of each key to its assigned centroid
  std::vector<int32_t> next_assignment(n);
  std::vector<double> sums(static_cast<size_t>(c) * d);

  auto assign_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int32_t best_k = 0;
      float best_s = Dot(&kn[i * d], &cn[0], d);
      for (int k = 1; k < c; ++k) {
        const float s = Dot(&kn[i * d], &cn[static_cast<size_t>(k) * d], d);
        if (s > best_s) {  // strict: ties keep the lowest cluster index
          best_s = s;
          best_k = k;
        }
      }
      next_assignment[i] = best_k;
      sim[i] = best_s;
    }
  };

  for (int it = 0; it < iterations; ++it) {
    if (pool != nullptr) {
      pool->ParallelFor(n, 64, assign_range);
    } else {
      assign_range(0, n);
    }
    std::fill(r.sizes.begin(), r.sizes.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++r.sizes[next_assignment[i]];

    // Re-seed empty clusters with the worst-fitting keys of shared clusters.
    for (int e = 0; e < c; ++e) {
      if (r.sizes[e] > 0) continue;
      int64_t worst = -1;
      for (int64_t i = 0; i < n; ++i) {
        if (r.sizes[next_assignment[i]] > 1 && (worst < 0 || sim[i] < sim[worst])) worst = i;
      }
      --r.sizes[next_assignment[worst]];
      next_assignment[worst] = e;
      r.sizes[e] = 1;  // alone now, so the size > 1 test never moves it again
    }

    // No change: the centroids already are the means of this assignment.
    if (next_assignment == r.assignment) break;
    r.assignment.swap(next_assignment);

    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      double* dst = &sums[static_cast<size_t>(r.assignment[i]) * d];
      for (int j = 0; j < d; ++j) dst[j] += keys[i * d + j];
    }
    for (int k = 0; k < c; ++k) {
      const double inv = 1.0 / r.sizes[k];
      for (int j = 0; j < d; ++j) {
        r.centroids[static_cast<size_t>(k) * d + j] =
            static_cast<float>(sums[static_cast<size_t>(k) * d + j] * inv);
      }
      Normalise(&r.centroids[static_cast<size_t>(k) * d], d, &cn[static_cast<size_t>(k) * d]);
    }
  }
  return r;
}

}  // namespace strata::kvtier
