// AsyncEngine: a Batcher on its own thread, for servers.
//
// RPC handlers on many threads Submit requests and Cancel them; the engine
// thread moves them into the Batcher between steps, runs steps while there
// is work, and hands each TokenEvent to its request's sink. A cancelled
// request's KV is freed before the next step, so it stops within one step.
// A sequence whose own step goes wrong (non-finite logits) gets a final
// kError event alone. If a whole step fails (a backend error), every
// request in flight gets a final kError event and the engine keeps serving
// new requests, unless the step broke the model's tensor-parallel group:
// then it refuses every new request (Health, Submit), for a group that
// lost a rank stays broken until the process restarts.
//
// Thread-safety: every public method is thread-safe. Sinks are called on the
// engine thread and must return quickly (e.g. push into a queue).
#ifndef STRATA_ENGINE_ASYNC_ENGINE_H_
#define STRATA_ENGINE_ASYNC_ENGINE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "engine/batcher.h"

namespace strata::engine {

class AsyncEngine {
 public:
  using EventSink = std::function<void(const TokenEvent& event)>;

  struct Stats {
    int waiting = 0;                   // submitted, prefill not finished
    int64_t queued_prompt_tokens = 0;  // ... their prompt tokens still to compute
    int running = 0;                   // decoding
    int swapped = 0;                   // paused, KV in the host tier
    int free_pages = 0;                // KV pages free (the lower group's with two)
    int total_pages = 0;               // KV pages in the cache
    int upper_free_pages = 0;          // the upper page group's (engine/kv_memory.h)
    int upper_total_pages = 0;         // ... 0 with one group
    int64_t upper_pages_released = 0;  // freed as their tokens went to the host tier
    int64_t steps = 0;                 // steps run so far
    int64_t preemptions = 0;           // sequences preempted (swapped or recomputed later)
    int64_t swapped_out = 0;           // of which swapped to the host tier
    int64_t kv_lost = 0;               // swapped sequences whose host copy failed its check
    int64_t failed_sequences = 0;      // sequences ended by an error of their own
    bool broken = false;               // the tensor-parallel group is broken (Health)
  };

  // Model and tokenizer (may be null) must outlive the engine. `after_step`
  // (optional) runs on the engine thread after every step: the place to
  // read state only that thread may touch, e.g. the KV planner's
  // statistics. kv_memory (optional, see Batcher) must outlive the engine.
  AsyncEngine(Model* model, const Tokenizer* tokenizer, BatcherOptions options = {},
              std::function<void()> after_step = nullptr, KvMemory* kv_memory = nullptr);
  ~AsyncEngine();  // Stop()s

  AsyncEngine(const AsyncEngine&) = delete;
  AsyncEngine& operator=(const AsyncEngine&) = delete;

  // Validates and queues a request; the sink then receives its events, the
  // last one with a finish reason. InvalidArgument as Batcher::Add;
  // Unavailable after Stop or once Health is not OK.
  absl::Status Submit(GenerationRequest request, EventSink sink);
  // Stops a request; its sink receives a final kCancelled event (unless it
  // already finished). Unknown ids are ignored.
  void Cancel(uint64_t request_id);
  // Cancels everything in flight (their sinks get kCancelled) and joins the
  // engine thread. Idempotent.
  void Stop();

  Stats GetStats() const;
  // OK while the engine can serve; Unavailable naming the reason once the
  // model's tensor-parallel group is broken (a rank failed or did not
  // join a collective in time).
  absl::Status Health() const;

 private:
  void Loop();
  void FailAll(const std::string& error);

  Model* model_;
  Batcher batcher_;                      // touched only by the engine thread (and Validate, const)
  std::map<uint64_t, EventSink> sinks_;  // engine thread only

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<GenerationRequest, EventSink>> pending_;
  std::vector<uint64_t> cancels_;
  bool stop_ = false;

  std::atomic<int> waiting_{0}, running_{0}, swapped_{0}, free_pages_{0}, upper_free_pages_{0};
  std::atomic<int64_t> queued_prompt_tokens_{0};
  std::atomic<int64_t> steps_{0}, preemptions_{0}, failed_sequences_{0}, swapped_out_{0},
      kv_lost_{0}, upper_pages_released_{0};
  std::function<void()> after_step_;
  std::thread thread_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_ASYNC_ENGINE_H_
