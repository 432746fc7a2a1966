// Shared pieces of the GPU tests that compare the CUDA backend with the CPU
// reference backend: status assertions, fresh seeds, the relative-L2
// comparison, and CudaVsCpuTest, a fixture holding one backend of each kind
// per test suite (skipping when there is no usable GPU) with upload and
// download helpers.
#ifndef STRATA_TESTS_CUDA_CUDA_TEST_UTIL_H_
#define STRATA_TESTS_CUDA_CUDA_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cuda/cuda_backend.h"
#include "engine/backend.h"
#include "engine/cpu_backend.h"
#include "engine/tensor.h"
#include "gtest/gtest.h"

#define STRATA_ASSERT_OK(expr)                                                     \
  do {                                                                             \
    const absl::Status strata_test_status_ = (expr);                               \
    ASSERT_TRUE(strata_test_status_.ok()) << #expr << ": " << strata_test_status_; \
  } while (0)

#define STRATA_TEST_CONCAT_INNER_(a, b) a##b
#define STRATA_TEST_CONCAT_(a, b) STRATA_TEST_CONCAT_INNER_(a, b)
#define STRATA_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  STRATA_ASSERT_OK_AND_ASSIGN_IMPL_(STRATA_TEST_CONCAT_(strata_test_or_, __LINE__), lhs, expr)
#define STRATA_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                      \
  ASSERT_TRUE(tmp.ok()) << #expr << ": " << tmp.status(); \
  lhs = std::move(tmp).value()

namespace strata::cuda::testing_util {

inline constexpr float kBf16Tolerance = 1e-2f;
inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline float RoundBf16(float v) { return engine::Bf16ToFloat(engine::FloatToBf16(v)); }

// A new seed per process run unless STRATA_TEST_SEED pins one.
inline uint64_t FreshSeed() {
  static std::mt19937_64 seeder = [] {
    if (const char* env = std::getenv("STRATA_TEST_SEED"); env != nullptr) {
      return std::mt19937_64(std::strtoull(env, nullptr, 10));
    }
    std::random_device device;
    return std::mt19937_64((uint64_t{device()} << 32) ^ device());
  }();
  return seeder();
}

// Relative L2 error of `actual` against `expected`, with a description of the
// worst element; fails on any NaN/Inf and on size mismatches.
inline ::testing::AssertionResult RelL2Close(const std::string& what,
                                             const std::vector<float>& expected,
                                             const std::vector<float>& actual, float tolerance) {
  if (expected.size() != actual.size()) {
    return ::testing::AssertionFailure()
           << what << ": size mismatch, cpu " << expected.size() << " vs cuda " << actual.size();
  }
  double diff_sq = 0.0;
  double ref_sq = 0.0;
  double max_abs = 0.0;
  size_t max_index = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!std::isfinite(actual[i]) || !std::isfinite(expected[i])) {
      return ::testing::AssertionFailure()
             << what << ": non-finite value at element " << i << " of " << expected.size()
             << " (cpu " << expected[i] << ", cuda " << actual[i]
             << "); NaN in cuda output usually means the element was never written";
    }
    const double d = static_cast<double>(actual[i]) - expected[i];
    diff_sq += d * d;
    ref_sq += static_cast<double>(expected[i]) * expected[i];
    if (std::fabs(d) > max_abs) {
      max_abs = std::fabs(d);
      max_index = i;
    }
  }
  const double rel = ref_sq > 0 ? std::sqrt(diff_sq / ref_sq) : std::sqrt(diff_sq);
  if (rel <= tolerance) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": relative L2 error " << rel << " > " << tolerance << " over "
         << expected.size() << " elements; worst element " << max_index << ": cpu "
         << expected[max_index] << " vs cuda " << actual[max_index] << " (|diff| " << max_abs
         << ")";
}

// One CUDA and one CPU backend per test suite; a test skips when the
// machine has no usable GPU and fails when a GPU is there but the backend
// cannot be created. Each test draws a fresh seed (Seed() describes it).
class CudaVsCpuTest : public ::testing::Test {
 protected:
  using Backend = engine::Backend;
  using DType = engine::DType;
  using Tensor = engine::Tensor;

  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateCudaBackend(0);
    if (cuda.ok()) {
      cuda_ = std::move(cuda).value().release();
    } else {
      setup_status_ = cuda.status();
    }
    cpu_ = engine::CreateCpuBackend(0).release();
  }
  static void TearDownTestSuite() {
    delete cuda_;
    cuda_ = nullptr;
    delete cpu_;
    cpu_ = nullptr;
  }

  void SetUp() override {
    if (cuda_ == nullptr) {
      if (absl::IsUnavailable(setup_status_)) {
        GTEST_SKIP() << "no usable GPU: " << setup_status_;
      }
      FAIL() << "CreateCudaBackend failed on a machine with a GPU: " << setup_status_;
    }
    seed_ = FreshSeed();
    rng_.seed(seed_);
  }

  Backend& cpu() { return *cpu_; }
  Backend& cuda() { return *cuda_; }

  // Context for failure messages: the test's seed.
  std::string Seed() const { return absl::StrCat("seed ", seed_, " (STRATA_TEST_SEED)"); }

  // Allocates `shape` in the backend's activation dtype (or `dtype`) and
  // uploads `values`.
  absl::StatusOr<Tensor> Upload(Backend& backend, std::vector<int64_t> shape,
                                const std::vector<float>& values) {
    return UploadAs(backend, backend.activation_dtype(), std::move(shape), values);
  }
  absl::StatusOr<Tensor> UploadAs(Backend& backend, DType dtype, std::vector<int64_t> shape,
                                  const std::vector<float>& values) {
    absl::StatusOr<Tensor> t = backend.Allocate(dtype, std::move(shape));
    if (!t.ok()) return t.status();
    if (t->numel() != static_cast<int64_t>(values.size())) {
      return absl::InvalidArgumentError("Upload: value count does not match the shape");
    }
    absl::Status s = backend.CopyFromHost(values.data(), DType::kF32, t->numel(), *t, 0);
    if (!s.ok()) return s;
    return t;
  }
  absl::StatusOr<Tensor> UploadI32(Backend& backend, std::vector<int64_t> shape,
                                   const std::vector<int32_t>& values) {
    absl::StatusOr<Tensor> t = backend.Allocate(DType::kI32, std::move(shape));
    if (!t.ok()) return t.status();
    if (t->numel() != static_cast<int64_t>(values.size())) {
      return absl::InvalidArgumentError("UploadI32: value count does not match the shape");
    }
    absl::Status s = backend.CopyFromHost(values.data(), DType::kI32, t->numel(), *t, 0);
    if (!s.ok()) return s;
    return t;
  }
  // An output tensor filled with NaN so that unwritten elements are caught.
  absl::StatusOr<Tensor> Poisoned(Backend& backend, std::vector<int64_t> shape) {
    absl::StatusOr<Tensor> t = backend.Allocate(backend.activation_dtype(), std::move(shape));
    if (!t.ok()) return t.status();
    absl::Status s = backend.Fill(*t, kNaN);
    if (!s.ok()) return s;
    return t;
  }
  absl::StatusOr<std::vector<float>> Download(Backend& backend, const Tensor& t) {
    std::vector<float> host(static_cast<size_t>(t.numel()));
    absl::Status s = backend.CopyToHost(t, host.data());
    if (!s.ok()) return s;
    return host;
  }
  absl::StatusOr<std::vector<int32_t>> DownloadI32(Backend& backend, const Tensor& t) {
    std::vector<int32_t> host(static_cast<size_t>(t.numel()));
    absl::Status s = backend.CopyToHost(t, host.data());
    if (!s.ok()) return s;
    return host;
  }

  // Downloads `cpu_out` / `cuda_out` and compares them.
  void ExpectClose(const std::string& what, const Tensor& cpu_out, const Tensor& cuda_out,
                   float tolerance = kBf16Tolerance) {
    STRATA_ASSERT_OK(cuda().Synchronize());
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> expected, Download(cpu(), cpu_out));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> actual, Download(cuda(), cuda_out));
    EXPECT_TRUE(RelL2Close(absl::StrCat(what, " [", Seed(), "]"), expected, actual, tolerance));
  }

  inline static Backend* cpu_ = nullptr;
  inline static Backend* cuda_ = nullptr;
  inline static absl::Status setup_status_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

}  // namespace strata::cuda::testing_util

#endif  // STRATA_TESTS_CUDA_CUDA_TEST_UTIL_H_
