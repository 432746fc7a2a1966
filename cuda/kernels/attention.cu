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
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "cuda/kernels/attention.h"
#include "cuda/kernels/dependent_launch.cuh"
#include "cuda/kernels/fp8.cuh"
#include "cuda/kernels/kv_select.h"
#include "cuda/kernels/prefill_attention_tc.h"
#include "cuda/kernels/prefill_attention_wgmma.h"
#include "cuda/kernels/prefill_tile.cuh"
#include "cuda/kernels/ptx.cuh"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;
using fp8 = __nv_fp8_e4m3;

constexpr float kNegInf = -INFINITY;

struct alignas(16) Bf16x8 {
  bf16 v[8];
};

__device__ __forceinline__ void Load8(const bf16* p, float (&out)[8]) {
  const Bf16x8 packed = *reinterpret_cast<const Bf16x8*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = __bfloat162float(packed.v[i]);
}

__device__ __forceinline__ void Load8(const fp8* p, float (&out)[8]) {
  Fp8x8ToFloat(*reinterpret_cast<const uint2*>(p), out);
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
// Decode reads every K and V row of the sequence once and does little
// arithmetic per byte, so it is bound by memory bandwidth, which only comes
// with many bytes in flight per SM (about 3 TB/s x 1 us / 132 SMs = 24 KB, more
// under load). The design therefore keeps several 2-4 KiB tiles per warp in
// flight with cp.async while the warp computes an older one, and avoids block
// barriers in the key loop so that no warp waits for another.
//
// Block = 4 warps; each block processes up to kMaxG query heads of one kv head
// (heads g_begin .. g_begin + g_count of the group) for one sequence, over one
// split of its keys. A "group" of kTG consecutive lanes handles one key, each
// lane holding 8 consecutive elements of the head dimension (one 16-byte
// chunk); kTG is the power of two >= head_dim / 8, so lanes past the head
// dimension idle. A tile is kDecodeSteps such keys per group, i.e. 2 KiB of K
// and 2 KiB of V for a power-of-two head_dim (the tensor-core paths below
// arrange their tiles differently: 16 keys, or 8 slots of two kv heads, of
// 128-byte fp8 or 256-byte bf16 rows). The split's tiles are dealt out
// round-robin to the warps, and each warp runs its own pipeline of
// kDecodeStages tiles and its own online softmax (in log2 units: q carries
// scale * log2(e), so probabilities are one ex2 each). Every lane copies
// exactly the 16-byte chunks it later reads, so shared memory serves as an
// asynchronous per-lane register file and needs no barrier or warp sync
// (the tensor-core path below reads other lanes' chunks and adds warp
// syncs). The warps' partial results are merged once at the end through
// shared memory.

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeSteps = 4;   // keys per group per tile
constexpr int kDecodeStages = 3;  // tiles per warp in shared memory
constexpr int kDecodeMaxG = 8;    // query heads per block; larger groups use more blocks
// One warp's K (or V) tile on every path but the bf16 tensor-core one:
// kDecodeSteps chunks of 16 bytes per lane (8 bf16 elements; an fp8 pipeline
// copies 8-byte chunks and uses half, the fp8 tensor-core path 16 bytes of 16
// fp8 elements). The bf16 tensor-core path copies twice the steps
// (DecodeSmemBytes below). The final merge reuses the buffers.
constexpr int kDecodeTileBytes = kDecodeSteps * 32 * 16;
constexpr size_t kDecodeSmemBytes = size_t{kDecodeWarps} * kDecodeStages * 2 * kDecodeTileBytes;
// The final merge reuses the pipeline buffers: [warps][kMaxG][D] partial
// accumulators, then [warps][kMaxG] maxima and sums.
static_assert(size_t{kDecodeWarps} * kDecodeMaxG * (kMaxHeadDim + 2) * sizeof(float) <=
              kDecodeSmemBytes);

// Resident blocks per SM that the launch bounds ask the compiler to allow
// (registers <= 65536 / (threads * blocks)); shared memory allows 4 (48 KiB
// each). With 8 query heads, q and the accumulators alone take 128 registers.
// A sparse kernel keeps a second set of look-ahead registers (the key
// list), which at 4 blocks would spill. The tensor-core path (mma, see
// below) needs 130-155 registers whatever the group size: 3 blocks.
// The bf16 tensor-core path (wide: 256-byte rows, see below) stages twice
// the bytes per tile, 96 KiB per block: 2 blocks.
constexpr int DecodeBlocksPerSm(int max_g, bool sparse, bool mma = false, bool wide = false) {
  if (mma) return wide ? 2 : 3;
  return max_g <= 4 ? (sparse ? 3 : 4) : 2;
}
// Steps per tile and shared memory per block: the wide path copies twice
// the steps of 16-byte chunks per tile.
constexpr int DecodeSteps(bool wide) { return wide ? 2 * kDecodeSteps : kDecodeSteps; }
constexpr size_t DecodeSmemBytes(bool wide) {
  return size_t{kDecodeWarps} * kDecodeStages * 2 * DecodeSteps(wide) * 32 * 16;
}

// Eight bf16 (as four packed words) -> fp32: a bf16 is the high half of a float.
__device__ __forceinline__ void Unpack8(const uint4 w, float (&out)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// A lane's 8 elements of one key: 16 bytes of bf16 or 8 of fp8, staged
// through shared memory by cp.async and widened to fp32 when read.
template <typename Cache>
__device__ __forceinline__ void CopyChunk(uint32_t dst, const Cache* src, bool valid) {
  if constexpr (sizeof(Cache) == 2) {
    CpAsync16(dst, src, valid ? 16 : 0);
  } else {
    CpAsync8(dst, src, valid ? 8 : 0);
  }
}
template <typename Cache>
__device__ __forceinline__ void ReadChunk(const unsigned char* src, bool active, float (&out)[8]) {
  if constexpr (sizeof(Cache) == 2) {
    Unpack8(active ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0), out);
  } else {
    Fp8x8ToFloat(active ? *reinterpret_cast<const uint2*>(src) : make_uint2(0, 0), out);
  }
}

// ---- Tensor-core path (head_dim 128; fp8, then bf16) --------------------------
//
// With an fp8 cache the CUDA-core loop above spends more instructions per
// byte than the memory system needs (widening each element to fp32, then
// one FMA per query head for S and again for P V, plus the reductions over
// the lanes of a key), and falls short of the bandwidth. For head_dim 128
// the decode kernel therefore runs both products on the tensor cores
// (mma.sync m16n8k16, fp16 inputs, fp32 accumulation; fp8 -> fp16 is exact):
//   S = Q K^T: A = the group's query heads (rows; at most 8 of 16 used),
//     B = 8 keys of the tile, 2 n tiles per 16-key tile;
//   O^T += V^T P^T: A = V^T (16 dims x 16 keys, 8 m tiles for 128 dims),
//     B = P^T, which is exactly the C layout of the two S tiles, so P stays
//     in registers.
// The head dimension is summed over in S and never leaves O's rows, so each
// lane may read dims in whatever order suits its loads, as long as Q uses
// the same one: lane (g = lane / 4, t = lane % 4) reads bytes 32t..32t+31 of
// key row g for S (k step ks takes bytes 32t + 4ks..+3), and bytes
// 32j + 4g..+3 (j = 0..3) of keys 2t, 2t + 1, 2t + 8, 2t + 9 for P V, which
// a byte permute turns into V^T fragments: O^T row g of m tile mt is dim
// 32 (mt / 2) + 4g + 2 (mt % 2) and row g + 8 the dim after it.
// A tile's K (and V) rows are 128 bytes in shared memory with 16-byte chunk
// c of row r stored at chunk c ^ (r % 8), which keeps both read patterns
// free of bank conflicts.
//
// A bf16 cache takes the tensor cores for head_dim 128 too: at the copy
// rate the CUDA-core loop issues an instruction on 58% of the cycles, and the
// DRAM then delivers 2-3% less than with the arithmetic removed. The bf16
// path is the standard one (mma.sync m16n8k16 on bf16, fp32 accumulation):
// rows are 256 bytes (16 chunks, chunk c of row r at c ^ (r % 8)); S takes
// its K^T fragments with ldmatrix, 4 dims-chunks per x4 load, with Q's A
// fragments read straight from qkv as bf16 pairs (exact; the scale is
// applied to S in fp32); P V takes V^T fragments with ldmatrix.trans, and
// O^T row g of m tile mt is dim 16 mt + g, row g + 8 the dim 8 after it. P
// is rounded to bf16 for the product, as in FlashAttention.
constexpr int kMmaHeadDim = 128;

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// c += a * b (m16n8k16, fp16 in, fp32 accumulate).
__device__ __forceinline__ void MmaF16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk c of row r in a swizzled tile of kRowBytes
// rows (128 for fp8, 256 for bf16 keys of head_dim 128).
template <int kRowBytes = kMmaHeadDim>
__device__ __forceinline__ uint32_t MmaTileOffset(int r, int c) {
  return static_cast<uint32_t>(r * kRowBytes + ((c ^ (r & 7)) << 4));
}

// ---- Paired kv heads (tensor-core path, dense, group size <= 4) ---------------
//
// The cache stores a slot's kv heads side by side, so one kv head's key is
// (fp8) a 128-byte run 1 KiB (8 heads) away from the next slot's. Read one
// head per block, the DRAM sees short scattered runs: 0.80-0.83 of its peak,
// while the same kernel reading head-major runs was 4% faster. With kPair a
// warp reads two adjacent kv heads of each slot, one 256-byte run (512 for
// bf16), at no extra tensor-core work, because the one-head path leaves A
// rows idle when the group has at most 4 query heads:
//   - A rows 0..3 are kv head h's query heads, rows 4..7 head h + 1's
//     (rows g % 4 >= G are zero);
//   - a tile is 8 slots; its rows 0..7 are head h's keys, rows 8..15 head
//     h + 1's, i.e. the two n tiles of S are one per head, and a row's S
//     against the other head's keys is masked to -inf, which makes P block
//     diagonal;
//   - P V then needs no change: tile rows are the k index of V^T, and the
//     zero blocks of P drop the other head's values.
// O^T column c is query head c % 4 of kv head h + c / 4. A sparse plan lists
// its keys per kv head, so only dense decoding pairs heads.
//
// kMma: the tensor-core path above (head_dim 128; fp8 with kTG 8, a lane
// copying 16 dims of a key per chunk, or bf16 with kTG 16, 8 dims);
// otherwise CUDA cores, 8 dims per lane.
template <int kTG, int kMaxG, bool kSparse, typename Cache, bool kMma = false, bool kPair = false>
__global__ void __launch_bounds__(kDecodeThreads, DecodeBlocksPerSm(kMaxG, kSparse, kMma,
                                                                    kMma && sizeof(Cache) == 2))
    PagedDecodeKernel(const __grid_constant__ PagedAttentionParams p, int num_splits,
                      int head_chunks, float* __restrict__ ws_acc, float* __restrict__ ws_ml) {
  WaitForPrerequisites();
  static_assert(!kMma || (kMaxG <= 8 && (std::is_same_v<Cache, fp8> ? kTG == 8 : kTG == 16)),
                "the tensor-core path is for head_dim 128");
  static_assert(!kPair || (kMma && !kSparse && kMaxG == 8),
                "paired kv heads are a dense tensor-core path with 8 O^T columns");
  constexpr bool kWide = kMma && sizeof(Cache) == 2;  // bf16 tensor cores: 256-byte rows
  constexpr int kRowBytes = kMmaHeadDim * static_cast<int>(sizeof(Cache));  // (kMma)
  constexpr int kSteps = DecodeSteps(kWide);
  constexpr int kChunkBytes = kMma ? 16 : 8 * static_cast<int>(sizeof(Cache));
  constexpr int kTileBytes = kSteps * 32 * kChunkBytes;
  constexpr int kLanesPerSlot = kTG * (kPair ? 2 : 1);  // lanes that copy one key slot
  constexpr int kKeysPerStep = 32 / kLanesPerSlot;      // keys a warp handles per step
  constexpr int kTileKeys = kKeysPerStep * kSteps;
  constexpr float kLog2e = 1.4426950408889634f;

  const int seq = blockIdx.x;
  const int kv_unit = blockIdx.y / head_chunks;
  const int head_chunk = blockIdx.y - kv_unit * head_chunks;
  const int kv_head = kPair ? 2 * kv_unit : kv_unit;  // the block's (first) kv head
  const int split = blockIdx.z;

  constexpr bool sparse = kSparse;  // plan_entries is set
  int q_begin, table_row, key_lo, key_hi;
  const int32_t* key_list = nullptr;  // sparse: logical index of each key
  if (sparse) {
    const int32_t* entry = p.plan_entries + seq * kPlanFields;
    q_begin = entry[kPlanRowCol];
    table_row = entry[kPlanSeqCol];
    const int64_t list = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
    key_list = p.key_index + list * p.max_keys;
    key_lo = 0;
    key_hi = min(p.key_count[list], p.max_keys);
  } else {
    q_begin = p.query_start[seq];
    if (p.query_start[seq + 1] - q_begin != 1) return;  // not a decode sequence
    table_row = seq;
    const int ctx = p.context_len[seq];
    const int pos = ctx - 1;
    key_lo = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
    key_hi = ctx;
  }

  const int D = p.head_dim;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int g_begin = head_chunk * kMaxG;
  const int g_count = min(kMaxG, G - g_begin);
  const int num_keys = max(0, key_hi - key_lo);
  const int per_split = (num_keys + num_splits - 1) / num_splits;
  const int k_begin = key_lo + split * per_split;
  const int k_end = min(key_hi, k_begin + per_split);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group_lane = lane % kTG;
  const int key_in_step = lane / kLanesPerSlot;
  const int pair_head = kPair ? (lane / kTG) & 1 : 0;  // kPair: which head this lane copies
  const int d0 = group_lane * (kChunkBytes / static_cast<int>(sizeof(Cache)));
  const bool d_active = d0 < D;

  extern __shared__ __align__(16) unsigned char decode_smem[];
  // This warp's stages: [stage][K, V][step][lane] chunks of kChunkBytes.
  unsigned char* const warp_buf = decode_smem + warp * kDecodeStages * 2 * kTileBytes;
  const uint32_t warp_buf_addr = SharedAddress(warp_buf) + lane * kChunkBytes;

  // This lane's slice of each query head, pre-scaled into log2 units.
  const int64_t t = q_begin;
  const int head0 = kv_head * G + g_begin;  // first query head of this block
  const float q_scale = p.scale * kLog2e;
  // CUDA-core path: q[g] holds dims d0..d0+7 of head g. Tensor-core path:
  // the A fragments of Q for head row lane / 4 (zero past the group), rows
  // 8..15 being zero: fp8, fp16 pairs qa[ks] = dims 32t + 4ks + {0,1} and
  // {2,3}, pre-scaled; bf16, the bf16 pairs at dims 16ks + 2t and 16ks + 8 +
  // 2t as stored (S is scaled after the product).
  float q[kMma ? 1 : kMaxG][8];
  uint32_t qa[kMma ? 8 : 1][2];
  const int mma_g = lane >> 2;  // tensor-core path: this lane's A/C row
  const int mma_t = lane & 3;   // and column pair
  int q_head = -1;              // tensor-core path: the query head of A row mma_g, if any
  if (kPair) {
    if ((mma_g & 3) < G) q_head = (kv_head + (mma_g >> 2)) * G + (mma_g & 3);
  } else if (mma_g < g_count) {
    q_head = head0 + mma_g;
  }
  if constexpr (kWide) {
    const uint32_t* const q_row =
        reinterpret_cast<const uint32_t*>(static_cast<const bf16*>(p.qkv) + t * p.qkv_row_width +
                                          static_cast<int64_t>(max(q_head, 0)) * D);
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
      qa[ks][0] = q_head >= 0 ? q_row[8 * ks + mma_t] : 0u;
      qa[ks][1] = q_head >= 0 ? q_row[8 * ks + 4 + mma_t] : 0u;
    }
  } else if constexpr (kMma) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (q_head >= 0) {
        Load8(static_cast<const bf16*>(p.qkv) + t * p.qkv_row_width +
                  static_cast<int64_t>(q_head) * D + 32 * mma_t + 8 * c,
              v);
      }
      // Saturated to fp16's range: a bf16 query beyond it (never seen in a
      // real model) must not turn into inf and NaN.
      float x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = fminf(fmaxf(v[e] * q_scale, -65504.0f), 65504.0f);
      qa[2 * c][0] = PackHalf2(x[0], x[1]);
      qa[2 * c][1] = PackHalf2(x[2], x[3]);
      qa[2 * c + 1][0] = PackHalf2(x[4], x[5]);
      qa[2 * c + 1][1] = PackHalf2(x[6], x[7]);
    }
  }
#pragma unroll
  for (int g = 0; g < (kMma ? 0 : kMaxG); ++g) {
    if (g < g_count && d_active) {
      Load8(static_cast<const bf16*>(p.qkv) + t * p.qkv_row_width +
                static_cast<int64_t>(head0 + g) * D + d0,
            q[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= q_scale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] = 0.0f;
    }
  }

  float acc[kMaxG][8];
  float m[kMaxG];  // running max (log2 units), identical in every lane of the warp
  float l[kMaxG];  // running sum of this lane's keys
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
  }
  // Tensor-core path: O^T fragments (8 m tiles of 16 dims x 8 heads) and the
  // softmax state of row mma_g (m[0], l[0]; l summed over the row's lanes at
  // the end).
  float o[kMma ? 8 : 1][4];
#pragma unroll
  for (int mt = 0; mt < (kMma ? 8 : 1); ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;

  const Cache* const k_cache = static_cast<const Cache*>(p.k_cache);
  const Cache* const v_cache = static_cast<const Cache*>(p.v_cache);
  const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t head_offset = static_cast<int64_t>(kv_head + pair_head) * D + d0;
  const int32_t* const table =
      p.block_table + static_cast<int64_t>(table_row) * p.max_blocks_per_seq;
  const int page_size = p.page_size;
  // Pages are 16 tokens in practice: shift and mask instead of dividing.
  const bool page_pow2 = (page_size & (page_size - 1)) == 0;
  const int page_shift = __ffs(page_size) - 1;

  const int num_tiles = k_end > k_begin ? (k_end - k_begin + kTileKeys - 1) / kTileKeys : 0;
  const int my_tiles = num_tiles > warp ? (num_tiles - warp + kDecodeWarps - 1) / kDecodeWarps : 0;
  auto tile_start = [&](int j) { return k_begin + (warp + j * kDecodeWarps) * kTileKeys; };

  // Where this lane's keys of a tile live, fetched well before the tile's
  // copies are issued so that the dependent loads (key list -> block table
  // -> cache slot) do not stall the pipeline: a sparse kernel reads the
  // logical indices of tile t when tile t - 4 is issued, every kernel reads
  // the block-table entries when tile t - 2 is, and the slots are consumed
  // when tile t is. Tiles alternate between two register sets by parity
  // (the loop below is unrolled by 2 so that every set index is a
  // compile-time constant).
  int index_set[2][kSteps];  // sparse: logical index, -1 past the split
  int slot_set[2][kSteps];   // page * page_size + offset in page
  auto index_of = [&](int tile, int u, const int(&index)[kSteps]) {
    if constexpr (kSparse) return index[u];
    const int key = tile_start(tile) + u * kKeysPerStep + key_in_step;
    return tile < my_tiles && key < k_end ? key : -1;
  };
  auto fetch_indices = [&](int tile, int(&index)[kSteps]) {
    if constexpr (kSparse) {
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        const int key = tile_start(tile) + u * kKeysPerStep + key_in_step;
        index[u] = tile < my_tiles && key < k_end ? key_list[key] : -1;
      }
    }
  };
  auto look_up_slots = [&](int tile, const int(&index)[kSteps], int(&slot)[kSteps]) {
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int at = index_of(tile, u, index);
      slot[u] = 0;
      if (at >= 0) {
        const int page = table[page_pow2 ? at >> page_shift : at / page_size];
        slot[u] = page * page_size + (page_pow2 ? at & (page_size - 1) : at % page_size);
      } else if (kSparse && at <= -2) {
        slot[u] = -2 - at;  // a recalled block's cache slot (engine::KvCacheSlotIndex)
      }
    }
  };
  // Starts the copies of the warp's tile j (if any) and commits a group
  // either way, so that group counts stay uniform; then refills the set of
  // j's parity with the slots of tile j + 2 and the indices of tile j + 4.
  auto issue = [&](int j, auto parity) {
    constexpr int kSet = decltype(parity)::value;
    if (j < my_tiles && d_active) {
      const uint32_t stage = (j % kDecodeStages) * 2 * kTileBytes;
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        const int key = tile_start(j) + u * kKeysPerStep + key_in_step;
        const bool valid = key < k_end;
        const int64_t offset =
            valid ? static_cast<int64_t>(slot_set[kSet][u]) * slot_stride + head_offset : 0;
        if constexpr (kMma) {
          const int row = pair_head * 8 + u * kKeysPerStep + key_in_step;
          const uint32_t at =
              SharedAddress(warp_buf) + stage + MmaTileOffset<kRowBytes>(row, group_lane);
          CpAsync16(at, k_cache + offset, valid ? 16 : 0);
          CpAsync16(at + kTileBytes, v_cache + offset, valid ? 16 : 0);
        } else {
          const uint32_t dst = warp_buf_addr + stage + u * 32 * kChunkBytes;
          CopyChunk(dst, k_cache + offset, valid);
          CopyChunk(dst + kTileBytes, v_cache + offset, valid);
        }
      }
    }
    CpAsyncCommit();
    look_up_slots(j + 2, index_set[kSet], slot_set[kSet]);
    fetch_indices(j + 4, index_set[kSet]);
  };
  using Even = std::integral_constant<int, 0>;
  using Odd = std::integral_constant<int, 1>;
  static_assert(kDecodeStages == 3, "the parity sets assume issue runs 2 tiles ahead");

  fetch_indices(0, index_set[0]);
  fetch_indices(1, index_set[1]);
  look_up_slots(0, index_set[0], slot_set[0]);
  look_up_slots(1, index_set[1], slot_set[1]);
  fetch_indices(2, index_set[0]);
  fetch_indices(3, index_set[1]);
  issue(0, Even());
  issue(1, Odd());

  auto step = [&](int j, auto parity) {
    issue(j + kDecodeStages - 1, parity);  // into the stage tile j - 1 used (same parity as j)
    CpAsyncWait<kDecodeStages - 1>();      // tile j has landed
    // The tensor-core path reads chunks other lanes copied: their copies must
    // be visible (and, below, every lane done reading before the stage is
    // refilled).
    if constexpr (kMma) __syncwarp();
    const int start = tile_start(j);
    if constexpr (kMma) {
      const unsigned char* const tile = warp_buf + (j % kDecodeStages) * 2 * kTileBytes;
      // S for tile rows nt * 8 + 2t + {0, 1} (kPair: slots 2t + {0, 1} of kv
      // head kv_head + nt), A row mma_g.
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        if constexpr (kWide) {
          // K^T fragments of 4 dim chunks per ldmatrix: lane l addresses
          // row l % 8 of chunk 4 c4 + l / 8.
          const uint32_t rows = SharedAddress(tile);
#pragma unroll
          for (int c4 = 0; c4 < 4; ++c4) {
            uint32_t b[4];
            LdMatrixX4(rows + MmaTileOffset<kRowBytes>(nt * 8 + (lane & 7), 4 * c4 + (lane >> 3)),
                       b);
            const uint32_t a_lo[4] = {qa[2 * c4][0], 0u, qa[2 * c4][1], 0u};
            const uint32_t a_hi[4] = {qa[2 * c4 + 1][0], 0u, qa[2 * c4 + 1][1], 0u};
            MmaBf16(s[nt], a_lo, b[0], b[1]);
            MmaBf16(s[nt], a_hi, b[2], b[3]);
          }
          s[nt][0] *= q_scale;
          s[nt][1] *= q_scale;
        } else {
          const int row = nt * 8 + mma_g;
          const uint4 lo = *reinterpret_cast<const uint4*>(tile + MmaTileOffset(row, 2 * mma_t));
          const uint4 hi =
              *reinterpret_cast<const uint4*>(tile + MmaTileOffset(row, 2 * mma_t + 1));
          const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int ks = 0; ks < 8; ++ks) {
            MmaF16(s[nt], qa[ks][0], 0u, qa[ks][1], 0u, Fp8x2ToHalf2Bits(w[ks] & 0xffffu),
                   Fp8x2ToHalf2Bits(w[ks] >> 16));
          }
        }
      }
      // Online softmax of row mma_g over the tile (its 16 keys are spread
      // over the row's 4 lanes).
      float mx = kNegInf;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool valid = kPair ? nt == (mma_g >> 2) && start + 2 * mma_t + e < k_end
                                   : start + nt * 8 + 2 * mma_t + e < k_end;
          s[nt][e] = valid ? s[nt][e] : kNegInf;
          mx = fmaxf(mx, s[nt][e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // The tile's first key is valid, so mx is finite.
      const float m_new = fmaxf(m[0], mx);
      const float alpha = FastExp2(m[0] - m_new);  // 0 while m is -inf
      m[0] = m_new;
      float pr[2][2];
      float row_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          pr[nt][e] = FastExp2(s[nt][e] - m_new);
          row_sum += pr[nt][e];
        }
      }
      l[0] = l[0] * alpha + row_sum;
      // O^T columns 2t, 2t + 1 are A rows 2t, 2t + 1 (query heads; with
      // kPair, of either kv head): their rescale factors live in the lanes
      // of rows 2t and 2t + 1.
      if (__any_sync(0xffffffffu, alpha != 1.0f)) {
        const float alpha_lo = __shfl_sync(0xffffffffu, alpha, 8 * mma_t);
        const float alpha_hi = __shfl_sync(0xffffffffu, alpha, 8 * mma_t + 4);
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
          o[mt][0] *= alpha_lo;
          o[mt][1] *= alpha_hi;
          o[mt][2] *= alpha_lo;
          o[mt][3] *= alpha_hi;
        }
      }
      // B = P^T: keys 2t, 2t + 1 and 2t + 8, 2t + 9 of row mma_g.
      const uint32_t pb0 = kWide ? PackBf16(pr[0][0], pr[0][1]) : PackHalf2(pr[0][0], pr[0][1]);
      const uint32_t pb1 = kWide ? PackBf16(pr[1][0], pr[1][1]) : PackHalf2(pr[1][0], pr[1][1]);
      const unsigned char* const v_tile = tile + kTileBytes;
      if constexpr (kWide) {
        // O^T += V^T P^T per m tile of 16 dims: ldmatrix.trans of rows
        // (keys) l % 8 + 8 (l / 16), chunk 2 mt + (l / 8) % 2 gives the
        // A fragments of V^T.
        const uint32_t rows = SharedAddress(v_tile);
        const int v_row = (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
          uint32_t a[4];
          LdMatrixX4Trans(rows + MmaTileOffset<kRowBytes>(v_row, 2 * mt + ((lane >> 3) & 1)), a);
          MmaBf16(o[mt], a, pb0, pb1);
        }
      }
      // fp8: O^T += V^T P^T, two m tiles (one 4-byte column group j) at a time.
      const int k0 = 2 * mma_t;
#pragma unroll
      for (int j4 = 0; j4 < (kWide ? 0 : 4); ++j4) {
        const int chunk = 2 * j4 + (mma_g >> 2);
        const int byte = 4 * (mma_g & 3);
        uint32_t w[4];  // keys k0, k0 + 1, k0 + 8, k0 + 9
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = k0 + (i & 1) + 8 * (i >> 1);
          w[i] = *reinterpret_cast<const uint32_t*>(v_tile + MmaTileOffset(key, chunk) + byte);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // Dims 2 * half and 2 * half + 1 of the group: (key, key + 1)
          // pairs of each, as fp16.
          const uint32_t sel = half == 0 ? 0x5140u : 0x7362u;
          const uint32_t near = __byte_perm(w[0], w[1], sel);
          const uint32_t far = __byte_perm(w[2], w[3], sel);
          MmaF16(o[2 * j4 + half], Fp8x2ToHalf2Bits(near & 0xffffu), Fp8x2ToHalf2Bits(near >> 16),
                 Fp8x2ToHalf2Bits(far & 0xffffu), Fp8x2ToHalf2Bits(far >> 16), pb0, pb1);
        }
      }
      __syncwarp();  // every lane has read this stage before it is refilled
    } else {
      const unsigned char* const buf =
          warp_buf + (j % kDecodeStages) * 2 * kTileBytes + lane * kChunkBytes;
      // Scores. Inactive lanes contribute zeros (their chunks were not copied).
      float s[kSteps][kMaxG];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        float k[8];
        ReadChunk<Cache>(buf + u * 32 * kChunkBytes, d_active, k);
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) {
          float dot = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(q[g][e], k[e], dot);
          s[u][g] = dot;
        }
#pragma unroll
        for (int offset = kTG / 2; offset > 0; offset >>= 1) {
#pragma unroll
          for (int g = 0; g < kMaxG; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], offset);
        }
        const bool valid = start + u * kKeysPerStep + key_in_step < k_end;
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) s[u][g] = valid ? s[u][g] : kNegInf;
      }

      // Tile max over the whole warp; rescale only when it grows (rare after
      // the first tiles). The tile's first key is valid, so the max is finite.
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        float mx = s[0][g];
#pragma unroll
        for (int u = 1; u < kSteps; ++u) mx = fmaxf(mx, s[u][g]);
#pragma unroll
        for (int offset = kTG; offset < 32; offset <<= 1) {
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
        }
        if (mx > m[g]) {                            // warp-uniform
          const float alpha = FastExp2(m[g] - mx);  // 0 while m is -inf
          l[g] *= alpha;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
          m[g] = mx;
        }
      }

      // Probabilities (masked keys: ex2(-inf) = 0, their V chunks are zeros)
      // and the weighted sum of values.
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        float v[8];
        ReadChunk<Cache>(buf + kTileBytes + u * 32 * kChunkBytes, d_active, v);
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) {
          const float pr = FastExp2(s[u][g] - m[g]);
          l[g] += pr;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pr, v[e], acc[g][e]);
        }
      }
    }
  };
  for (int j = 0; j < my_tiles; j += 2) {
    step(j, Even());
    if (j + 1 < my_tiles) step(j + 1, Odd());
  }
  CpAsyncWait<0>();  // only empty groups remain, but the buffers get reused
  __syncthreads();

  float* const partial = reinterpret_cast<float*>(decode_smem);  // [warps][kMaxG][D]
  float* const red_m = partial + kDecodeWarps * kMaxG * D;       // [warps][kMaxG]
  float* const red_l = red_m + kDecodeWarps * kMaxG;             // [warps][kMaxG]
  if constexpr (kMma) {
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], 1);
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], 2);
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 2 * mma_t + (e & 1);
        const int dim = kWide ? 16 * mt + mma_g + 8 * (e >> 1)
                              : 32 * (mt >> 1) + 4 * mma_g + 2 * (mt & 1) + (e >> 1);
        if (kPair ? (col & 3) < G : col < g_count)
          partial[(warp * kMaxG + col) * D + dim] = o[mt][e];
      }
    }
    if (mma_t == 0 && mma_g < kMaxG) {
      red_m[warp * kMaxG + mma_g] = m[0];
      red_l[warp * kMaxG + mma_g] = l[0];
    }
  } else {
    // Sum over the groups of a warp (lanes with equal group_lane hold the same
    // dims and, within a group, the same key sums).
#pragma unroll
    for (int offset = kTG; offset < 32; offset <<= 1) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        l[g] += __shfl_xor_sync(0xffffffffu, l[g], offset);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
      }
    }
    if (lane < kTG && d_active) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        if (g < g_count) {
#pragma unroll
          for (int e = 0; e < 8; ++e) partial[(warp * kMaxG + g) * D + d0 + e] = acc[g][e];
        }
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        red_m[warp * kMaxG + g] = m[g];
        red_l[warp * kMaxG + g] = l[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps: weights 2^(m_w - M); a warp without keys has m_w = -inf
  // and weight 0. M is -inf only for an empty split (all weights then 0).
  const int64_t out_stride = static_cast<int64_t>(p.num_q_heads) * D;
  // kPair: column g is query head g % 4 of kv head kv_head + g / 4.
  for (int i = tid; i < (kPair ? kMaxG : g_count) * D; i += kDecodeThreads) {
    const int g = i / D;
    const int d = i - g * D;
    if (kPair && (g & 3) >= G) continue;
    float big_m = kNegInf;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) big_m = fmaxf(big_m, red_m[w * kMaxG + g]);
    float sum = 0.0f;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float mw = red_m[w * kMaxG + g];
      const float weight = mw == kNegInf ? 0.0f : FastExp2(mw - big_m);
      sum += weight * partial[(w * kMaxG + g) * D + d];
      total += weight * red_l[w * kMaxG + g];
    }
    const int head = kPair ? (kv_head + (g >> 2)) * G + (g & 3) : head0 + g;
    if (num_splits == 1) {
      // total > 0: the query's own position is always visible (a sparse
      // plan always lists it in the tail).
      static_cast<bf16*>(p.out)[t * out_stride + static_cast<int64_t>(head) * D + d] =
          __float2bfloat16_rn(sum / total);
    } else {
      const int64_t idx = (static_cast<int64_t>(split) * p.num_seqs + seq) * p.num_q_heads + head;
      ws_acc[idx * D + d] = sum;
      if (d == 0) {
        ws_ml[idx * 2] = big_m;
        ws_ml[idx * 2 + 1] = total;
      }
    }
  }
}

// Merges the per-split partial results of the decode kernel: with split maxima
// m_j (log2 units), sums l_j and accumulators a_j, out = sum_j 2^(m_j - M) a_j /
// sum_j 2^(m_j - M) l_j where M = max_j m_j. Empty splits have m_j = -inf.
__global__ void DecodeCombineKernel(const __grid_constant__ PagedAttentionParams p, int num_splits,
                                    const float* __restrict__ ws_acc,
                                    const float* __restrict__ ws_ml) {
  WaitForPrerequisites();
  extern __shared__ float combine_smem[];  // [num_splits] weights, then [num_splits] sums
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  int q_begin;
  if (p.plan_entries != nullptr) {
    q_begin = p.plan_entries[seq * kPlanFields];
  } else {
    q_begin = p.query_start[seq];
    if (p.query_start[seq + 1] - q_begin != 1) return;
  }
  const int D = p.head_dim;
  const int64_t stride = static_cast<int64_t>(p.num_seqs) * p.num_q_heads;
  const int64_t base = static_cast<int64_t>(seq) * p.num_q_heads + head;
  float* const weight = combine_smem;
  float* const sums = combine_smem + num_splits;

  // The splits' maxima and sums are read once, in parallel, into shared
  // memory (a serial walk over them per thread costs a dependent L2 round
  // trip per split).
  for (int j = threadIdx.x; j < num_splits; j += blockDim.x) {
    weight[j] = ws_ml[(j * stride + base) * 2];
    sums[j] = ws_ml[(j * stride + base) * 2 + 1];
  }
  __syncthreads();
  float max_m = kNegInf;
  for (int j = 0; j < num_splits; ++j) max_m = fmaxf(max_m, weight[j]);
  // The query's own key is in some split, so max_m is finite.
  float total = 0.0f;
  for (int j = 0; j < num_splits; ++j) total += FastExp2(weight[j] - max_m) * sums[j];
  __syncthreads();  // every thread has read the maxima
  for (int j = threadIdx.x; j < num_splits; j += blockDim.x)
    weight[j] = FastExp2(weight[j] - max_m);
  __syncthreads();
  bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(q_begin) * p.num_q_heads * D +
              static_cast<int64_t>(head) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.0f;
#pragma unroll 4
    for (int j = 0; j < num_splits; ++j) sum += weight[j] * ws_acc[(j * stride + base) * D + d];
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

template <int kMaxD, typename Cache>
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
  const Cache* k_cache = static_cast<const Cache*>(p.k_cache);
  const Cache* v_cache = static_cast<const Cache*>(p.v_cache);
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
      const QueryRowPlace at = PlaceQueryRow(q_begin, G, kv_head, row);
      Load8(qkv + at.token * p.qkv_row_width + static_cast<int64_t>(at.head) * D + c * 8, v);
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
    const QueryRowPlace at = PlaceQueryRow(q_begin, G, kv_head, row);
    // l > 0: every row sees at least its own position.
    const float inv_l = 1.0f / l[i];
    bf16* dst = out + at.token * out_stride + static_cast<int64_t>(at.head) * D;
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

// Whether dense decoding takes the paired-kv-head tensor-core path (see
// kPair above): head_dim 128 (either cache dtype), at most 4 query heads per
// kv head, and an even number of kv heads.
bool PairsKvHeads(const PagedAttentionParams& p) {
  const int G = p.num_q_heads / p.num_kv_heads;
  return p.head_dim == kMmaHeadDim && p.plan_entries == nullptr && G <= 4 &&
         p.num_kv_heads % 2 == 0;
}

// Launches a decode kernel with the shared memory its path stages (above
// 48 KiB needs an opt-in, per device, so it is set on every launch).
template <typename... Args>
cudaError_t LaunchDecodeKernel(void (*kernel)(Args...), dim3 grid, bool wide, cudaStream_t stream,
                               const PagedAttentionParams& p, int num_splits, int head_chunks,
                               float* ws_acc, float* ws_ml) {
  const size_t smem = DecodeSmemBytes(wide);
  if (smem > 48 * 1024) {
    const cudaError_t attr = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (attr != cudaSuccess) return attr;
  }
  return LaunchDependent(kernel, grid, kDecodeThreads, smem, stream, p, num_splits, head_chunks,
                         ws_acc, ws_ml);
}

template <int kTG, int kMaxG>
cudaError_t LaunchDecodeG(const PagedAttentionParams& p, int num_splits, float* ws_acc,
                          float* ws_ml, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const bool sparse = p.plan_entries != nullptr;
  const bool wide = !p.kv_fp8 && p.head_dim == kMmaHeadDim;  // bf16 on the tensor cores
  if (PairsKvHeads(p)) {
    const dim3 grid(p.num_seqs, p.num_kv_heads / 2, num_splits);
    return LaunchDecodeKernel(p.kv_fp8 ? PagedDecodeKernel<8, 8, false, fp8, true, true>
                                       : PagedDecodeKernel<16, 8, false, bf16, true, true>,
                              grid, wide, stream, p, num_splits, 1, ws_acc, ws_ml);
  }
  const int head_chunks = (G + kMaxG - 1) / kMaxG;
  const dim3 grid(p.num_seqs, p.num_kv_heads * head_chunks, num_splits);
  auto kernel = p.kv_fp8 ? (sparse ? PagedDecodeKernel<kTG, kMaxG, true, fp8>
                                   : PagedDecodeKernel<kTG, kMaxG, false, fp8>)
                         : (sparse ? PagedDecodeKernel<kTG, kMaxG, true, bf16>
                                   : PagedDecodeKernel<kTG, kMaxG, false, bf16>);
  if constexpr (kTG == 16) {
    // head_dim 128 takes the tensor-core path: fp8 with 16 dims per lane
    // and chunk (8 lanes per key), bf16 with 8 (16 lanes per key).
    if (p.head_dim == kMmaHeadDim) {
      kernel = p.kv_fp8 ? (sparse ? PagedDecodeKernel<8, kMaxG, true, fp8, true>
                                  : PagedDecodeKernel<8, kMaxG, false, fp8, true>)
                        : (sparse ? PagedDecodeKernel<16, kMaxG, true, bf16, true>
                                  : PagedDecodeKernel<16, kMaxG, false, bf16, true>);
    }
  }
  return LaunchDecodeKernel(kernel, grid, wide, stream, p, num_splits, head_chunks, ws_acc, ws_ml);
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

template <int kMaxD, typename Cache>
cudaError_t LaunchPrefillDC(const PagedAttentionParams& p, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int64_t row_tiles = (static_cast<int64_t>(p.max_query_len) * G + kBQ - 1) / kBQ;
  if (row_tiles > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = PrefillSmemBytes(p.head_dim);
  // Above 48 KiB dynamic shared memory needs an explicit opt-in (per device,
  // so it is set on every launch rather than cached).
  const cudaError_t attr =
      cudaFuncSetAttribute(PagedPrefillKernel<kMaxD, Cache>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(p.num_seqs, p.num_kv_heads, static_cast<unsigned>(row_tiles));
  PagedPrefillKernel<kMaxD, Cache><<<grid, kPrefillThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int kMaxD>
cudaError_t LaunchPrefillD(const PagedAttentionParams& p, cudaStream_t stream) {
  return p.kv_fp8 ? LaunchPrefillDC<kMaxD, fp8>(p, stream)
                  : LaunchPrefillDC<kMaxD, bf16>(p, stream);
}

cudaError_t LaunchPrefill(const PagedAttentionParams& p, cudaStream_t stream) {
  // Head dims 64 and 128 run on the tensor cores (wgmma for 128 on a bf16
  // cache); the CUDA-core kernel below remains for every other head dim.
  if (CanUseWgmmaPrefill(p)) return LaunchWgmmaPrefill(p, stream);
  if (CanUseTensorCorePrefill(p)) return LaunchTensorCorePrefill(p, stream);
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
  const int64_t units = static_cast<int64_t>(p.num_seqs) *
                        (PairsKvHeads(p) ? p.num_kv_heads / 2 : p.num_kv_heads * head_chunks);
  // Blocks that fit on the GPU at once. Each block streams its keys at about
  // the same rate, so the time goes as (waves of blocks) x (keys per block):
  // take the fewest splits whose last wave is at least 90% full, which also
  // keeps the combine's extra traffic small.
  const int64_t slots =
      static_cast<int64_t>(std::max(num_sms, 1)) *
      DecodeBlocksPerSm(NextPow2(std::min(G, kDecodeMaxG)), p.plan_entries != nullptr,
                        p.head_dim == kMmaHeadDim, !p.kv_fp8 && p.head_dim == kMmaHeadDim);
  int keys = p.max_context_len;
  if (p.sliding_window > 0) keys = std::min(keys, p.sliding_window);
  // A split shorter than this spends more time filling its pipeline and in
  // the combine than it saves (on an H100 at batch 1 and 1k keys, 128 beat
  // 256 by 13% and 64 and 32 were no better).
  constexpr int kMinKeysPerSplit = 128;
  const int max_splits = static_cast<int>(
      std::clamp<int64_t>((keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1, 256));
  int best = 1;
  double best_fill = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    const int64_t blocks = units * s;
    const int64_t waves = (blocks + slots - 1) / slots;
    const double fill = static_cast<double>(blocks) / static_cast<double>(waves * slots);
    if (fill >= 0.9) return s;
    if (fill > best_fill) {
      best_fill = fill;
      best = s;
    }
  }
  return best;
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
      num_splits > 4096) {
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
      const cudaError_t combine =
          LaunchDependent(DecodeCombineKernel, grid, block, 2 * num_splits * sizeof(float), stream,
                          p, num_splits, ws_acc, ws_ml);
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
