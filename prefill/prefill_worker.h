// PrefillWorker: computes prompts for decode workers and sends them the KV.
//
// Start() submits a prompt to the engine as a one-token request whose KV is
// exported (engine::GenerationRequest::export_kv): as each prefill chunk
// completes pages, the block manager copies them to host records and hands
// them over (KvBlockManager's export sink, on the engine thread), and the
// rest when the first token is sampled. Each page record goes to the
// decode worker over the KV transport at once, as one message in the wire
// format (kvtier/kv_wire.h) tagged with the decode worker's transfer id,
// so a long prompt's KV travels while its later chunks compute. With the
// final part come the values the KV policy computed on the prompt for the
// decode worker (ClusterKV's clusterings: kvtier/kv_policy.h), each sent as
// a planner-state message. `first` gets the first token as soon as it is
// sampled (the client may have it while the last blocks travel); once
// every message has landed, the export is released and `done` gets the
// counts.
//
// Any failure (the engine's, a refused or timed-out send, a decode worker
// that went away) is `done`'s error, and the export is released once no
// send reads it. Cancel() stops a request: `done` gets Cancelled at once,
// and whatever it holds is released when its sends (bounded by the
// transport's timeout) are over.
//
// Thread-safety: thread-safe. `first` runs at most once, on the engine's
// thread, before `done`; `done` runs once, on the engine's or the
// transport's thread. Both must return quickly.
#ifndef STRATA_PREFILL_PREFILL_WORKER_H_
#define STRATA_PREFILL_PREFILL_WORKER_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/async_engine.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_wire.h"
#include "kvtier/transport.h"

namespace strata::prefill {

// A prefill worker's KV transport receives nothing: it only sends.
class NoKvReceiver final : public kvtier::Transport::Receiver {
 public:
  absl::StatusOr<std::span<std::byte>> Allocate(std::string_view, std::span<const std::byte>,
                                                size_t) override {
    return absl::FailedPreconditionError("a prefill worker takes no KV blocks");
  }
  void Landed(std::string_view, std::span<const std::byte>, std::span<std::byte>,
              absl::Status) override {}
  void PeerFailed(std::string_view, const absl::Status&) override {}
};

class PrefillWorker {
 public:
  struct Result {
    engine::SampledToken first;
    int blocks = 0;
    int64_t wire_bytes = 0;  // payloads sent
    int64_t raw_bytes = 0;   // the same KV as raw 16-bit values
    // Of wire_bytes: what the KV policy computed on the prompt (ClusterKV's
    // clusterings), sent after the pages.
    int64_t planner_state_bytes = 0;
    int cached_prompt_tokens = 0;
    // Start to the first token, and from then until every block landed.
    double compute_seconds = 0;
    double transfer_seconds = 0;
  };
  using Done = std::function<void(absl::StatusOr<Result> result)>;
  // The first token, and the seconds from Start to it.
  using First = std::function<void(engine::SampledToken first, double compute_seconds)>;

  // The engine must run over `manager` (with a host tier: exports live
  // there). Installs the manager's export sink. All three must outlive the
  // worker, and the worker every request it started (Stop first).
  PrefillWorker(engine::AsyncEngine* engine, kvtier::KvBlockManager* manager,
                kvtier::Transport* transport);

  // Fault injection for tests of the receiving side: every n-th block sent
  // has a byte flipped after its CRC was taken, as if corrupted on the way
  // (0: never). Set before serving.
  void set_corrupt_every_nth_block(int n) { corrupt_every_nth_block_ = n; }
  // Fault injection for tests of a slow network: the final part's sends
  // start this late (the engine thread waits). Set before serving.
  void set_final_send_delay(std::chrono::milliseconds delay) { final_send_delay_ = delay; }
  ~PrefillWorker();

  // Computes `request`'s prompt (its id unique among this worker's
  // requests; max_tokens, ignore_eos and export_kv are set here) and sends
  // its KV to the transport at `destination` under `transfer_id`.
  // InvalidArgument for a request the engine refuses; neither callback
  // then runs. `first` may be empty.
  absl::Status Start(engine::GenerationRequest request, std::string destination,
                     uint64_t transfer_id, First first, Done done);
  // Stops a request (unknown or finished ids are ignored).
  void Cancel(uint64_t request_id);
  // Requests started and not yet done, and those whose sends still run.
  int num_requests() const;

 private:
  struct Request {
    std::string destination;
    uint64_t transfer_id = 0;
    First first_token;  // empty once called
    Done done;          // empty once called
    std::optional<engine::SampledToken> first;
    std::chrono::steady_clock::time_point started, first_at;
    int cached_prompt_tokens = 0;
    int total_blocks = 0;  // the prompt's pages
    // The export's sends: headers live until their send is done (a deque:
    // parts append without moving earlier ones).
    std::deque<std::array<std::byte, kvtier::KvBlockHeader::kBytes>> headers;
    int sends_pending = 0;
    // Faults only (set_final_send_delay): the last layers' sends, held
    // until the export's end.
    std::vector<std::pair<std::span<const std::byte>, std::span<const std::byte>>> held;
    bool engine_finished = false;  // its last event came
    bool expect_export = false;    // ... and it was a success: the final part follows
    bool exported = false;         // the final part came (released once sent)
    absl::Status error;
    Result result;
  };
  void OnEvent(uint64_t id, const engine::TokenEvent& event);
  void OnExport(kvtier::KvBlockManager::ExportedKv exported);
  void OnSent(uint64_t id, const absl::Status& status);
  // Calls `done` if it is due and forgets the request once nothing of it
  // runs; returns the callback to run outside the lock.
  std::function<void()> SettleLocked(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Releases the export once no send reads it and no part will follow (or
  // the request failed; a part that comes later is released on arrival).
  void MaybeReleaseLocked(uint64_t id, Request& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  engine::AsyncEngine* engine_;
  kvtier::KvBlockManager* manager_;
  kvtier::Transport* transport_;
  kvtier::KvWireFormat format_;
  int corrupt_every_nth_block_ = 0;
  std::chrono::milliseconds final_send_delay_{0};
  mutable absl::Mutex mu_;
  int64_t blocks_sent_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uint64_t, Request> requests_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata::prefill

#endif  // STRATA_PREFILL_PREFILL_WORKER_H_
