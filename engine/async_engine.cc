#include "engine/async_engine.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "engine/communicator.h"

namespace strata::engine {

AsyncEngine::AsyncEngine(Model* model, const Tokenizer* tokenizer, BatcherOptions options,
                         std::function<void()> after_step, KvMemory* kv_memory)
    : model_(model),
      batcher_(model, tokenizer, options, kv_memory),
      after_step_(std::move(after_step)) {
  free_pages_ = batcher_.free_pages();
  upper_free_pages_ = batcher_.free_upper_pages();
  thread_ = std::thread([this] { Loop(); });
}

AsyncEngine::~AsyncEngine() { Stop(); }

absl::Status AsyncEngine::Health() const {
  const Communicator* comm = model_->communicator();
  if (comm == nullptr) return absl::OkStatus();
  const absl::Status group = comm->Health();
  if (group.ok()) return group;
  return absl::UnavailableError(absl::StrCat("this worker's tensor-parallel group is broken (",
                                             group.message(),
                                             "): it serves nothing more until it is restarted"));
}

absl::Status AsyncEngine::Submit(GenerationRequest request, EventSink sink) {
  if (absl::Status s = batcher_.Validate(request); !s.ok()) return s;
  if (absl::Status s = Health(); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return absl::UnavailableError("the engine is shutting down");
  waiting_.fetch_add(1);
  queued_prompt_tokens_.fetch_add(static_cast<int64_t>(request.prompt.size()));
  pending_.emplace_back(std::move(request), std::move(sink));
  cv_.notify_one();
  return absl::OkStatus();
}

void AsyncEngine::Cancel(uint64_t request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancels_.push_back(request_id);
  cv_.notify_one();
}

void AsyncEngine::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
    cv_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

AsyncEngine::Stats AsyncEngine::GetStats() const {
  Stats s;
  s.waiting = waiting_.load();
  s.queued_prompt_tokens = queued_prompt_tokens_.load();
  s.running = running_.load();
  s.swapped = swapped_.load();
  s.free_pages = free_pages_.load();
  s.total_pages = model_->options().num_pages;
  s.upper_free_pages = upper_free_pages_.load();
  s.upper_total_pages = model_->options().num_upper_pages;
  s.upper_pages_released = upper_pages_released_.load();
  s.steps = steps_.load();
  s.preemptions = preemptions_.load();
  s.failed_sequences = failed_sequences_.load();
  s.swapped_out = swapped_out_.load();
  s.kv_lost = kv_lost_.load();
  s.broken = !Health().ok();
  return s;
}

void AsyncEngine::FailAll(const std::string& error) {
  for (auto& [id, sink] : sinks_) {
    batcher_.Cancel(id);
    TokenEvent e;
    e.request_id = id;
    e.token_id = -1;
    e.finish = FinishReason::kError;
    e.error = error;
    sink(e);
  }
  sinks_.clear();
  // Drain the cancellation events the batcher queued for them.
  if (batcher_.HasWork()) (void)batcher_.Step();
}

void AsyncEngine::Loop() {
  while (true) {
    std::vector<std::pair<GenerationRequest, EventSink>> pending;
    std::vector<uint64_t> cancels;
    bool stopping;
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto ready = [&] {
        return stop_ || !pending_.empty() || !cancels_.empty() || batcher_.HasWork();
      };
      // With KV copies or moves still finishing (stored prefixes on their
      // way to the SSD), wake now and then to poll them.
      if (batcher_.KvSettling()) {
        cv_.wait_for(lock, std::chrono::milliseconds(1), ready);
      } else {
        cv_.wait(lock, ready);
      }
      pending.swap(pending_);
      cancels.swap(cancels_);
      stopping = stop_;
    }
    for (auto& [request, sink] : pending) {
      const uint64_t id = request.id;
      if (absl::Status s = batcher_.Add(std::move(request)); !s.ok()) {
        TokenEvent e;
        e.request_id = id;
        e.token_id = -1;
        e.finish = FinishReason::kError;
        e.error = std::string(s.message());
        sink(e);
        waiting_.fetch_sub(1);
        continue;
      }
      sinks_.emplace(id, std::move(sink));
    }
    if (stopping) {
      for (const auto& [id, sink] : sinks_) cancels.push_back(id);
    }
    for (uint64_t id : cancels) batcher_.Cancel(id);

    if (!batcher_.HasWork() && batcher_.KvSettling()) {
      if (absl::Status s = batcher_.PollKv(); !s.ok()) {
        STRATA_LOG_ERROR("KV memory poll failed: {}", s.ToString());
      }
      if (after_step_) after_step_();
    }
    // A prefill worker's first token goes out now, not after the step that
    // loads the prompt's KV and decodes the next one.
    for (const TokenEvent& e : batcher_.TakeGeneratedTokens()) {
      auto it = sinks_.find(e.request_id);
      if (it == sinks_.end()) continue;
      it->second(e);
      if (e.finish != FinishReason::kNone) sinks_.erase(it);
    }
    if (batcher_.HasWork()) {
      auto events = batcher_.Step();
      steps_.fetch_add(1);
      // Before the events: a client that sees its last token sees the
      // statistics of the step that made it.
      preemptions_ = batcher_.num_preemptions();
      failed_sequences_ = batcher_.num_failed();
      swapped_out_ = batcher_.num_swapped_out();
      kv_lost_ = batcher_.num_kv_lost();
      upper_pages_released_ = batcher_.num_upper_pages_released();
      if (after_step_) after_step_();
      if (!events.ok()) {
        STRATA_LOG_ERROR("engine step failed: {}", events.status().ToString());
        FailAll(std::string(events.status().message()));
      } else {
        for (const TokenEvent& e : *events) {
          auto it = sinks_.find(e.request_id);
          if (it == sinks_.end()) continue;
          it->second(e);
          if (e.finish != FinishReason::kNone) sinks_.erase(it);
        }
      }
    }
    if (batcher_.last_step_idle()) {
      // Its sequences wait for KV coming up from the SSD: look again in a
      // moment (or at once when a request or a cancellation arrives).
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(1),
                   [&] { return stop_ || !pending_.empty() || !cancels_.empty(); });
    }
    waiting_ = batcher_.num_waiting();
    queued_prompt_tokens_ = batcher_.queued_prompt_tokens();
    running_ = batcher_.num_running();
    swapped_ = batcher_.num_swapped();
    free_pages_ = batcher_.free_pages();
    upper_free_pages_ = batcher_.free_upper_pages();
    if (stopping && !batcher_.HasWork()) {
      // Requests submitted after stop_ was set were refused; none remain.
      return;
    }
  }
}

}  // namespace strata::engine
