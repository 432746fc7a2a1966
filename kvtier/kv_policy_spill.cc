// KvPolicyRunner: host-homed clusters sent below the host tier, to the SSD
// (kvtier/cluster_spill.h; the runner's file comment in kv_policy.h).
#include <algorithm>
#include <chrono>
#include <limits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/kv_codec.h"
#include "kvtier/kv_policy.h"

namespace strata::kvtier {
namespace {

// Steps a sequence whose clusters the SSD refused waits before asking again.
constexpr int64_t kSpillRetrySteps = 64;

}  // namespace

bool KvPolicyRunner::Spills(int policy) const {
  if (spill_ == nullptr || !TierCodec(policy).has_value()) return false;
  const auto& admission = options_.tier.spill_admission;
  return policy < static_cast<int>(admission.size()) &&
         admission[policy] != KvBlockManagerOptions::SsdAdmission::kNever;
}

bool KvPolicyRunner::EnsureStaging() {
  if (staging_.has_value()) return true;
  // A layer's fetches for every sparse sequence: each (sequence, KV head)
  // takes at most a ring's worth of tokens, in clusters of a few tokens at
  // least, in the largest codec (raw).
  const engine::ModelConfig& config = model_->config();
  const int64_t units = engine::KvPieceUnitsBound(engine::KvCodecKind::kBf16, config.head_dim,
                                                  model_->kv_cache_dtype(), ring_.ring_rows,
                                                  ring_.ring_rows / 16 + 1);
  const int64_t bytes =
      units * engine::kKvHostUnit * model_->shard().kv_heads * options_.max_sparse_seqs;
  {
    std::unique_lock<std::mutex> lock = LockManager();
    staging_ = options_.tier.manager->AllocateHostRegion(bytes);
  }
  if (!staging_.has_value()) return false;
  spill_->SetStaging(staging_->offset, staging_->bytes);
  return true;
}

void KvPolicyRunner::MaybeFreeStaging() {
  if (!staging_.has_value()) return;
  const ClusterSpill::Stats s = spill_->stats();
  if (s.sequences > 0 || s.batches_in_flight > 0) return;
  // No piece is below host: no step fetches into it.
  spill_->SetStaging(0, 0);
  std::unique_lock<std::mutex> lock = LockManager();
  options_.tier.manager->FreeHostRegion(*staging_);
  staging_.reset();
}

absl::Status KvPolicyRunner::StartSpill(int64_t id, Sequence& seq) {
  engine::Backend& b = model_->backend();
  const engine::ModelConfig& config = model_->config();
  const int hkv = model_->shard().kv_heads, slot = seq.state.slot;
  const int max_blocks = static_cast<int>(extents_[0].dim(2));
  const int stride = std::max(1, options_.tier.spill_stride);
  const engine::HostBuffer& host = ring_.host;
  ClusterSpill::Batch batch;
  batch.seq_id = id;
  batch.slot = slot;
  Sequence::PendingSpill pending;
  pending.piece_host.resize(config.num_layers);
  std::vector<int32_t> base, where, count, ext;
  for (int l = 0; l < config.num_layers; ++l) {
    engine::TierTables t = SlotTables(l, slot);
    count.resize(hkv);
    STRATA_RETURN_IF_ERROR(b.CopyToHost(t.piece_count, count.data()));
    if (std::all_of(count.begin(), count.end(), [](int32_t c) { return c == 0; })) continue;
    base.resize(t.piece_base.numel());
    where.resize(t.piece_host.numel());
    ext.resize(int64_t{hkv} * max_blocks * 2);
    STRATA_RETURN_IF_ERROR(b.CopyToHost(t.piece_base, base.data()));
    STRATA_RETURN_IF_ERROR(b.CopyToHost(t.piece_host, where.data()));
    STRATA_RETURN_IF_ERROR(b.CopyToHost(extents_[l].Row(slot), ext.data()));
    pending.piece_host[l].resize(hkv);
    for (int h = 0; h < hkv; ++h) {
      std::vector<int32_t> marked(where.begin() + int64_t{h} * max_pieces_,
                                  where.begin() + int64_t{h} * max_pieces_ + count[h]);
      bool any = false;
      for (int blk = 0; blk < seq.state.num_blocks && blk < max_blocks; ++blk) {
        const int32_t first = base[int64_t{h} * max_blocks + blk];
        if (first < 0 || blk % stride != 0) continue;
        const int32_t size = ext[(int64_t{h} * max_blocks + blk) * 2 + 1];
        const int32_t pieces = (size + engine::kKvPieceTokens - 1) / engine::kKvPieceTokens;
        if (pieces == 0 || first + pieces > count[h]) continue;
        if (marked[first] == engine::kPieceBelowHost) continue;  // down already
        // A cluster's pieces lie one after another in its head's part of
        // the region (OffloadBlocks): one value, copied as it lies.
        const int64_t start = int64_t{marked[first]} * engine::kKvHostUnit;
        const int64_t last = int64_t{marked[first + pieces - 1]} * engine::kKvHostUnit;
        if (start < 0 || last < start || last >= static_cast<int64_t>(host.bytes)) {
          return absl::InternalError(absl::StrCat("sequence ", id, " layer ", l, " head ", h,
                                                  " cluster ", blk, ": pieces out of place"));
        }
        const size_t last_bytes = engine::KvCodec::DeclaredBytes(
            std::span<const uint8_t>(host.data() + last, host.bytes - last));
        if (last_bytes == 0) {
          return absl::InternalError(absl::StrCat("sequence ", id, " layer ", l, " head ", h,
                                                  " cluster ", blk,
                                                  ": no block at its last piece"));
        }
        ClusterSpill::Cluster c;
        c.layer = static_cast<uint16_t>(l);
        c.head = static_cast<uint16_t>(h);
        c.block = static_cast<uint32_t>(blk);
        c.first_piece = first;
        c.host_offset = start;
        c.bytes = last + static_cast<int64_t>(last_bytes) - start;
        for (int32_t p = first; p < first + pieces; ++p) {
          const int64_t offset = int64_t{marked[p]} * engine::kKvHostUnit - start;
          if (marked[p] < 0 || offset < 0 || offset >= c.bytes) {
            return absl::InternalError(absl::StrCat("sequence ", id, " layer ", l, " head ", h,
                                                    " cluster ", blk, ": pieces out of place"));
          }
          c.piece_offsets.push_back(offset);
          marked[p] = engine::kPieceBelowHost;
        }
        batch.clusters.push_back(std::move(c));
        any = true;
      }
      if (any) pending.piece_host[l][h] = std::move(marked);
    }
  }
  if (stride > 1) seq.strided_spill_done = true;
  if (batch.clusters.empty()) return absl::OkStatus();
  for (const ClusterSpill::Cluster& c : batch.clusters) pending.bytes += c.bytes;
  {
    std::unique_lock<std::mutex> lock = LockManager();
    if (!options_.tier.manager->ChargeSsd(seq.policy, pending.bytes)) {
      // Past its workload's SSD line: the clusters stay in host memory.
      ++spills_over_line_;
      seq.spill_retry_step = step_count_ + kSpillRetrySteps;
      return absl::OkStatus();
    }
    seq.ssd_charged += pending.bytes;
    if (seq.spill_owner == 0) seq.spill_owner = options_.tier.manager->NewSsdOwner();
  }
  pending.tag = next_spill_tag_++;
  pending.clusters = static_cast<int64_t>(batch.clusters.size());
  batch.tag = pending.tag;
  if (stride == 1) {
    // Every cluster of these regions goes: they are freed once it is
    // stored, and the next offload starts a region of its own.
    pending.regions = std::move(seq.regions);
    seq.regions.clear();
    seq.tail_units = 0;
  }
  seq.pending_spill = std::move(pending);
  spill_->Write(seq.spill_owner, std::move(batch));
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::FinishSpill(Sequence& seq, bool stored) {
  Sequence::PendingSpill pending = std::move(*seq.pending_spill);
  seq.pending_spill.reset();
  if (!stored) {
    // The clusters stay in host memory; the SSD is asked again later (it
    // may have room once other sequences end), not at every step.
    {
      std::unique_lock<std::mutex> lock = LockManager();
      options_.tier.manager->RefundSsd(seq.policy, pending.bytes);
    }
    seq.ssd_charged -= pending.bytes;
    for (const KvBlockManager::HostRegion& r : pending.regions) seq.regions.push_back(r);
    seq.spill_retry_step = step_count_ + kSpillRetrySteps;
    return absl::OkStatus();
  }
  // Steps end synchronised: no recall reads these tables or regions now.
  engine::Backend& b = model_->backend();
  const int hkv = model_->shard().kv_heads;
  for (size_t l = 0; l < pending.piece_host.size(); ++l) {
    for (int h = 0; h < static_cast<int>(pending.piece_host[l].size()); ++h) {
      const std::vector<int32_t>& marked = pending.piece_host[l][h];
      if (marked.empty()) continue;
      STRATA_RETURN_IF_ERROR(
          b.CopyFromHost(marked.data(), engine::DType::kI32, static_cast<int64_t>(marked.size()),
                         tier_[l].piece_host, (int64_t{seq.state.slot} * hkv + h) * max_pieces_));
    }
  }
  {
    std::unique_lock<std::mutex> lock = LockManager();
    for (const KvBlockManager::HostRegion& r : pending.regions) {
      options_.tier.manager->FreeHostRegion(r);
    }
  }
  // The first batch's own room makes the staging area's when the host
  // tier is full; without one every fetch fails and the sequences that
  // need a cluster from below are recomputed.
  if (!EnsureStaging()) {
    STRATA_LOG_WARN("no host memory for the staging area of clusters fetched from the SSD");
  }
  seq.spilled = true;
  ++stats_.spills;
  stats_.spilled_clusters += pending.clusters;
  return absl::OkStatus();
}

absl::StatusOr<bool> KvPolicyRunner::StartPromotion(int64_t id, Sequence& seq) {
  const int64_t bytes = spill_->PromotionBytes(id);
  if (bytes == 0) return false;
  std::optional<KvBlockManager::HostRegion> region;
  {
    std::unique_lock<std::mutex> lock = LockManager();
    KvBlockManager& manager = *options_.tier.manager;
    region = manager.AllocateHostRegion(bytes, seq.policy);
    // Room means staying at or below the mark that would send clusters
    // down again: a promotion must not make the next spill.
    if (region.has_value() &&
        (manager.HostUsedShare() > options_.tier.spill_high_water ||
         manager.WorkloadHostShare(seq.policy) > options_.tier.spill_high_water)) {
      manager.FreeHostRegion(*region);
      region.reset();
    }
  }
  if (!region.has_value()) return false;
  seq.pending_promotion =
      Sequence::PendingPromotion{next_spill_tag_++, *region, std::chrono::steady_clock::now()};
  spill_->Promote(id, region->offset, seq.pending_promotion->tag);
  return true;
}

absl::Status KvPolicyRunner::FinishPromotion(int64_t id, Sequence& seq,
                                             ClusterSpill::Promotion& promotion) {
  const Sequence::PendingPromotion pending = *seq.pending_promotion;
  seq.pending_promotion.reset();
  if (promotion.clusters.empty()) {
    // None could be read: they stay on the SSD, fetched as before.
    std::unique_lock<std::mutex> lock = LockManager();
    options_.tier.manager->FreeHostRegion(pending.region);
    seq.promote_retry_step = step_count_ + kSpillRetrySteps;
    return absl::OkStatus();
  }
  // Steps end synchronised: no recall reads these tables now. Each
  // (layer, head) the promotion touches: its piece places as they are,
  // the promoted pieces pointed at their host copies; all checked before
  // any is written, so a promotion that does not fit the tables changes
  // nothing (the region stays the sequence's, freed with it).
  engine::Backend& b = model_->backend();
  const int hkv = model_->shard().kv_heads;
  std::sort(promotion.clusters.begin(), promotion.clusters.end(),
            [](const ClusterSpill::PromotedCluster& a, const ClusterSpill::PromotedCluster& c) {
              return std::pair(a.layer, a.head) < std::pair(c.layer, c.head);
            });
  struct Row {
    int layer = 0, head = 0;
    std::vector<int32_t> places;
  };
  std::vector<Row> rows;
  absl::Status fits = absl::OkStatus();
  int64_t bytes = 0;
  std::vector<int32_t> where;
  for (size_t i = 0; i < promotion.clusters.size() && fits.ok();) {
    const int layer = promotion.clusters[i].layer, head = promotion.clusters[i].head;
    if (layer >= static_cast<int>(tier_.size()) || head >= hkv) {
      fits = absl::InternalError(absl::StrCat("sequence ", id, ": a promoted cluster of layer ",
                                              layer, " head ", head, " is out of the model"));
      break;
    }
    const engine::TierTables t = SlotTables(layer, seq.state.slot);
    where.resize(static_cast<size_t>(t.piece_host.numel()));
    fits = b.CopyToHost(t.piece_host, where.data());
    if (!fits.ok()) break;
    Row row{layer, head,
            std::vector<int32_t>(where.begin() + int64_t{head} * max_pieces_,
                                 where.begin() + int64_t{head + 1} * max_pieces_)};
    for (; i < promotion.clusters.size() && promotion.clusters[i].layer == layer &&
           promotion.clusters[i].head == head && fits.ok();
         ++i) {
      const ClusterSpill::PromotedCluster& c = promotion.clusters[i];
      for (size_t p = 0; p < c.piece_offsets.size(); ++p) {
        const int64_t piece = c.first_piece + static_cast<int64_t>(p);
        if (piece < 0 || piece >= max_pieces_ || row.places[piece] != engine::kPieceBelowHost) {
          fits = absl::InternalError(absl::StrCat("sequence ", id, " layer ", layer, " head ", head,
                                                  ": promoted piece ", piece,
                                                  " was not below host memory"));
          break;
        }
        row.places[piece] =
            static_cast<int32_t>((c.host_offset + c.piece_offsets[p]) / engine::kKvHostUnit);
      }
      bytes += c.bytes;
    }
    rows.push_back(std::move(row));
  }
  seq.regions.push_back(pending.region);
  if (!fits.ok()) {
    seq.promote_retry_step = std::numeric_limits<int64_t>::max();
    return fits;
  }
  for (const Row& row : rows) {
    STRATA_RETURN_IF_ERROR(b.CopyFromHost(
        row.places.data(), engine::DType::kI32, max_pieces_, tier_[row.layer].piece_host,
        (int64_t{seq.state.slot} * hkv + row.head) * max_pieces_));
  }
  spill_->Promoted(id, promotion.clusters);
  {
    std::unique_lock<std::mutex> lock = LockManager();
    options_.tier.manager->RefundSsd(seq.policy, bytes);
  }
  seq.ssd_charged -= bytes;
  seq.spilled = spill_->HasClusters(id);
  // Some could not be read: not asked again at every step.
  if (seq.spilled) seq.promote_retry_step = step_count_ + kSpillRetrySteps;
  ++stats_.promotions;
  stats_.promoted_clusters += static_cast<int64_t>(promotion.clusters.size());
  stats_.promoted_bytes += bytes;
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::PollSpill() {
  if (spill_ == nullptr) return absl::OkStatus();
  for (ClusterSpill::Promotion& promotion : spill_->PollPromotions()) {
    auto it = sequences_.find(promotion.seq_id);
    if (it == sequences_.end() || !it->second.pending_promotion.has_value() ||
        it->second.pending_promotion->tag != promotion.tag) {
      continue;  // released meanwhile: its region went with it
    }
    STRATA_RETURN_IF_ERROR(FinishPromotion(promotion.seq_id, it->second, promotion));
  }
  for (const ClusterSpill::Done& done : spill_->Poll()) {
    if (done.forgotten) {
      // A released sequence's write the SSD held returned: its host
      // memory is free now.
      auto orphan = orphaned_regions_.find(done.seq_id);
      if (orphan == orphaned_regions_.end()) continue;
      {
        std::unique_lock<std::mutex> lock = LockManager();
        for (const KvBlockManager::HostRegion& r : orphan->second) {
          options_.tier.manager->FreeHostRegion(r);
        }
      }
      orphaned_regions_.erase(orphan);
      continue;
    }
    auto it = sequences_.find(done.seq_id);
    if (it == sequences_.end() || !it->second.pending_spill.has_value() ||
        it->second.pending_spill->tag != done.tag) {
      continue;
    }
    if (!done.status.ok()) {
      STRATA_LOG_WARN("sequence {}: clusters stay in host memory: {}", done.seq_id,
                      done.status.ToString());
    }
    STRATA_RETURN_IF_ERROR(FinishSpill(it->second, done.status.ok()));
  }
  // One batch or promotion at a time: the next starts when the last is
  // applied. A promotion the SSD holds past the fetch timeout (a disk that
  // stops answering) holds no batch of another sequence up.
  bool writing = false;
  const auto now = std::chrono::steady_clock::now();
  for (const auto& [id, seq] : sequences_) {
    writing |= seq.pending_spill.has_value() ||
               (seq.pending_promotion.has_value() &&
                now - seq.pending_promotion->started < options_.tier.spill_fetch_timeout);
  }
  bool pressure = offload_refused_since_poll_;
  {
    std::unique_lock<std::mutex> lock = LockManager();
    pressure |= options_.tier.manager->HostUsedShare() > options_.tier.spill_high_water;
  }
  offload_refused_since_poll_ = false;
  if (!writing) {
    Sequence* pick = nullptr;
    int64_t pick_id = 0;
    auto colder = [](const Sequence& a, const Sequence& b) {
      if (a.ring_paused != b.ring_paused) return a.ring_paused;
      return a.last_step < b.last_step;
    };
    for (auto& [id, seq] : sequences_) {
      // An admitted import waiting for its first step has no clusters in
      // its tables yet to send down.
      if (!Spills(seq.policy) || seq.regions.empty() || seq.strided_spill_done ||
          seq.spill_retry_step > step_count_ || seq.pending_promotion.has_value() ||
          seq.admission.has_value()) {
        continue;
      }
      const bool always =
          options_.tier.spill_admission[seq.policy] == KvBlockManagerOptions::SsdAdmission::kAlways;
      if (!always && !pressure) {
        double share;
        {
          std::unique_lock<std::mutex> held = LockManager();
          share = options_.tier.manager->WorkloadHostShare(seq.policy);
        }
        if (share <= options_.tier.spill_high_water) continue;
      }
      if (pick == nullptr || colder(seq, *pick)) {
        pick = &seq;
        pick_id = id;
      }
    }
    if (pick != nullptr) {
      if (absl::Status s = StartSpill(pick_id, *pick); !s.ok()) {
        // Its clusters stay in host memory; serving goes on.
        STRATA_LOG_ERROR("sequence {}: clusters not sent to the SSD: {}", pick_id, s.ToString());
        pick->spill_retry_step = std::numeric_limits<int64_t>::max();
      }
    } else if (!pressure && !spill_->stats().stalled) {
      // Ahead of the steps that would fetch its clusters one by one: a
      // sequence on the SSD that ran in the last step comes back up (not
      // one sent down every n-th cluster: its host copies stayed).
      for (auto& [id, seq] : sequences_) {
        if (!seq.spilled || seq.ring_paused || seq.last_step != step_count_ ||
            seq.strided_spill_done || seq.pending_promotion.has_value() ||
            seq.promote_retry_step > step_count_ || !Spills(seq.policy) ||
            options_.tier.spill_admission[seq.policy] !=
                KvBlockManagerOptions::SsdAdmission::kCold) {
          continue;
        }
        STRATA_ASSIGN_OR_RETURN(const bool started, StartPromotion(id, seq));
        if (started) break;
        seq.promote_retry_step = step_count_ + kSpillRetrySteps;
      }
    }
  }
  MaybeFreeStaging();
  const ClusterSpill::Stats s = spill_->stats();
  stats_.spills_refused = s.batches_refused + spills_over_line_;
  stats_.hard_misses = s.hard_misses;
  stats_.hard_miss_bytes = s.bytes_read;
  stats_.hard_miss_micros = s.fetch_micros;
  stats_.hard_miss_failed = s.fetches_failed;
  stats_.hard_miss_timeouts = s.fetch_timeouts;
  stats_.read_ahead_clusters = s.read_ahead_clusters;
  stats_.read_ahead_bytes = s.read_ahead_bytes;
  stats_.read_ahead_used = s.read_ahead_used;
  stats_.spill_writes_abandoned = s.forget_timeouts;
  stats_.ssd_cluster_bytes = s.bytes_resident;
  return absl::OkStatus();
}

absl::StatusOr<bool> KvPolicyRunner::SettleSpills(std::chrono::milliseconds timeout) {
  if (spill_ == nullptr) return true;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    STRATA_RETURN_IF_ERROR(PollSpill());
    bool busy = false;
    for (const auto& [id, seq] : sequences_) {
      busy |= seq.pending_spill.has_value() || seq.pending_promotion.has_value();
      // A batch PollSpill would start next (admission kAlways).
      busy |=
          Spills(seq.policy) && !seq.regions.empty() && !seq.strided_spill_done &&
          seq.spill_retry_step <= step_count_ && !seq.admission.has_value() &&
          options_.tier.spill_admission[seq.policy] == KvBlockManagerOptions::SsdAdmission::kAlways;
    }
    if (!busy) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace strata::kvtier
