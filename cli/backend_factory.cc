#include "cli/backend_factory.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cpu_backend.h"
#if defined(STRATA_HAVE_CUDA)
#include "cuda/cuda_backend.h"
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

}  // namespace strata::cli
