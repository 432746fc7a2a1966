// ClusteringStore: ClusterKV clusterings of prompt chunks kept for reuse.
//
// A ClusterKV policy that clusters the prompt in aligned chunks
// (kv_policy.cluster_chunk_tokens) computes each chunk's clusters from that
// chunk's keys alone. When those keys lie in stored prefix pages (loaded
// from the store, or computed by the sequence and stored by it before it
// clustered them), the pages' CRCs name them exactly, so the clustering
// computed on them (per sparse layer and KV head: the reorder ClusterKeys
// applied, the centroids, the cluster sizes) holds for every later
// sequence that loads the same pages: that sequence reorders its keys by
// the stored order (Backend::ReorderKeys, a tenth of the k-means' time)
// and takes the centroids, with the tokens the k-means would have given.
//
// Values are opaque bytes to the store (KvPolicyRunner writes and reads
// them), kept in host memory under a 128-bit key, least recently used
// first out once the byte budget is full. Each value carries a masked
// CRC32C taken when it was put: one that no longer matches when it is
// taken is dropped and counted, and the caller clusters instead.
//
// Thread-safety: thread-safe (the runners of a tensor-parallel group share
// one store).
#ifndef STRATA_KVTIER_CLUSTERING_STORE_H_
#define STRATA_KVTIER_CLUSTERING_STORE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "kvtier/prefix_index.h"
#include "kvtier/profile.h"

namespace strata::kvtier {

class ClusteringStore {
 public:
  struct Stats {
    int64_t entries = 0;
    int64_t bytes = 0;    // of the values stored now
    int64_t stored = 0;   // values put
    int64_t refused = 0;  // ... larger than the whole budget
    int64_t evicted = 0;  // dropped for room
    int64_t hits = 0;     // Take calls that found their key
    int64_t misses = 0;   // ... that did not
    int64_t lost = 0;     // values that failed their CRC (dropped)
  };

  explicit ClusteringStore(int64_t budget_bytes) : budget_bytes_(budget_bytes) {}

  int64_t budget_bytes() const { return budget_bytes_; }
  // Stores `value` under `key` (replacing what was there), evicting the
  // least recently used values while it does not fit; false (nothing
  // stored) when it is larger than the budget.
  bool Put(const PrefixKey& key, std::vector<uint8_t> value);
  // A copy of the value under `key`, which becomes the most recently used;
  // nullopt when there is none, or when it fails its CRC (then dropped).
  std::optional<std::vector<uint8_t>> Take(const PrefixKey& key);
  Stats stats() const;

  // Tests: flips one bit of byte `offset` of every stored value that has
  // one; returns how many. With `keep_crc`, the CRC is taken again after
  // (a value wrong in content that its CRC does not catch).
  int FlipBitsForTesting(size_t offset, bool keep_crc = false);

 private:
  struct Entry {
    std::vector<uint8_t> value;
    uint32_t crc = 0;  // masked CRC32C of value
    std::list<PrefixKey>::iterator lru;
  };
  void EraseLocked(absl::flat_hash_map<PrefixKey, Entry>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t budget_bytes_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<PrefixKey, Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::list<PrefixKey> lru_ ABSL_GUARDED_BY(mu_);  // least recently used first
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

// The store a server's profiles call for: one when a ClusterKV profile
// stores prefixes (tiers.prefix_bytes), of a sixteenth of their prefix
// bytes together (a clustering is about 2% of its pages' bf16 KV at 80
// tokens a cluster: its reorder, 4 bytes a token, and its centroids per KV
// head and sparse layer); null otherwise.
std::unique_ptr<ClusteringStore> ClusteringStoreForProfiles(const std::vector<KvProfile>& profiles);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_CLUSTERING_STORE_H_
