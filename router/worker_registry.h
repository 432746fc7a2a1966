// WorkerRegistry: the router's view of its prefill and decode workers, fed
// by the control plane (worker heartbeats, router/control_service.h, and the
// router's own polling, router/worker_discovery.h), and the place where the
// router picks the worker for a request.
//
// A worker is known by its worker_id (one per worker process). A report
// under a new worker_id at the grpc_address of a known worker means that the
// worker restarted: the old entry goes at once, so that nothing is scheduled
// on a process that no longer exists. Every report is validated whole
// (InvalidArgument naming the field; FailedPrecondition when the worker
// serves another model or KV format than the router expects) and changes
// nothing when it is refused.
//
// A worker is schedulable while it has been heard from within `expiry` and
// is not draining. One not heard from for `drop_after_expiries` expiries is
// forgotten (counted in dropped_workers()), so that a fleet that churns
// does not grow the registry without bound.
//
// Between two reports the router only knows what it has itself sent a
// worker: NoteAssigned adds it to the worker's last reported load until its
// next report (which already counts it, or counts it as done), so that a
// burst of requests between two heartbeats spreads over the workers instead
// of piling onto the one that looked idlest.
//
// Thread-safety: thread-safe; every method takes the registry's mutex for a
// short, non-blocking section (the clock is called under it).
#ifndef STRATA_ROUTER_WORKER_REGISTRY_H_
#define STRATA_ROUTER_WORKER_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "strata/internal/v1/worker.pb.h"

namespace strata::router {

struct WorkerRegistryOptions {
  // What every worker must serve: its WorkerInfo.model and kv_format must
  // equal these (a prefill and a decode worker exchange KV only when both
  // match). Empty: any value is accepted.
  std::string model;
  std::string kv_format;
  // A worker not heard from for this long is not schedulable.
  absl::Duration expiry = absl::Seconds(2);
  // ... and is forgotten after this many expiries.
  int drop_after_expiries = 10;
  // The time; null: absl::Now. Tests inject a fake clock.
  std::function<absl::Time()> clock;
  // KV bytes a token takes on a decode worker that does not say
  // (WorkerInfo.kv_bytes_per_token 0). 1: KV needs count bytes.
  int64_t default_kv_bytes_per_token = 1;
};

// The worker a request goes to.
struct PickedWorker {
  std::string worker_id;
  std::string grpc_address;  // host:port of its Worker service
  std::string kv_address;    // its KV transport address
  std::string kv_format;     // its WorkerInfo.kv_format
  // Prompt tokens its prefix store can keep (WorkerLoad), and those of this
  // request's prompt it is thought to hold (DecodePreference; 0 otherwise).
  int64_t prefix_capacity_tokens = 0;
  int64_t prefix_tokens = 0;
};

// Decode workers a request would rather go to: those holding its prompt's
// start in their prefix store (router/prefix_affinity.h), which load it
// instead of computing it.
struct DecodePreference {
  // (worker_id, prompt tokens it holds), most first.
  std::vector<std::pair<std::string, int64_t>> holders = {};
  // A holder is picked while its DecodeScore is at most this much above the
  // least loaded worker's (about that many more running sequences): reuse
  // is worth a somewhat busier worker, not an overloaded one.
  double max_extra_load = 4.0;
};

class WorkerRegistry {
 public:
  // Where a report came from.
  enum class Source {
    kHeartbeat,   // the worker called Control.Heartbeat
    kDiscovered,  // the router called Worker.Describe
  };

  // One worker as the registry sees it (Snapshot).
  struct WorkerState {
    std::string worker_id;
    internal::v1::WorkerRole role = internal::v1::WORKER_ROLE_UNSPECIFIED;
    std::string grpc_address;
    std::vector<std::string> profiles;
    Source source = Source::kHeartbeat;  // of the last report
    bool live = false;                   // heard from within the expiry
    bool schedulable = false;            // live and not draining
    absl::Duration age;                  // since the last report
    internal::v1::WorkerLoad load;       // as last reported
    // Sent by the router since the last report (NoteAssigned).
    int64_t pending_prefill_tokens = 0;
    int pending_sequences = 0;
    int64_t pending_kv_bytes = 0;
  };

  // The decode load score's weights (see DecodeScore).
  static constexpr double kWaitingWeight = 2.0;
  static constexpr double kKvUtilisationWeight = 8.0;

  explicit WorkerRegistry(WorkerRegistryOptions options);
  WorkerRegistry(const WorkerRegistry&) = delete;
  WorkerRegistry& operator=(const WorkerRegistry&) = delete;

  // Checks a report without recording it: InvalidArgument naming the field
  // (e.g. "WorkerInfo.grpc_address ..."), FailedPrecondition naming both
  // values when the model or KV format is not the router's.
  absl::Status Validate(const internal::v1::WorkerInfo& info,
                        const internal::v1::WorkerLoad& load) const;

  // Records a report (Validate's error, and no change, when it is bad): the
  // worker's description and load replace what was known, its pending
  // assignments are cleared and it is heard from now.
  absl::Status Update(const internal::v1::WorkerInfo& info, const internal::v1::WorkerLoad& load,
                      Source source);

  // The schedulable prefill worker serving `profile` with the fewest prompt
  // tokens queued (reported plus noted since); ties go round-robin. With a
  // kv_format, only workers of that KV format (the decode worker's: its
  // KV could not cross otherwise, e.g. between tensor-parallel sizes).
  // Unavailable when none is registered or none is schedulable, NotFound
  // when none serves the profile or has the KV format; the message says
  // which.
  absl::StatusOr<PickedWorker> PickPrefill(const std::string& profile,
                                           const std::string& kv_format = "");

  // The schedulable decode worker serving `profile` whose free KV (GPU and
  // host tiers, less what was noted since its report) covers
  // kv_tokens_needed tokens of KV (in its own bytes per token,
  // WorkerInfo.kv_bytes_per_token), with the lowest DecodeScore; ties go
  // round-robin.
  // Errors as PickPrefill's; ResourceExhausted when none has room now, and
  // OutOfRange when none could hold it even empty (its tiers' totals are
  // all smaller). Both name the worker closest to it. Workers
  // whose id is in `exclude` are passed over (the router retrying a request
  // elsewhere after its worker failed); Unavailable, naming them, when they
  // were the only candidates. With `prefer`, the first of its holders that
  // has room and is within its load allowance is picked instead (its
  // prefix_tokens set).
  absl::StatusOr<PickedWorker> PickDecode(const std::string& profile, int64_t kv_tokens_needed,
                                          const std::vector<std::string>& exclude = {},
                                          const DecodePreference* prefer = nullptr);

  // The router sent a request to `worker_id`: a prefill worker counts
  // prompt_tokens more queued; a decode worker one more running sequence
  // holding kv_tokens more tokens of KV. Until its next report. Unknown ids are
  // ignored (the worker went since it was picked).
  void NoteAssigned(const std::string& worker_id, int64_t prompt_tokens, int64_t kv_tokens = 0);

  // Every worker known, by worker_id.
  std::vector<WorkerState> Snapshot() const;

  // Workers forgotten since construction for not being heard from for
  // drop_after_expiries expiries.
  int64_t dropped_workers() const;
  // Workers replaced since construction by a restart at their address.
  int64_t replaced_workers() const;

  // A decode worker's load, lower is better:
  //   running + pending + kWaitingWeight * waiting
  //     + kKvUtilisationWeight * (used GPU KV + pending KV) / GPU KV
  // (the host tier's when the worker has no GPU tier; 0 with neither).
  // Sequences: every running one shares the decode step, so a new one
  // slows with their number. A waiting one is worse: the worker could not
  // admit it (out of KV or batch slots), so a new request queues behind it.
  // KV utilisation: attention reads every resident block each step, so a
  // fuller cache means slower steps, and one near full is about to spill to
  // the host tier or preempt; a full cache weighs as much as 8 running
  // sequences, enough to break near-ties in sequence counts without
  // overriding a clear difference.
  static double DecodeScore(const internal::v1::WorkerLoad& load, int pending_sequences,
                            int64_t pending_kv_bytes);

 private:
  struct Entry {
    internal::v1::WorkerInfo info;
    internal::v1::WorkerLoad load;
    Source source = Source::kHeartbeat;
    absl::Time last_seen;
    int64_t pending_prefill_tokens = 0;
    int pending_sequences = 0;
    int64_t pending_kv_bytes = 0;
  };

  absl::Time Now() const;
  // The KV bytes a token takes on the worker.
  int64_t KvBytesPerToken(const Entry& e) const {
    return e.info.kv_bytes_per_token() > 0
               ? e.info.kv_bytes_per_token()
               : std::max<int64_t>(1, options_.default_kv_bytes_per_token);
  }
  // Forgets workers not heard from for drop_after_expiries expiries.
  void DropStaleLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The entries of `role` schedulable now that serve `profile`, sorted by
  // worker_id, or the error saying why there are none.
  absl::StatusOr<std::vector<const Entry*>> CandidatesLocked(internal::v1::WorkerRole role,
                                                             const std::string& profile,
                                                             absl::Time now) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const WorkerRegistryOptions options_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> workers_ ABSL_GUARDED_BY(mu_);
  int64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t replaced_ ABSL_GUARDED_BY(mu_) = 0;
  // Round-robin positions among equally loaded workers.
  uint64_t prefill_turn_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t decode_turn_ ABSL_GUARDED_BY(mu_) = 0;
};

// The name of a role as logs and messages write it ("prefill", "decode").
const char* WorkerRoleName(internal::v1::WorkerRole role);

// Checks that `address` is host:port ([v6]:port for an IPv6 literal) with
// a port in 1..65535; InvalidArgument naming `field` otherwise.
absl::Status ValidateHostPort(const std::string& address, const std::string& field);

}  // namespace strata::router

#endif  // STRATA_ROUTER_WORKER_REGISTRY_H_
