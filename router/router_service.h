// RouterService: the public strata.v1.Generation gRPC service of the
// `strata router` process, in front of pools of prefill and decode workers
// (see strata/internal/v1/worker.proto for a request's path).
//
// Generate parses, validates and tokenizes the request exactly as `strata
// serve` does (ToEngineRequest: the same INVALID_ARGUMENT messages), admits
// it against a bounded number of requests in flight (RESOURCE_EXHAUSTED
// beyond it; a request's slot is free again as its status is sent, so a
// client that asks again once answered is not refused), picks a decode worker with room for the
// request's KV and, for a prompt of at least prefill_threshold_tokens, a prefill worker, and calls
// the decode worker's own Generation.Generate with the prompt as token ids and the prefill worker's
// address in the call's metadata. A shorter prompt, or one for which no prefill worker is
// available, is computed on the decode worker: cheaper than a KV transfer for a short one, and a
// request that still completes for a long one.
//
// When no decode worker has room for the request's KV now, the request
// waits in a first-come-first-served queue (per profile: a request is not
// overtaken by a later one of its profile) until a worker reports room, for
// at most queue_timeout, then fails UNAVAILABLE naming the closest worker.
// Waiting requests hold their in-flight slot, so max_requests_in_flight
// bounds the queue too. A request larger than any worker could hold even
// empty is refused at once (INVALID_ARGUMENT), as is one when no worker is
// registered or live (UNAVAILABLE). A client that cancels, or whose
// deadline passes, leaves the queue at once.
//
// The decode worker's responses are relayed one by one, each written to the
// client before the next is read from the worker, so that a client reading
// slowly slows the worker's stream (gRPC flow control reaches through the
// router) instead of making the router buffer it. The worker's final
// status is the client's, with these exceptions:
//  - the worker failed (unreachable, UNAVAILABLE, RESOURCE_EXHAUSTED, its
//    own deadline, or a cancellation the router did not ask for) before
//    anything was relayed: the request is retried once on another decode
//    worker; when that fails too, or there is none, UNAVAILABLE naming what
//    failed;
//  - the worker failed after tokens were relayed: UNAVAILABLE (a retry
//    would repeat tokens the client already has);
//  - the client cancelled or its deadline passed: the worker's call is
//    cancelled and the client's status is CANCELLED / DEADLINE_EXCEEDED.
// The client's deadline is the worker call's (or sooner, see
// worker_call_timeout). The last response's usage.time_to_first_token_
// seconds is measured by the router, from the client's request reaching it.
//
// Tokenize and ModelInfo are answered by the router itself.
//
// Thread-safety: gRPC calls the handlers, and the reactors of the calls to
// workers, from many threads; the service's state is atomics, a mutex over
// the channel cache and one over the queue (whose thread retries the
// waiting requests), and each request's state is under its own mutex.
#ifndef STRATA_ROUTER_ROUTER_SERVICE_H_
#define STRATA_ROUTER_ROUTER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/tokenizer.h"
#include "router/generation_service.h"
#include "router/prefix_affinity.h"
#include "router/request_conversion.h"
#include "router/server_metrics.h"
#include "router/worker_registry.h"
#include "strata/v1/generate.grpc.pb.h"

namespace strata::router {

struct RouterServiceOptions {
  std::string model_name;
  std::string architecture;
  // What a request may ask for: the model's context and vocabulary, and the
  // profiles the workers serve.
  RequestLimits limits;
  // The profile a request naming none is scheduled under; workers are
  // picked by the profiles they serve, so it must be one of theirs.
  std::string default_profile = "default";
  // Prompts shorter than this many tokens are computed on the decode
  // worker, without a prefill worker (0: every prompt goes to one).
  int prefill_threshold_tokens = 256;
  // Requests relayed at once (from admission until both the client's call
  // and the worker's are over), waiting ones included.
  int max_requests_in_flight = 1024;
  // How long a request may wait for a decode worker with room for its KV
  // (0: it fails at once).
  absl::Duration queue_timeout = absl::Seconds(30);
  // Bounds a whole call to a decode worker, retry included, when sooner
  // than the client's deadline. 0: the client's deadline only.
  absl::Duration worker_call_timeout = absl::ZeroDuration();
  // A request is sent only to a decode worker with room for the KV of its
  // prompt and max_tokens (in the worker's bytes per token: its
  // WorkerInfo, else the registry's default). Off: any worker.
  bool admit_by_kv = false;
  // Prefix-aware routing (router/prefix_affinity.h): a prompt goes to the
  // decode worker that was sent its start before (within the load
  // allowance), and when what that worker does not hold is shorter than
  // prefill_threshold_tokens it is computed there, without a prefill
  // worker. Off: decode workers are picked by load alone.
  bool prefix_affinity = true;
  PrefixAffinityOptions prefix_affinity_options;
  double prefix_affinity_max_extra_load = 4.0;
};

class RouteStream;
class UpstreamCall;

class RouterService final : public GenerationServiceBase {
 public:
  // registry, tokenizer (may be null: requests must then give token ids)
  // and metrics (may be null) must outlive the service. Destroy it after
  // the gRPC server has stopped (Shutdown, Wait): the destructor waits for
  // the calls to workers that are still being cancelled.
  RouterService(WorkerRegistry* registry, const engine::Tokenizer* tokenizer,
                ServerMetrics* metrics, RouterServiceOptions options);
  ~RouterService() override;

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* context,
                                      const v1::ModelInfoRequest* request,
                                      v1::ModelInfoResponse* response) override;

  // Requests sent to a decode worker (first attempts only).
  int64_t requests_forwarded() const { return forwarded_.load(); }
  // Second attempts on another decode worker.
  int64_t retries() const { return retries_.load(); }
  // Requests sent without a prefill worker: prompt below the threshold.
  int64_t prefill_skipped() const { return prefill_skipped_.load(); }
  // ... and because no prefill worker was available for a long prompt.
  int64_t prefill_unavailable() const { return prefill_unavailable_.load(); }
  // ... and because the decode worker picked holds the prompt's start.
  int64_t prefix_routed() const { return prefix_routed_.load(); }
  // What the router remembers of the workers' stored prompts (null when
  // prefix_affinity is off).
  const PrefixAffinity* prefix_affinity() const { return affinity_.get(); }
  // Admitted requests whose status is not yet sent.
  int requests_in_flight() const { return in_flight_.load(); }
  // Admitted requests waiting for a decode worker with room.
  int requests_queued() const { return queued_.load(); }

 private:
  friend class RouteStream;
  friend class UpstreamCall;

  // A decode worker's address and the stub over its (shared) channel.
  struct Upstream {
    std::shared_ptr<grpc::Channel> channel;
    std::shared_ptr<v1::Generation::Stub> stub;
  };
  std::shared_ptr<v1::Generation::Stub> StubFor(const std::string& address);

  // Every RouteStream registers here for its whole life, so that the
  // destructor can wait for the last one.
  void StreamStarted();
  void StreamGone();

  // Puts a stream (and a reference the caller took for the queue) at the
  // queue's end.
  void Enqueue(RouteStream* stream);
  // The dispatcher thread: gives each waiting stream its turn, oldest
  // first, every kQueueRetryInterval while any waits.
  void DispatchLoop();

  WorkerRegistry* const registry_;
  const engine::Tokenizer* const tokenizer_;
  ServerMetrics* const metrics_;
  const RouterServiceOptions options_;

  std::atomic<int> in_flight_{0};
  std::atomic<uint64_t> next_id_{1};
  std::atomic<int64_t> forwarded_{0};
  std::atomic<int64_t> retries_{0};
  std::atomic<int64_t> prefill_skipped_{0};
  std::atomic<int64_t> prefill_unavailable_{0};
  std::atomic<int64_t> prefix_routed_{0};
  const std::unique_ptr<PrefixAffinity> affinity_;

  absl::Mutex channels_mu_;
  absl::flat_hash_map<std::string, Upstream> channels_ ABSL_GUARDED_BY(channels_mu_);

  std::mutex streams_mu_;
  std::condition_variable streams_cv_;
  int live_streams_ = 0;  // guarded by streams_mu_

  // Streams waiting for a decode worker with room, oldest first (and those
  // the dispatcher holds during a turn, in queued_).
  std::atomic<int> queued_{0};
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<RouteStream*> queue_;  // guarded by queue_mu_
  bool stop_dispatching_ = false;   // guarded by queue_mu_
  std::thread dispatcher_;
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_ROUTER_SERVICE_H_
