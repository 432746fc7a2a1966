#include "kvtier/rank_shared_tier.h"

#include "absl/strings/str_cat.h"

namespace strata::kvtier {

bool RankSharedTier::TakeRing(int64_t seq_id, int64_t round, engine::PageGroup group, int count,
                              std::vector<int32_t>& pages) {
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, fresh] = rings_.try_emplace({seq_id, round});
  Ring& ring = it->second;
  if (fresh) ring.refused = !manager_->AllocatePages(group, count, ring.pages);
  ++ring.takers;
  if (ring.refused) {
    // Nothing to give back: forgotten once every rank has been refused.
    if (ring.takers >= ranks_) rings_.erase(it);
    return false;
  }
  ++ring.holders;
  pages = ring.pages;
  return true;
}

absl::Status RankSharedTier::GiveRing(int64_t seq_id, int64_t round, engine::PageGroup group,
                                      std::vector<int32_t>& pages) {
  pages.clear();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = rings_.find({seq_id, round});
  if (it == rings_.end() || it->second.holders == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring ", round, " of sequence ", seq_id, " is not held"));
  }
  Ring& ring = it->second;
  if (--ring.holders > 0) return absl::OkStatus();
  // The last hold: the pages go back. A rank that has not taken this ring
  // yet (the ranks plan alike, so none should) would take a fresh one.
  absl::Status freed = manager_->FreePages(group, ring.pages);
  rings_.erase(it);
  return freed;
}

size_t RankSharedTier::rings_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return rings_.size();
}

}  // namespace strata::kvtier
