// Warpgroup tensor-core prefill attention (see prefill_attention_wgmma.h).
//
// Q, and each stage of K and V, is a 128-row tile in the 128-byte-swizzled
// layout of wgmma.cuh: Q (A) and K (B) are K-major operands of S = Q K^T,
// V the N-major B operand of O = P V. S's accumulators for columns
// 16kk .. 16kk + 15 are exactly P's A fragment for k step kk, so P never
// leaves registers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernels/prefill_attention_wgmma.h"
#include "cuda/kernels/prefill_tile.cuh"
#include "cuda/kernels/ptx.cuh"
#include "cuda/kernels/wgmma.cuh"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kD = 128;
constexpr int kRows = 128;  // query rows per block: two warpgroups of 64
constexpr int kKeys = 128;  // keys per K/V tile
constexpr int kThreads = 256;
// K/V stages: the copies of the next tile are in flight while one is used.
// (Three stages with copies two tiles ahead measured slower on an H100:
// 2.40 against 2.15 ms at 8k, as did issuing the copies after S's wgmmas.)
constexpr int kStages = 2;
// V keeps one stage more: warpgroup 1 multiplies by a tile's V one
// iteration after the other warpgroup (see the main loop).
constexpr int kVStages = 3;
constexpr uint32_t kBlockBytes = SwizzledBlockBytes(128);  // one 64-dim column block
constexpr uint32_t kTileBytes = 2 * kBlockBytes;           // 128 rows x 128 dims, bf16
constexpr size_t kSmemBytes =
    1024 + size_t{kTileBytes} * (1 + kStages + kVStages);  // + alignment: 193 KiB
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kRows == kKeys, "tiles share one layout");

__global__ void __launch_bounds__(kThreads, 1)
    WgmmaPrefillKernel(const __grid_constant__ PagedAttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  PrefillTile block_tile;
  if (!GetPrefillTile(p, kRows, block_tile)) return;
  const int seq = blockIdx.z;
  const int kv_head = blockIdx.x;
  const int q_begin = block_tile.q_begin;
  const int G = block_tile.group;
  const int rows_total = block_tile.rows_total;
  const int row0 = block_tile.row0;
  const int first_pos = block_tile.first_pos;
  const int window = p.sliding_window;
  const int pos_first = block_tile.pos_first;
  const int pos_last = block_tile.pos_last;
  const int key_lo = block_tile.key_lo;
  const int key_hi = block_tile.key_hi;  // exclusive
  const int num_tiles = (key_hi - key_lo + kKeys - 1) / kKeys;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle atoms must sit on 1024-byte boundaries.
  const uint32_t base = (SharedAddress(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_smem = base;
  const uint32_t k_smem = q_smem + kTileBytes;            // [kStages] tiles
  const uint32_t v_smem = k_smem + kStages * kTileBytes;  // [kVStages] tiles

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  // Warpgroup: rows 64 wg .. 64 wg + 63 of the block. Read through a shuffle
  // so that the compiler sees a warp-uniform value: wgmma under a branch it
  // considers divergent gets serialized.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const bf16* qkv = static_cast<const bf16*>(p.qkv);
  const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
  const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
  const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * kD;
  const int32_t* table = p.block_table + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  // Q tile: rows past the chunk are zero (their results are never stored).
#pragma unroll
  for (int i = 0; i < kRows * 16 / kThreads; ++i) {
    const int id = tid + i * kThreads;
    const int r = id / 16, c = id % 16;
    const int row = row0 + r;
    const bf16* src = qkv;
    int bytes = 0;
    if (row < rows_total) {
      const int j = row / G;
      const int head = kv_head * G + (row - j * G);
      src = qkv + static_cast<int64_t>(q_begin + j) * p.qkv_row_width +
            static_cast<int64_t>(head) * kD + c * 8;
      bytes = 16;
    }
    CpAsync16(q_smem + SwizzledTileOffset(128, r, c), src, bytes);
  }
  CpAsyncCommit();

  // Gathers keys key0 .. key0 + kKeys - 1 of K and V into `stage`, each
  // key row looked up in the block table on its own; keys at or past key_hi
  // are zero-filled so that a NaN in an unwritten cache slot cannot reach O
  // through 0 * NaN. (Reading the block-table entries a tile ahead, in
  // registers, measured slower on an H100: 2.45-2.55 against 2.15 ms at 8k.)
  auto load_tile = [&](int key0, int k_stage, int v_stage) {
#pragma unroll
    for (int i = 0; i < kKeys * 16 / kThreads; ++i) {
      const int id = tid + i * kThreads;
      const int r = id / 16, c = id % 16;
      const int pos = key0 + r;
      int64_t offset = 0;
      int bytes = 0;
      if (pos < key_hi) {
        const int page = table[pos / p.page_size];
        const int64_t slot = static_cast<int64_t>(page) * p.page_size + pos % p.page_size;
        offset = slot * slot_stride + static_cast<int64_t>(kv_head) * kD + c * 8;
        bytes = 16;
      }
      CpAsync16(k_smem + k_stage * kTileBytes + SwizzledTileOffset(128, r, c), k_cache + offset,
                bytes);
      CpAsync16(v_smem + v_stage * kTileBytes + SwizzledTileOffset(128, r, c), v_cache + offset,
                bytes);
    }
  };
  load_tile(key_lo, 0, 0);
  CpAsyncCommit();

  // This thread's rows: g and g + 8 of its warp's 16. Rows past the chunk
  // take the last row's position so their softmax stays finite.
  int row_pos[2], row_lo[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = min(row0 + 64 * wg + 16 * (warp % 4) + g + 8 * h, rows_total - 1);
    row_pos[h] = first_pos + row / G;
    row_lo[h] = window > 0 ? row_pos[h] - window + 1 : 0;
  }
  const float scale_log2 = p.scale * kLog2e;  // softmax in base 2

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};

  // O += P V of the tile whose V sits in `v_stage` (P in pa).
  uint32_t pa[kKeys / 16][4];
  auto issue_pv = [&](int v_stage) {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint64_t desc_v =
          Descriptor(v_smem + v_stage * kTileBytes + 16 * kk * 128, kBlockBytes, 1024);
      WgmmaRS(o, pa[kk], desc_v);
    }
  };

  // The two warpgroups are staggered: warpgroup 1 issues O += P V of the
  // previous tile together with S of this one, so each warpgroup's softmax
  // runs while the other's products keep the tensor cores busy (in lockstep,
  // both softmaxes would leave them idle at once).
  for (int it = 0; it < num_tiles; ++it) {
    const int key0 = key_lo + it * kKeys;
    const int stage = it % kStages;
    CpAsyncWait<0>();  // Q and this tile have landed (this thread's copies)
    FenceProxyAsync();
    // Every thread's copies of this tile are visible, and both warpgroups
    // are done with the previous iteration, so the stages of the next tile
    // are free (K's held tile it - 1; V's held tile it - 2, which warpgroup 1
    // multiplied by in the previous iteration).
    __syncthreads();
    if (it + 1 < num_tiles) load_tile(key0 + kKeys, (it + 1) % kStages, (it + 1) % kVStages);
    CpAsyncCommit();

    // S = Q K^T: 8 k steps of 16 dims (warpgroup 1: after the previous P V).
    float s[64];
    PinRegisters(o);
    WgmmaFence();
    if (wg == 1 && it > 0) issue_pv((it - 1) % kVStages);
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const uint32_t k_offset = (ks / 4) * kBlockBytes + (ks % 4) * 32;
      const uint64_t desc_q = Descriptor(q_smem + 64 * wg * 128 + k_offset, 16, 1024);
      const uint64_t desc_k = Descriptor(k_smem + stage * kTileBytes + k_offset, 16, 1024);
      WgmmaSS(s, desc_q, desc_k, ks > 0 ? 1 : 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(s);
    PinRegisters(o);

    // Masks only where the tile crosses some row's visible range: the causal
    // edge (a key past the first row's position) or a window's lower edge.
    // Scores stay unscaled: the running max is kept on raw scores (the scale
    // is positive) and the scale folds into the exponent's FMA.
    const bool need_mask =
        key0 + kKeys - 1 > pos_first || (window > 0 && key0 < pos_last - window + 1);
    if (need_mask) {
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * j + 2 * t + (e & 1);
          const int h = e / 2;
          if (key > row_pos[h] || key < row_lo[h] || key >= key_hi) s[4 * j + e] = -INFINITY;
        }
      }
    }
    // Online softmax in base 2; the 4 lanes of a quad share a row. Four
    // partial maxima and sums keep the dependency chains short.
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float part[4] = {m[h], -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
        part[j % 4] = fmaxf(part[j % 4], fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
      }
      float mx = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row that has seen only masked keys keeps max -inf; an offset of 0
      // then gives exp2(-inf) = 0 instead of NaN from -inf - -inf.
      const float offset = mx == -INFINITY ? 0.0f : -mx * scale_log2;
      alpha[h] = FastExp2(fmaf(m[h], scale_log2, offset));
      m[h] = mx;
      float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
        s[4 * j + 2 * h] = FastExp2(fmaf(s[4 * j + 2 * h], scale_log2, offset));
        s[4 * j + 2 * h + 1] = FastExp2(fmaf(s[4 * j + 2 * h + 1], scale_log2, offset));
        sum[j % 4] += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
      }
      l[h] = l[h] * alpha[h] + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
    }
    // The max rarely grows after the first tiles: rescale O only when it did
    // for some row of the warp.
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        o[4 * j] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      pa[kk][0] = PackBf16(s[8 * kk], s[8 * kk + 1]);
      pa[kk][1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
    }

    // Warpgroup 0: O += P V now (warpgroup 1: next iteration).
    if (wg == 0) {
      PinRegisters(o);
      WgmmaFence();
      issue_pv(it % kVStages);
      WgmmaCommit();
      WgmmaWait<0>();
      PinRegisters(o);
    }
  }
  if (wg == 1 && num_tiles > 0) {
    PinRegisters(o);
    WgmmaFence();
    issue_pv((num_tiles - 1) % kVStages);
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(o);
  }

  // Normalise and store. l > 0 for stored rows: every row sees its own key.
  bf16* out = static_cast<bf16*>(p.out);
  const int64_t out_stride = static_cast<int64_t>(p.num_q_heads) * kD;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = row0 + 64 * wg + 16 * (warp % 4) + g + 8 * h;
    if (row >= rows_total) continue;
    const float inv = 1.0f / sum;
    const int j = row / G;
    const int head = kv_head * G + (row - j * G);
    bf16* dst = out + static_cast<int64_t>(q_begin + j) * out_stride +
                static_cast<int64_t>(head) * kD + 2 * t;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      *reinterpret_cast<__nv_bfloat162*>(dst + n * 8) =
          __floats2bfloat162_rn(o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv);
    }
  }
#else
  __trap();  // built without sm_90a: CanUseWgmmaPrefill keeps launches away
#endif
}

}  // namespace

bool CanUseWgmmaPrefill(const PagedAttentionParams& p) {
  // The softmax keeps its running max on unscaled scores: the scale must be
  // positive (it is 1 / sqrt(head_dim) in every model).
  if (p.head_dim != kD || p.kv_fp8 || !(p.scale > 0.0f)) return false;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.page_size <= 0) return false;
  if (p.num_kv_heads > 65535 || p.num_seqs > 65535 || p.qkv_row_width % 8 != 0) return false;
  const int64_t row_tiles =
      (static_cast<int64_t>(p.max_query_len) * (p.num_q_heads / p.num_kv_heads) + kRows - 1) /
      kRows;
  if (row_tiles > 65535) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major == 9;
}

cudaError_t LaunchWgmmaPrefill(const PagedAttentionParams& p, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int64_t row_tiles = (static_cast<int64_t>(p.max_query_len) * G + kRows - 1) / kRows;
  // Above 48 KiB dynamic shared memory needs an explicit opt-in (per device,
  // so it is set on every launch rather than cached).
  const cudaError_t attr =
      cudaFuncSetAttribute(WgmmaPrefillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kSmemBytes));
  if (attr != cudaSuccess) return attr;
  // x = kv head, y = row tile (reversed in the kernel), z = sequence.
  const dim3 grid(p.num_kv_heads, static_cast<unsigned>(row_tiles), p.num_seqs);
  WgmmaPrefillKernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace strata::cuda::kernels
