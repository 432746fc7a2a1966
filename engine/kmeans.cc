#include "engine/kmeans.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/thread_pool.h"

namespace strata::engine {
namespace {

// Writes row / |row| (zeros for a zero row) into out.
void Normalise(const float* row, int d, float* out) {
  double sq = 0.0;
  for (int j = 0; j < d; ++j) sq += static_cast<double>(row[j]) * row[j];
  const double inv = sq > 0.0 ? 1.0 / std::sqrt(sq) : 0.0;
  for (int j = 0; j < d; ++j) out[j] = static_cast<float>(row[j] * inv);
}

float Dot(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int j = 0; j < d; ++j) s += a[j] * b[j];
  return s;
}

// The seed keys of the header's initialisation; kn holds the n normalised
// keys.
std::vector<int64_t> SeedKeys(const std::vector<float>& kn, int64_t n, int d, int c,
                              ThreadPool* pool) {
  const int c0 = (c + 1) / 2;
  std::vector<int64_t> seeds(c);
  for (int j = 0; j < c0; ++j) seeds[j] = int64_t{j} * n / c0;
  if (c == c0) return seeds;
  std::vector<uint32_t> max_cos(n);  // bucketed
  auto score_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float best = Dot(&kn[i * d], &kn[seeds[0] * d], d);
      for (int j = 1; j < c0; ++j) best = std::max(best, Dot(&kn[i * d], &kn[seeds[j] * d], d));
      max_cos[i] = SeedSimilarityBucket(best);
    }
  };
  if (pool != nullptr) {
    pool->ParallelFor(n, 64, score_range);
  } else {
    score_range(0, n);
  }
  for (int j = 0; j < c0; ++j) max_cos[seeds[j]] = (uint32_t{1} << kSeedSimilarityBits) - 1;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return max_cos[a] < max_cos[b]; });
  std::sort(order.begin(), order.begin() + (c - c0));
  std::copy_n(order.begin(), c - c0, seeds.begin() + c0);
  return seeds;
}

}  // namespace

uint32_t SeedSimilarityBucket(float cosine) {
  const double c = std::clamp(static_cast<double>(cosine), -1.0, 1.0);
  constexpr double kTop = static_cast<double>((uint32_t{1} << kSeedSimilarityBits) - 2);
  return static_cast<uint32_t>((c + 1.0) * 0.5 * kTop);
}

absl::StatusOr<KMeansResult> KMeansCosine(std::span<const float> keys, int d, int clusters,
                                          int iterations, ThreadPool* pool) {
  if (d < 1) return absl::InvalidArgumentError(absl::StrCat("kmeans: d must be >= 1, got ", d));
  if (keys.size() % static_cast<size_t>(d) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kmeans: ", keys.size(), " values are not a whole number of rows of ", d));
  }
  if (clusters < 1 || iterations < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kmeans: clusters and iterations must be >= 1, got ", clusters, " and ", iterations));
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!std::isfinite(keys[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("kmeans: key ", i / d, " has a non-finite value"));
    }
  }
  const int64_t n = static_cast<int64_t>(keys.size() / d);
  const int c = static_cast<int>(std::min<int64_t>(clusters, n));
  KMeansResult r;
  r.num_clusters = c;
  if (n == 0) return r;

  std::vector<float> kn(keys.size());  // normalised keys
  for (int64_t i = 0; i < n; ++i) Normalise(&keys[i * d], d, &kn[i * d]);
  r.centroids.resize(static_cast<size_t>(c) * d);
  const std::vector<int64_t> seeds = SeedKeys(kn, n, d, c, pool);
  for (int j = 0; j < c; ++j) {
    std::copy_n(&keys[seeds[j] * d], d, &r.centroids[static_cast<size_t>(j) * d]);
  }
  std::vector<float> cn(r.centroids.size());  // normalised centroids
  r.assignment.assign(n, -1);
  r.sizes.assign(c, 0);
  std::vector<int32_t> next(n);
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
      next[i] = best_k;
    }
  };
  for (int it = 0; it < iterations; ++it) {
    for (int k = 0; k < c; ++k) {
      Normalise(&r.centroids[static_cast<size_t>(k) * d], d, &cn[static_cast<size_t>(k) * d]);
    }
    if (pool != nullptr) {
      pool->ParallelFor(n, 64, assign_range);
    } else {
      assign_range(0, n);
    }
    if (next == r.assignment) break;  // the centroids are already its means
    r.assignment.swap(next);
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(r.sizes.begin(), r.sizes.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int k = r.assignment[i];
      ++r.sizes[k];
      for (int j = 0; j < d; ++j) sums[static_cast<size_t>(k) * d + j] += keys[i * d + j];
    }
    for (int k = 0; k < c; ++k) {
      if (r.sizes[k] == 0) continue;  // keeps its centroid
      for (int j = 0; j < d; ++j) {
        r.centroids[static_cast<size_t>(k) * d + j] =
            static_cast<float>(sums[static_cast<size_t>(k) * d + j] / r.sizes[k]);
      }
    }
  }
  return r;
}

}  // namespace strata::engine
