// The in-process engine::Communicator: the ranks are threads of one process
// whose tensors live in host memory (the CPU backend), so tensor-parallel
// correctness is checked without GPUs.
//
// A collective is a rendezvous: each rank posts its tensor and waits until
// every rank has; each then computes its result from the posted tensors
// (sums in rank order, so every rank gets the same bits) and waits again
// until all have read, before writing its own tensor. A rank that does not
// arrive within the timeout fails the collective with DeadlineExceeded on
// every rank waiting, and breaks the group (see engine/communicator.h).
//
// Thread-safety: as Communicator: one thread per rank; Abort from any.
#ifndef STRATA_ENGINE_IN_PROCESS_COMMUNICATOR_H_
#define STRATA_ENGINE_IN_PROCESS_COMMUNICATOR_H_

#include <chrono>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/communicator.h"

namespace strata::engine {

// One communicator per rank of a new group of `size` ranks. Tensors must be
// host memory (CPU backend); AllReduceSum takes f32 tensors.
absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateInProcessGroup(
    int size, std::chrono::milliseconds timeout);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_IN_PROCESS_COMMUNICATOR_H_
