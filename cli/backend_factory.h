// Creates the engine::Backend a command asked for by name ("cpu", "cuda").
//
// Lives in cli/ because it is wiring: it is the one place that knows both
// the CPU backend (engine/) and the CUDA backend (cuda/), which is absent
// from builds without nvcc.
#ifndef STRATA_CLI_BACKEND_FACTORY_H_
#define STRATA_CLI_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace strata::cli {

absl::StatusOr<std::unique_ptr<engine::Backend>> CreateBackend(const std::string& name,
                                                               int cpu_threads);

}  // namespace strata::cli

#endif  // STRATA_CLI_BACKEND_FACTORY_H_
