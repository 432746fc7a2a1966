// RemotePrefill: a decode worker asking a prefill worker to compute a
// prompt and send its KV here.
//
// Start() reserves room in the block manager's landing area for the
// prompt's pages (a lease: a prefill worker that never sends gives the
// room back `lease` after the call's deadline), then calls the prefill
// worker's Worker.Prefill (strata/internal/v1/worker.proto) with this
// worker's KV transport address and the transfer id. The prefill worker
// answers with the first token as soon as it is sampled, and again once
// every block has landed.
//
// `first` gets the first token at once, and says whether its caller took
// the transfer: handed it to the engine (GenerationRequest::import_kv),
// which waits until the transfer is ready (LandingArea::Ready) and drops
// it on every path. Then the end of the call only tells the landing area
// how the sender ended (SenderDone, or SenderFailed with the error: the
// engine computes the prompt itself), and `done` gets the counts or the
// error for the record.
// A transfer not taken at the first token is handled as before it: on
// success it is held with no lease and `done` gets its id (for import_kv)
// and the first token, for its owner to hand to the engine or drop
// (Drop); on an error the reservation is dropped.
// The prefill worker sees the request id suffixed with the transfer id,
// unique across decode workers' calls. Channels to prefill workers are
// made once per address and reused.
//
// Thread-safety: thread-safe. `first` and `done` run once each (`first`
// perhaps never), `first` before `done`, on gRPC threads (`done` on the
// caller's when the reservation fails), and must return quickly.
#ifndef STRATA_DECODE_REMOTE_PREFILL_H_
#define STRATA_DECODE_REMOTE_PREFILL_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/sampler.h"
#include "kvtier/landing_area.h"
#include "strata/internal/v1/worker.grpc.pb.h"

namespace strata::decode {

struct RemotePrefillOptions {
  // How long past the call's deadline a reservation waits for its blocks.
  absl::Duration lease = absl::Seconds(30);
  // The Prefill call's deadline.
  absl::Duration timeout = absl::Seconds(60);
  // This worker's KV format (WorkerInfo.kv_format), sent with every call:
  // a prefill worker of another format refuses before computing.
  std::string kv_format;
};

class RemotePrefill {
 public:
  struct Result {
    uint64_t transfer_id = 0;
    engine::SampledToken first;
    internal::v1::PrefillResponse response;  // the prefill worker's counts
  };
  using Done = std::function<void(absl::StatusOr<Result> result)>;
  // The first token of transfer `transfer_id`; true when the caller took
  // the transfer (see the file comment).
  using First = std::function<bool(uint64_t transfer_id, engine::SampledToken first)>;

  // A call in flight; Cancel() ends it early (`done` then gets Cancelled).
  class Call final : public grpc::ClientReadReactor<internal::v1::PrefillResponse> {
   public:
    void Cancel() { context_.TryCancel(); }
    void OnReadDone(bool ok) override;
    void OnDone(const grpc::Status& status) override;

   private:
    friend class RemotePrefill;
    RemotePrefill* owner_ = nullptr;
    uint64_t transfer_id_ = 0;
    std::string address_;
    First first_;
    Done done_;
    bool taken_ = false;   // `first` took the transfer
    bool landed_ = false;  // the answer that every block landed came
    grpc::ClientContext context_;
    internal::v1::PrefillRequest request_;
    internal::v1::PrefillResponse response_, landed_response_;
    std::shared_ptr<Call> self_;  // alive until OnDone
  };

  // `area` must outlive this; kv_address is this worker's KV transport
  // address; page_size the tokens of one block.
  RemotePrefill(kvtier::LandingArea* area, int page_size, std::string kv_address,
                RemotePrefillOptions options = {});

  // `request` has the prompt, sampling and profile; the destination and
  // transfer id are set here. Returns the call (null when `done` already
  // ran with an error, e.g. no room to land the KV).
  std::shared_ptr<Call> Start(const std::string& prefill_address,
                              internal::v1::PrefillRequest request, First first, Done done);
  // Gives back a transfer whose KV will not be loaded (its request ended).
  void Drop(uint64_t transfer_id) { area_->Drop(transfer_id); }

 private:
  internal::v1::Worker::Stub* StubFor(const std::string& address);

  kvtier::LandingArea* area_;
  int page_size_;
  std::string kv_address_;
  RemotePrefillOptions options_;
  std::atomic<uint64_t> next_transfer_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<internal::v1::Worker::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace strata::decode

#endif  // STRATA_DECODE_REMOTE_PREFILL_H_
