// The CUDA backend's copies between device rows and pinned host memory
// (engine::Backend::CopyRowsToHost / CopyRowsFromHost, cuda/copy_engine.h):
// bytes land where the RowCopy list says, copies follow the compute
// stream's earlier work, compute that follows ComputeAfterFence sees the
// copied rows, and fences report completion; both ways of moving rows to
// the device (the row copy kernel, the copy engines) land the same bytes.
// The bandwidth of swapping a 32k-token Llama-3-8B-shaped sequence's pages
// is timed against one contiguous cudaMemcpyAsync, for both (a disabled
// test, run explicitly).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "cuda/copy_engine.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

using engine::Backend;
using engine::DType;
using engine::RowCopy;
using engine::Tensor;

class CudaCopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto created = CreateCudaBackend(0);
    if (!created.ok()) GTEST_SKIP() << "no usable GPU: " << created.status();
    backend_ = std::move(*created);
  }
  Backend& b() { return *backend_; }
  std::unique_ptr<Backend> backend_;
};

TEST_F(CudaCopyTest, RowsLandWhereTheListSaysBothWays) {
  constexpr int kRows = 64, kWords = 1024;  // 4 KiB rows
  Tensor t = b().Allocate(DType::kI32, {kRows, kWords}).value();
  std::vector<int32_t> values(kRows * kWords);
  std::iota(values.begin(), values.end(), 7);
  STRATA_ASSERT_OK(b().CopyFromHost(values.data(), DType::kI32, values.size(), t, 0));
  STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(kRows * kWords * 4 + 64));
  // Row i goes to host slot perm[i]; rows 10..13 are adjacent both ways
  // (one merged copy).
  std::vector<int> perm(kRows);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.begin() + 10, std::mt19937(3));
  std::vector<RowCopy> rows;
  for (int i = 0; i < kRows; ++i) rows.push_back({0, i, int64_t{perm[i]} * kWords * 4 + 64});
  STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence out, b().CopyRowsToHost({&t, 1}, rows, host));
  STRATA_ASSERT_OK(b().WaitFence(out));
  STRATA_ASSERT_OK_AND_ASSIGN(const bool done, b().FenceDone(out));
  EXPECT_TRUE(done);
  for (int i = 0; i < kRows; ++i) {
    ASSERT_EQ(std::memcmp(host.data() + 64 + int64_t{perm[i]} * kWords * 4,
                          values.data() + int64_t{i} * kWords, kWords * 4),
              0)
        << "row " << i;
  }
  // Back into another tensor, reversed; compute that follows the fence sees it.
  for (size_t i = 0; i < kRows * kWords; ++i) reinterpret_cast<int32_t*>(host.data() + 64)[i] += 1;
  Tensor u = b().Allocate(DType::kI32, {kRows, kWords}).value();
  STRATA_ASSERT_OK(b().Fill(u, 0));
  std::vector<RowCopy> back;
  for (int i = 0; i < kRows; ++i) back.push_back({0, kRows - 1 - i, int64_t{i} * kWords * 4 + 64});
  STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence in, b().CopyRowsFromHost(host, back, {&u, 1}));
  STRATA_ASSERT_OK(b().ComputeAfterFence(in));
  std::vector<int32_t> got(kRows * kWords);
  STRATA_ASSERT_OK(b().CopyToHost(u, got.data()));  // on the compute stream
  for (int i = 0; i < kRows; ++i) {
    for (int w = 0; w < kWords; ++w) {
      const int32_t want =
          reinterpret_cast<const int32_t*>(host.data() + 64)[int64_t{i} * kWords + w];
      ASSERT_EQ(got[int64_t{kRows - 1 - i} * kWords + w], want) << "row " << i;
    }
  }
}

TEST_F(CudaCopyTest, CopiesFollowTheComputeStreamsEarlierWork) {
  // A large fill enqueued just before the copy: the copy must see it.
  constexpr int64_t kRows = 256, kWords = 1 << 16;  // 64 MiB
  Tensor t = b().Allocate(DType::kI32, {kRows, kWords}).value();
  STRATA_ASSERT_OK(b().Fill(t, 0));
  STRATA_ASSERT_OK(b().Synchronize());
  STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(kRows * kWords * 4));
  for (int round = 1; round <= 3; ++round) {
    STRATA_ASSERT_OK(b().Fill(t, static_cast<float>(round)));
    std::vector<RowCopy> rows;
    for (int64_t i = 0; i < kRows; ++i) rows.push_back({0, i, i * kWords * 4});
    STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence f, b().CopyRowsToHost({&t, 1}, rows, host));
    STRATA_ASSERT_OK(b().WaitFence(f));
    const int32_t* h = reinterpret_cast<const int32_t*>(host.data());
    for (int64_t i = 0; i < kRows * kWords; i += 4099) ASSERT_EQ(h[i], round) << "element " << i;
  }
}

TEST_F(CudaCopyTest, CopiesToTheDeviceLandAfterTheComputeStreamsEarlierWork) {
  // A large fill of the rows enqueued just before the copy back: the copy
  // must land after it, not under it.
  constexpr int64_t kRows = 256, kWords = 1 << 16;  // 64 MiB
  Tensor t = b().Allocate(DType::kI32, {kRows, kWords}).value();
  STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(kRows * kWords * 4));
  std::vector<int32_t> got(kRows * kWords);
  for (int round = 1; round <= 3; ++round) {
    auto* h = reinterpret_cast<int32_t*>(host.data());
    for (int64_t i = 0; i < kRows * kWords; ++i) h[i] = -round;
    STRATA_ASSERT_OK(b().Fill(t, static_cast<float>(round)));
    std::vector<RowCopy> rows;
    for (int64_t i = 0; i < kRows; ++i) rows.push_back({0, i, i * kWords * 4});
    STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence f, b().CopyRowsFromHost(host, rows, {&t, 1}));
    STRATA_ASSERT_OK(b().ComputeAfterFence(f));
    STRATA_ASSERT_OK(b().CopyToHost(t, got.data()));
    for (int64_t i = 0; i < kRows * kWords; i += 4099) ASSERT_EQ(got[i], -round) << "element " << i;
  }
}

TEST_F(CudaCopyTest, BothFromHostCopiersLandTheSameBytes) {
  // Rows of 16-byte words at aligned offsets (the kernel's wide path), and
  // rows of 4004 bytes at offsets that are not (its byte path); rows 5..8
  // adjacent both ways (one merged piece).
  for (const int words : {1024, 1001}) {
    constexpr int kRows = 48;
    const int64_t row_bytes = int64_t{words} * 4;
    STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(kRows * row_bytes + 64));
    auto* h = reinterpret_cast<int32_t*>(host.data() + 4);
    for (int64_t i = 0; i < kRows * words; ++i) h[i] = static_cast<int32_t>(i * 2654435761u);
    std::vector<int> perm(kRows);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin() + 9, perm.end(), std::mt19937(5));
    std::vector<RowCopy> rows;
    for (int i = 0; i < kRows; ++i) rows.push_back({0, perm[i], 4 + int64_t{i} * row_bytes});
    for (const auto copier :
         {CopyEngine::FromHostCopier::kKernel, CopyEngine::FromHostCopier::kCopyEngines}) {
      STRATA_ASSERT_OK_AND_ASSIGN(CopyEngine engine, CopyEngine::Create());
      engine.SetFromHostCopier(copier, /*ctas=*/5);  // fewer CTAs than pieces: they stride
      Tensor t = b().Allocate(DType::kI32, {kRows, words}).value();
      STRATA_ASSERT_OK(b().Fill(t, 0));
      STRATA_ASSERT_OK(b().Synchronize());
      STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence f,
                                  engine.CopyRows({&t, 1}, rows, host, /*to_host=*/false, nullptr));
      STRATA_ASSERT_OK(engine.WaitFence(f));
      std::vector<int32_t> got(int64_t{kRows} * words);
      STRATA_ASSERT_OK(b().CopyToHost(t, got.data()));
      for (int i = 0; i < kRows; ++i) {
        ASSERT_EQ(
            std::memcmp(got.data() + int64_t{perm[i]} * words, h + int64_t{i} * words, row_bytes),
            0)
            << "row " << i << ", " << words << " words, "
            << (copier == CopyEngine::FromHostCopier::kKernel ? "kernel" : "copy engines");
      }
      STRATA_ASSERT_OK(engine.WaitAll());
    }
  }
}

TEST_F(CudaCopyTest, BadListsAndFencesAreRefused) {
  Tensor t = b().Allocate(DType::kI32, {4, 16}).value();
  STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(256));
  const RowCopy past_host{0, 0, 250};
  EXPECT_TRUE(absl::IsInvalidArgument(b().CopyRowsToHost({&t, 1}, {&past_host, 1}, host).status()));
  const RowCopy past_rows{0, 4, 0};
  EXPECT_TRUE(absl::IsInvalidArgument(b().CopyRowsToHost({&t, 1}, {&past_rows, 1}, host).status()));
  const RowCopy no_tensor{1, 0, 0};
  EXPECT_TRUE(
      absl::IsInvalidArgument(b().CopyRowsFromHost(host, {&no_tensor, 1}, {&t, 1}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(b().FenceDone(1 << 30).status()));
  STRATA_ASSERT_OK_AND_ASSIGN(const bool done, b().FenceDone(engine::kFenceDone));
  EXPECT_TRUE(done);
}

TEST_F(CudaCopyTest, RowChecksumsAreThoseOfTheBytesJustCopiedUp) {
  // Two tensors of different row sizes (32 KiB and an odd 100 bytes); the
  // checksums are asked for right after the copy, without waiting for it.
  constexpr int kRows = 512, kBigWords = 8192, kSmallWords = 25;
  Tensor big = b().Allocate(DType::kI32, {kRows, kBigWords}).value();
  Tensor small = b().Allocate(DType::kI32, {kRows, kSmallWords}).value();
  STRATA_ASSERT_OK(b().Fill(big, 0));
  STRATA_ASSERT_OK(b().Fill(small, 0));
  const int64_t big_bytes = kBigWords * 4, small_bytes = kSmallWords * 4;
  const int64_t total = kRows * (big_bytes + small_bytes);
  STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(total));
  std::mt19937 rng(5);
  for (int64_t i = 0; i < total; ++i) host.data()[i] = static_cast<uint8_t>(rng());
  std::vector<RowCopy> rows;
  std::vector<uint32_t> want;
  int64_t offset = 0;
  for (int i = 0; i < kRows; ++i) {
    const bool is_big = i % 3 != 0;
    const int64_t bytes = is_big ? big_bytes : small_bytes;
    rows.push_back({is_big ? 0 : 1, kRows - 1 - i, offset});
    want.push_back(Crc32c(host.data() + offset, static_cast<size_t>(bytes)));
    offset += bytes;
  }
  const std::vector<Tensor> tensors = {big, small};
  STRATA_ASSERT_OK(b().CopyRowsFromHost(host, rows, tensors).status());
  std::vector<uint32_t> got(rows.size());
  STRATA_ASSERT_OK(b().ChecksumRows(tensors, rows, got));
  EXPECT_EQ(got, want);
  // One flipped bit on the device changes its row's CRC alone.
  const uint8_t flipped = host.data()[rows[4].host_offset + 1000] ^ 0x10;
  const int32_t word = [&] {
    int32_t w;
    std::memcpy(&w, host.data() + rows[4].host_offset + 1000, 4);
    std::memcpy(reinterpret_cast<uint8_t*>(&w), &flipped, 1);
    return w;
  }();
  STRATA_ASSERT_OK(b().CopyFromHost(&word, DType::kI32, 1, big, rows[4].row * kBigWords + 250));
  STRATA_ASSERT_OK(b().Synchronize());
  STRATA_ASSERT_OK(b().ChecksumRows(tensors, rows, got));
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(got[i] != want[i], i == 4) << "row " << i;
  }
  // Bad lists are refused.
  EXPECT_TRUE(absl::IsInvalidArgument(
      b().ChecksumRows(tensors, rows, std::span<uint32_t>(got.data(), got.size() - 1))));
  const RowCopy past_rows{0, kRows, 0};
  uint32_t one = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(b().ChecksumRows(tensors, {&past_rows, 1}, {&one, 1})));
}

// Pages coded for the wire on the GPU (EncodeBlocksToHost) are the CPU
// codec's bytes of the same rows, and decode (DecodeBlocksFromHost) back
// into the right page rows only, as the CPU codec decodes them.
TEST_F(CudaCopyTest, CodedPageBlocksAreTheCpuCodecsBothWays) {
  constexpr int kPages = 5, kPageSize = 16, kHeads = 2, kHeadDim = 128;
  std::vector<Tensor> k, v, k_out, v_out;
  for (int l = 0; l < 2; ++l) {
    for (auto* list : {&k, &v, &k_out, &v_out}) {
      Tensor t = b().Allocate(DType::kBF16, {kPages, kPageSize, kHeads, kHeadDim}).value();
      if (list == &k || list == &v) {
        STRATA_ASSERT_OK(b().FillRandom(t, 11 + 2 * l + (list == &v), 2.0f));
      } else {
        STRATA_ASSERT_OK(b().Fill(t, 0));
      }
      list->push_back(t);
    }
  }
  const int64_t page_bytes = int64_t{kPageSize} * kHeads * kHeadDim * 2;
  // Every page of both layers, raw, to read rows on the host.
  auto rows_of = [&](const std::vector<Tensor>& caches) {
    std::vector<Tensor> both;
    both.insert(both.end(), caches.begin(), caches.end());
    engine::HostBuffer raw = b().AllocateHost(both.size() * kPages * page_bytes).value();
    std::vector<RowCopy> rows;
    for (int t = 0; t < static_cast<int>(both.size()); ++t) {
      for (int p = 0; p < kPages; ++p)
        rows.push_back({t, p, (int64_t{t} * kPages + p) * page_bytes});
    }
    const engine::CopyFence f = b().CopyRowsToHost(both, rows, raw).value();
    EXPECT_TRUE(b().WaitFence(f).ok());
    return raw;
  };
  // The bf16 rows [tokens, head_dim] of one head of a page, from a raw dump.
  auto head_rows = [&](const engine::HostBuffer& raw, int cache, int page, int head, int tokens) {
    std::vector<uint8_t> out(size_t(tokens) * kHeadDim * 2);
    for (int t = 0; t < tokens; ++t) {
      std::memcpy(out.data() + size_t(t) * kHeadDim * 2,
                  raw.data() + (int64_t{cache} * kPages + page) * page_bytes +
                      (int64_t{t} * kHeads + head) * kHeadDim * 2,
                  kHeadDim * 2);
    }
    return out;
  };
  const engine::HostBuffer k_raw = rows_of(k), v_raw = rows_of(v);
  for (engine::KvCodecKind codec : {engine::KvCodecKind::kBf16, engine::KvCodecKind::kInt8,
                                    engine::KvCodecKind::kFp8E4M3, engine::KvCodecKind::kInt4}) {
    SCOPED_TRACE(static_cast<int>(codec));
    auto coder = engine::KvCodec::Create(codec).value();
    std::vector<engine::KvBlockCopy> blocks;
    int64_t at = 0;
    for (const auto& [page, tokens] : {std::pair{4, 9}, std::pair{0, 16}}) {
      for (int l = 0; l < 2; ++l) {
        for (int h = 0; h < kHeads; ++h) {
          const auto bytes =
              static_cast<int64_t>(coder->EncodedBytes(tokens, kHeadDim, DType::kBF16));
          blocks.push_back({l, page, h, tokens, at, bytes});
          at += bytes;
        }
      }
    }
    engine::HostBuffer host = b().AllocateHost(at).value();
    STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence f,
                                b().EncodeBlocksToHost(codec, k, v, blocks, host));
    STRATA_ASSERT_OK(b().WaitFence(f));
    for (const engine::KvBlockCopy& blk : blocks) {
      const std::vector<uint8_t> kr = head_rows(k_raw, blk.layer, blk.page, blk.head, blk.tokens);
      const std::vector<uint8_t> vr = head_rows(v_raw, blk.layer, blk.page, blk.head, blk.tokens);
      std::vector<uint8_t> want(static_cast<size_t>(blk.bytes));
      STRATA_ASSERT_OK(
          coder->Encode(kr.data(), vr.data(), DType::kBF16, blk.tokens, kHeadDim, want));
      ASSERT_EQ(std::memcmp(want.data(), host.data() + blk.host_offset, want.size()), 0)
          << "layer " << blk.layer << " page " << blk.page << " head " << blk.head;
    }
    for (const auto& caches : {&k_out, &v_out}) {
      for (const Tensor& t : *caches) STRATA_ASSERT_OK(b().Fill(const_cast<Tensor&>(t), 0));
    }
    STRATA_ASSERT_OK(b().DecodeBlocksFromHost(host, blocks, k_out, v_out));
    const engine::HostBuffer k_got = rows_of(k_out), v_got = rows_of(v_out);
    for (const engine::KvBlockCopy& blk : blocks) {
      std::vector<uint8_t> kd(size_t(blk.tokens) * kHeadDim * 2), vd(kd.size());
      STRATA_ASSERT_OK(engine::KvCodec::Decode(
          std::span<const uint8_t>(host.data() + blk.host_offset, size_t(blk.bytes)), DType::kBF16,
          kd.data(), vd.data(), nullptr));
      ASSERT_EQ(head_rows(k_got, blk.layer, blk.page, blk.head, blk.tokens), kd);
      ASSERT_EQ(head_rows(v_got, blk.layer, blk.page, blk.head, blk.tokens), vd);
    }
    // Rows outside the blocks stay zero: page 4 past token 9, pages 1-3.
    for (int l = 0; l < 2; ++l) {
      for (int p = 1; p < kPages; ++p) {
        const uint8_t* row = k_got.data() + (int64_t{l} * kPages + p) * page_bytes;
        const int64_t from = p == 4 ? int64_t{9} * kHeads * kHeadDim * 2 : 0;
        for (int64_t i = from; i < page_bytes; ++i) ASSERT_EQ(row[i], 0) << "page " << p;
      }
    }
    // A damaged block: DataLoss naming it.
    host.data()[blocks[3].host_offset + blocks[3].bytes - 7] ^= 0x21;
    const absl::Status bad = b().DecodeBlocksFromHost(host, blocks, k_out, v_out);
    EXPECT_TRUE(absl::IsDataLoss(bad)) << bad;
    EXPECT_NE(bad.message().find("block 3"), std::string::npos) << bad;
  }
}

// Swapping one 32k-token sequence of Llama-3-8B's shape (32 layers x K and V
// pages of 16 tokens x 8 heads x 128, bf16: 32 KiB rows, 4 GiB in all) out
// and back, against one contiguous cudaMemcpyAsync of the same bytes.
TEST_F(CudaCopyTest, DISABLED_SwapBandwidth) {
  constexpr int kLayers = 32, kPages = 2048, kRowWords = 32 * 1024 / 4;
  std::vector<Tensor> caches;
  for (int t = 0; t < 2 * kLayers; ++t) {
    caches.push_back(b().Allocate(DType::kI32, {kPages, kRowWords}).value());
  }
  const int64_t row_bytes = kRowWords * 4, total = int64_t{2} * kLayers * kPages * row_bytes;
  STRATA_ASSERT_OK_AND_ASSIGN(engine::HostBuffer host, b().AllocateHost(total));
  std::vector<RowCopy> rows;
  std::vector<int> pages(kPages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), std::mt19937(1));  // pages scattered, as a pool's
  for (int p = 0; p < kPages; ++p) {
    for (int t = 0; t < 2 * kLayers; ++t) {
      rows.push_back({t, pages[p], (int64_t{p} * 2 * kLayers + t) * row_bytes});
    }
  }
  auto seconds = [](auto start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  for (int round = 0; round < 3; ++round) {
    auto start = std::chrono::steady_clock::now();
    STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence out, b().CopyRowsToHost(caches, rows, host));
    STRATA_ASSERT_OK(b().WaitFence(out));
    const double out_s = seconds(start);
    start = std::chrono::steady_clock::now();
    STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence in, b().CopyRowsFromHost(host, rows, caches));
    STRATA_ASSERT_OK(b().WaitFence(in));
    const double in_s = seconds(start);
    // The same copy by each copier of a CopyEngine of its own: the copy
    // engines, and the kernel at several CTA counts.
    std::string by_copier;
    for (const int ctas : {0, 16, 32, 64, 132, 264}) {
      STRATA_ASSERT_OK_AND_ASSIGN(CopyEngine engine, CopyEngine::Create());
      engine.SetFromHostCopier(ctas == 0 ? CopyEngine::FromHostCopier::kCopyEngines
                                         : CopyEngine::FromHostCopier::kKernel,
                               std::max(ctas, 1));
      start = std::chrono::steady_clock::now();
      STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence f,
                                  engine.CopyRows(caches, rows, host, /*to_host=*/false, nullptr));
      const double enqueue_s = seconds(start);
      STRATA_ASSERT_OK(engine.WaitFence(f));
      const double s = seconds(start);
      by_copier += ctas == 0 ? std::string(" copy engines") : " kernel " + std::to_string(ctas);
      char line[96];
      std::snprintf(line, sizeof(line), " %.1f GB/s (enqueue %.1f ms);", total / s / 1e9,
                    enqueue_s * 1e3);
      by_copier += line;
    }
    // The copied rows' checksums on the device (KvBlockManager checks a
    // loaded prefix with them).
    std::vector<uint32_t> crcs(rows.size());
    start = std::chrono::steady_clock::now();
    STRATA_ASSERT_OK(b().ChecksumRows(caches, rows, crcs));
    const double crc_s = seconds(start);
    // One contiguous copy of the same bytes each way (from one cache
    // tensor, repeated: 2 x layers x pages x 32 KiB).
    void* device = nullptr;
    ASSERT_EQ(cudaMalloc(&device, total / 8), cudaSuccess);
    start = std::chrono::steady_clock::now();
    for (int k = 0; k < 8; ++k) {
      ASSERT_EQ(
          cudaMemcpy(host.data() + k * (total / 8), device, total / 8, cudaMemcpyDeviceToHost),
          cudaSuccess);
    }
    const double d2h_s = seconds(start);
    start = std::chrono::steady_clock::now();
    for (int k = 0; k < 8; ++k) {
      ASSERT_EQ(
          cudaMemcpy(device, host.data() + k * (total / 8), total / 8, cudaMemcpyHostToDevice),
          cudaSuccess);
    }
    const double h2d_s = seconds(start);
    cudaFree(device);
    std::printf(
        "swap_bandwidth %.2f GiB in %zu rows of 32 KiB: out %.1f GB/s (contiguous %.1f, ratio "
        "%.2f), in %.1f GB/s (contiguous %.1f, ratio %.2f), device CRC32C %.1f GB/s; in by "
        "copier:%s\n",
        total / 1073741824.0, rows.size(), total / out_s / 1e9, total / d2h_s / 1e9, d2h_s / out_s,
        total / in_s / 1e9, total / h2d_s / 1e9, h2d_s / in_s, total / crc_s / 1e9,
        by_copier.c_str());
  }
}

}  // namespace
}  // namespace strata::cuda
