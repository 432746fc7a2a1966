// Rough timings of the CUDA backend's heavy operators at Llama-3-8B-like
// shapes. Disabled by default (they check nothing); run with
//   strata_cuda_tests --gtest_also_run_disabled_tests --gtest_filter=*Bench*
// Each figure is the wall time per call averaged over back-to-back calls
// followed by one Synchronize, so launch overhead is included.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cuda/cuda_backend.h"
#include "engine/backend.h"
#include "gtest/gtest.h"

namespace strata::cuda {
namespace {

using engine::AttentionBatch;
using engine::Backend;
using engine::DType;
using engine::QkvLayout;
using engine::Tensor;

class CudaBackendBench : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateCudaBackend(0);
    if (!b.ok()) {
      if (absl::IsUnavailable(b.status())) GTEST_SKIP() << b.status();
      FAIL() << b.status();
    }
    backend_ = std::move(b).value();
  }

  Tensor Random(std::vector<int64_t> shape, float scale = 1.0f) {
    absl::StatusOr<Tensor> t = backend_->Allocate(DType::kBF16, std::move(shape));
    EXPECT_TRUE(t.ok()) << t.status();
    EXPECT_TRUE(backend_->FillRandom(*t, next_seed_++, scale).ok());
    return *t;
  }
  Tensor Ints(std::vector<int64_t> shape, const std::vector<int32_t>& v) {
    absl::StatusOr<Tensor> t = backend_->Allocate(DType::kI32, std::move(shape));
    EXPECT_TRUE(t.ok()) << t.status();
    EXPECT_TRUE(backend_->CopyFromHost(v.data(), DType::kI32, t->numel(), *t, 0).ok());
    return *t;
  }

  // Returns microseconds per call.
  double Time(const std::function<absl::Status()>& op, int iters = 20) {
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(op().ok());
    EXPECT_TRUE(backend_->Synchronize().ok());
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) {
      const absl::Status s = op();
      EXPECT_TRUE(s.ok()) << s;
    }
    EXPECT_TRUE(backend_->Synchronize().ok());
    const auto end = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::micro>(end - start).count() / iters;
  }

  // Times attention for `num_seqs` sequences of (q_len, context) each.
  void BenchAttention(const char* label, int num_seqs, int q_len, int context, int window = 0,
                      int q_heads = 32, int kv_heads = 8, int head_dim = 128) {
    const QkvLayout layout{q_heads, kv_heads, head_dim};
    const int page_size = 16;
    const int blocks = (context + page_size - 1) / page_size;
    const int num_pages = num_seqs * blocks;
    std::vector<int32_t> table(int64_t{num_seqs} * blocks);
    std::iota(table.begin(), table.end(), 0);
    std::vector<int32_t> qs(num_seqs + 1);
    std::vector<int32_t> ctx(num_seqs, context);
    for (int s = 0; s <= num_seqs; ++s) qs[s] = s * q_len;
    const int64_t tokens = int64_t{num_seqs} * q_len;
    Tensor qkv = Random({tokens, layout.row_width()});
    Tensor k = Random({num_pages, page_size, kv_heads, head_dim});
    Tensor v = Random({num_pages, page_size, kv_heads, head_dim});
    Tensor out = Random({tokens, int64_t{q_heads} * head_dim});
    AttentionBatch batch;
    batch.query_start = Ints({num_seqs + 1}, qs);
    batch.context_len = Ints({num_seqs}, ctx);
    batch.block_table = Ints({num_seqs, blocks}, table);
    batch.num_seqs = num_seqs;
    batch.max_blocks_per_seq = blocks;
    batch.max_query_len = q_len;
    batch.max_context_len = context;
    batch.page_size = page_size;
    batch.host_query_start = qs;
    batch.host_context_len = ctx;
    const double us =
        Time([&] { return backend_->Attention(qkv, layout, k, v, batch, 0.088f, window, out); });
    // Bytes of K and V read at least once.
    const double kv_bytes =
        2.0 * num_seqs * std::min(context, window > 0 ? window : context) * kv_heads * head_dim * 2;
    std::printf("[bench] attention %-28s %9.1f us  (%.0f GB/s of KV)\n", label, us,
                kv_bytes / us / 1e3);
  }

  std::unique_ptr<Backend> backend_;
  uint64_t next_seed_ = 1;
};

TEST_F(CudaBackendBench, DISABLED_Attention) {
  BenchAttention("decode 1 x 32k", 1, 1, 32768);
  BenchAttention("decode 16 x 32k", 16, 1, 32768);
  BenchAttention("decode 16 x 32k GQA1 (8/8)", 16, 1, 32768, 0, 8, 8, 128);
  BenchAttention("decode 16 x 32k GQA8 (64/8)", 16, 1, 32768, 0, 64, 8, 128);
  BenchAttention("decode 16 x 32k d64", 16, 1, 32768, 0, 32, 8, 64);
  BenchAttention("decode 64 x 2k d64", 64, 1, 2048, 0, 32, 8, 64);
  BenchAttention("decode 8 x 4k", 8, 1, 4096);
  BenchAttention("decode 64 x 2k", 64, 1, 2048);
  BenchAttention("decode 256 x 1k", 256, 1, 1024);
  BenchAttention("prefill 1 x 2048", 1, 2048, 2048);
  BenchAttention("prefill chunk 512 @ 8k", 1, 512, 8192);
  BenchAttention("prefill 4 x 512", 4, 512, 512);
}

TEST_F(CudaBackendBench, DISABLED_Linear) {
  struct Shape {
    int64_t t, k, n;
  };
  for (const Shape& s : {Shape{1, 4096, 6144}, Shape{1, 4096, 28672}, Shape{64, 4096, 6144},
                         Shape{2048, 4096, 6144}, Shape{2048, 14336, 4096}}) {
    Tensor x = Random({s.t, s.k});
    Tensor w = Random({s.n, s.k}, 0.02f);
    Tensor out = Random({s.t, s.n});
    const double us = Time([&] { return backend_->Linear(x, w, Tensor(), out); });
    std::printf("[bench] linear T=%-5lld K=%-6lld N=%-6lld %9.1f us  %7.1f TFLOP/s  %7.0f GB/s\n",
                static_cast<long long>(s.t), static_cast<long long>(s.k),
                static_cast<long long>(s.n), us, 2.0 * s.t * s.k * s.n / us / 1e6,
                2.0 * (s.n * s.k + s.t * s.k + s.t * s.n) / us / 1e3);
  }
}

TEST_F(CudaBackendBench, DISABLED_Elementwise) {
  const QkvLayout layout{32, 8, 128};
  const int64_t t = 2048;
  Tensor x = Random({t, 4096});
  Tensor res = Random({t, 4096});
  Tensor w = Random({4096});
  Tensor out = Random({t, 4096});
  Tensor gate_up = Random({t, 2 * 14336});
  Tensor act = Random({t, 14336});
  Tensor qkv = Random({t, layout.row_width()});
  std::vector<int32_t> pos(t);
  std::iota(pos.begin(), pos.end(), 0);
  Tensor positions = Ints({t}, pos);
  absl::StatusOr<Tensor> inv_freq = backend_->Allocate(DType::kF32, {64});
  ASSERT_TRUE(inv_freq.ok());
  ASSERT_TRUE(backend_->FillRandom(*inv_freq, 3, 1.0f).ok());
  std::printf("[bench] rmsnorm 2048x4096        %9.1f us\n",
              Time([&] { return backend_->RmsNorm(x, w, 1e-5f, out); }));
  std::printf("[bench] add_rmsnorm 2048x4096    %9.1f us\n",
              Time([&] { return backend_->AddRmsNorm(res, x, w, 1e-5f, out); }));
  std::printf("[bench] silu_mul 2048x14336      %9.1f us\n",
              Time([&] { return backend_->SiluMul(gate_up, act); }));
  std::printf("[bench] rope 2048 tokens         %9.1f us\n",
              Time([&] { return backend_->Rope(qkv, layout, positions, *inv_freq); }));
}

}  // namespace
}  // namespace strata::cuda
