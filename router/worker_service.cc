#include "router/worker_service.h"

#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "router/wire.h"

namespace strata::router {

internal::v1::WorkerLoad WorkerLoadOf(const engine::AsyncEngine::Stats& engine,
                                      const kvtier::KvBlockManager* manager, int64_t page_bytes) {
  internal::v1::WorkerLoad load;
  load.set_queued_prefill_tokens(engine.queued_prompt_tokens);
  load.set_waiting_sequences(engine.waiting);
  load.set_running_sequences(engine.running);
  load.set_gpu_kv_free_bytes(int64_t{engine.free_pages} * page_bytes);
  load.set_gpu_kv_total_bytes(int64_t{engine.total_pages} * page_bytes);
  // A broken tensor-parallel group serves nothing more: schedule nothing
  // on it, as on a worker that drains.
  if (engine.broken) load.set_draining(true);
  if (manager != nullptr) {
    const kvtier::KvBlockManager::Stats s = manager->stats();
    load.set_host_kv_total_bytes(s.host_bytes_total);
    load.set_host_kv_free_bytes(s.host_bytes_total - s.host_bytes_used);
    load.set_prefix_capacity_tokens(s.prefix_capacity_tokens);
  }
  return load;
}

// One Prefill call: two answers (the first token, then the counts once the
// KV has landed) and the finish, written one at a time; finished by the
// prefill worker's `done`, or early by the caller's cancellation (which
// stops the prefill; `done` then finds the call finished).
class PrefillCall final : public grpc::ServerWriteReactor<internal::v1::PrefillResponse> {
 public:
  PrefillCall(WorkerService* service, std::string request_id)
      : service_(service), request_id_(std::move(request_id)) {}

  void Start(uint64_t engine_id) {
    absl::MutexLock lock(&mu_);
    engine_id_ = engine_id;
  }
  void First(engine::SampledToken first, double compute_seconds) {
    internal::v1::PrefillResponse out;
    out.set_first_token(first.id);
    out.set_first_logprob(first.logprob);
    out.set_compute_seconds(compute_seconds);
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    queue_.push_back(std::move(out));
    AdvanceLocked();
  }
  void Done(absl::StatusOr<prefill::PrefillWorker::Result> result) {
    service_->Forget(request_id_);
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    finishing_ = true;
    if (!result.ok()) {
      status_ = ToGrpcStatus(result.status());
    } else {
      internal::v1::PrefillResponse out;
      out.set_kv_landed(true);
      out.set_first_token(result->first.id);
      out.set_first_logprob(result->first.logprob);
      out.set_blocks(static_cast<uint32_t>(result->blocks));
      out.set_wire_bytes(static_cast<uint64_t>(result->wire_bytes));
      out.set_raw_bytes(static_cast<uint64_t>(result->raw_bytes));
      out.set_cached_prompt_tokens(static_cast<uint32_t>(result->cached_prompt_tokens));
      out.set_compute_seconds(result->compute_seconds);
      out.set_transfer_seconds(result->transfer_seconds);
      queue_.push_back(std::move(out));
    }
    AdvanceLocked();
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      // The stream broke (the caller went away): nothing more goes out.
      queue_.clear();
      if (!finishing_) return;  // OnCancel stops the prefill; `done` finishes
    }
    AdvanceLocked();
  }
  void OnCancel() override {
    uint64_t id;
    {
      absl::MutexLock lock(&mu_);
      id = engine_id_;
    }
    // `done` follows with Cancelled, and finishes the call.
    if (id != 0) service_->prefill_->Cancel(id);
  }
  void OnDone() override {
    // gRPC is done with the call; `done` may still be due (it holds a
    // reference through the shared pointer below).
    self_.reset();
  }
  std::shared_ptr<PrefillCall> self_;

 private:
  // One write at a time; the finish once the last has gone.
  void AdvanceLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return;
    if (!queue_.empty()) {
      writing_ = true;
      out_ = std::move(queue_.front());
      queue_.pop_front();
      StartWrite(&out_);
      return;
    }
    if (finishing_) {
      finished_ = true;
      Finish(status_);
    }
  }

  WorkerService* service_;
  std::string request_id_;
  absl::Mutex mu_;
  uint64_t engine_id_ = 0;
  std::deque<internal::v1::PrefillResponse> queue_ ABSL_GUARDED_BY(mu_);
  internal::v1::PrefillResponse out_ ABSL_GUARDED_BY(mu_);  // the write in flight
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;  // `done` came (or an early refusal)
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

WorkerService::WorkerService(std::function<internal::v1::WorkerLoad()> load,
                             prefill::PrefillWorker* prefill, RequestLimits limits)
    : load_(std::move(load)), prefill_(prefill), limits_(std::move(limits)) {
  RouteLibraryLogs();
}

void WorkerService::set_info(internal::v1::WorkerInfo info) {
  absl::MutexLock lock(&mu_);
  info_ = std::move(info);
}

void WorkerService::set_draining(bool draining) {
  absl::MutexLock lock(&mu_);
  draining_ = draining;
}

std::pair<internal::v1::WorkerInfo, internal::v1::WorkerLoad> WorkerService::Snapshot() const {
  internal::v1::WorkerLoad load = load_ ? load_() : internal::v1::WorkerLoad();
  absl::MutexLock lock(&mu_);
  load.set_draining(draining_);
  return {info_, load};
}

grpc::ServerUnaryReactor* WorkerService::Describe(grpc::CallbackServerContext* context,
                                                  const internal::v1::DescribeRequest*,
                                                  internal::v1::DescribeResponse* response) {
  auto [info, load] = Snapshot();
  *response->mutable_info() = std::move(info);
  *response->mutable_load() = std::move(load);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

namespace {

// Finishes a Prefill call at once with `status`, and deletes itself.
class RefusedPrefill final : public grpc::ServerWriteReactor<internal::v1::PrefillResponse> {
 public:
  explicit RefusedPrefill(const absl::Status& status) { Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerWriteReactor<internal::v1::PrefillResponse>* WorkerService::Prefill(
    grpc::CallbackServerContext* /*context*/, const internal::v1::PrefillRequest* request) {
  auto fail = [](const absl::Status& status) { return new RefusedPrefill(status); };
  if (prefill_ == nullptr) {
    return fail(absl::UnimplementedError("this worker does not prefill (it is a decode worker)"));
  }
  if (request->request_id().empty() || request->request_id().size() > 128) {
    return fail(absl::InvalidArgumentError("request_id: must be 1 to 128 bytes"));
  }
  if (request->kv_destination().empty()) {
    return fail(absl::InvalidArgumentError("kv_destination: empty"));
  }
  if (request->transfer_id() == 0) return fail(absl::InvalidArgumentError("transfer_id: 0"));
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return fail(absl::UnavailableError("this prefill worker is draining"));
    if (!request->kv_format().empty() && !info_.kv_format().empty() &&
        request->kv_format() != info_.kv_format()) {
      return fail(absl::FailedPreconditionError(absl::StrCat(
          "kv_format: the decode worker's KV format ", QuoteUserInput(request->kv_format()),
          " is not this prefill worker's \"", info_.kv_format(),
          "\" (a prompt's KV crosses only between workers of one layout and tensor-parallel "
          "size)")));
    }
  }
  // Validated as the Generate request of the same prompt would be.
  v1::GenerateRequest as_generate;
  as_generate.set_request_id(request->request_id());
  as_generate.mutable_token_ids()->mutable_ids()->CopyFrom(request->prompt_ids());
  *as_generate.mutable_sampling() = request->sampling();
  as_generate.mutable_stopping()->set_max_tokens(1);
  as_generate.set_profile(request->profile());
  absl::StatusOr<engine::GenerationRequest> converted =
      ToEngineRequest(as_generate, /*tokenizer=*/nullptr, limits_);
  if (!converted.ok()) return fail(converted.status());
  const uint64_t id = next_id_.fetch_add(1);
  converted->id = id;
  {
    absl::MutexLock lock(&mu_);
    if (!running_.emplace(request->request_id(), id).second) {
      return fail(absl::AlreadyExistsError(
          absl::StrCat("request_id ", QuoteUserInput(request->request_id()), " is running")));
    }
  }
  auto call = std::make_shared<PrefillCall>(this, request->request_id());
  call->self_ = call;
  call->Start(id);
  absl::Status started = prefill_->Start(
      *std::move(converted), request->kv_destination(), request->transfer_id(),
      [call](engine::SampledToken first, double compute_seconds) {
        call->First(first, compute_seconds);
      },
      [call](absl::StatusOr<prefill::PrefillWorker::Result> result) {
        call->Done(std::move(result));
      });
  if (!started.ok()) call->Done(started);
  return call.get();
}

grpc::ServerUnaryReactor* WorkerService::Cancel(grpc::CallbackServerContext* context,
                                                const internal::v1::CancelRequest* request,
                                                internal::v1::CancelResponse*) {
  uint64_t id = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = running_.find(request->request_id());
    if (it != running_.end()) id = it->second;
  }
  if (id != 0 && prefill_ != nullptr) prefill_->Cancel(id);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void WorkerService::Forget(const std::string& request_id) {
  absl::MutexLock lock(&mu_);
  running_.erase(request_id);
}

int WorkerService::prefills_in_flight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(running_.size());
}

}  // namespace strata::router
