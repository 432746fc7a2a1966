// ClusterIndex: ClusterKV's semantic index of one layer's one KV head (CPU
// reference; the CUDA path is tested against it).
//
// Built from a prefill's post-RoPE keys at positions [0, n): the first
// `sink_tokens` are kept aside (always attended, never clustered) and the
// rest are clustered by KMeansCosine into ceil(n_rest / tokens_per_cluster)
// clusters (ceil, so no cluster is larger than tokens_per_cluster on
// average). Every `window` generated tokens the caller hands the window's
// keys to AppendWindow, which clusters them into `clusters_per_window` new
// clusters appended after the existing ones; old clusters never change, so
// their stored KV never moves.
//
// Storage is cluster-major: all_positions() holds every cluster's token
// positions contiguously (ascending within a cluster), delimited by
// cluster_offsets(), because a cluster is the unit the KV tiers store,
// transfer and recall.
//
// Per decode step, Select scores each cluster as the SUM over the KV group's
// query heads of q . centroid. One selection serves the whole group because
// KV is stored (and moved) per KV head: letting each query head pick its own
// clusters would recall the union, i.e. up to group-size times the budget.
// The sum is the group's total attention logit mass proxy, so a cluster
// wanted strongly by one head and not at all by the others loses to one that
// every head wants moderately. Clusters are taken in descending score (ties:
// lower cluster index) until `budget` tokens; the last one is truncated to
// its EARLIEST positions, so the choice is deterministic and independent of
// key values the score does not see. TokensToAttend then adds the sinks, the
// recent window and the current token.
//
// Thread-safety: const methods may run concurrently; Build and AppendWindow
// need exclusive access (the usual rule for a value type).
#ifndef STRATA_KVTIER_CLUSTER_INDEX_H_
#define STRATA_KVTIER_CLUSTER_INDEX_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/profile.h"

namespace strata {
class ThreadPool;
}  // namespace strata

namespace strata::kvtier {

struct ClusterIndexOptions {
  int sink_tokens = 16;
  int tokens_per_cluster = 80;
  int kmeans_iterations = 20;
  int clusters_per_window = 8;
  uint64_t seed = 0;  // KMeansCosine seed of the prefill; windows derive theirs

  // The clusterkv fields of a profile's policy (clusters_per_window and seed
  // keep their defaults: the profile does not set them).
  static ClusterIndexOptions FromPolicy(const KvPolicyConfig& policy);
};

struct SelectedCluster {
  int32_t cluster = 0;  // index into the ClusterIndex
  float score = 0.0f;   // sum over the group's query heads of q . centroid
  int32_t tokens = 0;   // tokens taken: the cluster's size, or fewer if truncated
};

// Clusters in descending score order; only the last may be truncated.
struct Selection {
  std::vector<SelectedCluster> clusters;
  int64_t num_tokens = 0;  // sum of `tokens`: min(budget, clustered tokens)
};

class ClusterIndex {
 public:
  // keys: [n, head_dim] row-major, the keys of positions [0, n).
  // InvalidArgument on bad shapes, bad options or non-finite keys.
  static absl::StatusOr<ClusterIndex> Build(std::span<const float> keys, int head_dim,
                                            const ClusterIndexOptions& options,
                                            ThreadPool* pool = nullptr);

  // Clusters keys [w, head_dim] of positions `positions` (strictly ascending,
  // all >= next_position()) into min(clusters_per_window, w) new clusters.
  // An empty window is a no-op. On error the index is unchanged.
  absl::Status AppendWindow(std::span<const float> keys, std::span<const int32_t> positions,
                            ThreadPool* pool = nullptr);

  // queries: [g, head_dim], the query rows of this KV head's group (g >= 1).
  // budget >= 0 tokens (sinks and window excluded).
  absl::StatusOr<Selection> Select(std::span<const float> queries, int64_t budget) const;

  // The positions to attend, sorted and de-duplicated: [0, sink), the
  // selected tokens, the recent window [context_len - window, context_len)
  // and the current token, which is at position context_len (context_len
  // counts the tokens before it). Ranges are clipped at 0. InvalidArgument
  // when the selection does not fit this index or names a position at or
  // beyond context_len.
  absl::StatusOr<std::vector<int32_t>> TokensToAttend(const Selection& selection,
                                                      int64_t context_len, int sink,
                                                      int window) const;

  int head_dim() const { return head_dim_; }
  int num_clusters() const { return static_cast<int>(offsets_.size()) - 1; }
  int64_t num_clustered_tokens() const { return static_cast<int64_t>(positions_.size()); }
  // One past the last position indexed (sinks included); windows start here
  // or later.
  int32_t next_position() const { return next_position_; }
  const ClusterIndexOptions& options() const { return options_; }

  // Cluster i: its positions (ascending), size and centroid (raw key mean).
  std::span<const int32_t> positions(int cluster) const;
  int32_t size(int cluster) const { return offsets_[cluster + 1] - offsets_[cluster]; }
  std::span<const float> centroid(int cluster) const;

  // Flat views for kernels: positions of all clusters, cluster-major;
  // offsets [num_clusters + 1]; centroids [num_clusters, head_dim].
  std::span<const int32_t> all_positions() const { return positions_; }
  std::span<const int32_t> cluster_offsets() const { return offsets_; }
  std::span<const float> centroids() const { return centroids_; }

 private:
  ClusterIndex(int head_dim, const ClusterIndexOptions& options)
      : head_dim_(head_dim), options_(options) {}

  // Clusters `keys` (positions `pos`) into `clusters` and appends them.
  absl::Status AddClusters(std::span<const float> keys, std::span<const int32_t> pos, int clusters,
                           uint64_t seed, ThreadPool* pool);

  int head_dim_ = 0;
  ClusterIndexOptions options_;
  std::vector<int32_t> positions_;
  std::vector<int32_t> offsets_ = {0};
  std::vector<float> centroids_;
  int32_t next_position_ = 0;
  int64_t windows_appended_ = 0;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_CLUSTER_INDEX_H_
