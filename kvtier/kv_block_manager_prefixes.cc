// KvBlockManager's prefix store: prompt KV kept by content in host records
// and, below them, on the SSD tier (see kv_block_manager.h).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kvtier/kv_block_manager.h"

namespace strata::kvtier {
namespace {

// "SPF1": a prefix page's header, little-endian: magic, tokens per page,
// the chain key's two words, the record's masked CRC32C, then the tokens.
constexpr uint32_t kPrefixMagic = 0x31465053;

void PutU32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void PutU64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint64_t GetLe(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

SsdKey PrefixSsdKey(const PrefixKey& key) {
  return {SsdKey::Owner::kPrefix, key.words[0], 0, 0, 0};
}

}  // namespace

absl::StatusOr<KvBlockManagerOptions::SsdAdmission> KvBlockManagerOptions::ParseSsdAdmission(
    std::string_view name) {
  if (name == "never") return SsdAdmission::kNever;
  if (name == "cold") return SsdAdmission::kCold;
  if (name == "always") return SsdAdmission::kAlways;
  return absl::InvalidArgumentError(absl::StrCat("SSD write admission \"", std::string(name),
                                                 "\": expected never, cold or always"));
}

absl::StatusOr<KvBlockManagerOptions> ManagerOptionsForProfiles(
    const std::vector<KvProfile>& profiles, SsdStore* ssd, std::string prefix_space) {
  KvBlockManagerOptions options;
  options.ssd = ssd;
  options.prefix_space = std::move(prefix_space);
  options.ssd_admission = KvBlockManagerOptions::SsdAdmission::kNever;
  for (const KvProfile& p : profiles) {
    options.host_bytes += p.tiers.host_bytes;
    options.prefix_bytes += p.tiers.prefix_bytes;
    // A profile without a host tier of its own uses what is free, as one
    // without gpu_bytes does on the GPU.
    options.workload_host_bytes.push_back(
        p.tiers.host_bytes > 0 ? p.tiers.host_bytes - p.tiers.prefix_bytes : -1);
    options.workload_ssd_bytes.push_back(ssd != nullptr && !p.tiers.ssd_path.empty()
                                             ? p.tiers.ssd_bytes - p.tiers.ssd_prefix_bytes
                                             : -1);
    STRATA_ASSIGN_OR_RETURN(const engine::KvCodecKind codec, engine::ParseKvCodecKind(p.codec));
    options.workload_wire_codec.push_back(codec);
    if (ssd == nullptr || p.tiers.ssd_path.empty()) continue;
    options.ssd_prefix_bytes += p.tiers.ssd_prefix_bytes;
    STRATA_ASSIGN_OR_RETURN(const KvBlockManagerOptions::SsdAdmission admission,
                            KvBlockManagerOptions::ParseSsdAdmission(p.tiers.ssd_write_admission));
    options.ssd_admission = std::max(options.ssd_admission, admission);
  }
  return options;
}

std::vector<uint8_t> KvBlockManager::PrefixHeader(const PrefixKey& key,
                                                  std::span<const int32_t> tokens,
                                                  uint32_t crc) const {
  std::vector<uint8_t> header;
  header.reserve(static_cast<size_t>(PrefixHeaderBytes()));
  PutU32(header, kPrefixMagic);
  PutU32(header, static_cast<uint32_t>(tokens.size()));
  PutU64(header, key.words[0]);
  PutU64(header, key.words[1]);
  PutU32(header, crc);
  for (int32_t t : tokens) PutU32(header, static_cast<uint32_t>(t));
  return header;
}

bool KvBlockManager::EvictHostPrefix(bool to_ssd) {
  std::optional<PrefixIndex::Evicted> evicted = prefixes_.Evict();
  if (!evicted.has_value()) return false;
  --prefix_records_;
  ++counters_.prefix_pages_evicted;
  if (to_ssd && options_.ssd_admission == KvBlockManagerOptions::SsdAdmission::kCold &&
      options_.ssd_prefix_bytes > 0 && mover_ != nullptr) {
    std::vector<PrefixIndex::Evicted> pages;
    pages.push_back(std::move(*evicted));
    WritePrefixesDown(std::move(pages), /*release_records=*/true);
  } else {
    host_.Release(static_cast<int32_t>(evicted->value));
  }
  return true;
}

bool KvBlockManager::EvictSsdPrefix() {
  for (auto it = ssd_prefix_lru_.begin(); it != ssd_prefix_lru_.end(); ++it) {
    auto entry = ssd_prefixes_.find(*it);
    if (entry->second.state != SsdPrefix::State::kStored) continue;
    if (absl::Status s = options_.ssd->DeleteOwner(SsdKey::Owner::kPrefix, *it); !s.ok()) {
      STRATA_LOG_WARN("SSD tier: deleting a stored prefix page: {}", s.ToString());
      return false;
    }
    ssd_prefix_bytes_ -= entry->second.bytes;
    ssd_prefixes_.erase(entry);
    ssd_prefix_lru_.erase(it);
    ++counters_.ssd_prefix_pages_evicted;
    return true;
  }
  return false;
}

absl::Status KvBlockManager::IndexSsdPrefixes() {
  STRATA_ASSIGN_OR_RETURN(const auto owners, options_.ssd->ListOwners(SsdKey::Owner::kPrefix));
  for (const auto& [id, bytes] : owners) {
    ssd_prefix_lru_.push_back(id);
    ssd_prefixes_[id] =
        SsdPrefix{bytes, SsdPrefix::State::kStored, std::prev(ssd_prefix_lru_.end())};
    ssd_prefix_bytes_ += bytes;
  }
  counters_.ssd_prefix_pages_indexed = static_cast<int64_t>(owners.size());
  // A smaller budget than the predecessor's (none included): the rest goes.
  while (ssd_prefix_bytes_ > options_.ssd_prefix_bytes && EvictSsdPrefix()) {
  }
  return absl::OkStatus();
}

void KvBlockManager::WritePrefixesDown(std::vector<PrefixIndex::Evicted> pages,
                                       bool release_records) {
  RecordMover::Job job;
  job.id = next_job_++;
  job.down = true;
  job.record_bytes = layout_.record_bytes();
  job.header_bytes = PrefixHeaderBytes();
  PrefixMove move;
  move.down = true;
  const int64_t value_bytes = job.header_bytes + job.record_bytes + 4;
  for (PrefixIndex::Evicted& page : pages) {
    const auto r = static_cast<int32_t>(page.value);
    const uint64_t id = page.key.words[0];
    bool skip = ssd_prefixes_.contains(id);
    while (!skip && ssd_prefix_bytes_ + value_bytes > options_.ssd_prefix_bytes) {
      if (!EvictSsdPrefix()) skip = true;
    }
    if (skip) {
      if (!ssd_prefixes_.contains(id)) ++counters_.ssd_prefix_pages_refused;
      if (release_records) host_.Release(r);
      continue;
    }
    ssd_prefix_lru_.push_back(id);
    ssd_prefixes_[id] =
        SsdPrefix{value_bytes, SsdPrefix::State::kWriting, std::prev(ssd_prefix_lru_.end())};
    ssd_prefix_bytes_ += value_bytes;
    host_.Ref(r);  // the job's
    if (release_records) host_.Release(r);
    job.keys.push_back(PrefixSsdKey(page.key));
    job.records.push_back(host_.data(r));
    job.headers.push_back(PrefixHeader(page.key, page.tokens, host_.crc(r)));
    move.keys.push_back(page.key);
    move.tokens.push_back(std::move(page.tokens));
    move.records.push_back(r);
  }
  if (job.records.empty()) return;
  prefix_moves_.emplace(job.id, std::move(move));
  mover_->Submit(std::move(job));
}

void KvBlockManager::ReadPrefixesUp(std::span<const PrefixKey> chain,
                                    std::span<const int32_t> tokens, size_t first, size_t count) {
  const int page = layout_.page_size();
  std::vector<int32_t> records;
  if (count == 0 || !host_.Allocate(static_cast<int>(count), records)) return;
  prefix_records_ += static_cast<int>(count);  // held for the store from now on
  // One job per I/O thread, so that the reads run side by side.
  const size_t jobs = std::min<size_t>(count, static_cast<size_t>(options_.io_threads));
  size_t next = 0;
  for (size_t j = 0; j < jobs; ++j) {
    const size_t n = count / jobs + (j < count % jobs ? 1 : 0);
    RecordMover::Job job;
    job.id = next_job_++;
    job.down = false;
    job.record_bytes = layout_.record_bytes();
    job.header_bytes = PrefixHeaderBytes();
    PrefixMove move;
    move.down = false;
    for (size_t i = next; i < next + n; ++i) {
      const PrefixKey& key = chain[first + i];
      SsdPrefix& entry = ssd_prefixes_.find(key.words[0])->second;  // the caller found it
      entry.state = SsdPrefix::State::kReading;
      entry.read_since = std::chrono::steady_clock::now();
      ssd_prefix_lru_.splice(ssd_prefix_lru_.end(), ssd_prefix_lru_, entry.lru);
      job.keys.push_back(PrefixSsdKey(key));
      job.records.push_back(host_.data(records[i]));
      move.keys.push_back(key);
      const size_t at = (first + i) * static_cast<size_t>(page);
      move.tokens.emplace_back(tokens.begin() + at, tokens.begin() + at + page);
      move.records.push_back(records[i]);
    }
    next += n;
    prefix_moves_.emplace(job.id, std::move(move));
    mover_->Submit(std::move(job));
  }
  ++counters_.ssd_prefix_hits;
}

void KvBlockManager::FinishPrefixMove(const RecordMover::Done& done) {
  auto m = prefix_moves_.find(done.id);
  PrefixMove move = std::move(m->second);
  prefix_moves_.erase(m);
  auto forget = [&](uint64_t id, bool delete_key) {
    auto it = ssd_prefixes_.find(id);
    if (it == ssd_prefixes_.end()) return;
    if (delete_key) (void)options_.ssd->DeleteOwner(SsdKey::Owner::kPrefix, id);
    ssd_prefix_bytes_ -= it->second.bytes;
    ssd_prefix_lru_.erase(it->second.lru);
    ssd_prefixes_.erase(it);
  };
  if (move.down) {
    for (size_t i = 0; i < move.records.size(); ++i) {
      const uint64_t id = move.keys[i].words[0];
      if (auto it = ssd_prefixes_.find(id); done.moved[i] && it != ssd_prefixes_.end()) {
        it->second.state = SsdPrefix::State::kStored;
        ++counters_.ssd_prefix_pages_written;
      } else {
        forget(id, /*delete_key=*/false);  // the mover deleted what it wrote
        ++counters_.ssd_prefix_pages_refused;
      }
      host_.Unref(move.records[i]);
    }
    if (!done.status.ok()) {
      STRATA_LOG_WARN("SSD tier: prefix pages not written: {}", done.status.ToString());
    }
    return;
  }
  const int page = layout_.page_size();
  host_.SealAll(move.records, crc_pool_.get());
  for (size_t i = 0; i < move.records.size(); ++i) {
    const int32_t r = move.records[i];
    const PrefixKey& key = move.keys[i];
    host_.Unref(r);  // the job's reference
    bool good = done.moved[i];
    if (good) {
      // The header must name this very page: the key's first word alone
      // found it, and the CRC is the record's when it was stored.
      const uint8_t* h = done.headers[i].data();
      good = GetLe(h, 4) == kPrefixMagic && GetLe(h + 4, 4) == static_cast<uint64_t>(page) &&
             GetLe(h + 8, 8) == key.words[0] && GetLe(h + 16, 8) == key.words[1] &&
             static_cast<uint32_t>(GetLe(h + 24, 4)) == host_.crc(r);
      for (int t = 0; good && t < page; ++t) {
        good = static_cast<int32_t>(GetLe(h + 28 + 4 * t, 4)) == move.tokens[i][t];
      }
      if (!good) {
        STRATA_LOG_WARN("SSD tier: a stored prefix page does not match its header; computing it");
      }
    }
    if (auto it = ssd_prefixes_.find(key.words[0]); good && it != ssd_prefixes_.end()) {
      it->second.state = SsdPrefix::State::kStored;
      it->second.timed_out = false;
      ++counters_.ssd_prefix_pages_read;
      counters_.ssd_prefix_bytes_read += PrefixHeaderBytes() + layout_.record_bytes();
      if (prefixes_.Insert(key, move.tokens[i], r)) continue;
    } else {
      // Corrupt or gone: deleted, and that part of a prompt is computed.
      ++counters_.ssd_prefix_pages_lost;
      forget(key.words[0], /*delete_key=*/true);
    }
    host_.Release(r);
    --prefix_records_;
  }
  counters_.ssd_prefix_read_micros += done.micros;
  if (!done.status.ok() && !absl::IsNotFound(done.status)) {
    STRATA_LOG_WARN("SSD tier: prefix pages not read: {}", done.status.ToString());
  }
}

absl::Status KvBlockManager::StorePrefix(std::span<const int32_t> tokens,
                                         const engine::SequencePages& pages) {
  last_prefix_store_ = 0;
  if (max_prefix_records_ == 0) return absl::OkStatus();
  const int page = layout_.page_size();
  size_t blocks = std::min(tokens.size() / page, pages.lower.size());
  if (upper_pages_.num_pages() > 0) {
    // With two groups a record holds both: the pages whose upper layers
    // left the GPU (their clusters live in a lower tier) end the prefix.
    size_t whole = 0;
    while (whole < blocks && whole < pages.upper.size() &&
           pages.upper[whole] != engine::kPageOffGpu) {
      ++whole;
    }
    blocks = whole;
  }
  copies_.clear();
  return StorePrefixPages(tokens, blocks, [&](size_t b, int32_t record) {
    layout_.AppendRecordCopies(pages.lower[b], UpperOf(pages, b), host_.offset(record), copies_);
  });
}

absl::Status KvBlockManager::StorePrefixFromRecords(std::span<const int32_t> tokens,
                                                    std::span<const int32_t> records) {
  last_prefix_store_ = 0;
  if (max_prefix_records_ == 0) return absl::OkStatus();
  const size_t blocks = std::min(tokens.size() / layout_.page_size(), records.size());
  copies_.clear();
  return StorePrefixPages(tokens, blocks, [&](size_t b, int32_t record) {
    std::memcpy(host_.data(record), host_.data(records[b]),
                static_cast<size_t>(layout_.record_bytes()));
  });
}

absl::Status KvBlockManager::StorePrefixPages(std::span<const int32_t> tokens, size_t blocks,
                                              const std::function<void(size_t, int32_t)>& fill) {
  if (blocks == 0) return absl::OkStatus();
  const int page = layout_.page_size();
  const std::vector<PrefixKey> chain =
      PrefixChain(options_.prefix_space, tokens.first(blocks * page), page);
  auto pending_has = [&](const PrefixKey& key) {
    for (const PendingPrefix& p : pending_prefixes_) {
      if (std::find(p.keys.begin(), p.keys.end(), key) != p.keys.end()) return true;
    }
    return false;
  };
  // The chain's pages stored already (the prompt's, when the request ends)
  // are held while the rest is stored: evicting its own head for its tail
  // would leave a prefix no lookup can reach.
  const size_t held = prefixes_.Lookup(chain, tokens.first(blocks * page)).size();
  PendingPrefix pending;
  for (size_t b = 0; b < chain.size(); ++b) {
    if (prefixes_.Contains(chain[b]) || pending_has(chain[b])) continue;
    while (prefix_records_ >= max_prefix_records_ && EvictHostPrefix(/*to_ssd=*/true)) {
    }
    std::vector<int32_t> record;
    if (prefix_records_ >= max_prefix_records_ || !host_.Allocate(1, record)) break;
    ++prefix_records_;
    fill(b, record[0]);
    pending.keys.push_back(chain[b]);
    pending.tokens.emplace_back(tokens.begin() + b * page, tokens.begin() + (b + 1) * page);
    pending.records.push_back(record[0]);
    pending.pages.push_back(static_cast<int>(b));
  }
  for (size_t b = 0; b < held; ++b) prefixes_.Release(chain[b]);
  if (pending.records.empty()) return absl::OkStatus();
  // Device copies, when `fill` appended some; host copies are done.
  absl::StatusOr<engine::CopyFence> fence =
      copies_.empty() ? engine::kFenceDone : EnqueueCopies(/*to_host=*/true);
  if (!fence.ok()) {
    for (int32_t r : pending.records) {
      host_.Release(r);
      host_.Unref(r);
      --prefix_records_;
    }
    return fence.status();
  }
  pending.fence = *fence;
  pending.store = ++next_prefix_store_;
  last_prefix_store_ = pending.store;
  if (prefix_stores_.size() == kPrefixStoresKept) prefix_stores_.pop_front();
  prefix_stores_.push_back({pending.store, false, std::vector<uint32_t>(chain.size(), 0)});
  counters_.prefix_pages_stored += static_cast<int64_t>(pending.records.size());
  pending_prefixes_.push_back(std::move(pending));
  return absl::OkStatus();
}

std::optional<std::vector<uint32_t>> KvBlockManager::PrefixStoreCrcs(uint64_t id) {
  if (absl::Status s = SealPendingPrefixes(); !s.ok()) {
    STRATA_LOG_WARN("prefix store: {}", s.ToString());
  }
  for (const PrefixStore& store : prefix_stores_) {
    if (store.id != id) continue;
    if (!store.sealed) return std::nullopt;
    return store.crcs;
  }
  return std::vector<uint32_t>{};
}

absl::Status KvBlockManager::SealPendingPrefixes() {
  KvDevice& backend = *device_;
  const bool write_through =
      options_.ssd_admission == KvBlockManagerOptions::SsdAdmission::kAlways &&
      options_.ssd_prefix_bytes > 0 && mover_ != nullptr;
  for (auto it = pending_prefixes_.begin(); it != pending_prefixes_.end();) {
    STRATA_ASSIGN_OR_RETURN(const bool done, backend.FenceDone(it->fence));
    if (!done) {
      ++it;
      continue;
    }
    std::vector<PrefixIndex::Evicted> down;
    host_.SealAll(it->records, crc_pool_.get());
    PrefixStore* store = nullptr;
    for (PrefixStore& s : prefix_stores_) {
      if (s.id == it->store) store = &s;
    }
    for (size_t i = 0; i < it->records.size(); ++i) {
      const int32_t r = it->records[i];
      host_.Unref(r);
      if (!prefixes_.Insert(it->keys[i], it->tokens[i], r)) {
        host_.Release(r);  // stored meanwhile by another sequence
        --prefix_records_;
        continue;
      }
      if (store != nullptr) store->crcs[static_cast<size_t>(it->pages[i])] = host_.crc(r);
      if (write_through) down.push_back({it->keys[i], it->tokens[i], r});
    }
    if (store != nullptr) store->sealed = true;
    if (!down.empty()) WritePrefixesDown(std::move(down), /*release_records=*/false);
    it = pending_prefixes_.erase(it);
  }
  return absl::OkStatus();
}

absl::StatusOr<int> KvBlockManager::LoadPrefix(std::span<const int32_t> tokens,
                                               engine::SequencePages& pages) {
  loaded_crcs_.clear();
  if (max_prefix_records_ == 0 || !pages.empty()) return 0;
  const int page = layout_.page_size();
  // At least the last token is computed: its logits are the next token's.
  const size_t blocks = tokens.empty() ? 0 : (tokens.size() - 1) / page;
  if (blocks == 0) return 0;
  const std::vector<PrefixKey> chain =
      PrefixChain(options_.prefix_space, tokens.first(blocks * page), page);
  const std::vector<int64_t> found = prefixes_.Lookup(chain, tokens);
  auto release = [&] {
    for (size_t i = 0; i < found.size(); ++i) prefixes_.Release(chain[i]);
  };
  // The prefix may go on below, on the SSD: those pages come up first.
  if (!ssd_prefixes_.empty()) {
    const size_t from = found.size();
    size_t end = from;
    bool reading = false;
    for (; end < chain.size(); ++end) {
      auto it = ssd_prefixes_.find(chain[end].words[0]);
      if (it == ssd_prefixes_.end() || it->second.state == SsdPrefix::State::kWriting) break;
      if (it->second.state == SsdPrefix::State::kReading) {
        // A read past its time is not waited for: the prompt computes
        // the rest (the page is stored when the read returns, if ever).
        if (std::chrono::steady_clock::now() - it->second.read_since > options_.ssd_read_timeout) {
          if (!it->second.timed_out) {
            it->second.timed_out = true;
            ++counters_.ssd_reads_timed_out;
            STRATA_LOG_WARN("SSD tier: a stored prefix page was not read within {} ms; computed",
                            options_.ssd_read_timeout.count());
          }
          break;
        }
        reading = true;
        break;
      }
    }
    if (!reading && end > from) {
      // Room in the host store for them, as far as it goes. They are
      // marked first: the host pages evicted meanwhile may go down and
      // make room on the SSD, but never by deleting these.
      const size_t wanted = end - from;
      for (size_t i = from; i < end; ++i) {
        ssd_prefixes_.find(chain[i].words[0])->second.state = SsdPrefix::State::kReading;
      }
      while (prefix_records_ + static_cast<int>(wanted) > max_prefix_records_ &&
             EvictHostPrefix(/*to_ssd=*/true)) {
      }
      for (size_t i = from; i < end; ++i) {
        ssd_prefixes_.find(chain[i].words[0])->second.state = SsdPrefix::State::kStored;
      }
      const size_t count = std::min<size_t>(
          wanted, static_cast<size_t>(std::max(
                      0, std::min(max_prefix_records_ - prefix_records_, host_.num_free()))));
      if (count > 0) {
        ReadPrefixesUp(chain, tokens, from, count);
        reading = true;
      }
    }
    if (reading) {
      release();
      return absl::UnavailableError("a stored prefix is coming up from the SSD tier");
    }
  }
  ++counters_.prefix_lookups;
  const size_t n = found.size();
  const bool two_groups = upper_pages_.num_pages() > 0;
  if (n == 0 || pages_.num_free() < static_cast<int>(n) ||
      (two_groups && upper_pages_.num_free() < static_cast<int>(n))) {
    release();
    return 0;
  }
  if (!pages_.Allocate(static_cast<int>(n), pages.lower) ||
      (two_groups && !upper_pages_.Allocate(static_cast<int>(n), pages.upper))) {
    release();
    STRATA_RETURN_IF_ERROR(Free(pages));
    return absl::InternalError("free pages vanished");
  }
  // The records' CRCs are checked where the copy lands, on the device
  // (gigabytes for a long prompt: the host's cores would take longer than
  // the copy). A record found corrupt gives back its page and those after
  // it, and that part of the prompt is computed, overwriting what the copy
  // put there (the compute is ordered after it).
  const auto started = std::chrono::steady_clock::now();
  copies_.clear();
  const std::vector<int32_t> records(found.begin(), found.end());
  for (size_t i = 0; i < n; ++i) {
    layout_.AppendRecordCopies(pages.lower[i], UpperOf(pages, i), host_.offset(records[i]),
                               copies_);
    host_.Ref(records[i]);  // held by the copy: an eviction meanwhile frees it after
  }
  absl::StatusOr<engine::CopyFence> fence = EnqueueCopies(/*to_host=*/false);
  if (!fence.ok()) {
    for (int32_t r : records) host_.Unref(r);
    release();
    STRATA_RETURN_IF_ERROR(Free(pages));
    return fence.status();
  }
  in_flight_.push_back({*fence, records});
  const auto enqueued = std::chrono::steady_clock::now();
  // The check waits for the copy anyway; waiting here first times the two
  // apart.
  const absl::Status landed = device_->WaitFence(*fence);
  const auto copied = std::chrono::steady_clock::now();
  absl::StatusOr<size_t> first_corrupt = landed.ok() ? FirstCorruptCopied(records) : landed;
  release();
  auto ms = [](auto from, auto to) {
    return std::chrono::duration<double, std::milli>(to - from).count();
  };
  const auto checked = std::chrono::steady_clock::now();
  STRATA_LOG_DEBUG(
      "stored prefix: {} pages ({} copies) enqueued in {:.1f} ms, copied in {:.1f} ms, checked in "
      "{:.1f} ms",
      n, copies_.size(), ms(started, enqueued), ms(enqueued, copied), ms(copied, checked));
  if (!first_corrupt.ok()) {
    // The pages go back only once nothing writes them.
    STRATA_RETURN_IF_ERROR(device_->WaitFence(*fence));
    STRATA_RETURN_IF_ERROR(Free(pages));
    return first_corrupt.status();
  }
  const size_t good = *first_corrupt;
  if (good < n) {
    ++counters_.prefix_records_lost;
    STRATA_LOG_WARN("a stored prefix page failed its check; computing it instead");
    if (prefixes_.Erase(chain[good]).has_value()) {
      host_.Release(records[good]);
      --prefix_records_;
    }
    std::vector<int32_t> tail(pages.lower.begin() + static_cast<std::ptrdiff_t>(good),
                              pages.lower.end());
    pages.lower.resize(good);
    STRATA_RETURN_IF_ERROR(pages_.Free(tail));
    if (two_groups) {
      std::vector<int32_t> upper_tail(pages.upper.begin() + static_cast<std::ptrdiff_t>(good),
                                      pages.upper.end());
      pages.upper.resize(good);
      STRATA_RETURN_IF_ERROR(upper_pages_.Free(upper_tail));
    }
    if (good == 0) return 0;
  }
  ++counters_.prefix_hits;
  for (size_t i = 0; i < good; ++i) loaded_crcs_.push_back(host_.crc(records[i]));
  const int loaded = static_cast<int>(good) * page;
  counters_.prefix_tokens_loaded += loaded;
  return loaded;
}

absl::StatusOr<bool> KvBlockManager::FinishPrefixWrites(std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    STRATA_RETURN_IF_ERROR(Poll());
    bool writing = !pending_prefixes_.empty();
    for (const auto& [job, move] : prefix_moves_) writing |= move.down;
    if (!writing) return true;
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void KvBlockManager::ClearPrefixes() {
  while (EvictHostPrefix(/*to_ssd=*/true)) {
  }
}

}  // namespace strata::kvtier
