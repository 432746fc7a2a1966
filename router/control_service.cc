#include "router/control_service.h"

#include <algorithm>
#include <limits>

#include "common/logging.h"
#include "router/wire.h"

namespace strata::router {
namespace {

// Bounds the refusals remembered for log deduplication; beyond it they are
// forgotten (and may be logged once more).
constexpr size_t kMaxRememberedSenders = 1024;

}  // namespace

ControlService::ControlService(WorkerRegistry* registry, absl::Duration heartbeat_interval)
    : registry_(registry),
      interval_ms_(
          static_cast<uint32_t>(std::clamp<int64_t>(absl::ToInt64Milliseconds(heartbeat_interval),
                                                    1, std::numeric_limits<uint32_t>::max()))) {}

grpc::ServerUnaryReactor* ControlService::Heartbeat(grpc::CallbackServerContext* context,
                                                    const internal::v1::HeartbeatRequest* request,
                                                    internal::v1::HeartbeatResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Who sent it, as well as the report says: its id, else its address,
  // else the connection's peer.
  const internal::v1::WorkerInfo& info = request->info();
  const std::string sender = !info.worker_id().empty()      ? info.worker_id()
                             : !info.grpc_address().empty() ? info.grpc_address()
                                                            : context->peer();
  absl::Status s = registry_->Update(info, request->load(), WorkerRegistry::Source::kHeartbeat);
  if (!s.ok()) {
    rejected_.fetch_add(1);
    NoteRejected(sender, s);
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  accepted_.fetch_add(1);
  NoteAccepted(sender);
  response->set_interval_ms(interval_ms_);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void ControlService::NoteRejected(const std::string& sender, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  auto it = refused_.find(sender);
  if (it != refused_.end() && it->second == status.code()) return;
  if (refused_.size() >= kMaxRememberedSenders) refused_.clear();
  refused_[sender] = status.code();
  STRATA_LOG_WARN("heartbeat from {} refused: {}", sender, status.ToString());
}

void ControlService::NoteAccepted(const std::string& sender) {
  absl::MutexLock lock(&mu_);
  if (refused_.erase(sender) > 0) STRATA_LOG_INFO("heartbeat from {} accepted again", sender);
}

}  // namespace strata::router
