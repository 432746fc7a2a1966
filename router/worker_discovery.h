// WorkerDiscovery: the router's pull side of the control plane. It finds
// workers behind a list of targets and asks each for its description and
// load (Worker.Describe) every interval, recording the answers in the
// WorkerRegistry as Source::kDiscovered.
//
// A target is either
//  - host:port: one worker, dialed as given; or
//  - dns:///name:port: every worker the name resolves to, re-resolved every
//    interval with getaddrinfo to all of its A and AAAA records (what a
//    Kubernetes headless Service returns: one record per ready pod), so that
//    workers that come and go are followed without a restart.
// A worker is recorded under the address the router dialed, which it is
// known to reach, instead of the one the worker reports about itself (which
// may be a listening address such as 0.0.0.0:port).
//
// A worker that does not answer within the call's deadline (the interval by
// default) is simply not recorded that round, and leaves scheduling when
// the registry's expiry passes. Failures are logged once per address (or
// target, for resolution) when its state changes: reachable, unreachable,
// refused by the registry.
//
// Thread-safety: Start and Stop are called from one thread; polling runs on
// the discovery's own thread. Stop cancels the calls in flight and joins
// within about a millisecond, unless a DNS lookup is in progress (bounded
// by the resolver's own timeout, see resolv.conf(5)).
#ifndef STRATA_ROUTER_WORKER_DISCOVERY_H_
#define STRATA_ROUTER_WORKER_DISCOVERY_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "router/worker_registry.h"
#include "strata/internal/v1/worker.grpc.pb.h"

namespace strata::router {

struct WorkerDiscoveryOptions {
  // host:port or dns:///name:port each.
  std::vector<std::string> targets;
  // How often targets are resolved and workers asked.
  absl::Duration interval = absl::Milliseconds(500);
  // Each Describe call's deadline; zero: the interval.
  absl::Duration call_deadline = absl::ZeroDuration();
};

class WorkerDiscovery {
 public:
  // `registry` outlives the discovery.
  WorkerDiscovery(WorkerRegistry* registry, WorkerDiscoveryOptions options);
  ~WorkerDiscovery();  // Stop()
  WorkerDiscovery(const WorkerDiscovery&) = delete;
  WorkerDiscovery& operator=(const WorkerDiscovery&) = delete;

  // Checks the options (InvalidArgument naming a bad target or interval)
  // and starts polling; the first round starts at once.
  absl::Status Start();
  // Stops polling; idempotent.
  void Stop();

  // Polling rounds completed so far.
  int64_t rounds() const;

  // Checks a target: host:port ([v6]:port) or dns:///name:port.
  static absl::Status ValidateTarget(const std::string& target);
  // The addresses a target stands for now: the target itself when it is
  // host:port; every A and AAAA record of the name for dns:///name:port, as
  // ip:port and [ip6]:port, sorted and without repeats. Unavailable when the
  // name does not resolve.
  static absl::StatusOr<std::vector<std::string>> Resolve(const std::string& target);

 private:
  struct Call;

  void Run();
  void PollOnce();
  internal::v1::Worker::Stub* StubFor(const std::string& address);
  // Logs `status` for `key` (an address or a target, in `states`) when it
  // differs in kind from the last one logged.
  void NoteState(std::map<std::string, std::string>* states, const std::string& key,
                 const std::string& what, const absl::Status& status);

  WorkerRegistry* const registry_;
  const WorkerDiscoveryOptions options_;
  std::thread thread_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // The round's calls, for Stop to cancel; and how many have completed.
  std::vector<Call*> in_flight_ ABSL_GUARDED_BY(mu_);
  size_t completed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t rounds_ ABSL_GUARDED_BY(mu_) = 0;

  // The polling thread's own.
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
  std::map<std::string, std::unique_ptr<internal::v1::Worker::Stub>> stubs_;
  // The kind of each target's and address's last state, for NoteState.
  std::map<std::string, std::string> target_states_;
  std::map<std::string, std::string> address_states_;
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_WORKER_DISCOVERY_H_
