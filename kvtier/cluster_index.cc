#include "kvtier/cluster_index.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/backend.h"
#include "kvtier/kmeans.h"

namespace strata::kvtier {
namespace {

absl::Status CheckOptions(const ClusterIndexOptions& o) {
  if (o.sink_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: sink_tokens must be >= 0, got ", o.sink_tokens));
  }
  if (o.tokens_per_cluster < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: tokens_per_cluster must be >= 1, got ", o.tokens_per_cluster));
  }
  if (o.kmeans_iterations < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: kmeans_iterations must be >= 1, got ", o.kmeans_iterations));
  }
  if (o.clusters_per_window < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cluster index: clusters_per_window must be >= 1, got ", o.clusters_per_window));
  }
  return absl::OkStatus();
}

}  // namespace

ClusterIndexOptions ClusterIndexOptions::FromPolicy(const KvPolicyConfig& policy) {
  ClusterIndexOptions o;
  o.sink_tokens = policy.sink_tokens;
  o.tokens_per_cluster = policy.tokens_per_cluster;
  o.kmeans_iterations = policy.kmeans_iterations;
  return o;
}

absl::StatusOr<ClusterIndex> ClusterIndex::Build(std::span<const float> keys, int head_dim,
                                                 const ClusterIndexOptions& options,
                                                 ThreadPool* pool) {
  STRATA_RETURN_IF_ERROR(CheckOptions(options));
  if (head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: head_dim must be >= 1, got ", head_dim));
  }
  if (keys.size() % static_cast<size_t>(head_dim) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cluster index: ", keys.size(),
                                                   " key values are not whole rows of ", head_dim));
  }
  const size_t n = keys.size() / head_dim;
  if (n > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("cluster index: too many keys (", n, ")"));
  }
  // Sinks included: a non-finite key is a caller bug wherever it is.
  for (float v : keys) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError("cluster index: non-finite key");
  }
  ClusterIndex index(head_dim, options);
  index.next_position_ = static_cast<int32_t>(n);
  const size_t sink = std::min(n, static_cast<size_t>(options.sink_tokens));
  const size_t rest = n - sink;
  if (rest == 0) return index;  // everything is a sink
  std::vector<int32_t> pos(rest);
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(sink));
  const size_t tpc = static_cast<size_t>(options.tokens_per_cluster);
  const int clusters = static_cast<int>((rest + tpc - 1) / tpc);
  STRATA_RETURN_IF_ERROR(
      index.AddClusters(keys.subspan(sink * head_dim), pos, clusters, options.seed, pool));
  return index;
}

absl::Status ClusterIndex::AppendWindow(std::span<const float> keys,
                                        std::span<const int32_t> positions, ThreadPool* pool) {
  if (keys.size() != positions.size() * static_cast<size_t>(head_dim_)) {
    return absl::InvalidArgumentError(absl::StrCat("cluster index: window has ", keys.size(),
                                                   " key values for ", positions.size(),
                                                   " positions of head_dim ", head_dim_));
  }
  if (positions.empty()) return absl::OkStatus();
  if (positions.front() < next_position_) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: window position ", positions.front(),
                     " is already indexed (next is ", next_position_, ")"));
  }
  for (size_t i = 1; i < positions.size(); ++i) {
    if (positions[i] <= positions[i - 1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("cluster index: window positions not strictly ascending at ", i));
    }
  }
  if (positions.back() == std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("cluster index: window position overflows int32");
  }
  // Each window gets its own seed, so equal windows at different times do
  // not start from the same key index by construction.
  const uint64_t seed = options_.seed ^ engine::SplitMix64(static_cast<uint64_t>(windows_appended_ + 1));
  STRATA_RETURN_IF_ERROR(AddClusters(keys, positions, options_.clusters_per_window, seed, pool));
  next_position_ = positions.back() + 1;
  ++windows_appended_;
  return absl::OkStatus();
}

absl::Status ClusterIndex::AddClusters(std::span<const float> keys, std::span<const int32_t> pos,
                                       int clusters, uint64_t seed, ThreadPool* pool) {
  STRATA_ASSIGN_OR_RETURN(KMeansResult km, KMeansCosine(keys, head_dim_, clusters,
                                                        options_.kmeans_iterations, seed, pool));
  // Counting sort by cluster keeps positions ascending within each cluster,
  // as `pos` is ascending.
  const int32_t base = offsets_.back();
  std::vector<int32_t> starts(km.num_clusters + 1, 0);
  for (int k = 0; k < km.num_clusters; ++k) starts[k + 1] = starts[k] + km.sizes[k];
  std::vector<int32_t> cursor(starts.begin(), starts.end() - 1);
  positions_.resize(positions_.size() + pos.size());
  for (size_t i = 0; i < pos.size(); ++i) {
    positions_[base + cursor[km.assignment[i]]++] = pos[i];
  }
  for (int k = 1; k <= km.num_clusters; ++k) offsets_.push_back(base + starts[k]);
  centroids_.insert(centroids_.end(), km.centroids.begin(), km.centroids.end());
  return absl::OkStatus();
}

std::span<const int32_t> ClusterIndex::positions(int cluster) const {
  return std::span<const int32_t>(positions_).subspan(offsets_[cluster], size(cluster));
}

std::span<const float> ClusterIndex::centroid(int cluster) const {
  return std::span<const float>(centroids_)
      .subspan(static_cast<size_t>(cluster) * head_dim_, head_dim_);
}

absl::StatusOr<Selection> ClusterIndex::Select(std::span<const float> queries,
                                               int64_t budget) const {
  const size_t d = static_cast<size_t>(head_dim_);
  if (queries.empty() || queries.size() % d != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: ", queries.size(), " query values are not >= 1 rows of ", d));
  }
  if (budget < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: budget must be >= 0, got ", budget));
  }
  for (float v : queries) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError("cluster index: non-finite query");
  }
  // sum_h q_h . c == (sum_h q_h) . c: sum the group's queries once (in
  // double) instead of scoring every head.
  const size_t g = queries.size() / d;
  std::vector<double> qsum(d, 0.0);
  for (size_t h = 0; h < g; ++h) {
    for (size_t j = 0; j < d; ++j) qsum[j] += queries[h * d + j];
  }
  const int c = num_clusters();
  std::vector<float> score(c);
  for (int k = 0; k < c; ++k) {
    double s = 0.0;
    const float* cent = &centroids_[static_cast<size_t>(k) * d];
    for (size_t j = 0; j < d; ++j) s += qsum[j] * cent[j];
    score[k] = static_cast<float>(s);
  }
  std::vector<int32_t> order(c);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return score[a] > score[b]; });

  Selection sel;
  for (int32_t k : order) {
    if (sel.num_tokens >= budget) break;
    const int32_t take = static_cast<int32_t>(std::min<int64_t>(size(k), budget - sel.num_tokens));
    sel.clusters.push_back({k, score[k], take});
    sel.num_tokens += take;
  }
  return sel;
}

absl::StatusOr<std::vector<int32_t>> ClusterIndex::TokensToAttend(const Selection& selection,
                                                                  int64_t context_len, int sink,
                                                                  int window) const {
  if (context_len < 0 || context_len >= std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: context_len out of range: ", context_len));
  }
  if (sink < 0 || window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster index: sink and window must be >= 0, got ", sink, ", ", window));
  }
  std::vector<int32_t> out;
  const int64_t sink_end = std::min<int64_t>(sink, context_len);
  for (int64_t p = 0; p < sink_end; ++p) out.push_back(static_cast<int32_t>(p));
  for (const SelectedCluster& s : selection.clusters) {
    if (s.cluster < 0 || s.cluster >= num_clusters() || s.tokens < 0 ||
        s.tokens > size(s.cluster)) {
      return absl::InvalidArgumentError(absl::StrCat("cluster index: selection of ", s.tokens,
                                                     " tokens of cluster ", s.cluster,
                                                     " does not fit this index"));
    }
    // Positions are ascending, so the first `tokens` are the earliest.
    for (int32_t p : positions(s.cluster).first(s.tokens)) {
      if (p >= context_len) {
        return absl::InvalidArgumentError(absl::StrCat("cluster index: selected position ", p,
                                                       " is not before context_len ", context_len));
      }
      out.push_back(p);
    }
  }
  for (int64_t p = std::max<int64_t>(0, context_len - window); p <= context_len; ++p) {
    out.push_back(static_cast<int32_t>(p));  // window, then the current token
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace strata::kvtier
