#include "router/generation_service.h"

#include <chrono>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "router/wire.h"
#include "router/worker_registry.h"

namespace strata::router {
namespace {

using Clock = std::chrono::steady_clock;

// The server learns of an expired deadline as a cancellation that can
// arrive slightly before its own copy of the deadline (set on arrival from
// the client's timeout), hence the tolerance.
constexpr auto kDeadlineTolerance = std::chrono::milliseconds(100);

}  // namespace

// One Generate call: the reactor gRPC drives, and the sink the engine feeds.
//
// It lives until both gRPC is done with the call (OnDone) and, when the
// request was admitted, the engine has sent the sequence's last event: two
// references, and the last one to go deletes it. All state below mu_ is
// touched by gRPC's threads and the engine thread.
class GenerateStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateStream(GenerationService* service, grpc::CallbackServerContext* context,
                 const grpc::ByteBuffer& request);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  ~GenerateStream() override = default;

  // Runs on the engine thread.
  void OnEngineEvent(const engine::TokenEvent& event, Clock::time_point at);
  // Hands the request to the engine (admitted_ set). Requires mu_.
  void SubmitLocked(engine::GenerationRequest request);
  // Has a prefill worker compute the prompt first (see the service's
  // comment); OnPrefilled (a gRPC thread) then submits it.
  void StartRemotePrefill(const std::string& address, const v1::GenerateRequest& request,
                          engine::GenerationRequest engine_request);
  // The prefill worker's first token (a gRPC thread): the request goes to
  // the engine at once, which streams the token and waits for the KV.
  // False when it does not take the transfer (the call is cancelled, or
  // the engine refused the request).
  bool OnFirstToken(uint64_t transfer_id, engine::SampledToken first);
  void OnPrefilled(absl::StatusOr<decode::RemotePrefill::Result> result);
  // Ends a call that was never admitted.
  void Reject(const absl::Status& status, const std::string& reason);
  // Starts the next write, or the call's finish, when one is due. Requires
  // mu_. gRPC runs no reaction inline from StartWrite, Finish or TryCancel
  // (this reactor is not inlineable), so they may be called under mu_.
  void AdvanceLocked();
  // The call ended from the client's side (cancellation, deadline, broken
  // stream): stop the sequence and finish with the matching status.
  void CancelLocked();
  void CountFinishLocked(const std::string& reason);
  void Unref();

  GenerationService* const service_;
  grpc::CallbackServerContext* const context_;
  const Clock::time_point arrival_ = Clock::now();
  // gRPC's reference, plus the engine's while it holds the sequence, plus
  // the remote prefill's while it runs.
  std::atomic<int> refs_{1};

  std::mutex mu_;
  uint64_t id_ = 0;
  std::string request_id_;
  bool return_logprobs_ = false;
  int prompt_tokens_ = 0;
  bool admitted_ = false;     // counted in the service's in-flight requests
  bool engine_done_ = false;  // the engine sent the sequence's last event
  // Tokens and text not yet handed to a write, coalesced into one response.
  v1::GenerateResponse pending_;
  bool has_pending_ = false;
  bool pending_is_last_ = false;
  int undelivered_tokens_ = 0;  // in pending_ plus the write in flight
  int in_flight_write_tokens_ = 0;
  grpc::ByteBuffer out_;  // the write in flight
  bool writing_ = false;
  bool finish_called_ = false;
  bool cancelled_ = false;  // by the client, its deadline, or as too slow
  grpc::Status cancel_status_;
  grpc::Status end_status_;  // after the last response
  // An admitted request is counted once in strata_requests_total, by what
  // ended it first: the engine's finish reason, or the client (cancelled,
  // deadline_exceeded, client_too_slow) while the sequence still ran.
  bool finish_counted_ = false;
  int completion_tokens_ = 0;
  Clock::time_point first_token_, last_token_;
  // A remote prefill in flight, and the request waiting for it (until the
  // first token hands it to the engine: submitted_at_first_token_).
  std::shared_ptr<decode::RemotePrefill::Call> prefill_call_;
  bool prefilling_ = false;
  bool submitted_at_first_token_ = false;
  std::optional<engine::GenerationRequest> held_request_;
};

GenerateStream::GenerateStream(GenerationService* service, grpc::CallbackServerContext* context,
                               const grpc::ByteBuffer& bytes)
    : service_(service), context_(context) {
  service_->open_streams_.fetch_add(1);
  const ServiceOptions& options = service_->options_;
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
        absl::ResourceExhaustedError(absl::StrCat("the server has ", options.max_requests_in_flight,
                                                  " requests in flight; retry later")),
        "queue_full");
    return;
  }
  engine::GenerationRequest engine_request = *std::move(converted);
  std::string prefill_address;
  if (service_->remote_prefill_ != nullptr) {
    auto [begin, end] = context_->client_metadata().equal_range(kPrefillAddressKey);
    if (begin != end) {
      prefill_address.assign(begin->second.data(), begin->second.size());
      if (absl::Status s = ValidateHostPort(prefill_address, kPrefillAddressKey); !s.ok()) {
        Reject(s, "invalid_argument");
        return;
      }
    }
  }
  std::lock_guard<std::mutex> lock(mu_);  // the engine's first event waits for the rest
  admitted_ = true;
  id_ = service_->next_id_.fetch_add(1);
  request_id_ = request.request_id().empty() ? absl::StrCat("req-", id_) : request.request_id();
  return_logprobs_ = request.return_logprobs();
  engine_request.id = id_;
  prompt_tokens_ = static_cast<int>(engine_request.prompt.size());
  if (!prefill_address.empty()) {
    StartRemotePrefill(prefill_address, request, std::move(engine_request));
    return;
  }
  SubmitLocked(std::move(engine_request));
}

void GenerateStream::StartRemotePrefill(const std::string& address,
                                        const v1::GenerateRequest& request,
                                        engine::GenerationRequest engine_request) {
  internal::v1::PrefillRequest prefill;
  prefill.set_request_id(request_id_);
  prefill.mutable_prompt_ids()->Add(engine_request.prompt.begin(), engine_request.prompt.end());
  *prefill.mutable_sampling() = request.sampling();
  prefill.set_return_logprobs(request.return_logprobs());
  prefill.set_profile(request.profile());
  held_request_ = std::move(engine_request);
  prefilling_ = true;
  refs_.fetch_add(1);  // the prefill's, dropped by OnPrefilled
  // `done` may run at once (no room to land the KV): not under mu_.
  mu_.unlock();
  auto call = service_->remote_prefill_->Start(
      address, std::move(prefill),
      [this](uint64_t transfer_id, engine::SampledToken first) {
        return OnFirstToken(transfer_id, first);
      },
      [this](absl::StatusOr<decode::RemotePrefill::Result> r) { OnPrefilled(std::move(r)); });
  mu_.lock();
  if (prefilling_) {
    prefill_call_ = std::move(call);
    if (cancelled_ && prefill_call_ != nullptr) prefill_call_->Cancel();
  }
}

bool GenerateStream::OnFirstToken(uint64_t transfer_id, engine::SampledToken first) {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_ || !held_request_.has_value()) return false;
  held_request_->generated = {first};
  held_request_->import_kv = transfer_id;
  // A prefill worker that fails from now on leaves the prompt to this
  // worker's engine: the client has the token already.
  held_request_->import_fallback = true;
  SubmitLocked(*std::move(held_request_));
  held_request_.reset();
  // Refused by the engine (the call is finished): the prefill goes on
  // unread, and its transfer is dropped when it ends.
  if (!admitted_) {
    if (prefill_call_ != nullptr) prefill_call_->Cancel();
    return false;
  }
  submitted_at_first_token_ = true;
  return true;
}

void GenerateStream::OnPrefilled(absl::StatusOr<decode::RemotePrefill::Result> result) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    prefilling_ = false;
    prefill_call_.reset();
    if (submitted_at_first_token_) {
      // The engine has the request and its transfer: RemotePrefill has
      // told the landing area how the prefill ended.
      if (result.ok()) {
        if (service_->metrics_) {
          const internal::v1::PrefillResponse& r = result->response;
          service_->metrics_->ObserveRemotePrefill(r.compute_seconds(), r.transfer_seconds(),
                                                   static_cast<int64_t>(r.wire_bytes()),
                                                   static_cast<int64_t>(r.raw_bytes()));
        }
      } else if (!cancelled_ && !engine_done_) {
        STRATA_LOG_WARN(
            "request {}: remote prefill failed after its first token, computing the "
            "prompt here: {}",
            request_id_, result.status().ToString());
        service_->prefill_fallbacks_.fetch_add(1);
        if (service_->metrics_) service_->metrics_->OnPrefillFallback();
      }
    } else if (!held_request_.has_value()) {
      // The engine refused it at the first token: nobody loads the KV.
      if (result.ok()) service_->remote_prefill_->Drop(result->transfer_id);
    } else if (cancelled_) {
      if (result.ok()) service_->remote_prefill_->Drop(result->transfer_id);
      admitted_ = false;
      service_->in_flight_.fetch_sub(1);
      AdvanceLocked();
    } else if (result.ok()) {
      if (service_->metrics_) {
        const internal::v1::PrefillResponse& r = result->response;
        service_->metrics_->ObserveRemotePrefill(r.compute_seconds(), r.transfer_seconds(),
                                                 static_cast<int64_t>(r.wire_bytes()),
                                                 static_cast<int64_t>(r.raw_bytes()));
      }
      held_request_->generated = {result->first};
      held_request_->import_kv = result->transfer_id;
      SubmitLocked(*std::move(held_request_));
      // Refused by the engine: nobody will load the transfer.
      if (!admitted_) service_->remote_prefill_->Drop(result->transfer_id);
    } else if (absl::IsUnavailable(result.status()) || absl::IsDeadlineExceeded(result.status()) ||
               absl::IsResourceExhausted(result.status()) ||
               absl::IsFailedPrecondition(result.status())) {
      // The prefill worker is gone, stuck or full, its KV format is not
      // this worker's, or there is no room here for its KV: the prompt is
      // computed here instead.
      STRATA_LOG_WARN("request {}: remote prefill failed, computing the prompt here: {}",
                      request_id_, result.status().ToString());
      service_->prefill_fallbacks_.fetch_add(1);
      if (service_->metrics_) service_->metrics_->OnPrefillFallback();
      SubmitLocked(*std::move(held_request_));
    } else {
      admitted_ = false;
      service_->in_flight_.fetch_sub(1);
      CountFinishLocked("error");
      finish_called_ = true;
      Finish(ToGrpcStatus(result.status()));
    }
  }
  Unref();
}

void GenerateStream::SubmitLocked(engine::GenerationRequest engine_request) {
  refs_.fetch_add(1);  // the engine's, dropped with its last event
  absl::Status submitted = service_->engine_->Submit(
      std::move(engine_request),
      [this](const engine::TokenEvent& e) { OnEngineEvent(e, Clock::now()); });
  if (!submitted.ok()) {
    admitted_ = false;
    service_->in_flight_.fetch_sub(1);
    refs_.fetch_sub(1);  // gRPC's remains: OnDone follows the finish
    if (service_->metrics_) {
      service_->metrics_->OnRejected(
          submitted.code() == absl::StatusCode::kUnavailable ? "unavailable" : "invalid_argument");
    }
    finish_called_ = true;
    Finish(ToGrpcStatus(submitted));
    return;
  }
  if (service_->metrics_) service_->metrics_->OnAdmitted(Clock::now() - arrival_);
}

void GenerateStream::Reject(const absl::Status& status, const std::string& reason) {
  if (service_->metrics_) service_->metrics_->OnRejected(reason);
  std::lock_guard<std::mutex> lock(mu_);
  finish_called_ = true;
  Finish(ToGrpcStatus(status));
}

void GenerateStream::OnEngineEvent(const engine::TokenEvent& e, Clock::time_point at) {
  ServerMetrics* metrics = service_->metrics_;
  bool last = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (e.token_id >= 0) {
      pending_.add_token_ids(e.token_id);
      if (return_logprobs_) pending_.add_logprobs(e.logprob);
      if (completion_tokens_++ == 0) {
        first_token_ = at;
        if (metrics) metrics->ObserveTimeToFirstToken(at - arrival_);
      } else if (metrics) {
        metrics->ObserveInterTokenLatency(at - last_token_);
      }
      last_token_ = at;
      ++undelivered_tokens_;
    }
    pending_.mutable_text()->append(e.text);
    has_pending_ = true;
    if (e.finish != engine::FinishReason::kNone) {
      last = true;
      engine_done_ = true;
      pending_is_last_ = true;
      pending_.set_finish_reason(ToProtoFinishReason(e.finish));
      pending_.set_error(e.error);
      v1::Usage* usage = pending_.mutable_usage();
      usage->set_prompt_tokens(prompt_tokens_);
      usage->set_completion_tokens(completion_tokens_);
      usage->set_cached_prompt_tokens(static_cast<uint32_t>(e.cached_tokens));
      if (completion_tokens_ > 0) {
        usage->set_time_to_first_token_seconds(
            std::chrono::duration<double>(first_token_ - arrival_).count());
      }
      // kCancelled reaches a call that is still open only when the server
      // stopped the sequence itself (the client's own cancellation has
      // finished the call already).
      end_status_ =
          e.finish == engine::FinishReason::kError
              ? grpc::Status(grpc::StatusCode::INTERNAL, e.error)
          : e.finish == engine::FinishReason::kCancelled
              ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server stopped the request")
              : grpc::Status::OK;
      CountFinishLocked(std::string(engine::FinishReasonName(e.finish)));
      // The engine has freed the sequence: its slot is free, whether or not
      // the client ever reads what is left.
      service_->in_flight_.fetch_sub(1);
      admitted_ = false;
    } else if (undelivered_tokens_ > service_->options_.max_undelivered_tokens && !cancelled_ &&
               !finish_called_) {
      // The client's transport has taken nothing for this many tokens: it
      // is not reading. Stop generating for it and end its call. A write is
      // stuck, so no status can be sent after it: the call is cancelled,
      // and the client sees CANCELLED.
      STRATA_LOG_INFO("request {}: {} tokens undelivered; the client is not reading, cancelling",
                      request_id_, undelivered_tokens_);
      cancelled_ = true;
      cancel_status_ =
          grpc::Status(grpc::StatusCode::CANCELLED, "the client did not read its stream");
      CountFinishLocked("client_too_slow");
      service_->engine_->Cancel(id_);
      context_->TryCancel();
    }
    AdvanceLocked();
  }
  if (last) Unref();
}

void GenerateStream::AdvanceLocked() {
  if (finish_called_ || writing_) return;
  if (cancelled_) {
    finish_called_ = true;
    Finish(cancel_status_);
    return;
  }
  if (!has_pending_) return;
  pending_.set_request_id(request_id_);
  if (absl::Status s = SerializeMessage(pending_, &out_); !s.ok()) {
    STRATA_LOG_ERROR("request {}: cannot serialize a response: {}", request_id_, s.ToString());
    finish_called_ = true;
    if (!engine_done_) {
      CountFinishLocked("error");
      service_->engine_->Cancel(id_);
    }
    Finish(grpc::Status(grpc::StatusCode::INTERNAL, "cannot serialize a response"));
    return;
  }
  const bool last = pending_is_last_;
  pending_.Clear();
  has_pending_ = false;
  in_flight_write_tokens_ = undelivered_tokens_;
  if (last) {
    finish_called_ = true;
    StartWriteAndFinish(&out_, grpc::WriteOptions(), end_status_);
  } else {
    writing_ = true;
    StartWrite(&out_);
  }
}

void GenerateStream::OnWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  writing_ = false;
  if (ok) {
    undelivered_tokens_ -= in_flight_write_tokens_;
    in_flight_write_tokens_ = 0;
  } else {
    // The stream broke: the client went away or its deadline passed (a
    // failed write can come before OnCancel says so).
    CancelLocked();
  }
  AdvanceLocked();
}

void GenerateStream::OnCancel() {
  std::lock_guard<std::mutex> lock(mu_);
  CancelLocked();
  AdvanceLocked();
}

void GenerateStream::CancelLocked() {
  if (cancelled_) return;
  cancelled_ = true;
  const bool deadline =
      context_->deadline() <= std::chrono::system_clock::now() + kDeadlineTolerance;
  cancel_status_ = deadline ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded")
                            : grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
  if (admitted_ && !engine_done_) {
    CountFinishLocked(deadline ? "deadline_exceeded" : "cancelled");
    service_->engine_->Cancel(id_);
  }
  // OnPrefilled then releases the request.
  if (prefilling_ && prefill_call_ != nullptr) prefill_call_->Cancel();
}

void GenerateStream::CountFinishLocked(const std::string& reason) {
  if (finish_counted_) return;
  finish_counted_ = true;
  if (service_->metrics_) service_->metrics_->OnFinished(reason);
}

void GenerateStream::OnDone() {
  service_->open_streams_.fetch_sub(1);
  Unref();
}

void GenerateStream::Unref() {
  if (refs_.fetch_sub(1) == 1) delete this;
}

GenerationService::GenerationService(engine::AsyncEngine* engine,
                                     const engine::Tokenizer* tokenizer, ServerMetrics* metrics,
                                     ServiceOptions options)
    : engine_(engine), tokenizer_(tokenizer), metrics_(metrics), options_(std::move(options)) {
  RouteLibraryLogs();
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new GenerateStream(this, context, *request);
}

grpc::ServerUnaryReactor* AnswerTokenize(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer& bytes,
                                         const engine::Tokenizer* tokenizer,
                                         size_t max_request_bytes, grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  v1::TokenizeRequest request;
  if (absl::Status s = ParseMessage(bytes, max_request_bytes, &request); !s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  auto ids = TokenizeText(request, tokenizer);
  if (!ids.ok()) {
    reactor->Finish(ToGrpcStatus(ids.status()));
    return reactor;
  }
  v1::TokenizeResponse out;
  out.mutable_token_ids()->Add(ids->begin(), ids->end());
  reactor->Finish(ToGrpcStatus(SerializeMessage(out, response)));
  return reactor;
}

grpc::ServerUnaryReactor* AnswerModelInfo(grpc::CallbackServerContext* context,
                                          const std::string& model_name,
                                          const std::string& architecture,
                                          const RequestLimits& limits,
                                          const std::string& default_profile,
                                          v1::ModelInfoResponse* response) {
  response->set_name(model_name);
  response->set_architecture(architecture);
  response->set_context_length(limits.context_length);
  response->set_vocab_size(limits.vocab_size);
  for (const auto& p : limits.profiles) response->add_profiles(p);
  response->set_default_profile(default_profile);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const grpc::ByteBuffer* bytes,
                                                      grpc::ByteBuffer* response) {
  return AnswerTokenize(context, *bytes, tokenizer_, options_.limits.max_request_bytes, response);
}

grpc::ServerUnaryReactor* GenerationService::ModelInfo(grpc::CallbackServerContext* context,
                                                       const v1::ModelInfoRequest*,
                                                       v1::ModelInfoResponse* response) {
  return AnswerModelInfo(context, options_.model_name, options_.architecture, options_.limits,
                         options_.default_profile, response);
}

}  // namespace strata::router
