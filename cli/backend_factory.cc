#include "cli/backend_factory.h"

#include <algorithm>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/cpu_backend.h"
#include "engine/in_process_communicator.h"
#if defined(STRATA_HAVE_CUDA)
#include "cuda/cuda_backend.h"
#include "cuda/nccl_communicator.h"
#endif

namespace strata::cli {

absl::StatusOr<std::unique_ptr<engine::Backend>> CreateBackend(const std::string& name,
                                                               int cpu_threads) {
  if (name == "cpu") return engine::CreateCpuBackend(cpu_threads);
  if (name == "cuda") {
#if defined(STRATA_HAVE_CUDA)
    return cuda::CreateCudaBackend(0);
#else
    return absl::UnimplementedError("this strata binary was built without the CUDA backend");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", name, "\" (cpu, cuda)"));
}

absl::StatusOr<std::unique_ptr<ModelRanks>> CreateRanks(
    const std::string& name, int cpu_threads, int tensor_parallel,
    std::chrono::milliseconds collective_timeout) {
  if (tensor_parallel < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tensor-parallel ", tensor_parallel, ": at least 1"));
  }
  auto ranks = std::make_unique<ModelRanks>();
  if (tensor_parallel == 1) {
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<engine::Backend> backend,
                            CreateBackend(name, cpu_threads));
    ranks->backends.push_back(std::move(backend));
    return ranks;
  }
  std::vector<engine::Backend*> backends;
  if (name == "cpu") {
    // The ranks share the cores: each gets its part of --threads.
    const int threads =
        cpu_threads > 0 ? cpu_threads : static_cast<int>(std::thread::hardware_concurrency());
    for (int r = 0; r < tensor_parallel; ++r) {
      ranks->backends.push_back(engine::CreateCpuBackend(std::max(1, threads / tensor_parallel)));
      backends.push_back(ranks->backends.back().get());
    }
    STRATA_ASSIGN_OR_RETURN(ranks->comms,
                            engine::CreateInProcessGroup(tensor_parallel, collective_timeout));
    return ranks;
  }
  if (name != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", name, "\" (cpu, cuda)"));
  }
#if defined(STRATA_HAVE_CUDA)
  for (int r = 0; r < tensor_parallel; ++r) {
    absl::StatusOr<std::unique_ptr<engine::Backend>> backend = cuda::CreateCudaBackend(r);
    if (!backend.ok()) {
      return absl::Status(
          backend.status().code(),
          absl::StrCat("--tensor-parallel ", tensor_parallel, " needs GPUs 0..",
                       tensor_parallel - 1, "; GPU ", r, ": ", backend.status().message()));
    }
    ranks->backends.push_back(*std::move(backend));
    backends.push_back(ranks->backends.back().get());
  }
  STRATA_ASSIGN_OR_RETURN(ranks->comms, cuda::CreateNcclGroup(backends, collective_timeout));
  if (absl::StatusOr<std::string> version = cuda::NcclVersion(); version.ok()) {
    STRATA_LOG_INFO("tensor parallel over {} GPUs through {}", tensor_parallel, *version);
  }
  return ranks;
#else
  return absl::UnimplementedError("this strata binary was built without the CUDA backend");
#endif
}

absl::Status LoadRanks(ModelRanks& ranks, const engine::ModelSource& source,
                       const engine::ModelOptions& options) {
  if (ranks.comms.empty()) {
    STRATA_ASSIGN_OR_RETURN(ranks.loaded, engine::LoadModel(source, &ranks.leader(), options));
    return absl::OkStatus();
  }
  std::vector<engine::Backend*> backends;
  std::vector<engine::Communicator*> comms;
  for (size_t r = 0; r < ranks.backends.size(); ++r) {
    backends.push_back(ranks.backends[r].get());
    comms.push_back(ranks.comms[r].get());
  }
  STRATA_ASSIGN_OR_RETURN(ranks.loaded, engine::LoadModel(source, backends, comms, options));
  return absl::OkStatus();
}

}  // namespace strata::cli
