#include "engine/sentencepiece_library.h"

#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <mutex>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace strata::engine {
namespace {

constexpr char kShimName[] = "libstrata_sentencepiece_shim.so";
using CreateFn = SentencePieceProcessor* (*)();

struct Shim {
  CreateFn create = nullptr;
  std::string error;
};

std::vector<std::string> Candidates() {
  namespace fs = std::filesystem;
  std::vector<std::string> paths;
  if (const char* env = std::getenv("STRATA_SENTENCEPIECE_SHIM")) paths.push_back(env);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    paths.push_back((exe.parent_path() / kShimName).string());
    paths.push_back((exe.parent_path().parent_path() / "lib" / kShimName).string());
  }
#ifdef STRATA_SENTENCEPIECE_SHIM_BUILD_PATH
  paths.push_back(STRATA_SENTENCEPIECE_SHIM_BUILD_PATH);
#endif
  paths.push_back(kShimName);  // the loader's own search path
  return paths;
}

// AddressSanitizer refuses to load a library with RTLD_DEEPBIND (its
// interceptors would be bypassed). The sanitizer build loads the shim
// without it; its tests load no other libprotobuf for it to clash with.
#if defined(__SANITIZE_ADDRESS__)
constexpr int kDeepBind = 0;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr int kDeepBind = 0;
#else
constexpr int kDeepBind = RTLD_DEEPBIND;
#endif
#else
constexpr int kDeepBind = RTLD_DEEPBIND;
#endif

const Shim& LoadShim() {
  static Shim* shim = [] {
    auto* s = new Shim;
    std::vector<std::string> tried;
    for (const std::string& path : Candidates()) {
      if (path.find('/') != std::string::npos && !std::filesystem::exists(path)) continue;
      void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | kDeepBind);
      if (handle == nullptr) {
        tried.push_back(absl::StrCat(path, " (", dlerror(), ")"));
        continue;
      }
      s->create = reinterpret_cast<CreateFn>(dlsym(handle, "StrataCreateSentencePieceProcessor"));
      if (s->create != nullptr) return s;
      tried.push_back(absl::StrCat(path, " (no StrataCreateSentencePieceProcessor)"));
    }
    s->error =
        absl::StrCat("cannot load the sentencepiece shim ", kShimName,
                     "; tried: ", tried.empty() ? "nothing found" : absl::StrJoin(tried, "; "));
    return s;
  }();
  return *shim;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SentencePieceProcessor>> CreateSentencePieceProcessor() {
  const Shim& shim = LoadShim();
  if (shim.create == nullptr) return absl::FailedPreconditionError(shim.error);
  return std::unique_ptr<SentencePieceProcessor>(shim.create());
}

}  // namespace strata::engine
