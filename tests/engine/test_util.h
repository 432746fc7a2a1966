// Shared helpers for engine tests: fixture paths and temporary directories.
#ifndef STRATA_TESTS_ENGINE_TEST_UTIL_H_
#define STRATA_TESTS_ENGINE_TEST_UTIL_H_

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

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

}  // namespace strata::testing_util

#endif  // STRATA_TESTS_ENGINE_TEST_UTIL_H_
