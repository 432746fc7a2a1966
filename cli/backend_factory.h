// Creates the engine::Backend a command asked for by name ("cpu", "cuda"),
// one per tensor-parallel rank with the communicators between them, and
// loads the model over them.
//
// Lives in cli/ because it is wiring: it is the one place that knows both
// the CPU backend (engine/) and the CUDA backend (cuda/), which is absent
// from builds without nvcc.
#ifndef STRATA_CLI_BACKEND_FACTORY_H_
#define STRATA_CLI_BACKEND_FACTORY_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/communicator.h"
#include "engine/model_loader.h"

namespace strata::cli {

absl::StatusOr<std::unique_ptr<engine::Backend>> CreateBackend(const std::string& name,
                                                               int cpu_threads);

// A model served over tensor-parallel ranks: rank i computes on backends[i]
// (GPU i on cuda; on cpu, its share of the threads) and meets the others
// through comms[i] (NCCL on cuda, the in-process group on cpu; none with
// one rank). Members go in reverse order: the model, then the backends
// (with the graphs that recorded collectives), then the communicators.
struct ModelRanks {
  std::vector<std::unique_ptr<engine::Communicator>> comms;
  std::vector<std::unique_ptr<engine::Backend>> backends;
  engine::LoadedModel loaded;  // loaded.model is rank 0's, which the batcher drives
  engine::Backend& leader() const { return *backends.front(); }
};

// The backends and communicators of `tensor_parallel` ranks (>= 1). A
// collective that a rank does not join within `collective_timeout` fails
// the step instead of hanging it.
absl::StatusOr<std::unique_ptr<ModelRanks>> CreateRanks(
    const std::string& backend, int cpu_threads, int tensor_parallel,
    std::chrono::milliseconds collective_timeout);
// Loads the model over the ranks into ranks.loaded.
absl::Status LoadRanks(ModelRanks& ranks, const engine::ModelSource& source,
                       const engine::ModelOptions& options);

}  // namespace strata::cli

#endif  // STRATA_CLI_BACKEND_FACTORY_H_
