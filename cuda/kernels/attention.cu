// Paged causal attention kernels (see attention.h for the design).
//
// Conventions shared by both kernels:
//  - Sequence s owns query rows [query_start[s], query_start[s+1]); its local
//    query j sits at position context_len[s] - q_len + j and sees cache
//    positions [max(0, pos - window + 1), pos].
//  - Position p lives at slot block_table[s][p / page_size] * page_size +
//    p % page_size of the caches [slots, num_kv_heads, head_dim].
//  - Softmax is the usual online (streaming) form in fp32: a running max m,
//    running sum l and unnormalised accumulator, rescaled by exp(m_old - m)
//    whenever the max grows. A row whose keys are all masked so far keeps
//    m = -inf; that case is special-cased so that -inf - -inf never produces
//    a NaN.
//  - Keys that are not loaded (masked or past the end) are zero in shared
//    memory, so a stale or NaN value in an unused cache slot can never leak
//    into a result through 0 * NaN.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "cuda/kernels/attention.h"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr float kNegInf = -INFINITY;

struct alignas(16) Bf16x8 {
  bf16 v[8];
};

__device__ __forceinline__ void Load8(const bf16* p, float (&out)[8]) {
  const Bf16x8 packed = *reinterpret_cast<const Bf16x8*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = __bfloat162float(packed.v[i]);
}

// Returns the cache slot of position `pos` of sequence `seq`.
__device__ __forceinline__ int64_t SlotOf(const PagedAttentionParams& p, int seq, int pos) {
  const int page =
      p.block_table[static_cast<int64_t>(seq) * p.max_blocks_per_seq + pos / p.page_size];
  return static_cast<int64_t>(page) * p.page_size + pos % p.page_size;
}

// exp(a - b) where b is a running max that may still be -inf.
__device__ __forceinline__ float ExpDiff(float a, float b) {
  return b == kNegInf ? 0.0f : __expf(a - b);
}

// =============================================================================
// Decode kernel
// =============================================================================
//
// Block = 4 warps. A "group" of kTG consecutive lanes handles one key at a
// time, each lane holding 8 consecutive elements of the head dimension (one
// 16-byte load); kTG is the power of two >= head_dim / 8, so lanes past the
// head dimension idle. Each block processes up to kMaxG query heads of one kv
// head (heads g_begin .. g_begin + g_count of the group) for one sequence,
// over one split of its keys, in chunks of kDecodeChunk keys:
//   0. the chunk's cache slots (block-table lookups) -> shared memory,
//   1. scores of the chunk's keys -> shared memory (scaled q . k),
//   2. block max of the chunk -> new running max, rescale accumulators,
//   3. p = exp(score - max) in place, per-thread partial sums of p,
//   4. acc[g][d] += p * v for the lane's 8 dims.
// Steps 1 and 4 issue kUnroll independent 16-byte loads per lane before using
// them: decode is bound by memory latency, and one load in flight per lane
// leaves most of the bandwidth unused. At the end the per-group accumulators
// are reduced across groups (warp shuffles, then shared memory across warps).

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeChunk = 256;
constexpr int kDecodeMaxG = 8;  // query heads per block; larger groups use more blocks

// Shared memory: max(logits [kMaxG][chunk], out partials [warps][kMaxG][D]),
// then [warps][kMaxG] floats for block reductions, then the chunk's slots.
size_t DecodeSmemBytes(int max_g, int head_dim) {
  const size_t main = std::max<size_t>(size_t{1} * max_g * kDecodeChunk,
                                       size_t{1} * kDecodeWarps * max_g * head_dim);
  return (main + size_t{1} * kDecodeWarps * max_g) * sizeof(float) + kDecodeChunk * sizeof(int32_t);
}

template <int kTG, int kMaxG>
__global__ void __launch_bounds__(kDecodeThreads)
    PagedDecodeKernel(const __grid_constant__ PagedAttentionParams p, int num_splits,
                      int head_chunks, float* __restrict__ ws_acc, float* __restrict__ ws_ml) {
  constexpr int kGroupsPerWarp = 32 / kTG;
  constexpr int kGroups = kDecodeWarps * kGroupsPerWarp;
  // Loads in flight per lane. Measured on H100 (Llama-8B shapes): 2 beats 1
  // slightly and 4 loses (registers cut occupancy from 4 to 3 blocks/SM).
  constexpr int kUnroll = 2;

  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y / head_chunks;
  const int head_chunk = blockIdx.y - kv_head * head_chunks;
  const int split = blockIdx.z;

  const int q_begin = p.query_start[seq];
  const int q_len = p.query_start[seq + 1] - q_begin;
  if (q_len != 1) return;  // not a decode sequence (uniform across the block)

  const int D = p.head_dim;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int g_begin = head_chunk * kMaxG;
  const int g_count = min(kMaxG, G - g_begin);
  const int ctx = p.context_len[seq];
  const int pos = ctx - 1;
  const int key_lo = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
  const int key_hi = ctx;
  const int num_keys = max(0, key_hi - key_lo);
  const int per_split = (num_keys + num_splits - 1) / num_splits;
  const int k_begin = key_lo + split * per_split;
  const int k_end = min(key_hi, k_begin + per_split);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group_lane = lane % kTG;
  const int group = warp * kGroupsPerWarp + lane / kTG;
  const int d0 = group_lane * 8;
  const bool d_active = d0 < D;

  extern __shared__ __align__(16) float smem[];
  float* logits = smem;                                                     // [kMaxG][kDecodeChunk]
  float* red = smem + max(kMaxG * kDecodeChunk, kDecodeWarps * kMaxG * D);  // [warps][kMaxG]
  int32_t* slots = reinterpret_cast<int32_t*>(red + kDecodeWarps * kMaxG);  // [kDecodeChunk]

  // This lane's slice of each query head, pre-scaled.
  const int64_t t = q_begin;
  const int head0 = kv_head * G + g_begin;  // first query head of this block
  float q[kMaxG][8];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    if (g < g_count && d_active) {
      Load8(static_cast<const bf16*>(p.qkv) + t * p.qkv_row_width +
                static_cast<int64_t>(head0 + g) * D + d0,
            q[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= p.scale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] = 0.0f;
    }
  }

  float acc[kMaxG][8];
  float m[kMaxG];  // running max, identical in every thread
  float l[kMaxG];  // this thread's share of the running sum
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
  }

  const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
  const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
  const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * D + d0;

  for (int chunk_start = k_begin; chunk_start < k_end; chunk_start += kDecodeChunk) {
    const int chunk_len = min(kDecodeChunk, k_end - chunk_start);

    // 0. Slots, so the loops below do no dependent block-table loads. (The
    // previous chunk ended with a barrier, so nobody still reads them.)
    for (int i = tid; i < chunk_len; i += kDecodeThreads) {
      slots[i] = static_cast<int32_t>(SlotOf(p, seq, chunk_start + i));
    }
    __syncthreads();

    // 1. Scores. The loop bound is uniform so every lane reaches the shuffles.
    for (int base = 0; base < chunk_len; base += kGroups * kUnroll) {
      float k[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int kk = base + u * kGroups + group;
        if (kk < chunk_len && d_active) {
          Load8(k_cache + static_cast<int64_t>(slots[kk]) * slot_stride + head_offset, k[u]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) k[u][e] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int kk = base + u * kGroups + group;
        float dot[kMaxG];
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) {
          dot[g] = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) dot[g] += q[g][e] * k[u][e];
        }
#pragma unroll
        for (int offset = kTG / 2; offset > 0; offset >>= 1) {
#pragma unroll
          for (int g = 0; g < kMaxG; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], offset);
        }
        if (kk < chunk_len && group_lane == 0) {
#pragma unroll
          for (int g = 0; g < kMaxG; ++g) {
            if (g < g_count) logits[g * kDecodeChunk + kk] = dot[g];
          }
        }
      }
    }
    __syncthreads();

    // 2. Chunk max -> running max; rescale.
    float cmax[kMaxG];
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) cmax[g] = kNegInf;
    for (int i = tid; i < chunk_len; i += kDecodeThreads) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        if (g < g_count) cmax[g] = fmaxf(cmax[g], logits[g * kDecodeChunk + i]);
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        cmax[g] = fmaxf(cmax[g], __shfl_xor_sync(0xffffffffu, cmax[g], offset));
      }
      if (lane == 0) red[warp * kMaxG + g] = cmax[g];
    }
    __syncthreads();
    float new_m[kMaxG];
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      float mx = m[g];
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, red[w * kMaxG + g]);
      new_m[g] = mx;
      const float alpha = ExpDiff(m[g], mx);
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
      m[g] = mx;
    }

    // 3. Probabilities in place.
    for (int i = tid; i < chunk_len; i += kDecodeThreads) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        if (g < g_count) {
          const float pr = ExpDiff(logits[g * kDecodeChunk + i], new_m[g]);
          logits[g * kDecodeChunk + i] = pr;
          l[g] += pr;
        }
      }
    }
    __syncthreads();

    // 4. Weighted sum of values.
    if (d_active) {
      for (int base = group; base < chunk_len; base += kGroups * kUnroll) {
        float v[kUnroll][8];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int kk = base + u * kGroups;
          if (kk < chunk_len) {
            Load8(v_cache + static_cast<int64_t>(slots[kk]) * slot_stride + head_offset, v[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int kk = base + u * kGroups;
          if (kk < chunk_len) {
#pragma unroll
            for (int g = 0; g < kMaxG; ++g) {
              if (g < g_count) {
                const float pr = logits[g * kDecodeChunk + kk];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] += pr * v[u][e];
              }
            }
          }
        }
      }
    }
    // The next chunk overwrites logits, red and slots.
    __syncthreads();
  }

  // Reduce the running sums over the block.
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) red[warp * kMaxG + g] = l[g];
  }
  // Reduce the accumulators over the groups of a warp (lanes with equal
  // group_lane hold the same dims), then over warps through shared memory.
#pragma unroll
  for (int offset = kTG; offset < 32; offset <<= 1) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
    }
  }
  float* partial = smem;  // [warps][kMaxG][D]; logits are no longer needed
  if (lane < kTG && d_active) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g < g_count) {
#pragma unroll
        for (int e = 0; e < 8; ++e) partial[(warp * kMaxG + g) * D + d0 + e] = acc[g][e];
      }
    }
  }
  __syncthreads();

  const int64_t out_stride = static_cast<int64_t>(p.num_q_heads) * D;
  for (int i = tid; i < g_count * D; i += kDecodeThreads) {
    const int g = i / D;
    const int d = i - g * D;
    float sum = 0.0f;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      sum += partial[(w * kMaxG + g) * D + d];
      total += red[w * kMaxG + g];
    }
    const int head = head0 + g;
    if (num_splits == 1) {
      // total > 0: the query's own position is always visible.
      static_cast<bf16*>(p.out)[t * out_stride + static_cast<int64_t>(head) * D + d] =
          __float2bfloat16_rn(sum / total);
    } else {
      const int64_t idx = (static_cast<int64_t>(split) * p.num_seqs + seq) * p.num_q_heads + head;
      ws_acc[idx * D + d] = sum;
      if (d == 0) {
        // Select m[g] with constant indices so m stays in registers.
        float m_g = kNegInf;
#pragma unroll
        for (int gg = 0; gg < kMaxG; ++gg) m_g = gg == g ? m[gg] : m_g;
        ws_ml[idx * 2] = m_g;
        ws_ml[idx * 2 + 1] = total;
      }
    }
  }
}

// Merges the per-split partial results of the decode kernel: with split maxima
// m_j, sums l_j and accumulators a_j, out = sum_j e^(m_j - M) a_j /
// sum_j e^(m_j - M) l_j where M = max_j m_j. Empty splits have m_j = -inf.
__global__ void DecodeCombineKernel(const __grid_constant__ PagedAttentionParams p, int num_splits,
                                    const float* __restrict__ ws_acc,
                                    const float* __restrict__ ws_ml) {
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int q_begin = p.query_start[seq];
  if (p.query_start[seq + 1] - q_begin != 1) return;
  const int D = p.head_dim;
  const int64_t stride = static_cast<int64_t>(p.num_seqs) * p.num_q_heads;
  const int64_t base = static_cast<int64_t>(seq) * p.num_q_heads + head;

  float max_m = kNegInf;
  for (int j = 0; j < num_splits; ++j) max_m = fmaxf(max_m, ws_ml[(j * stride + base) * 2]);
  float total = 0.0f;
  for (int j = 0; j < num_splits; ++j) {
    total += ExpDiff(ws_ml[(j * stride + base) * 2], max_m) * ws_ml[(j * stride + base) * 2 + 1];
  }
  bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(q_begin) * p.num_q_heads * D +
              static_cast<int64_t>(head) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < num_splits; ++j) {
      const float w = ExpDiff(ws_ml[(j * stride + base) * 2], max_m);
      if (w != 0.0f) sum += w * ws_acc[(j * stride + base) * D + d];
    }
    out[d] = __float2bfloat16_rn(sum / total);
  }
}

// =============================================================================
// Prefill kernel
// =============================================================================
//
// Block = 256 threads arranged 16 x 16 (ty = tid / 16, tx = tid % 16). A block
// owns 64 query rows of one (sequence, kv head); row r of the sequence is
// token r / G, query head kv_head * G + r % G. Per 64-key tile:
//   S = Q K^T: thread (ty, tx) computes rows ty*4..+3 x keys tx*4..+3 from
//     Q and K stored transposed in shared memory ([d][row], [d][key], fp32)
//     so each step reads one float4 of each;
//   online softmax per row, row statistics reduced over the 16 tx lanes
//     (which share a warp) with shuffles; P goes to shared memory;
//   O += P V: the same thread owns rows ty*4..+3 x dims tx + 16*c, so the
//     rescale by exp(m_old - m_new) needs no communication.
// K and V share one shared buffer (V is loaded after S is done).

constexpr int kPrefillThreads = 256;
constexpr int kBQ = 64;             // query rows per block
constexpr int kBK = 64;             // keys per tile
constexpr int kQtStride = kBQ + 4;  // padded; keeps float4 alignment
constexpr int kKtStride = kBK + 4;
constexpr int kPStride = kBK + 1;  // padded against bank conflicts across ty

size_t PrefillSmemBytes(int head_dim) {
  const size_t qt = size_t{1} * head_dim * kQtStride;
  const size_t kv = std::max<size_t>(size_t{1} * head_dim * kKtStride, size_t{1} * kBK * head_dim);
  const size_t pp = size_t{1} * kBQ * kPStride;
  return (qt + kv + pp) * sizeof(float);
}

template <int kMaxD>
__global__ void __launch_bounds__(kPrefillThreads)
    PagedPrefillKernel(const __grid_constant__ PagedAttentionParams p) {
  constexpr int kCols = kMaxD / 16;  // output dims per thread (tx + 16 * c)

  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int q_begin = p.query_start[seq];
  const int q_len = p.query_start[seq + 1] - q_begin;
  if (q_len <= 1) return;  // decode sequences belong to the decode kernel

  const int D = p.head_dim;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int rows_total = q_len * G;
  const int row0 = blockIdx.z * kBQ;
  if (row0 >= rows_total) return;

  const int ctx = p.context_len[seq];
  const int first_pos = ctx - q_len;  // position of local token 0
  const int window = p.sliding_window;
  const int pos_first = first_pos + row0 / G;
  const int pos_last = first_pos + min(rows_total - 1, row0 + kBQ - 1) / G;
  const int key_lo = window > 0 ? max(0, pos_first - window + 1) : 0;
  const int key_hi = pos_last + 1;

  extern __shared__ __align__(16) float smem[];
  float* qt = smem;                              // [D][kQtStride]
  float* kv = qt + D * kQtStride;                // Kt [D][kKtStride] or V [kBK][D]
  float* ps = kv + max(D * kKtStride, kBK * D);  // [kBQ][kPStride]

  const int tid = threadIdx.x;
  const int ty = tid >> 4;
  const int tx = tid & 15;
  const int chunks = D / 8;  // 8-element (16-byte) pieces per head vector
  const bf16* qkv = static_cast<const bf16*>(p.qkv);
  const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
  const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
  const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t kv_head_offset = static_cast<int64_t>(kv_head) * D;

  // Q tile, transposed and pre-scaled. Consecutive threads take consecutive
  // rows so the transposed stores hit distinct banks.
  for (int idx = tid; idx < kBQ * chunks; idx += kPrefillThreads) {
    const int r = idx % kBQ;
    const int c = idx / kBQ;
    const int row = row0 + r;
    float v[8];
    if (row < rows_total) {
      const int j = row / G;
      const int head = kv_head * G + (row - j * G);
      Load8(qkv + static_cast<int64_t>(q_begin + j) * p.qkv_row_width +
                static_cast<int64_t>(head) * D + c * 8,
            v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] *= p.scale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) qt[(c * 8 + e) * kQtStride + r] = v[e];
  }

  // Per-row state of this thread's 4 rows (replicated over the 16 tx lanes).
  int row_pos[4];  // query position, or -1 for rows past the end
  int row_lo[4];   // first visible key position
  float m[4];
  float l[4];
  float acc[4][kCols];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty * 4 + i;
    row_pos[i] = row < rows_total ? first_pos + row / G : -1;
    row_lo[i] = window > 0 ? max(0, row_pos[i] - window + 1) : 0;
    m[i] = kNegInf;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.0f;
  }

  for (int key0 = key_lo; key0 < key_hi; key0 += kBK) {
    const int tile_keys = min(kBK, key_hi - key0);

    // K tile, transposed: consecutive threads take consecutive keys.
    for (int idx = tid; idx < kBK * chunks; idx += kPrefillThreads) {
      const int r = idx % kBK;
      const int c = idx / kBK;
      float v[8];
      if (r < tile_keys) {
        Load8(k_cache + SlotOf(p, seq, key0 + r) * slot_stride + kv_head_offset + c * 8, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) kv[(c * 8 + e) * kKtStride + r] = v[e];
    }
    __syncthreads();  // Q (first tile) and K visible

    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
    }
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      const float4 a = *reinterpret_cast<const float4*>(&qt[d * kQtStride + ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&kv[d * kKtStride + tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] += av[i] * bv[j];
      }
    }

    // Mask, online softmax, P to shared memory.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float tile_max = kNegInf;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = key0 + tx * 4 + j;
        const bool visible = tx * 4 + j < tile_keys && key <= row_pos[i] && key >= row_lo[i];
        s[i][j] = visible ? s[i][j] : kNegInf;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
#pragma unroll
      for (int offset = 8; offset > 0; offset >>= 1) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      const float new_m = fmaxf(m[i], tile_max);
      const float alpha = ExpDiff(m[i], new_m);
      float row_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float pr = ExpDiff(s[i][j], new_m);  // masked: exp(-inf) = 0
        row_sum += pr;
        ps[(ty * 4 + i) * kPStride + tx * 4 + j] = pr;
      }
#pragma unroll
      for (int offset = 8; offset > 0; offset >>= 1) {
        row_sum += __shfl_xor_sync(0xffffffffu, row_sum, offset);
      }
      l[i] = l[i] * alpha + row_sum;
      m[i] = new_m;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[i][c] *= alpha;
    }
    __syncthreads();  // everyone is done with K; P visible

    // V tile, row-major: consecutive threads take consecutive pieces of a key.
    for (int idx = tid; idx < kBK * chunks; idx += kPrefillThreads) {
      const int r = idx / chunks;
      const int c = idx - r * chunks;
      float v[8];
      if (r < tile_keys) {
        Load8(v_cache + SlotOf(p, seq, key0 + r) * slot_stride + kv_head_offset + c * 8, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.0f;
      }
      float4* dst = reinterpret_cast<float4*>(&kv[r * D + c * 8]);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncthreads();  // V visible

    for (int k = 0; k < tile_keys; ++k) {
      float pr[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pr[i] = ps[(ty * 4 + i) * kPStride + k];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = tx + 16 * c;
        if (d < D) {
          const float v = kv[k * D + d];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][c] += pr[i] * v;
        }
      }
    }
    __syncthreads();  // the next tile overwrites K/V and P
  }

  bf16* out = static_cast<bf16*>(p.out);
  const int64_t out_stride = static_cast<int64_t>(p.num_q_heads) * D;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty * 4 + i;
    if (row >= rows_total) continue;
    const int j = row / G;
    const int head = kv_head * G + (row - j * G);
    // l > 0: every row sees at least its own position.
    const float inv_l = 1.0f / l[i];
    bf16* dst =
        out + static_cast<int64_t>(q_begin + j) * out_stride + static_cast<int64_t>(head) * D;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = tx + 16 * c;
      if (d < D) dst[d] = __float2bfloat16_rn(acc[i][c] * inv_l);
    }
  }
}

int NextPow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

template <int kTG, int kMaxG>
cudaError_t LaunchDecodeG(const PagedAttentionParams& p, int num_splits, float* ws_acc,
                          float* ws_ml, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int head_chunks = (G + kMaxG - 1) / kMaxG;
  const dim3 grid(p.num_seqs, p.num_kv_heads * head_chunks, num_splits);
  const size_t smem = DecodeSmemBytes(kMaxG, p.head_dim);
  PagedDecodeKernel<kTG, kMaxG>
      <<<grid, kDecodeThreads, smem, stream>>>(p, num_splits, head_chunks, ws_acc, ws_ml);
  return cudaGetLastError();
}

template <int kTG>
cudaError_t LaunchDecodeTG(const PagedAttentionParams& p, int num_splits, float* ws_acc,
                           float* ws_ml, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  switch (NextPow2(std::min(G, kDecodeMaxG))) {
    case 1:
      return LaunchDecodeG<kTG, 1>(p, num_splits, ws_acc, ws_ml, stream);
    case 2:
      return LaunchDecodeG<kTG, 2>(p, num_splits, ws_acc, ws_ml, stream);
    case 4:
      return LaunchDecodeG<kTG, 4>(p, num_splits, ws_acc, ws_ml, stream);
    default:
      return LaunchDecodeG<kTG, 8>(p, num_splits, ws_acc, ws_ml, stream);
  }
}

cudaError_t LaunchDecode(const PagedAttentionParams& p, int num_splits, float* ws_acc, float* ws_ml,
                         cudaStream_t stream) {
  switch (NextPow2(p.head_dim / 8)) {
    case 1:
      return LaunchDecodeTG<1>(p, num_splits, ws_acc, ws_ml, stream);
    case 2:
      return LaunchDecodeTG<2>(p, num_splits, ws_acc, ws_ml, stream);
    case 4:
      return LaunchDecodeTG<4>(p, num_splits, ws_acc, ws_ml, stream);
    case 8:
      return LaunchDecodeTG<8>(p, num_splits, ws_acc, ws_ml, stream);
    case 16:
      return LaunchDecodeTG<16>(p, num_splits, ws_acc, ws_ml, stream);
    case 32:
      return LaunchDecodeTG<32>(p, num_splits, ws_acc, ws_ml, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <int kMaxD>
cudaError_t LaunchPrefillD(const PagedAttentionParams& p, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int64_t row_tiles = (static_cast<int64_t>(p.max_query_len) * G + kBQ - 1) / kBQ;
  if (row_tiles > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = PrefillSmemBytes(p.head_dim);
  // Above 48 KiB dynamic shared memory needs an explicit opt-in (per device,
  // so it is set on every launch rather than cached).
  const cudaError_t attr =
      cudaFuncSetAttribute(PagedPrefillKernel<kMaxD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(p.num_seqs, p.num_kv_heads, static_cast<unsigned>(row_tiles));
  PagedPrefillKernel<kMaxD><<<grid, kPrefillThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchPrefill(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.head_dim <= 32) return LaunchPrefillD<32>(p, stream);
  if (p.head_dim <= 64) return LaunchPrefillD<64>(p, stream);
  if (p.head_dim <= 128) return LaunchPrefillD<128>(p, stream);
  return LaunchPrefillD<256>(p, stream);
}

}  // namespace

int ChooseDecodeSplits(const PagedAttentionParams& p, int num_sms) {
  if (!p.has_decode || p.num_seqs <= 0 || p.num_kv_heads <= 0) return 1;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int head_chunks = (G + kDecodeMaxG - 1) / kDecodeMaxG;
  const int64_t blocks = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads * head_chunks;
  // About 3 blocks per SM: roughly what can be resident at the decode
  // kernel's register use, so every SM has loads in flight. (Measured on
  // H100: 3 beats 2, 6 and 12 for 1-64 sequences of 1k-32k tokens.)
  const int64_t target = 3 * static_cast<int64_t>(std::max(num_sms, 1));
  if (blocks >= target) return 1;
  int keys = p.max_context_len;
  if (p.sliding_window > 0) keys = std::min(keys, p.sliding_window);
  constexpr int kMinKeysPerSplit = 256;
  const int64_t by_keys = std::max(1, (keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  const int64_t by_occupancy = (target + blocks - 1) / blocks;
  return static_cast<int>(std::clamp<int64_t>(std::min(by_keys, by_occupancy), 1, 256));
}

size_t DecodeWorkspaceBytes(const PagedAttentionParams& p, int num_splits) {
  if (num_splits <= 1) return 0;
  const size_t rows = size_t{1} * num_splits * p.num_seqs * p.num_q_heads;
  return rows * (p.head_dim + 2) * sizeof(float);
}

cudaError_t LaunchPagedAttention(const PagedAttentionParams& p, int num_splits, void* workspace,
                                 cudaStream_t stream) {
  if (p.num_seqs <= 0) return cudaSuccess;
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > kMaxHeadDim || p.num_kv_heads <= 0 ||
      p.num_q_heads % p.num_kv_heads != 0 || p.page_size <= 0 || num_splits < 1 ||
      num_splits > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.has_decode) {
    float* ws_acc = static_cast<float*>(workspace);
    float* ws_ml = ws_acc == nullptr
                       ? nullptr
                       : ws_acc + size_t{1} * num_splits * p.num_seqs * p.num_q_heads * p.head_dim;
    if (num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = LaunchDecode(p, num_splits, ws_acc, ws_ml, stream);
    if (err != cudaSuccess) return err;
    if (num_splits > 1) {
      const dim3 grid(p.num_seqs, p.num_q_heads);
      const int block = std::min(256, ((p.head_dim + 31) / 32) * 32);
      DecodeCombineKernel<<<grid, block, 0, stream>>>(p, num_splits, ws_acc, ws_ml);
      const cudaError_t combine = cudaGetLastError();
      if (combine != cudaSuccess) return combine;
    }
  }
  if (p.has_prefill) {
    const cudaError_t err = LaunchPrefill(p, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace strata::cuda::kernels
