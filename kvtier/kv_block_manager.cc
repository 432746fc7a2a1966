#include "kvtier/kv_block_manager.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace strata::kvtier {

absl::StatusOr<std::unique_ptr<KvBlockManager>> KvBlockManager::Create(
    engine::Model* model, const KvBlockManagerOptions& options) {
  if (options.host_bytes < 0) {
    return absl::InvalidArgumentError("KV block manager: host_bytes must be >= 0");
  }
  if (options.prefix_bytes < 0 || options.prefix_bytes > options.host_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block manager: prefix_bytes ", options.prefix_bytes,
                     " must be in [0, host_bytes ", options.host_bytes,
                     "]: stored prefixes live in the host "
                     "tier"));
  }
  if (options.ssd_prefix_bytes < 0 ||
      (options.ssd_prefix_bytes > 0 && (options.ssd == nullptr || options.prefix_bytes == 0))) {
    return absl::InvalidArgumentError(
        "KV block manager: ssd_prefix_bytes > 0 needs an SSD tier and prefix_bytes > 0 (prefix "
        "pages pass through the host tier)");
  }
  if (options.ssd != nullptr &&
      (options.host_bytes == 0 || !(options.ssd_high_water > 0 && options.ssd_high_water <= 1) ||
       options.io_threads < 1)) {
    return absl::InvalidArgumentError(
        "KV block manager: an SSD tier needs a host tier, ssd_high_water in (0, 1] and "
        "io_threads >= 1");
  }
  if (options.landing_bytes < 0 ||
      options.landing_bytes > options.host_bytes - options.prefix_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block manager: landing_bytes ", options.landing_bytes,
                     " must be in [0, host_bytes ", options.host_bytes, " - prefix_bytes ",
                     options.prefix_bytes, "]: received KV lands in the host tier"));
  }
  STRATA_ASSIGN_OR_RETURN(KvLayout layout, KvLayout::Create(*model));
  STRATA_ASSIGN_OR_RETURN(
      HostPool host, HostPool::Create(model->backend(), options.host_bytes, layout.record_bytes()));
  std::unique_ptr<KvBlockManager> manager(
      new KvBlockManager(model, std::move(layout), std::move(host), options));
  if (options.landing_bytes > 0) {
    HostPool& host = manager->host_;
    const int records = static_cast<int>(options.landing_bytes / host.record_stride());
    std::vector<int32_t> landing;
    if (records < 1 || !host.Allocate(records, landing)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KV block manager: landing_bytes ", options.landing_bytes, " hold ", records,
          " records of ", host.record_stride(), " bytes; the host tier has ", host.num_free()));
    }
    // The landing area's for good: resident, never released.
    for (int32_t r : landing) host.Unref(r);
    manager->landing_ = std::make_unique<LandingArea>(
        std::move(landing), reinterpret_cast<std::byte*>(host.buffer().data()),
        host.record_stride(), host.record_bytes());
  }
  if (options.ssd != nullptr) STRATA_RETURN_IF_ERROR(manager->IndexSsdPrefixes());
  return manager;
}

KvBlockManager::KvBlockManager(engine::Model* model, KvLayout layout, HostPool host,
                               const KvBlockManagerOptions& options)
    : model_(model),
      device_(std::make_unique<KvDevice>(*model, 2 * layout.num_layers())),
      layout_(std::move(layout)),
      pages_(layout_.num_pages(engine::PageGroup::kLower)),
      upper_pages_(layout_.num_pages(engine::PageGroup::kUpper)),
      host_(std::move(host)),
      options_(options),
      prefixes_(layout_.page_size()) {
  if (layout_.record_bytes() > 0) {
    max_prefix_records_ = static_cast<int>(
        std::min<int64_t>(options_.prefix_bytes / layout_.record_bytes(), host_.num_records()));
  }
  crc_pool_ = std::make_unique<ThreadPool>(std::max(options_.crc_threads, 1));
  if (options_.ssd != nullptr) {
    mover_ =
        std::make_unique<RecordMover>(options_.ssd, options_.io_threads, options_.ssd_before_read);
  }
}

KvBlockManager::~KvBlockManager() {
  if (mover_ == nullptr) return;
  mover_.reset();  // the running moves finish
  // Moves that finished and those never started alike: no key may stay.
  for (const auto& [job, move] : moves_) {
    (void)options_.ssd->DeleteOwner(SsdKey::Owner::kSequence, move.swap_id);
  }
  for (const auto& [id, swapped] : swapped_) {
    if (swapped.tier != Tier::kHost) {
      (void)options_.ssd->DeleteOwner(SsdKey::Owner::kSequence, swapped.swap_id);
    }
  }
}

bool KvBlockManager::AllocatePages(engine::PageGroup group, int count,
                                   std::vector<int32_t>& pages) {
  return pool(group).Allocate(count, pages);
}

absl::Status KvBlockManager::FreePages(engine::PageGroup group, std::vector<int32_t>& pages) {
  std::erase(pages, engine::kPageOffGpu);
  return pool(group).Free(pages);
}

absl::StatusOr<bool> KvBlockManager::SwapOut(int64_t seq_id, engine::SequencePages& pages,
                                             int tokens) {
  const int page_size = layout_.page_size();
  const int needed = (tokens + page_size - 1) / page_size;
  const bool two_groups = upper_pages_.num_pages() > 0;
  if (tokens < 1 || needed > static_cast<int>(pages.lower.size()) ||
      (two_groups ? pages.upper.size() != pages.lower.size() : !pages.upper.empty())) {
    return absl::InvalidArgumentError(absl::StrCat("swap-out of sequence ", seq_id, ": ", tokens,
                                                   " tokens in ", pages.lower.size(), " lower and ",
                                                   pages.upper.size(), " upper pages"));
  }
  if (swapped_.contains(seq_id)) {
    return absl::FailedPreconditionError(
        absl::StrCat("swap-out of sequence ", seq_id, ": already swapped"));
  }
  // A workload at its line pauses no more sequences in host memory (they
  // are recomputed), whatever room the others leave.
  if (const int64_t limit = WorkloadRecordLimit(pages.workload);
      limit >= 0 && WorkloadHostBytes(pages.workload) / host_.record_bytes() + needed > limit) {
    ++counters_.swap_outs_refused;
    return false;
  }
  Swapped swapped;
  swapped.tokens = tokens;
  swapped.pages = needed;
  swapped.workload = pages.workload;
  swapped.swap_id = next_swap_id_++;
  // Stored prefixes give way to a paused sequence (at once: no SSD write).
  while (host_.num_free() < needed && EvictHostPrefix(/*to_ssd=*/false)) {
  }
  if (!host_.Allocate(needed, swapped.records)) {
    ++counters_.swap_outs_refused;
    // With an SSD below, make room for the next one that large.
    if (mover_ != nullptr) wanted_free_records_ = std::max(wanted_free_records_, needed);
    return false;
  }
  copies_.clear();
  for (int i = 0; i < needed; ++i) {
    const int32_t upper = two_groups ? pages.upper[i] : engine::kPageOffGpu;
    if (two_groups) swapped.upper_off_gpu.push_back(upper == engine::kPageOffGpu);
    layout_.AppendRecordCopies(pages.lower[i], upper, host_.offset(swapped.records[i]), copies_);
  }
  absl::StatusOr<engine::CopyFence> fence = EnqueueCopies(/*to_host=*/true);
  if (!fence.ok()) {
    // Nothing is running (or the stream is broken): the pages stay with
    // the sequence, the records go back.
    for (int32_t r : swapped.records) {
      host_.Release(r);
      host_.Unref(r);
    }
    return fence.status();
  }
  swapped.fence = *fence;
  STRATA_RETURN_IF_ERROR(Free(pages));
  ++counters_.swap_outs;
  counters_.bytes_to_host += needed * layout_.record_bytes();
  swapped_.emplace(seq_id, std::move(swapped));
  return true;
}

absl::StatusOr<engine::CopyFence> KvBlockManager::EnqueueCopies(bool to_host) {
  KvDevice& backend = *device_;
  absl::StatusOr<engine::CopyFence> fence =
      to_host ? backend.CopyRowsToHost(layout_.caches(), copies_, host_.buffer())
              : backend.CopyRowsFromHost(host_.buffer(), copies_, layout_.caches());
  const absl::Status ordered = fence.ok() ? backend.ComputeAfterFence(*fence) : fence.status();
  if (!ordered.ok()) {
    if (fence.ok()) STRATA_RETURN_IF_ERROR(backend.WaitFence(*fence));
    return ordered;
  }
  return fence;
}

absl::StatusOr<size_t> KvBlockManager::FirstCorruptCopied(std::span<const int32_t> records) {
  row_crcs_.resize(copies_.size());
  STRATA_RETURN_IF_ERROR(device_->ChecksumRows(layout_.caches(), copies_, row_crcs_));
  const int64_t row_bytes = layout_.page_bytes();
  const Crc32cCombiner rows(static_cast<uint64_t>(row_bytes));
  size_t c = 0;
  for (size_t i = 0; i < records.size(); ++i) {
    const int64_t base = host_.offset(records[i]);
    uint32_t crc = 0;  // the CRC of no bytes
    int64_t covered = 0;
    // Up to the record's end: the next record may start right after it.
    while (c < copies_.size() && covered < layout_.record_bytes() &&
           copies_[c].host_offset == base + covered) {
      crc = rows.Combine(crc, row_crcs_[c++]);
      covered += row_bytes;
    }
    const bool whole = covered == layout_.record_bytes();
    if (!whole) ++counters_.records_checked_in_host_memory;
    const bool bad = whole ? MaskCrc(crc) != host_.crc(records[i]) : !host_.Verify(records[i]).ok();
    if (bad) return i;
  }
  return records.size();
}

int KvBlockManager::SwapInPages(int64_t seq_id, engine::PageGroup group) const {
  auto it = swapped_.find(seq_id);
  if (it == swapped_.end()) return 0;
  const Swapped& swapped = it->second;
  if (group == engine::PageGroup::kLower) return swapped.pages;
  return static_cast<int>(
      std::count(swapped.upper_off_gpu.begin(), swapped.upper_off_gpu.end(), false));
}

absl::Status KvBlockManager::Seal(Swapped& swapped) {
  if (swapped.sealed) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(device_->WaitFence(swapped.fence));
  host_.SealAll(swapped.records, crc_pool_.get());
  for (int32_t r : swapped.records) host_.Unref(r);  // the copy's reference: resident now
  swapped.sealed = true;
  return absl::OkStatus();
}

absl::StatusOr<bool> KvBlockManager::SwapIn(int64_t seq_id, engine::SequencePages& pages) {
  auto it = swapped_.find(seq_id);
  if (it == swapped_.end()) {
    return absl::NotFoundError(absl::StrCat("swap-in of sequence ", seq_id, ": not swapped"));
  }
  Swapped& swapped = it->second;
  const int needed = swapped.pages;
  const int upper_needed = SwapInPages(seq_id, engine::PageGroup::kUpper);
  const bool two_groups = upper_pages_.num_pages() > 0;
  if (!pages.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("swap-in of sequence ", seq_id,
                                                   ": it still holds ", pages.lower.size(),
                                                   " lower and ", pages.upper.size(), " pages"));
  }
  switch (swapped.tier) {
    case Tier::kHost:
      break;
    case Tier::kLost:
      DropSwapped(seq_id);
      return absl::DataLossError(
          absl::StrCat("sequence ", seq_id, ": its KV failed a check when read back from the SSD"));
    case Tier::kSsd:
      // Up first, if the host tier has room; the caller asks again.
      if (host_.num_free() >= needed) StartMove(seq_id, swapped, /*down=*/false);
      return false;
    case Tier::kFromSsd:
      if (MoveTimedOut(swapped)) {
        // The disk stopped answering: the sequence is recomputed; the
        // reads keep its records until they return (FinishMove).
        ++counters_.ssd_reads_timed_out;
        DropSwapped(seq_id);
        return absl::DataLossError(absl::StrCat("sequence ", seq_id,
                                                ": the SSD tier did not return its KV within ",
                                                options_.ssd_read_timeout.count(), " ms"));
      }
      return false;
    case Tier::kToSsd:
      if (!MoveTimedOut(swapped)) return false;
      // The disk stopped taking writes: the sequence comes back from its
      // records, which the write only reads; the write keeps its
      // references until it returns, and then deletes what it wrote
      // (FinishMove: the job is no longer the sequence's).
      ++counters_.ssd_reads_timed_out;
      STRATA_LOG_WARN(
          "sequence {}: its move to the SSD tier did not finish within {} ms; "
          "resumed from the host tier",
          seq_id, options_.ssd_read_timeout.count());
      swapped.tier = Tier::kHost;
      swapped.job = 0;
      swapped.stays_in_host = true;
      break;
  }
  if (pages_.num_free() < needed || upper_pages_.num_free() < upper_needed) return false;
  STRATA_RETURN_IF_ERROR(Seal(swapped));
  // Checked above: both pools have them (Allocate takes none when short).
  std::vector<int32_t> upper;
  if (!pages_.Allocate(needed, pages.lower)) return absl::InternalError("free pages vanished");
  if (!upper_pages_.Allocate(upper_needed, upper)) {
    STRATA_RETURN_IF_ERROR(pages_.Free(pages.lower));
    return absl::InternalError("free upper pages vanished");
  }
  if (two_groups) {
    // The upper pages go where the sequence had them; off-GPU stays so.
    auto next = upper.begin();
    for (bool off : swapped.upper_off_gpu)
      pages.upper.push_back(off ? engine::kPageOffGpu : *next++);
  }
  copies_.clear();
  for (int i = 0; i < needed; ++i) {
    layout_.AppendRecordCopies(pages.lower[i], two_groups ? pages.upper[i] : engine::kPageOffGpu,
                               host_.offset(swapped.records[i]), copies_);
    host_.Ref(swapped.records[i]);  // held by the copy
  }
  absl::StatusOr<engine::CopyFence> fence = EnqueueCopies(/*to_host=*/false);
  if (!fence.ok()) {
    for (int32_t r : swapped.records) host_.Unref(r);
    STRATA_RETURN_IF_ERROR(Free(pages));
    return fence.status();
  }
  // The copy holds its references until it is done.
  in_flight_.push_back({*fence, swapped.records});
  // Checked where the copy landed (the host's cores would take longer than
  // the copy over a long sequence's gigabytes).
  const absl::StatusOr<size_t> first_bad = FirstCorruptCopied(swapped.records);
  if (!first_bad.ok() || *first_bad < swapped.records.size()) {
    // The pages go back only once nothing writes them.
    STRATA_RETURN_IF_ERROR(device_->WaitFence(*fence));
    STRATA_RETURN_IF_ERROR(Free(pages));
    if (!first_bad.ok()) return first_bad.status();
    ++counters_.host_records_lost;
    const int32_t record = swapped.records[*first_bad];
    DropSwapped(seq_id);
    return absl::DataLossError(absl::StrCat("sequence ", seq_id, ": host record ", record,
                                            " no longer matches its CRC32C"));
  }
  // The sequence no longer owns the records; each is freed when the copy
  // that reads it is done.
  for (int32_t r : swapped.records) host_.Release(r);
  ++counters_.swap_ins;
  counters_.bytes_from_host += needed * layout_.record_bytes();
  swapped_.erase(it);
  return true;
}

bool KvBlockManager::SwapMoving(int64_t seq_id) const {
  auto it = swapped_.find(seq_id);
  // A move past its time is not waited for: SwapIn takes the sequence
  // back from its records (down) or gives it up (up).
  return it != swapped_.end() &&
         (it->second.tier == Tier::kToSsd || it->second.tier == Tier::kFromSsd) &&
         !MoveTimedOut(it->second);
}

bool KvBlockManager::MoveTimedOut(const Swapped& swapped) const {
  if ((swapped.tier != Tier::kFromSsd && swapped.tier != Tier::kToSsd)) return false;
  auto m = moves_.find(swapped.job);
  return m != moves_.end() &&
         std::chrono::steady_clock::now() - m->second.started > options_.ssd_read_timeout;
}

void KvBlockManager::DropSwapped(int64_t seq_id) {
  auto it = swapped_.find(seq_id);
  if (it == swapped_.end()) return;
  Swapped& swapped = it->second;
  // A move in flight holds its records and deletes nothing of a sequence
  // that went: FinishMove does, when it is done.
  if (swapped.tier == Tier::kSsd) {
    (void)options_.ssd->DeleteOwner(SsdKey::Owner::kSequence, swapped.swap_id);
  }
  for (int32_t r : swapped.records) host_.Release(r);
  // A copy still writing them holds a reference each until it is done.
  if (!swapped.sealed && swapped.tier == Tier::kHost) {
    in_flight_.push_back({swapped.fence, std::move(swapped.records)});
  }
  swapped_.erase(it);
}

absl::Status KvBlockManager::Poll() {
  KvDevice& backend = *device_;
  for (auto& [id, swapped] : swapped_) {
    if (swapped.sealed || swapped.tier != Tier::kHost) continue;
    STRATA_ASSIGN_OR_RETURN(const bool done, backend.FenceDone(swapped.fence));
    if (done) STRATA_RETURN_IF_ERROR(Seal(swapped));
  }
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    STRATA_ASSIGN_OR_RETURN(const bool done, backend.FenceDone(it->fence));
    if (!done) {
      ++it;
      continue;
    }
    for (int32_t r : it->records) host_.Unref(r);
    it = in_flight_.erase(it);
  }
  // Stored prefixes whose copy landed are sealed and indexed.
  STRATA_RETURN_IF_ERROR(SealPendingPrefixes());
  STRATA_RETURN_IF_ERROR(PollTransfers());
  if (mover_ != nullptr) STRATA_RETURN_IF_ERROR(PollSsd());
  return absl::OkStatus();
}

std::pair<const int64_t, KvBlockManager::Swapped>* KvBlockManager::Oldest(Tier tier) {
  std::pair<const int64_t, Swapped>* oldest = nullptr;
  for (auto& entry : swapped_) {
    const Swapped& s = entry.second;
    if (s.tier != tier || (tier == Tier::kHost && (!s.sealed || s.stays_in_host))) continue;
    if (oldest == nullptr || s.swap_id < oldest->second.swap_id) oldest = &entry;
  }
  return oldest;
}

absl::Status KvBlockManager::PollSsd() {
  for (const RecordMover::Done& done : mover_->TakeDone()) {
    if (prefix_moves_.contains(done.id)) {
      FinishPrefixMove(done);
    } else {
      FinishMove(done);
    }
  }
  const int total = host_.num_records();
  const int high = static_cast<int>(options_.ssd_high_water * total);
  // Records in use once the moves down in flight have freed theirs.
  int used = total - host_.num_free();
  for (const auto& [job, move] : moves_)
    used -= move.down ? static_cast<int>(move.records.size()) : 0;
  // Down: past the high-water mark, or short of the room a refused
  // swap-out needed.
  while (used > high || total - used < wanted_free_records_) {
    auto* oldest = Oldest(Tier::kHost);
    if (oldest == nullptr) break;
    Swapped& s = oldest->second;
    if (s.workload >= 0 && s.workload < static_cast<int>(options_.workload_ssd_bytes.size()) &&
        options_.workload_ssd_bytes[s.workload] >= 0 &&
        WorkloadSsdBytes(s.workload) + int64_t{s.pages} * layout_.record_bytes() >
            options_.workload_ssd_bytes[s.workload]) {
      // Its workload's SSD line is full: it stays in host memory.
      s.stays_in_host = true;
      ++counters_.ssd_swap_outs_refused;
      continue;
    }
    used -= oldest->second.pages;
    StartMove(oldest->first, oldest->second, /*down=*/true);
  }
  if (total - used >= wanted_free_records_) wanted_free_records_ = 0;
  // Up ahead of need, oldest first, while that leaves room below half the
  // high-water mark (so that the two directions do not chase each other).
  for (;;) {
    auto* oldest = Oldest(Tier::kSsd);
    if (oldest == nullptr || used + oldest->second.pages > high / 2 ||
        host_.num_free() < oldest->second.pages) {
      break;
    }
    used += oldest->second.pages;
    StartMove(oldest->first, oldest->second, /*down=*/false);
  }
  return absl::OkStatus();
}

void KvBlockManager::StartMove(int64_t seq_id, Swapped& swapped, bool down) {
  RecordMover::Job job;
  job.id = next_job_++;
  job.swap_id = swapped.swap_id;
  job.down = down;
  job.record_bytes = layout_.record_bytes();
  if (down) {
    // Resident and sealed: the move reads them under a reference each.
    for (int32_t r : swapped.records) host_.Ref(r);
    swapped.tier = Tier::kToSsd;
  } else {
    // Checked by the callers: enough are free.
    if (!host_.Allocate(swapped.pages, swapped.records)) return;
    swapped.tier = Tier::kFromSsd;
    swapped.sealed = false;
  }
  for (int32_t r : swapped.records) job.records.push_back(host_.data(r));
  swapped.job = job.id;
  moves_.emplace(job.id, Move{seq_id, swapped.swap_id, down, swapped.records,
                              std::chrono::steady_clock::now()});
  mover_->Submit(std::move(job));
}

void KvBlockManager::FinishMove(const RecordMover::Done& done) {
  auto m = moves_.find(done.id);
  if (m == moves_.end()) return;
  Move move = std::move(m->second);
  moves_.erase(m);
  auto it = swapped_.find(move.seq_id);
  const bool owner_here = it != swapped_.end() && it->second.job == done.id;
  if (!owner_here) {
    // The sequence went (dropped, or back on the GPU) while its records
    // moved: they go with the move's references, and its keys too.
    for (int32_t r : move.records) host_.Unref(r);
    (void)options_.ssd->DeleteOwner(SsdKey::Owner::kSequence, move.swap_id);
    return;
  }
  Swapped& swapped = it->second;
  swapped.job = 0;
  if (move.down) {
    for (int32_t r : move.records) host_.Unref(r);
    if (!done.status.ok()) {
      // The SSD is full or failing: the sequence stays in the host tier.
      ++counters_.ssd_swap_outs_refused;
      STRATA_LOG_WARN("sequence {}: stays in the host tier: {}", move.seq_id,
                      done.status.ToString());
      swapped.tier = Tier::kHost;
      swapped.stays_in_host = true;
      return;
    }
    swapped.crcs.clear();
    for (int32_t r : swapped.records) {
      swapped.crcs.push_back(host_.crc(r));
      host_.Release(r);
    }
    swapped.records.clear();
    swapped.tier = Tier::kSsd;
    ++counters_.ssd_swap_outs;
    counters_.ssd_bytes_written += done.bytes;
    return;
  }
  absl::Status status = done.status;
  if (status.ok()) host_.SealAll(swapped.records, crc_pool_.get());
  for (size_t i = 0; i < swapped.records.size() && status.ok(); ++i) {
    if (host_.crc(swapped.records[i]) != swapped.crcs[i]) {
      status = absl::DataLossError(absl::StrCat("record ", i,
                                                " read back from the SSD differs "
                                                "from the one swapped out (CRC32C)"));
    }
  }
  if (!status.ok()) {
    ++counters_.ssd_sequences_lost;
    STRATA_LOG_WARN("sequence {}: its KV on the SSD is lost: {}", move.seq_id, status.ToString());
    for (int32_t r : swapped.records) {
      host_.Release(r);
      host_.Unref(r);
    }
    swapped.records.clear();
    swapped.tier = Tier::kLost;
    return;
  }
  for (int32_t r : swapped.records) host_.Unref(r);  // the move's reference: resident now
  swapped.crcs.clear();
  swapped.sealed = true;
  swapped.stays_in_host = true;
  swapped.tier = Tier::kHost;
  ++counters_.ssd_swap_ins;
  counters_.ssd_bytes_read += done.bytes;
  counters_.ssd_swap_in_micros += done.micros;
}

int64_t KvBlockManager::WorkloadRecordLimit(int workload) const {
  if (workload < 0 || workload >= static_cast<int>(options_.workload_host_bytes.size()) ||
      options_.workload_host_bytes[workload] < 0) {
    return -1;
  }
  return options_.workload_host_bytes[workload] / host_.record_bytes();
}

int64_t KvBlockManager::WorkloadHostBytes(int workload) const {
  auto it = region_records_.find(workload);
  int64_t records = it == region_records_.end() ? 0 : it->second;
  for (const auto& [id, swapped] : swapped_) {
    if (swapped.workload == workload) records += static_cast<int64_t>(swapped.records.size());
  }
  return records * host_.record_bytes();
}

double KvBlockManager::WorkloadHostShare(int workload) const {
  const int64_t limit = WorkloadRecordLimit(workload);
  if (limit < 0) return 0.0;
  if (limit == 0) return 1.0;
  return static_cast<double>(WorkloadHostBytes(workload)) /
         static_cast<double>(limit * host_.record_bytes());
}

int64_t KvBlockManager::WorkloadSsdBytes(int workload) const {
  auto it = ssd_charged_.find(workload);
  int64_t bytes = it == ssd_charged_.end() ? 0 : it->second;
  for (const auto& [id, swapped] : swapped_) {
    if (swapped.workload == workload &&
        (swapped.tier == Tier::kToSsd || swapped.tier == Tier::kSsd ||
         swapped.tier == Tier::kFromSsd)) {
      bytes += int64_t{swapped.pages} * layout_.record_bytes();
    }
  }
  return bytes;
}

bool KvBlockManager::ChargeSsd(int workload, int64_t bytes) {
  if (workload >= 0 && workload < static_cast<int>(options_.workload_ssd_bytes.size()) &&
      options_.workload_ssd_bytes[workload] >= 0 &&
      WorkloadSsdBytes(workload) + bytes > options_.workload_ssd_bytes[workload]) {
    return false;
  }
  ssd_charged_[workload] += bytes;
  return true;
}

void KvBlockManager::RefundSsd(int workload, int64_t bytes) { ssd_charged_[workload] -= bytes; }

std::optional<KvBlockManager::HostRegion> KvBlockManager::AllocateHostRegion(int64_t bytes,
                                                                             int workload) {
  if (bytes < 1) return std::nullopt;
  const int64_t records = (bytes + host_.record_stride() - 1) / host_.record_stride();
  if (records > host_.num_free()) return std::nullopt;
  if (const int64_t limit = WorkloadRecordLimit(workload);
      limit >= 0 && WorkloadHostBytes(workload) / host_.record_bytes() + records > limit) {
    return std::nullopt;
  }
  const int32_t first = host_.AllocateRun(static_cast<int>(records));
  if (first < 0) return std::nullopt;
  // The records are the region owner's at once: the device fills them
  // within the step.
  for (int32_t r = first; r < first + records; ++r) host_.Unref(r);
  if (workload >= 0) region_records_[workload] += records;
  return HostRegion{first, static_cast<int32_t>(records), host_.offset(first),
                    records * host_.record_stride(), workload};
}

void KvBlockManager::FreeHostRegion(const HostRegion& region) {
  if (region.workload >= 0) region_records_[region.workload] -= region.records;
  for (int32_t r = region.first_record; r < region.first_record + region.records; ++r) {
    host_.Release(r);
  }
}

double KvBlockManager::HostUsedShare() const {
  const int landing = landing_ == nullptr ? 0 : landing_->num_records();
  const int total = host_.num_records() - landing;
  return total <= 0 ? 0.0
                    : static_cast<double>(host_.num_records() - host_.num_free() - landing) / total;
}

KvBlockManager::Stats KvBlockManager::stats() const {
  Stats s = counters_;
  s.gpu_pages_total = pages_.num_pages();
  s.gpu_pages_used = pages_.num_pages() - pages_.num_free();
  s.upper_pages_total = upper_pages_.num_pages();
  s.upper_pages_used = upper_pages_.num_pages() - upper_pages_.num_free();
  // The landing area is set aside for good: reported on its own.
  const int landing = landing_ == nullptr ? 0 : landing_->num_records();
  s.host_bytes_total = int64_t{host_.num_records() - landing} * host_.record_bytes();
  s.host_bytes_used =
      int64_t{host_.num_records() - host_.num_free() - landing} * host_.record_bytes();
  s.swapped_sequences = static_cast<int>(swapped_.size());
  s.copies_in_flight = static_cast<int>(in_flight_.size());
  for (const auto& [id, swapped] : swapped_) {
    s.copies_in_flight += !swapped.sealed && swapped.tier == Tier::kHost;
    s.sequences_on_ssd += swapped.tier == Tier::kSsd || swapped.tier == Tier::kToSsd;
  }
  s.ssd_moves_in_flight = static_cast<int>(moves_.size());
  s.prefix_bytes_used = int64_t{prefix_records_} * host_.record_bytes();
  s.ssd_prefix_bytes_used = ssd_prefix_bytes_;
  s.ssd_prefix_pages = static_cast<int>(ssd_prefixes_.size());
  // Pages often sit in both tiers (written through, or read back up): the
  // larger tier bounds what the store holds, not their sum.
  const int64_t ssd_prefix_pages =
      options_.ssd != nullptr && options_.ssd_prefix_bytes > 0 && mover_ != nullptr
          ? options_.ssd_prefix_bytes / layout_.record_bytes()
          : 0;
  s.prefix_capacity_tokens =
      std::max<int64_t>(max_prefix_records_, ssd_prefix_pages) * layout_.page_size();
  s.exports_held = static_cast<int>(exports_.size());
  if (landing_ != nullptr) {
    s.landing_records_total = landing_->num_records();
    s.landing_records_free = landing_->num_free();
  }
  return s;
}

bool KvBlockManager::Settling() const {
  if (!in_flight_.empty() || !moves_.empty() || !pending_prefixes_.empty() ||
      !prefix_moves_.empty() || !exports_.empty() || !landing_in_flight_.empty() ||
      !importing_.empty()) {
    return true;
  }
  for (const auto& [id, swapped] : swapped_) {
    if (!swapped.sealed && swapped.tier == Tier::kHost) return true;
  }
  return false;
}

bool KvBlockManager::Idle() const {
  const int landing = landing_ == nullptr ? 0 : landing_->num_records();
  return pages_.num_free() == pages_.num_pages() &&
         upper_pages_.num_free() == upper_pages_.num_pages() &&
         host_.num_free() + prefix_records_ + landing == host_.num_records() && swapped_.empty() &&
         in_flight_.empty() && moves_.empty() && pending_prefixes_.empty() &&
         prefix_moves_.empty() && exports_.empty() && landing_in_flight_.empty() &&
         importing_.empty() && (landing_ == nullptr || landing_->num_free() == landing);
}

std::optional<uint64_t> KvBlockManager::SsdSwapIdOf(int64_t seq_id) const {
  auto it = swapped_.find(seq_id);
  if (it == swapped_.end() || it->second.tier != Tier::kSsd) return std::nullopt;
  return it->second.swap_id;
}

std::vector<int32_t> KvBlockManager::HostRecordsOf(int64_t seq_id) const {
  auto it = swapped_.find(seq_id);
  return it == swapped_.end() ? std::vector<int32_t>() : it->second.records;
}

}  // namespace strata::kvtier
