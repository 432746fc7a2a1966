#include "router/heartbeat_client.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace strata::router {
namespace {

// The router's answer is trusted within these bounds: a heartbeat storm or a
// worker that falls silent for minutes would both be a router's mistake.
constexpr absl::Duration kMinInterval = absl::Milliseconds(10);
constexpr absl::Duration kMaxInterval = absl::Seconds(60);

// Every transport failure is one state (a router that is down flips between
// them); a refusal is another per code.
std::string StateOf(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return "ok";
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
      return "unreachable";
    default:
      return absl::StatusCodeToString(status.code());
  }
}

}  // namespace

HeartbeatClient::HeartbeatClient(std::string router_address, absl::Duration interval,
                                 DescribeFn describe)
    : router_address_(std::move(router_address)),
      describe_(std::move(describe)),
      interval_(interval) {}

HeartbeatClient::~HeartbeatClient() { Stop(); }

absl::Status HeartbeatClient::Start() {
  if (router_address_.empty()) {
    return absl::InvalidArgumentError("heartbeat: the router address is empty");
  }
  if (!describe_) return absl::InvalidArgumentError("heartbeat: no describe function");
  absl::Duration interval;
  {
    absl::MutexLock lock(&mu_);
    if (interval_ <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError("heartbeat: the interval must be positive");
    }
    interval = interval_;
  }
  if (thread_.joinable()) return absl::FailedPreconditionError("heartbeat: already started");
  grpc::ChannelArguments args;
  // gRPC's default reconnection backoff grows to minutes: a router that
  // restarts would not hear from its workers long after it is up. Retry
  // about as often as a heartbeat is due.
  const int interval_ms =
      static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(interval), 1, 60000));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, interval_ms);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, interval_ms);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, std::max(1000, 4 * interval_ms));
  stub_ = internal::v1::Control::NewStub(
      grpc::CreateCustomChannel(router_address_, grpc::InsecureChannelCredentials(), args));
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void HeartbeatClient::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    if (in_flight_ != nullptr) in_flight_->TryCancel();
  }
  if (thread_.joinable()) thread_.join();
}

absl::Duration HeartbeatClient::interval() const {
  absl::MutexLock lock(&mu_);
  return interval_;
}

int64_t HeartbeatClient::accepted() const {
  absl::MutexLock lock(&mu_);
  return accepted_;
}

bool HeartbeatClient::registered() const {
  absl::MutexLock lock(&mu_);
  return registered_;
}

void HeartbeatClient::NoteState(const absl::Status& status) {
  const std::string state = StateOf(status);
  if (state == state_) return;
  const bool first = state_.empty();
  state_ = state;
  if (status.ok()) {
    STRATA_LOG_INFO("heartbeat: {} with the router at {} (every {})",
                    first ? "registered" : "registered again", router_address_,
                    absl::FormatDuration(interval_));
    return;
  }
  STRATA_LOG_WARN(
      "heartbeat to the router at {} failed: {} (retrying every {}; logged once "
      "until it changes)",
      router_address_, status.ToString(), absl::FormatDuration(interval_));
}

void HeartbeatClient::Run() {
  while (true) {
    const absl::Time start = absl::Now();
    internal::v1::HeartbeatRequest request;
    {
      auto [info, load] = describe_();
      *request.mutable_info() = std::move(info);
      *request.mutable_load() = std::move(load);
    }
    internal::v1::HeartbeatResponse response;
    grpc::ClientContext context;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      context.set_deadline(absl::ToChronoTime(start + interval_));
      // Waits for the connection up to the deadline instead of failing at
      // once while the channel (re)connects.
      context.set_wait_for_ready(true);
      in_flight_ = &context;
    }
    const grpc::Status status = stub_->Heartbeat(&context, request, &response);
    absl::MutexLock lock(&mu_);
    in_flight_ = nullptr;
    if (stopping_) return;
    registered_ = status.ok();
    if (status.ok()) {
      ++accepted_;
      if (response.interval_ms() > 0) {
        const absl::Duration interval =
            std::clamp(absl::Milliseconds(response.interval_ms()), kMinInterval, kMaxInterval);
        if (interval != interval_) {
          STRATA_LOG_INFO("heartbeat: the router at {} asks for one every {}", router_address_,
                          absl::FormatDuration(interval));
          interval_ = interval;
        }
      }
    }
    NoteState(
        absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message()));
    mu_.AwaitWithDeadline(absl::Condition(&stopping_), start + interval_);
    if (stopping_) return;
  }
}

}  // namespace strata::router
