// Warpgroup tensor-core prefill attention (see prefill_attention_wgmma.h).
//
// Shared-memory tiles (Q, and each stage of K and V) hold 128 rows of 128
// bf16 as two column blocks of 64 (128 bytes per row): block b covers dims
// 64b..64b+63, row r of it starts at byte r * 128, and its 16-byte chunk c is
// stored at chunk c ^ (r % 8). That is the 128-byte swizzle the tensor cores
// apply to 1024-byte-aligned groups of 8 rows, so a matrix descriptor with
// swizzle mode 128B reads the tiles as written:
//   K-major operands (Q as A, K as B for S = Q K^T): 8-row groups 1024 bytes
//     apart (stride byte offset); k step ks (16 dims) starts 32 * (ks % 4)
//     bytes into block ks / 4;
//   V as B of O = P V, N-major ("transposed"): 8-key groups 1024 bytes apart
//     (stride byte offset), the two 64-dim blocks 16 KiB apart (leading byte
//     offset); k step kk (16 keys) starts at row 16 kk.
// Accumulator layout (m64nNk16, fp32), warp w of a warpgroup, lane (g =
// lane / 4, t = lane % 4): d[4j + e] is row 16w + g + 8 (e / 2), column
// 8j + 2t + e % 2, the mma.sync C layout repeated over the 8-column groups;
// the A-from-registers layout is mma.sync's A layout, so S's columns 16kk ..
// 16kk + 15 become P's A fragment for k step kk without moving.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernels/prefill_attention_wgmma.h"
#include "cuda/kernels/ptx.cuh"

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
constexpr uint32_t kBlockBytes = 128 * 128;       // one 64-dim column block of a tile
constexpr uint32_t kTileBytes = 2 * kBlockBytes;  // 128 rows x 128 dims, bf16
constexpr size_t kSmemBytes =
    1024 + size_t{kTileBytes} * (1 + kStages + kVStages);  // + alignment: 193 KiB
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kRows == kKeys, "tiles share one layout");

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a tile.
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return (chunk >> 3) * kBlockBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// A wgmma shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ uint64_t Descriptor(uint32_t smem_addr, uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  uint64_t desc = (smem_addr & 0x3ffffu) >> 4;
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3fffu) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3fffu) << 32;
  desc |= uint64_t{1} << 62;  // swizzle mode: 128 bytes
  return desc;
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across
// the asynchronous wgmma issue / wait points.
template <int kN>
__device__ __forceinline__ void PinRegisters(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Orders this thread's generic-proxy shared-memory writes (cp.async) before
// the tensor cores' (async-proxy) reads that follow the next barrier.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d (64 x 128, fp32) = (scale_d ? d : 0) + A B on one warpgroup, A and B
// bf16 from shared memory (descriptors), both K-major: S = Q K^T.
__device__ __forceinline__ void WgmmaSS(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                        int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d (64 x 128, fp32) += A B on one warpgroup, A (64 x 16 bf16) from
// registers in the mma.sync A layout, B bf16 from shared memory, N-major
// (transposed): O += P V.
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
#endif

__global__ void __launch_bounds__(kThreads, 1)
    WgmmaPrefillKernel(const __grid_constant__ PagedAttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int seq = blockIdx.z;
  const int kv_head = blockIdx.x;
  const int q_begin = p.query_start[seq];
  const int q_len = p.query_start[seq + 1] - q_begin;
  if (q_len <= 1) return;  // decode sequences belong to the decode kernel

  const int G = p.num_q_heads / p.num_kv_heads;
  const int rows_total = q_len * G;
  // Row tiles run last-first: the tiles nearest the end of the chunk see the
  // most keys, and starting them first keeps the tail of the grid short.
  const int row_tiles = (rows_total + kRows - 1) / kRows;
  const int tile = static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y);
  if (tile >= row_tiles) return;
  const int row0 = tile * kRows;

  const int ctx = p.context_len[seq];
  const int first_pos = ctx - q_len;  // position of local token 0
  const int window = p.sliding_window;
  const int last_row = min(rows_total - 1, row0 + kRows - 1);
  const int pos_first = first_pos + row0 / G;
  const int pos_last = first_pos + last_row / G;
  const int key_lo = window > 0 ? max(0, pos_first - window + 1) : 0;
  const int key_hi = pos_last + 1;  // exclusive
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
    CpAsync16(q_smem + TileOffset(r, c), src, bytes);
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
      CpAsync16(k_smem + k_stage * kTileBytes + TileOffset(r, c), k_cache + offset, bytes);
      CpAsync16(v_smem + v_stage * kTileBytes + TileOffset(r, c), v_cache + offset, bytes);
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
