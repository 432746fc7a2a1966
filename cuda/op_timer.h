// OpTimer: per-operator device time of a CudaBackend, for finding where a
// step's time goes (`strata bench kv-speed --op-timing`).
//
// While enabled, each timed scope records a pair of CUDA timing events on the
// backend's stream; Take() waits for them and returns the totals per
// operator name since the last Take(). Disabled (the default), a scope costs
// one branch. Device times of consecutive operators do not overlap on one
// stream, so their sum against the wall time of a step shows the time the
// GPU sat idle between launches.
//
// Thread-safety: owned by one CudaBackend and used by its thread only.
#ifndef STRATA_CUDA_OP_TIMER_H_
#define STRATA_CUDA_OP_TIMER_H_

#include <cuda_runtime.h>

#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "cuda/cuda_utils.h"
#include "engine/backend.h"

namespace strata::cuda {

class OpTimer {
 public:
  // Records the start of `op` on construction and its end on destruction.
  class Scope {
   public:
    Scope(OpTimer* timer, const char* op, cudaStream_t stream);
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope();

   private:
    OpTimer* timer_ = nullptr;  // null when timing is off
    cudaStream_t stream_ = nullptr;
    int pending_ = -1;
  };

  void set_enabled(bool enabled) { enabled_ = enabled; }
  bool enabled() const { return enabled_; }

  // Waits for the recorded events and returns per-operator totals, in the
  // order each operator was first seen; clears them.
  absl::StatusOr<std::vector<engine::OpTime>> Take();

 private:
  struct Pending {
    const char* op;
    int start;  // indices into events_
    int end;
  };
  // An unused timing event, creating one when the pool is exhausted; -1 on
  // failure (the scope is then not timed).
  int AcquireEvent();

  bool enabled_ = false;
  std::vector<CudaEvent> events_;
  int next_event_ = 0;
  std::vector<Pending> pending_;
};

}  // namespace strata::cuda

#endif  // STRATA_CUDA_OP_TIMER_H_
