#include "kvtier/clustering_store.h"

#include <utility>

#include "common/crc32c.h"

namespace strata::kvtier {

bool ClusteringStore::Put(const PrefixKey& key, std::vector<uint8_t> value) {
  const auto bytes = static_cast<int64_t>(value.size());
  absl::MutexLock lock(&mu_);
  if (auto it = entries_.find(key); it != entries_.end()) EraseLocked(it);
  if (bytes > budget_bytes_) {
    ++stats_.refused;
    return false;
  }
  while (stats_.bytes + bytes > budget_bytes_ && !lru_.empty()) {
    EraseLocked(entries_.find(lru_.front()));
    ++stats_.evicted;
  }
  Entry entry;
  entry.crc = MaskCrc(Crc32c(value.data(), value.size()));
  entry.value = std::move(value);
  entry.lru = lru_.insert(lru_.end(), key);
  entries_.emplace(key, std::move(entry));
  stats_.bytes += bytes;
  ++stats_.entries;
  ++stats_.stored;
  return true;
}

std::optional<std::vector<uint8_t>> ClusteringStore::Take(const PrefixKey& key) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    ++stats_.misses;
    return std::nullopt;
  }
  Entry& entry = it->second;
  if (MaskCrc(Crc32c(entry.value.data(), entry.value.size())) != entry.crc) {
    ++stats_.lost;
    EraseLocked(it);
    return std::nullopt;
  }
  ++stats_.hits;
  lru_.splice(lru_.end(), lru_, entry.lru);
  return entry.value;
}

ClusteringStore::Stats ClusteringStore::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

int ClusteringStore::FlipBitsForTesting(size_t offset, bool keep_crc) {
  absl::MutexLock lock(&mu_);
  int flipped = 0;
  for (auto& [key, entry] : entries_) {
    if (offset >= entry.value.size()) continue;
    entry.value[offset] ^= 0x10;
    if (keep_crc) entry.crc = MaskCrc(Crc32c(entry.value.data(), entry.value.size()));
    ++flipped;
  }
  return flipped;
}

void ClusteringStore::EraseLocked(absl::flat_hash_map<PrefixKey, Entry>::iterator it) {
  stats_.bytes -= static_cast<int64_t>(it->second.value.size());
  --stats_.entries;
  lru_.erase(it->second.lru);
  entries_.erase(it);
}

std::unique_ptr<ClusteringStore> ClusteringStoreForProfiles(
    const std::vector<KvProfile>& profiles) {
  int64_t prefix_bytes = 0;
  for (const KvProfile& p : profiles) {
    if (p.policy.type == "clusterkv") prefix_bytes += p.tiers.prefix_bytes;
  }
  if (prefix_bytes <= 0) return nullptr;
  return std::make_unique<ClusteringStore>(prefix_bytes / 16);
}

}  // namespace strata::kvtier
