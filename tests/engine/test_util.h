// Shared helpers for engine tests: fixture paths, temporary directories,
// and loading a model directory.
#ifndef STRATA_TESTS_ENGINE_TEST_UTIL_H_
#define STRATA_TESTS_ENGINE_TEST_UTIL_H_

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gtest/gtest.h"

namespace strata::testing_util {

// The fixtures live in the source tree; STRATA_FIXTURES_DIR in the
// environment overrides the compiled-in path (e.g. when the test binaries
// run on another machine from a copy of the tree).
inline std::string FixturePath(const std::string& relative) {
  const char* env = std::getenv("STRATA_FIXTURES_DIR");
  return std::string(env != nullptr ? env : STRATA_FIXTURES_DIR) + "/" + relative;
}

// A fresh directory under the test temp dir, removed at destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "strata_test_XXXXXX";
    path_ = ::mkdtemp(tmpl.data()) ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string Write(const std::string& name, const std::string& contents) const {
    const std::string p = path_ + "/" + name;
    std::ofstream(p, std::ios::binary) << contents;
    return p;
  }
  // Copies every file of a fixture directory here.
  void CopyFrom(const std::string& dir) const {
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      std::filesystem::copy_file(e.path(), path_ + "/" + e.path().filename().string());
    }
  }

 private:
  std::string path_;
};

// Loads the model directory `dir` on a one-thread CPU backend with a small
// cache, and returns only whether it loaded: for tests of what loading
// accepts and refuses.
inline absl::Status LoadModelStatus(const std::string& dir) {
  auto backend = engine::CreateCpuBackend(1);
  engine::ModelOptions options;
  options.max_context = 64;
  options.max_seqs = 1;
  options.max_batch_tokens = 16;
  return engine::LoadModel({dir, ""}, backend.get(), options).status();
}

}  // namespace strata::testing_util

#endif  // STRATA_TESTS_ENGINE_TEST_UTIL_H_
