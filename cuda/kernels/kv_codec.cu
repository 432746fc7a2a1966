// Batch launchers of the KV block codecs (see kv_codec.h): one CTA of
// kCodecThreads per job, running kv_codec.cuh's device functions.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernels/kv_codec.cuh"
#include "cuda/kernels/kv_codec.h"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;
using fp8 = __nv_fp8_e4m3;

// Enough warps for the per-channel and per-token passes of a 64 x 256 block
// and for the CRC's chunks (a 64 KiB block is 4 rounds of 256 x 68 bytes).
constexpr int kCodecThreads = 256;
// The staging limit of the CRC test kernel.
constexpr size_t kCrcStageBytes = 64 * 1024;

// Element offset of logical token first + r of one sequence in the paged
// cache (head 0; the caller's base pointer adds the head).
struct PagedRowOffset {
  const int32_t* table;  // the sequence's block_table row
  int page_size;
  int first;
  int64_t row_stride;  // num_kv_heads * head_dim
  __device__ int64_t operator()(int r) const {
    const int i = first + r;
    return (static_cast<int64_t>(table[i / page_size]) * page_size + i % page_size) * row_stride;
  }
};

struct PlainRowOffset {
  int64_t first_row;
  int64_t row_stride;
  __device__ int64_t operator()(int r) const { return (first_row + r) * row_stride; }
};

// Element offset of token r of one page in a paged cache (head 0).
struct PageRowOffset {
  int64_t first_row;   // page * page_size
  int64_t row_stride;  // num_kv_heads * head_dim
  __device__ int64_t operator()(int r) const { return (first_row + r) * row_stride; }
};

__device__ bool PageJobOk(const PageBlocksParams& p, const PageBlockJob& job) {
  return job.k_cache != nullptr && job.v_cache != nullptr && job.page >= 0 && job.head >= 0 &&
         job.head < p.num_kv_heads && job.tokens >= 1 && job.tokens <= p.page_size &&
         job.tokens <= kKvCodecMaxTokens && job.host_offset >= 0 && job.bytes >= 0;
}

template <typename Cache>
__global__ void __launch_bounds__(kCodecThreads) EncodePageBlocksKernel(PageBlocksParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const PageBlockJob job = p.jobs[blockIdx.x];
  const size_t want = KvBlockBytes(p.codec, job.tokens, p.head_dim, sizeof(Cache));
  if (!PageJobOk(p, job) || static_cast<size_t>(job.bytes) != want) {  // uniform
    if (threadIdx.x == 0) p.status[blockIdx.x] = static_cast<int32_t>(KvBlockError::kBadJob);
    return;
  }
  const int64_t head_offset = int64_t{job.head} * p.head_dim;
  const Cache* k = static_cast<const Cache*>(job.k_cache) + head_offset;
  const Cache* v = static_cast<const Cache*>(job.v_cache) + head_offset;
  const PageRowOffset rows{int64_t{job.page} * p.page_size, int64_t{p.num_kv_heads} * p.head_dim};
  const size_t bytes = EncodeKvBlock<kCodecThreads>(p.codec, k, v, rows, job.tokens, p.head_dim,
                                                    p.host + job.host_offset, smem);
  if (threadIdx.x == 0) p.status[blockIdx.x] = static_cast<int32_t>(bytes);
}

template <typename Cache>
__global__ void __launch_bounds__(kCodecThreads) DecodePageBlocksKernel(PageBlocksParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const PageBlockJob job = p.jobs[blockIdx.x];
  if (!PageJobOk(p, job)) {  // uniform
    if (threadIdx.x == 0) p.status[blockIdx.x] = static_cast<int32_t>(KvBlockError::kBadJob);
    return;
  }
  const int64_t head_offset = int64_t{job.head} * p.head_dim;
  Cache* k = static_cast<Cache*>(const_cast<void*>(job.k_cache)) + head_offset;
  Cache* v = static_cast<Cache*>(const_cast<void*>(job.v_cache)) + head_offset;
  const int status = DecodeKvBlock<kCodecThreads>(
      p.host + job.host_offset, static_cast<size_t>(job.bytes), p.head_dim, k, v,
      PageRowOffset{int64_t{job.page} * p.page_size, int64_t{p.num_kv_heads} * p.head_dim},
      job.tokens, smem);
  if (threadIdx.x == 0) p.status[blockIdx.x] = status;
}

template <typename Cache>
__global__ void __launch_bounds__(kCodecThreads) EncodeKvBlocksKernel(EncodeKvBlocksParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const EncodeKvJob job = p.jobs[blockIdx.x];
  const int64_t table_tokens = int64_t{p.max_blocks_per_seq} * p.page_size;
  const bool ok = job.tokens >= 1 && job.tokens <= p.max_tokens && job.head >= 0 &&
                  job.head < p.num_kv_heads && job.table_row >= 0 && job.first_logical >= 0 &&
                  int64_t{job.first_logical} + job.tokens <= table_tokens && job.out_offset >= 0;
  if (!ok) {  // uniform over the block
    if (threadIdx.x == 0 && p.status != nullptr) {
      p.status[blockIdx.x] = static_cast<int32_t>(KvBlockError::kBadJob);
    }
    return;
  }
  const int64_t head_offset = int64_t{job.head} * p.head_dim;
  const Cache* k = static_cast<const Cache*>(p.k_cache) + head_offset;
  const Cache* v = static_cast<const Cache*>(p.v_cache) + head_offset;
  const PagedRowOffset rows{p.block_table + int64_t{job.table_row} * p.max_blocks_per_seq,
                            p.page_size, job.first_logical, int64_t{p.num_kv_heads} * p.head_dim};
  const size_t bytes = EncodeKvBlock<kCodecThreads>(p.codec, k, v, rows, job.tokens, p.head_dim,
                                                    p.out_base + job.out_offset, smem);
  if (threadIdx.x == 0 && p.status != nullptr) {
    p.status[blockIdx.x] = static_cast<int32_t>(bytes);
  }
}

template <typename Out>
__global__ void __launch_bounds__(kCodecThreads) DecodeKvBlocksKernel(DecodeKvBlocksParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const DecodeKvJob job = p.jobs[blockIdx.x];
  if (job.in_offset < 0 || job.in_capacity < 0 || job.out_row < 0 || job.out_row > p.out_rows) {
    if (threadIdx.x == 0) p.status[blockIdx.x] = static_cast<int32_t>(KvBlockError::kBadJob);
    return;
  }
  const int64_t room = p.out_rows - job.out_row;
  const int rows =
      room < engine::kMaxBlockTokens ? static_cast<int>(room) : engine::kMaxBlockTokens;
  const int status = DecodeKvBlock<kCodecThreads>(
      p.in_base + job.in_offset, static_cast<size_t>(job.in_capacity), p.head_dim,
      static_cast<Out*>(p.k_out), static_cast<Out*>(p.v_out),
      PlainRowOffset{job.out_row, p.head_dim}, rows, smem);
  if (threadIdx.x == 0) p.status[blockIdx.x] = status;
}

__global__ void __launch_bounds__(kCodecThreads)
    BlockCrc32cKernel(const uint8_t* base, const Crc32cJob* jobs, bool from_shared,
                      uint32_t* crcs) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Crc32cJob job = jobs[blockIdx.x];
  const uint8_t* data = base + job.offset;
  const size_t n = static_cast<size_t>(job.bytes);
  unsigned char* scratch = smem;
  if (from_shared && n > kCrcStageBytes) {  // uniform
    if (threadIdx.x == 0) crcs[blockIdx.x] = 0;
    return;
  }
  if (from_shared) {
    // Staged at an odd offset too, when the source is, so that the shared
    // memory path also sees unaligned starts.
    unsigned char* staged = smem + kKvCrcScratchBytes + (job.offset & 15);
    for (size_t i = threadIdx.x; i < n; i += kCodecThreads) staged[i] = data[i];
    __syncthreads();
    data = staged;
  }
  const uint32_t crc = BlockCrc32cExtend<kCodecThreads>(job.crc_in, data, n, scratch);
  if (threadIdx.x == 0) crcs[blockIdx.x] = crc;
}

__global__ void __launch_bounds__(kCodecThreads)
    RowCrc32cKernel(const Crc32cRow* rows, uint32_t* crcs) {
  __shared__ __align__(16) unsigned char scratch[kKvCrcScratchBytes];
  const Crc32cRow row = rows[blockIdx.x];
  const uint32_t crc =
      BlockCrc32cExtend<kCodecThreads>(0, row.data, static_cast<size_t>(row.bytes), scratch);
  if (threadIdx.x == 0) crcs[blockIdx.x] = crc;
}

// Sets the kernel's dynamic shared memory limit when above the default 48
// KiB (per device, so on every launch); refuses more than the device has.
template <typename Kernel>
cudaError_t PrepareSmem(Kernel* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int limit = 0;
  err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

template <typename Cache>
cudaError_t LaunchEncodeFor(const EncodeKvBlocksParams& p, cudaStream_t stream) {
  const size_t smem = KvCodecSmemBytes(p.codec, p.max_tokens, p.head_dim, sizeof(Cache));
  cudaError_t err = PrepareSmem(EncodeKvBlocksKernel<Cache>, smem);
  if (err != cudaSuccess) return err;
  EncodeKvBlocksKernel<Cache><<<p.num_jobs, kCodecThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Out>
cudaError_t LaunchDecodeFor(const DecodeKvBlocksParams& p, cudaStream_t stream) {
  const size_t smem = KvDecodeSmemBytes(p.head_dim);
  cudaError_t err = PrepareSmem(DecodeKvBlocksKernel<Out>, smem);
  if (err != cudaSuccess) return err;
  DecodeKvBlocksKernel<Out><<<p.num_jobs, kCodecThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

bool PageParamsOk(const PageBlocksParams& p) {
  return p.jobs != nullptr && p.host != nullptr && p.status != nullptr && p.num_jobs >= 0 &&
         p.page_size >= 1 && p.num_kv_heads >= 1 && p.head_dim >= 1 &&
         p.head_dim <= engine::kMaxBlockHeadDim && static_cast<int>(p.codec) >= 0 &&
         p.codec <= KvCodecKind::kInt4;
}

template <typename Cache>
cudaError_t LaunchEncodePagesFor(const PageBlocksParams& p, cudaStream_t stream) {
  const int max_tokens = p.page_size < kKvCodecMaxTokens ? p.page_size : kKvCodecMaxTokens;
  const size_t smem = KvCodecSmemBytes(p.codec, max_tokens, p.head_dim, sizeof(Cache));
  cudaError_t err = PrepareSmem(EncodePageBlocksKernel<Cache>, smem);
  if (err != cudaSuccess) return err;
  EncodePageBlocksKernel<Cache><<<p.num_jobs, kCodecThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Cache>
cudaError_t LaunchDecodePagesFor(const PageBlocksParams& p, cudaStream_t stream) {
  const size_t smem = KvDecodeSmemBytes(p.head_dim);
  cudaError_t err = PrepareSmem(DecodePageBlocksKernel<Cache>, smem);
  if (err != cudaSuccess) return err;
  DecodePageBlocksKernel<Cache><<<p.num_jobs, kCodecThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchEncodePageBlocks(const PageBlocksParams& p, cudaStream_t stream) {
  if (!PageParamsOk(p)) return cudaErrorInvalidValue;
  if (p.num_jobs == 0) return cudaSuccess;
  return p.kv_fp8 ? LaunchEncodePagesFor<fp8>(p, stream) : LaunchEncodePagesFor<bf16>(p, stream);
}

cudaError_t LaunchDecodePageBlocks(const PageBlocksParams& p, cudaStream_t stream) {
  if (!PageParamsOk(p)) return cudaErrorInvalidValue;
  if (p.num_jobs == 0) return cudaSuccess;
  return p.kv_fp8 ? LaunchDecodePagesFor<fp8>(p, stream) : LaunchDecodePagesFor<bf16>(p, stream);
}

cudaError_t LaunchEncodeKvBlocks(const EncodeKvBlocksParams& p, cudaStream_t stream) {
  if (static_cast<int>(p.codec) < 0 || p.codec > KvCodecKind::kInt4 || p.k_cache == nullptr ||
      p.v_cache == nullptr || p.block_table == nullptr || p.jobs == nullptr ||
      p.out_base == nullptr || p.max_blocks_per_seq < 1 || p.page_size < 1 || p.num_kv_heads < 1 ||
      p.head_dim < 1 || p.head_dim > engine::kMaxBlockHeadDim || p.num_jobs < 0 ||
      p.max_tokens < 1 || p.max_tokens > engine::kMaxBlockTokens ||
      int64_t{p.max_tokens} * p.head_dim > engine::kMaxBlockElements) {
    return cudaErrorInvalidValue;
  }
  if (p.num_jobs == 0) return cudaSuccess;
  return p.kv_fp8 ? LaunchEncodeFor<fp8>(p, stream) : LaunchEncodeFor<bf16>(p, stream);
}

cudaError_t LaunchDecodeKvBlocks(const DecodeKvBlocksParams& p, cudaStream_t stream) {
  if (p.in_base == nullptr || p.jobs == nullptr || p.status == nullptr || p.num_jobs < 0 ||
      p.head_dim < 1 || p.head_dim > engine::kMaxBlockHeadDim || p.out_rows < 0 ||
      (p.out_rows > 0 && (p.k_out == nullptr || p.v_out == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.num_jobs == 0) return cudaSuccess;
  return p.out_fp8 ? LaunchDecodeFor<fp8>(p, stream) : LaunchDecodeFor<bf16>(p, stream);
}

cudaError_t LaunchRowCrc32c(const Crc32cRow* rows, int num_rows, uint32_t* crcs,
                            cudaStream_t stream) {
  if (num_rows < 0 || (num_rows > 0 && (rows == nullptr || crcs == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0) return cudaSuccess;
  RowCrc32cKernel<<<num_rows, kCodecThreads, 0, stream>>>(rows, crcs);
  return cudaGetLastError();
}

cudaError_t LaunchBlockCrc32c(const uint8_t* base, const Crc32cJob* jobs, int num_jobs,
                              bool from_shared, uint32_t* crcs, cudaStream_t stream) {
  if (base == nullptr || jobs == nullptr || crcs == nullptr || num_jobs < 0) {
    return cudaErrorInvalidValue;
  }
  if (num_jobs == 0) return cudaSuccess;
  const size_t smem = kKvCrcScratchBytes + (from_shared ? kCrcStageBytes + 16 : 0);
  cudaError_t err = PrepareSmem(BlockCrc32cKernel, smem);
  if (err != cudaSuccess) return err;
  BlockCrc32cKernel<<<num_jobs, kCodecThreads, smem, stream>>>(base, jobs, from_shared, crcs);
  return cudaGetLastError();
}

}  // namespace strata::cuda::kernels
