// NCCL, loaded at run time.
//
// strata is not linked against NCCL: a single-GPU strata must start on
// machines that have no NCCL at all, and where NCCL exists it often lives
// outside the loader's default path (on the GPU test machines, only inside a
// PyTorch environment that users add to LD_LIBRARY_PATH). So the library is
// dlopen'ed on first use, and its entry points are resolved once. Only the
// toolkit's nccl.h is needed at build time, for the types; this header is
// compiled only when CMake found it (STRATA_HAVE_NCCL).
//
// Lookup: $STRATA_NCCL_LIBRARY when set (a path or a soname), else
// libnccl.so.2 through the dynamic loader's search path (LD_LIBRARY_PATH,
// ld.so.cache).
//
// Thread-safety: NcclLibrary::Load is thread-safe; the loaded library is
// immutable and lives until the process exits (it is never dlclose'd:
// NCCL keeps threads of its own running).
#ifndef STRATA_CUDA_NCCL_LIBRARY_H_
#define STRATA_CUDA_NCCL_LIBRARY_H_

#include <nccl.h>

#include <string>

#include "absl/status/statusor.h"

namespace strata::cuda {

class NcclLibrary {
 public:
  // Non-blocking communicators (ncclConfig_t::blocking) and
  // ncclCommGetAsyncError polling, which the group's watchdog relies on,
  // appeared in NCCL 2.14.
  static constexpr int kMinVersion = 21400;

  // The library, loaded on the first call. FailedPrecondition naming
  // libnccl.so.2, the loader's message and what to do when it cannot be
  // loaded, lacks an entry point, or is older than kMinVersion; the same
  // error on every later call.
  static absl::StatusOr<const NcclLibrary*> Load();

  // The entry points strata uses, with nccl.h's signatures.
  decltype(&::ncclGetVersion) GetVersion = nullptr;
  decltype(&::ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&::ncclCommInitRankConfig) CommInitRankConfig = nullptr;
  decltype(&::ncclCommFinalize) CommFinalize = nullptr;
  decltype(&::ncclCommDestroy) CommDestroy = nullptr;
  decltype(&::ncclCommAbort) CommAbort = nullptr;
  decltype(&::ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&::ncclGetErrorString) GetErrorString = nullptr;
  decltype(&::ncclGetLastError) GetLastError = nullptr;
  decltype(&::ncclGroupStart) GroupStart = nullptr;
  decltype(&::ncclGroupEnd) GroupEnd = nullptr;
  decltype(&::ncclAllReduce) AllReduce = nullptr;
  decltype(&::ncclAllGather) AllGather = nullptr;
  decltype(&::ncclBroadcast) Broadcast = nullptr;

  // ncclGetVersion's code (e.g. 22809) and its "2.28.9" form.
  int version() const { return version_; }
  const std::string& version_string() const { return version_string_; }
  // What was loaded: the path or soname dlopen was given.
  const std::string& path() const { return path_; }

  // "<what failed>: <error name> (<last error text>)" for logs and statuses;
  // `comm` may be null.
  std::string Describe(ncclResult_t result, ncclComm_t comm) const;

 private:
  NcclLibrary() = default;

  int version_ = 0;
  std::string version_string_;
  std::string path_;
};

}  // namespace strata::cuda

#endif  // STRATA_CUDA_NCCL_LIBRARY_H_
