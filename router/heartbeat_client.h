// HeartbeatClient: a worker's push side of the control plane. It calls the
// router's Control.Heartbeat every interval with the worker's description
// and load, so that the router learns of the worker within one interval of
// either starting (a restarted router too) and stops scheduling on it
// within the router's expiry once the heartbeats stop.
//
// The router's answer sets the interval from then on (its interval_ms), so
// that every worker beats at the pace the router's expiry is tuned for.
// Failures (router unreachable, heartbeat refused) are logged once per
// change of state, not once per heartbeat, and the heartbeats go on: a
// router that comes back, or a worker whose refusal was fixed, resumes at
// the next interval.
//
// Used by the worker processes (the prefill and decode subcommands); it
// depends on nothing of the router's but the generated stub.
//
// Thread-safety: Start and Stop are called from one thread; heartbeats run
// on the client's own thread, which calls `describe` (it must be
// thread-safe against the worker's other threads). Stop cancels the
// heartbeat in flight and joins at once.
#ifndef STRATA_ROUTER_HEARTBEAT_CLIENT_H_
#define STRATA_ROUTER_HEARTBEAT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "strata/internal/v1/worker.grpc.pb.h"

namespace strata::router {

class HeartbeatClient {
 public:
  // The worker's description and load now, called before every heartbeat.
  using DescribeFn = std::function<std::pair<internal::v1::WorkerInfo, internal::v1::WorkerLoad>()>;

  // router_address: the router's Control service, as gRPC names a target
  // (host:port, dns:///name:port). interval: until the router answers with
  // its own; also each heartbeat's deadline.
  HeartbeatClient(std::string router_address, absl::Duration interval, DescribeFn describe);
  ~HeartbeatClient();  // Stop()
  HeartbeatClient(const HeartbeatClient&) = delete;
  HeartbeatClient& operator=(const HeartbeatClient&) = delete;

  // Starts heartbeating (the first one at once). InvalidArgument for an
  // empty address, a non-positive interval or no describe function.
  absl::Status Start();
  // Stops heartbeating; idempotent. The router drops the worker once its
  // expiry passes.
  void Stop();

  // The interval in use (the router's once it answered).
  absl::Duration interval() const;
  // Heartbeats the router accepted, and whether the last one was.
  int64_t accepted() const;
  bool registered() const;

 private:
  void Run();
  // Logs `status` when it differs in kind from the last heartbeat's.
  void NoteState(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string router_address_;
  const DescribeFn describe_;
  std::unique_ptr<internal::v1::Control::Stub> stub_;
  std::thread thread_;

  mutable absl::Mutex mu_;
  absl::Duration interval_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* in_flight_ ABSL_GUARDED_BY(mu_) = nullptr;  // for Stop to cancel
  int64_t accepted_ ABSL_GUARDED_BY(mu_) = 0;
  bool registered_ ABSL_GUARDED_BY(mu_) = false;
  std::string state_ ABSL_GUARDED_BY(mu_);  // kind of the last heartbeat's outcome; empty: none yet
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_HEARTBEAT_CLIENT_H_
