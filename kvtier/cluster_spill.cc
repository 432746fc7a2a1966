#include "kvtier/cluster_spill.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <utility>

#include "common/logging.h"

namespace strata::kvtier {
namespace {

int64_t MicrosSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                               start)
      .count();
}

// `bytes` rounded up to whole host units (where a value lands in host
// memory, the next one starts at a unit).
int64_t WholeUnits(int64_t bytes) {
  return (bytes + engine::kKvHostUnit - 1) / engine::kKvHostUnit * engine::kKvHostUnit;
}

SsdKey KeyOf(uint64_t owner, uint32_t layer, uint32_t head, uint32_t block) {
  return {SsdKey::Owner::kSequence, owner, static_cast<uint16_t>(layer),
          static_cast<uint16_t>(head), block};
}

}  // namespace

ClusterSpill::ClusterSpill(SsdStore* store, const Options& options)
    : store_(store), options_(options), write_pool_(std::max(1, options.io_threads)) {
  for (int i = 0; i < std::max(1, options.io_threads); ++i) {
    readers_.emplace_back([this] { ReaderLoop(); });
  }
  writer_ = std::thread([this] { WriterLoop(); });
}

ClusterSpill::~ClusterSpill() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cancel_writing_ = true;
  }
  queue_cv_.notify_all();
  read_cv_.notify_all();
  writer_.join();
  for (std::thread& reader : readers_) reader.join();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, seq] : sequences_) {
    if (absl::Status s = store_->DeleteOwner(SsdKey::Owner::kSequence, seq.owner); !s.ok()) {
      STRATA_LOG_ERROR("sequence {}: spilled clusters not deleted: {}", id, s.ToString());
    }
  }
}

void ClusterSpill::Write(uint64_t owner, Batch batch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Sequence& seq = sequences_[batch.seq_id];
    seq.owner = owner;
    seq.slot = batch.slot;
    ++seq.writing;
    ++stats_.batches_in_flight;
    queue_.push_back({owner, std::move(batch)});
  }
  queue_cv_.notify_one();
}

std::vector<ClusterSpill::Done> ClusterSpill::Poll() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::exchange(done_, {});
}

bool ClusterSpill::Forget(int64_t seq_id) {
  std::unique_lock<std::mutex> lock(mu_);
  DropReadsAheadLocked(seq_id);
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end() || it->second.forgotten) return true;
  const size_t queued = queue_.size();
  std::erase_if(queue_, [&](const Queued& q) { return q.batch.seq_id == seq_id; });
  it->second.writing -= static_cast<int>(queued - queue_.size());
  stats_.batches_in_flight -= static_cast<int>(queued - queue_.size());
  const size_t promote_queued = promote_queue_.size();
  std::erase_if(promote_queue_,
                [&](const PromoteJob& j) { return j.state->promotion.seq_id == seq_id; });
  it->second.promoting -= static_cast<int>(promote_queued - promote_queue_.size());
  auto busy = [&] {
    auto seq = sequences_.find(seq_id);
    return (has_writing_seq_ && writing_seq_ == seq_id) ||
           (seq != sequences_.end() && seq->second.promoting > 0);
  };
  if (busy()) {
    if (has_writing_seq_ && writing_seq_ == seq_id) cancel_writing_ = true;
    if (!batch_done_cv_.wait_for(lock, options_.forget_timeout, [&] { return !busy(); })) {
      // The SSD holds the write: the writer drops the sequence when it
      // returns. Its slot is free for the next sequence's fetches now.
      it = sequences_.find(seq_id);
      it->second.forgotten = true;
      auto slot = slot_seq_.find(it->second.slot);
      if (slot != slot_seq_.end() && slot->second == seq_id) slot_seq_.erase(slot);
      ++stats_.forget_timeouts;
      STRATA_LOG_WARN(
          "sequence {}: its clusters' write to, or read from, the SSD has not returned in {} ms; "
          "its host memory stays until it does",
          seq_id, options_.forget_timeout.count());
      return false;
    }
  }
  DropLocked(sequences_.find(seq_id));
  return true;
}

void ClusterSpill::SetStaging(int64_t offset, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  staging_offset_ = offset;
  staging_bytes_ = bytes;
}

bool ClusterSpill::Writing(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(seq_id);
  return it != sequences_.end() && it->second.writing > 0;
}

bool ClusterSpill::HasClusters(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(seq_id);
  return it != sequences_.end() && !it->second.clusters.empty();
}

ClusterSpill::Stats ClusterSpill::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = stats_;
  s.bytes_resident = 0;
  s.sequences = 0;
  for (const auto& [id, seq] : sequences_) {
    s.bytes_resident += seq.bytes;
    s.sequences += !seq.clusters.empty();
  }
  return s;
}

void ClusterSpill::DropLocked(absl::flat_hash_map<int64_t, Sequence>::iterator it) {
  // Every value under the owner, recorded or not: a batch that finished
  // writing as Forget cancelled it is not recorded in `clusters`.
  if (absl::Status s = store_->DeleteOwner(SsdKey::Owner::kSequence, it->second.owner); !s.ok()) {
    STRATA_LOG_ERROR("sequence {}: spilled clusters not deleted: {}", it->first, s.ToString());
  }
  auto slot = slot_seq_.find(it->second.slot);
  if (slot != slot_seq_.end() && slot->second == it->first) slot_seq_.erase(slot);
  sequences_.erase(it);
}

void ClusterSpill::DropForgottenLocked(int64_t seq_id, uint64_t tag) {
  DropLocked(sequences_.find(seq_id));
  done_.push_back({seq_id, tag, absl::CancelledError("the sequence ended"), /*forgotten=*/true});
}

int64_t ClusterSpill::PromotionBytes(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) return 0;
  const Sequence& seq = it->second;
  if (seq.writing > 0 || seq.promoting > 0 || seq.forgotten) return 0;
  int64_t bytes = 0;
  for (const auto& [id, c] : seq.clusters) bytes += WholeUnits(c.bytes);
  return bytes;
}

void ClusterSpill::Promote(int64_t seq_id, int64_t host_offset, uint64_t tag) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto state = std::make_shared<PromotionState>();
    state->promotion.seq_id = seq_id;
    state->promotion.tag = tag;
    state->started = std::chrono::steady_clock::now();
    auto it = sequences_.find(seq_id);
    if (it != sequences_.end() && !it->second.forgotten) {
      Sequence& seq = it->second;
      int64_t cursor = host_offset;
      for (const auto& [id, c] : seq.clusters) {
        PromotedCluster p;
        p.layer = static_cast<uint16_t>(id >> 48);
        p.head = static_cast<uint16_t>((id >> 32) & 0xffff);
        p.block = static_cast<uint32_t>(id & 0xffffffff);
        p.first_piece = c.first_piece;
        p.host_offset = cursor;
        p.bytes = c.bytes;
        p.piece_offsets = c.piece_offsets;
        promote_queue_.push_back(
            {KeyOf(seq.owner, p.layer, p.head, p.block),
             std::span<uint8_t>(options_.host_data + cursor, static_cast<size_t>(c.bytes)),
             state->promotion.clusters.size(), state});
        state->promotion.clusters.push_back(std::move(p));
        cursor += WholeUnits(c.bytes);
      }
      seq.promoting += static_cast<int>(state->promotion.clusters.size());
    }
    state->ok.assign(state->promotion.clusters.size(), 0);
    state->remaining = static_cast<int>(state->promotion.clusters.size());
    if (state->remaining == 0) {
      state->promotion.clusters.clear();
      promotions_done_.push_back(std::move(state->promotion));
      ++stats_.promotions;
      return;
    }
  }
  read_cv_.notify_all();
}

std::vector<ClusterSpill::Promotion> ClusterSpill::PollPromotions() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::exchange(promotions_done_, {});
}

void ClusterSpill::Promoted(int64_t seq_id, std::span<const PromotedCluster> clusters) {
  std::vector<SsdKey> keys;
  {
    std::lock_guard<std::mutex> lock(mu_);
    DropReadsAheadLocked(seq_id);
    auto it = sequences_.find(seq_id);
    if (it == sequences_.end()) return;
    Sequence& seq = it->second;
    for (const PromotedCluster& p : clusters) {
      auto c = seq.clusters.find(ClusterId(p.layer, p.head, p.block));
      if (c == seq.clusters.end()) continue;
      seq.bytes -= c->second.bytes;
      seq.clusters.erase(c);
      auto firsts = seq.firsts.find(ClusterId(p.layer, p.head, 0));
      if (firsts != seq.firsts.end()) {
        std::erase(firsts->second, std::pair<int32_t, uint32_t>{p.first_piece, p.block});
      }
      keys.push_back(KeyOf(seq.owner, p.layer, p.head, p.block));
    }
  }
  // Out of the lock: no fetch finds them any more, and a step's reads are
  // not held up behind the deletes.
  for (const SsdKey& key : keys) {
    if (absl::Status s = store_->Delete(key); !s.ok()) {
      STRATA_LOG_ERROR("sequence {}: a promoted cluster's value not deleted: {}", seq_id,
                       s.ToString());
    }
  }
}

void ClusterSpill::ReadForPromotion(const PromoteJob& job) {
  if (options_.before_read) options_.before_read();
  const absl::Status s = store_->GetInto(job.key, {}, job.dest);
  if (!s.ok()) {
    STRATA_LOG_WARN("spilled cluster (layer {}, head {}, block {}) not promoted: {}", job.key.layer,
                    job.key.kv_head, job.key.block, s.ToString());
  }
  std::lock_guard<std::mutex> lock(mu_);
  PromotionState& state = *job.state;
  state.ok[job.index] = s.ok();
  const int64_t seq_id = state.promotion.seq_id;
  auto it = sequences_.find(seq_id);
  if (it != sequences_.end()) --it->second.promoting;
  batch_done_cv_.notify_all();  // Forget may wait for it
  if (it != sequences_.end() && it->second.forgotten) {
    // Forget gave up waiting (its queued reads were dropped): the last
    // read back drops the sequence, unless a write still runs.
    if (it->second.promoting == 0 && !(has_writing_seq_ && writing_seq_ == seq_id)) {
      DropForgottenLocked(seq_id, state.promotion.tag);
    }
    return;
  }
  if (--state.remaining > 0 || it == sequences_.end()) return;
  Promotion done;
  done.seq_id = seq_id;
  done.tag = state.promotion.tag;
  for (size_t i = 0; i < state.ok.size(); ++i) {
    if (!state.ok[i]) continue;
    stats_.bytes_promoted += state.promotion.clusters[i].bytes;
    done.clusters.push_back(std::move(state.promotion.clusters[i]));
  }
  ++stats_.promotions;
  stats_.clusters_promoted += static_cast<int64_t>(done.clusters.size());
  stats_.promote_micros += MicrosSince(state.started);
  promotions_done_.push_back(std::move(done));
}

void ClusterSpill::WriterLoop() {
  for (;;) {
    Queued q;
    {
      std::unique_lock<std::mutex> lock(mu_);
      queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;  // queued batches are dropped with the spill
      q = std::move(queue_.front());
      queue_.pop_front();
      writing_seq_ = q.batch.seq_id;
      has_writing_seq_ = true;
      cancel_writing_ = false;
    }
    const auto start = std::chrono::steady_clock::now();
    int64_t bytes = 0;
    absl::Status status = WriteBatch(q, &bytes);
    std::lock_guard<std::mutex> lock(mu_);
    --stats_.batches_in_flight;
    has_writing_seq_ = false;
    batch_done_cv_.notify_all();
    auto forgotten = sequences_.find(q.batch.seq_id);
    if (forgotten != sequences_.end() && forgotten->second.forgotten) {
      // Forget gave up on this write: what it wrote was deleted (a
      // cancelled batch deletes its values), the rest goes once no read
      // of a promotion runs either, and the caller may free the host
      // memory then.
      if (forgotten->second.promoting == 0) DropForgottenLocked(q.batch.seq_id, q.batch.tag);
      continue;
    }
    if (cancel_writing_) continue;  // Forget deletes what it wrote
    Sequence& seq = sequences_.at(q.batch.seq_id);
    --seq.writing;
    if (status.ok()) {
      ++stats_.batches_written;
      stats_.clusters_written += static_cast<int64_t>(q.batch.clusters.size());
      stats_.bytes_written += bytes;
      stats_.write_micros += MicrosSince(start);
      for (Cluster& c : q.batch.clusters) {
        seq.bytes += c.bytes;
        seq.firsts[ClusterId(c.layer, c.head, 0)].push_back({c.first_piece, c.block});
        seq.clusters[ClusterId(c.layer, c.head, c.block)] =
            StoredCluster{c.bytes, c.first_piece, std::move(c.piece_offsets)};
      }
      for (auto& [key, firsts] : seq.firsts) std::sort(firsts.begin(), firsts.end());
      slot_seq_[seq.slot] = q.batch.seq_id;
    } else {
      ++stats_.batches_refused;
    }
    done_.push_back({q.batch.seq_id, q.batch.tag, std::move(status)});
  }
}

absl::Status ClusterSpill::WriteBatch(const Queued& q, int64_t* bytes) {
  const std::vector<Cluster>& clusters = q.batch.clusters;
  std::vector<absl::Status> results(clusters.size());
  write_pool_.ParallelFor(static_cast<int64_t>(clusters.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Cluster& c = clusters[i];
      if (cancel_writing_) {
        results[i] = absl::CancelledError("the sequence ended");
        continue;
      }
      if (options_.before_write) options_.before_write();
      results[i] = store_->Put(KeyOf(q.owner, c.layer, c.head, c.block),
                               std::span<const uint8_t>(options_.host_data + c.host_offset,
                                                        static_cast<size_t>(c.bytes)));
    }
  });
  absl::Status first;
  for (size_t i = 0; i < clusters.size(); ++i) {
    if (results[i].ok()) {
      *bytes += clusters[i].bytes;
    } else if (first.ok()) {
      first = results[i];
    }
  }
  if (first.ok()) return first;
  // All or nothing: the batch's clusters stay in host memory.
  for (size_t i = 0; i < clusters.size(); ++i) {
    if (!results[i].ok()) continue;
    const Cluster& c = clusters[i];
    if (absl::Status s = store_->Delete(KeyOf(q.owner, c.layer, c.head, c.block)); !s.ok()) {
      STRATA_LOG_ERROR("sequence {}: a refused batch's value not deleted: {}", q.batch.seq_id,
                       s.ToString());
    }
  }
  *bytes = 0;
  return first;
}

std::optional<ClusterSpill::Found> ClusterSpill::FindLocked(
    int layer, const engine::PieceFetcher::Piece& p) const {
  auto seq_it = slot_seq_.find(p.slot);
  if (seq_it == slot_seq_.end()) return std::nullopt;
  const Sequence& seq = sequences_.at(seq_it->second);
  auto firsts = seq.firsts.find(ClusterId(layer, p.head, 0));
  if (firsts == seq.firsts.end()) return std::nullopt;
  auto after = std::upper_bound(firsts->second.begin(), firsts->second.end(),
                                std::pair<int32_t, uint32_t>{p.piece, UINT32_MAX});
  if (after == firsts->second.begin()) return std::nullopt;
  const uint32_t block = std::prev(after)->second;
  const uint64_t id = ClusterId(layer, p.head, block);
  const StoredCluster& c = seq.clusters.at(id);
  const int64_t index = p.piece - c.first_piece;
  if (index < 0 || index >= static_cast<int64_t>(c.piece_offsets.size())) return std::nullopt;
  return Found{seq_it->second, id, &seq, &c, index};
}

void ClusterSpill::DropReadsAheadLocked(int64_t seq_id) {
  absl::erase_if(ahead_, [&](const auto& entry) {
    if (seq_id >= 0 && entry.first.first != seq_id) return false;
    ReadJob& job = *entry.second;
    std::lock_guard<std::mutex> lock(job.wait->mu);
    job.dropped = true;  // a queued read is not made
    ahead_bytes_ -= job.bytes;
    return true;
  });
  if (ahead_.empty()) ahead_layer_ = -1;
}

void ClusterSpill::DropReadsAhead() {
  std::lock_guard<std::mutex> lock(mu_);
  DropReadsAheadLocked(-1);
}

void ClusterSpill::StartReadsAhead(int layer, std::span<const engine::PieceFetcher::Piece> pieces,
                                   std::span<int64_t> offsets) {
  std::fill(offsets.begin(), offsets.end(), int64_t{-1});
  int queued = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A disk that stopped answering gets no more reads.
    if (stats_.stalled) return;
    if (ahead_layer_ != layer) {
      DropReadsAheadLocked(-1);
      ahead_layer_ = layer;
    }
    auto wait = std::make_shared<FetchWait>();
    for (const engine::PieceFetcher::Piece& p : pieces) {
      const std::optional<Found> found = FindLocked(layer, p);
      if (!found.has_value() || ahead_.contains({found->seq_id, found->id})) continue;
      const int64_t bytes = found->cluster->bytes;
      if (ahead_bytes_ + bytes > staging_bytes_) break;  // as much as one fetch could take
      auto r = std::make_shared<ReadJob>();
      r->key = KeyOf(found->seq->owner, layer, static_cast<uint32_t>(p.head),
                     static_cast<uint32_t>(found->id & 0xffffffff));
      r->bytes = bytes;  // its buffer is allocated by the reader that reads it
      r->ahead = true;
      r->wait = wait;
      ahead_.emplace(std::make_pair(found->seq_id, found->id), r);
      ahead_queue_.push_back(std::move(r));
      ahead_bytes_ += bytes;
      ++queued;
    }
    if (queued == 0) return;
    wait->remaining = queued;
    reads_outstanding_ += queued;
    stats_.read_ahead_clusters += queued;
  }
  read_cv_.notify_all();
}

void ClusterSpill::Fetch(int layer, std::span<const engine::PieceFetcher::Piece> pieces,
                         std::span<int64_t> offsets) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + options_.fetch_timeout;
  std::fill(offsets.begin(), offsets.end(), int64_t{-1});
  // What to read: each cluster once, at its place in the staging area.
  // Those read ahead are taken (`ahead[i]`: their reads), the rest read now.
  std::vector<std::shared_ptr<ReadJob>> reads;
  std::vector<char> ahead;
  std::vector<std::pair<size_t, int64_t>> piece_read(pieces.size(), {SIZE_MAX, 0});
  int64_t staging_offset = 0;
  bool stalled = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stalled = stats_.stalled;
    staging_offset = staging_offset_;
    // Reads ahead of another layer will not be asked for.
    if (ahead_layer_ != layer) DropReadsAheadLocked(-1);
    absl::flat_hash_map<std::pair<int64_t, uint64_t>, size_t> read_of;
    int64_t cursor = 0;
    for (size_t i = 0; i < pieces.size() && !stalled; ++i) {
      const std::optional<Found> found = FindLocked(layer, pieces[i]);
      if (!found.has_value()) continue;
      auto [it, added] = read_of.try_emplace({found->seq_id, found->id}, reads.size());
      if (added) {
        const int64_t span = WholeUnits(found->cluster->bytes);
        if (cursor + span > staging_bytes_) {
          read_of.erase(it);
          continue;  // does not fit this call: lost (logged below)
        }
        uint8_t* const dest = options_.host_data + staging_offset + cursor;
        cursor += span;
        auto taken = ahead_.find({found->seq_id, found->id});
        bool started = false;
        if (taken != ahead_.end()) {
          // A read ahead that a reader has started is taken (its buffer is
          // copied to `dest` below, once read); one still queued behind
          // others is dropped and read now, ahead of them.
          std::shared_ptr<ReadJob> r = std::move(taken->second);
          ahead_bytes_ -= r->bytes;
          ahead_.erase(taken);
          {
            std::lock_guard<std::mutex> job_lock(r->wait->mu);
            started = r->started;
            if (!started) r->dropped = true;
          }
          if (started) {
            r->dest = dest;
            reads.push_back(std::move(r));
            ahead.push_back(1);
          }
        }
        if (!started) {
          auto r = std::make_shared<ReadJob>();
          r->key = KeyOf(found->seq->owner, layer, static_cast<uint32_t>(pieces[i].head),
                         static_cast<uint32_t>(found->id & 0xffffffff));
          r->dest = dest;
          r->buffer.resize(static_cast<size_t>(found->cluster->bytes));
          reads.push_back(std::move(r));
          ahead.push_back(0);
        }
      }
      piece_read[i] = {it->second, found->cluster->piece_offsets[found->index]};
    }
  }
  bool timed_out = false;
  int64_t bytes = 0, used_ahead = 0;
  std::vector<char> read_ok(reads.size(), 0);
  if (!reads.empty()) {
    auto wait = std::make_shared<FetchWait>();
    int fresh = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < reads.size(); ++i) {
        if (ahead[i]) continue;
        reads[i]->wait = wait;
        read_queue_.push_back(reads[i]);
        ++fresh;
      }
      reads_outstanding_ += fresh;
      wait->remaining = fresh;
    }
    if (fresh > 0) read_cv_.notify_all();
    // The reads ahead first: each is copied here once its reader is done
    // with it (its reader never writes the staging area).
    for (size_t i = 0; i < reads.size(); ++i) {
      if (!ahead[i]) continue;
      ReadJob& r = *reads[i];
      std::unique_lock<std::mutex> lock(r.wait->mu);
      if (!r.wait->cv.wait_until(lock, deadline, [&] { return r.done; })) {
        r.dropped = true;
        timed_out = true;
        continue;
      }
      if (!r.ok) continue;
      std::memcpy(r.dest, r.buffer.data(), r.buffer.size());
      read_ok[i] = 1;
      ++used_ahead;
    }
    {
      std::unique_lock<std::mutex> wait_lock(wait->mu);
      if (!wait->cv.wait_until(wait_lock, deadline, [&] { return wait->remaining == 0; })) {
        wait->abandoned = true;  // nothing more lands in the staging area
        timed_out = true;
      }
      for (size_t i = 0; i < reads.size(); ++i) {
        if (!ahead[i]) read_ok[i] = reads[i]->ok;
      }
    }
    for (size_t i = 0; i < reads.size(); ++i) {
      if (read_ok[i]) bytes += static_cast<int64_t>(reads[i]->buffer.size());
    }
  }
  int64_t failed = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto [read, offset] = piece_read[i];
    if (read == SIZE_MAX || !read_ok[read]) {
      ++failed;
      continue;
    }
    offsets[i] = (reads[read]->dest - options_.host_data) + offset;
  }
  if (timed_out) {
    STRATA_LOG_ERROR(
        "layer {}: the SSD did not return {} clusters within {} ms; their sequences are "
        "recomputed, and every fetch fails until the reads return",
        layer, reads.size(), options_.fetch_timeout.count());
  } else if (failed > 0 && !stalled) {
    STRATA_LOG_WARN("layer {}: {} of {} pieces below host memory could not be fetched", layer,
                    failed, pieces.size());
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (timed_out) {
    ++stats_.fetch_timeouts;
    stats_.stalled = reads_outstanding_ > 0;
  }
  // A disk that stopped answering gets none of the reads ahead still queued.
  if (timed_out || stalled) DropReadsAheadLocked(-1);
  stats_.hard_misses += static_cast<int64_t>(reads.size());
  stats_.hard_miss_pieces += static_cast<int64_t>(pieces.size());
  stats_.bytes_read += bytes;
  stats_.read_ahead_used += used_ahead;
  stats_.fetch_micros += MicrosSince(start);
  stats_.fetches_failed += failed;
}

void ClusterSpill::ReaderLoop() {
  for (;;) {
    std::shared_ptr<ReadJob> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      read_cv_.wait(lock, [&] {
        return stopping_ || !read_queue_.empty() || !ahead_queue_.empty() ||
               !promote_queue_.empty();
      });
      // A step's fetches first; then reads ahead, leaving one reader to
      // promotions while some wait (they end a sequence's hard misses).
      const bool ahead_capped =
          !promote_queue_.empty() && ahead_reading_ + 1 >= static_cast<int>(readers_.size());
      if (!read_queue_.empty()) {
        job = std::move(read_queue_.front());
        read_queue_.pop_front();
      } else if (stopping_) {
        return;  // reads ahead and promotions are dropped with the spill
      } else if (!ahead_queue_.empty() && !ahead_capped) {
        job = std::move(ahead_queue_.front());
        ahead_queue_.pop_front();
        ++ahead_reading_;
      } else {
        PromoteJob promote = std::move(promote_queue_.front());
        promote_queue_.pop_front();
        lock.unlock();
        ReadForPromotion(promote);
        continue;
      }
    }
    FetchWait& wait = *job->wait;
    bool skip = false;
    {
      std::lock_guard<std::mutex> lock(wait.mu);
      skip = wait.abandoned || job->dropped;
      job->started = !skip;
    }
    absl::Status s = absl::CancelledError("the fetch gave up");
    if (!skip && job->ahead) job->buffer.resize(static_cast<size_t>(job->bytes));
    if (!skip) {
      if (options_.before_read) options_.before_read();
      s = store_->GetInto(job->key, {}, job->buffer);
      if (!s.ok()) {
        STRATA_LOG_WARN("spilled cluster (layer {}, head {}, block {}) not read: {}",
                        job->key.layer, job->key.kv_head, job->key.block, s.ToString());
      }
    }
    {
      std::lock_guard<std::mutex> lock(wait.mu);
      // A read for a Fetch lands in the staging area while the fetch still
      // waits; a read ahead stays in its buffer (the Fetch that takes it
      // copies it).
      if (s.ok() && !wait.abandoned && !job->dropped) {
        if (!job->ahead) std::memcpy(job->dest, job->buffer.data(), job->buffer.size());
        job->ok = true;
      }
      job->done = true;
      --wait.remaining;
    }
    wait.cv.notify_all();
    std::lock_guard<std::mutex> lock(mu_);
    if (job->ahead) {
      --ahead_reading_;
      if (s.ok()) stats_.read_ahead_bytes += job->bytes;
    }
    if (--reads_outstanding_ == 0) stats_.stalled = false;
  }
}

}  // namespace strata::kvtier
