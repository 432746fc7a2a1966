// RankSharedTier: what the KV policy runners of a tensor-parallel group's
// ranks share when their ClusterKV clusters are homed in the host tier
// (kvtier::RankedKvPolicies, KvTierOptions::shared).
//
// Each rank's runner clusters and offloads its own KV heads from its own
// thread, inside a step, while the other ranks do the same. So:
//  - their calls into the one block manager (host regions, SSD charges)
//    are serialised by Lock();
//  - a sequence's GPU ring is the same page ids on every rank, each rank's
//    ring rows lying in its own caches: the first rank to take a
//    sequence's ring takes the pages from the manager, the others take
//    those same pages (or the same refusal), and the pages go back when the
//    last rank gives them back. N ranks thus hold one ring's pages, not N.
//
// Rings are matched by (sequence id, round): each rank counts the rings it
// has taken for a sequence, and the ranks take them alike because they
// plan the same sequences in the same steps.
//
// Thread-safety: thread-safe.
#ifndef STRATA_KVTIER_RANK_SHARED_TIER_H_
#define STRATA_KVTIER_RANK_SHARED_TIER_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/kv_memory.h"
#include "kvtier/kv_block_manager.h"

namespace strata::kvtier {

class RankSharedTier {
 public:
  RankSharedTier(KvBlockManager* manager, int ranks) : manager_(manager), ranks_(ranks) {}
  RankSharedTier(const RankSharedTier&) = delete;
  RankSharedTier& operator=(const RankSharedTier&) = delete;

  // Held around a runner's other calls into the manager. Not while calling
  // TakeRing or GiveRing, which take it themselves.
  std::unique_lock<std::mutex> Lock() { return std::unique_lock<std::mutex>(mu_); }

  // The pages of round `round` of sequence `seq_id`'s ring (`count` pages
  // of `group`) into `pages`: false when the manager had too few free.
  bool TakeRing(int64_t seq_id, int64_t round, engine::PageGroup group, int count,
                std::vector<int32_t>& pages);
  // Gives this rank's hold on that ring back (`pages` is cleared); the last
  // rank's returns the pages to the manager.
  absl::Status GiveRing(int64_t seq_id, int64_t round, engine::PageGroup group,
                        std::vector<int32_t>& pages);

  // Rings some rank holds or not every rank has taken yet (tests).
  size_t rings_in_use() const;

 private:
  struct Ring {
    std::vector<int32_t> pages;
    bool refused = false;
    int takers = 0;   // ranks that took it (up to ranks_)
    int holders = 0;  // ranks that took it and have not given it back
  };

  KvBlockManager* const manager_;
  const int ranks_;
  mutable std::mutex mu_;
  std::map<std::pair<int64_t, int64_t>, Ring> rings_;  // guarded by mu_
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_RANK_SHARED_TIER_H_
