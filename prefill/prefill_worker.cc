#include "prefill/prefill_worker.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace strata::prefill {

PrefillWorker::PrefillWorker(engine::AsyncEngine* engine, kvtier::KvBlockManager* manager,
                             kvtier::Transport* transport)
    : engine_(engine),
      manager_(manager),
      transport_(transport),
      format_(kvtier::KvWireFormat::Of(manager->layout())) {
  manager_->set_export_sink(
      [this](kvtier::KvBlockManager::ExportedKv exported) { OnExport(std::move(exported)); });
}

PrefillWorker::~PrefillWorker() { manager_->set_export_sink(nullptr); }

absl::Status PrefillWorker::Start(engine::GenerationRequest request, std::string destination,
                                  uint64_t transfer_id, First first, Done done) {
  const uint64_t id = request.id;
  if (destination.empty() || transfer_id == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill of request ", id, ": no KV destination or transfer id"));
  }
  if (!request.decode_tokens.empty() || !request.generated.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill of request ", id, ": decode or generated tokens given"));
  }
  // The prompt alone: the first token is sampled here, and every stop
  // condition is the decode worker's, which sees that token too.
  request.max_tokens = 1;
  request.ignore_eos = true;
  request.stop_strings.clear();
  request.stop_token_ids.clear();
  request.export_kv = id;
  {
    absl::MutexLock lock(&mu_);
    if (requests_.contains(id)) {
      return absl::AlreadyExistsError(absl::StrCat("prefill of request ", id, " is running"));
    }
    Request& r = requests_[id];
    r.started = std::chrono::steady_clock::now();
    r.total_blocks =
        (static_cast<int>(request.prompt.size()) + format_.page_size - 1) / format_.page_size;
    r.destination = std::move(destination);
    r.transfer_id = transfer_id;
    r.first_token = std::move(first);
    r.done = std::move(done);
  }
  absl::Status submitted = engine_->Submit(
      std::move(request), [this, id](const engine::TokenEvent& e) { OnEvent(id, e); });
  if (!submitted.ok()) {
    absl::MutexLock lock(&mu_);
    requests_.erase(id);
  }
  return submitted;
}

void PrefillWorker::OnEvent(uint64_t id, const engine::TokenEvent& e) {
  if (e.finish == engine::FinishReason::kNone) return;
  std::function<void()> call;
  First first;
  double compute_seconds = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return;
    Request& r = it->second;
    r.engine_finished = true;
    r.first_at = std::chrono::steady_clock::now();
    if (e.token_id >= 0) r.first = engine::SampledToken{e.token_id, e.logprob};
    r.cached_prompt_tokens = e.cached_tokens;
    const bool ok =
        e.finish == engine::FinishReason::kLength || e.finish == engine::FinishReason::kStop;
    r.expect_export = ok && r.first.has_value();
    if (!ok && r.error.ok()) {
      r.error = e.finish == engine::FinishReason::kCancelled
                    ? absl::CancelledError(absl::StrCat("prefill of request ", id, " cancelled"))
                    : absl::InternalError(e.error);
    }
    if (r.expect_export && r.error.ok() && r.first_token) {
      first = std::move(r.first_token);
      r.first_token = nullptr;
      compute_seconds = std::chrono::duration<double>(r.first_at - r.started).count();
    }
    call = SettleLocked(id);
  }
  // The token goes out now; its KV's last blocks follow.
  if (first) first(engine::SampledToken{e.token_id, e.logprob}, compute_seconds);
  if (call) call();
}

void PrefillWorker::OnExport(kvtier::KvBlockManager::ExportedKv exported) {
  const uint64_t id = exported.key;
  std::string destination;
  std::vector<std::pair<std::span<const std::byte>, std::span<const std::byte>>> sends;
  std::function<void()> call;
  {
    absl::MutexLock lock(&mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) {
      manager_->ReleaseExport(id);  // nobody sends it
      return;
    }
    Request& r = it->second;
    r.exported |= exported.final;
    if (r.error.ok()) {
      destination = r.destination;
      // The raw KV's bytes per value (the caches' dtype).
      const auto element = static_cast<int64_t>(engine::DTypeSize(format_.dtype));
      for (size_t i = 0; i < exported.blocks.size(); ++i) {
        const auto& block = exported.blocks[i];
        kvtier::KvBlockHeader h;
        h.transfer_id = r.transfer_id;
        h.index = static_cast<uint32_t>(exported.first_block + static_cast<int>(i));
        h.count = static_cast<uint32_t>(r.total_blocks);
        h.tokens = static_cast<uint32_t>(block.tokens);
        h.codec = block.codec;
        h.format = format_;
        h.payload_crc = block.crc;
        h.payload_bytes = block.data.size();
        h.first_layer = block.first_layer;
        h.part_layers = block.part_layers;
        r.headers.push_back(kvtier::EncodeKvBlockHeader(h));
        sends.emplace_back(r.headers.back(), block.data);
        if (corrupt_every_nth_block_ > 0 && ++blocks_sent_ % corrupt_every_nth_block_ == 0) {
          // The export's own record: nobody else reads it.
          const_cast<std::byte&>(block.data[block.data.size() / 2]) ^= std::byte{0x40};
        }
        r.result.wire_bytes += static_cast<int64_t>(block.data.size());
        // A part carries its layers' share.
        const int layers = block.part_layers > 0 ? block.part_layers : format_.layers;
        r.result.raw_bytes +=
            int64_t{2} * layers * block.tokens * format_.kv_heads * format_.head_dim * element;
      }
      // Then what the KV policy computed on the prompt (the final part's).
      for (size_t i = 0; i < exported.planner_state.size(); ++i) {
        const std::span<const std::byte> value = exported.planner_state[i];
        kvtier::KvBlockHeader h;
        h.kind = kvtier::KvBlockHeader::Kind::kPlannerState;
        h.transfer_id = r.transfer_id;
        h.index = static_cast<uint32_t>(i);
        h.count = static_cast<uint32_t>(exported.planner_state.size());
        h.tokens = 0;
        h.format = format_;
        h.payload_crc = kvtier::KvPayloadCrc(value);
        h.payload_bytes = value.size();
        r.headers.push_back(kvtier::EncodeKvBlockHeader(h));
        sends.emplace_back(r.headers.back(), value);
        r.result.wire_bytes += static_cast<int64_t>(value.size());
        r.result.planner_state_bytes += static_cast<int64_t>(value.size());
      }
      r.result.blocks += static_cast<int>(exported.blocks.size());
      r.sends_pending += static_cast<int>(sends.size());
      if (final_send_delay_.count() > 0) {
        // The prompt's last blocks wait for the export's end (handed over
        // after the step that samples the first token), and leave late.
        const bool last_layers =
            !exported.blocks.empty() && exported.blocks[0].part_layers > 0 &&
            exported.blocks[0].first_layer + exported.blocks[0].part_layers == format_.layers;
        if (last_layers) {
          r.held.insert(r.held.end(), sends.begin(), sends.end());
          sends.clear();
        } else if (exported.final) {
          sends.insert(sends.end(), r.held.begin(), r.held.end());
          r.held.clear();
        }
      }
    }
    MaybeReleaseLocked(id, r);
    call = SettleLocked(id);
  }
  if (call) call();
  if (exported.final && final_send_delay_.count() > 0 && !sends.empty()) {
    std::this_thread::sleep_for(final_send_delay_);
  }
  for (const auto& [header, payload] : sends) {
    absl::Status sent = transport_->Send(destination, header, payload,
                                         [this, id](absl::Status s) { OnSent(id, s); });
    if (!sent.ok()) OnSent(id, sent);
  }
}

void PrefillWorker::MaybeReleaseLocked(uint64_t id, Request& r) {
  if (!r.error.ok() && !r.held.empty()) {
    // Held sends of a request that failed never go.
    r.sends_pending -= static_cast<int>(r.held.size());
    r.held.clear();
  }
  if (r.sends_pending == 0 && (r.exported || !r.error.ok())) manager_->ReleaseExport(id);
}

void PrefillWorker::OnSent(uint64_t id, const absl::Status& status) {
  std::function<void()> call;
  {
    absl::MutexLock lock(&mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return;
    Request& r = it->second;
    --r.sends_pending;
    if (!status.ok() && r.error.ok()) {
      r.error = absl::Status(status.code(), absl::StrCat("prefill of request ", id,
                                                         ": sending its KV: ", status.message()));
    }
    MaybeReleaseLocked(id, r);
    call = SettleLocked(id);
  }
  if (call) call();
}

std::function<void()> PrefillWorker::SettleLocked(uint64_t id) {
  auto it = requests_.find(id);
  Request& r = it->second;
  std::function<void()> call;
  if (r.done) {
    if (!r.error.ok()) {
      call = [done = std::move(r.done), error = r.error] { done(error); };
    } else if (r.exported && r.sends_pending == 0 && r.first.has_value()) {
      r.result.first = *r.first;
      r.result.cached_prompt_tokens = r.cached_prompt_tokens;
      r.result.compute_seconds = std::chrono::duration<double>(r.first_at - r.started).count();
      r.result.transfer_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - r.first_at).count();
      call = [done = std::move(r.done), result = r.result] { done(result); };
    }
    if (call) r.done = nullptr;
  }
  if (!r.done && r.sends_pending == 0 && r.engine_finished && (!r.expect_export || r.exported)) {
    requests_.erase(it);
  }
  return call;
}

void PrefillWorker::Cancel(uint64_t request_id) {
  std::function<void()> call;
  {
    absl::MutexLock lock(&mu_);
    auto it = requests_.find(request_id);
    if (it == requests_.end()) return;
    if (it->second.error.ok()) {
      it->second.error =
          absl::CancelledError(absl::StrCat("prefill of request ", request_id, " cancelled"));
    }
    MaybeReleaseLocked(request_id, it->second);
    call = SettleLocked(request_id);
  }
  engine_->Cancel(request_id);
  if (call) call();
}

int PrefillWorker::num_requests() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(requests_.size());
}

}  // namespace strata::prefill
