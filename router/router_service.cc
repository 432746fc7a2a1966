#include "router/router_service.h"

#include <grpc/grpc.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "router/wire.h"

namespace strata::router {
namespace {

using Clock = std::chrono::steady_clock;

// The server learns of an expired deadline as a cancellation that can
// arrive slightly before its own copy of the deadline (set on arrival from
// the client's timeout), hence the tolerance.
constexpr auto kDeadlineTolerance = std::chrono::milliseconds(100);

// Attempts on decode workers per request: the first and one retry.
constexpr int kMaxAttempts = 2;

// How often requests waiting for a decode worker with room look again.
// Room appears with a worker's report (every heartbeat, typically 0.5-1 s)
// or a new worker, so a few milliseconds of delay are nothing against it.
constexpr auto kQueueRetryInterval = std::chrono::milliseconds(10);

// Channels to decode worker addresses kept before those of workers the
// registry no longer knows are dropped (workers come and go; the cache
// must not grow with every address ever seen).
constexpr size_t kChannelCacheLimit = 256;

// Keepalive on the channels to workers: a worker whose host vanished
// without closing its connections fails its calls within about 40 s
// instead of the kernel's TCP timeout. No more often than workers' servers
// accept pings (transport_options.h).
constexpr int kWorkerKeepaliveTimeMs = 30'000;
constexpr int kWorkerKeepaliveTimeoutMs = 10'000;

// A failure of the decode worker or of the way to it, as opposed to an
// answer about the request itself (INVALID_ARGUMENT, INTERNAL, ...): the
// request may go elsewhere when nothing was relayed yet. CANCELLED here is
// one the router did not ask for (the worker's server stopping).
bool IsWorkerFailure(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED ||
         code == grpc::StatusCode::RESOURCE_EXHAUSTED || code == grpc::StatusCode::CANCELLED;
}

std::string Describe(const PickedWorker& worker) {
  return absl::StrCat("decode worker ", worker.worker_id, " (", worker.grpc_address, ")");
}

// "decode worker d1 (host:port) failed<when>: UNAVAILABLE: <its message>".
std::string DescribeFailure(const PickedWorker& worker, const grpc::Status& status,
                            const std::string& when = "") {
  return absl::StrCat(Describe(worker), " failed", when, ": ",
                      absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())),
                      ": ", status.error_message());
}

// `timeout` after `arrival`; never for a timeout of a year or more (an
// infinite one included).
Clock::time_point QueueDeadline(Clock::time_point arrival, absl::Duration timeout) {
  if (timeout >= absl::Hours(24 * 365)) return Clock::time_point::max();
  return arrival + absl::ToChronoNanoseconds(std::max(timeout, absl::ZeroDuration()));
}

const char* FinishReasonLabel(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "error";
  }
}

}  // namespace

// One call to a decode worker, for one attempt of a RouteStream. It lives
// from the call's start until its OnDone has told the stream, and holds a
// reference on the stream meanwhile. Its reads are started by the stream
// only (under the stream's mutex), one at a time.
//
// The stream starts a read from its client's write completion, outside
// this call's reactions, so the call holds itself open with a hold
// (AddHold) until the stream will start no more reads: without it, gRPC
// may end the call (its status in, no read outstanding) and free it just
// as the stream starts the next read.
class UpstreamCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  UpstreamCall(RouteStream* stream, PickedWorker worker)
      : stream_(stream), worker_(std::move(worker)) {}

  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

  grpc::ClientContext& context() { return context_; }
  v1::GenerateResponse& response() { return response_; }
  const PickedWorker& worker() const { return worker_; }

  // Under the stream's mutex. Taken before the call starts.
  void TakeHoldLocked() {
    AddHold();
    held_ = true;
  }
  // The stream will start no more reads: the call may end.
  void ReleaseHoldLocked() {
    if (!held_) return;
    held_ = false;
    RemoveHold();
  }
  bool held() const { return held_; }

 private:
  RouteStream* const stream_;
  const PickedWorker worker_;
  grpc::ClientContext context_;
  v1::GenerateResponse response_;
  bool held_ = false;  // guarded by the stream's mutex
};

// One Generate call from a client: the reactor gRPC drives, and the relay
// between it and the current UpstreamCall.
//
// It lives until gRPC is done with the client's call (OnDone) and every
// UpstreamCall it started has run its OnDone: one reference each, the last
// one to go deletes it. Everything below mu_ is touched by gRPC's threads
// of both calls. gRPC runs no reaction inline from StartWrite, Finish,
// StartRead, StartCall or TryCancel (neither reactor is inlineable), so
// they are called under mu_.
class RouteStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  RouteStream(RouterService* service, grpc::CallbackServerContext* context,
              const grpc::ByteBuffer& request);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // The queue's turn for this stream, waiting for a decode worker with room
  // (RouterService::DispatchLoop): picks one and starts the call, or ends
  // the call when its client left or it waited queue_timeout. True while it
  // must wait on. `behind_another`: an earlier request of its profile still
  // waits, and this one may not overtake it.
  bool OnQueueTurn(bool behind_another);
  const std::string& profile() const { return profile_; }
  // Drops a reference (gRPC's, an UpstreamCall's or the queue's).
  void Unref();

  // From the current UpstreamCall's reactions.
  void OnUpstreamRead(UpstreamCall* call, bool ok);
  void OnUpstreamDone(UpstreamCall* call, const grpc::Status& status);

 private:
  ~RouteStream() override = default;

  // Ends a call that was not admitted, or admitted and not forwarded.
  void Reject(const absl::Status& status, const std::string& reason);
  // Sends the client's status (once), giving the in-flight slot back first.
  void FinishLocked(const grpc::Status& status);
  void RejectLocked(const absl::Status& status, const std::string& reason);
  // Picks a decode worker and calls it (RouteLocked), or ends the call when
  // no worker can take the request. True when it must wait for one with
  // room instead (and may, within queue_deadline_).
  bool RouteOrWaitLocked();
  // Picks a prefill worker for `decode` when the prompt wants one, and
  // calls `decode` with the request.
  void RouteLocked(PickedWorker decode);
  // Ends a waiting request whose queue_deadline_ passed.
  void EndWaitLocked();
  // Calls `worker` with the request (a new UpstreamCall). Requires mu_.
  void StartAttemptLocked(PickedWorker worker);
  // Picks another decode worker after the current one failed and calls it;
  // false (with the reason in failures_) when there is none.
  bool RetryLocked();
  // Finishes the client's call when it is due and no write is in flight.
  void AdvanceLocked();
  // The client's call ended on its side (cancellation, deadline, a broken
  // stream): cancel the worker's call and finish with the matching status.
  void CancelLocked();
  void EndLocked(grpc::Status status, const char* finish_reason);
  void CountFinishLocked(const std::string& reason);
  bool ClientDeadlinePassed() const {
    return client_deadline_ <= std::chrono::system_clock::now() + kDeadlineTolerance;
  }

  RouterService* const service_;
  const Clock::time_point arrival_ = Clock::now();
  // Until when the request may wait for a decode worker with room.
  const Clock::time_point queue_deadline_;
  // Copied from the call's context, which is not to be touched once the
  // call is finished (the worker's call may outlive it).
  const std::chrono::system_clock::time_point client_deadline_;
  // gRPC's reference, plus one per UpstreamCall alive.
  std::atomic<int> refs_{1};
  bool admitted_ = false;  // holds one of the service's in-flight slots
  // The slot goes back as the status is sent (FinishLocked), before the
  // client can ask again, not once gRPC is done with the call; under mu_,
  // and read by the last Unref.
  bool slot_released_ = false;

  // Set before the stream can wait in the queue, and not changed after.
  std::string profile_;
  DecodePreference prefer_;

  std::mutex mu_;
  // The request as the decode workers get it; read by gRPC while a call
  // to one starts, so it stays put.
  v1::GenerateRequest forward_;
  int64_t prompt_tokens_ = 0;
  int64_t kv_tokens_ = 0;  // of KV the request needs on a decode worker
  // Why the last pick found no decode worker with room (while waiting).
  std::string wait_reason_;
  std::string prefill_address_;  // empty: the decode worker prefills
  // With prefix affinity: the prompt's block keys, and the tokens relayed
  // (what the worker stores with the prompt when the request ends).
  std::vector<uint64_t> prompt_keys_;
  std::vector<int32_t> generated_;
  // The call to a decode worker now running (null between attempts and
  // after the last), the workers tried, and how each failed.
  UpstreamCall* upstream_ = nullptr;
  std::vector<std::string> tried_;
  std::vector<std::string> failures_;
  // The relay: the write in flight and what was relayed so far.
  grpc::ByteBuffer out_;
  bool writing_ = false;
  int responses_relayed_ = 0;
  int tokens_relayed_ = 0;
  Clock::time_point first_token_, last_token_;
  // How the client's call ends, once known; sent when no write is in flight.
  std::optional<grpc::Status> end_status_;
  bool finish_called_ = false;
  bool cancelled_ = false;  // by the client or its deadline
  // An admitted request is counted once in strata_requests_total.
  bool finish_counted_ = false;
};

void UpstreamCall::OnReadDone(bool ok) { stream_->OnUpstreamRead(this, ok); }

void UpstreamCall::OnDone(const grpc::Status& status) {
  stream_->OnUpstreamDone(this, status);
  delete this;
}

RouteStream::RouteStream(RouterService* service, grpc::CallbackServerContext* context,
                         const grpc::ByteBuffer& bytes)
    : service_(service),
      queue_deadline_(QueueDeadline(arrival_, service->options_.queue_timeout)),
      client_deadline_(context->deadline()) {
  service_->StreamStarted();
  const RouterServiceOptions& options = service_->options_;
  v1::GenerateRequest request;
  if (absl::Status s = ParseMessage(bytes, options.limits.max_request_bytes, &request); !s.ok()) {
    Reject(s, "invalid_argument");
    return;
  }
  auto converted = ToEngineRequest(request, service_->tokenizer_, options.limits);
  if (!converted.ok()) {
    Reject(converted.status(), "invalid_argument");
    return;
  }
  if (service_->in_flight_.fetch_add(1) >= options.max_requests_in_flight) {
    service_->in_flight_.fetch_sub(1);
    Reject(
        absl::ResourceExhaustedError(absl::StrCat("the router has ", options.max_requests_in_flight,
                                                  " requests in flight; retry later")),
        "queue_full");
    return;
  }
  admitted_ = true;
  const engine::GenerationRequest& engine_request = *converted;
  profile_ = request.profile().empty() ? options.default_profile : request.profile();
  prompt_tokens_ = static_cast<int64_t>(engine_request.prompt.size());
  if (options.admit_by_kv) kv_tokens_ = prompt_tokens_ + engine_request.max_tokens;
  prefer_.max_extra_load = options.prefix_affinity_max_extra_load;
  if (PrefixAffinity* affinity = service_->affinity_.get(); affinity != nullptr) {
    prompt_keys_ = affinity->Keys(engine_request.prompt);
    prefer_.holders = affinity->Holders(prompt_keys_);
  }

  // The decode worker gets the prompt as ids (the router tokenized it) and
  // the settings the router validated, spelled out: its own defaults
  // (profile, max_tokens) need not be the router's.
  forward_ = std::move(request);
  forward_.mutable_token_ids()->mutable_ids()->Assign(engine_request.prompt.begin(),
                                                      engine_request.prompt.end());
  forward_.clear_add_special_tokens();
  forward_.set_profile(profile_);
  forward_.mutable_stopping()->set_max_tokens(static_cast<uint32_t>(engine_request.max_tokens));
  if (forward_.request_id().empty()) {
    forward_.set_request_id(absl::StrCat("req-", service_->next_id_.fetch_add(1)));
  }

  std::lock_guard<std::mutex> lock(mu_);  // the call's first reactions wait for the rest
  // First come, first served: behind any request already waiting.
  if (service_->requests_queued() > 0 || RouteOrWaitLocked()) {
    refs_.fetch_add(1);  // the queue's, dropped when the stream leaves it
    service_->Enqueue(this);
  }
}

bool RouteStream::RouteOrWaitLocked() {
  auto decode = service_->registry_->PickDecode(profile_, kv_tokens_, {},
                                                prefer_.holders.empty() ? nullptr : &prefer_);
  if (decode.ok()) {
    RouteLocked(*std::move(decode));
    return false;
  }
  const absl::Status& status = decode.status();
  if (status.code() == absl::StatusCode::kResourceExhausted &&
      service_->options_.queue_timeout > absl::ZeroDuration()) {
    // No worker has room now; one will when requests end.
    wait_reason_ = std::string(status.message());
    if (Clock::now() < queue_deadline_) return true;
    EndWaitLocked();
  } else if (status.code() == absl::StatusCode::kOutOfRange) {
    RejectLocked(absl::InvalidArgumentError(absl::StrCat(
                     "the prompt's ", prompt_tokens_, " tokens and max_tokens ",
                     forward_.stopping().max_tokens(),
                     " need more KV than any decode worker holds: ", status.message())),
                 "invalid_argument");
  } else {
    // None registered, none live, none serving the profile: the request is
    // valid and the pool cannot take it now.
    RejectLocked(absl::UnavailableError(status.message()), "unavailable");
  }
  return false;
}

void RouteStream::EndWaitLocked() {
  RejectLocked(absl::UnavailableError(absl::StrCat(
                   "no decode worker had room for the request's KV within ",
                   absl::FormatDuration(service_->options_.queue_timeout), ": ", wait_reason_)),
               "queue_timeout");
}

bool RouteStream::OnQueueTurn(bool behind_another) {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_ || finish_called_ || end_status_.has_value()) {
    // The client left while the request waited (its call is finished).
    AdvanceLocked();
    return false;
  }
  if (!behind_another) return RouteOrWaitLocked();
  if (Clock::now() < queue_deadline_) return true;
  if (wait_reason_.empty()) wait_reason_ = "earlier requests of its profile were still waiting";
  EndWaitLocked();
  return false;
}

void RouteStream::RouteLocked(PickedWorker decode) {
  const RouterServiceOptions& options = service_->options_;
  if (prompt_tokens_ < options.prefill_threshold_tokens) {
    service_->prefill_skipped_.fetch_add(1);
    if (service_->metrics_) service_->metrics_->OnRouted("short_prompt");
  } else if (decode.prefix_tokens > 0 &&
             prompt_tokens_ - decode.prefix_tokens < options.prefill_threshold_tokens) {
    // The worker holds all but a short rest: it loads the stored part and
    // computes the rest itself, sooner than a transfer would bring it.
    service_->prefix_routed_.fetch_add(1);
    if (service_->metrics_) service_->metrics_->OnRouted("stored_prefix");
  } else if (auto prefill = service_->registry_->PickPrefill(profile_, decode.kv_format);
             prefill.ok()) {
    prefill_address_ = prefill->grpc_address;
    service_->registry_->NoteAssigned(prefill->worker_id, prompt_tokens_);
    if (service_->metrics_) service_->metrics_->OnRouted("prefill_worker");
  } else {
    service_->prefill_unavailable_.fetch_add(1);
    if (service_->metrics_) service_->metrics_->OnRouted("no_prefill_worker");
    STRATA_LOG_DEBUG("no prefill worker for a {}-token prompt; the decode worker computes it: {}",
                     prompt_tokens_, prefill.status().ToString());
  }
  service_->forwarded_.fetch_add(1);
  if (service_->metrics_) service_->metrics_->OnAdmitted(Clock::now() - arrival_);
  StartAttemptLocked(std::move(decode));
}

void RouteStream::StartAttemptLocked(PickedWorker worker) {
  service_->registry_->NoteAssigned(worker.worker_id, prompt_tokens_, kv_tokens_);
  if (service_->affinity_ != nullptr) {
    // The worker will hold the prompt's KV once it has computed or loaded it.
    service_->affinity_->Record(worker.worker_id, prompt_keys_, worker.prefix_capacity_tokens);
  }
  tried_.push_back(worker.worker_id);
  auto stub = service_->StubFor(worker.grpc_address);
  auto* call = new UpstreamCall(this, std::move(worker));
  grpc::ClientContext& ctx = call->context();
  std::chrono::system_clock::time_point deadline = client_deadline_;
  if (service_->options_.worker_call_timeout > absl::ZeroDuration()) {
    deadline = std::min(deadline,
                        absl::ToChronoTime(absl::Now() + service_->options_.worker_call_timeout));
  }
  if (deadline != std::chrono::system_clock::time_point::max()) ctx.set_deadline(deadline);
  if (!prefill_address_.empty()) ctx.AddMetadata(kPrefillAddressKey, prefill_address_);
  refs_.fetch_add(1);  // the UpstreamCall's, dropped after its OnDone
  upstream_ = call;
  stub->async()->Generate(&ctx, &forward_, call);
  call->TakeHoldLocked();
  call->StartRead(&call->response());
  call->StartCall();
}

void RouteStream::Reject(const absl::Status& status, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  RejectLocked(status, reason);
}

void RouteStream::RejectLocked(const absl::Status& status, const std::string& reason) {
  if (service_->metrics_) service_->metrics_->OnRejected(reason);
  finish_counted_ = true;  // a refusal, not a request that ran
  FinishLocked(ToGrpcStatus(status));
}

void RouteStream::FinishLocked(const grpc::Status& status) {
  finish_called_ = true;
  if (admitted_ && !slot_released_) {
    slot_released_ = true;
    service_->in_flight_.fetch_sub(1);
  }
  Finish(status);
}

void RouteStream::OnUpstreamRead(UpstreamCall* call, bool ok) {
  ServerMetrics* metrics = service_->metrics_;
  std::lock_guard<std::mutex> lock(mu_);
  // !ok: the worker's stream ended; its status follows in OnUpstreamDone.
  // Or the client is gone: the worker's call is being cancelled, and
  // nothing more is read from it.
  if (!ok || cancelled_ || finish_called_ || end_status_.has_value()) {
    call->ReleaseHoldLocked();
    return;
  }
  v1::GenerateResponse& response = call->response();
  const Clock::time_point now = Clock::now();
  const int tokens = response.token_ids_size();
  if (service_->affinity_ != nullptr) {
    generated_.insert(generated_.end(), response.token_ids().begin(), response.token_ids().end());
  }
  if (tokens > 0) {
    if (tokens_relayed_ == 0) {
      first_token_ = now;
      if (metrics) metrics->ObserveTimeToFirstToken(now - arrival_);
    } else if (metrics) {
      // A response carries the tokens the worker produced since its last
      // one: the gap is shared among them.
      const auto share = (now - last_token_) / tokens;
      for (int i = 0; i < tokens; ++i) metrics->ObserveInterTokenLatency(share);
    }
    last_token_ = now;
    tokens_relayed_ += tokens;
  }
  if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED && tokens_relayed_ > 0) {
    // The client's first token is the router's to time: the worker's
    // clock started when the router's call reached it.
    response.mutable_usage()->set_time_to_first_token_seconds(
        std::chrono::duration<double>(first_token_ - arrival_).count());
  }
  if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
    CountFinishLocked(FinishReasonLabel(response.finish_reason()));
  }
  if (absl::Status s = SerializeMessage(response, &out_); !s.ok()) {
    STRATA_LOG_ERROR("request {}: cannot serialize a response: {}", forward_.request_id(),
                     s.ToString());
    call->context().TryCancel();
    call->ReleaseHoldLocked();
    EndLocked(grpc::Status(grpc::StatusCode::INTERNAL, "cannot serialize a response"), "error");
    return;
  }
  ++responses_relayed_;
  writing_ = true;
  StartWrite(&out_);
}

void RouteStream::OnWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  writing_ = false;
  if (!ok) {
    // The client's stream broke: it went away or its deadline passed (a
    // failed write can come before OnCancel says so).
    CancelLocked();
  }
  if (upstream_ != nullptr) {
    if (!cancelled_ && !end_status_.has_value() && upstream_->held()) {
      // Only now the worker's next response: the client's pace is the
      // worker's.
      upstream_->StartRead(&upstream_->response());
    } else {
      upstream_->ReleaseHoldLocked();
    }
  }
  AdvanceLocked();
}

void RouteStream::OnUpstreamDone(UpstreamCall* call, const grpc::Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (upstream_ == call) upstream_ = nullptr;
    if (cancelled_ || finish_called_ || end_status_.has_value()) {
      AdvanceLocked();
    } else if (status.ok()) {
      if (service_->affinity_ != nullptr && !generated_.empty()) {
        // The worker stores the prompt with what it generated (the start of
        // the conversation's next turn).
        std::vector<int32_t> whole(forward_.token_ids().ids().begin(),
                                   forward_.token_ids().ids().end());
        whole.insert(whole.end(), generated_.begin(), generated_.end());
        service_->affinity_->Record(call->worker().worker_id, service_->affinity_->Keys(whole),
                                    call->worker().prefix_capacity_tokens);
      }
      // Counted by the last response already; a stream without one is odd.
      EndLocked(grpc::Status::OK, "error");
    } else if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
               ClientDeadlinePassed()) {
      // The client's own deadline, seen first on the worker's call.
      EndLocked(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded"),
                "deadline_exceeded");
    } else if (!IsWorkerFailure(status.error_code())) {
      // The worker's answer about the request: the client's as it is.
      EndLocked(status, "error");
    } else if (responses_relayed_ > 0) {
      const std::string failure = DescribeFailure(
          call->worker(), status,
          absl::StrCat(" after ", tokens_relayed_, " tokens were streamed (not retried)"));
      STRATA_LOG_WARN("request {}: {}", forward_.request_id(), failure);
      EndLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, failure), "error");
    } else {
      STRATA_LOG_WARN("request {}: {}", forward_.request_id(),
                      DescribeFailure(call->worker(), status));
      failures_.push_back(DescribeFailure(call->worker(), status));
      if (!RetryLocked()) {
        EndLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, absl::StrJoin(failures_, "; ")),
                  "error");
      }
    }
  }
  Unref();
}

bool RouteStream::RetryLocked() {
  if (static_cast<int>(tried_.size()) >= kMaxAttempts) return false;
  auto decode = service_->registry_->PickDecode(profile_, kv_tokens_, tried_);
  if (!decode.ok()) {
    failures_.push_back(absl::StrCat("no decode worker to retry on: ", decode.status().message()));
    return false;
  }
  service_->retries_.fetch_add(1);
  STRATA_LOG_INFO("request {}: retrying on {}", forward_.request_id(), Describe(*decode));
  StartAttemptLocked(*std::move(decode));
  return true;
}

void RouteStream::EndLocked(grpc::Status status, const char* finish_reason) {
  CountFinishLocked(finish_reason);
  if (!end_status_.has_value()) end_status_ = std::move(status);
  AdvanceLocked();
}

void RouteStream::AdvanceLocked() {
  if (finish_called_ || writing_ || !end_status_.has_value()) return;
  FinishLocked(*end_status_);
}

void RouteStream::OnCancel() {
  std::lock_guard<std::mutex> lock(mu_);
  CancelLocked();
  AdvanceLocked();
}

void RouteStream::CancelLocked() {
  if (cancelled_ || finish_called_) return;
  cancelled_ = true;
  const bool deadline = ClientDeadlinePassed();
  CountFinishLocked(deadline ? "deadline_exceeded" : "cancelled");
  // The client's status, whatever the worker's call ends with.
  end_status_ = deadline ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded")
                         : grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
  // The worker stops the sequence (and frees its KV) on the cancellation.
  if (upstream_ != nullptr) upstream_->context().TryCancel();
}

void RouteStream::CountFinishLocked(const std::string& reason) {
  if (finish_counted_ || !admitted_) return;
  finish_counted_ = true;
  if (service_->metrics_) service_->metrics_->OnFinished(reason);
}

void RouteStream::OnDone() { Unref(); }

void RouteStream::Unref() {
  if (refs_.fetch_sub(1) != 1) return;
  RouterService* service = service_;
  if (admitted_ && !slot_released_) service->in_flight_.fetch_sub(1);
  delete this;
  service->StreamGone();
}

RouterService::RouterService(WorkerRegistry* registry, const engine::Tokenizer* tokenizer,
                             ServerMetrics* metrics, RouterServiceOptions options)
    : registry_(registry),
      tokenizer_(tokenizer),
      metrics_(metrics),
      options_(std::move(options)),
      affinity_(options_.prefix_affinity
                    ? std::make_unique<PrefixAffinity>(options_.prefix_affinity_options)
                    : nullptr) {
  RouteLibraryLogs();
  dispatcher_ = std::thread([this] { DispatchLoop(); });
}

RouterService::~RouterService() {
  {
    // The queue lets go of the streams of the calls the server cancelled.
    std::unique_lock<std::mutex> lock(streams_mu_);
    streams_cv_.wait(lock, [this] { return live_streams_ == 0; });
  }
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    stop_dispatching_ = true;
  }
  queue_cv_.notify_all();
  dispatcher_.join();
}

void RouterService::Enqueue(RouteStream* stream) {
  queued_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    queue_.push_back(stream);
  }
  queue_cv_.notify_all();
}

void RouterService::DispatchLoop() {
  std::unique_lock<std::mutex> lock(queue_mu_);
  while (!stop_dispatching_) {
    if (queue_.empty()) {
      queue_cv_.wait(lock, [this] { return stop_dispatching_ || !queue_.empty(); });
      continue;
    }
    std::deque<RouteStream*> turn;
    turn.swap(queue_);
    lock.unlock();
    // In arrival order; a stream's mutex is never taken under queue_mu_
    // (a stream enqueues itself under its own).
    std::deque<RouteStream*> waiting;
    absl::flat_hash_set<std::string> blocked_profiles;
    for (RouteStream* stream : turn) {
      if (stream->OnQueueTurn(blocked_profiles.contains(stream->profile()))) {
        waiting.push_back(stream);
        blocked_profiles.insert(stream->profile());
      } else {
        queued_.fetch_sub(1);
        stream->Unref();
      }
    }
    lock.lock();
    // Ahead of those that arrived meanwhile.
    queue_.insert(queue_.begin(), waiting.begin(), waiting.end());
    if (!queue_.empty()) {
      queue_cv_.wait_for(lock, kQueueRetryInterval, [this] { return stop_dispatching_; });
    }
  }
}

void RouterService::StreamStarted() {
  std::lock_guard<std::mutex> lock(streams_mu_);
  ++live_streams_;
}

void RouterService::StreamGone() {
  // Notified under the mutex: the destructor cannot return (and destroy
  // the condition variable) before this thread has let go of it.
  std::lock_guard<std::mutex> lock(streams_mu_);
  if (--live_streams_ == 0) streams_cv_.notify_all();
}

std::shared_ptr<v1::Generation::Stub> RouterService::StubFor(const std::string& address) {
  absl::MutexLock lock(&channels_mu_);
  if (auto it = channels_.find(address); it != channels_.end()) return it->second.stub;
  if (channels_.size() >= kChannelCacheLimit) {
    // The registry takes only its own mutex, never this one.
    absl::flat_hash_set<std::string> known;
    for (const auto& w : registry_->Snapshot()) known.insert(w.grpc_address);
    absl::erase_if(channels_, [&](const auto& entry) { return !known.contains(entry.first); });
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, kWorkerKeepaliveTimeMs);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, kWorkerKeepaliveTimeoutMs);
  Upstream upstream;
  upstream.channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  upstream.stub = v1::Generation::NewStub(upstream.channel);
  auto stub = upstream.stub;
  channels_.emplace(address, std::move(upstream));
  return stub;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* RouterService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new RouteStream(this, context, *request);
}

grpc::ServerUnaryReactor* RouterService::Tokenize(grpc::CallbackServerContext* context,
                                                  const grpc::ByteBuffer* bytes,
                                                  grpc::ByteBuffer* response) {
  return AnswerTokenize(context, *bytes, tokenizer_, options_.limits.max_request_bytes, response);
}

grpc::ServerUnaryReactor* RouterService::ModelInfo(grpc::CallbackServerContext* context,
                                                   const v1::ModelInfoRequest*,
                                                   v1::ModelInfoResponse* response) {
  return AnswerModelInfo(context, options_.model_name, options_.architecture, options_.limits,
                         options_.default_profile, response);
}

}  // namespace strata::router
