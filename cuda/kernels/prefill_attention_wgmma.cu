// Warp-specialized warpgroup tensor-core prefill attention (see
// prefill_attention_wgmma.h).
//
// Q, and each stage of K and V, is a 128-row tile in the 128-byte-swizzled
// layout of wgmma.cuh, which is also the layout the copy engine writes with
// CU_TENSOR_MAP_SWIZZLE_128B into 1024-byte-aligned rows: Q (A) and K (B)
// are K-major operands of S = Q K^T, V the N-major B operand of O = P V.
// S's accumulators for columns 16kk .. 16kk + 15 are exactly P's A fragment
// for k step kk, so P never leaves registers.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernels/prefill_attention_wgmma.h"
#include "cuda/kernels/prefill_tile.cuh"
#include "cuda/kernels/ptx.cuh"
#include "cuda/kernels/tensor_map.h"
#include "cuda/kernels/tma.cuh"
#include "cuda/kernels/wgmma.cuh"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kD = 128;
constexpr int kRows = 128;  // query rows per block: two consumer warpgroups of 64
constexpr int kKeys = 128;  // keys per K/V tile
// Warpgroup 0 loads (one warp of it issues the copies), 1 and 2 compute.
constexpr int kThreads = 384;
constexpr int kConsumerWarps = 8;
// Registers per thread after the role split: the loader needs few, the
// consumers hold O (64), S (64) and P (32) at once. 24 * 128 + 240 * 256
// fits the 64 K register file.
constexpr int kLoaderRegisters = 24;
constexpr int kConsumerRegisters = 240;
// Copies are pages, or 128-key spans of pages longer than a tile, of at least
// 8 rows: a copy then covers whole 1024-byte swizzle atoms.
constexpr int kMinCopyRows = 8;
constexpr uint32_t kBlockBytes = SwizzledBlockBytes(128);  // one 64-dim column block
constexpr uint32_t kTileBytes = 2 * kBlockBytes;           // 128 rows x 128 dims, bf16
constexpr uint32_t kRowBytes = kD * 2;                     // one key row of a tile
// K/V stages in flight. (Three measured no faster on an H100, nor did the
// consumer warpgroups taking turns to issue their products through named
// barriers, FlashAttention-3's "ping-pong": 8k and 32k within 1%.)
constexpr int kStages = 2;
// Shared memory: Q, the stages, and the barriers (K full / empty and V
// full / empty per stage, and the tail's), + alignment: 161 KiB.
constexpr size_t kSmemBytes = 1024 + size_t{kTileBytes} * (1 + 2 * kStages) + 8 * (4 * kStages + 1);
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kRows == kKeys, "tiles share one layout");

__global__ void __launch_bounds__(kThreads, 1)
    WgmmaPrefillKernel(const __grid_constant__ PagedAttentionParams p,
                       const __grid_constant__ CUtensorMap k_page_map,
                       const __grid_constant__ CUtensorMap v_page_map,
                       const __grid_constant__ CUtensorMap k_tile_map,
                       const __grid_constant__ CUtensorMap v_tile_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  PrefillTile block_tile;
  if (!GetPrefillTile(p, kRows, block_tile)) return;
  const int kv_head = blockIdx.x;
  const int window = p.sliding_window;
  const int pos_first = block_tile.pos_first;
  const int pos_last = block_tile.pos_last;
  // Tiles start on 128-key boundaries, so that each copy is whole pages; keys
  // below a window's start are masked.
  const int key_lo = block_tile.key_lo & ~(kKeys - 1);
  const int key_hi = block_tile.key_hi;  // exclusive
  const int num_tiles = (key_hi - key_lo + kKeys - 1) / kKeys;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle atoms must sit on 1024-byte boundaries.
  const uint32_t base = (SharedAddress(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_smem = base;
  const uint32_t k_smem = q_smem + kTileBytes;            // [kStages] tiles
  const uint32_t v_smem = k_smem + kStages * kTileBytes;  // [kStages] tiles
  const uint32_t bars = v_smem + kStages * kTileBytes;
  auto k_full = [&](int stage) { return bars + 8 * stage; };
  auto k_empty = [&](int stage) { return bars + 8 * (kStages + stage); };
  auto v_full = [&](int stage) { return bars + 8 * (2 * kStages + stage); };
  auto v_empty = [&](int stage) { return bars + 8 * (3 * kStages + stage); };
  const uint32_t tail_bar = bars + 8 * (4 * kStages);

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarrierInit(k_full(s), 1);
      MbarrierInit(v_full(s), 1);
      MbarrierInit(k_empty(s), kConsumerWarps);
      MbarrierInit(v_empty(s), kConsumerWarps);
    }
    MbarrierInit(tail_bar, 1);
    FenceBarrierInit();
  }
  __syncthreads();

  const int warp = tid / 32;
  const int lane = tid % 32;
  // Read through a shuffle so that the compiler sees a warp-uniform value:
  // wgmma under a branch it considers divergent gets serialized.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);

  if (wg == 0) {
    // ---- Loader: one warp walks the tiles and copies K and then V of each
    // into a stage once the consumers have released it. A tile whose pages
    // are consecutive slots (as the page allocator hands out a prompt's
    // pages) is one copy per 64-dim column block; otherwise each lane copies
    // one page (or one 128-key span of a long page). Small copies cost: at
    // 8k keys, two 16 KiB copies per tile ran the kernel 1.18-1.2x faster
    // than sixteen of 2 KiB (pages of 16) on an H100.
    SetMaxRegistersDec<kLoaderRegisters>();
    if (warp != 0) return;
    const int32_t* table = p.block_table + static_cast<int64_t>(blockIdx.z) * p.max_blocks_per_seq;
    const int copy_rows = min(p.page_size, kKeys);
    for (int it = 0; it < num_tiles; ++it) {
      const int key0 = key_lo + it * kKeys;
      const int stage = it % kStages;
      const uint32_t parity = (it / kStages) & 1;
      const int valid = min(kKeys, key_hi - key0);
      const int copies = (valid + copy_rows - 1) / copy_rows;
      const uint32_t bytes = static_cast<uint32_t>(copies * copy_rows) * kRowBytes;
      // The last tile of a block that ends inside it lands on the tail
      // barrier first: its rows past key_hi (unwritten slots, pages past
      // the context) are then zeroed, so that neither a NaN there nor a page
      // never copied reaches O through 0 * NaN.
      const bool tail = valid < kKeys;
      MbarrierWait(k_empty(stage), parity ^ 1);
      if (tail) MbarrierWait(v_empty(stage), parity ^ 1);
      if (lane == 0) {
        MbarrierArriveExpectTx(tail ? tail_bar : k_full(stage), tail ? 2 * bytes : bytes);
      }
      __syncwarp();
      const uint32_t k_dst = k_smem + stage * kTileBytes;
      const uint32_t v_dst = v_smem + stage * kTileBytes;
      // copies <= 128 / kMinCopyRows = 16: one lane each.
      int slot = 0;
      if (lane < copies) {
        const int pos = key0 + lane * copy_rows;
        slot = table[pos / p.page_size] * p.page_size + pos % p.page_size;
      }
      const int first_slot = __shfl_sync(0xffffffffu, slot, 0);
      const bool one_run =
          !tail && __all_sync(0xffffffffu, lane >= copies || slot == first_slot + lane * copy_rows);
      // Copies K or V of this tile into the tile at `dst`.
      auto copy_tile = [&](uint32_t dst, const CUtensorMap* page_map, const CUtensorMap* tile_map,
                           uint32_t bar) {
        if (one_run) {
          if (lane == 0) {
            TmaLoad3d(dst, tile_map, 0, kv_head, first_slot, bar);
            TmaLoad3d(dst + kBlockBytes, tile_map, 64, kv_head, first_slot, bar);
          }
        } else if (lane < copies) {
          const uint32_t offset = static_cast<uint32_t>(lane * copy_rows) * 128;
          TmaLoad3d(dst + offset, page_map, 0, kv_head, slot, bar);
          TmaLoad3d(dst + kBlockBytes + offset, page_map, 64, kv_head, slot, bar);
        }
      };
      copy_tile(k_dst, &k_page_map, &k_tile_map, tail ? tail_bar : k_full(stage));
      if (!tail) {
        MbarrierWait(v_empty(stage), parity ^ 1);
        if (lane == 0) MbarrierArriveExpectTx(v_full(stage), bytes);
        __syncwarp();
      }
      copy_tile(v_dst, &v_page_map, &v_tile_map, tail ? tail_bar : v_full(stage));
      if (tail) {
        MbarrierWait(tail_bar, 0);  // a block has at most one tail tile
        // Rows valid .. 127 of both column blocks of K and V: 16-byte zeros.
        const int chunks = (kKeys - valid) * 8;
        for (int i = lane; i < 4 * chunks; i += 32) {
          const int part = i / chunks;  // K block 0, K block 1, V block 0, V block 1
          const int chunk = i % chunks;
          const uint32_t addr = (part < 2 ? k_dst : v_dst) + (part % 2) * kBlockBytes +
                                static_cast<uint32_t>(valid) * 128 + chunk * 16;
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
        }
        FenceProxyAsync();
        __syncwarp();
        if (lane == 0) {
          MbarrierArrive(k_full(stage));
          MbarrierArrive(v_full(stage));
        }
      }
    }
  } else {
    // ---- Consumers: warpgroup 1 + c owns rows 64c .. 64c + 63 of the block.
    SetMaxRegistersInc<kConsumerRegisters>();
    const int cg = wg - 1;
    const int g = lane / 4;
    const int t = lane % 4;
    const int G = block_tile.group;
    const int rows_total = block_tile.rows_total;
    const int row0 = block_tile.row0;
    const int q_begin = block_tile.q_begin;
    const int first_pos = block_tile.first_pos;
    const bf16* qkv = static_cast<const bf16*>(p.qkv);

    // This warpgroup's Q rows: rows past the chunk are zero (their results
    // are never stored).
    const int ctid = tid - 128 * wg;
#pragma unroll
    for (int i = 0; i < 64 * 16 / 128; ++i) {
      const int id = ctid + i * 128;
      const int r = 64 * cg + id / 16, c = id % 16;
      const int row = row0 + r;
      const bf16* src = qkv;
      int bytes = 0;
      if (row < rows_total) {
        const QueryRowPlace at = PlaceQueryRow(q_begin, G, kv_head, row);
        src = qkv + at.token * p.qkv_row_width + static_cast<int64_t>(at.head) * kD + c * 8;
        bytes = 16;
      }
      CpAsync16(q_smem + SwizzledTileOffset(128, r, c), src, bytes);
    }
    CpAsyncCommit();
    CpAsyncWait<0>();
    FenceProxyAsync();
    NamedBarrierSync(1 + cg, 128);

    // This thread's rows: g and g + 8 of its warp's 16. Rows past the chunk
    // take the last row's position so their softmax stays finite.
    int row_pos[2], row_lo[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row0 + 64 * cg + 16 * (warp % 4) + g + 8 * h, rows_total - 1);
      row_pos[h] = first_pos + row / G;
      row_lo[h] = window > 0 ? row_pos[h] - window + 1 : 0;
    }
    const float scale_log2 = p.scale * kLog2e;  // softmax in base 2

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    float s[64];
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};
    uint32_t pa[kKeys / 16][4];  // P of the tile whose P V is next

    // Descriptors are built once: a descriptor's low bits are the address
    // / 16, so one at a byte offset from another is that one + offset / 16
    // (shared addresses stay below 256 KiB, inside the 14-bit field).
    const uint64_t q_desc = Descriptor(q_smem + 64 * cg * 128, 16, 1024);
    const uint64_t k_desc = Descriptor(k_smem, 16, 1024);
    const uint64_t v_desc = Descriptor(v_smem, kBlockBytes, 1024);
    // S = Q K^T of the tile in `stage`: 8 k steps of 16 dims.
    auto issue_s = [&](int stage) {
      const uint64_t k_stage_desc = k_desc + stage * (kTileBytes >> 4);
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint32_t k_offset = ((ks / 4) * kBlockBytes + (ks % 4) * 32) >> 4;
        WgmmaSS(s, q_desc + k_offset, k_stage_desc + k_offset, ks > 0 ? 1 : 0);
      }
      WgmmaCommit();
    };
    // O += P V of the tile whose V sits in `stage`.
    auto issue_pv = [&](int stage) {
      const uint64_t v_stage_desc = v_desc + stage * (kTileBytes >> 4);
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        WgmmaRS(o, pa[kk], v_stage_desc + ((16 * kk * 128) >> 4));
      }
      WgmmaCommit();
    };
    auto release = [&](uint32_t bar) {
      __syncwarp();
      if (lane == 0) MbarrierArrive(bar);
    };
    // Masks S where the tile crosses some row's visible range (the causal
    // edge, a window's lower edge, the end of the keys) and turns it into
    // unnormalised probabilities in base 2, updating m and l. Scores stay
    // unscaled: the running max is kept on raw scores (the scale is
    // positive) and the scale folds into the exponent's FMA. Returns each
    // row's rescale factor for O.
    auto softmax = [&](int key0, float(&alpha)[2]) {
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
      // The 4 lanes of a quad share a row. Four partial maxima and sums keep
      // the dependency chains short.
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
    };
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        pa[kk][0] = PackBf16(s[8 * kk], s[8 * kk + 1]);
        pa[kk][1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    // Tile 0: S, then its softmax (O is still zero: no rescale).
    float alpha[2];
    MbarrierWait(k_full(0), 0);
    WgmmaFence();
    issue_s(0);
    WgmmaWait<0>();
    PinRegisters(s);
    release(k_empty(0));
    softmax(key_lo, alpha);
    pack_p();

    // Tile it: S of tile it is issued before P V of tile it - 1, so the
    // softmax of tile it overlaps that product on the tensor cores.
    for (int it = 1; it < num_tiles; ++it) {
      const int stage = it % kStages;
      const int prev = (it - 1) % kStages;
      MbarrierWait(k_full(stage), (it / kStages) & 1);
      MbarrierWait(v_full(prev), ((it - 1) / kStages) & 1);
      PinRegisters(s);
      PinRegisters(o);
      WgmmaFence();
      issue_s(stage);
      issue_pv(prev);
      WgmmaWait<1>();  // S has landed; P V may still run
      PinRegisters(s);
      release(k_empty(stage));
      softmax(key_lo + it * kKeys, alpha);
      WgmmaWait<0>();
      PinRegisters(o);
      release(v_empty(prev));
      // The max rarely grows after the first tiles: rescale O only when it
      // did for some row of the warp.
      if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int j = 0; j < kD / 8; ++j) {
          o[4 * j] *= alpha[0];
          o[4 * j + 1] *= alpha[0];
          o[4 * j + 2] *= alpha[1];
          o[4 * j + 3] *= alpha[1];
        }
      }
      pack_p();
    }
    {
      const int last = (num_tiles - 1) % kStages;
      MbarrierWait(v_full(last), ((num_tiles - 1) / kStages) & 1);
      PinRegisters(o);
      WgmmaFence();
      issue_pv(last);
      WgmmaWait<0>();
      PinRegisters(o);
      release(v_empty(last));
    }

    // Normalise and store. l > 0 for stored rows: every row sees its own key.
    bf16* out = static_cast<bf16*>(p.out);
    const int64_t out_stride = static_cast<int64_t>(p.num_q_heads) * kD;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int row = row0 + 64 * cg + 16 * (warp % 4) + g + 8 * h;
      if (row >= rows_total) continue;
      const float inv = 1.0f / sum;
      const QueryRowPlace at = PlaceQueryRow(q_begin, G, kv_head, row);
      bf16* dst = out + at.token * out_stride + static_cast<int64_t>(at.head) * kD + 2 * t;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        *reinterpret_cast<__nv_bfloat162*>(dst + n * 8) =
            __floats2bfloat162_rn(o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv);
      }
    }
  }
#else
  __trap();  // built without sm_90a: CanUseWgmmaPrefill keeps launches away
#endif
}

// A bf16 cache [num_cache_slots, Hkv, 128] as a 3-d tensor (dims, innermost
// first: dim, kv head, slot), copied in boxes of 64 dims x 1 head x
// `copy_rows` slots with the 128-byte swizzle.
bool EncodeCacheMap(const void* cache, const PagedAttentionParams& p, int copy_rows,
                    CUtensorMap* map) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(kD), static_cast<cuuint64_t>(p.num_kv_heads),
                              static_cast<cuuint64_t>(p.num_cache_slots)};
  const cuuint64_t strides[2] = {kD * sizeof(bf16),
                                 static_cast<cuuint64_t>(p.num_kv_heads) * kD * sizeof(bf16)};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(copy_rows)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return TensorMapEncoder()(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(cache),
                            dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

bool CanUseWgmmaPrefill(const PagedAttentionParams& p) {
  // The softmax keeps its running max on unscaled scores: the scale must be
  // positive (it is 1 / sqrt(head_dim) in every model).
  if (p.head_dim != kD || p.kv_fp8 || !(p.scale > 0.0f)) return false;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0) return false;
  if (p.num_kv_heads > 65535 || p.num_seqs > 65535 || p.qkv_row_width % 8 != 0) return false;
  // Each copy is whole pages of at least 8 rows, or a 128-key span of one.
  if (p.page_size < kMinCopyRows || (kKeys % p.page_size != 0 && p.page_size % kKeys != 0)) {
    return false;
  }
  if (p.num_cache_slots <= 0 || p.num_cache_slots > (int64_t{1} << 31)) return false;
  if (reinterpret_cast<uintptr_t>(p.k_cache) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.v_cache) % 16 != 0) {
    return false;
  }
  const int64_t row_tiles =
      (static_cast<int64_t>(p.max_query_len) * (p.num_q_heads / p.num_kv_heads) + kRows - 1) /
      kRows;
  if (row_tiles > 65535) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && TensorMapEncoder() != nullptr;
}

cudaError_t LaunchWgmmaPrefill(const PagedAttentionParams& p, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int64_t row_tiles = (static_cast<int64_t>(p.max_query_len) * G + kRows - 1) / kRows;
  const int copy_rows = p.page_size < kKeys ? p.page_size : kKeys;
  // Maps whose boxes are a page (or 128-slot span), and a whole tile.
  CUtensorMap k_page_map, v_page_map, k_tile_map, v_tile_map;
  if (!EncodeCacheMap(p.k_cache, p, copy_rows, &k_page_map) ||
      !EncodeCacheMap(p.v_cache, p, copy_rows, &v_page_map) ||
      !EncodeCacheMap(p.k_cache, p, kKeys, &k_tile_map) ||
      !EncodeCacheMap(p.v_cache, p, kKeys, &v_tile_map)) {
    return cudaErrorInvalidValue;
  }
  // Above 48 KiB dynamic shared memory needs an explicit opt-in (per device,
  // so it is set on every launch rather than cached).
  const cudaError_t attr =
      cudaFuncSetAttribute(WgmmaPrefillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kSmemBytes));
  if (attr != cudaSuccess) return attr;
  // x = kv head, y = row tile (reversed in the kernel), z = sequence.
  const dim3 grid(p.num_kv_heads, static_cast<unsigned>(row_tiles), p.num_seqs);
  WgmmaPrefillKernel<<<grid, kThreads, kSmemBytes, stream>>>(p, k_page_map, v_page_map, k_tile_map,
                                                             v_tile_map);
  return cudaGetLastError();
}

}  // namespace strata::cuda::kernels
