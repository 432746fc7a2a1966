#include "router/worker_discovery.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/logging.h"

namespace strata::router {
namespace {

constexpr absl::string_view kDnsScheme = "dns:///";

// host and port of an address ValidateHostPort accepted.
std::pair<std::string, std::string> SplitHostPort(const std::string& address) {
  if (address.front() == '[') {
    const size_t close = address.find(']');
    return {address.substr(1, close - 1), address.substr(close + 2)};
  }
  const size_t colon = address.rfind(':');
  return {address.substr(0, colon), address.substr(colon + 1)};
}

// What a failure is, for logging once per change: every transport failure
// is one state (a worker that is down flips between them), a refusal by the
// worker or the registry is another per code.
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

// One Describe call of a round.
struct WorkerDiscovery::Call {
  std::string address;
  grpc::ClientContext context;
  internal::v1::DescribeRequest request;
  internal::v1::DescribeResponse response;
  grpc::Status status;
};

WorkerDiscovery::WorkerDiscovery(WorkerRegistry* registry, WorkerDiscoveryOptions options)
    : registry_(registry), options_(std::move(options)) {}

WorkerDiscovery::~WorkerDiscovery() { Stop(); }

absl::Status WorkerDiscovery::ValidateTarget(const std::string& target) {
  if (absl::StartsWith(target, kDnsScheme)) {
    return ValidateHostPort(target.substr(kDnsScheme.size()),
                            absl::StrCat("discovery target '", target, "': the name"));
  }
  if (absl::StartsWith(target, "dns:")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "discovery target '", target, "': only dns:///name:port is supported (no DNS authority)"));
  }
  return ValidateHostPort(target, "discovery target");
}

absl::StatusOr<std::vector<std::string>> WorkerDiscovery::Resolve(const std::string& target) {
  if (absl::Status s = ValidateTarget(target); !s.ok()) return s;
  if (!absl::StartsWith(target, kDnsScheme)) return std::vector<std::string>{target};
  const auto [host, port] = SplitHostPort(target.substr(kDnsScheme.size()));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;  // one entry per address, not per socket type
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* result = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &result); rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("resolving '", host, "' (", target, "): ", gai_strerror(rc)));
  }
  std::set<std::string> addresses;
  for (const addrinfo* a = result; a != nullptr; a = a->ai_next) {
    char ip[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(a->ai_addr);
      if (inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip)) != nullptr) {
        addresses.insert(absl::StrCat(ip, ":", port));
      }
    } else if (a->ai_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(a->ai_addr);
      if (inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip)) != nullptr) {
        addresses.insert(absl::StrCat("[", ip, "]:", port));
      }
    }
  }
  freeaddrinfo(result);
  if (addresses.empty()) {
    return absl::UnavailableError(
        absl::StrCat("resolving '", host, "' (", target, "): no IPv4 or IPv6 address"));
  }
  return std::vector<std::string>(addresses.begin(), addresses.end());
}

absl::Status WorkerDiscovery::Start() {
  if (options_.targets.empty()) {
    return absl::InvalidArgumentError("worker discovery has no target");
  }
  for (const std::string& target : options_.targets) {
    if (absl::Status s = ValidateTarget(target); !s.ok()) return s;
  }
  if (options_.interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("worker discovery interval must be positive");
  }
  if (thread_.joinable()) return absl::FailedPreconditionError("worker discovery already started");
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void WorkerDiscovery::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    // Ends the round at once; the calls' callbacks still run (cancelled).
    for (Call* call : in_flight_) call->context.TryCancel();
  }
  if (thread_.joinable()) thread_.join();
}

int64_t WorkerDiscovery::rounds() const {
  absl::MutexLock lock(&mu_);
  return rounds_;
}

void WorkerDiscovery::Run() {
  while (true) {
    const absl::Time round_start = absl::Now();
    PollOnce();
    absl::MutexLock lock(&mu_);
    ++rounds_;
    mu_.AwaitWithDeadline(absl::Condition(&stopping_), round_start + options_.interval);
    if (stopping_) return;
  }
}

internal::v1::Worker::Stub* WorkerDiscovery::StubFor(const std::string& address) {
  auto it = stubs_.find(address);
  if (it != stubs_.end()) return it->second.get();
  grpc::ChannelArguments args;
  // gRPC's default reconnection backoff grows to minutes: a worker that
  // restarts at the same address would stay unreached long after it is up.
  // Retry about as often as the worker is polled.
  const int interval_ms =
      static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(options_.interval), 1, 60000));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, interval_ms);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, interval_ms);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, std::max(1000, 4 * interval_ms));
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  channels_[address] = channel;
  auto stub = internal::v1::Worker::NewStub(channel);
  auto* raw = stub.get();
  stubs_[address] = std::move(stub);
  return raw;
}

void WorkerDiscovery::NoteState(std::map<std::string, std::string>* states, const std::string& key,
                                const std::string& what, const absl::Status& status) {
  const std::string state = StateOf(status);
  auto [it, inserted] = states->try_emplace(key, state);
  if (!inserted && it->second == state) return;
  const bool was_failing = !inserted && it->second != "ok";
  it->second = state;
  if (status.ok()) {
    if (was_failing) STRATA_LOG_INFO("discovery: {} {} answers again", what, key);
    return;
  }
  STRATA_LOG_WARN("discovery: {} {}: {} (logged once until it changes)", what, key,
                  status.ToString());
}

void WorkerDiscovery::PollOnce() {
  std::set<std::string> addresses;
  for (const std::string& target : options_.targets) {
    auto resolved = Resolve(target);
    NoteState(&target_states_, target, "target", resolved.status());
    if (resolved.ok()) addresses.insert(resolved->begin(), resolved->end());
  }
  // Forget workers no longer resolved (a pod gone from the Service).
  for (auto it = stubs_.begin(); it != stubs_.end();) {
    if (addresses.count(it->first) == 0) {
      channels_.erase(it->first);
      it = stubs_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = address_states_.begin(); it != address_states_.end();) {
    it = addresses.count(it->first) ? std::next(it) : address_states_.erase(it);
  }

  std::vector<std::unique_ptr<Call>> calls;
  const absl::Duration deadline =
      options_.call_deadline > absl::ZeroDuration() ? options_.call_deadline : options_.interval;
  for (const std::string& address : addresses) {
    auto call = std::make_unique<Call>();
    call->address = address;
    call->context.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    // Waits for the connection up to the deadline instead of failing at
    // once while the channel (re)connects.
    call->context.set_wait_for_ready(true);
    calls.push_back(std::move(call));
  }
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    completed_ = 0;
    for (auto& call : calls) in_flight_.push_back(call.get());
  }
  for (auto& call : calls) {
    Call* c = call.get();
    StubFor(c->address)
        ->async()
        ->Describe(&c->context, &c->request, &c->response, [this, c](grpc::Status status) {
          absl::MutexLock lock(&mu_);
          c->status = std::move(status);
          ++completed_;
        });
  }
  bool stopping = false;
  {
    absl::MutexLock lock(&mu_);
    const size_t n = calls.size();
    auto all_done = [this, n]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return completed_ == n; };
    mu_.Await(absl::Condition(&all_done));
    in_flight_.clear();
    stopping = stopping_;
  }
  if (stopping) return;  // the calls were cancelled: nothing to record
  for (const auto& call : calls) {
    absl::Status status;
    if (!call->status.ok()) {
      status = absl::Status(static_cast<absl::StatusCode>(call->status.error_code()),
                            absl::StrCat("Describe: ", call->status.error_message()));
    } else {
      internal::v1::WorkerInfo info = call->response.info();
      info.set_grpc_address(call->address);
      status = registry_->Update(info, call->response.load(), WorkerRegistry::Source::kDiscovered);
    }
    NoteState(&address_states_, call->address, "worker at", status);
  }
}

}  // namespace strata::router
