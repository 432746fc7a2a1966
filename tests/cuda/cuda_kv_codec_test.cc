// The KV block codecs on the GPU (cuda/kernels/kv_codec.h) against the CPU
// codec (engine/kv_codec.h): blocks encoded from a paged cache must be the
// CPU's bytes exactly, decoded values its bits exactly, and a damaged block
// must be refused without a single output element written.
//
// Caches hold random values with outlier channels, tiny channels (fp16
// subnormal scales), an all-zero channel (scale 0) and loud tokens, in
// scattered pages; blocks start at arbitrary logical tokens and are placed
// at 16-byte aligned and unaligned offsets. Seeds are fresh per run
// (printed in failures; STRATA_TEST_SEED replays one).
//
// The GPU tests skip when there is no usable GPU; KvBlockBytes's test runs
// everywhere.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "cuda/kernels/kv_codec.h"
#include "engine/kv_codec.h"
#include "engine/kv_codec_math.h"
#include "engine/tensor.h"
#include "gtest/gtest.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

namespace cm = engine::kv_codec_math;
using engine::DType;
using engine::KvCodec;
using engine::KvCodecKind;
using kernels::Crc32cJob;
using kernels::DecodeKvBlocksParams;
using kernels::DecodeKvJob;
using kernels::EncodeKvBlocksParams;
using kernels::EncodeKvJob;
using kernels::KvBlockError;

constexpr KvCodecKind kAllCodecs[] = {KvCodecKind::kBf16, KvCodecKind::kFp8E4M3, KvCodecKind::kInt8,
                                      KvCodecKind::kInt4};
constexpr uint8_t kSentinel = 0xa5;

#define STRATA_CUDA_RETURN_IF_ERROR_(expr)                                                         \
  do {                                                                                             \
    const cudaError_t strata_cuda_err_ = (expr);                                                   \
    if (strata_cuda_err_ != cudaSuccess) {                                                         \
      return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(strata_cuda_err_))); \
    }                                                                                              \
  } while (0)

#define STRATA_ASSERT_CUDA_(expr)                                 \
  do {                                                            \
    const cudaError_t strata_cuda_err_ = (expr);                  \
    ASSERT_EQ(strata_cuda_err_, cudaSuccess)                      \
        << #expr << ": " << cudaGetErrorString(strata_cuda_err_); \
  } while (0)

struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};
template <typename T>
using DevicePtr = std::unique_ptr<T, CudaFree>;

// n elements of device memory (at least one), or null.
template <typename T>
DevicePtr<T> DeviceAlloc(size_t n) {
  void* p = nullptr;
  if (cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) return nullptr;
  return DevicePtr<T>(static_cast<T*>(p));
}

template <typename T>
absl::StatusOr<DevicePtr<T>> ToDevice(const std::vector<T>& host) {
  DevicePtr<T> d = DeviceAlloc<T>(host.size());
  if (d == nullptr) return absl::ResourceExhaustedError("cudaMalloc failed");
  STRATA_CUDA_RETURN_IF_ERROR_(
      cudaMemcpy(d.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
absl::StatusOr<std::vector<T>> ToHost(const T* device, size_t n) {
  std::vector<T> host(n);
  STRATA_CUDA_RETURN_IF_ERROR_(
      cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// Debian's abseil takes its own string_view, not std's.
std::string CodecName(KvCodecKind codec) { return std::string(engine::KvCodecKindName(codec)); }

size_t RoundUp16(size_t n) { return (n + 15) & ~size_t{15}; }

// Index of the first differing byte, or -1.
int64_t FirstDiff(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

// A paged KV cache [num_pages, page_size, heads, d] on the host and the GPU,
// bf16 or fp8 e4m3, with block_table rows of shuffled pages.
struct PagedCache {
  int d = 0;
  bool fp8 = false;
  int heads = 2;
  int page_size = 16;
  int seqs = 2;
  int max_blocks = 12;         // per sequence: 192 tokens
  std::vector<int32_t> table;  // [seqs, max_blocks]
  std::vector<uint8_t> k, v;   // raw element bytes
  DevicePtr<uint8_t> dk, dv;
  DevicePtr<int32_t> dtable;

  size_t esize() const { return fp8 ? 1 : 2; }
  DType dtype() const { return fp8 ? DType::kF8E4M3 : DType::kBF16; }
  int tokens_per_seq() const { return max_blocks * page_size; }

  // The raw bytes of rows [first, first + n) of head h of sequence `row`,
  // [n, d] row-major: what the CPU codec encodes.
  std::vector<uint8_t> Gather(const std::vector<uint8_t>& cache, int row, int h, int first,
                              int n) const {
    std::vector<uint8_t> out(size_t{1} * n * d * esize());
    const size_t row_bytes = size_t{1} * d * esize();
    for (int r = 0; r < n; ++r) {
      const int i = first + r;
      const int64_t slot =
          int64_t{table[size_t{1} * row * max_blocks + i / page_size]} * page_size + i % page_size;
      std::memcpy(out.data() + r * row_bytes,
                  cache.data() + (static_cast<size_t>(slot) * heads + h) * row_bytes, row_bytes);
    }
    return out;
  }
};

// One encoded block: where it lies and what the CPU made of the same rows.
struct EncodedBlock {
  EncodeKvJob job;
  std::vector<uint8_t> cpu;  // engine::KvCodec::Encode's bytes
};

class CudaKvCodecTest : public testing_util::CudaVsCpuTest {
 protected:
  // Random values with the shapes that stress the codecs: outlier channels
  // (x40), tiny channels (x1e-6: fp16-subnormal scales), an all-zero channel,
  // loud tokens (x20), exact zeros; with `nonfinite`, a few NaN, values
  // beyond fp16's range (+-1e30: infinite scales and zero points) and, with
  // `inf` too, +-inf.
  //
  // Infinities are kept out of K: a key group whose values are all the same
  // infinity (any inf in a 1-token block) gets scale fp16(inf - inf), and the
  // sign of that NaN is the host's (x86's default NaN is negative: 0xfe00;
  // the GPU's, and aarch64's, positive: 0x7e00), so such blocks differ in
  // that scale's sign bit (both decode to NaN).
  std::vector<float> Values(size_t rows, int d, bool nonfinite, bool inf) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> pick(0, 999);
    std::vector<float> out(rows * d);
    for (size_t r = 0; r < rows; ++r) {
      const float row_scale = pick(rng_) < 30 ? 20.0f : 1.0f;
      for (int c = 0; c < d; ++c) {
        float x = normal(rng_) * row_scale;
        if (c % 13 == 5) x *= 40.0f;
        if (c % 17 == 3) x *= 1e-6f;
        if (c == 1 || pick(rng_) < 20) x = 0.0f;
        if (nonfinite) {
          const int p = pick(rng_);
          if (p == 0) x = std::numeric_limits<float>::quiet_NaN();
          if (p == 1) x = 1e30f;
          if (p == 2) x = -1e30f;
          if (inf && p == 3) x = std::numeric_limits<float>::infinity();
          if (inf && p == 4) x = -std::numeric_limits<float>::infinity();
        }
        out[r * d + c] = x;
      }
    }
    return out;
  }

  absl::StatusOr<PagedCache> MakeCache(int d, bool fp8, bool nonfinite = false) {
    PagedCache c;
    c.d = d;
    c.fp8 = fp8;
    const int num_pages = c.seqs * c.max_blocks + 3;
    std::vector<int32_t> pages(num_pages);
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), rng_);
    c.table.assign(pages.begin(), pages.begin() + c.seqs * c.max_blocks);
    const size_t rows = size_t{1} * num_pages * c.page_size * c.heads;
    for (std::vector<uint8_t>* cache : {&c.k, &c.v}) {
      const std::vector<float> values = Values(rows, d, nonfinite, cache == &c.v);
      cache->resize(values.size() * c.esize());
      for (size_t i = 0; i < values.size(); ++i) {
        if (fp8) {
          (*cache)[i] = cm::FloatToFp8E4M3(values[i]);
        } else {
          const uint16_t b = cm::FloatToBf16Bits(values[i]);
          std::memcpy(cache->data() + 2 * i, &b, 2);
        }
      }
    }
    absl::StatusOr<DevicePtr<uint8_t>> dk = ToDevice(c.k);
    if (!dk.ok()) return dk.status();
    c.dk = std::move(dk).value();
    absl::StatusOr<DevicePtr<uint8_t>> dv = ToDevice(c.v);
    if (!dv.ok()) return dv.status();
    c.dv = std::move(dv).value();
    absl::StatusOr<DevicePtr<int32_t>> dt = ToDevice(c.table);
    if (!dt.ok()) return dt.status();
    c.dtable = std::move(dt).value();
    return c;
  }

  // Jobs for every token count x head, at random starts, packed from offset
  // 0 with every fourth block 3 bytes off 16-byte alignment; the CPU's
  // encoding of each. *total: the bytes the jobs span, plus 32.
  absl::StatusOr<std::vector<EncodedBlock>> PlanBlocks(const PagedCache& c, KvCodecKind codec,
                                                       const std::vector<int>& token_counts,
                                                       size_t* total) {
    absl::StatusOr<std::unique_ptr<KvCodec>> cpu = KvCodec::Create(codec);
    if (!cpu.ok()) return cpu.status();
    std::vector<EncodedBlock> blocks;
    size_t at = 0;
    for (int tokens : token_counts) {
      for (int h = 0; h < c.heads; ++h) {
        EncodedBlock b;
        b.job.table_row = static_cast<int32_t>(blocks.size() % c.seqs);
        b.job.head = h;
        b.job.first_logical =
            std::uniform_int_distribution<int>(0, c.tokens_per_seq() - tokens)(rng_);
        b.job.tokens = tokens;
        const size_t bytes = (*cpu)->EncodedBytes(tokens, c.d, c.dtype());
        if (bytes != kernels::KvBlockBytes(codec, tokens, c.d, static_cast<int>(c.esize()))) {
          return absl::InternalError("KvBlockBytes disagrees with KvCodec::EncodedBytes");
        }
        const size_t offset = blocks.size() % 4 == 3 ? at + 3 : at;
        b.job.out_offset = static_cast<int64_t>(offset);
        at = RoundUp16(offset + bytes);
        b.cpu.resize(bytes);
        const std::vector<uint8_t> k =
            c.Gather(c.k, b.job.table_row, h, b.job.first_logical, tokens);
        const std::vector<uint8_t> v =
            c.Gather(c.v, b.job.table_row, h, b.job.first_logical, tokens);
        absl::Status s = (*cpu)->Encode(k.data(), v.data(), c.dtype(), tokens, c.d, b.cpu);
        if (!s.ok()) return s;
        blocks.push_back(std::move(b));
      }
    }
    // Slack at the end: decode capacities reach past some blocks.
    *total = at + 32;
    return blocks;
  }

  // Encodes `blocks` on the GPU into out (device or mapped host memory);
  // returns the per-job status.
  absl::StatusOr<std::vector<int32_t>> EncodeOnGpu(const PagedCache& c, KvCodecKind codec,
                                                   const std::vector<EncodedBlock>& blocks,
                                                   uint8_t* out) {
    std::vector<EncodeKvJob> jobs;
    for (const EncodedBlock& b : blocks) jobs.push_back(b.job);
    absl::StatusOr<DevicePtr<EncodeKvJob>> djobs = ToDevice(jobs);
    if (!djobs.ok()) return djobs.status();
    DevicePtr<int32_t> status = DeviceAlloc<int32_t>(jobs.size());
    if (status == nullptr) return absl::ResourceExhaustedError("cudaMalloc failed");
    EncodeKvBlocksParams p;
    p.codec = codec;
    p.k_cache = c.dk.get();
    p.v_cache = c.dv.get();
    p.kv_fp8 = c.fp8;
    p.block_table = c.dtable.get();
    p.max_blocks_per_seq = c.max_blocks;
    p.page_size = c.page_size;
    p.num_kv_heads = c.heads;
    p.head_dim = c.d;
    p.jobs = djobs->get();
    p.num_jobs = static_cast<int>(jobs.size());
    p.max_tokens = 0;
    for (const EncodeKvJob& j : jobs) p.max_tokens = std::max(p.max_tokens, j.tokens);
    p.out_base = out;
    p.status = status.get();
    STRATA_CUDA_RETURN_IF_ERROR_(kernels::LaunchEncodeKvBlocks(p, nullptr));
    STRATA_CUDA_RETURN_IF_ERROR_(cudaDeviceSynchronize());
    return ToHost(status.get(), jobs.size());
  }

  struct Decoded {
    std::vector<int32_t> status;
    std::vector<uint8_t> k, v;  // [out_rows, head_dim] elements' bytes
  };

  // Decodes jobs from `in` (device or mapped host memory) into outputs
  // pre-filled with kSentinel bytes.
  absl::StatusOr<Decoded> DecodeOnGpu(const uint8_t* in, const std::vector<DecodeKvJob>& jobs,
                                      int head_dim, bool out_fp8, int64_t out_rows) {
    const size_t out_bytes = static_cast<size_t>(out_rows) * head_dim * (out_fp8 ? 1 : 2);
    absl::StatusOr<DevicePtr<DecodeKvJob>> djobs = ToDevice(jobs);
    if (!djobs.ok()) return djobs.status();
    absl::StatusOr<DevicePtr<uint8_t>> k = ToDevice(std::vector<uint8_t>(out_bytes, kSentinel));
    if (!k.ok()) return k.status();
    absl::StatusOr<DevicePtr<uint8_t>> v = ToDevice(std::vector<uint8_t>(out_bytes, kSentinel));
    if (!v.ok()) return v.status();
    DevicePtr<int32_t> status = DeviceAlloc<int32_t>(jobs.size());
    if (status == nullptr) return absl::ResourceExhaustedError("cudaMalloc failed");
    DecodeKvBlocksParams p;
    p.in_base = in;
    p.jobs = djobs->get();
    p.num_jobs = static_cast<int>(jobs.size());
    p.head_dim = head_dim;
    p.k_out = k->get();
    p.v_out = v->get();
    p.out_fp8 = out_fp8;
    p.out_rows = out_rows;
    p.status = status.get();
    STRATA_CUDA_RETURN_IF_ERROR_(kernels::LaunchDecodeKvBlocks(p, nullptr));
    STRATA_CUDA_RETURN_IF_ERROR_(cudaDeviceSynchronize());
    Decoded d;
    absl::StatusOr<std::vector<int32_t>> st = ToHost(status.get(), jobs.size());
    if (!st.ok()) return st.status();
    d.status = std::move(st).value();
    absl::StatusOr<std::vector<uint8_t>> kh = ToHost(k->get(), out_bytes);
    if (!kh.ok()) return kh.status();
    d.k = std::move(kh).value();
    absl::StatusOr<std::vector<uint8_t>> vh = ToHost(v->get(), out_bytes);
    if (!vh.ok()) return vh.status();
    d.v = std::move(vh).value();
    return d;
  }

  // What the GPU decoder must write for `block`: K then V element bytes,
  // bf16 (out_fp8 false) or fp8 e4m3.
  static absl::StatusOr<std::pair<std::vector<uint8_t>, std::vector<uint8_t>>> ExpectedRows(
      std::span<const uint8_t> block, bool out_fp8) {
    absl::StatusOr<engine::KvBlockInfo> info = KvCodec::Inspect(block);
    if (!info.ok()) return info.status();
    const size_t elements = size_t{1} * info->tokens * info->head_dim;
    const DType out = out_fp8 ? DType::kF8E4M3 : DType::kBF16;
    std::vector<uint8_t> k(elements * DTypeSize(out)), v(elements * DTypeSize(out));
    const bool raw = info->codec == KvCodecKind::kBf16;
    if ((raw && info->source == out) || (!raw && !out_fp8)) {
      // A bit copy of the cache dtype, or Decode's own kBF16 rounding.
      absl::Status s = KvCodec::Decode(block, out, k.data(), v.data(), nullptr);
      if (!s.ok()) return s;
      return std::make_pair(std::move(k), std::move(v));
    }
    std::vector<float> kf(elements), vf(elements);
    absl::Status s = KvCodec::Decode(block, DType::kF32, kf.data(), vf.data(), nullptr);
    if (!s.ok()) return s;
    for (size_t i = 0; i < elements; ++i) {
      if (out_fp8) {
        k[i] = cm::FloatToFp8E4M3(kf[i]);
        v[i] = cm::FloatToFp8E4M3(vf[i]);
      } else {
        const uint16_t kb = cm::FloatToBf16Bits(kf[i]), vb = cm::FloatToBf16Bits(vf[i]);
        std::memcpy(k.data() + 2 * i, &kb, 2);
        std::memcpy(v.data() + 2 * i, &vb, 2);
      }
    }
    return std::make_pair(std::move(k), std::move(v));
  }

  // Decodes `blocks` (lying in `in` at their out_offset, with the CPU's bytes
  // in .cpu) on the GPU into both output dtypes and compares each row with
  // the CPU decoder's.
  void ExpectDecodeMatchesCpu(const uint8_t* in, const std::vector<EncodedBlock>& blocks, int d,
                              const std::string& what) {
    std::vector<DecodeKvJob> jobs;
    int64_t rows = 0;
    for (size_t j = 0; j < blocks.size(); ++j) {
      // Some capacities exactly the block, some with room to spare.
      const int64_t spare = j % 3 == 0 ? 0 : 13;
      jobs.push_back(
          {blocks[j].job.out_offset, static_cast<int64_t>(blocks[j].cpu.size()) + spare, rows});
      rows += blocks[j].job.tokens;
    }
    rows += 5;  // never written
    for (const bool out_fp8 : {false, true}) {
      SCOPED_TRACE(absl::StrCat(what, out_fp8 ? ", decoded to fp8" : ", decoded to bf16"));
      STRATA_ASSERT_OK_AND_ASSIGN(Decoded got, DecodeOnGpu(in, jobs, d, out_fp8, rows));
      const size_t row_bytes = size_t{1} * d * (out_fp8 ? 1 : 2);
      for (size_t j = 0; j < blocks.size(); ++j) {
        SCOPED_TRACE(absl::StrCat("block ", j, " (", blocks[j].job.tokens, " tokens)"));
        ASSERT_EQ(got.status[j], blocks[j].job.tokens);
        STRATA_ASSERT_OK_AND_ASSIGN(auto want, ExpectedRows(blocks[j].cpu, out_fp8));
        const size_t at = static_cast<size_t>(jobs[j].out_row) * row_bytes;
        for (int tensor = 0; tensor < 2; ++tensor) {
          const std::vector<uint8_t>& expected = tensor == 0 ? want.first : want.second;
          const std::vector<uint8_t>& all = tensor == 0 ? got.k : got.v;
          const std::span<const uint8_t> actual(all.data() + at, expected.size());
          int64_t diff = FirstDiff(expected, actual);
          // fp8 NaN: the hardware conversion's sign may differ (0x7f / 0xff).
          while (diff >= 0 && out_fp8 && (expected[diff] & 0x7f) == 0x7f &&
                 (actual[diff] & 0x7f) == 0x7f) {
            const int64_t next =
                FirstDiff(std::span(expected).subspan(diff + 1), actual.subspan(diff + 1));
            diff = next < 0 ? -1 : diff + 1 + next;
          }
          EXPECT_EQ(diff, -1) << (tensor == 0 ? "K" : "V") << " element byte " << diff << ": cpu 0x"
                              << std::hex << static_cast<int>(expected[std::max<int64_t>(diff, 0)])
                              << " gpu 0x" << static_cast<int>(actual[std::max<int64_t>(diff, 0)]);
        }
      }
      const size_t tail = static_cast<size_t>(rows - 5) * row_bytes;
      for (const std::vector<uint8_t>* out : {&got.k, &got.v}) {
        EXPECT_TRUE(std::all_of(out->begin() + tail, out->end(), [](uint8_t b) {
          return b == kSentinel;
        })) << "rows past the blocks were written";
      }
    }
  }

  // The whole check for one (head_dim, cache dtype): every codec x token
  // count, encoded on the GPU (== CPU bytes) and decoded (== CPU values).
  void RoundTrip(int d, bool fp8, bool nonfinite) {
    SCOPED_TRACE(absl::StrCat("head_dim ", d, fp8 ? ", fp8 cache" : ", bf16 cache",
                              nonfinite ? ", non-finite values" : "", ", ", Seed()));
    STRATA_ASSERT_OK_AND_ASSIGN(PagedCache cache, MakeCache(d, fp8, nonfinite));
    for (KvCodecKind codec : kAllCodecs) {
      const std::string what = CodecName(codec);
      SCOPED_TRACE(what);
      size_t total = 0;
      STRATA_ASSERT_OK_AND_ASSIGN(std::vector<EncodedBlock> blocks,
                                  PlanBlocks(cache, codec, {1, 7, 16, 63, 64}, &total));
      DevicePtr<uint8_t> out = DeviceAlloc<uint8_t>(total);
      ASSERT_NE(out, nullptr);
      STRATA_ASSERT_CUDA_(cudaMemset(out.get(), kSentinel, total));
      STRATA_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> status,
                                  EncodeOnGpu(cache, codec, blocks, out.get()));
      STRATA_ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bytes, ToHost(out.get(), total));
      for (size_t j = 0; j < blocks.size(); ++j) {
        const EncodedBlock& b = blocks[j];
        SCOPED_TRACE(absl::StrCat("block ", j, ": ", b.job.tokens, " tokens of head ", b.job.head,
                                  " from ", b.job.first_logical, " at offset ", b.job.out_offset));
        EXPECT_EQ(status[j], static_cast<int32_t>(b.cpu.size()));
        const std::span<const uint8_t> gpu(bytes.data() + b.job.out_offset, b.cpu.size());
        const int64_t diff = FirstDiff(b.cpu, gpu);
        EXPECT_EQ(diff, -1) << "first differing byte " << diff << " of " << b.cpu.size()
                            << ": cpu 0x" << std::hex
                            << static_cast<int>(b.cpu[std::max<int64_t>(diff, 0)]) << " gpu 0x"
                            << static_cast<int>(gpu[std::max<int64_t>(diff, 0)]);
        // Nothing written between blocks.
        const size_t end = b.job.out_offset + b.cpu.size();
        const size_t next = j + 1 < blocks.size() ? blocks[j + 1].job.out_offset : total;
        EXPECT_TRUE(std::all_of(bytes.begin() + end, bytes.begin() + next, [](uint8_t x) {
          return x == kSentinel;
        })) << "bytes written past the block";
      }
      if (HasFailure()) return;
      ExpectDecodeMatchesCpu(out.get(), blocks, d, what);
    }
  }
};

// ---- sizes (no GPU needed) ------------------------------------------------------

TEST(KvCodecSizesTest, BlockBytesMatchTheCpuCodec) {
  for (KvCodecKind codec : kAllCodecs) {
    std::unique_ptr<KvCodec> cpu = KvCodec::Create(codec).value();
    for (int tokens : {1, 2, 7, 63, 64, 127, 128, 129, 300}) {
      for (int d : {1, 3, 31, 32, 33, 64, 72, 128, 256}) {
        for (DType source : {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3}) {
          EXPECT_EQ(kernels::KvBlockBytes(codec, tokens, d, static_cast<int>(DTypeSize(source))),
                    cpu->EncodedBytes(tokens, d, source))
              << engine::KvCodecKindName(codec) << " " << tokens << " x " << d << " "
              << DTypeName(source);
        }
      }
    }
  }
  // kv_codec.h's documented figure, and the 64 x 256 limit of the recall unit.
  EXPECT_EQ(kernels::KvDecodeSmemBytes(256), size_t{66736});
  EXPECT_EQ(kernels::KvDecodeMaxBlockBytes(1), size_t{32 + 4 + 256 + 128});  // int8's
  for (int d : {3, 64, 72, 128, 256}) {
    EXPECT_EQ(kernels::KvDecodeMaxBlockBytes(d), size_t{32} + 4 * 64 * d);  // raw bf16
  }
  static_assert(kernels::KvCodecSmemBytes(KvCodecKind::kBf16, 64, 256) <= 227 * 1024);
}

// ---- encode and decode against the CPU codec ------------------------------------

TEST_F(CudaKvCodecTest, HeadDim64MatchesCpu) {
  for (const bool fp8 : {false, true}) RoundTrip(64, fp8, false);
}

TEST_F(CudaKvCodecTest, HeadDim128MatchesCpu) {
  for (const bool fp8 : {false, true}) RoundTrip(128, fp8, false);
}

// Rows of 144 (bf16) and 72 (fp8) bytes: no 16-byte vector path for fp8
// rows, odd int4 pairs across rows, a partial value group.
TEST_F(CudaKvCodecTest, HeadDim72MatchesCpu) {
  for (const bool fp8 : {false, true}) RoundTrip(72, fp8, false);
}

TEST_F(CudaKvCodecTest, HeadDim256MatchesCpu) { RoundTrip(256, false, false); }

// Odd head_dim: int4 blocks with an odd element count (a padding nibble).
TEST_F(CudaKvCodecTest, OddHeadDimMatchesCpu) { RoundTrip(33, false, false); }

// NaN, +-inf and values beyond fp16 in a bf16 cache: raw blocks copy them,
// quantised groups turn NaN as the CPU's do.
TEST_F(CudaKvCodecTest, NonFiniteValuesMatchCpu) { RoundTrip(128, false, true); }

// ---- damaged and refused blocks ---------------------------------------------------

TEST_F(CudaKvCodecTest, DamagedBlocksAreRefusedAndWriteNothing) {
  constexpr int kD = 128;
  for (KvCodecKind codec : kAllCodecs) {
    for (const bool fp8 : {false, true}) {
      const std::string what = absl::StrCat(CodecName(codec), fp8 ? " fp8" : " bf16", ", ", Seed());
      SCOPED_TRACE(what);
      STRATA_ASSERT_OK_AND_ASSIGN(PagedCache cache, MakeCache(kD, fp8));
      size_t total = 0;
      STRATA_ASSERT_OK_AND_ASSIGN(std::vector<EncodedBlock> blocks,
                                  PlanBlocks(cache, codec, {16}, &total));
      const std::vector<uint8_t>& good = blocks[0].cpu;
      const size_t bytes = good.size();
      // Every header byte, then a spread over the payload (scales or
      // params first, codes after) and its last byte.
      std::vector<size_t> positions(32);
      std::iota(positions.begin(), positions.end(), 0);
      for (size_t at = 33; at < bytes; at += (bytes - 32) / 23) positions.push_back(at);
      positions.push_back(32 + 2);
      positions.push_back(32 + 2 * kD + 1);
      positions.push_back(bytes - 1);
      const size_t stride = RoundUp16(bytes);
      std::vector<uint8_t> in;
      std::vector<DecodeKvJob> jobs;
      std::uniform_int_distribution<int> flip(1, 255);
      for (size_t j = 0; j < positions.size(); ++j) {
        std::vector<uint8_t> bad = good;
        bad[positions[j]] ^= static_cast<uint8_t>(flip(rng_));
        ASSERT_FALSE(KvCodec::Inspect(bad).ok()) << "position " << positions[j];
        jobs.push_back({static_cast<int64_t>(in.size()), static_cast<int64_t>(bytes),
                        static_cast<int64_t>(16 * j)});
        bad.resize(stride, 0);
        in.insert(in.end(), bad.begin(), bad.end());
      }
      const int64_t rows = 16 * static_cast<int64_t>(positions.size());
      // Refusals other than damage: a capacity one byte short, one shorter
      // than the header, a negative offset.
      jobs.push_back({static_cast<int64_t>(in.size()), static_cast<int64_t>(bytes) - 1, 0});
      jobs.push_back({static_cast<int64_t>(in.size()), 31, 0});
      jobs.push_back({-16, static_cast<int64_t>(bytes), 0});
      in.insert(in.end(), good.begin(), good.end());
      STRATA_ASSERT_OK_AND_ASSIGN(DevicePtr<uint8_t> din, ToDevice(in));
      STRATA_ASSERT_OK_AND_ASSIGN(Decoded got, DecodeOnGpu(din.get(), jobs, kD, fp8, rows));
      for (size_t j = 0; j < positions.size(); ++j) {
        if (positions[j] >= 28) {
          EXPECT_EQ(got.status[j], static_cast<int32_t>(KvBlockError::kBadCrc))
              << "byte " << positions[j] << " flipped";
        } else {
          EXPECT_LT(got.status[j], 0) << "byte " << positions[j] << " flipped";
          EXPECT_GE(got.status[j], static_cast<int32_t>(KvBlockError::kWrongHeadDim))
              << "byte " << positions[j] << " flipped";
        }
      }
      const size_t n = positions.size();
      EXPECT_EQ(got.status[n], static_cast<int32_t>(KvBlockError::kTruncated));
      EXPECT_EQ(got.status[n + 1], static_cast<int32_t>(KvBlockError::kTruncated));
      EXPECT_EQ(got.status[n + 2], static_cast<int32_t>(KvBlockError::kBadJob));
      for (const std::vector<uint8_t>* out : {&got.k, &got.v}) {
        EXPECT_TRUE(std::all_of(out->begin(), out->end(), [](uint8_t b) { return b == kSentinel; }))
            << "a refused block wrote output";
      }
    }
  }
}

TEST_F(CudaKvCodecTest, WrongHeadDimAndOversizedBlocksAreRefused) {
  SCOPED_TRACE(Seed());
  std::vector<uint8_t> in;
  std::vector<DecodeKvJob> jobs;
  auto add = [&](KvCodecKind codec, int tokens, int d) {
    std::unique_ptr<KvCodec> cpu = KvCodec::Create(codec).value();
    std::vector<uint16_t> k(size_t{1} * tokens * d), v(k.size());
    for (uint16_t& x : k) x = cm::FloatToBf16Bits(std::normal_distribution<float>()(rng_));
    for (uint16_t& x : v) x = cm::FloatToBf16Bits(std::normal_distribution<float>()(rng_));
    std::vector<uint8_t> block(cpu->EncodedBytes(tokens, d, DType::kBF16));
    ASSERT_TRUE(cpu->Encode(k.data(), v.data(), DType::kBF16, tokens, d, block).ok());
    jobs.push_back({static_cast<int64_t>(in.size()), static_cast<int64_t>(block.size()), 0});
    block.resize(RoundUp16(block.size()), 0);
    in.insert(in.end(), block.begin(), block.end());
  };
  add(KvCodecKind::kFp8E4M3, 16, 64);  // head_dim 64, decoder expects 128
  add(KvCodecKind::kBf16, 128, 128);   // 64 KiB of payload: past the 64-token buffer
  add(KvCodecKind::kInt4, 100, 128);   // more than 64 tokens, but it fits: decoded
  STRATA_ASSERT_OK_AND_ASSIGN(DevicePtr<uint8_t> din, ToDevice(in));
  STRATA_ASSERT_OK_AND_ASSIGN(Decoded got, DecodeOnGpu(din.get(), jobs, 128, false, 100));
  EXPECT_EQ(got.status[0], static_cast<int32_t>(KvBlockError::kWrongHeadDim));
  EXPECT_EQ(got.status[1], static_cast<int32_t>(KvBlockError::kTooLarge));
  EXPECT_EQ(got.status[2], 100);
}

// Rows past out_rows are not written: a 64-token block into 10 rows.
TEST_F(CudaKvCodecTest, DecodeWritesOnlyTheRowsThatFit) {
  SCOPED_TRACE(Seed());
  STRATA_ASSERT_OK_AND_ASSIGN(PagedCache cache, MakeCache(128, false));
  size_t total = 0;
  STRATA_ASSERT_OK_AND_ASSIGN(std::vector<EncodedBlock> blocks,
                              PlanBlocks(cache, KvCodecKind::kInt8, {64}, &total));
  STRATA_ASSERT_OK_AND_ASSIGN(DevicePtr<uint8_t> din, ToDevice(blocks[0].cpu));
  const DecodeKvJob job{0, static_cast<int64_t>(blocks[0].cpu.size()), 6};
  STRATA_ASSERT_OK_AND_ASSIGN(Decoded got, DecodeOnGpu(din.get(), {job}, 128, false, 16));
  EXPECT_EQ(got.status[0], 64);
  STRATA_ASSERT_OK_AND_ASSIGN(auto want, ExpectedRows(blocks[0].cpu, false));
  const size_t row_bytes = 128 * 2;
  EXPECT_TRUE(std::all_of(got.k.begin(), got.k.begin() + 6 * row_bytes,
                          [](uint8_t b) { return b == kSentinel; }));
  EXPECT_EQ(FirstDiff(std::span(want.first).first(10 * row_bytes),
                      std::span(got.k).subspan(6 * row_bytes)),
            -1);
  EXPECT_EQ(FirstDiff(std::span(want.second).first(10 * row_bytes),
                      std::span(got.v).subspan(6 * row_bytes)),
            -1);
}

// ---- mapped host memory -------------------------------------------------------------

struct HostFree {
  void operator()(void* p) const { cudaFreeHost(p); }
};

TEST_F(CudaKvCodecTest, EncodesIntoAndDecodesFromMappedHostMemory) {
  for (KvCodecKind codec : kAllCodecs) {
    const std::string what = absl::StrCat(CodecName(codec), ", ", Seed());
    SCOPED_TRACE(what);
    STRATA_ASSERT_OK_AND_ASSIGN(PagedCache cache, MakeCache(128, false));
    size_t total = 0;
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<EncodedBlock> blocks,
                                PlanBlocks(cache, codec, {64, 7, 63}, &total));
    void* host = nullptr;
    STRATA_ASSERT_CUDA_(cudaHostAlloc(&host, total, cudaHostAllocMapped));
    std::unique_ptr<void, HostFree> owner(host);
    std::memset(host, kSentinel, total);
    void* device_view = nullptr;
    STRATA_ASSERT_CUDA_(cudaHostGetDevicePointer(&device_view, host, 0));
    uint8_t* mapped = static_cast<uint8_t*>(device_view);
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> status,
                                EncodeOnGpu(cache, codec, blocks, mapped));
    const uint8_t* bytes = static_cast<const uint8_t*>(host);
    for (size_t j = 0; j < blocks.size(); ++j) {
      EXPECT_EQ(status[j], static_cast<int32_t>(blocks[j].cpu.size()));
      EXPECT_EQ(FirstDiff(blocks[j].cpu,
                          std::span(bytes + blocks[j].job.out_offset, blocks[j].cpu.size())),
                -1)
          << "block " << j;
    }
    ExpectDecodeMatchesCpu(mapped, blocks, 128, what);
  }
}

// ---- CRC32C -------------------------------------------------------------------------

TEST_F(CudaKvCodecTest, BlockCrc32cMatchesCrc32c) {
  SCOPED_TRACE(Seed());
  std::vector<uint8_t> data(80 * 1024);
  for (uint8_t& b : data) b = static_cast<uint8_t>(rng_());
  std::vector<Crc32cJob> jobs;
  std::vector<uint32_t> want;
  for (int64_t n : {0,   1,   2,    3,    4,    5,    7,    28,    31,    64,
                    100, 255, 1000, 4095, 4096, 4097, 5000, 17408, 17409, 65536}) {
    for (int64_t offset : {0, 1, 3, 7, 16}) {
      const uint32_t crc_in = jobs.size() % 2 == 0 ? 0u : static_cast<uint32_t>(rng_());
      jobs.push_back({offset, n, crc_in, 0});
      want.push_back(Crc32cExtend(crc_in, data.data() + offset, static_cast<size_t>(n)));
    }
  }
  STRATA_ASSERT_OK_AND_ASSIGN(DevicePtr<uint8_t> ddata, ToDevice(data));
  STRATA_ASSERT_OK_AND_ASSIGN(DevicePtr<Crc32cJob> djobs, ToDevice(jobs));
  DevicePtr<uint32_t> crcs = DeviceAlloc<uint32_t>(jobs.size());
  ASSERT_NE(crcs, nullptr);
  for (const bool from_shared : {false, true}) {
    SCOPED_TRACE(from_shared ? "shared memory" : "global memory");
    STRATA_ASSERT_CUDA_(cudaMemset(crcs.get(), 0, jobs.size() * sizeof(uint32_t)));
    STRATA_ASSERT_CUDA_(kernels::LaunchBlockCrc32c(
        ddata.get(), djobs.get(), static_cast<int>(jobs.size()), from_shared, crcs.get(), nullptr));
    STRATA_ASSERT_CUDA_(cudaDeviceSynchronize());
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<uint32_t> got, ToHost(crcs.get(), jobs.size()));
    for (size_t j = 0; j < jobs.size(); ++j) {
      EXPECT_EQ(got[j], want[j]) << jobs[j].bytes << " bytes at offset " << jobs[j].offset
                                 << ", crc_in 0x" << std::hex << jobs[j].crc_in;
    }
  }
}

}  // namespace
}  // namespace strata::cuda
