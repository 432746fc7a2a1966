// WorkerService: the internal strata.internal.v1.Worker gRPC service of a
// prefill or decode worker process.
//
//  - Describe: the worker's fixed description and its load now (the
//    router's discovery polls it; the same content goes out on heartbeats).
//  - Prefill (prefill workers): validates the request as a Generate request
//    of its prompt ids, sampling and profile would be validated
//    (INVALID_ARGUMENT naming the field), then runs it on the
//    prefill::PrefillWorker, which sends the KV to the decode worker named
//    in the request; answers with the first token as soon as it is
//    sampled, and again with the counts once the KV has landed there. The
//    caller's cancellation or deadline stops it.
//  - Cancel: stops a running prefill by its request id.
//
// Thread-safety: gRPC calls the handlers from many threads; the service's
// state is under a mutex.
#ifndef STRATA_ROUTER_WORKER_SERVICE_H_
#define STRATA_ROUTER_WORKER_SERVICE_H_

#include <atomic>
#include <functional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "engine/async_engine.h"
#include "engine/tokenizer.h"
#include "kvtier/kv_block_manager.h"
#include "prefill/prefill_worker.h"
#include "router/request_conversion.h"
#include "strata/internal/v1/worker.grpc.pb.h"

namespace strata::router {

// A worker's load from its engine and block manager (null: GPU pages only,
// page_bytes each across every layer and every tensor-parallel rank, as a
// host record holds them, so that the GPU and host tiers add up).
internal::v1::WorkerLoad WorkerLoadOf(const engine::AsyncEngine::Stats& engine,
                                      const kvtier::KvBlockManager* manager, int64_t page_bytes);

class WorkerService final : public internal::v1::Worker::CallbackService {
 public:
  // prefill (null on a decode worker) must outlive the service; `load` is
  // called on gRPC threads. limits are the worker's request limits (the
  // profiles it serves, its context).
  WorkerService(std::function<internal::v1::WorkerLoad()> load, prefill::PrefillWorker* prefill,
                RequestLimits limits);

  // Who this worker is (known once it listens; Describe answers with it).
  void set_info(internal::v1::WorkerInfo info);
  // While draining, the load says so and Prefill refuses new work
  // (UNAVAILABLE): the router schedules nothing new here.
  void set_draining(bool draining);
  // The description and load now, as Describe and heartbeats give them.
  std::pair<internal::v1::WorkerInfo, internal::v1::WorkerLoad> Snapshot() const;

  grpc::ServerUnaryReactor* Describe(grpc::CallbackServerContext* context,
                                     const internal::v1::DescribeRequest* request,
                                     internal::v1::DescribeResponse* response) override;
  grpc::ServerWriteReactor<internal::v1::PrefillResponse>* Prefill(
      grpc::CallbackServerContext* context, const internal::v1::PrefillRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const internal::v1::CancelRequest* request,
                                   internal::v1::CancelResponse* response) override;

  // Prefills running (for tests and draining).
  int prefills_in_flight() const;

 private:
  friend class PrefillCall;
  void Forget(const std::string& request_id);

  std::function<internal::v1::WorkerLoad()> load_;
  prefill::PrefillWorker* prefill_;
  RequestLimits limits_;
  std::atomic<uint64_t> next_id_{1};
  mutable absl::Mutex mu_;
  internal::v1::WorkerInfo info_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  // Running prefills: the caller's request id -> the engine's.
  absl::flat_hash_map<std::string, uint64_t> running_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_WORKER_SERVICE_H_
