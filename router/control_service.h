// ControlService: the router's strata.internal.v1.Control service, where
// workers push their heartbeats (strata/internal/v1/worker.proto).
//
// Heartbeat validates the report and records it in the WorkerRegistry (the
// first one registers the worker), answering the interval at which the
// router expects the next. A report the registry refuses is answered with
// its error: INVALID_ARGUMENT naming the field, FAILED_PRECONDITION when the
// worker serves another model or KV format. Refusals are logged once per
// worker and error code, not once per heartbeat, so that a misconfigured
// worker does not flood the router's log.
//
// Thread-safety: gRPC calls Heartbeat from many threads; the registry is
// thread-safe and the service's own state is atomics and a mutex.
#ifndef STRATA_ROUTER_CONTROL_SERVICE_H_
#define STRATA_ROUTER_CONTROL_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "router/worker_registry.h"
#include "strata/internal/v1/worker.grpc.pb.h"

namespace strata::router {

class ControlService final : public internal::v1::Control::CallbackService {
 public:
  // `registry` outlives the service. Workers are told to send a heartbeat
  // every `heartbeat_interval` (keep it well below the registry's expiry, so
  // that a lost heartbeat or two does not take a worker out of scheduling).
  ControlService(WorkerRegistry* registry, absl::Duration heartbeat_interval);

  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const internal::v1::HeartbeatRequest* request,
                                      internal::v1::HeartbeatResponse* response) override;

  int64_t heartbeats_accepted() const { return accepted_.load(); }
  int64_t heartbeats_rejected() const { return rejected_.load(); }

 private:
  // Logs a refusal unless the same sender's last one had the same code.
  void NoteRejected(const std::string& sender, const absl::Status& status);
  void NoteAccepted(const std::string& sender);

  WorkerRegistry* const registry_;
  const uint32_t interval_ms_;
  std::atomic<int64_t> accepted_{0};
  std::atomic<int64_t> rejected_{0};

  absl::Mutex mu_;
  // The code of each sender's last logged refusal, until it is accepted.
  absl::flat_hash_map<std::string, absl::StatusCode> refused_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_CONTROL_SERVICE_H_
