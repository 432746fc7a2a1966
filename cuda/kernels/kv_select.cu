// Per-step token selection of the sparse KV policies (see kv_select.h; the
// CPU reference is engine/cpu_backend.cc).
//
// All three kernels are memory bound and small: KeyBounds reads the range's
// keys once, ScoreBlocks reads each entry's summaries once, SelectTokens
// reads one row of scores and extents per (entry, KV head).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/kernels/fp8.cuh"
#include "cuda/kernels/kv_select.h"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kMaxHeadDimSelect = 256;

__device__ __forceinline__ int64_t SlotOf(const int32_t* table, int page_size, int index) {
  return static_cast<int64_t>(table[index / page_size]) * page_size + index % page_size;
}

// ---- KeyBounds ----------------------------------------------------------------

// Block (j, h): one thread per pair of channels walks the block's keys.
__global__ void KeyBoundsKernel(KeyBoundsParams p) {
  const int j = blockIdx.x, h = blockIdx.y;
  const int dim = threadIdx.x * 2;
  const int first = p.begin + j * p.block_tokens;
  const int64_t block = static_cast<int64_t>(h) * p.max_blocks + p.first_block + j;
  if (dim < p.head_dim) {
    float2 lo = make_float2(INFINITY, INFINITY), hi = make_float2(-INFINITY, -INFINITY);
    for (int t = first; t < first + p.block_tokens; ++t) {
      const int64_t slot = SlotOf(p.block_table, p.page_size, t);
      const int64_t at = (slot * p.num_kv_heads + h) * p.head_dim + dim;
      // fp8 values are bf16 values too, so the bf16 bounds below stay exact.
      const float2 v = p.kv_fp8 ? Fp8x2ToFloat2(*reinterpret_cast<const uint16_t*>(
                                      static_cast<const __nv_fp8_e4m3*>(p.k_cache) + at))
                                : __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
                                      static_cast<const bf16*>(p.k_cache) + at));
      lo.x = fminf(lo.x, v.x);
      lo.y = fminf(lo.y, v.y);
      hi.x = fmaxf(hi.x, v.x);
      hi.y = fmaxf(hi.y, v.y);
    }
    // Min and max of bf16 values are bf16 values: the rounding is exact.
    *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(p.lo) + block * p.head_dim + dim) =
        __floats2bfloat162_rn(lo.x, lo.y);
    *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(p.hi) + block * p.head_dim + dim) =
        __floats2bfloat162_rn(hi.x, hi.y);
  }
  if (threadIdx.x == 0) {
    p.extents[block * 2] = first;
    p.extents[block * 2 + 1] = p.block_tokens;
  }
}

// ---- ScoreBlocks --------------------------------------------------------------

constexpr int kScoreWarps = 8;
constexpr int kScoreRowsPerWarp = 8;
constexpr int kScoreRowsPerCta = kScoreWarps * kScoreRowsPerWarp;

// Block (entry, KV head, group of kScoreRowsPerCta summary blocks): the
// group's queries in fp32 shared memory (for centroids only their sum, since
// sum_g q_g . c = (sum_g q_g) . c), then each warp scores kScoreRowsPerWarp
// summary rows with the loads of all its rows in flight at once (a score is
// a few hundred bytes: latency, not bandwidth, bounds this kernel).
__global__ void __launch_bounds__(kScoreWarps * 32) ScoreBlocksKernel(ScoreBlocksParams p) {
  extern __shared__ float q_smem[];  // [group or 1, head_dim]
  const int entry = p.entry_begin + blockIdx.x;
  const int h = blockIdx.y;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int d = p.head_dim;
  const int32_t* e = p.entries + static_cast<int64_t>(entry) * kPlanFields;
  const int row = e[kPlanRowCol], slot = e[kPlanSlotCol], num_blocks = e[kPlanNumBlocksCol];
  const int block0 = blockIdx.z * kScoreRowsPerCta;
  if (block0 >= num_blocks) return;  // uniform over the block

  const bf16* q = static_cast<const bf16*>(p.qkv) + static_cast<int64_t>(row) * p.qkv_row_width +
                  static_cast<int64_t>(h) * group * d;
  if (p.key_bounds) {
    for (int i = threadIdx.x; i < group * d; i += blockDim.x) q_smem[i] = __bfloat162float(q[i]);
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float s = 0.0f;
      for (int g = 0; g < group; ++g) s += __bfloat162float(q[g * d + i]);
      q_smem[i] = s;
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first = block0 + warp * kScoreRowsPerWarp;
  if (first >= num_blocks) return;
  const int64_t base = (static_cast<int64_t>(slot) * p.num_kv_heads + h) * p.max_blocks;
  float score[kScoreRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kScoreRowsPerWarp; ++r) score[r] = 0.0f;
  for (int dim = lane * 2; dim < d; dim += 64) {
    // Rows past num_blocks re-read the last valid row (never written back).
    float2 a[kScoreRowsPerWarp], b[kScoreRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kScoreRowsPerWarp; ++r) {
      const int64_t block = base + min(first + r, num_blocks - 1);
      a[r] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
          static_cast<const bf16*>(p.summary_a) + block * d + dim));
      if (p.key_bounds) {
        b[r] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
            static_cast<const bf16*>(p.summary_b) + block * d + dim));
      }
    }
    if (p.key_bounds) {
      for (int g = 0; g < group; ++g) {
        const float q0 = q_smem[g * d + dim], q1 = q_smem[g * d + dim + 1];
#pragma unroll
        for (int r = 0; r < kScoreRowsPerWarp; ++r) {
          score[r] += fmaxf(q0 * a[r].x, q0 * b[r].x) + fmaxf(q1 * a[r].y, q1 * b[r].y);
        }
      }
    } else {
      const float q0 = q_smem[dim], q1 = q_smem[dim + 1];
#pragma unroll
      for (int r = 0; r < kScoreRowsPerWarp; ++r) score[r] += q0 * a[r].x + q1 * a[r].y;
    }
  }
#pragma unroll
  for (int r = 0; r < kScoreRowsPerWarp; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) score[r] += __shfl_xor_sync(0xffffffffu, score[r], off);
  }
  if (lane < kScoreRowsPerWarp && first + lane < num_blocks) {
    float mine = score[0];
#pragma unroll
    for (int r = 1; r < kScoreRowsPerWarp; ++r) mine = lane == r ? score[r] : mine;
    p.scores[(static_cast<int64_t>(entry) * p.num_kv_heads + h) * p.max_blocks + first + lane] =
        mine;
  }
}

// ---- SelectTokens -------------------------------------------------------------

constexpr int kSelectThreads = 512;
// Up to this many blocks (ClusterKV's ~410 clusters at 32k), each block's
// place is ranked directly against keys staged in shared memory, with no
// barriers, where the bitonic sort's 45+ barrier-separated phases take ~11
// us. The ranking is spread over kRankLanes threads per block and, when no
// entry has more than kMaxRankBlocks blocks, over several CTAs per (entry,
// KV head), kRankPerCta blocks each, so that a thread walks num_blocks /
// kRankLanes keys.
constexpr int kMaxRankBlocks = 1024;
constexpr int kRankLanes = 4;
constexpr int kRankPerCta = kSelectThreads / kRankLanes;
// Largest num_blocks sorted in shared memory (128 KiB of keys); beyond it a
// quadratic ranking without shared memory takes over.
constexpr int kMaxSortBlocks = 16384;

// A 64-bit key whose ascending order is descending score, then ascending
// block: the reference's stable sort by score (-0 equals +0 there).
__device__ __forceinline__ uint64_t OrderKey(float score, int block) {
  if (score == 0.0f) score = 0.0f;
  uint32_t bits = __float_as_uint(score);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending in score
  return (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(block);
}

__host__ __device__ int NextPow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Writes the `take` indices of extent (first, ...) at out[at, at + take),
// clipped to max_keys.
__device__ __forceinline__ void WriteRun(int32_t* out, int at, int first, int take, int max_keys) {
  for (int u = 0; u < take && at + u < max_keys; ++u) out[at + u] = first + u;
}

// Grid (entry, KV head, slice). Each summary block's start in the selection
// order is the sum of the sizes of the blocks ranked before it: up to
// kMaxRankBlocks blocks that sum is computed directly over keys in shared
// memory, CTA z ranking blocks [z * kRankPerCta, + kRankPerCta); beyond (one
// slice), with sort_capacity > 0, the keys are bitonic-sorted in shared
// memory (sort_capacity slots, a power of two >= every entry's num_blocks)
// and scanned; else the direct sum reads the scores from global memory
// (O(num_blocks^2), for very large block counts only). Slice 0 writes the
// sinks, the tail and the count.
__global__ void __launch_bounds__(kSelectThreads)
    SelectTokensKernel(SelectTokensParams p, int sort_capacity) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  using Reduce = cub::BlockReduce<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  extern __shared__ uint64_t sort_keys[];

  const int entry = blockIdx.x, h = blockIdx.y;
  const int32_t* e = p.entries + static_cast<int64_t>(entry) * kPlanFields;
  const int slot = e[kPlanSlotCol], num_blocks = e[kPlanNumBlocksCol];
  const int budget = max(e[kPlanBudgetCol], 0), sink_end = e[kPlanSinkEndCol];
  const int tail_begin = e[kPlanTailBeginCol], context_len = e[kPlanContextLenCol];
  const int64_t list = static_cast<int64_t>(entry) * p.num_kv_heads + h;
  int32_t* out = p.key_index + list * p.max_keys;
  const float* scores = p.scores + list * p.max_blocks;
  const int32_t* ext =
      p.extents + (static_cast<int64_t>(slot) * p.num_kv_heads + h) * p.max_blocks * 2;

  const bool first_slice = blockIdx.z == 0;
  if (first_slice) {
    for (int t = threadIdx.x; t < sink_end && t < p.max_keys; t += blockDim.x) out[t] = t;
  }

  int taken = 0;  // tokens selected from the blocks, valid in every thread
  if (num_blocks <= kMaxRankBlocks) {
    __shared__ uint64_t rank_keys[kMaxRankBlocks];
    __shared__ int rank_sizes[kMaxRankBlocks];
    int total = 0;
    for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
      rank_keys[b] = OrderKey(scores[b], b);
      rank_sizes[b] = max(ext[b * 2 + 1], 0);
      total += rank_sizes[b];
    }
    total = Reduce(reduce_storage).Sum(total);  // valid in thread 0
    __shared__ int rank_total;
    if (threadIdx.x == 0) rank_total = total;
    __syncthreads();
    // kRankLanes adjacent lanes share block b, each summing every
    // kRankLanes-th key, then a shuffle adds their parts. The CTAs of the
    // grid's slices take kRankPerCta blocks at a time (the loop bounds are
    // uniform over the CTA, so every lane reaches the shuffle).
    const int part = threadIdx.x % kRankLanes;
    for (int b0 = blockIdx.z * kRankPerCta; b0 < num_blocks; b0 += gridDim.z * kRankPerCta) {
      const int b = b0 + threadIdx.x / kRankLanes;
      const uint64_t key = b < num_blocks ? rank_keys[b] : 0;
      int start = 0;  // sizes of the blocks ranked before b (keys are distinct)
      for (int o = part; o < num_blocks; o += kRankLanes) {
        start += rank_keys[o] < key ? rank_sizes[o] : 0;
      }
#pragma unroll
      for (int off = 1; off < kRankLanes; off <<= 1) {
        start += __shfl_xor_sync(0xffffffffu, start, off);
      }
      if (part == 0 && b < num_blocks && start < budget) {
        WriteRun(out, sink_end + start, ext[b * 2], min(rank_sizes[b], budget - start), p.max_keys);
      }
    }
    taken = min(rank_total, budget);
  } else if (sort_capacity > 0) {
    const int n = NextPow2(max(num_blocks, 1));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      sort_keys[i] = i < num_blocks ? OrderKey(scores[i], i) : ~uint64_t{0};
    }
    __syncthreads();
    for (int k = 2; k <= n; k <<= 1) {
      for (int j = k >> 1; j > 0; j >>= 1) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
          const int partner = i ^ j;
          if (partner > i) {
            const uint64_t x = sort_keys[i], y = sort_keys[partner];
            const bool ascending = (i & k) == 0;
            if ((x > y) == ascending) {
              sort_keys[i] = y;
              sort_keys[partner] = x;
            }
          }
        }
        __syncthreads();
      }
    }
    // Walk the sorted blocks in chunks, an exclusive scan of their sizes
    // giving each one's place in the selection.
    int carry = 0;
    for (int base = 0; base < num_blocks && carry < budget; base += blockDim.x) {
      const int i = base + threadIdx.x;
      int block = 0, size = 0;
      if (i < num_blocks) {
        block = static_cast<int>(sort_keys[i] & 0xffffffffu);
        size = max(ext[block * 2 + 1], 0);
      }
      int before = 0, chunk_total = 0;
      Scan(scan_storage).ExclusiveSum(size, before, chunk_total);
      const int start = carry + before;
      if (i < num_blocks && start < budget) {
        WriteRun(out, sink_end + start, ext[block * 2], min(size, budget - start), p.max_keys);
      }
      carry += chunk_total;
      __syncthreads();  // scan_storage is reused
    }
    taken = min(carry, budget);
  } else {
    int total = 0;
    for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
      const uint64_t key = OrderKey(scores[b], b);
      const int size = max(ext[b * 2 + 1], 0);
      total += size;
      int64_t start = 0;
      for (int o = 0; o < num_blocks; ++o) {
        if (OrderKey(scores[o], o) < key) start += max(ext[o * 2 + 1], 0);
      }
      if (start < budget) {
        WriteRun(out, sink_end + static_cast<int>(start), ext[b * 2],
                 min(size, budget - static_cast<int>(start)), p.max_keys);
      }
    }
    total = Reduce(reduce_storage).Sum(total);
    __shared__ int shared_total;
    if (threadIdx.x == 0) shared_total = total;
    __syncthreads();
    taken = min(shared_total, budget);
  }

  if (!first_slice) return;
  const int tail_at = sink_end + taken;
  for (int t = tail_begin + threadIdx.x; t < context_len; t += blockDim.x) {
    const int at = tail_at + (t - tail_begin);
    if (at < p.max_keys) out[at] = t;
  }
  if (threadIdx.x == 0) {
    p.key_count[list] = min(tail_at + max(context_len - tail_begin, 0), p.max_keys);
  }
}

}  // namespace

cudaError_t LaunchKeyBounds(const KeyBoundsParams& params, cudaStream_t stream) {
  const KeyBoundsParams& p = params;
  if (p.k_cache == nullptr || p.block_table == nullptr || p.lo == nullptr || p.hi == nullptr ||
      p.extents == nullptr || p.page_size < 1 || p.begin < 0 || p.num_blocks < 0 ||
      p.block_tokens < 1 || p.num_kv_heads < 1 || p.num_kv_heads > 65535 || p.head_dim < 2 ||
      p.head_dim % 2 != 0 || p.head_dim > kMaxHeadDimSelect || p.first_block < 0 ||
      int64_t{p.first_block} + p.num_blocks > p.max_blocks ||
      int64_t{p.begin} + int64_t{p.num_blocks} * p.block_tokens > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (p.num_blocks == 0) return cudaSuccess;
  const dim3 grid(p.num_blocks, p.num_kv_heads);
  KeyBoundsKernel<<<grid, (p.head_dim / 2 + 31) / 32 * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchScoreBlocks(const ScoreBlocksParams& params, cudaStream_t stream) {
  const ScoreBlocksParams& p = params;
  if (p.qkv == nullptr || p.entries == nullptr || p.summary_a == nullptr || p.scores == nullptr ||
      (p.key_bounds && p.summary_b == nullptr) || p.entry_begin < 0 ||
      p.entry_end < p.entry_begin || p.num_kv_heads < 1 || p.num_kv_heads > 65535 ||
      p.num_q_heads < p.num_kv_heads || p.num_q_heads % p.num_kv_heads != 0 || p.head_dim < 2 ||
      p.head_dim % 2 != 0 || p.head_dim > kMaxHeadDimSelect || p.max_num_blocks < 0 ||
      p.max_num_blocks > p.max_blocks || p.qkv_row_width < int64_t{p.num_q_heads} * p.head_dim) {
    return cudaErrorInvalidValue;
  }
  if (p.entry_begin == p.entry_end || p.max_num_blocks == 0) return cudaSuccess;
  const int group = p.num_q_heads / p.num_kv_heads;
  const size_t smem = sizeof(float) * p.head_dim * (p.key_bounds ? group : 1);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  const int z = (p.max_num_blocks + kScoreRowsPerCta - 1) / kScoreRowsPerCta;
  if (z > 65535) return cudaErrorInvalidValue;
  const dim3 grid(p.entry_end - p.entry_begin, p.num_kv_heads, z);
  ScoreBlocksKernel<<<grid, kScoreWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchSelectTokens(const SelectTokensParams& params, cudaStream_t stream) {
  const SelectTokensParams& p = params;
  if (p.scores == nullptr || p.extents == nullptr || p.entries == nullptr ||
      p.key_index == nullptr || p.key_count == nullptr || p.num_entries < 0 || p.num_kv_heads < 1 ||
      p.num_kv_heads > 65535 || p.max_blocks < 0 || p.max_num_blocks < 0 ||
      p.max_num_blocks > p.max_blocks || p.max_keys < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_entries == 0) return cudaSuccess;
  int capacity = 0;
  size_t smem = 0;
  if (p.max_num_blocks > kMaxRankBlocks && p.max_num_blocks <= kMaxSortBlocks) {
    capacity = NextPow2(std::max(p.max_num_blocks, 1));
    smem = sizeof(uint64_t) * capacity;
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(
          SelectTokensKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
  }
  const int slices = p.max_num_blocks <= kMaxRankBlocks
                         ? std::max(1, (p.max_num_blocks + kRankPerCta - 1) / kRankPerCta)
                         : 1;
  const dim3 grid(p.num_entries, p.num_kv_heads, slices);
  SelectTokensKernel<<<grid, kSelectThreads, smem, stream>>>(p, capacity);
  return cudaGetLastError();
}

}  // namespace strata::cuda::kernels
