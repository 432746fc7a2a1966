// Tensor-core prefill attention (see prefill_attention_tc.h for the design).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16, g = lane / 4,
// t = lane % 4):
//   A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//     a3 = (g+8, 2t+8..);
//   B (16x8, "col": k contiguous per column n): b0 = (k 2t..2t+1, n g),
//     b1 = (k 2t+8.., n g);
//   C (16x8 fp32): c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).
// S = Q K^T takes K[key][dim] as B directly (dims contiguous per key), so K
// is read with plain ldmatrix; O = P V needs V[key][dim] as B with keys
// contiguous per dim, so V is read with ldmatrix.trans. The C layout of two
// adjacent 8-key S tiles is exactly the A layout of a 16-key P chunk, so P
// never leaves registers.
//
// Shared memory rows (one per query row or key) hold head_dim bf16 in 16-byte
// chunks; chunk c of row r is stored at chunk c ^ (r % 8), so the 8 rows an
// ldmatrix phase reads at one logical chunk land in 8 different bank groups.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernels/fp8.cuh"
#include "cuda/kernels/prefill_attention_tc.h"
#include "cuda/kernels/prefill_tile.cuh"
#include "cuda/kernels/ptx.cuh"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

// Each warp owns kWarpTiles m16 tiles of query rows (16 * kWarpTiles rows),
// so every K/V fragment that ldmatrix brings out of shared memory feeds
// kWarpTiles MMAs. kMinRows bounds the rows of any block from below (the
// grid-size check in CanUseTensorCorePrefill uses it).
constexpr int kMinRows = 64;
// 8 warps x 32 rows (256 rows per block, one block per SM). Measured on an
// H100 at the Llama-3-8B shape (8k / 32k causal): 8 x 16 rows 2.55 / 37.9 ms,
// 4 x 32 rows (two blocks per SM) 2.66 / 38.7 ms, 8 x 32 rows 2.52 / 36.0 ms.
// Halving the shared-memory traffic per MMA gained only ~5% at 32k: the
// kernel is bound by latency (two warps per scheduler, each running
// QK^T -> softmax -> PV in series), not by shared-memory bandwidth; the
// larger block gains mostly from each K/V tile serving twice the rows.
constexpr int kLaunchWarps = 8;
constexpr int kLaunchWarpTiles = 2;
constexpr int kKeys = 64;  // keys per K/V tile
constexpr int kStages = 2;
constexpr float kLog2e = 1.4426950408889634f;

template <int kD, int kWarps, int kWarpTiles, bool kFp8>
constexpr size_t SmemBytes() {
  // Q tile + kStages x (K tile + V tile), bf16; with an fp8 cache also
  // kStages x (K + V) of the raw fp8 tiles the copies land in.
  return size_t{2} * kD * (16 * kWarpTiles * kWarps + 2 * kStages * kKeys) +
         (kFp8 ? size_t{1} * kStages * 2 * kKeys * kD : 0);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile.
template <int kD>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * (kD * 2) + ((chunk ^ (row & 7)) << 4));
}

// 8 warps per SM in all shapes (two blocks of 4 warps or one of 8): at up to
// 255 registers a thread no more fit.
// kFp8: the caches hold fp8 e4m3. Each thread's cp.async copies then land
// in raw fp8 staging, and once they have arrived the same thread widens its
// own chunks into the bf16 tile (exactly), so the rest of the kernel is the
// same and the copies stay asynchronous.
template <int kD, int kWarps, int kWarpTiles, bool kFp8>
__global__ void __launch_bounds__(kWarps * 32, 8 / kWarps)
    TensorCorePrefillKernel(const __grid_constant__ PagedAttentionParams p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kWarpRows = 16 * kWarpTiles;
  constexpr int kRows = kWarpRows * kWarps;  // query rows per block
  constexpr int kChunks = kD / 8;            // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;
  constexpr int kKPasses = kKeys / kRowsPerPass;
  constexpr int kQPasses = kRows / kRowsPerPass;
  constexpr int kDTiles = kD / 8;   // 8-wide n tiles of O
  constexpr int kDSteps = kD / 16;  // 16-wide k steps of S = Q K^T
  // Keys per softmax step: with two m tiles the 64-key tile is consumed in
  // two 32-key steps (not unrolled), since O (128 registers at head_dim 128)
  // plus S of 64 keys (64) spill; unrolled, ptxas interleaves the steps and
  // spills too. At head_dim 64 the 64-key step spilled as well (24 bytes).
  constexpr int kSubKeys = kWarpTiles >= 2 ? 32 : kKeys;
  constexpr int kKeyTiles = kSubKeys / 8;
  // Q fragments take 4 * kDSteps registers per m tile; with two tiles at
  // head_dim 128 (64 registers) they would not fit beside O (128) and S (64),
  // so that shape re-reads them from shared memory at every k step.
  constexpr bool kQInRegs = kWarpTiles * kDSteps <= 8;
  constexpr int kQRegSteps = kQInRegs ? kDSteps : 1;
  static_assert(kThreads % kChunks == 0 && kKeys % kRowsPerPass == 0, "copy shape");

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

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t q_smem = smem_base;
  const uint32_t k_smem = q_smem + kRows * kD * 2;            // [kStages][kKeys][kD]
  const uint32_t v_smem = k_smem + kStages * kKeys * kD * 2;  // [kStages][kKeys][kD]
  constexpr uint32_t kStageBytes = kKeys * kD * 2;
  // kFp8: [kStages][K, V][kKeys][kD] fp8, rows unswizzled.
  const uint32_t raw_smem = v_smem + kStages * kStageBytes;
  constexpr uint32_t kRawBytes = kKeys * kD;  // one fp8 K (or V) tile

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int chunk = tid % kChunks;  // this thread's 16-byte chunk in copies
  const int copy_row = tid / kChunks;

  const bf16* qkv = static_cast<const bf16*>(p.qkv);
  const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * kD;
  const int32_t* table = p.block_table + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  // Q tile: rows past the chunk are zero (their results are never stored).
#pragma unroll
  for (int i = 0; i < kQPasses; ++i) {
    const int r = copy_row + i * kRowsPerPass;
    const int row = row0 + r;
    const bf16* src = qkv;
    int bytes = 0;
    if (row < rows_total) {
      const QueryRowPlace at = PlaceQueryRow(q_begin, G, kv_head, row);
      src = qkv + at.token * p.qkv_row_width + static_cast<int64_t>(at.head) * kD + chunk * 8;
      bytes = 16;
    }
    CpAsync16(q_smem + SwizzledOffset<kD>(r, chunk), src, bytes);
  }
  CpAsyncCommit();

  // Gathers keys key0 .. key0 + kKeys - 1 of K and V into `stage`: each key
  // row is looked up in the block table on its own, so a tile may span any
  // number of pages. Keys at or past key_hi are zero-filled so that a NaN in
  // an unwritten cache slot cannot reach O through 0 * NaN.
  auto load_tile = [&](int key0, int stage) {
#pragma unroll
    for (int i = 0; i < kKPasses; ++i) {
      const int r = copy_row + i * kRowsPerPass;
      const int pos = key0 + r;
      int64_t offset = 0;
      int bytes = 0;
      if (pos < key_hi) {
        const int page = table[pos / p.page_size];
        const int64_t slot = static_cast<int64_t>(page) * p.page_size + pos % p.page_size;
        offset = slot * slot_stride + static_cast<int64_t>(kv_head) * kD + chunk * 8;
        bytes = 16;
      }
      if constexpr (kFp8) {
        const uint32_t raw = raw_smem + stage * 2 * kRawBytes + r * kD + chunk * 8;
        CpAsync8(raw, static_cast<const __nv_fp8_e4m3*>(p.k_cache) + offset, bytes / 2);
        CpAsync8(raw + kRawBytes, static_cast<const __nv_fp8_e4m3*>(p.v_cache) + offset, bytes / 2);
      } else {
        const uint32_t dst = SwizzledOffset<kD>(r, chunk) + stage * kStageBytes;
        CpAsync16(k_smem + dst, static_cast<const bf16*>(p.k_cache) + offset, bytes);
        CpAsync16(v_smem + dst, static_cast<const bf16*>(p.v_cache) + offset, bytes);
      }
    }
  };
  // kFp8: widens this thread's chunks of `stage` (its copies have landed)
  // into the bf16 tiles. Zero-filled chunks widen to zeros.
  auto widen_tile = [&](int stage) {
    if constexpr (kFp8) {
      const unsigned char* raw_base = smem + (raw_smem - smem_base) + stage * 2 * kRawBytes;
#pragma unroll
      for (int i = 0; i < kKPasses; ++i) {
        const int r = copy_row + i * kRowsPerPass;
        const uint32_t dst = SwizzledOffset<kD>(r, chunk) + stage * kStageBytes;
#pragma unroll
        for (int kv = 0; kv < 2; ++kv) {
          const uint2 raw =
              *reinterpret_cast<const uint2*>(raw_base + kv * kRawBytes + r * kD + chunk * 8);
          const uint32_t words[2] = {raw.x, raw.y};
          uint32_t packed[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = Fp8x2ToFloat2(words[e / 2] >> (16 * (e % 2)));
            packed[e] = PackBf16(f.x, f.y);
          }
          *reinterpret_cast<uint4*>(smem + (kv == 0 ? k_smem : v_smem) - smem_base + dst) =
              make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
      }
    }
  };

  load_tile(key_lo, 0);
  CpAsyncCommit();
  CpAsyncWait<1>();  // Q has landed (tile 0 may still be in flight)
  __syncthreads();

  // Row of this lane's ldmatrix address within m tile mi of this warp's Q.
  const int q_lane_row = warp * kWarpRows + (lane % 16);
  // Q fragments kept in registers for all tiles where they fit (see kQInRegs).
  uint32_t q_frag[kWarpTiles][kQRegSteps][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
      for (int ks = 0; ks < kDSteps; ++ks) {
        LdMatrixX4(q_smem + SwizzledOffset<kD>(q_lane_row + 16 * mi, 2 * ks + lane / 16),
                   q_frag[mi][ks]);
      }
    }
  }

  // This thread's rows: g and g + 8 of each of the warp's m tiles. Rows past
  // the chunk take the last row's position so their softmax stays finite
  // (never stored).
  const int g = lane / 4;
  const int t = lane % 4;
  int row_pos[kWarpTiles][2];
  int row_lo[kWarpTiles][2];
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row0 + warp * kWarpRows + 16 * mi + g + 8 * h, rows_total - 1);
      row_pos[mi][h] = first_pos + row / G;
      row_lo[mi][h] = window > 0 ? row_pos[mi][h] - window + 1 : 0;
    }
  }
  const float scale_log2 = p.scale * kLog2e;  // softmax in base 2

  float o[kWarpTiles][kDTiles][4];
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][n][e] = 0.0f;
    }
  }
  // Running max (scaled log2 units) and this thread's share of the row sums,
  // per m tile and half (row g or g + 8).
  float m[kWarpTiles][2];
  float l[kWarpTiles][2];
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.0f;
  }

  for (int it = 0; it < num_tiles; ++it) {
    const int key0 = key_lo + it * kKeys;
    const int stage = it % kStages;
    // Prefetch the next tile into the other stage while this one is used;
    // the barrier at the end of the previous iteration freed that stage.
    if (it + 1 < num_tiles) load_tile(key0 + kKeys, (it + 1) % kStages);
    CpAsyncCommit();  // possibly empty, keeping the group count uniform
    CpAsyncWait<1>();
    widen_tile(stage);
    __syncthreads();

#pragma unroll 1
    for (int sub = 0; sub < kKeys / kSubKeys; ++sub) {
      const int key0s = key0 + sub * kSubKeys;
      const uint32_t k_tile = k_smem + stage * kStageBytes + sub * kSubKeys * kD * 2;
      const uint32_t v_tile = v_smem + stage * kStageBytes + sub * kSubKeys * kD * 2;

      // S = Q K^T for this warp's rows x kSubKeys keys.
      float s[kWarpTiles][kKeyTiles][4];
#pragma unroll
      for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][n][e] = 0.0f;
        }
      }
#pragma unroll
      for (int ks = 0; ks < kDSteps; ++ks) {
        uint32_t q_step[kWarpTiles][4];
#pragma unroll
        for (int mi = 0; mi < kWarpTiles; ++mi) {
          if constexpr (kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) q_step[mi][e] = q_frag[mi][ks][e];
          } else {
            LdMatrixX4(q_smem + SwizzledOffset<kD>(q_lane_row + 16 * mi, 2 * ks + lane / 16),
                       q_step[mi]);
          }
        }
#pragma unroll
        for (int np = 0; np < kKeyTiles / 2; ++np) {
          // Matrices: keys np*16 + 0..7 at dims ks*16 + 0..7 / 8..15, then keys
          // np*16 + 8..15 likewise: b0/b1 of key tiles 2np and 2np + 1.
          const int key = np * 16 + (lane % 8) + (lane / 16) * 8;
          uint32_t b[4];
          LdMatrixX4(k_tile + SwizzledOffset<kD>(key, 2 * ks + (lane / 8) % 2), b);
#pragma unroll
          for (int mi = 0; mi < kWarpTiles; ++mi) {
            MmaBf16(s[mi][2 * np], q_step[mi], b[0], b[1]);
            MmaBf16(s[mi][2 * np + 1], q_step[mi], b[2], b[3]);
          }
        }
      }

      // Masks only where the tile crosses some row's visible range: the causal
      // edge (a key past the first row's position) or a window's lower edge.
      const bool need_mask =
          key0s + kSubKeys - 1 > pos_first || (window > 0 && key0s < pos_last - window + 1);
#pragma unroll
      for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float v = s[mi][n][e] * scale_log2;
            if (need_mask) {
              const int key = key0s + n * 8 + 2 * t + (e & 1);
              const int h = e / 2;
              if (key > row_pos[mi][h] || key < row_lo[mi][h]) v = -INFINITY;
            }
            s[mi][n][e] = v;
          }
        }
      }

      // Online softmax; the 4 lanes of a quad share a row.
#pragma unroll
      for (int mi = 0; mi < kWarpTiles; ++mi) {
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = m[mi][h];
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n) {
            mx = fmaxf(mx, fmaxf(s[mi][n][2 * h], s[mi][n][2 * h + 1]));
          }
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // A row that has seen only masked keys keeps max -inf; subtracting 0
          // then gives exp2(-inf) = 0 instead of NaN from -inf - -inf.
          const float base = mx == -INFINITY ? 0.0f : mx;
          alpha[h] = FastExp2(m[mi][h] - base);
          m[mi][h] = mx;
          float sum = 0.0f;
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n) {
            s[mi][n][2 * h] = FastExp2(s[mi][n][2 * h] - base);
            s[mi][n][2 * h + 1] = FastExp2(s[mi][n][2 * h + 1] - base);
            sum += s[mi][n][2 * h] + s[mi][n][2 * h + 1];
          }
          l[mi][h] = l[mi][h] * alpha[h] + sum;
        }
#pragma unroll
        for (int n = 0; n < kDTiles; ++n) {
          o[mi][n][0] *= alpha[0];
          o[mi][n][1] *= alpha[0];
          o[mi][n][2] *= alpha[1];
          o[mi][n][3] *= alpha[1];
        }
      }

      // O += P V: P chunk kc (keys kc*16 .. +15) is S tiles 2kc and 2kc + 1.
#pragma unroll
      for (int kc = 0; kc < kSubKeys / 16; ++kc) {
        uint32_t a[kWarpTiles][4];
#pragma unroll
        for (int mi = 0; mi < kWarpTiles; ++mi) {
          a[mi][0] = PackBf16(s[mi][2 * kc][0], s[mi][2 * kc][1]);
          a[mi][1] = PackBf16(s[mi][2 * kc][2], s[mi][2 * kc][3]);
          a[mi][2] = PackBf16(s[mi][2 * kc + 1][0], s[mi][2 * kc + 1][1]);
          a[mi][3] = PackBf16(s[mi][2 * kc + 1][2], s[mi][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          // Matrices (transposed): keys kc*16 + 0..7 / 8..15 at dims dp*16 +
          // 0..7, then the same at dims dp*16 + 8..15: b0/b1 of dim tiles 2dp
          // and 2dp + 1.
          const int key = kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
          uint32_t b[4];
          LdMatrixX4Trans(v_tile + SwizzledOffset<kD>(key, 2 * dp + lane / 16), b);
#pragma unroll
          for (int mi = 0; mi < kWarpTiles; ++mi) {
            MmaBf16(o[mi][2 * dp], a[mi], b[0], b[1]);
            MmaBf16(o[mi][2 * dp + 1], a[mi], b[2], b[3]);
          }
        }
      }
    }                 // sub
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  // Normalise and store. l > 0 for stored rows: every row sees its own key.
  bf16* out = static_cast<bf16*>(p.out);
  const int64_t out_stride = static_cast<int64_t>(p.num_q_heads) * kD;
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[mi][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int row = row0 + warp * kWarpRows + 16 * mi + g + 8 * h;
      if (row >= rows_total) continue;
      const float inv = 1.0f / sum;
      const QueryRowPlace at = PlaceQueryRow(q_begin, G, kv_head, row);
      bf16* dst = out + at.token * out_stride + static_cast<int64_t>(at.head) * kD + 2 * t;
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        *reinterpret_cast<__nv_bfloat162*>(dst + n * 8) =
            __floats2bfloat162_rn(o[mi][n][2 * h] * inv, o[mi][n][2 * h + 1] * inv);
      }
    }
  }
}

template <int kD, int kWarps, int kWarpTiles, bool kFp8>
cudaError_t Launch(const PagedAttentionParams& p, cudaStream_t stream) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kRows = 16 * kWarpTiles * kWarps;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int64_t row_tiles = (static_cast<int64_t>(p.max_query_len) * G + kRows - 1) / kRows;
  constexpr size_t kSmem = SmemBytes<kD, kWarps, kWarpTiles, kFp8>();
  // Above 48 KiB dynamic shared memory needs an explicit opt-in (per device,
  // so it is set on every launch rather than cached).
  const cudaError_t attr =
      cudaFuncSetAttribute(TensorCorePrefillKernel<kD, kWarps, kWarpTiles, kFp8>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (attr != cudaSuccess) return attr;
  // x = kv head, y = row tile (reversed in the kernel), z = sequence: blocks
  // are dispatched x-fastest, so all heads of the heaviest tiles go first.
  const dim3 grid(p.num_kv_heads, static_cast<unsigned>(row_tiles), p.num_seqs);
  TensorCorePrefillKernel<kD, kWarps, kWarpTiles, kFp8><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool CanUseTensorCorePrefill(const PagedAttentionParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.page_size <= 0) return false;
  if (p.num_kv_heads > 65535 || p.num_seqs > 65535) return false;
  const int64_t row_tiles =
      (static_cast<int64_t>(p.max_query_len) * (p.num_q_heads / p.num_kv_heads) + kMinRows - 1) /
      kMinRows;
  // The qkv rows and head offsets must keep 16-byte alignment for cp.async.
  return row_tiles <= 65535 && p.qkv_row_width % 8 == 0;
}

cudaError_t LaunchTensorCorePrefill(const PagedAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return p.kv_fp8 ? Launch<64, kLaunchWarps, kLaunchWarpTiles, true>(p, stream)
                      : Launch<64, kLaunchWarps, kLaunchWarpTiles, false>(p, stream);
    case 128:
      return p.kv_fp8 ? Launch<128, kLaunchWarps, kLaunchWarpTiles, true>(p, stream)
                      : Launch<128, kLaunchWarps, kLaunchWarpTiles, false>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace strata::cuda::kernels
