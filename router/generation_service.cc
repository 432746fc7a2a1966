#include "router/generation_service.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace strata::router {
namespace {

using Clock = std::chrono::steady_clock;

// How often a handler waiting for tokens checks its call for cancellation.
constexpr auto kCancelPollInterval = std::chrono::milliseconds(10);
constexpr auto kDeadlineTolerance = std::chrono::milliseconds(100);

// Events of one request, handed from the engine thread to its handler.
struct EventQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<engine::TokenEvent, Clock::time_point>> events;
};

grpc::Status ToGrpc(const absl::Status& s) {
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
      code = grpc::StatusCode::INVALID_ARGUMENT;
      break;
    case absl::StatusCode::kResourceExhausted:
      code = grpc::StatusCode::RESOURCE_EXHAUSTED;
      break;
    case absl::StatusCode::kUnavailable:
      code = grpc::StatusCode::UNAVAILABLE;
      break;
    case absl::StatusCode::kFailedPrecondition:
      code = grpc::StatusCode::FAILED_PRECONDITION;
      break;
    default:
      break;
  }
  return grpc::Status(code, std::string(s.message()));
}

// Decrements the in-flight count when the handler returns.
class InFlightGuard {
 public:
  explicit InFlightGuard(std::atomic<int>& count) : count_(count) {}
  ~InFlightGuard() { count_.fetch_sub(1); }

 private:
  std::atomic<int>& count_;
};

}  // namespace

GenerationService::GenerationService(engine::AsyncEngine* engine, const engine::Tokenizer* tokenizer,
                                     ServerMetrics* metrics, ServiceOptions options)
    : engine_(engine), tokenizer_(tokenizer), metrics_(metrics), options_(std::move(options)) {}

grpc::Status GenerationService::Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                                         grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const Clock::time_point arrival = Clock::now();
  auto converted = ToEngineRequest(*request, tokenizer_, options_.limits);
  if (!converted.ok()) {
    if (metrics_) metrics_->OnRejected("invalid_argument");
    return ToGrpc(converted.status());
  }
  if (in_flight_.fetch_add(1) >= options_.max_requests_in_flight) {
    in_flight_.fetch_sub(1);
    if (metrics_) metrics_->OnRejected("queue_full");
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("the server has ", options_.max_requests_in_flight,
                                     " requests in flight; retry later"));
  }
  InFlightGuard guard(in_flight_);

  const uint64_t id = next_id_.fetch_add(1);
  const std::string request_id =
      request->request_id().empty() ? absl::StrCat("req-", id) : request->request_id();
  engine::GenerationRequest engine_request = *std::move(converted);
  engine_request.id = id;
  const int prompt_tokens = static_cast<int>(engine_request.prompt.size());

  auto queue = std::make_shared<EventQueue>();
  absl::Status submitted = engine_->Submit(std::move(engine_request), [queue](const engine::TokenEvent& e) {
    std::lock_guard<std::mutex> lock(queue->mu);
    queue->events.emplace_back(e, Clock::now());
    queue->cv.notify_one();
  });
  if (!submitted.ok()) {
    if (metrics_) metrics_->OnRejected(submitted.code() == absl::StatusCode::kUnavailable ? "unavailable" : "invalid_argument");
    return ToGrpc(submitted);
  }
  if (metrics_) metrics_->OnAdmitted(Clock::now() - arrival);

  // The call ended early (client cancellation, deadline, closed stream):
  // stop the sequence, which frees its KV before the next engine step.
  auto cancelled = [&] {
    engine_->Cancel(id);
    // The server learns of an expired deadline as a cancellation that can
    // arrive slightly before its own copy of the deadline (set on arrival
    // from the client's timeout), hence the tolerance.
    const bool deadline = context->deadline() <= std::chrono::system_clock::now() + kDeadlineTolerance;
    if (metrics_) metrics_->OnFinished(deadline ? "deadline_exceeded" : "cancelled");
    return grpc::Status(deadline ? grpc::StatusCode::DEADLINE_EXCEEDED : grpc::StatusCode::CANCELLED,
                        deadline ? "deadline exceeded" : "cancelled by the client");
  };
  int completion_tokens = 0;
  Clock::time_point first_token, last_token;
  std::deque<std::pair<engine::TokenEvent, Clock::time_point>> batch;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(queue->mu);
      queue->cv.wait_for(lock, kCancelPollInterval, [&] { return !queue->events.empty(); });
      batch.swap(queue->events);
    }
    if (batch.empty()) {
      if (context->IsCancelled()) return cancelled();
      continue;
    }
    v1::GenerateResponse response;
    response.set_request_id(request_id);
    engine::FinishReason finish = engine::FinishReason::kNone;
    std::string error;
    for (const auto& [event, at] : batch) {
      if (event.token_id >= 0) {
        response.add_token_ids(event.token_id);
        if (request->return_logprobs()) response.add_logprobs(event.logprob);
        if (completion_tokens++ == 0) {
          first_token = at;
          if (metrics_) metrics_->ObserveTimeToFirstToken(at - arrival);
        } else if (metrics_) {
          metrics_->ObserveInterTokenLatency(at - last_token);
        }
        last_token = at;
      }
      response.mutable_text()->append(event.text);
      if (event.finish != engine::FinishReason::kNone) {
        finish = event.finish;
        error = event.error;
      }
    }
    batch.clear();
    if (finish != engine::FinishReason::kNone) {
      response.set_finish_reason(ToProtoFinishReason(finish));
      response.set_error(error);
      v1::Usage* usage = response.mutable_usage();
      usage->set_prompt_tokens(prompt_tokens);
      usage->set_completion_tokens(completion_tokens);
      if (completion_tokens > 0) {
        usage->set_time_to_first_token_seconds(std::chrono::duration<double>(first_token - arrival).count());
      }
    }
    if (!writer->Write(response)) return cancelled();  // the client went away
    if (finish != engine::FinishReason::kNone) {
      if (metrics_) metrics_->OnFinished(std::string(engine::FinishReasonName(finish)));
      if (finish == engine::FinishReason::kError) return grpc::Status(grpc::StatusCode::INTERNAL, error);
      return grpc::Status::OK;
    }
  }
}

grpc::Status GenerationService::Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* request,
                                         v1::TokenizeResponse* response) {
  if (tokenizer_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "this server has no tokenizer");
  }
  const bool add_special = !request->has_add_special_tokens() || request->add_special_tokens();
  auto ids = tokenizer_->Encode(request->text(), add_special);
  if (!ids.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("text: ", ids.status().message()));
  response->mutable_token_ids()->Add(ids->begin(), ids->end());
  return grpc::Status::OK;
}

grpc::Status GenerationService::ModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*,
                                          v1::ModelInfoResponse* response) {
  response->set_name(options_.model_name);
  response->set_architecture(options_.architecture);
  response->set_context_length(options_.limits.context_length);
  response->set_vocab_size(options_.limits.vocab_size);
  for (const auto& p : options_.limits.profiles) response->add_profiles(p);
  response->set_default_profile(options_.default_profile);
  return grpc::Status::OK;
}

}  // namespace strata::router
