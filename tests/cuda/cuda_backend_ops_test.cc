// Operator-by-operator comparison of the CUDA backend (bf16 storage, fp32
// accumulation) against the CPU reference backend (fp32), in the spirit of
// llama.cpp's test-backend-ops.
//
// For every operator: random inputs (never zero, rounded to bf16 on the host
// so that both backends see identical values), fresh seeds per run (printed
// in every failure; set STRATA_TEST_SEED to replay one), outputs poisoned
// with NaN before the operator runs so that elements it forgets to write are
// caught, and a comparison by relative L2 error ||cuda - cpu|| / ||cpu||
// with a bf16-sized tolerance. A NaN or Inf anywhere fails.
//
// The tests skip when there is no usable GPU (CreateCudaBackend returns
// Unavailable), as on CI runners with nvcc but no device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cuda/cuda_backend.h"
#include "cuda/kernels/gemv.h"
#include "engine/backend.h"
#include "engine/cpu_backend.h"
#include "engine/tensor.h"
#include "gtest/gtest.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

using engine::AttentionBatch;
using engine::Backend;
using engine::DType;
using engine::QkvLayout;
using engine::Tensor;

using testing_util::kBf16Tolerance;
using testing_util::kNaN;
using testing_util::RelL2Close;
using testing_util::RoundBf16;

class CudaBackendOpsTest : public testing_util::CudaVsCpuTest {
 protected:
  // Uniform values in [-scale, scale] with |v| >= scale / 64 (never zero),
  // rounded to bf16.
  std::vector<float> RandomValues(int64_t n, float scale = 1.0f) {
    std::uniform_real_distribution<float> magnitude(1.0f / 64, 1.0f);
    std::bernoulli_distribution sign(0.5);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = RoundBf16((sign(rng_) ? scale : -scale) * magnitude(rng_));
    return v;
  }
};

// ---- Memory -----------------------------------------------------------------

TEST_F(CudaBackendOpsTest, CopyF32ToBf16RoundTrip) {
  // Not pre-rounded: the upload itself must round to nearest even.
  std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
  std::vector<float> host(100003);
  for (float& v : host) v = dist(rng_);
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor t, cuda().Allocate(DType::kBF16, {100003}));
  STRATA_ASSERT_OK(cuda().CopyFromHost(host.data(), DType::kF32, 100003, t, 0));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back, Download(cuda(), t));
  for (size_t i = 0; i < host.size(); ++i) {
    ASSERT_EQ(back[i], RoundBf16(host[i])) << "element " << i << " of F32 -> BF16, " << Seed();
  }
}

// fp8 e4m3 on the device against engine::FloatToFp8E4M3 on the host, bit
// for bit: every encoding, ties in the normal and subnormal ranges,
// saturation, and random values over the whole range.
TEST_F(CudaBackendOpsTest, CopyF32ToFp8MatchesHostRounding) {
  std::vector<float> values;
  for (int v = 0; v < 256; ++v) {
    if ((v & 0x7f) != 0x7f) values.push_back(engine::Fp8E4M3ToFloat(static_cast<uint8_t>(v)));
  }
  for (float x : {1.0625f, 1.1875f, 0.0009765625f, 0.0029296875f, 0.0156f, 447.0f, 449.0f, 464.0f,
                  1e6f, -1e30f, std::numeric_limits<float>::infinity(), 0.0f, -0.0f}) {
    values.push_back(x);
  }
  std::uniform_real_distribution<float> mag(-14.0f, 10.0f);
  for (int i = 0; i < 20000; ++i) {
    values.push_back(std::exp2(mag(rng_)) * (i % 2 ? 1.0f : -1.0f));
  }
  const int64_t n = static_cast<int64_t>(values.size());
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor t, UploadAs(cuda(), DType::kF8E4M3, {n}, values));
  EXPECT_EQ(t.nbytes(), static_cast<size_t>(n));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back, Download(cuda(), t));
  for (int64_t i = 0; i < n; ++i) {
    const float expected = engine::Fp8E4M3ToFloat(engine::FloatToFp8E4M3(values[i]));
    ASSERT_EQ(std::bit_cast<uint32_t>(back[i]), std::bit_cast<uint32_t>(expected))
        << "value " << values[i] << ": cuda " << back[i] << ", host " << expected;
  }
  // Fill and FillRandom round the same way.
  STRATA_ASSERT_OK(cuda().Fill(t, 3.3f));
  STRATA_ASSERT_OK_AND_ASSIGN(back, Download(cuda(), t));
  EXPECT_EQ(back[n - 1], engine::Fp8E4M3ToFloat(engine::FloatToFp8E4M3(3.3f)));
  STRATA_ASSERT_OK(cuda().FillRandom(t, 5, 300.0f));
  STRATA_ASSERT_OK_AND_ASSIGN(back, Download(cuda(), t));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor host_t, cpu().Allocate(DType::kF8E4M3, {n}));
  STRATA_ASSERT_OK(cpu().FillRandom(host_t, 5, 300.0f));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> host_back, Download(cpu(), host_t));
  EXPECT_EQ(back, host_back);
}

TEST_F(CudaBackendOpsTest, CopyF16AndBf16ToBf16) {
  const int64_t n = 4099;
  std::vector<float> values = RandomValues(n, 8.0f);
  std::vector<uint16_t> f16(n);
  std::vector<uint16_t> bf16(n);
  for (int64_t i = 0; i < n; ++i) {
    f16[i] = engine::FloatToFp16(values[i]);
    bf16[i] = engine::FloatToBf16(values[i]);
  }
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor from_f16, cuda().Allocate(DType::kBF16, {n}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor from_bf16, cuda().Allocate(DType::kBF16, {n}));
  STRATA_ASSERT_OK(cuda().CopyFromHost(f16.data(), DType::kF16, n, from_f16, 0));
  STRATA_ASSERT_OK(cuda().CopyFromHost(bf16.data(), DType::kBF16, n, from_bf16, 0));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back_f16, Download(cuda(), from_f16));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back_bf16, Download(cuda(), from_bf16));
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(back_f16[i], RoundBf16(engine::Fp16ToFloat(f16[i])))
        << "element " << i << " of F16 -> BF16, " << Seed();
    ASSERT_EQ(back_bf16[i], engine::Bf16ToFloat(bf16[i]))
        << "element " << i << " of BF16 -> BF16, " << Seed();
  }
}

TEST_F(CudaBackendOpsTest, CopyIntoF32AndI32Tensors) {
  const int64_t n = 1000;
  std::vector<float> values = RandomValues(n);
  std::vector<uint16_t> bf16(n);
  std::vector<uint16_t> f16(n);
  for (int64_t i = 0; i < n; ++i) {
    bf16[i] = engine::FloatToBf16(values[i] * 3.0f);
    f16[i] = engine::FloatToFp16(values[i] * 5.0f);
  }
  // Three disjoint ranges of one F32 tensor, each from another dtype.
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor f32, cuda().Allocate(DType::kF32, {3 * n}));
  STRATA_ASSERT_OK(cuda().CopyFromHost(values.data(), DType::kF32, n, f32, 0));
  STRATA_ASSERT_OK(cuda().CopyFromHost(bf16.data(), DType::kBF16, n, f32, n));
  STRATA_ASSERT_OK(cuda().CopyFromHost(f16.data(), DType::kF16, n, f32, 2 * n));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back, Download(cuda(), f32));
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(back[i], values[i]) << "F32 -> F32 element " << i;
    ASSERT_EQ(back[n + i], engine::Bf16ToFloat(bf16[i])) << "BF16 -> F32 element " << i;
    ASSERT_EQ(back[2 * n + i], engine::Fp16ToFloat(f16[i])) << "F16 -> F32 element " << i;
  }

  std::vector<int32_t> ints(n);
  std::uniform_int_distribution<int32_t> dist(std::numeric_limits<int32_t>::min(),
                                              std::numeric_limits<int32_t>::max());
  for (int32_t& v : ints) v = dist(rng_);
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor i32, UploadI32(cuda(), {n}, ints));
  std::vector<int32_t> ints_back(n);
  STRATA_ASSERT_OK(cuda().CopyToHost(i32, ints_back.data()));
  EXPECT_EQ(ints_back, ints) << Seed();

  // Conversions to or from I32 are refused.
  EXPECT_FALSE(cuda().CopyFromHost(values.data(), DType::kF32, n, i32, 0).ok());
  EXPECT_FALSE(cuda().CopyFromHost(ints.data(), DType::kI32, n, f32, 0).ok());
  // So are ranges past the end.
  EXPECT_FALSE(cuda().CopyFromHost(values.data(), DType::kF32, n, f32, 2 * n + 1).ok());
}

// Crosses the pinned staging chunks (16 MiB) several times, at an odd offset.
TEST_F(CudaBackendOpsTest, CopyLargeUploadInChunks) {
  const int64_t n = (int64_t{3} << 22) + 12345;  // > 3 chunks of f32, > 1 of bf16
  const int64_t offset = 7;
  std::vector<float> host(n);
  for (int64_t i = 0; i < n; ++i) host[i] = engine::HashUniform(seed_, i) * 4.0f;
  std::vector<uint16_t> host_bf16(n);
  for (int64_t i = 0; i < n; ++i) host_bf16[i] = engine::FloatToBf16(host[i] * 0.5f);

  STRATA_ASSERT_OK_AND_ASSIGN(Tensor t, cuda().Allocate(DType::kBF16, {n + offset}));
  STRATA_ASSERT_OK(cuda().Fill(t, kNaN));
  STRATA_ASSERT_OK(cuda().CopyFromHost(host.data(), DType::kF32, n, t, offset));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back, Download(cuda(), t));
  for (int64_t i = 0; i < offset; ++i) ASSERT_TRUE(std::isnan(back[i])) << "wrote before offset";
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(back[offset + i], RoundBf16(host[i])) << "F32 upload element " << i << ", " << Seed();
  }

  STRATA_ASSERT_OK(cuda().CopyFromHost(host_bf16.data(), DType::kBF16, n, t, offset));
  STRATA_ASSERT_OK_AND_ASSIGN(back, Download(cuda(), t));
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(back[offset + i], engine::Bf16ToFloat(host_bf16[i]))
        << "BF16 upload element " << i << ", " << Seed();
  }
}

TEST_F(CudaBackendOpsTest, FillRandomMatchesCpu) {
  for (const int64_t n : {int64_t{1}, int64_t{1000}, int64_t{1} << 20 | 77}) {
    const float scale = 0.02f + static_cast<float>(n % 7);
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor ref, cpu().Allocate(DType::kF32, {n}));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor bf16, cuda().Allocate(DType::kBF16, {n}));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor f32, cuda().Allocate(DType::kF32, {n}));
    STRATA_ASSERT_OK(cpu().FillRandom(ref, seed_, scale));
    STRATA_ASSERT_OK(cuda().FillRandom(bf16, seed_, scale));
    STRATA_ASSERT_OK(cuda().FillRandom(f32, seed_, scale));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> expected, Download(cpu(), ref));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> got_bf16, Download(cuda(), bf16));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> got_f32, Download(cuda(), f32));
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(got_f32[i], expected[i])
          << "F32 FillRandom n=" << n << " element " << i << ", " << Seed();
      ASSERT_EQ(got_bf16[i], RoundBf16(expected[i]))
          << "BF16 FillRandom n=" << n << " element " << i << ", " << Seed();
    }
  }
}

TEST_F(CudaBackendOpsTest, Fill) {
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor t, cuda().Allocate(DType::kBF16, {3, 333}));
  STRATA_ASSERT_OK(cuda().Fill(t, 1.5f));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> back, Download(cuda(), t));
  for (float v : back) ASSERT_EQ(v, 1.5f);
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor i, cuda().Allocate(DType::kI32, {17}));
  STRATA_ASSERT_OK(cuda().Fill(i, -3.0f));
  std::vector<int32_t> ints(17);
  STRATA_ASSERT_OK(cuda().CopyToHost(i, ints.data()));
  for (int32_t v : ints) ASSERT_EQ(v, -3);
}

// ---- Elementwise operators --------------------------------------------------

TEST_F(CudaBackendOpsTest, Gather) {
  struct Case {
    int64_t vocab, hidden, tokens;
  };
  for (const Case& c : {Case{1000, 96, 7}, Case{50, 4096, 3}, Case{33, 13, 9}}) {
    const std::string what =
        absl::StrCat("Gather table [", c.vocab, ", ", c.hidden, "] ids [", c.tokens, "]");
    std::vector<float> table = RandomValues(c.vocab * c.hidden);
    std::vector<int32_t> ids(c.tokens);
    std::uniform_int_distribution<int32_t> id_dist(0, static_cast<int32_t>(c.vocab - 1));
    for (int32_t& id : ids) id = id_dist(rng_);
    ids.front() = 0;
    ids.back() = static_cast<int32_t>(c.vocab - 1);
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_table, Upload(cpu(), {c.vocab, c.hidden}, table));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_table, Upload(cuda(), {c.vocab, c.hidden}, table));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_ids, UploadI32(cpu(), {c.tokens}, ids));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_ids, UploadI32(cuda(), {c.tokens}, ids));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_out, Poisoned(cpu(), {c.tokens, c.hidden}));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_out, Poisoned(cuda(), {c.tokens, c.hidden}));
    STRATA_ASSERT_OK(cpu().Gather(cpu_table, cpu_ids, cpu_out));
    STRATA_ASSERT_OK(cuda().Gather(cuda_table, cuda_ids, cuda_out));
    // A copy of bf16 values: exact.
    ExpectClose(what, cpu_out, cuda_out, 0.0f);
  }
}

TEST_F(CudaBackendOpsTest, RmsNorm) {
  struct Case {
    int64_t tokens, hidden;
  };
  // 4096 and 64 take the vectorised path, 100 and 13 the scalar one.
  for (const Case& c : {Case{1, 4096}, Case{7, 4096}, Case{5, 100}, Case{64, 64}, Case{3, 13}}) {
    const std::string what = absl::StrCat("RmsNorm x [", c.tokens, ", ", c.hidden, "]");
    std::vector<float> x = RandomValues(c.tokens * c.hidden, 3.0f);
    std::vector<float> w = RandomValues(c.hidden, 2.0f);
    const float eps = 1e-5f;
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_x, Upload(cpu(), {c.tokens, c.hidden}, x));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_x, Upload(cuda(), {c.tokens, c.hidden}, x));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_w, Upload(cpu(), {c.hidden}, w));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_w, Upload(cuda(), {c.hidden}, w));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_out, Poisoned(cpu(), {c.tokens, c.hidden}));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_out, Poisoned(cuda(), {c.tokens, c.hidden}));
    STRATA_ASSERT_OK(cpu().RmsNorm(cpu_x, cpu_w, eps, cpu_out));
    STRATA_ASSERT_OK(cuda().RmsNorm(cuda_x, cuda_w, eps, cuda_out));
    ExpectClose(what, cpu_out, cuda_out);
  }
}

TEST_F(CudaBackendOpsTest, AddRmsNorm) {
  struct Case {
    int64_t tokens, hidden;
  };
  for (const Case& c : {Case{1, 2048}, Case{9, 4096}, Case{4, 99}}) {
    const std::string what = absl::StrCat("AddRmsNorm x [", c.tokens, ", ", c.hidden, "]");
    const std::vector<int64_t> shape = {c.tokens, c.hidden};
    std::vector<float> residual = RandomValues(c.tokens * c.hidden, 4.0f);
    std::vector<float> x = RandomValues(c.tokens * c.hidden, 1.0f);
    std::vector<float> w = RandomValues(c.hidden, 1.5f);
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_res, Upload(cpu(), shape, residual));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_res, Upload(cuda(), shape, residual));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_x, Upload(cpu(), shape, x));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_x, Upload(cuda(), shape, x));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_w, Upload(cpu(), {c.hidden}, w));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_w, Upload(cuda(), {c.hidden}, w));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_out, Poisoned(cpu(), shape));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_out, Poisoned(cuda(), shape));
    STRATA_ASSERT_OK(cpu().AddRmsNorm(cpu_res, cpu_x, cpu_w, 1e-6f, cpu_out));
    STRATA_ASSERT_OK(cuda().AddRmsNorm(cuda_res, cuda_x, cuda_w, 1e-6f, cuda_out));
    ExpectClose(what + " residual", cpu_res, cuda_res);
    ExpectClose(what + " out", cpu_out, cuda_out);
  }
}

TEST_F(CudaBackendOpsTest, SiluMul) {
  struct Case {
    int64_t tokens, intermediate;
  };
  for (const Case& c : {Case{1, 11008}, Case{6, 1024}, Case{3, 13}, Case{17, 40}}) {
    const std::string what =
        absl::StrCat("SiluMul gate_up [", c.tokens, ", ", 2 * c.intermediate, "]");
    std::vector<float> gate_up = RandomValues(c.tokens * 2 * c.intermediate, 6.0f);
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_in,
                                Upload(cpu(), {c.tokens, 2 * c.intermediate}, gate_up));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_in,
                                Upload(cuda(), {c.tokens, 2 * c.intermediate}, gate_up));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cpu_out, Poisoned(cpu(), {c.tokens, c.intermediate}));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor cuda_out, Poisoned(cuda(), {c.tokens, c.intermediate}));
    STRATA_ASSERT_OK(cpu().SiluMul(cpu_in, cpu_out));
    STRATA_ASSERT_OK(cuda().SiluMul(cuda_in, cuda_out));
    ExpectClose(what, cpu_out, cuda_out);
  }
}

// ---- Linear -----------------------------------------------------------------

struct LinearCase {
  int64_t tokens, in, out;
  bool bias;
  int64_t row_offset;  // x is a view starting this many rows into a bigger tensor
};

void PrintTo(const LinearCase& c, std::ostream* os) {
  *os << "T=" << c.tokens << " K=" << c.in << " N=" << c.out << (c.bias ? " bias" : "")
      << " row_offset=" << c.row_offset;
}

class CudaLinearTest : public CudaBackendOpsTest,
                       public ::testing::WithParamInterface<LinearCase> {};

TEST_P(CudaLinearTest, MatchesCpu) {
  const LinearCase c = GetParam();
  const std::string what =
      absl::StrCat("Linear x [", c.tokens, ", ", c.in, "] (row offset ", c.row_offset, ") weight [",
                   c.out, ", ", c.in, "]", c.bias ? " + bias" : "");
  const int64_t rows = c.tokens + c.row_offset;
  std::vector<float> x = RandomValues(rows * c.in);
  // Weights scaled like an initialiser so outputs stay O(1).
  std::vector<float> w = RandomValues(c.out * c.in, 1.0f / std::sqrt(static_cast<float>(c.in)));
  std::vector<float> b = RandomValues(c.out, 0.5f);
  Tensor cpu_out;
  Tensor cuda_out;
  for (Backend* backend : {&cpu(), &cuda()}) {
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor xt, Upload(*backend, {rows, c.in}, x));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor wt, Upload(*backend, {c.out, c.in}, w));
    Tensor bt;
    if (c.bias) {
      STRATA_ASSERT_OK_AND_ASSIGN(bt, Upload(*backend, {c.out}, b));
    }
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor out, Poisoned(*backend, {c.tokens, c.out}));
    STRATA_ASSERT_OK(backend->Linear(xt.Rows(c.row_offset, rows), wt, bt, out));
    (backend == &cpu() ? cpu_out : cuda_out) = out;
  }
  ExpectClose(what, cpu_out, cuda_out);
  // Element by element too: a few wrong rows (e.g. the tail of a tile) would
  // hardly move the relative L2 error of a large output.
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> expected, Download(cpu(), cpu_out));
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> actual, Download(cuda(), cuda_out));
  int bad = 0;
  for (size_t i = 0; i < expected.size() && bad < 5; ++i) {
    if (!(std::fabs(actual[i] - expected[i]) <= 0.02f + 0.02f * std::fabs(expected[i]))) {
      ADD_FAILURE() << what << ": token " << i / c.out << " feature " << i % c.out << " cpu "
                    << expected[i] << " cuda " << actual[i];
      ++bad;
    }
  }
}

// The decode-size GEMV directly (Linear picks it only where it times faster
// than cuBLASLt, so the shapes above may not reach it): against the CPU
// Linear, element by element, including widths that are not a multiple of
// the kernel's 1024-element step, odd row counts and a bias.
TEST_F(CudaBackendOpsTest, GemvMatchesCpuLinear) {
  struct Case {
    int tokens;
    int64_t in, out;
    bool bias;
  };
  for (const Case& c : {Case{1, 4096, 4096, false}, Case{1, 72, 5, true}, Case{2, 1000, 333, true},
                        Case{3, 2056, 130, false}, Case{4, 14336, 64, true}}) {
    const std::string what = absl::StrCat("Gemv T=", c.tokens, " K=", c.in, " N=", c.out,
                                          c.bias ? " + bias" : "", " [", Seed(), "]");
    std::vector<float> x = RandomValues(c.tokens * c.in);
    std::vector<float> w = RandomValues(c.out * c.in, 1.0f / std::sqrt(static_cast<float>(c.in)));
    std::vector<float> b = RandomValues(c.out, 0.5f);
    Tensor outs[2];
    for (Backend* backend : {&cpu(), &cuda()}) {
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor xt, Upload(*backend, {c.tokens, c.in}, x));
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor wt, Upload(*backend, {c.out, c.in}, w));
      Tensor bt;
      if (c.bias) {
        STRATA_ASSERT_OK_AND_ASSIGN(bt, Upload(*backend, {c.out}, b));
      }
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor out, Poisoned(*backend, {c.tokens, c.out}));
      if (backend == &cpu()) {
        STRATA_ASSERT_OK(backend->Linear(xt, wt, bt, out));
      } else {
        STRATA_ASSERT_OK(backend->Synchronize());
        ASSERT_TRUE(kernels::CanUseGemv(c.tokens, c.in, c.out, xt.data(), wt.data()));
        ASSERT_EQ(kernels::LaunchGemv(xt.data(), wt.data(), c.bias ? bt.data() : nullptr,
                                      out.data(), c.tokens, c.in, c.out, nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      }
      outs[backend == &cpu() ? 0 : 1] = out;
    }
    ExpectClose(what, outs[0], outs[1]);
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> expected, Download(cpu(), outs[0]));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> actual, Download(cuda(), outs[1]));
    for (size_t i = 0; i < expected.size(); ++i) {
      ASSERT_LE(std::fabs(actual[i] - expected[i]), 0.02f + 0.02f * std::fabs(expected[i]))
          << what << ": token " << i / c.out << " feature " << i % c.out;
    }
  }
  EXPECT_FALSE(kernels::CanUseGemv(5, 64, 64, nullptr, nullptr));  // too many tokens
  EXPECT_FALSE(kernels::CanUseGemv(1, 60, 64, nullptr, nullptr));  // K not a multiple of 8
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaLinearTest,
    ::testing::Values(LinearCase{3, 96, 40, false, 0}, LinearCase{3, 96, 40, true, 0},
                      LinearCase{1, 4096, 1024, false, 0}, LinearCase{1, 4096, 1024, true, 0},
                      LinearCase{17, 512, 1000, true, 0}, LinearCase{64, 1024, 3072, false, 0},
                      LinearCase{128, 256, 256, true, 0},
                      // Odd inner size: rows are 2-byte aligned only.
                      LinearCase{5, 37, 13, true, 0}, LinearCase{4, 37, 29, false, 1},
                      // Views at row offsets that break 256-byte alignment.
                      LinearCase{3, 96, 40, true, 1}, LinearCase{8, 128, 64, false, 3},
                      // Decode sizes (up to 8 tokens) at odd and model shapes.
                      LinearCase{1, 8, 40, true, 0}, LinearCase{3, 8, 17, false, 0},
                      LinearCase{5, 24, 7, true, 0}, LinearCase{2, 1032, 1000, true, 0},
                      LinearCase{5, 1032, 1000, false, 0}, LinearCase{8, 1032, 333, true, 0},
                      LinearCase{3, 4096, 300, true, 0}, LinearCase{5, 4096, 2048, true, 0},
                      LinearCase{8, 4096, 4100, false, 0}, LinearCase{2, 4096, 6144, false, 0},
                      LinearCase{1, 14336, 200, false, 0}, LinearCase{2, 14336, 33, true, 0},
                      LinearCase{8, 14336, 130, true, 0}, LinearCase{3, 1032, 100, true, 1},
                      LinearCase{8, 4096, 64, true, 5}, LinearCase{9, 4096, 1000, true, 0},
                      LinearCase{9, 1032, 300, false, 0}, LinearCase{2, 100, 50, false, 1}),
    [](const ::testing::TestParamInfo<LinearCase>& info) {
      const LinearCase& c = info.param;
      return absl::StrCat("T", c.tokens, "_K", c.in, "_N", c.out, c.bias ? "_bias" : "",
                          c.row_offset ? absl::StrCat("_off", c.row_offset) : "");
    });

// ---- Rope / WriteKv ---------------------------------------------------------

std::vector<float> InvFreq(int head_dim, float theta) {
  std::vector<float> f(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    f[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  }
  return f;
}

TEST_F(CudaBackendOpsTest, Rope) {
  struct Case {
    int hq, hkv, d;
    int64_t tokens;
    float theta;
    int max_pos;
  };
  for (const Case& c : {Case{4, 2, 16, 5, 10000.0f, 100}, Case{6, 2, 48, 9, 10000.0f, 4000},
                        Case{8, 1, 128, 3, 500000.0f, 32768}, Case{4, 4, 128, 12, 1e6f, 131072},
                        Case{2, 1, 64, 1, 10000.0f, 1}}) {
    const QkvLayout layout{c.hq, c.hkv, c.d};
    const int64_t width = layout.row_width();
    const std::string what = absl::StrCat("Rope Hq=", c.hq, " Hkv=", c.hkv, " D=", c.d,
                                          " T=", c.tokens, " theta=", c.theta);
    std::vector<float> qkv = RandomValues(c.tokens * width, 2.0f);
    std::vector<int32_t> positions(c.tokens);
    std::uniform_int_distribution<int32_t> pos_dist(0, c.max_pos - 1);
    for (int32_t& p : positions) p = pos_dist(rng_);
    positions[0] = 0;
    const std::vector<float> inv_freq = InvFreq(c.d, c.theta);
    Tensor cpu_qkv;
    Tensor cuda_qkv;
    for (Backend* backend : {&cpu(), &cuda()}) {
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor t, Upload(*backend, {c.tokens, width}, qkv));
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor pos, UploadI32(*backend, {c.tokens}, positions));
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor freq,
                                  UploadAs(*backend, DType::kF32, {c.d / 2}, inv_freq));
      STRATA_ASSERT_OK(backend->Rope(t, layout, pos, freq));
      (backend == &cpu() ? cpu_qkv : cuda_qkv) = t;
    }
    // The v heads must come through untouched, the rest rotated.
    ExpectClose(what, cpu_qkv, cuda_qkv);
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> rotated, Download(cuda(), cuda_qkv));
    for (int64_t t = 0; t < c.tokens; ++t) {
      for (int64_t i = int64_t{c.hq + c.hkv} * c.d; i < width; ++i) {
        ASSERT_EQ(rotated[t * width + i], qkv[t * width + i]) << what << ": v head changed";
      }
    }
  }
}

TEST_F(CudaBackendOpsTest, WriteKv) {
  struct Case {
    int hq, hkv, d, page_size, pages;
    int64_t tokens;
  };
  for (const Case& c : {Case{8, 2, 64, 16, 10, 21}, Case{4, 4, 48, 16, 4, 7},
                        Case{16, 8, 128, 32, 3, 64}, Case{2, 1, 16, 8, 5, 1}}) {
    const QkvLayout layout{c.hq, c.hkv, c.d};
    const std::string what = absl::StrCat("WriteKv Hq=", c.hq, " Hkv=", c.hkv, " D=", c.d,
                                          " pages=", c.pages, "x", c.page_size, " T=", c.tokens);
    const std::vector<int64_t> cache_shape = {c.pages, c.page_size, c.hkv, c.d};
    const int64_t cache_numel = int64_t{c.pages} * c.page_size * c.hkv * c.d;
    std::vector<float> qkv = RandomValues(c.tokens * layout.row_width());
    std::vector<float> k_init = RandomValues(cache_numel);
    std::vector<float> v_init = RandomValues(cache_numel);
    // Distinct random slots.
    std::vector<int32_t> slots(int64_t{c.pages} * c.page_size);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng_);
    slots.resize(c.tokens);
    for (const bool fp8 : {false, true}) {
      Tensor caches[2][2];
      int which = 0;
      for (Backend* backend : {&cpu(), &cuda()}) {
        const DType kv_dtype = fp8 ? DType::kF8E4M3 : backend->activation_dtype();
        STRATA_ASSERT_OK_AND_ASSIGN(Tensor q,
                                    Upload(*backend, {c.tokens, layout.row_width()}, qkv));
        STRATA_ASSERT_OK_AND_ASSIGN(Tensor s, UploadI32(*backend, {c.tokens}, slots));
        STRATA_ASSERT_OK_AND_ASSIGN(caches[which][0],
                                    UploadAs(*backend, kv_dtype, cache_shape, k_init));
        STRATA_ASSERT_OK_AND_ASSIGN(caches[which][1],
                                    UploadAs(*backend, kv_dtype, cache_shape, v_init));
        STRATA_ASSERT_OK(backend->WriteKv(q, layout, s, caches[which][0], caches[which][1]));
        ++which;
      }
      // Copies of bf16 values (fp8: each rounded once, the same way on both
      // backends): exact, including the untouched slots.
      const std::string kind = fp8 ? " (fp8 e4m3)" : "";
      ExpectClose(what + " k_cache" + kind, caches[0][0], caches[1][0], 0.0f);
      ExpectClose(what + " v_cache" + kind, caches[0][1], caches[1][1], 0.0f);
    }
  }
}

// The fused operator against the CPU's Rope then WriteKv (the interface's
// default): rotated q and k in qkv, rotated k and v in the caches, other
// slots untouched.
TEST_F(CudaBackendOpsTest, RopeWriteKvMatchesRopeThenWriteKv) {
  struct Case {
    int hq, hkv, d, page_size, pages;
    int64_t tokens;
  };
  for (const Case& c : {Case{8, 2, 64, 16, 10, 21}, Case{32, 8, 128, 16, 8, 64},
                        Case{4, 4, 48, 8, 4, 7}, Case{2, 1, 16, 8, 5, 1}}) {
    const QkvLayout layout{c.hq, c.hkv, c.d};
    const int64_t width = layout.row_width();
    const std::string what =
        absl::StrCat("RopeWriteKv Hq=", c.hq, " Hkv=", c.hkv, " D=", c.d, " T=", c.tokens);
    const std::vector<int64_t> cache_shape = {c.pages, c.page_size, c.hkv, c.d};
    const int64_t cache_numel = int64_t{c.pages} * c.page_size * c.hkv * c.d;
    std::vector<float> qkv = RandomValues(c.tokens * width, 2.0f);
    std::vector<float> k_init = RandomValues(cache_numel);
    std::vector<float> v_init = RandomValues(cache_numel);
    std::vector<int32_t> positions(c.tokens);
    std::uniform_int_distribution<int32_t> pos_dist(0, 40000);
    for (int32_t& p : positions) p = pos_dist(rng_);
    std::vector<int32_t> slots(int64_t{c.pages} * c.page_size);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng_);
    slots.resize(c.tokens);
    const std::vector<float> inv_freq = InvFreq(c.d, 500000.0f);
    for (const bool fp8 : {false, true}) {
      Tensor out[2][3];
      int which = 0;
      for (Backend* backend : {&cpu(), &cuda()}) {
        const DType kv_dtype = fp8 ? DType::kF8E4M3 : backend->activation_dtype();
        STRATA_ASSERT_OK_AND_ASSIGN(out[which][0], Upload(*backend, {c.tokens, width}, qkv));
        STRATA_ASSERT_OK_AND_ASSIGN(Tensor pos, UploadI32(*backend, {c.tokens}, positions));
        STRATA_ASSERT_OK_AND_ASSIGN(Tensor freq,
                                    UploadAs(*backend, DType::kF32, {c.d / 2}, inv_freq));
        STRATA_ASSERT_OK_AND_ASSIGN(Tensor s, UploadI32(*backend, {c.tokens}, slots));
        STRATA_ASSERT_OK_AND_ASSIGN(out[which][1],
                                    UploadAs(*backend, kv_dtype, cache_shape, k_init));
        STRATA_ASSERT_OK_AND_ASSIGN(out[which][2],
                                    UploadAs(*backend, kv_dtype, cache_shape, v_init));
        STRATA_ASSERT_OK(backend->RopeWriteKv(out[which][0], layout, pos, freq, s, out[which][1],
                                              out[which][2]));
        ++which;
      }
      // fp8 keys: the CUDA kernel rounds the rotated key to bf16 (as in qkv)
      // and then to fp8, the CPU straight to fp8; a double rounding may
      // move a value by one fp8 step, well inside the tolerance.
      const std::string kind = fp8 ? " (fp8 e4m3)" : "";
      ExpectClose(what + " qkv" + kind, out[0][0], out[1][0]);
      ExpectClose(what + " k_cache" + kind, out[0][1], out[1][1], fp8 ? 2e-2f : kBf16Tolerance);
      ExpectClose(what + " v_cache" + kind, out[0][2], out[1][2], 0.0f);  // copies: exact
    }
  }
}

// ---- Attention --------------------------------------------------------------

struct SeqSpec {
  int q_len;
  int context_len;
};

struct AttentionCase {
  std::string name;
  int hq, hkv, d, page_size;
  std::vector<SeqSpec> seqs;
  int sliding_window = 0;
  // Pages handed out in order, as a fresh page allocator does, instead of
  // shuffled: a sequence's pages are then consecutive slots.
  bool pages_in_order = false;
};

std::string Describe(const AttentionCase& c) {
  std::vector<std::string> seqs;
  for (const SeqSpec& s : c.seqs) seqs.push_back(absl::StrCat(s.q_len, "/", s.context_len));
  return absl::StrCat("Attention ", c.name, ": Hq=", c.hq, " Hkv=", c.hkv, " D=", c.d,
                      " page=", c.page_size, c.pages_in_order ? " (in order)" : "",
                      " window=", c.sliding_window, " seqs(q_len/context)=[",
                      absl::StrJoin(seqs, " "), "]");
}

// Keeps gtest (and ctest's test names) from printing the raw bytes.
void PrintTo(const AttentionCase& c, std::ostream* os) { *os << Describe(c); }

class CudaAttentionTest : public CudaBackendOpsTest,
                          public ::testing::WithParamInterface<AttentionCase> {};

TEST_P(CudaAttentionTest, MatchesCpu) {
  const AttentionCase& c = GetParam();
  const std::string what = Describe(c);
  const QkvLayout layout{c.hq, c.hkv, c.d};
  const int num_seqs = static_cast<int>(c.seqs.size());

  // Pages: every sequence gets its own, drawn from a shuffled pool with
  // spare pages, so block tables are non-contiguous and out of order.
  int max_blocks = 0;
  int total_pages = 0;
  for (const SeqSpec& s : c.seqs) {
    const int pages = (s.context_len + c.page_size - 1) / c.page_size;
    max_blocks = std::max(max_blocks, pages);
    total_pages += pages;
  }
  max_blocks += 1;  // an unused trailing column
  const int num_pages = total_pages + 3;
  std::vector<int32_t> pool(num_pages);
  std::iota(pool.begin(), pool.end(), 0);
  if (!c.pages_in_order) std::shuffle(pool.begin(), pool.end(), rng_);
  std::vector<int32_t> block_table(int64_t{num_seqs} * max_blocks, -1);
  std::vector<int32_t> query_start(num_seqs + 1, 0);
  std::vector<int32_t> context_len(num_seqs);
  int next_page = 0;
  for (int s = 0; s < num_seqs; ++s) {
    const int pages = (c.seqs[s].context_len + c.page_size - 1) / c.page_size;
    for (int p = 0; p < pages; ++p) block_table[s * max_blocks + p] = pool[next_page++];
    query_start[s + 1] = query_start[s] + c.seqs[s].q_len;
    context_len[s] = c.seqs[s].context_len;
  }
  const int64_t tokens = query_start[num_seqs];

  // Caches: random where a sequence has written keys; NaN in the unwritten
  // tail of its last page and in unused pages, so reading past the context
  // poisons the result.
  const int64_t slot_width = int64_t{c.hkv} * c.d;
  const int64_t cache_numel = int64_t{num_pages} * c.page_size * slot_width;
  std::vector<float> k_cache(cache_numel, kNaN);
  std::vector<float> v_cache(cache_numel, kNaN);
  std::vector<float> k_values = RandomValues(cache_numel);
  std::vector<float> v_values = RandomValues(cache_numel);
  for (int s = 0; s < num_seqs; ++s) {
    for (int pos = 0; pos < context_len[s]; ++pos) {
      const int64_t slot = int64_t{block_table[s * max_blocks + pos / c.page_size]} * c.page_size +
                           pos % c.page_size;
      for (int64_t i = 0; i < slot_width; ++i) {
        k_cache[slot * slot_width + i] = k_values[slot * slot_width + i];
        v_cache[slot * slot_width + i] = v_values[slot * slot_width + i];
      }
    }
  }
  // Larger q so that the softmax is far from uniform.
  std::vector<float> qkv = RandomValues(tokens * layout.row_width(), 3.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  const std::vector<int64_t> cache_shape = {num_pages, c.page_size, c.hkv, c.d};

  // Both cache dtypes: the activation dtype, and fp8 e4m3 on both backends
  // (the CPU reference rounds the same way, so the tolerance is unchanged).
  for (const bool fp8 : {false, true}) {
    Tensor outs[2];
    int which = 0;
    for (Backend* backend : {&cpu(), &cuda()}) {
      const DType kv_dtype = fp8 ? DType::kF8E4M3 : backend->activation_dtype();
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor q, Upload(*backend, {tokens, layout.row_width()}, qkv));
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor k, UploadAs(*backend, kv_dtype, cache_shape, k_cache));
      STRATA_ASSERT_OK_AND_ASSIGN(Tensor v, UploadAs(*backend, kv_dtype, cache_shape, v_cache));
      AttentionBatch batch;
      STRATA_ASSERT_OK_AND_ASSIGN(batch.query_start,
                                  UploadI32(*backend, {num_seqs + 1}, query_start));
      STRATA_ASSERT_OK_AND_ASSIGN(batch.context_len, UploadI32(*backend, {num_seqs}, context_len));
      STRATA_ASSERT_OK_AND_ASSIGN(batch.block_table,
                                  UploadI32(*backend, {num_seqs, max_blocks}, block_table));
      batch.num_seqs = num_seqs;
      batch.max_blocks_per_seq = max_blocks;
      batch.page_size = c.page_size;
      batch.host_query_start = query_start;
      batch.host_context_len = context_len;
      for (const SeqSpec& s : c.seqs) {
        batch.max_query_len = std::max(batch.max_query_len, s.q_len);
        batch.max_context_len = std::max(batch.max_context_len, s.context_len);
      }
      STRATA_ASSERT_OK_AND_ASSIGN(outs[which], Poisoned(*backend, {tokens, int64_t{c.hq} * c.d}));
      STRATA_ASSERT_OK(
          backend->Attention(q, layout, k, v, batch, scale, c.sliding_window, outs[which]));
      ++which;
    }
    ExpectClose(fp8 ? what + " (fp8 e4m3 cache)" : what, outs[0], outs[1]);
  }
}

std::vector<SeqSpec> Decodes(std::initializer_list<int> contexts) {
  std::vector<SeqSpec> seqs;
  for (int ctx : contexts) seqs.push_back({1, ctx});
  return seqs;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaAttentionTest,
    ::testing::Values(
        // Decode batches: contexts of one token, page boundaries, many pages.
        AttentionCase{"decode_gqa4_d64", 8, 2, 64, 16, Decodes({1, 2, 15, 16, 17, 100, 333, 1000})},
        AttentionCase{"decode_mha_d128", 4, 4, 128, 16, Decodes({1, 37, 513})},
        AttentionCase{"decode_gqa8_d128", 16, 2, 128, 16, Decodes({5, 700, 2049})},
        AttentionCase{"decode_gqa3_d48", 6, 2, 48, 16, Decodes({3, 90, 257})},
        AttentionCase{"decode_gqa4_d16_page8", 4, 1, 16, 8, Decodes({1, 9, 64})},
        AttentionCase{"decode_gqa5_d64_page32", 10, 2, 64, 32, Decodes({31, 32, 33, 500})},
        AttentionCase{"decode_gqa7_d256", 7, 1, 256, 16, Decodes({1, 300})},
        AttentionCase{"decode_gqa12_d64", 12, 1, 64, 16, Decodes({50, 600})},
        // head_dim 128 runs on the tensor cores and pairs kv heads when there
        // are at most 4 query heads per kv head and an even number of kv
        // heads: 3 query heads per kv head (A rows 3 and 7 idle), two pairs,
        // and an odd kv head count, which takes the one-head path.
        AttentionCase{"decode_gqa3_d128_page32", 6, 2, 128, 32, Decodes({1, 33, 700})},
        AttentionCase{"decode_gqa4_d128_page8", 16, 4, 128, 8, Decodes({8, 9, 1500})},
        AttentionCase{"decode_gqa4_d128_odd_kv", 12, 3, 128, 16, Decodes({17, 900})},
        // One split (no context above 128 keys): the kernels write the output
        // themselves; the others merge splits, in the last split block (up
        // to 16 splits) or in a separate kernel.
        AttentionCase{"decode_d128_one_split", 8, 2, 128, 16, Decodes({1, 5, 64, 128, 100})},
        // Unpaired tensor-core shapes: 6 query heads per kv head (8 O^T
        // columns, 6 used), 10 (two head chunks), 2 with an odd kv head count.
        AttentionCase{"decode_gqa6_d128", 12, 2, 128, 16, Decodes({3, 300, 1200})},
        AttentionCase{"decode_gqa10_d128", 20, 2, 128, 16, Decodes({77, 2100})},
        AttentionCase{"decode_gqa2_d128_odd_kv", 6, 3, 128, 16, Decodes({129, 640})},
        // 32k context, split over many blocks, plus a short neighbour.
        AttentionCase{"decode_32k_gqa4_d128", 8, 2, 128, 16, Decodes({32768, 20000, 7})},
        // Prefill only, from an empty cache.
        AttentionCase{"prefill_gqa4_d64", 8, 2, 64, 16, {{50, 50}, {130, 130}}},
        AttentionCase{"prefill_mha_d128", 4, 4, 128, 16, {{65, 65}, {2, 2}}},
        AttentionCase{"prefill_gqa8_d48", 8, 1, 48, 16, {{33, 33}, {17, 17}}},
        AttentionCase{"prefill_gqa3_d16", 3, 1, 16, 8, {{40, 40}}},
        AttentionCase{"prefill_d256", 2, 1, 256, 16, {{70, 70}}},
        // Mixed: decodes next to prefill chunks that continue a context.
        AttentionCase{"mixed_gqa2_d128",
                      8,
                      4,
                      128,
                      16,
                      {{1, 40}, {77, 300}, {1, 1}, {64, 64}, {5, 1000}, {1, 2000}}},
        AttentionCase{"mixed_gqa8_d48", 8, 1, 48, 16, {{33, 100}, {1, 50}, {2, 19}}},
        AttentionCase{"mixed_gqa4_d64_page64", 8, 2, 64, 64, {{129, 200}, {1, 130}}},
        AttentionCase{"prefill_chunk_4k", 4, 1, 128, 16, {{256, 4096}}},
        // Sliding window: decode and prefill, windows shorter and longer than
        // the context.
        AttentionCase{
            "window64_mixed", 8, 2, 64, 16, {{1, 300}, {100, 400}, {1, 10}, {70, 70}}, 64},
        AttentionCase{"window4096_decode_long", 8, 2, 128, 16, Decodes({10000, 4096, 4097, 5}),
                      4096},
        AttentionCase{"window1_mixed", 4, 2, 64, 16, {{1, 20}, {9, 9}}, 1},
        AttentionCase{"window100_decode_gqa2_d128", 4, 2, 128, 16, Decodes({99, 100, 101, 900}),
                      100},
        AttentionCase{"window100_prefill_gqa8", 8, 1, 128, 16, {{300, 700}}, 100}),
    [](const ::testing::TestParamInfo<AttentionCase>& info) { return info.param.name; });

// WriteKv then Attention on both backends: the layouts the two operators
// agree on (slots, head order) must also match the CPU reference.
TEST_F(CudaBackendOpsTest, WriteKvThenAttention) {
  const QkvLayout layout{8, 2, 64};
  const int page_size = 16;
  const int num_pages = 12;
  const int prompt = 45;  // prefill 45 tokens, then decode 1
  // Sequence pages in a scrambled order.
  std::vector<int32_t> pages = {7, 2, 9, 0};
  std::vector<int32_t> block_table = pages;
  auto slot_of = [&](int pos) { return pages[pos / page_size] * page_size + pos % page_size; };
  std::vector<float> prefill_qkv = RandomValues(int64_t{prompt} * layout.row_width(), 2.0f);
  std::vector<float> decode_qkv = RandomValues(layout.row_width(), 2.0f);
  std::vector<float> zeros_k = RandomValues(int64_t{num_pages} * page_size * 2 * 64);
  const std::vector<int64_t> cache_shape = {num_pages, page_size, 2, 64};

  Tensor outs[2];
  int which = 0;
  for (Backend* backend : {&cpu(), &cuda()}) {
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor k, Upload(*backend, cache_shape, zeros_k));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor v, Upload(*backend, cache_shape, zeros_k));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor table, UploadI32(*backend, {1, 4}, block_table));
    // Step 1: prefill.
    std::vector<int32_t> slots(prompt);
    for (int i = 0; i < prompt; ++i) slots[i] = slot_of(i);
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor q1,
                                Upload(*backend, {prompt, layout.row_width()}, prefill_qkv));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor s1, UploadI32(*backend, {prompt}, slots));
    STRATA_ASSERT_OK(backend->WriteKv(q1, layout, s1, k, v));
    AttentionBatch b1;
    STRATA_ASSERT_OK_AND_ASSIGN(b1.query_start, UploadI32(*backend, {2}, {0, prompt}));
    STRATA_ASSERT_OK_AND_ASSIGN(b1.context_len, UploadI32(*backend, {1}, {prompt}));
    b1.block_table = table;
    b1.num_seqs = 1;
    b1.max_blocks_per_seq = 4;
    b1.max_query_len = prompt;
    b1.max_context_len = prompt;
    b1.page_size = page_size;
    b1.host_query_start = {0, prompt};
    b1.host_context_len = {prompt};
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor o1, Poisoned(*backend, {prompt, 8 * 64}));
    STRATA_ASSERT_OK(backend->Attention(q1, layout, k, v, b1, 0.125f, 0, o1));
    // Step 2: one decode token.
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor q2, Upload(*backend, {1, layout.row_width()}, decode_qkv));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor s2, UploadI32(*backend, {1}, {slot_of(prompt)}));
    STRATA_ASSERT_OK(backend->WriteKv(q2, layout, s2, k, v));
    AttentionBatch b2 = b1;
    STRATA_ASSERT_OK_AND_ASSIGN(b2.query_start, UploadI32(*backend, {2}, {0, 1}));
    STRATA_ASSERT_OK_AND_ASSIGN(b2.context_len, UploadI32(*backend, {1}, {prompt + 1}));
    b2.max_query_len = 1;
    b2.max_context_len = prompt + 1;
    b2.host_query_start = {0, 1};
    b2.host_context_len = {prompt + 1};
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor o2, Poisoned(*backend, {1, 8 * 64}));
    STRATA_ASSERT_OK(backend->Attention(q2, layout, k, v, b2, 0.125f, 0, o2));
    if (which == 0) {
      outs[0] = o1;
      outs[1] = o2;
    } else {
      ExpectClose("WriteKv+Attention prefill step", outs[0], o1);
      ExpectClose("WriteKv+Attention decode step", outs[1], o2);
    }
    ++which;
  }
}

TEST_F(CudaBackendOpsTest, RejectsBadShapes) {
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor x, cuda().Allocate(DType::kBF16, {3, 96}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor w, cuda().Allocate(DType::kBF16, {40, 95}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor out, cuda().Allocate(DType::kBF16, {3, 40}));
  const absl::Status s = cuda().Linear(x, w, Tensor(), out);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("Linear"), std::string_view::npos) << s;
}

// Prefill on the tensor-core kernel (head_dim 64 and 128): q_len not a
// multiple of the 64-row tile, chunks continuing a context, GQA 1/4/8, pages
// of 16 and 64 (a 64-key tile spans several pages or part of one), windows
// that cut through tiles, and a long chunk.
INSTANTIATE_TEST_SUITE_P(
    TensorCorePrefill, CudaAttentionTest,
    ::testing::Values(
        AttentionCase{"tc_mha_d64", 4, 4, 64, 16, {{100, 100}, {3, 3}, {64, 64}}},
        AttentionCase{"tc_gqa4_d128_page64", 8, 2, 128, 64, {{77, 77}, {190, 450}}},
        AttentionCase{"tc_gqa8_d128", 16, 2, 128, 16, {{33, 1000}, {129, 129}}},
        AttentionCase{"tc_gqa4_d64_mixed", 8, 2, 64, 16, {{1, 70}, {200, 333}, {1, 1}, {17, 80}}},
        AttentionCase{"tc_window37_d128", 8, 2, 128, 16, {{250, 600}, {90, 90}}, 37},
        AttentionCase{"tc_window300_d64_page64", 8, 1, 64, 64, {{500, 900}}, 300},
        AttentionCase{"tc_long_chunk_gqa4_d128", 8, 2, 128, 16, {{4000, 5000}}}),
    [](const ::testing::TestParamInfo<AttentionCase>& info) { return info.param.name; });

// Prefill with head_dim 128 on a bf16 cache on Hopper: the copy-engine
// kernel, whose copies are whole pages of 8 to 64 slots or 128-slot spans of
// longer pages, or whole tiles where pages are in order (consecutive slots),
// and whose last tile of a block is zeroed past the context (the caches hold
// NaN there). A page of 24 slots fits neither and falls
// back to the mma.sync kernel; on other GPUs every case does. Windows start
// tiles below the window (aligned to 128 keys) and mask the keys below it.
INSTANTIATE_TEST_SUITE_P(
    CopyEnginePrefill, CudaAttentionTest,
    ::testing::Values(
        AttentionCase{"tma_page8_gqa4", 8, 2, 128, 8, {{300, 300}, {129, 1000}, {2, 9}}},
        AttentionCase{"tma_page32_gqa8", 16, 2, 128, 32, {{127, 127}, {128, 256}, {1, 40}}},
        AttentionCase{"tma_page256_gqa4", 8, 2, 128, 256, {{200, 700}, {513, 513}}},
        AttentionCase{"tma_page128_gqa4", 8, 2, 128, 128, {{129, 400}, {256, 256}}},
        AttentionCase{"tma_page512_mha", 2, 2, 128, 512, {{300, 1100}}},
        AttentionCase{"tma_window200_page256", 8, 2, 128, 256, {{500, 900}, {3, 250}}, 200},
        AttentionCase{"tma_window129_page16", 8, 1, 128, 16, {{600, 1000}}, 129},
        AttentionCase{"page24_fallback_d128", 8, 2, 128, 24, {{100, 100}, {50, 77}}},
        AttentionCase{"tma_long_gqa4", 32, 8, 128, 16, {{2048, 3000}}},
        AttentionCase{
            "tma_in_order_gqa4", 8, 2, 128, 16, {{700, 1000}, {300, 300}, {1, 77}}, 0, true},
        AttentionCase{"tma_in_order_page8_window", 8, 1, 128, 8, {{600, 900}}, 250, true},
        AttentionCase{"tma_in_order_page64_mha", 4, 4, 128, 64, {{513, 513}}, 0, true}),
    [](const ::testing::TestParamInfo<AttentionCase>& info) { return info.param.name; });

// Decode on the cp.async-pipelined kernel: pages whose size is not a power of
// two (block-table division path), a page of one token, long contexts split
// over many blocks whose last tile is partial, and windows in such splits.
INSTANTIATE_TEST_SUITE_P(
    PipelinedDecode, CudaAttentionTest,
    ::testing::Values(
        AttentionCase{"decode_page24_gqa4_d128", 8, 2, 128, 24, Decodes({1, 23, 25, 3001})},
        AttentionCase{"decode_page1_mha_d64", 2, 2, 64, 1, Decodes({1, 2, 77})},
        AttentionCase{"decode_split_gqa8_d64", 16, 2, 64, 16, Decodes({9999, 1, 4113})},
        AttentionCase{"decode_window_gqa1_d128", 2, 2, 128, 16, Decodes({7000, 300, 2}), 1000}),
    [](const ::testing::TestParamInfo<AttentionCase>& info) { return info.param.name; });

}  // namespace
}  // namespace strata::cuda
