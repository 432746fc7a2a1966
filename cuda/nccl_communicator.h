// engine::Communicator over NCCL, for tensor parallelism on the GPUs of one
// process: one rank per GPU, each driven by its own thread through its own
// CUDA backend (cuda/cuda_backend.h).
//
// Collectives are enqueued on the rank's backend stream (StreamOf), so they
// are ordered with its operators like any other operator, and a graph
// capture (Backend::BeginCapture) records them. AllGather concatenates along
// the last dimension: NCCL gathers along the first, into a scratch buffer of
// the rank's communicator, and copies on the same stream rearrange it. A
// capture cannot grow that buffer (FailedPrecondition): run a collective
// once directly before recording it, as the model does with its steps.
//
// Collectives are asynchronous: a call returns once the work is enqueued,
// like a backend operator, and its result is there when the stream gets
// past it. A rank that never joins must not hang the others, so the group
// follows the watchdog approach of PyTorch's NCCL process group:
//  - communicators are non-blocking (ncclConfig_t::blocking = 0): a call
//    that NCCL cannot finish at once (ncclInProgress) is polled, and one
//    still unfinished after the timeout fails with DeadlineExceeded;
//  - each collective enqueued outside a capture is bracketed by two CUDA
//    events; a watchdog thread per group starts its clock when the first
//    fires (so work queued ahead of the collective does not count against
//    it) and, when the second has not fired `timeout` later, or NCCL
//    reports an asynchronous error, aborts every communicator of the group
//    (ncclCommAbort). The collective's kernels on every rank then return,
//    so Synchronize and CopyToHost return (the data is undefined), and the
//    group is broken: later collectives fail with Aborted and the reason,
//    e.g. "tensor-parallel all-reduce on rank 0 did not complete within
//    2000 ms".
// A collective that timed out after its call returned is thus reported by
// the rank's next collective. Collectives recorded into a graph are not
// watched when the graph replays (the replay is one launch the group never
// sees): a peer that stops replaying leaves the others waiting.
//
// Abort(reason) breaks the group on demand, from any thread: later
// collectives fail with Aborted at once, and the watchdog aborts the NCCL
// communicators within milliseconds (it does not wait for that: see below).
//
// Teardown. Once every rank's communicator is destroyed, the watchdog
// finishes the group: it waits for the watched collectives, then finalises
// and destroys the NCCL communicators (aborts them if the group is broken).
// NCCL does not free a communicator while a CUDA graph that recorded one of
// its collectives exists: release such graphs (Backend::ReleaseGraph) or
// destroy the backends first. Otherwise the last destructor returns after
// at most `timeout` plus 5 s, logs why, and NCCL's teardown finishes in the
// background once the graphs go. Destruction never hangs.
//
// Thread-safety: as engine::Communicator. A rank's collectives are called
// from the thread driving its backend, which must be alive then (the
// communicator's destructor does not use it).
#ifndef STRATA_CUDA_NCCL_COMMUNICATOR_H_
#define STRATA_CUDA_NCCL_COMMUNICATOR_H_

#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/communicator.h"

namespace strata::cuda {

// One communicator per backend; rank i drives backends[i]. Each backend must
// be a CUDA backend on a device of its own (InvalidArgument otherwise).
// Communicators are created from the calling thread in one NCCL group; a
// group of one rank works (collectives are then copies or nothing).
// `timeout` bounds each collective (see above); creation may take up to
// max(timeout, 60 s), NCCL's own setup taking seconds. FailedPrecondition
// when NCCL cannot be loaded (NcclVersion says why), Unimplemented when
// strata was built without nccl.h.
absl::StatusOr<std::vector<std::unique_ptr<engine::Communicator>>> CreateNcclGroup(
    std::span<engine::Backend* const> backends, std::chrono::milliseconds timeout);

// Loads NCCL if it is not yet and returns its version and where it came
// from, e.g. "NCCL 2.28.9 (libnccl.so.2)", for logs; the error says why it
// cannot be loaded (and how to fix that).
absl::StatusOr<std::string> NcclVersion();

}  // namespace strata::cuda

#endif  // STRATA_CUDA_NCCL_COMMUNICATOR_H_
