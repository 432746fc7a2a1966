// KvBlockManager's part in disaggregated serving: a prefill worker's
// exports and a decode worker's imports (see kv_block_manager.h).
#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_wire.h"

namespace strata::kvtier {

absl::Status KvBlockManager::ExportKv(uint64_t key, std::span<const int32_t> tokens,
                                      const engine::SequencePages& pages, bool final) {
  const int page_size = layout_.page_size();
  const int needed = (static_cast<int>(tokens.size()) + page_size - 1) / page_size;
  const bool two_groups = upper_pages_.num_pages() > 0;
  if (tokens.empty() || needed > static_cast<int>(pages.lower.size()) ||
      (two_groups && pages.upper.size() != pages.lower.size())) {
    return absl::InvalidArgumentError(absl::StrCat("KV export ", key, ": ", tokens.size(),
                                                   " tokens in ", pages.lower.size(), " pages"));
  }
  auto it = exports_.find(key);
  if (it != exports_.end() && it->second.final) {
    return absl::AlreadyExistsError(absl::StrCat("KV export ", key, " is already complete"));
  }
  if (final && it != exports_.end() && it->second.layers_missing) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV export ", key,
                     ": its last pages' later layers were never copied out (the step's forward "
                     "ended early)"));
  }
  // Whole pages as the prompt's chunks complete them; the last page, whole
  // or not, with the final call.
  const int from = it == exports_.end() ? 0 : static_cast<int>(it->second.records.size());
  const int upto = std::max(from, final ? needed : static_cast<int>(tokens.size()) / page_size);
  const int count = upto - from;
  if (count == 0 && !final) return absl::OkStatus();
  if (two_groups) {
    for (int i = from; i < upto; ++i) {
      if (pages.upper[i] == engine::kPageOffGpu) {
        return absl::FailedPreconditionError(
            absl::StrCat("KV export ", key, ": page ", i,
                         " of the upper layers is off the GPU (its KV policy moved it)"));
      }
    }
  }
  // Stored prefixes give way, as they do to a swap.
  while (host_.num_free() < count && EvictHostPrefix(/*to_ssd=*/false)) {
  }
  std::vector<int32_t> records;
  if (!host_.Allocate(count, records)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV export ", key, " needs ", count, " host records; ", host_.num_free(),
                     " are free (the host tier holds exports until they are sent)"));
  }
  Export::Part part;
  part.first = from;
  part.count = count;
  part.tokens = static_cast<int>(tokens.size());
  part.final = final;
  part.fence = engine::kFenceDone;
  part.codec = WireCodec(pages.workload);
  int64_t bytes = int64_t{count} * layout_.record_bytes();
  if (count > 0) {
    absl::StatusOr<engine::CopyFence> fence;
    if (part.codec == engine::KvCodecKind::kBf16) {
      copies_.clear();
      for (int i = 0; i < count; ++i) {
        layout_.AppendRecordCopies(pages.lower[from + i],
                                   two_groups ? pages.upper[from + i] : engine::kPageOffGpu,
                                   host_.offset(records[i]), copies_);
      }
      fence = EnqueueCopies(/*to_host=*/true);
    } else {
      // Coded on the device as it leaves: the wire carries a quarter to a
      // half of the raw bytes.
      const engine::KvCodec& coder = Coder(part.codec);
      blocks_.clear();
      bytes = 0;
      for (int i = 0; i < count; ++i) {
        const int page_tokens =
            std::min(page_size, static_cast<int>(tokens.size()) - (from + i) * page_size);
        part.bytes.push_back(layout_.AppendRecordBlocks(
            pages.lower[from + i], two_groups ? pages.upper[from + i] : engine::kPageOffGpu,
            page_tokens, coder, host_.offset(records[i]), blocks_));
        bytes += part.bytes.back();
      }
      KvDevice& backend = *device_;
      fence = backend.EncodeBlocksToHost(part.codec, layout_.k_caches(), layout_.v_caches(),
                                         blocks_, host_.buffer());
      // As for a copy (EnqueueCopies): compute enqueued later, which may
      // write these pages once the sequence frees them, waits for the
      // encode that reads them.
      if (fence.ok()) {
        if (absl::Status ordered = backend.ComputeAfterFence(*fence); !ordered.ok()) {
          STRATA_RETURN_IF_ERROR(backend.WaitFence(*fence));
          fence = ordered;
        }
      }
    }
    if (!fence.ok()) {
      for (int32_t r : records) {
        host_.Release(r);
        host_.Unref(r);
      }
      return fence.status();
    }
    part.fence = *fence;
  }
  Export& e = exports_[key];
  e.records.insert(e.records.end(), records.begin(), records.end());
  e.pending.push_back(part);
  e.final = final;
  if (final) ++counters_.kv_exports;
  counters_.kv_export_bytes += bytes;
  return absl::OkStatus();
}

bool KvBlockManager::ExportByLayer(uint64_t key, std::span<const int32_t> tokens,
                                   const engine::SequencePages& pages) {
  const int layers = layout_.num_layers();
  if (options_.export_layer_parts <= 1 || layout_.num_ranks() != 1 ||
      upper_pages_.num_pages() > 0 || layers < 2 || layers > KvBlockHeader::kMaxPartLayers ||
      layers > LandingArea::kMaxLayers || tokens.empty()) {
    return false;
  }
  const int page_size = layout_.page_size();
  const int needed = (static_cast<int>(tokens.size()) + page_size - 1) / page_size;
  if (needed > static_cast<int>(pages.lower.size())) return false;
  auto it = exports_.find(key);
  if (it != exports_.end() && it->second.final) return false;
  for (const LayerExport& le : layer_exports_) {
    if (le.key == key) return false;
  }
  const int from = it == exports_.end() ? 0 : static_cast<int>(it->second.records.size());
  const int count = needed - from;
  if (count <= 0) return false;
  while (host_.num_free() < count && EvictHostPrefix(/*to_ssd=*/false)) {
  }
  std::vector<int32_t> records;
  if (!host_.Allocate(count, records)) return false;  // the final ExportKv says why
  // Allocate's reference on each record is the entry's until its last
  // part is enqueued; each part takes one of its own.
  Export& e = exports_[key];
  e.records.insert(e.records.end(), records.begin(), records.end());
  LayerExport le;
  le.key = key;
  le.first = from;
  le.count = count;
  le.tokens = static_cast<int>(tokens.size());
  le.codec = WireCodec(pages.workload);
  le.pages.assign(pages.lower.begin() + from, pages.lower.begin() + needed);
  layer_exports_.push_back(std::move(le));
  return true;
}

absl::Status KvBlockManager::LayerKvWritten(int layer) {
  if (layer_exports_.empty()) return absl::OkStatus();
  const int layers = layout_.num_layers();
  const int per_part = (layers + options_.export_layer_parts - 1) / options_.export_layer_parts;
  const int page_size = layout_.page_size();
  KvDevice& backend = *device_;
  for (auto it = layer_exports_.begin(); it != layer_exports_.end();) {
    LayerExport& le = *it;
    const int end = std::min(layers, le.next_layer + per_part);
    if (layer + 1 != end) {
      ++it;
      continue;
    }
    Export& e = exports_[le.key];
    const std::span<const int32_t> records =
        std::span<const int32_t>(e.records).subspan(le.first, le.count);
    Export::Part part;
    part.first = le.first;
    part.count = le.count;
    part.tokens = le.tokens;
    part.codec = le.codec;
    part.first_layer = le.next_layer;
    part.part_layers = end - le.next_layer;
    const bool raw = le.codec == engine::KvCodecKind::kBf16;
    const engine::KvCodec* coder = raw ? nullptr : &Coder(le.codec);
    copies_.clear();
    blocks_.clear();
    int64_t bytes = 0;
    for (int i = 0; i < le.count; ++i) {
      const int page_tokens = std::min(page_size, le.tokens - (le.first + i) * page_size);
      int64_t offset = 0;
      part.bytes.push_back(layout_.AppendRecordLayers(
          le.pages[static_cast<size_t>(i)], engine::kPageOffGpu, page_tokens, coder,
          host_.offset(records[static_cast<size_t>(i)]), le.next_layer, end, copies_, blocks_,
          &offset));
      part.offsets.push_back(offset);
      bytes += part.bytes.back();
    }
    // After the layers' writes enqueued so far, beside the later layers'
    // compute; the compute waits for them only at the final ExportKv.
    absl::StatusOr<engine::CopyFence> fence =
        raw ? backend.CopyRowsToHost(layout_.caches(), copies_, host_.buffer())
            : backend.EncodeBlocksToHost(le.codec, layout_.k_caches(), layout_.v_caches(), blocks_,
                                         host_.buffer());
    if (!fence.ok()) {
      // The final ExportKv fails its request.
      e.layers_missing = true;
      for (int32_t r : records) host_.Unref(r);
      it = layer_exports_.erase(it);
      return fence.status();
    }
    for (int32_t r : records) host_.Ref(r);
    part.fence = *fence;
    layer_fence_ = *fence;
    e.pending.push_back(std::move(part));
    counters_.kv_export_bytes += bytes;
    le.next_layer = end;
    if (end == layers) {
      layer_keys_.push_back(le.key);
      for (int32_t r : records) host_.Unref(r);  // Allocate's
      it = layer_exports_.erase(it);
    } else {
      ++it;
    }
  }
  return absl::OkStatus();
}

absl::Status KvBlockManager::FinishLayerExports() {
  for (const LayerExport& le : layer_exports_) {
    Export& e = exports_[le.key];
    e.layers_missing = true;
    for (int i = 0; i < le.count; ++i) host_.Unref(e.records[static_cast<size_t>(le.first + i)]);
  }
  layer_exports_.clear();
  layer_keys_.clear();
  const engine::CopyFence fence = layer_fence_;
  layer_fence_ = engine::kFenceDone;
  // The copies run in order: waiting for the last waits for them all.
  return fence == engine::kFenceDone ? absl::OkStatus() : device_->ComputeAfterFence(fence);
}

engine::KvCodecKind KvBlockManager::WireCodec(int workload) const {
  if (workload < 0 || static_cast<size_t>(workload) >= options_.workload_wire_codec.size()) {
    return engine::KvCodecKind::kBf16;
  }
  return options_.workload_wire_codec[static_cast<size_t>(workload)];
}

const engine::KvCodec& KvBlockManager::Coder(engine::KvCodecKind codec) {
  std::unique_ptr<engine::KvCodec>& coder = coders_[static_cast<size_t>(codec) & 3];
  if (coder == nullptr) coder = *engine::KvCodec::Create(codec);  // every kind exists
  return *coder;
}

void KvBlockManager::ReleaseExport(uint64_t key) {
  absl::MutexLock lock(&released_mu_);
  released_exports_.push_back(key);
}

void KvBlockManager::AddExportPlannerState(uint64_t key, std::vector<std::vector<uint8_t>> state) {
  // Expected first (ExpectExportPlannerState): an export gone by now was
  // dropped or released, and nothing is sent.
  auto it = exports_.find(key);
  if (it == exports_.end()) return;
  Export& e = it->second;
  if (e.ended || e.state_came) return;
  e.planner_state.insert(e.planner_state.end(), std::make_move_iterator(state.begin()),
                         std::make_move_iterator(state.end()));
  e.state_came = ++e.state_parts_came >= std::max(1, e.state_parts_expected);
}

void KvBlockManager::ExpectExportPlannerState(uint64_t key) {
  Export& e = exports_[key];
  e.state_expected = true;
  ++e.state_parts_expected;
}

void KvBlockManager::DropExport(uint64_t key) {
  auto it = exports_.find(key);
  if (it != exports_.end()) FreeExport(it);
}

void KvBlockManager::FreeExport(absl::flat_hash_map<uint64_t, Export>::iterator it) {
  Export& e = it->second;
  // Armed and not all copied out (its sequence ended in the step): the
  // records' Allocate references go with the entry.
  for (auto le = layer_exports_.begin(); le != layer_exports_.end();) {
    if (le->key != it->first) {
      ++le;
      continue;
    }
    for (int i = 0; i < le->count; ++i) host_.Unref(e.records[static_cast<size_t>(le->first + i)]);
    le = layer_exports_.erase(le);
  }
  // Parts still being copied hold their records' copy references until
  // their fence is done.
  for (size_t i = 0; i < e.records.size(); ++i) host_.Release(e.records[i]);
  for (const Export::Part& part : e.pending) {
    if (part.count == 0) continue;
    in_flight_.push_back(
        {part.fence, std::vector<int32_t>(e.records.begin() + part.first,
                                          e.records.begin() + part.first + part.count)});
  }
  exports_.erase(it);
}

absl::Status KvBlockManager::HandOverExports(const ExportSink& sink) {
  KvDevice& backend = *device_;
  const int page_size = layout_.page_size();
  for (auto& [key, e] : exports_) {
    // In order: a part goes out only after the ones before it.
    while (!e.pending.empty()) {
      const Export::Part part = e.pending.front();
      STRATA_ASSIGN_OR_RETURN(const bool done, backend.FenceDone(part.fence));
      if (!done) break;
      const std::span<const int32_t> records =
          std::span<const int32_t>(e.records).subspan(part.first, part.count);
      const bool raw = part.codec == engine::KvCodecKind::kBf16;
      const bool layered = part.part_layers > 0;
      if (raw && !layered) host_.SealAll(records, crc_pool_.get());
      for (int32_t r : records) host_.Unref(r);  // the copy's reference: resident now
      e.pending.pop_front();
      if (!sink) continue;
      ExportedKv out;
      out.key = key;
      out.first_block = part.first;
      // An expected planner state not yet here ends the export later.
      out.final = part.final && (!e.state_expected || e.state_came);
      e.ended |= out.final;
      for (int i = 0; i < part.count; ++i) {
        const int32_t r = records[i];
        const int page = part.first + i;
        const std::span<const std::byte> data(
            reinterpret_cast<const std::byte*>(host_.data(r)) + (layered ? part.offsets[i] : 0),
            static_cast<size_t>(raw && !layered ? layout_.record_bytes() : part.bytes[i]));
        out.blocks.push_back({data, raw && !layered ? host_.crc(r) : 0u,
                              std::min(page_size, part.tokens - page * page_size), part.codec,
                              part.first_layer, part.part_layers});
      }
      if (!raw || layered) {
        // The coded payloads' CRCs, on the CRC threads (a long prompt's
        // part is hundreds of megabytes).
        crc_pool_->ParallelFor(part.count, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i)
            out.blocks[i].crc = KvPayloadCrc(out.blocks[i].data);
        });
      }
      if (out.final) {
        for (const std::vector<uint8_t>& value : e.planner_state) {
          out.planner_state.push_back(std::as_bytes(std::span<const uint8_t>(value)));
        }
      }
      sink(std::move(out));
    }
    if (sink && e.final && e.pending.empty() && !e.ended && !e.state_came) {
      const auto now = std::chrono::steady_clock::now();
      if (!e.pages_sent.has_value()) e.pages_sent = now;
      if (now - *e.pages_sent > options_.planner_state_timeout) {
        STRATA_LOG_WARN(
            "KV export {}: the planner state it expects did not come in {} ms; it "
            "ends without it",
            key, options_.planner_state_timeout.count());
        e.planner_state.clear();
        e.state_came = true;
      }
    }
    if (sink && e.final && e.pending.empty() && !e.ended && e.state_came) {
      // The planner state came after the pages: the export's end.
      ExportedKv out;
      out.key = key;
      out.first_block = static_cast<int>(e.records.size());
      out.final = true;
      e.ended = true;
      for (const std::vector<uint8_t>& value : e.planner_state) {
        out.planner_state.push_back(std::as_bytes(std::span<const uint8_t>(value)));
      }
      sink(std::move(out));
    }
  }
  return absl::OkStatus();
}

absl::Status KvBlockManager::LayersEnqueued() {
  if (layer_keys_.empty()) return absl::OkStatus();
  ExportSink sink;
  {
    absl::MutexLock lock(&released_mu_);
    sink = export_sink_;
  }
  // The host has nothing to do until the step's results: it hands over
  // each layer part as its copy completes, so that the parts go out while
  // the later layers compute, rather than at the poll after the step. Not
  // the last part of each (copied beside the last layer, it would hold up
  // the step's results): the poll after the step sends it.
  const int layers = layout_.num_layers();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  while (true) {
    STRATA_RETURN_IF_ERROR(HandOverExports(sink));
    bool waiting = false;
    for (uint64_t key : layer_keys_) {
      auto it = exports_.find(key);
      if (it == exports_.end()) continue;
      for (const Export::Part& part : it->second.pending) {
        waiting |= part.part_layers > 0 && part.first_layer + part.part_layers < layers;
      }
    }
    if (!waiting || std::chrono::steady_clock::now() > give_up) break;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  layer_keys_.clear();
  return absl::OkStatus();
}

absl::Status KvBlockManager::PollTransfers() {
  KvDevice& backend = *device_;
  std::vector<uint64_t> released;
  ExportSink sink;
  {
    absl::MutexLock lock(&released_mu_);
    released.swap(released_exports_);
    sink = export_sink_;
  }
  for (uint64_t key : released) {
    auto it = exports_.find(key);
    if (it != exports_.end()) FreeExport(it);
  }
  STRATA_RETURN_IF_ERROR(HandOverExports(sink));
  if (landing_ != nullptr) {
    for (auto it = landing_in_flight_.begin(); it != landing_in_flight_.end();) {
      STRATA_ASSIGN_OR_RETURN(const bool done, backend.FenceDone(it->fence));
      if (!done) {
        ++it;
        continue;
      }
      landing_->Free(it->records);
      it = landing_in_flight_.erase(it);
    }
    counters_.kv_transfers_expired += landing_->Expire(absl::Now());
  }
  return absl::OkStatus();
}

namespace {

// Pages of a prompt of `pages` pages that lie wholly inside `range`.
int PagesInside(const ImportAdmitter::Range& range, int page_size, int pages) {
  int inside = 0;
  for (int i = 0; i < pages; ++i) {
    inside += i * page_size >= range.begin && (i + 1) * page_size <= range.end;
  }
  return inside;
}

}  // namespace

absl::StatusOr<bool> KvBlockManager::LoadImported(int64_t seq_id, uint64_t transfer_id,
                                                  std::span<const int32_t> tokens,
                                                  engine::SequencePages& pages, int64_t max_bytes) {
  if (landing_ == nullptr) {
    return absl::NotFoundError(
        "KV transfers need a landing area (this worker takes no KV from prefill workers)");
  }
  if (!pages.empty() || tokens.empty()) {
    DropImported(transfer_id);
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer ", transfer_id, ": loaded into a sequence holding pages"));
  }
  auto it = importing_.find(transfer_id);
  if (it == importing_.end()) {
    STRATA_ASSIGN_OR_RETURN(const bool started,
                            StartImport(seq_id, pages.workload, transfer_id, tokens));
    if (!started) return false;
    it = importing_.find(transfer_id);
  }
  Import& im = it->second;
  if (im.admitting) {
    // Its upper layers are being encoded into the host tier, from the
    // landing records: none is freed (no page loaded) before that is done.
    absl::StatusOr<bool> done = admitter_->AdmitDone(im.seq_id);
    if (!done.ok()) {
      im.admitted = im.admitting = false;  // the admitter dropped it
      DropImported(transfer_id);
      ++counters_.kv_imports_failed;
      return absl::Status(done.status().code(),
                          absl::StrCat("KV transfer ", transfer_id, ": ", done.status().message()));
    }
    if (!*done) {
      return absl::UnavailableError(
          absl::StrCat("KV transfer ", transfer_id, ": its clusters are going into the host tier"));
    }
    im.admitting = false;
  }
  if (im.tokens != static_cast<int>(tokens.size())) {
    DropImported(transfer_id);
    ++counters_.kv_imports_failed;
    return absl::InvalidArgumentError(absl::StrCat("KV transfer ", transfer_id, ": loading ",
                                                   im.tokens, " tokens, then asked for ",
                                                   tokens.size()));
  }
  // The next pages, up to max_bytes of what landed (at least one page).
  const int needed = static_cast<int>(im.blocks.size());
  const bool two_groups = upper_pages_.num_pages() > 0;
  copies_.clear();
  blocks_.clear();
  int64_t bytes = 0;
  const int first = im.next;
  while (im.next < needed && (im.next == first || max_bytes <= 0 || bytes < max_bytes)) {
    const int i = im.next++;
    const LandingArea::Block& b = im.blocks[i];
    const int32_t upper = two_groups ? im.pages.upper[i] : engine::kPageOffGpu;
    if (b.codec == engine::KvCodecKind::kBf16) {
      layout_.AppendRecordCopies(im.pages.lower[i], upper, host_.offset(b.record), copies_);
    } else {
      im.exact = false;
      layout_.AppendRecordBlocks(im.pages.lower[i], upper, b.tokens, Coder(b.codec),
                                 host_.offset(b.record), blocks_);
      // An admitted page's upper layers are in the admitter's tier.
      std::erase_if(blocks_,
                    [](const engine::KvBlockCopy& c) { return c.page == engine::kPageOffGpu; });
    }
    bytes += b.bytes;
  }
  std::vector<int32_t> records;
  for (int i = first; i < im.next; ++i) records.push_back(im.blocks[i].record);
  absl::Status moved = absl::OkStatus();
  if (!blocks_.empty()) {
    // Decoded on the device, straight from the landing records; each
    // block's own CRC is checked there too.
    const absl::Status decoded = device_->DecodeBlocksFromHost(
        host_.buffer(), blocks_, layout_.k_caches(), layout_.v_caches());
    if (!decoded.ok()) {
      moved =
          absl::DataLossError(absl::StrCat("KV transfer ", transfer_id, ": ", decoded.message()));
    }
  }
  engine::CopyFence fence = engine::kFenceDone;
  if (moved.ok() && !copies_.empty()) {
    absl::StatusOr<engine::CopyFence> copied = EnqueueCopies(/*to_host=*/false);
    if (copied.ok()) {
      fence = *copied;
      im.last_fence = fence;
    } else {
      moved = copied.status();
    }
  }
  if (!moved.ok()) {
    landing_->Free(records);
    for (int i = first; i < im.next; ++i) im.blocks[i].record = -1;
    DropImported(transfer_id);
    ++counters_.kv_imports_failed;
    return moved;
  }
  // Freed once the copy that reads them is done.
  landing_in_flight_.push_back({fence, std::move(records)});
  for (int i = first; i < im.next; ++i) im.blocks[i].record = -1;
  counters_.kv_import_bytes += bytes;
  if (im.next < needed) {
    return absl::UnavailableError(
        absl::StrCat("KV transfer ", transfer_id, ": ", im.next, " of ", needed, " pages loaded"));
  }
  pages = std::move(im.pages);
  imported_planner_state_ = std::move(im.planner_state);
  imported_exact_ = im.exact;
  importing_.erase(it);
  ++counters_.kv_imports;
  return true;
}

absl::StatusOr<bool> KvBlockManager::StartImport(int64_t seq_id, int workload, uint64_t transfer_id,
                                                 std::span<const int32_t> tokens) {
  const int page_size = layout_.page_size();
  const int needed = (static_cast<int>(tokens.size()) + page_size - 1) / page_size;
  const bool two_groups = upper_pages_.num_pages() > 0;
  absl::StatusOr<bool> ready = landing_->Ready(transfer_id);
  if (!ready.ok()) {
    if (absl::IsAborted(ready.status())) ++counters_.kv_imports_failed;
    return ready.status();
  }
  if (!*ready) {
    return absl::UnavailableError(absl::StrCat("KV transfer ", transfer_id, " is still arriving"));
  }
  if (pages_.num_free() < needed) return false;
  // An admitter may take the upper layers of some of the prompt's pages
  // (wholly inside its range) straight from the landing records: those
  // need no upper page.
  ImportAdmitter::Range admit;
  bool reserved = false;
  if (two_groups && admitter_ != nullptr && layout_.num_ranks() == 1 && seq_id >= 0) {
    const std::vector<std::vector<uint8_t>> heads =
        landing_->PlannerStateHeads(transfer_id, ImportAdmitter::kStateHeadBytes);
    if (!heads.empty()) {
      admit = admitter_->PlanAdmission(seq_id, workload, static_cast<int>(tokens.size()), heads);
    }
    const int upper = needed - PagesInside(admit, page_size, needed);
    if (admit.end > admit.begin && upper_pages_.num_free() >= upper) {
      reserved = admitter_->ReserveAdmission(seq_id, workload, static_cast<int>(tokens.size()));
      // Its ring came from the upper pages too.
      if (reserved && upper_pages_.num_free() < upper) {
        admitter_->DropAdmitted(seq_id);
        reserved = false;
      }
    }
    if (!reserved) admit = {};
  }
  // What the admitter reserved goes back on every path that does not end
  // with the import started.
  auto drop_admission = [&] {
    if (reserved) admitter_->DropAdmitted(seq_id);
    reserved = false;
  };
  if (two_groups && upper_pages_.num_free() < needed - PagesInside(admit, page_size, needed)) {
    drop_admission();
    return false;
  }
  imported_planner_state_.clear();
  imported_exact_ = false;
  Import im;
  im.tokens = static_cast<int>(tokens.size());
  im.seq_id = seq_id;
  im.pages.workload = workload;
  absl::StatusOr<std::vector<LandingArea::Block>> blocks =
      landing_->Take(transfer_id, &im.planner_state);
  if (!blocks.ok()) {
    drop_admission();
    ++counters_.kv_imports_failed;
    return blocks.status();
  }
  auto fail = [&](absl::Status status) {
    drop_admission();
    ++counters_.kv_imports_failed;
    std::vector<int32_t> records;
    for (const LandingArea::Block& b : *blocks) records.push_back(b.record);
    landing_->Free(records);
    return status;
  };
  if (static_cast<int>(blocks->size()) != needed) {
    return fail(absl::FailedPreconditionError(
        absl::StrCat("KV transfer ", transfer_id, " brought ", blocks->size(), " pages for ",
                     tokens.size(), " tokens (", needed, " pages)")));
  }
  // A coded page must hold exactly the tokens the prompt has there (fewer
  // would leave rows of the page unwritten).
  for (int i = 0; i < needed; ++i) {
    const LandingArea::Block& b = (*blocks)[i];
    const int page_tokens = std::min(page_size, static_cast<int>(tokens.size()) - i * page_size);
    if (b.codec != engine::KvCodecKind::kBf16 && b.tokens != page_tokens) {
      return fail(absl::FailedPreconditionError(
          absl::StrCat("KV transfer ", transfer_id, ": block ", i, " holds ", b.tokens,
                       " tokens; the prompt has ", page_tokens, " in that page")));
    }
  }
  // Each block was checked against its header's CRC as it landed.
  if (reserved) {
    std::vector<ImportAdmitter::LandedPage> landed;
    landed.reserve(blocks->size());
    for (const LandingArea::Block& b : *blocks) {
      landed.push_back({host_.buffer().data() + host_.offset(b.record), b.codec, b.tokens});
    }
    absl::StatusOr<ImportAdmitter::Range> admitted = admitter_->Admit(
        seq_id, workload, static_cast<int>(tokens.size()), im.planner_state, landed);
    reserved = false;  // Admit drops it on an error
    if (admitted.ok()) {
      admit = *admitted;
      im.admitted = im.admitting = admit.end > admit.begin;
    } else if (absl::IsDataLoss(admitted.status())) {
      return fail(absl::DataLossError(
          absl::StrCat("KV transfer ", transfer_id, ": ", admitted.status().message())));
    } else {
      // The pages go to the GPU as they would without an admitter.
      STRATA_LOG_WARN("KV transfer {}: not admitted straight into the host tier: {}", transfer_id,
                      admitted.status().ToString());
      admit = {};
    }
  }
  if (!pages_.Allocate(needed, im.pages.lower)) {
    if (im.admitted) admitter_->DropAdmitted(seq_id);
    return fail(absl::InternalError("free pages vanished"));
  }
  if (two_groups) {
    std::vector<int32_t> upper;
    const int off = im.admitted ? PagesInside(admit, page_size, needed) : 0;
    if (!upper_pages_.Allocate(needed - off, upper)) {
      // (After an admission error, the pages the admission would have
      // saved may be short: the import fails.)
      if (im.admitted) admitter_->DropAdmitted(seq_id);
      if (absl::Status s = pages_.Free(im.pages.lower); !s.ok()) return fail(s);
      return fail(absl::ResourceExhaustedError(absl::StrCat("KV transfer ", transfer_id, ": ",
                                                            needed - off, " upper pages needed, ",
                                                            upper_pages_.num_free(), " free")));
    }
    auto next = upper.begin();
    for (int i = 0; i < needed; ++i) {
      const bool inside =
          im.admitted && i * page_size >= admit.begin && (i + 1) * page_size <= admit.end;
      im.pages.upper.push_back(inside ? engine::kPageOffGpu : *next++);
    }
    if (im.admitted) {
      ++counters_.kv_imports_admitted;
      counters_.kv_import_upper_pages_saved += off;
    }
  }
  if (im.admitted && std::all_of(blocks->begin(), blocks->end(), [](const LandingArea::Block& b) {
        return b.codec == engine::KvCodecKind::kBf16;
      })) {
    // The prompt came exact and its clustered pages' upper layers will
    // never be on the GPU, where StorePrefix copies from: its prefix pages
    // are kept from the landing records, while they are all here.
    std::vector<int32_t> records;
    for (const LandingArea::Block& b : *blocks) records.push_back(b.record);
    if (absl::Status s = StorePrefixFromRecords(tokens, records); !s.ok()) {
      STRATA_LOG_WARN("KV transfer {}: prompt not stored: {}", transfer_id, s.ToString());
    }
  }
  im.blocks = *std::move(blocks);
  importing_.emplace(transfer_id, std::move(im));
  return true;
}

void KvBlockManager::DropImported(uint64_t transfer_id) {
  if (landing_ != nullptr) landing_->Drop(transfer_id);
  auto it = importing_.find(transfer_id);
  if (it == importing_.end()) return;
  Import& im = it->second;
  // The admitter stops reading the landing records before they go.
  if (im.admitted && admitter_ != nullptr) admitter_->DropAdmitted(im.seq_id);
  // Its pages are free to others only once no copy writes them.
  if (im.last_fence != engine::kFenceDone) {
    if (absl::Status s = device_->WaitFence(im.last_fence); !s.ok()) {
      STRATA_LOG_ERROR("KV transfer {}: {}", transfer_id, s.ToString());
    }
  }
  std::vector<int32_t> records;
  for (const LandingArea::Block& b : im.blocks) {
    if (b.record >= 0) records.push_back(b.record);
  }
  landing_->Free(records);
  if (absl::Status s = Free(im.pages); !s.ok()) {
    STRATA_LOG_ERROR("KV transfer {}: {}", transfer_id, s.ToString());
  }
  importing_.erase(it);
}

}  // namespace strata::kvtier
