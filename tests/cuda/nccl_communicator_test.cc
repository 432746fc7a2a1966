// The NCCL communicator (cuda/nccl_communicator.h): the library loads or
// says why not; groups refuse backends that are not CUDA backends on GPUs of
// their own; with one GPU a group of one rank leaves data as it is, checks
// shapes, records its collectives into graphs that replay, and fails every
// collective once aborted; with two GPUs (one thread per rank) it sums,
// gathers along the last dimension and broadcasts, and a rank that never
// joins does not hang the other. Tests skip without the GPUs they need or
// when NCCL cannot be loaded (bench/run_gpu.sh puts PyTorch's NCCL on
// LD_LIBRARY_PATH on the GPU machine).
#include "cuda/nccl_communicator.h"

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/communicator.h"
#include "engine/cpu_backend.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

using engine::Backend;
using engine::Communicator;
using engine::DType;
using engine::Tensor;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

int GpuCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

absl::StatusOr<Tensor> Upload(Backend& b, DType dtype, std::vector<int64_t> shape,
                              const std::vector<float>& values) {
  absl::StatusOr<Tensor> t = b.Allocate(dtype, std::move(shape));
  if (!t.ok()) return t.status();
  if (t->numel() != static_cast<int64_t>(values.size())) {
    return absl::InvalidArgumentError("Upload: value count does not match the shape");
  }
  if (absl::Status s = b.CopyFromHost(values.data(), DType::kF32, t->numel(), *t, 0); !s.ok()) {
    return s;
  }
  return t;
}

absl::StatusOr<std::vector<float>> Download(Backend& b, const Tensor& t) {
  std::vector<float> host(static_cast<size_t>(t.numel()));
  if (absl::Status s = b.CopyToHost(t, host.data()); !s.ok()) return s;
  return host;
}

// OK, or FailedPrecondition naming the first element that differs.
absl::Status ExpectValues(const std::string& what, Backend& b, const Tensor& t,
                          const std::vector<float>& want) {
  absl::StatusOr<std::vector<float>> got = Download(b, t);
  if (!got.ok()) return got.status();
  if (got->size() != want.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": ", got->size(), " values, expected ", want.size()));
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if ((*got)[i] != want[i]) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": element ", i, " is ", (*got)[i], ", expected ", want[i]));
    }
  }
  return absl::OkStatus();
}

std::vector<float> Iota(size_t n, float first, float step = 1.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = first + step * static_cast<float>(i);
  return v;
}

// Runs fn(rank) on one thread per rank and returns each rank's status.
std::vector<absl::Status> OnEveryRank(int ranks, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> results(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] { results[r] = fn(r); });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

TEST(NcclLibraryTest, LoadsOrSaysWhyNot) {
  const absl::StatusOr<std::string> version = NcclVersion();
  if (version.ok()) {
    std::printf("%s\n", version->c_str());
    EXPECT_TRUE(absl::StartsWith(*version, "NCCL 2.")) << *version;
    return;
  }
  if (absl::IsUnimplemented(version.status())) {
    EXPECT_TRUE(absl::StrContains(version.status().message(), "without NCCL")) << version.status();
    return;
  }
  EXPECT_TRUE(absl::IsFailedPrecondition(version.status())) << version.status();
  EXPECT_TRUE(absl::StrContains(version.status().message(), "libnccl.so.2")) << version.status();
  EXPECT_TRUE(absl::StrContains(version.status().message(), "LD_LIBRARY_PATH")) << version.status();
}

TEST(NcclFactoryTest, RefusesBackendsThatAreNotCuda) {
  std::unique_ptr<Backend> cpu = engine::CreateCpuBackend(0);
  std::vector<Backend*> backends = {cpu.get()};
  auto group = CreateNcclGroup(backends, milliseconds(1000));
  if (absl::IsUnimplemented(group.status())) GTEST_SKIP() << group.status();
  ASSERT_TRUE(absl::IsInvalidArgument(group.status())) << group.status();
  EXPECT_TRUE(absl::StrContains(group.status().message(), "not a CUDA backend")) << group.status();

  auto none = CreateNcclGroup({}, milliseconds(1000));
  EXPECT_TRUE(absl::IsInvalidArgument(none.status())) << none.status();
}

// A group over the first `gpus` GPUs; each test skips when they or NCCL
// are missing.
class NcclGroupTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // NVLink multicast can put the shared GPUs of the test machines out of
    // service; a setting of the caller's own wins.
    setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  }

  void TearDown() override {
    const Clock::time_point start = Clock::now();
    comms_.clear();
    EXPECT_LT(SecondsSince(start), 10.0) << "destroying the communicators took too long";
    backends_.clear();
  }

  // Sets `*skip` to why the test cannot run here; creates backends on GPUs
  // 0..gpus-1 and their group otherwise.
  void MakeGroup(int gpus, milliseconds timeout, std::string* skip) {
    if (GpuCount() < gpus) {
      *skip = absl::StrCat("needs ", gpus, " GPU(s), found ", GpuCount());
      return;
    }
    if (absl::StatusOr<std::string> version = NcclVersion(); !version.ok()) {
      *skip = version.status().ToString();
      return;
    }
    std::vector<Backend*> raw;
    for (int i = 0; i < gpus; ++i) {
      auto backend = CreateCudaBackend(i);
      ASSERT_TRUE(backend.ok()) << backend.status();
      backends_.push_back(std::move(*backend));
      raw.push_back(backends_.back().get());
    }
    auto group = CreateNcclGroup(raw, timeout);
    ASSERT_TRUE(group.ok()) << group.status();
    comms_ = std::move(*group);
    ASSERT_EQ(comms_.size(), static_cast<size_t>(gpus));
    for (int i = 0; i < gpus; ++i) {
      EXPECT_EQ(comms_[i]->rank(), i);
      EXPECT_EQ(comms_[i]->size(), gpus);
      EXPECT_EQ(comms_[i]->name(), "nccl");
    }
  }

  Backend& backend(int r) { return *backends_[r]; }
  Communicator& comm(int r) { return *comms_[r]; }

  // Destroyed in reverse: the communicators first.
  std::vector<std::unique_ptr<Backend>> backends_;
  std::vector<std::unique_ptr<Communicator>> comms_;
};

#define STRATA_NCCL_GROUP_OR_SKIP(gpus, timeout)                     \
  do {                                                               \
    std::string skip_reason;                                         \
    ASSERT_NO_FATAL_FAILURE(MakeGroup(gpus, timeout, &skip_reason)); \
    if (!skip_reason.empty()) GTEST_SKIP() << skip_reason;           \
  } while (0)

TEST_F(NcclGroupTest, RefusesTwoRanksOnOneGpu) {
  if (GpuCount() < 1) GTEST_SKIP() << "no GPU";
  auto a = CreateCudaBackend(0);
  auto b = CreateCudaBackend(0);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<Backend*> backends = {a->get(), b->get()};
  auto group = CreateNcclGroup(backends, milliseconds(1000));
  if (absl::IsUnimplemented(group.status())) GTEST_SKIP() << group.status();
  ASSERT_TRUE(absl::IsInvalidArgument(group.status())) << group.status();
  EXPECT_TRUE(absl::StrContains(group.status().message(), "both drive CUDA device 0"))
      << group.status();
}

TEST_F(NcclGroupTest, OneRankLeavesDataAsItIs) {
  STRATA_NCCL_GROUP_OR_SKIP(1, milliseconds(10000));
  Backend& b = backend(0);
  Communicator& c = comm(0);
  const std::vector<float> values = Iota(4 * 6, -5.0f, 0.5f);  // exact in bf16 too
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(engine::DTypeName(dtype));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, Upload(b, dtype, {4, 6}, values));
    STRATA_ASSERT_OK(c.AllReduceSum(x));
    STRATA_ASSERT_OK(ExpectValues("AllReduceSum", b, x, values));

    STRATA_ASSERT_OK_AND_ASSIGN(Tensor gathered, b.Allocate(dtype, {4, 6}));
    STRATA_ASSERT_OK(b.Fill(gathered, testing_util::kNaN));
    STRATA_ASSERT_OK(c.AllGather(x, gathered));
    STRATA_ASSERT_OK(ExpectValues("AllGather", b, gathered, values));

    STRATA_ASSERT_OK(c.Broadcast(x, 0));
    STRATA_ASSERT_OK(ExpectValues("Broadcast", b, x, values));
  }
  // 1-D tensors concatenate.
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor v, Upload(b, DType::kF32, {5}, Iota(5, 1.0f)));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor w, b.Allocate(DType::kF32, {5}));
  STRATA_ASSERT_OK(c.AllGather(v, w));
  STRATA_ASSERT_OK(ExpectValues("AllGather 1-D", b, w, Iota(5, 1.0f)));
  STRATA_ASSERT_OK(b.Synchronize());
}

TEST_F(NcclGroupTest, RejectsMismatchedShapesAndDtypes) {
  STRATA_NCCL_GROUP_OR_SKIP(1, milliseconds(10000));
  Backend& b = backend(0);
  Communicator& c = comm(0);
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, b.Allocate(DType::kF32, {4, 6}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor wrong_cols, b.Allocate(DType::kF32, {4, 7}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor wrong_rows, b.Allocate(DType::kF32, {3, 6}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor wrong_dtype, b.Allocate(DType::kBF16, {4, 6}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor ints, b.Allocate(DType::kI32, {4, 6}));
  for (Tensor* out : {&wrong_cols, &wrong_rows, &wrong_dtype}) {
    const absl::Status s = c.AllGather(x, *out);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "AllGather")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "[4, 6]")) << s;
  }
  const absl::Status sum = c.AllReduceSum(ints);
  EXPECT_TRUE(absl::IsInvalidArgument(sum)) << sum;
  EXPECT_TRUE(absl::StrContains(sum.message(), "AllReduceSum")) << sum;
  const absl::Status root = c.Broadcast(x, 1);
  EXPECT_TRUE(absl::IsInvalidArgument(root)) << root;
  EXPECT_TRUE(absl::StrContains(root.message(), "Broadcast")) << root;
  Tensor undefined;
  EXPECT_TRUE(absl::IsInvalidArgument(c.AllReduceSum(undefined)));
  // None of that broke the group.
  STRATA_ASSERT_OK(c.AllReduceSum(x));
  STRATA_ASSERT_OK(b.Synchronize());
}

TEST_F(NcclGroupTest, AbortFailsEveryLaterCollective) {
  STRATA_NCCL_GROUP_OR_SKIP(1, milliseconds(10000));
  Backend& b = backend(0);
  Communicator& c = comm(0);
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, Upload(b, DType::kF32, {2, 3}, Iota(6, 1.0f)));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor y, b.Allocate(DType::kF32, {2, 3}));
  STRATA_ASSERT_OK(c.AllReduceSum(x));
  c.Abort("the test gave up");
  for (const absl::Status& s : {c.AllReduceSum(x), c.AllGather(x, y), c.Broadcast(x, 0)}) {
    EXPECT_TRUE(absl::IsAborted(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "the test gave up")) << s;
  }
  // The backend itself goes on working.
  STRATA_ASSERT_OK(b.Synchronize());
  STRATA_ASSERT_OK(ExpectValues("after abort", b, x, Iota(6, 1.0f)));
  // TearDown checks that destruction returns.
}

TEST_F(NcclGroupTest, CollectivesRecordedIntoAGraphReplay) {
  STRATA_NCCL_GROUP_OR_SKIP(1, milliseconds(10000));
  Backend& b = backend(0);
  Communicator& c = comm(0);
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, Upload(b, DType::kBF16, {3, 8}, Iota(24, 0.0f)));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor y, b.Allocate(DType::kBF16, {3, 8}));
  // Once directly first, as the model does before it records a step.
  STRATA_ASSERT_OK(c.AllReduceSum(x));
  STRATA_ASSERT_OK(c.AllGather(x, y));
  STRATA_ASSERT_OK(b.Synchronize());

  STRATA_ASSERT_OK(b.BeginCapture());
  const absl::Status reduced = c.AllReduceSum(x);
  const absl::Status gathered = c.AllGather(x, y);
  absl::StatusOr<int> graph = b.EndCapture();
  STRATA_ASSERT_OK(reduced);
  STRATA_ASSERT_OK(gathered);
  ASSERT_TRUE(graph.ok()) << graph.status();

  for (float first : {100.0f, -7.0f}) {
    const std::vector<float> values = Iota(24, first);
    STRATA_ASSERT_OK(b.CopyFromHost(values.data(), DType::kF32, 24, x, 0));
    STRATA_ASSERT_OK(b.Fill(y, testing_util::kNaN));
    STRATA_ASSERT_OK(b.ReplayGraph(*graph));
    STRATA_ASSERT_OK(ExpectValues(absl::StrCat("replay from ", first), b, y, values));
  }
  // NCCL keeps its communicator until the graphs that recorded it go.
  STRATA_ASSERT_OK(b.ReleaseGraph(*graph));
}

TEST_F(NcclGroupTest, TwoRanksSumGatherAndBroadcast) {
  STRATA_NCCL_GROUP_OR_SKIP(2, milliseconds(20000));
  std::vector<int> graphs(2, -1);
  const std::vector<absl::Status> results = OnEveryRank(2, [&](int r) -> absl::Status {
    Backend& b = backend(r);
    Communicator& c = comm(r);
    // Sums: rank r holds (r + 1) * (i + 1); small integers are exact in bf16.
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      absl::StatusOr<Tensor> x = Upload(b, dtype, {3, 5}, Iota(15, r + 1.0f, r + 1.0f));
      if (!x.ok()) return x.status();
      if (absl::Status s = c.AllReduceSum(*x); !s.ok()) return s;
      if (absl::Status s = ExpectValues(absl::StrCat("sum ", engine::DTypeName(dtype)), b, *x,
                                        Iota(15, 3.0f, 3.0f));
          !s.ok()) {
        return s;
      }
    }
    // Gather along the last dimension: rank r's [2, 3] block holds
    // 100 r + (row * 3 + col); out [2, 6] interleaves the ranks per row.
    absl::StatusOr<Tensor> in = Upload(b, DType::kBF16, {2, 3}, Iota(6, 100.0f * r));
    absl::StatusOr<Tensor> out = b.Allocate(DType::kBF16, {2, 6});
    if (!in.ok() || !out.ok()) return in.ok() ? out.status() : in.status();
    const std::vector<float> interleaved = {0, 1, 2, 100, 101, 102, 3, 4, 5, 103, 104, 105};
    if (absl::Status s = c.AllGather(*in, *out); !s.ok()) return s;
    if (absl::Status s = ExpectValues("gather", b, *out, interleaved); !s.ok()) return s;
    // One row, and 1-D: plain concatenation.
    absl::StatusOr<Tensor> flat_in = Upload(b, DType::kF32, {4}, Iota(4, 10.0f * r));
    absl::StatusOr<Tensor> flat_out = b.Allocate(DType::kF32, {8});
    if (!flat_in.ok() || !flat_out.ok()) return absl::InternalError("allocation failed");
    if (absl::Status s = c.AllGather(*flat_in, *flat_out); !s.ok()) return s;
    if (absl::Status s = ExpectValues("gather 1-D", b, *flat_out, {0, 1, 2, 3, 10, 11, 12, 13});
        !s.ok()) {
      return s;
    }
    // Broadcast from rank 1.
    absl::StatusOr<Tensor> data =
        Upload(b, DType::kF32, {2, 2}, r == 1 ? Iota(4, 7.0f) : std::vector<float>(4, -1.0f));
    if (!data.ok()) return data.status();
    if (absl::Status s = c.Broadcast(*data, 1); !s.ok()) return s;
    if (absl::Status s = ExpectValues("broadcast", b, *data, Iota(4, 7.0f)); !s.ok()) return s;

    // The gather recorded into each rank's graph, replayed on both.
    if (absl::Status s = b.BeginCapture(); !s.ok()) return s;
    const absl::Status recorded = c.AllGather(*in, *out);
    absl::StatusOr<int> graph = b.EndCapture();
    if (!recorded.ok()) return recorded;
    if (!graph.ok()) return graph.status();
    graphs[r] = *graph;
    const std::vector<float> shifted = Iota(6, 100.0f * r + 50.0f);
    if (absl::Status s = b.CopyFromHost(shifted.data(), DType::kF32, 6, *in, 0); !s.ok()) return s;
    if (absl::Status s = b.ReplayGraph(*graph); !s.ok()) return s;
    return ExpectValues("replayed gather", b, *out,
                        {50, 51, 52, 150, 151, 152, 53, 54, 55, 153, 154, 155});
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    if (graphs[r] >= 0) STRATA_ASSERT_OK(backend(r).ReleaseGraph(graphs[r]));
  }
}

// Rank 1 never joins rank 0's all-reduce: the watchdog aborts the group
// after the timeout, rank 0's stream gets past it, and both ranks'
// later collectives fail with the reason.
TEST_F(NcclGroupTest, ARankThatNeverJoinsDoesNotHangTheOther) {
  STRATA_NCCL_GROUP_OR_SKIP(2, milliseconds(2000));
  // One collective together first, so that NCCL's connections exist.
  const std::vector<absl::Status> warm = OnEveryRank(2, [&](int r) -> absl::Status {
    absl::StatusOr<Tensor> x = Upload(backend(r), DType::kF32, {64}, Iota(64, 0.0f));
    if (!x.ok()) return x.status();
    if (absl::Status s = comm(r).AllReduceSum(*x); !s.ok()) return s;
    return backend(r).Synchronize();
  });
  STRATA_ASSERT_OK(warm[0]);
  STRATA_ASSERT_OK(warm[1]);

  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, Upload(backend(0), DType::kF32, {64}, Iota(64, 0.0f)));
  const Clock::time_point start = Clock::now();
  const absl::Status enqueued = comm(0).AllReduceSum(x);
  if (enqueued.ok()) {
    // The aborted kernel returns; its data is undefined.
    const absl::Status synced = backend(0).Synchronize();
    std::printf("rank 0's Synchronize after the abort: %s\n", synced.ToString().c_str());
  } else {
    EXPECT_TRUE(absl::IsDeadlineExceeded(enqueued) || absl::IsAborted(enqueued)) << enqueued;
  }
  const double waited = SecondsSince(start);
  EXPECT_GE(waited, 1.5);
  EXPECT_LT(waited, 5.0);
  for (int r = 0; r < 2; ++r) {
    const absl::Status later = comm(r).AllReduceSum(x);
    EXPECT_TRUE(absl::IsAborted(later)) << "rank " << r << ": " << later;
    EXPECT_TRUE(absl::StrContains(later.message(),
                                  "all-reduce on rank 0 did not complete within "
                                  "2000 ms"))
        << later;
  }
}

// The same on the group's first collective, before NCCL connected the ranks.
TEST_F(NcclGroupTest, ARankThatNeverJoinsTheFirstCollectiveDoesNotHangTheOther) {
  STRATA_NCCL_GROUP_OR_SKIP(2, milliseconds(2000));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, Upload(backend(0), DType::kF32, {64}, Iota(64, 0.0f)));
  const Clock::time_point start = Clock::now();
  const absl::Status enqueued = comm(0).AllReduceSum(x);
  if (enqueued.ok()) {
    (void)backend(0).Synchronize();
  } else {
    EXPECT_TRUE(absl::IsDeadlineExceeded(enqueued) || absl::IsAborted(enqueued)) << enqueued;
  }
  EXPECT_LT(SecondsSince(start), 5.0);
  const absl::Status later = comm(1).Broadcast(x, 0);
  EXPECT_TRUE(absl::IsAborted(later)) << later;
}

// A rank that fails outside a collective aborts the group: the other's
// pending collective returns without waiting out the (long) timeout.
TEST_F(NcclGroupTest, AbortFromAnotherThreadReleasesAWaitingRank) {
  STRATA_NCCL_GROUP_OR_SKIP(2, milliseconds(60000));
  const std::vector<absl::Status> warm = OnEveryRank(2, [&](int r) -> absl::Status {
    absl::StatusOr<Tensor> x = Upload(backend(r), DType::kF32, {64}, Iota(64, 0.0f));
    if (!x.ok()) return x.status();
    if (absl::Status s = comm(r).AllReduceSum(*x); !s.ok()) return s;
    return backend(r).Synchronize();
  });
  STRATA_ASSERT_OK(warm[0]);
  STRATA_ASSERT_OK(warm[1]);

  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, Upload(backend(0), DType::kF32, {64}, Iota(64, 0.0f)));
  std::thread failing_rank([&] {
    std::this_thread::sleep_for(milliseconds(300));
    comm(1).Abort("rank 1 lost its model");
  });
  const Clock::time_point start = Clock::now();
  const absl::Status enqueued = comm(0).AllReduceSum(x);
  if (enqueued.ok()) {
    (void)backend(0).Synchronize();
  } else {
    EXPECT_TRUE(absl::IsAborted(enqueued)) << enqueued;
  }
  failing_rank.join();
  EXPECT_LT(SecondsSince(start), 5.0);
  const absl::Status later = comm(0).AllReduceSum(x);
  EXPECT_TRUE(absl::IsAborted(later)) << later;
  EXPECT_TRUE(absl::StrContains(later.message(), "rank 1 lost its model")) << later;
}

}  // namespace
}  // namespace strata::cuda
