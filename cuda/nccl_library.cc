#include "cuda/nccl_library.h"

#include <dlfcn.h>

#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace strata::cuda {
namespace {

constexpr char kSoname[] = "libnccl.so.2";

struct Loaded {
  NcclLibrary* library = nullptr;
  absl::Status error;
};

// Resolves `name` into `*fn`; false (with `*missing` set) when absent.
template <typename Fn>
bool Resolve(void* handle, const char* name, Fn* fn, std::string* missing) {
  *fn = reinterpret_cast<Fn>(dlsym(handle, name));
  if (*fn == nullptr) *missing = name;
  return *fn != nullptr;
}

}  // namespace

absl::StatusOr<const NcclLibrary*> NcclLibrary::Load() {
  static const Loaded* loaded = [] {
    auto* result = new Loaded;
    const char* env = std::getenv("STRATA_NCCL_LIBRARY");
    const std::string path = env != nullptr && env[0] != '\0' ? env : kSoname;
    // RTLD_LOCAL: NCCL's symbols stay out of the global scope, so nothing
    // else in the process binds to this copy by accident.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      result->error = absl::FailedPreconditionError(absl::StrCat(
          "cannot load NCCL (", path, "): ", why != nullptr ? why : "unknown dlopen error",
          "; tensor parallelism on several GPUs needs ", kSoname,
          ": add the folder that holds it to LD_LIBRARY_PATH (or name the file in "
          "STRATA_NCCL_LIBRARY)"));
      return result;
    }
    auto* lib = new NcclLibrary;
    lib->path_ = path;
    std::string missing;
    const bool resolved =
        Resolve(handle, "ncclGetVersion", &lib->GetVersion, &missing) &&
        Resolve(handle, "ncclGetUniqueId", &lib->GetUniqueId, &missing) &&
        Resolve(handle, "ncclCommInitRankConfig", &lib->CommInitRankConfig, &missing) &&
        Resolve(handle, "ncclCommFinalize", &lib->CommFinalize, &missing) &&
        Resolve(handle, "ncclCommDestroy", &lib->CommDestroy, &missing) &&
        Resolve(handle, "ncclCommAbort", &lib->CommAbort, &missing) &&
        Resolve(handle, "ncclCommGetAsyncError", &lib->CommGetAsyncError, &missing) &&
        Resolve(handle, "ncclGetErrorString", &lib->GetErrorString, &missing) &&
        Resolve(handle, "ncclGetLastError", &lib->GetLastError, &missing) &&
        Resolve(handle, "ncclGroupStart", &lib->GroupStart, &missing) &&
        Resolve(handle, "ncclGroupEnd", &lib->GroupEnd, &missing) &&
        Resolve(handle, "ncclAllReduce", &lib->AllReduce, &missing) &&
        Resolve(handle, "ncclAllGather", &lib->AllGather, &missing) &&
        Resolve(handle, "ncclBroadcast", &lib->Broadcast, &missing);
    if (!resolved) {
      result->error = absl::FailedPreconditionError(absl::StrCat(
          "NCCL (", path, ") has no ", missing, ": NCCL ", kMinVersion / 10000, ".",
          kMinVersion / 100 % 100, " or newer is needed; put its folder first in LD_LIBRARY_PATH"));
      delete lib;
      dlclose(handle);
      return result;
    }
    int version = 0;
    if (const ncclResult_t r = lib->GetVersion(&version); r != ncclSuccess) {
      result->error = absl::FailedPreconditionError(
          absl::StrCat("NCCL (", path, "): ncclGetVersion failed: ", lib->Describe(r, nullptr)));
      delete lib;
      return result;
    }
    lib->version_ = version;
    // Codes from 2.9 on are major * 10000 + minor * 100 + patch; older
    // ones major * 1000 + minor * 100 + patch (nccl.h's NCCL_VERSION).
    lib->version_string_ =
        version >= 10000
            ? absl::StrCat(version / 10000, ".", version / 100 % 100, ".", version % 100)
            : absl::StrCat(version / 1000, ".", version / 100 % 10, ".", version % 100);
    if (version < kMinVersion) {
      result->error = absl::FailedPreconditionError(
          absl::StrCat("NCCL ", lib->version_string_, " (", path, ") is too old: strata needs ",
                       kMinVersion / 10000, ".", kMinVersion / 100 % 100,
                       " or newer (non-blocking communicators); put a newer one's folder first in "
                       "LD_LIBRARY_PATH"));
      delete lib;
      return result;
    }
    result->library = lib;
    return result;
  }();
  if (loaded->library == nullptr) return loaded->error;
  return loaded->library;
}

std::string NcclLibrary::Describe(ncclResult_t result, ncclComm_t comm) const {
  std::string text =
      GetErrorString != nullptr ? GetErrorString(result) : absl::StrCat("ncclResult_t ", result);
  if (GetLastError != nullptr) {
    const char* last = GetLastError(comm);
    if (last != nullptr && last[0] != '\0') absl::StrAppend(&text, " (", last, ")");
  }
  return text;
}

}  // namespace strata::cuda
