// The CUDA backend's graphs (BeginCapture / EndCapture / ReplayGraph) and
// per-operator timing (SetOpTiming / TakeOpTimes): a replay computes what
// the recorded operators compute, on the tensors' contents at replay time;
// host copies and synchronisation fail while capturing; timing counts each
// operator until taken. Skips without a GPU, except the CPU backend's
// refusal of graphs.
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "cuda/cuda_backend.h"
#include "engine/cpu_backend.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

using engine::DType;
using engine::Tensor;

class CudaGraphTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto backend = CreateCudaBackend(0);
    if (!backend.ok()) GTEST_SKIP() << "no usable GPU: " << backend.status();
    backend_ = *std::move(backend);
  }

  std::vector<float> Download(const Tensor& t) {
    std::vector<float> out(static_cast<size_t>(t.numel()));
    const absl::Status s = backend_->CopyToHost(t, out.data());
    EXPECT_TRUE(s.ok()) << s;
    return out;
  }

  std::unique_ptr<engine::Backend> backend_;
};

TEST_F(CudaGraphTest, ReplayComputesTheRecordedOperatorsOnCurrentContents) {
  engine::Backend& b = *backend_;
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, b.Allocate(DType::kBF16, {3, 4096}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor w, b.Allocate(DType::kBF16, {4096}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor out, b.Allocate(DType::kBF16, {3, 4096}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor direct, b.Allocate(DType::kBF16, {3, 4096}));
  STRATA_ASSERT_OK(b.FillRandom(x, 1, 2.0f));
  STRATA_ASSERT_OK(b.FillRandom(w, 2, 1.0f));
  STRATA_ASSERT_OK(b.Fill(out, 7.0f));

  STRATA_ASSERT_OK(b.BeginCapture());
  STRATA_ASSERT_OK(b.RmsNorm(x, w, 1e-5f, out));
  // Host copies, synchronisation and allocation are refused while capturing.
  const float one = 1.0f;
  EXPECT_TRUE(absl::IsFailedPrecondition(b.CopyFromHost(&one, DType::kF32, 1, out, 0)));
  EXPECT_TRUE(absl::IsFailedPrecondition(b.Synchronize()));
  EXPECT_TRUE(absl::IsFailedPrecondition(b.Allocate(DType::kF32, {4}).status()));
  EXPECT_TRUE(absl::IsFailedPrecondition(b.BeginCapture()));
  STRATA_ASSERT_OK_AND_ASSIGN(int graph, b.EndCapture());

  // Recording ran nothing.
  for (float v : Download(out)) ASSERT_EQ(v, 7.0f);
  for (uint64_t seed : {3, 4}) {
    STRATA_ASSERT_OK(b.FillRandom(x, seed, 2.0f));  // new contents, same tensor
    STRATA_ASSERT_OK(b.ReplayGraph(graph));
    STRATA_ASSERT_OK(b.RmsNorm(x, w, 1e-5f, direct));
    EXPECT_EQ(Download(out), Download(direct)) << "seed " << seed;
  }
  EXPECT_TRUE(absl::IsInvalidArgument(b.ReplayGraph(graph + 1)));
  EXPECT_TRUE(absl::IsFailedPrecondition(b.EndCapture().status()));  // not capturing

  // With op timing on, graphs are neither recorded nor replayed (their
  // operators would not be timed).
  b.SetOpTiming(true);
  EXPECT_TRUE(absl::IsFailedPrecondition(b.BeginCapture()));
  EXPECT_TRUE(absl::IsFailedPrecondition(b.ReplayGraph(graph)));
  b.SetOpTiming(false);
  STRATA_ASSERT_OK(b.ReplayGraph(graph));
  STRATA_ASSERT_OK(b.Synchronize());
}

TEST_F(CudaGraphTest, OpTimingCountsEachOperatorUntilTaken) {
  engine::Backend& b = *backend_;
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, b.Allocate(DType::kBF16, {8, 4096}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor w, b.Allocate(DType::kBF16, {4096}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor y, b.Allocate(DType::kBF16, {8, 4096}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor out, b.Allocate(DType::kBF16, {8, 4096}));
  STRATA_ASSERT_OK(b.FillRandom(x, 1, 2.0f));
  STRATA_ASSERT_OK(b.FillRandom(y, 3, 1.0f));
  STRATA_ASSERT_OK(b.FillRandom(w, 2, 1.0f));

  STRATA_ASSERT_OK(b.RmsNorm(x, w, 1e-5f, out));  // before: not timed
  b.SetOpTiming(true);
  STRATA_ASSERT_OK(b.RmsNorm(x, w, 1e-5f, out));
  STRATA_ASSERT_OK(b.AddRmsNorm(x, y, w, 1e-5f, out));
  STRATA_ASSERT_OK(b.RmsNorm(x, w, 1e-5f, out));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<engine::OpTime> times, b.TakeOpTimes());
  ASSERT_EQ(times.size(), 2u);  // in order of first use
  EXPECT_EQ(times[0].op, "RmsNorm");
  EXPECT_EQ(times[0].calls, 2);
  EXPECT_GT(times[0].ms, 0.0);
  EXPECT_EQ(times[1].op, "AddRmsNorm");
  EXPECT_EQ(times[1].calls, 1);
  EXPECT_GT(times[1].ms, 0.0);
  STRATA_ASSERT_OK_AND_ASSIGN(times, b.TakeOpTimes());
  EXPECT_TRUE(times.empty());  // taken
  b.SetOpTiming(false);
  STRATA_ASSERT_OK(b.RmsNorm(x, w, 1e-5f, out));
  STRATA_ASSERT_OK_AND_ASSIGN(times, b.TakeOpTimes());
  EXPECT_TRUE(times.empty());  // off
}

TEST(CpuGraphTest, CpuBackendHasNoGraphs) {
  auto cpu = engine::CreateCpuBackend(1);
  EXPECT_TRUE(absl::IsUnimplemented(cpu->BeginCapture()));
  EXPECT_TRUE(absl::IsUnimplemented(cpu->EndCapture().status()));
  EXPECT_TRUE(absl::IsUnimplemented(cpu->ReplayGraph(0)));
}

}  // namespace
}  // namespace strata::cuda
