// ClusterKV's key clustering on the GPU (see kv_cluster.h; the recipe and the
// CPU reference are engine/kmeans.h and engine/cpu_backend.cc).
//
// Pipeline of one call (every step one launch over all KV heads; no host
// round trip):
//   1. gather the range's K rows into a contiguous scratch [H, n, D] (bf16);
//   2. seed (engine/kmeans.h): centroids j < c0 = ceil(C / 2) are keys
//      floor(j * n / c0); one assignment pass against those gives each key's
//      best cosine similarity, a stable radix sort by its bucket the C - c0
//      least similar keys, a stable compaction of their flags the same keys
//      in ascending t, which seed the other centroids. Store each centroid's
//      fp32 copy and its normalised bf16 copy;
//   3. per iteration:
//      a. assignment on tensor cores: [n x D] raw keys times [D x C]
//         normalised centroids (bf16, fp32 accumulate; mma.sync, or wgmma
//         for head_dim 128 on sm_90a: ClusterAssignKernel), argmax per key.
//         A key's norm is a positive factor common to all its
//         similarities, so argmax_j x . c_j / |c_j| is the cosine argmax
//         without normalising the keys (and a zero key scores 0
//         everywhere, which goes to cluster 0 like the reference). A pass
//         that changes no assignment clears nothing in the flag, and every
//         later launch of the call returns at once when it sees that;
//      b. every cluster's members in ascending t (ClusterMemberOrder): a
//         stable CUB radix sort of (head * C + cluster, t) pairs and the
//         segment bounds of the sorted keys, or a counting sort (counts
//         per (cluster, 1024-key tile) from the assignment, a scan per
//         head into positions and bounds, a block sort per tile), or, with
//         the resident assignment, each of its blocks orders its own keys
//         (BlockMemberOrder) and the global order is made once, after the
//         last pass;
//      c. one warp per cluster sums its raw keys in that fixed order
//         (deterministic, no float atomics) and writes the new fp32
//         centroid and its normalised bf16 copy (an empty cluster keeps its
//         centroid). The assignment and the update launch dependent on each
//         other (dependent_launch.cuh), so each starts as the other drains;
//   4. extents by a scan of the cluster sizes, centroids to the pool (bf16);
//   5. reorder: the sorted order is exactly the cluster-major, ascending-t
//      order the reference's stable sort produces, so row i of the range
//      gets the key of sorted position i: K rows from the scratch, then V
//      (gathered into the same scratch, which keeps the workspace at one
//      [H, n, D] copy).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>
#include <cuda/functional>
#include <type_traits>

#include "cuda/kernels/dependent_launch.cuh"
#include "cuda/kernels/fp8.cuh"
#include "cuda/kernels/kv_cluster.h"
#include "cuda/kernels/ptx.cuh"
#include "cuda/kernels/tensor_map.h"
#include "cuda/kernels/tma.cuh"
#include "cuda/kernels/wgmma.cuh"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

// Centroids per shared-memory chunk of the assignment kernel, and the warps
// of its blocks.
constexpr int kChunk = 64;
// Centroid rows are padded to a multiple of this (zero rows that never win):
// whole chunks for both assignment kernels.
constexpr int kCentroidPad = 128;
constexpr int kAssignWarps = 8;
constexpr int kMaxHeadDimCluster = 256;
// Keys per member tile of the per-pass counting sort (see
// MemberOffsetsKernel); a sort key is cluster << kMemberTileBits | t in tile.
constexpr int kMemberTileBits = 10;
constexpr int kMemberTile = 1 << kMemberTileBits;
static_assert((uint64_t{kClusterKeysMaxClusters} + 1) << kMemberTileBits <= (uint64_t{1} << 32),
              "a member tile's sort key (cluster, t in tile) must fit 32 bits");

// AssignResidentKernel's most blocks per head: 32, so the centroid update's
// walk over the blocks' member orders deals the members as the global order
// does. kAuto takes the kernel only from kResidentAutoMinHeads KV heads on,
// where the cap idles no SM of an H100.
constexpr int kResidentMaxBlocks = 32;
constexpr int kResidentAutoMinHeads = 4;

size_t AlignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

// kAuto's member order: the counting sort (measured faster on an H100 at 32k
// keys, 410 clusters) while its per-head count arrays, clusters x member
// tiles, stay small; their single-block scan per head and their memory grow
// with n x C (1M keys and 12.5k clusters would take 100 MB per head), where
// the radix sort's cost grows with n only.
constexpr int64_t kCountingSortMaxGroups = int64_t{1} << 20;
bool UseCountingSort(const ClusterKeysParams& p) {
  if (p.member_order != ClusterMemberOrder::kAuto) {
    return p.member_order == ClusterMemberOrder::kCountingSort;
  }
  const int64_t tiles = (int64_t{std::max(p.count, 0)} + kMemberTile - 1) / kMemberTile;
  return tiles * std::max(p.num_clusters, 0) <= kCountingSortMaxGroups;
}
int RoundUp(int v, int m) { return (v + m - 1) / m * m; }

// Byte offsets of the workspace's arrays.
struct Workspace {
  size_t scratch = 0;   // bf16 [H, n, D]: K rows, later V rows
  size_t centroid = 0;  // f32 [H, C, D]: raw centroids
  size_t normed = 0;    // bf16 [H, Cpad, Dpad]: normalised centroids, zero padded
  size_t assign = 0;    // i32 [H, n]
  size_t keys_in = 0;   // u32 [H * n]: sort keys (seeding; radix-sort passes: head * C + cluster)
  size_t keys_out = 0;
  size_t vals_in = 0;       // i32 [H * n]: sort values, t
  size_t vals_out = 0;      // i32 [H * n]: seeding, then each pass's t in cluster order
  size_t tile_counts = 0;   // i32 [2, H, C, tiles]: keys per (cluster, member tile), by pass parity
  size_t tile_base = 0;     // i32 [H, C, tiles]: their first sorted position in the head
  size_t block_counts = 0;  // i32 [H, C, blocks <= kResidentMaxBlocks]: BlockMembers::counts
  size_t block_starts = 0;  // i32 [H, C, blocks <= kResidentMaxBlocks]: BlockMembers::starts
  size_t seg_begin = 0;     // i32 [H * C]: sorted positions of each cluster
  size_t seg_end = 0;
  size_t changed = 0;  // i32 [iterations]: whether a pass changed anything
  size_t best = 0;     // f32 [H * n]: seeding, each key's best score against the first seeds
  size_t seeds = 0;    // i32 [H, C]: seed keys
  size_t sort_temp = 0;
  size_t sort_temp_bytes = 0;  // CUB's radix sorts and the seeding's compaction
  size_t total = 0;
  int end_bit = 1;         // radix-sort key bits of a pass: head * C + cluster
  int member_end_bit = 0;  // block-sort key bits of a member tile: cluster, t in tile
  int head_bits = 0;       // bits of a head index (seeding sort: head, then similarity)
  int seed_end_bit = 0;    // radix-sort key bits of the seeding sort
};

Workspace PlanWorkspace(const ClusterKeysParams& p) {
  Workspace w;
  const size_t h = static_cast<size_t>(std::max(p.num_kv_heads, 0));
  const size_t n = static_cast<size_t>(std::max(p.count, 0));
  const size_t d = static_cast<size_t>(std::max(p.head_dim, 0));
  const size_t c = static_cast<size_t>(std::max(p.num_clusters, 0));
  const size_t c_pad = static_cast<size_t>(RoundUp(std::max(p.num_clusters, 1), kCentroidPad));
  const size_t d_pad = static_cast<size_t>(RoundUp(std::max(p.head_dim, 1), 16));
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = AlignUp(off + bytes, 256);
    return at;
  };
  w.scratch = take(h * n * d * sizeof(bf16));
  w.centroid = take(h * c * d * sizeof(float));
  w.normed = take(h * c_pad * d_pad * sizeof(bf16));
  w.assign = take(h * n * sizeof(int32_t));
  w.keys_in = take(h * n * sizeof(uint32_t));
  w.keys_out = take(h * n * sizeof(uint32_t));
  w.vals_in = take(h * n * sizeof(int32_t));
  w.vals_out = take(h * n * sizeof(int32_t));
  // Only the counting sort has tile arrays (they grow with n x C).
  const size_t tiles = UseCountingSort(p) ? (n + kMemberTile - 1) / kMemberTile : 0;
  w.tile_counts = take(2 * h * c * tiles * sizeof(int32_t));
  w.tile_base = take(h * c * tiles * sizeof(int32_t));
  const size_t block_slots = tiles > 0 ? h * kResidentMaxBlocks * c : 0;
  w.block_counts = take(block_slots * sizeof(int32_t));
  w.block_starts = take(block_slots * sizeof(int32_t));
  w.seg_begin = take(h * c * sizeof(int32_t));
  w.seg_end = take(h * c * sizeof(int32_t));
  w.changed = take(static_cast<size_t>(std::max(p.iterations, 1)) * sizeof(int32_t));
  w.best = take(h * n * sizeof(float));
  w.seeds = take(h * c * sizeof(int32_t));
  const uint64_t max_key = h * c > 0 ? h * c - 1 : 0;
  while ((max_key >> w.end_bit) != 0) ++w.end_bit;
  int cluster_bits = 0;  // enough for the value c (tile keys past n)
  while ((c >> cluster_bits) != 0) ++cluster_bits;
  w.member_end_bit = kMemberTileBits + cluster_bits;
  while (h > 0 && ((h - 1) >> w.head_bits) != 0) ++w.head_bits;
  w.seed_end_bit = w.head_bits + kClusterSeedSimilarityBits;
  // Size queries only: CUB reads no data when the temp pointer is null.
  for (const int end_bit : {w.end_bit, w.seed_end_bit}) {
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(
        nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
        static_cast<int>(h * n), 0, end_bit);
    w.sort_temp_bytes = std::max(w.sort_temp_bytes, bytes);
  }
  size_t select_bytes = 0;
  cub::DeviceSelect::Flagged(nullptr, select_bytes, static_cast<const int32_t*>(nullptr),
                             static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                             static_cast<int*>(nullptr), static_cast<int>(h * n));
  w.sort_temp_bytes = std::max(w.sort_temp_bytes, select_bytes);
  w.sort_temp = take(w.sort_temp_bytes);
  w.total = off;
  return w;
}

__device__ __forceinline__ int64_t SlotOf(const int32_t* table, int page_size, int index) {
  return static_cast<int64_t>(table[index / page_size]) * page_size + index % page_size;
}

// 8 cache elements (bf16: 16 bytes; fp8 e4m3: 8 bytes) <-> 8 bf16. fp8
// widens to bf16 exactly, and those bf16 values narrow back to the same
// fp8 bytes, so a gather / scatter round trip reorders fp8 rows losslessly.
__device__ __forceinline__ uint4 Load8AsBf16(const bf16* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ uint4 Load8AsBf16(const __nv_fp8_e4m3* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const uint32_t words[2] = {raw.x, raw.y};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Fp8x2ToFloat2(words[i / 2] >> (16 * (i % 2)));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    out[i] = *reinterpret_cast<const uint32_t*>(&b);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}
__device__ __forceinline__ void Store8FromBf16(bf16* p, uint4 v) {
  *reinterpret_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void Store8FromBf16(__nv_fp8_e4m3* p, uint4 v) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  uint32_t out[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
    out[i / 2] |= Float2ToFp8x2(f) << (16 * (i % 2));
  }
  *reinterpret_cast<uint2*>(p) = make_uint2(out[0], out[1]);
}

// The copies between the paged cache and the head-major scratch. A block
// covers kCopyThreads / (d / 8) cache rows (one thread per 8 elements) in
// the cache's order, (t, h), so its cache side is one contiguous run and
// the scratch side one 256-byte row per head (in (h, t) order the cache
// side was 256-byte pieces 2 KiB apart: 50 and 54 us for the 32k x 8-head
// gather and scatter on an H100, now 47 and 49, ~2.8 TB/s).
constexpr int kCopyThreads = 256;

// scratch[h][t] = cache row of logical index begin + t, head h.
template <typename Cache>
__global__ void __launch_bounds__(kCopyThreads)
    GatherRowsKernel(const Cache* __restrict__ cache, const int32_t* __restrict__ table,
                     int page_size, int begin, int n, int heads, int d,
                     bf16* __restrict__ scratch) {
  const int chunks = d / 8;
  const int rows_per_block = kCopyThreads / chunks;
  const int c = threadIdx.x % chunks, local = threadIdx.x / chunks;
  if (local >= rows_per_block) return;
  const int rows = heads * n;  // fits an int (the sorts take it as their count)
  for (int r = blockIdx.x * rows_per_block + local; r < rows; r += gridDim.x * rows_per_block) {
    const int t = r / heads, h = r - t * heads;
    const int64_t slot = SlotOf(table, page_size, begin + t);
    const uint4 v = Load8AsBf16(cache + (slot * heads + h) * d + c * 8);
    *reinterpret_cast<uint4*>(scratch + (int64_t{h} * n + t) * d + c * 8) = v;
  }
}

// Row begin + i of the range, head h, gets scratch row sorted_t[h * n + i].
template <typename Cache>
__global__ void __launch_bounds__(kCopyThreads)
    ScatterRowsKernel(const bf16* __restrict__ scratch, const int32_t* __restrict__ sorted_t,
                      const int32_t* __restrict__ table, int page_size, int begin, int n, int heads,
                      int d, Cache* __restrict__ cache) {
  const int chunks = d / 8;
  const int rows_per_block = kCopyThreads / chunks;
  const int c = threadIdx.x % chunks, local = threadIdx.x / chunks;
  if (local >= rows_per_block) return;
  const int rows = heads * n;
  for (int r = blockIdx.x * rows_per_block + local; r < rows; r += gridDim.x * rows_per_block) {
    const int i = r / heads, h = r - i * heads;
    // Clamped: an order read from storage (ReorderKeys) cannot make the
    // copy read outside the range, whatever it holds.
    const int t = min(max(sorted_t[int64_t{h} * n + i], 0), n - 1);
    const uint4 v = *reinterpret_cast<const uint4*>(scratch + (int64_t{h} * n + t) * d + c * 8);
    const int64_t slot = SlotOf(table, page_size, begin + i);
    Store8FromBf16(cache + (slot * heads + h) * d + c * 8, v);
  }
}

int CopyGrid(int64_t rows, int d) {
  const int64_t rows_per_block = kCopyThreads / (d / 8);
  return static_cast<int>(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, 65536));
}

// assign = -1 (so the first pass counts as a change) and, for the radix
// sort's values, vals_in = t.
__global__ void InitStateKernel(int n, int heads, int32_t* __restrict__ assign,
                                int32_t* __restrict__ vals_in) {
  const int64_t total = static_cast<int64_t>(heads) * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    assign[i] = -1;
    if (vals_in != nullptr) vals_in[i] = static_cast<int32_t>(i % n);
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Writes the normalised bf16 copy of centroid row `c` (lane-strided dims
// lane * 2 + 64 k) into `normed_row`; a zero centroid normalises to zero.
__device__ __forceinline__ void WriteNormed(const float (&c)[8], int lane, int d,
                                            bf16* __restrict__ normed_row) {
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    sq += c[2 * k] * c[2 * k] + c[2 * k + 1] * c[2 * k + 1];
  }
  sq = WarpSum(sq);
  const float inv = sq > 0.0f ? rsqrtf(sq) : 0.0f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int dim = lane * 2 + 64 * k;
    if (dim < d) {
      *reinterpret_cast<__nv_bfloat162*>(normed_row + dim) =
          __floats2bfloat162_rn(c[2 * k] * inv, c[2 * k + 1] * inv);
    }
  }
}

// One warp per (head, cluster slot j < Cpad): seeds centroid j < C with key
// seeds[head * C + j], or without a seed list key floor(j * n / C); padding
// rows j >= C and columns >= D are zero.
__global__ void InitCentroidsKernel(const bf16* __restrict__ scratch, int n, int heads, int d,
                                    int d_pad, int clusters, int c_pad,
                                    const int32_t* __restrict__ seeds, float* __restrict__ centroid,
                                    bf16* __restrict__ normed) {
  const int lane = threadIdx.x % 32;
  const int64_t total = int64_t{heads} * c_pad;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t gw = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32; gw < total;
       gw += warps) {
    const int64_t h = gw / c_pad;
    const int j = static_cast<int>(gw % c_pad);
    bf16* normed_row = normed + gw * d_pad;
    for (int dim = lane; dim < d_pad; dim += 32) {
      if (j >= clusters || dim >= d) normed_row[dim] = __float2bfloat16(0.0f);
    }
    if (j >= clusters) continue;
    const int64_t seed =
        seeds != nullptr ? seeds[h * clusters + j] : static_cast<int64_t>(j) * n / clusters;
    const bf16* key = scratch + (h * n + seed) * d;
    float* out = centroid + (h * clusters + j) * d;
    float c[8] = {};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int dim = lane * 2 + 64 * k;
      if (dim < d) {
        const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(key + dim));
        c[2 * k] = v.x;
        c[2 * k + 1] = v.y;
        out[dim] = v.x;
        out[dim + 1] = v.y;
      }
    }
    WriteNormed(c, lane, d, normed_row);
  }
}

// ---- Seeding: the keys least like the first, position-spread seeds ----------

// Each key's similarity bucket (engine::SeedSimilarityBucket of its best
// score over its norm; 0 similarity for a zero key; the top bucket for the
// first seeds themselves) as a sort key that orders a head's keys by
// ascending similarity: head index above kClusterSeedSimilarityBits bucket
// bits; the value is t. A row is read by `lanes` lanes (a power of two >=
// d / 8, 16 bytes each), so a warp reads 32 / lanes rows at once.
__global__ void FarthestKeysKernel(const bf16* __restrict__ scratch, const float* __restrict__ best,
                                   int n, int heads, int d, int c0, int lanes,
                                   uint32_t* __restrict__ sort_keys,
                                   int32_t* __restrict__ sort_vals) {
  const int lane = threadIdx.x % 32;
  const int sub = lane / lanes, chunk = lane % lanes;
  const int rows_per_warp = 32 / lanes;
  const int64_t total = int64_t{heads} * n;
  constexpr int kGroups = 4;  // row groups in flight per warp
  const int64_t stride = int64_t{gridDim.x} * (blockDim.x / 32) * rows_per_warp * kGroups;
  constexpr uint32_t kSeedBucket = (1u << kClusterSeedSimilarityBits) - 1;  // the first seeds'
  constexpr double kTop = static_cast<double>(kSeedBucket - 1);
  const int64_t first =
      (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32 * rows_per_warp * kGroups;
  for (int64_t base = first; base < total; base += stride) {
    // Every load first (the rows and their best scores), then the sums: a
    // row, its best and then the next row one after another kept one load
    // in flight per lane, and the kernel at 52 us for 67 MB at 32k keys x 8
    // heads (43 us now; ~22 would be the DRAM's rate).
    uint4 w[kGroups];
    float key_best[kGroups];
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
      const int64_t key = base + u * rows_per_warp + sub;
      w[u] = key < total && chunk * 8 < d
                 ? *reinterpret_cast<const uint4*>(scratch + key * d + chunk * 8)
                 : make_uint4(0, 0, 0, 0);
      key_best[u] = chunk == 0 && key < total ? best[key] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
      const int64_t key = base + u * rows_per_warp + sub;
      float sq = 0.0f;
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&w[u]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(pairs[k]);
        sq += f.x * f.x + f.y * f.y;
      }
      for (int off = 1; off < lanes; off <<= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
      if (chunk != 0 || key >= total) continue;
      const float cosv = sq > 0.0f ? fminf(fmaxf(key_best[u] * rsqrtf(sq), -1.0f), 1.0f) : 0.0f;
      // 32-bit: heads * n fits an int (the sorts take it as their count).
      const int head = static_cast<int>(key) / n;
      const int t = static_cast<int>(key) - head * n;
      // t is a first seed when floor(j * n / c0) == t for j = ceil(t * c0 / n),
      // i.e. when j < c0 and j * n < (t + 1) * c0; j from a double quotient
      // corrected with exact products (no 64-bit division).
      const int64_t x = int64_t{t} * c0;
      int64_t j = static_cast<int64_t>(static_cast<double>(x) / n);
      while (j * n < x) ++j;
      while (j > 0 && (j - 1) * n >= x) --j;
      const bool first_seed = j < c0 && j * n < x + c0;
      const uint32_t bucket =
          first_seed ? kSeedBucket
                     : static_cast<uint32_t>((static_cast<double>(cosv) + 1.0) * 0.5 * kTop);
      sort_keys[key] = (static_cast<uint32_t>(head) << kClusterSeedSimilarityBits) | bucket;
      sort_vals[key] = t;
    }
  }
}

// Flags the first `count` keys of every head's sorted order (the farthest).
__global__ void MarkFarthestKernel(const int32_t* __restrict__ sorted_t, int n, int heads,
                                   int count, int32_t* __restrict__ flags) {
  const int64_t total = int64_t{heads} * count;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t h = i / count, r = i % count;
    flags[h * n + sorted_t[h * n + r]] = 1;
  }
}

// seeds[h][j]: key floor(j * n / c0) for j < c0, else the (j - c0)-th flagged
// key of head h in ascending t (`flagged`: every head's flagged t, head by
// head, from a stable compaction).
__global__ void SeedListKernel(const int32_t* __restrict__ flagged, int n, int heads, int clusters,
                               int c0, int32_t* __restrict__ seeds) {
  const int64_t total = int64_t{heads} * clusters;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t h = i / clusters;
    const int j = static_cast<int>(i % clusters);
    seeds[i] = j < c0 ? static_cast<int32_t>(int64_t{j} * n / c0)
                      : flagged[h * (clusters - c0) + (j - c0)];
  }
}

// Keeps (best, index) the better of itself and (s, j): a larger score, and
// on equal scores the lower cluster (the reference's strict > over an
// ascending j).
__device__ __forceinline__ void Better(float s, int j, float& best, int& index) {
  if (s > best || (s == best && j < index)) {
    best = s;
    index = j;
  }
}

// The member order a resident assignment pass leaves (see BlockMemberOrder):
// block b of head h owns keys [key0(b), key0(b + 1)) with key0(b) =
// (b * head_tiles / blocks) * 64, head_tiles = ceil(n / 64); `sorted` holds,
// at those places of head h's n, the block's t in (cluster, t) order;
// `counts` and `starts` each cluster's count and first
// place in that range ([H, C, blocks]: a cluster's blocks side by side for
// the update's warp).
struct BlockMembers {
  int32_t* sorted = nullptr;  // null: not wanted
  int32_t* counts = nullptr;
  int32_t* starts = nullptr;
};

// Where an assignment pass writes. Every pass sets `assign` (H x n) and,
// when it changes some key's cluster, *changed = 1; the optional outputs are
// the radix-sort keys head * C + cluster (sort_keys, H x n), the counts per
// (head, cluster, member tile) for the counting sort (tile_counts; integer
// atomics, so the counts do not depend on timing), and each key's best
// score (best_out, H x n). A pass runs only while *run_if (when set) is
// nonzero.
struct AssignOutputs {
  int32_t* assign = nullptr;
  uint32_t* sort_keys = nullptr;
  int32_t* tile_counts = nullptr;
  float* best_out = nullptr;
  int* changed = nullptr;
  const int* run_if = nullptr;
  // AssignResidentKernel only (BlockMemberOrder): each block's keys in
  // (cluster, t) order, and per (head, block, cluster) their count and
  // first place in the block's range.
  BlockMembers members;
};

// Merges the best (score, cluster) of the 4 lanes of a quad that share key
// `row` (mma C layout), then the quad's first lane (`writer`) stores the
// outputs. Returns whether the assignment changed. `previous`: the key's
// cluster before this pass (PreviousAssignment), read early by callers that
// would otherwise wait on the load here.
__device__ __forceinline__ int PreviousAssignment(int row, int h, int n, const AssignOutputs& out) {
  return row < n ? out.assign[static_cast<int64_t>(h) * n + row] : -1;
}
__device__ __forceinline__ bool StoreAssignment(float best, int index, int row, bool writer, int h,
                                                int n, int clusters, const AssignOutputs& out,
                                                int previous) {
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    const float other_best = __shfl_xor_sync(0xffffffffu, best, off);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, off);
    Better(other_best, other_index, best, index);
  }
  if (!writer || row >= n) return false;
  const int64_t at = static_cast<int64_t>(h) * n + row;
  if (out.best_out != nullptr) out.best_out[at] = best;
  if (out.sort_keys != nullptr) out.sort_keys[at] = static_cast<uint32_t>(h * clusters + index);
  if (out.tile_counts != nullptr) {
    const int tiles = (n + kMemberTile - 1) / kMemberTile;
    atomicAdd(
        out.tile_counts + (static_cast<int64_t>(h) * clusters + index) * tiles + row / kMemberTile,
        1);
  }
  if (previous == index) return false;
  out.assign[at] = index;
  return true;
}

// The assignment pass. Block = kAssignWarps warps, each owning kMt m-tiles
// of 16 keys whose A fragments (raw bf16 keys, kKs k-steps of 16 dims) stay
// in registers; centroids stream through shared memory in chunks of kChunk
// (cp.async, double buffered; rows padded by 8 bf16 so that the B-fragment
// loads of a warp hit 32 distinct banks). Each thread keeps the best
// (score, cluster) of its two rows per m-tile over the clusters it sees;
// a quad shuffle then merges the 4 threads that share a row.
template <int kKs, int kMt>
// Two blocks per SM (at most 128 registers a thread) keep 16 warps resident
// to hide the shared-memory and mma latencies.
__global__ void __launch_bounds__(kAssignWarps * 32, 2)
    AssignKernel(const bf16* __restrict__ keys, const bf16* __restrict__ normed, int n, int d,
                 int clusters, int c_pad, const __grid_constant__ AssignOutputs out) {
  if (out.run_if != nullptr && *out.run_if == 0) return;  // converged earlier
  constexpr int kDp = kKs * 16;
  constexpr int kStride = kDp + 8;
  extern __shared__ uint4 smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);

  const int h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int row0 = (blockIdx.x * kAssignWarps + warp) * kMt * 16;
  const bf16* key_head = keys + static_cast<int64_t>(h) * n * d;

  uint32_t a[kMt][kKs][4];
#pragma unroll
  for (int m = 0; m < kMt; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = min(row0 + m * 16 + g + half * 8, n - 1);
      const bf16* r = key_head + static_cast<int64_t>(row) * d;
#pragma unroll
      for (int ks = 0; ks < kKs; ++ks) {
        const int col = ks * 16 + 2 * q;
        a[m][ks][half] = col < d ? *reinterpret_cast<const uint32_t*>(r + col) : 0u;
        a[m][ks][2 + half] = col + 8 < d ? *reinterpret_cast<const uint32_t*>(r + col + 8) : 0u;
      }
    }
  }

  const bf16* cen_head = normed + static_cast<int64_t>(h) * c_pad * kDp;
  auto load_chunk = [&](int chunk, int buf) {
    constexpr int kVecsPerRow = kDp / 8;
    const bf16* src = cen_head + static_cast<int64_t>(chunk) * kChunk * kDp;
    bf16* dst = smem + buf * kChunk * kStride;
    for (int i = threadIdx.x; i < kChunk * kVecsPerRow; i += blockDim.x) {
      const int r = i / kVecsPerRow, v = i % kVecsPerRow;
      CpAsync16(SharedAddress(dst + r * kStride + v * 8), src + r * kDp + v * 8);
    }
  };

  float best[kMt][2];
  int index[kMt][2];
#pragma unroll
  for (int m = 0; m < kMt; ++m) {
    best[m][0] = best[m][1] = -INFINITY;
    index[m][0] = index[m][1] = 0;
  }
  const int num_chunks = c_pad / kChunk;
  load_chunk(0, 0);
  CpAsyncCommit();
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    if (chunk + 1 < num_chunks) load_chunk(chunk + 1, (chunk + 1) & 1);
    CpAsyncCommit();  // possibly empty: keeps the group count uniform
    CpAsyncWait<1>();
    __syncthreads();
    const bf16* s = smem + (chunk & 1) * kChunk * kStride;
#pragma unroll 2
    for (int nt = 0; nt < kChunk / 8; ++nt) {
      float acc[kMt][4] = {};
      const bf16* b_row = s + (nt * 8 + g) * kStride + 2 * q;
#pragma unroll
      for (int ks = 0; ks < kKs; ++ks) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(b_row + ks * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(b_row + ks * 16 + 8);
#pragma unroll
        for (int m = 0; m < kMt; ++m) MmaBf16(acc[m], a[m][ks], b0, b1);
      }
      const int j0 = chunk * kChunk + nt * 8 + 2 * q;
      // Clusters are visited in ascending order per thread, so strict >
      // keeps the lowest of equal scores; padding clusters never win.
      if (j0 < clusters) {
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
          if (acc[m][0] > best[m][0]) best[m][0] = acc[m][0], index[m][0] = j0;
          if (acc[m][2] > best[m][1]) best[m][1] = acc[m][2], index[m][1] = j0;
        }
      }
      if (j0 + 1 < clusters) {
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
          if (acc[m][1] > best[m][0]) best[m][0] = acc[m][1], index[m][0] = j0 + 1;
          if (acc[m][3] > best[m][1]) best[m][1] = acc[m][3], index[m][1] = j0 + 1;
        }
      }
    }
    __syncthreads();  // the buffer is refilled by the next iteration's copy
  }

  bool any_change = false;
#pragma unroll
  for (int m = 0; m < kMt; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + m * 16 + g + half * 8;
      any_change |= StoreAssignment(best[m][half], index[m][half], row, q == 0, h, n, clusters, out,
                                    PreviousAssignment(row, h, n, out));
    }
  }
  if (__any_sync(0xffffffffu, any_change) && lane == 0) *out.changed = 1;
}

// The assignment pass on warpgroup MMA (sm_90a) for head_dim 128. A block of
// two warpgroups scores 128 keys (64 each) against the centroids, 128 at a
// time: S = keys C^T on wgmma m64n128k16 with the raw bf16 keys and the
// normalised centroids in 128-byte-swizzled shared memory (wgmma.cuh), the
// centroid chunks double buffered with cp.async. Each thread then keeps the
// best (score, cluster) of its two rows over the columns it holds, in
// ascending cluster order, and a quad shuffle merges the row's 4 threads;
// the result is the same as AssignKernel's. On an H100 at 32k keys x 410
// clusters x 8 heads: 94.5 us per pass against AssignKernel's 120, and 88.9
// against 97.5 (same machine) since the last chunk is scored only as wide as
// its clusters need. (A
// persistent variant holding a head's centroids in shared memory, S of the
// next chunk issued before the current chunk's argmax, took 103 us; four
// warpgroups (256 keys) per block, one block per SM, 109 us.)
constexpr int kWgAssignGroups = 2;  // warpgroups per block; two blocks per SM
constexpr int kWgAssignThreads = 128 * kWgAssignGroups;
constexpr int kWgAssignRows = 64 * kWgAssignGroups;  // keys per block
constexpr int kWgAssignHeadDim = 128;
constexpr uint32_t kWgAssignKeyBytes = 2 * SwizzledBlockBytes(kWgAssignRows);
constexpr uint32_t kWgAssignTileBytes = 2 * SwizzledBlockBytes(128);  // 128 centroids x 128
constexpr size_t kWgAssignSmemBytes =
    1024 + kWgAssignKeyBytes + 2 * size_t{kWgAssignTileBytes};  // keys + 2 chunks

__global__ void __launch_bounds__(kWgAssignThreads, 2)
    AssignWgmmaKernel(const bf16* __restrict__ keys, const bf16* __restrict__ normed, int n,
                      int clusters, int c_pad, const __grid_constant__ AssignOutputs out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (out.run_if != nullptr && *out.run_if == 0) return;  // converged earlier
  constexpr int kD = kWgAssignHeadDim;
  constexpr uint32_t kBlock = SwizzledBlockBytes(128);
  const int h = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q = lane % 4;
  // Read through a shuffle so the compiler sees a warp-uniform value.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int row0 = blockIdx.x * kWgAssignRows;

  extern __shared__ __align__(1024) unsigned char wg_assign_smem[];
  const uint32_t base = (SharedAddress(wg_assign_smem) + 1023u) & ~1023u;
  const uint32_t key_smem = base;
  const uint32_t cen_smem = base + kWgAssignKeyBytes;  // [2] chunks

  const bf16* key_head = keys + static_cast<int64_t>(h) * n * kD;
#pragma unroll
  for (int i = 0; i < kWgAssignRows * 16 / kWgAssignThreads; ++i) {
    const int id = tid + i * kWgAssignThreads;
    const int r = id / 16, c = id % 16;
    const int row = row0 + r;
    CpAsync16(key_smem + SwizzledTileOffset(kWgAssignRows, r, c),
              key_head + static_cast<int64_t>(min(row, n - 1)) * kD + c * 8, row < n ? 16 : 0);
  }
  const bf16* cen_head = normed + static_cast<int64_t>(h) * c_pad * kD;
  const int num_chunks = c_pad / 128;
  // The last chunk holds 1..128 real clusters; when they fit in 32 or 64
  // columns only those are copied and scored (N = 32 or 64), which at 32k
  // keys and 409 clusters saves 3/4 of a chunk in 4.
  const int tail = clusters - (num_chunks - 1) * 128;
  const int last_columns = tail <= 32 ? 32 : tail <= 64 ? 64 : 128;
  auto load_chunk = [&](int chunk, int buf) {
    const int rows = chunk == num_chunks - 1 ? last_columns : 128;
#pragma unroll
    for (int i = 0; i < 128 * 16 / kWgAssignThreads; ++i) {
      const int id = tid + i * kWgAssignThreads;
      const int r = id / 16, c = id % 16;
      if (r < rows) {
        CpAsync16(cen_smem + buf * kWgAssignTileBytes + SwizzledTileOffset(128, r, c),
                  cen_head + (static_cast<int64_t>(chunk) * 128 + r) * kD + c * 8);
      }
    }
  };
  load_chunk(0, 0);
  CpAsyncCommit();

  float best[2] = {-INFINITY, -INFINITY};
  int index[2] = {0, 0};
  // Scores the chunk's first 2 kRegs columns (kRegs accumulators a thread:
  // N = 128, 64 or 32) and keeps each row's best. Columns in ascending order
  // per thread: strict > keeps the lowest of equal scores; padding clusters
  // never win.
  auto score = [&](int chunk, auto accumulators) {
    constexpr int kRegs = decltype(accumulators)::value;
    float s[kRegs];
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const uint32_t in_row = (ks % 4) * 32;
      const uint32_t key_offset = (ks / 4) * SwizzledBlockBytes(kWgAssignRows) + in_row;
      const uint32_t cen_offset = (ks / 4) * kBlock + in_row;
      const uint64_t a = Descriptor(key_smem + 64 * wg * 128 + key_offset, 16, 1024);
      const uint64_t b =
          Descriptor(cen_smem + (chunk & 1) * kWgAssignTileBytes + cen_offset, 16, 1024);
      if constexpr (kRegs == 64) {
        WgmmaSS(s, a, b, ks > 0 ? 1 : 0);
      } else if constexpr (kRegs == 32) {
        WgmmaSS64(s, a, b, ks > 0 ? 1 : 0);
      } else {
        WgmmaSS32(s, a, b, ks > 0 ? 1 : 0);
      }
    }
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(s);
#pragma unroll
    for (int j = 0; j < kRegs / 4; ++j) {
      const int col = chunk * 128 + 8 * j + 2 * q;
      if (col < clusters) {
        if (s[4 * j] > best[0]) best[0] = s[4 * j], index[0] = col;
        if (s[4 * j + 2] > best[1]) best[1] = s[4 * j + 2], index[1] = col;
      }
      if (col + 1 < clusters) {
        if (s[4 * j + 1] > best[0]) best[0] = s[4 * j + 1], index[0] = col + 1;
        if (s[4 * j + 3] > best[1]) best[1] = s[4 * j + 3], index[1] = col + 1;
      }
    }
  };
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    if (chunk + 1 < num_chunks) load_chunk(chunk + 1, (chunk + 1) & 1);
    CpAsyncCommit();  // possibly empty: keeps the group count uniform
    CpAsyncWait<1>();
    FenceProxyAsync();
    __syncthreads();
    const int columns = chunk == num_chunks - 1 ? last_columns : 128;
    if (columns == 128) {
      score(chunk, std::integral_constant<int, 64>());
    } else if (columns == 64) {
      score(chunk, std::integral_constant<int, 32>());
    } else {
      score(chunk, std::integral_constant<int, 16>());
    }
    __syncthreads();  // the buffer is refilled by the next iteration's copy
  }

  bool any_change = false;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + 64 * wg + 16 * (warp % 4) + g + 8 * half;
    any_change |= StoreAssignment(best[half], index[half], row, q == 0, h, n, clusters, out,
                                  PreviousAssignment(row, h, n, out));
  }
  if (__any_sync(0xffffffffu, any_change) && lane == 0) *out.changed = 1;
#else
  __trap();  // built without sm_90a: WgmmaAssignUsable keeps launches away
#endif
}

// Whether the device runs AssignWgmmaKernel (compute capability 9.x; the
// kernel is built for sm_90a only).
bool WgmmaAssignUsable() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major == 9;
}

// ---- Assignment, warp-specialized (sm_90a, head_dim 128) --------------------
//
// ClusterAssignKernel::kPipelined (kMt 2, kPipelinedStages; one m-tile a
// warpgroup measured slower on an H100, 2.55 against 2.51 ms a 32k
// clustering, and was dropped). A persistent block per
// SM walks (head, key tile) items. One warp copies each item's key tile
// (128 x kMt keys) and then its centroid chunks (128 centroids; of the last
// chunk 32, 64 or all 128 rows, as it is scored) through the copy engine:
// key tiles into two buffers, chunks into a ring of kStages, each with full
// and empty mbarriers, so copies run ahead of the products and no block
// barrier is taken per chunk. Two scoring warpgroups own 64 x kMt keys each:
// their kMt m-tiles share every chunk, so a chunk read from L2 serves 128 x
// kMt keys (AssignWgmmaKernel: 128). The products are AssignWgmmaKernel's
// (same operands, same k order), so the assignment is the same.
// The last centroid chunk holds 1..128 real clusters: the copy-engine
// kernels copy and score it 32, 64 or 128 rows wide.
__device__ __forceinline__ int LastChunkColumns(int clusters, int num_chunks) {
  const int tail = clusters - (num_chunks - 1) * 128;
  return tail <= 32 ? 32 : tail <= 64 ? 64 : 128;
}

template <int kMt, int kStages>
struct PipelinedAssignShape {
  static constexpr int kTileKeys = 128 * kMt;  // keys per item
  static constexpr uint32_t kKeyBytes = 2 * SwizzledBlockBytes(kTileKeys);
  static constexpr uint32_t kChunkBytes = 2 * SwizzledBlockBytes(128);
  static constexpr int kBarriers = 2 * 2 + 2 * kStages;  // key full / empty, chunk full / empty
  static constexpr size_t kSmemBytes =
      1024 + 2 * size_t{kKeyBytes} + kStages * size_t{kChunkBytes} + 8 * kBarriers;
};
constexpr int kPipelinedThreads = 384;  // warpgroup 0 copies (one warp of it), 1 and 2 score
constexpr int kPipelinedScoreWarps = 8;
// Registers after the role split: 40 * 128 + 232 * 256 fits the 64 K file;
// a scoring thread holds kMt x 64 accumulators.
constexpr int kPipelinedCopyRegisters = 40;
constexpr int kPipelinedScoreRegisters = 232;
// 128 keys a warpgroup: three chunk stages (225 KiB of shared memory).
constexpr int kPipelinedStages = 3;
static_assert(PipelinedAssignShape<2, kPipelinedStages>::kSmemBytes <= 232448,
              "above the H100's 227 KiB of shared memory per block");

// Keeps each of this thread's two rows' best (score, cluster) over the
// chunk's first 2 kRegs columns (s: one m-tile's accumulators), as
// AssignWgmmaKernel does: the highest score, on ties the lowest cluster;
// padding clusters (>= clusters) and NaN never win. kBounded: the chunk may
// hold padding columns (the last one).
//
// The argmax competes with the products for the kernel's time (it runs on
// the ALU pipe, half rate), so it is a pairwise tree per row, three ALU
// operations a merge and five levels deep: 370 instructions a 128-column
// chunk of two m-tiles, against 439 for chains of compare-and-select. A
// merge keeps
// the left (lower-column) side when it equals the pair's fmaxf, which
// ignores NaN: the larger score wins, ties go left, and NaN never wins
// against a number. Padding columns enter as NaN.
template <int kRegs, bool kBounded>
__device__ __forceinline__ void KeepBest(const float (&s)[kRegs], int chunk, int clusters, int q,
                                         float (&best)[2], int (&index)[2]) {
  constexpr int kValues = kRegs / 2;  // a row's, in ascending column order
  const int base = chunk * 128 + 2 * q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float v[kValues];
    int at[kValues];  // column - base
#pragma unroll
    for (int p = 0; p < kValues; ++p) {
      at[p] = 8 * (p / 2) + p % 2;
      v[p] = s[4 * (p / 2) + 2 * r + p % 2];
      if (kBounded && base + at[p] >= clusters) v[p] = __int_as_float(0x7fc00000);
    }
#pragma unroll
    for (int width = 1; width < kValues; width *= 2) {
#pragma unroll
      for (int p = 0; p + width < kValues; p += 2 * width) {
        const float m = fmaxf(v[p], v[p + width]);
        at[p] = v[p] == m ? at[p] : at[p + width];
        v[p] = m;
      }
    }
    // The running best covers lower columns (earlier chunks).
    const float m = fmaxf(best[r], v[0]);
    index[r] = best[r] == m ? index[r] : base + at[0];
    best[r] = m;
  }
}

template <int kMt, int kStages>
__global__ void __launch_bounds__(kPipelinedThreads, 1)
    AssignPipelinedKernel(const __grid_constant__ CUtensorMap key_map,
                          const __grid_constant__ CUtensorMap centroid_map, int n, int heads,
                          int clusters, int c_pad, const __grid_constant__ AssignOutputs out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = PipelinedAssignShape<kMt, kStages>;
  if (out.run_if != nullptr && *out.run_if == 0) return;  // converged earlier
  extern __shared__ __align__(1024) unsigned char pipelined_smem[];
  const uint32_t base = (SharedAddress(pipelined_smem) + 1023u) & ~1023u;
  const uint32_t key_smem = base;                               // [2] key tiles
  const uint32_t chunk_smem = key_smem + 2 * Shape::kKeyBytes;  // [kStages] chunks
  const uint32_t bars = chunk_smem + kStages * Shape::kChunkBytes;
  auto key_full = [&](int b) { return bars + 8 * b; };
  auto key_empty = [&](int b) { return bars + 8 * (2 + b); };
  auto chunk_full = [&](int stage) { return bars + 8 * (4 + stage); };
  auto chunk_empty = [&](int stage) { return bars + 8 * (4 + kStages + stage); };

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      MbarrierInit(key_full(b), 1);
      MbarrierInit(key_empty(b), kPipelinedScoreWarps);
    }
    for (int stage = 0; stage < kStages; ++stage) {
      MbarrierInit(chunk_full(stage), 1);
      MbarrierInit(chunk_empty(stage), kPipelinedScoreWarps);
    }
    FenceBarrierInit();
  }
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32;
  // Read through a shuffle so the compiler sees a warp-uniform value.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int tiles_per_head = (n + Shape::kTileKeys - 1) / Shape::kTileKeys;
  const int items = heads * tiles_per_head;
  const int num_chunks = c_pad / 128;
  const int last_columns = LastChunkColumns(clusters, num_chunks);

  if (wg == 0) {
    SetMaxRegistersDec<kPipelinedCopyRegisters>();
    if (warp != 0) return;
    auto load_keys = [&](int item, int key_it) {
      const int h = item / tiles_per_head;
      const int row0 = (item % tiles_per_head) * Shape::kTileKeys;
      const int kb = key_it & 1;
      MbarrierWait(key_empty(kb), ((key_it >> 1) & 1) ^ 1);
      if (lane == 0) {
        // Rows past n land as zeros (out of the map's bounds) and are never
        // stored.
        const uint32_t dst = key_smem + kb * Shape::kKeyBytes;
        MbarrierArriveExpectTx(key_full(kb), Shape::kKeyBytes);
        TmaLoad3d(dst, &key_map, 0, row0, h, key_full(kb));
        TmaLoad3d(dst + SwizzledBlockBytes(Shape::kTileKeys), &key_map, 64, row0, h, key_full(kb));
      }
      __syncwarp();
    };
    int key_it = 0, chunk_it = 0;
    if (blockIdx.x < items) load_keys(blockIdx.x, 0);
    for (int item = blockIdx.x; item < items; item += gridDim.x, ++key_it) {
      const int h = item / tiles_per_head;
      for (int chunk = 0; chunk < num_chunks; ++chunk, ++chunk_it) {
        const int stage = chunk_it % kStages;
        MbarrierWait(chunk_empty(stage), ((chunk_it / kStages) & 1) ^ 1);
        const int groups = (chunk == num_chunks - 1 ? last_columns : 128) / 32;
        if (lane == 0) {
          MbarrierArriveExpectTx(chunk_full(stage), groups * 2 * SwizzledBlockBytes(32));
        }
        __syncwarp();
        if (lane < 2 * groups) {  // column block lane % 2, 32-row group lane / 2
          const int block = lane & 1, group = lane >> 1;
          TmaLoad3d(chunk_smem + stage * Shape::kChunkBytes + block * SwizzledBlockBytes(128) +
                        group * SwizzledBlockBytes(32),
                    &centroid_map, 64 * block, chunk * 128 + 32 * group, h, chunk_full(stage));
        }
        // The next item's keys go out after this item's first chunk: its
        // buffer is free once the previous item is done, which the later
        // chunks' stages wait for anyway, and loading it a whole item ahead
        // hides the DRAM latency (after the last chunk it came late).
        if (chunk == 0 && item + static_cast<int>(gridDim.x) < items) {
          load_keys(item + gridDim.x, key_it + 1);
        }
      }
    }
  } else {
    SetMaxRegistersInc<kPipelinedScoreRegisters>();
    const int cg = wg - 1;  // rows 64 kMt cg .. of each key tile
    const int g = lane / 4, q = lane % 4;
    // Turns (see `score`): warpgroup 0 issues first; each issue opens the
    // other's turn, so warpgroup 1 arrives once more than warpgroup 0 waits,
    // and the last arrival is taken after the loop.
    if (cg == 1) NamedBarrierArrive(1, 256);
    bool any_change = false;
    int key_it = 0, chunk_it = 0;
    for (int item = blockIdx.x; item < items; item += gridDim.x, ++key_it) {
      const int h = item / tiles_per_head;
      const int row0 = (item % tiles_per_head) * Shape::kTileKeys;
      const int kb = key_it & 1;
      const uint32_t keys_at = key_smem + kb * Shape::kKeyBytes;
      MbarrierWait(key_full(kb), (key_it >> 1) & 1);
      float best[kMt][2];
      int index[kMt][2], previous[kMt][2];
      auto row_of = [&](int m, int half) {
        return row0 + 64 * (cg * kMt + m) + 16 * (warp % 4) + g + 8 * half;
      };
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
        best[m][0] = best[m][1] = -INFINITY;
        index[m][0] = index[m][1] = 0;
        // Read now, used after the last chunk: a load there stalled this
        // warpgroup, and with it the other's next turn, for a memory latency.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          previous[m][half] = PreviousAssignment(row_of(m, half), h, n, out);
        }
      }
      // Scores the chunk in `stage` (its first 2 kRegs columns) for the kMt
      // m-tiles, releases the stage, keeps the rows' best. The products are
      // issued in this warpgroup's turn (barrier 1 + cg, opened by the
      // other warpgroup's issue), so the tensor cores run one warpgroup's
      // products while the other keeps its best: without the turns both
      // tended to wait and keep their best at the same time, and the
      // tensor cores idled.
      auto score = [&](int chunk, int stage, auto accumulators, auto bounded) {
        constexpr int kRegs = decltype(accumulators)::value;
        float s[kMt][kRegs];
        NamedBarrierSync(1 + cg, 256);
        WgmmaFence();
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
#pragma unroll
          for (int ks = 0; ks < kWgAssignHeadDim / 16; ++ks) {
            const uint32_t in_row = (ks % 4) * 32;
            const uint64_t a =
                Descriptor(keys_at + 64 * (cg * kMt + m) * 128 +
                               (ks / 4) * SwizzledBlockBytes(Shape::kTileKeys) + in_row,
                           16, 1024);
            const uint64_t b = Descriptor(chunk_smem + stage * Shape::kChunkBytes +
                                              (ks / 4) * SwizzledBlockBytes(128) + in_row,
                                          16, 1024);
            if constexpr (kRegs == 64) {
              WgmmaSS(s[m], a, b, ks > 0 ? 1 : 0);
            } else if constexpr (kRegs == 32) {
              WgmmaSS64(s[m], a, b, ks > 0 ? 1 : 0);
            } else {
              WgmmaSS32(s[m], a, b, ks > 0 ? 1 : 0);
            }
          }
        }
        WgmmaCommit();
        NamedBarrierArrive(2 - cg, 256);  // the other warpgroup's turn
        WgmmaWait<0>();
#pragma unroll
        for (int m = 0; m < kMt; ++m) PinRegisters(s[m]);
        __syncwarp();
        if (lane == 0) MbarrierArrive(chunk_empty(stage));
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
          KeepBest<kRegs, decltype(bounded)::value>(s[m], chunk, clusters, q, best[m], index[m]);
        }
      };
      for (int chunk = 0; chunk < num_chunks; ++chunk, ++chunk_it) {
        const int stage = chunk_it % kStages;
        MbarrierWait(chunk_full(stage), (chunk_it / kStages) & 1);
        if (chunk < num_chunks - 1) {
          score(chunk, stage, std::integral_constant<int, 64>(), std::false_type());
        } else if (last_columns == 128) {
          score(chunk, stage, std::integral_constant<int, 64>(), std::true_type());
        } else if (last_columns == 64) {
          score(chunk, stage, std::integral_constant<int, 32>(), std::true_type());
        } else {
          score(chunk, stage, std::integral_constant<int, 16>(), std::true_type());
        }
      }
      __syncwarp();
      if (lane == 0) MbarrierArrive(key_empty(kb));  // the last chunk's products are done
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          any_change |= StoreAssignment(best[m][half], index[m][half], row_of(m, half), q == 0, h,
                                        n, clusters, out, previous[m][half]);
        }
      }
    }
    if (cg == 0) NamedBarrierSync(1, 256);
    if (__any_sync(0xffffffffu, any_change) && lane == 0) *out.changed = 1;
  }
#else
  __trap();  // built without sm_90a: PipelinedAssignUsable keeps launches away
#endif
}

// Whether the device runs AssignPipelinedKernel (compute capability 9.x and
// a driver with the tensor-map encoder).
bool PipelinedAssignUsable() { return WgmmaAssignUsable() && TensorMapEncoder() != nullptr; }

template <int kMt, int kStages>
cudaError_t LaunchPipelinedAssign(int n, int heads, int clusters, const bf16* keys,
                                  const bf16* normed, int c_pad, const AssignOutputs& out,
                                  cudaStream_t stream) {
  using Shape = PipelinedAssignShape<kMt, kStages>;
  CUtensorMap key_map, centroid_map;
  if (!EncodeBf16RowsMap(keys, n, heads, Shape::kTileKeys, &key_map) ||
      !EncodeBf16RowsMap(normed, c_pad, heads, 32, &centroid_map)) {
    return cudaErrorInvalidValue;
  }
  auto* kernel = AssignPipelinedKernel<kMt, kStages>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Shape::kSmemBytes));
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t items = int64_t{heads} * ((n + Shape::kTileKeys - 1) / Shape::kTileKeys);
  const int grid = static_cast<int>(std::min<int64_t>(items, sms));
  kernel<<<grid, kPipelinedThreads, Shape::kSmemBytes, stream>>>(key_map, centroid_map, n, heads,
                                                                 clusters, c_pad, out);
  return cudaGetLastError();
}

// ---- Assignment with the centroids resident in shared memory -------------
//
// AssignResidentKernel: the pipelined kernel's products and argmax, laid out
// so that the L2 and the argmax limit it less. At 32k keys x 410 clusters x
// 8 heads on an H100 the pipelined kernel takes 60 us a pass, its tensor
// pipe about half busy: every 256-key item streams its head's 106 KB of
// centroids from L2 again (170 KB an item, ~3 TB/s of L2 reads at its
// speed), and a warpgroup's argmax over a chunk (about 1000 cycles on the
// half-rate ALU pipe) takes as long as the other warpgroup's products, so
// neither hides the other. This kernel takes 49 us (tensor pipe 63% busy,
// ALU 52%; ~28 us would be the tensor cores' rate).
//
// Here a block serves one head: its copy warp loads the head's centroids
// once (at most kResidentMaxChunks chunks of 128) and then streams 64-key
// tiles through kResidentStages stages; three scoring warpgroups take the
// tiles in turn. The warpgroups also issue their products in turn (named
// barriers 1..3), so the tensor cores run one warpgroup's 64 x 128 chunk
// (~512 cycles) while the other two keep their best over earlier chunks:
// the argmax now has two product slots to hide in.
constexpr int kResidentMaxChunks = 4;  // 512 clusters, 128 KiB
constexpr int kResidentScoreGroups = 3;
constexpr int kResidentThreads = 128 * (1 + kResidentScoreGroups);
constexpr int kResidentStages = 6;
constexpr uint32_t kResidentChunkBytes = 2 * SwizzledBlockBytes(128);
constexpr uint32_t kResidentKeyBytes = 2 * SwizzledBlockBytes(64);
// Barriers: centroids full; per stage, keys full and empty.
constexpr int kResidentBarriers = 1 + 2 * kResidentStages;
constexpr size_t kResidentSmemBytes = 1024 + kResidentMaxChunks * size_t{kResidentChunkBytes} +
                                      kResidentStages * size_t{kResidentKeyBytes} +
                                      8 * kResidentBarriers;
static_assert(kResidentSmemBytes <= 232448, "above the H100's 227 KiB of shared memory per block");
static_assert((4 * kResidentScoreGroups + 1) * kResidentMaxChunks * 128 * sizeof(int) <=
                  kResidentMaxChunks * size_t{kResidentChunkBytes},
              "BlockMemberOrder's counts reuse the centroids' shared memory");
// 32 * 128 + 152 * 384 registers fit the 64 K file.
constexpr int kResidentCopyRegisters = 32;
constexpr int kResidentScoreRegisters = 152;

// BlockMemberOrder: a resident assignment block, once its keys are
// assigned, orders them by (cluster, t) itself, so a pass needs no
// MemberOffsetsKernel and PlaceMembersKernel (17.6 us of a 98 us pass at
// 32k keys x 410 clusters x 8 heads); the centroid update walks each
// cluster's members block by block (UpdateCentroidsKernel), which gives the
// same members in the same order as the global sort. Run by the block's
// kResidentScoreGroups warpgroups (named barrier 4) after their last
// products, in the shared memory they no longer need: per-warp counts of
// each cluster over a contiguous share of the keys (integer atomics), the
// block's counts and starts (a scan over the clusters), then each warp
// places its share in t order, ranking equal clusters within 32 keys with
// __match_any_sync. The result does not depend on timing.
constexpr int kOrderWarps = 4 * kResidentScoreGroups;
constexpr int kOrderThreads = 32 * kOrderWarps;
__device__ void BlockMemberOrder(int* smem, int h, int key0, int count, int n, int clusters,
                                 const int32_t* assign, const AssignOutputs& out) {
  const int tid = threadIdx.x - 128, warp = tid / 32, lane = tid % 32;
  int* warp_counts = smem;                      // [kOrderWarps, clusters]
  int* starts = smem + kOrderWarps * clusters;  // [clusters]
  int32_t* sorted = out.members.sorted + int64_t{h} * n + key0;
  // [h, j, block]: BlockMembers' layout.
  auto slot = [&](int j) { return (int64_t{h} * clusters + j) * gridDim.x + blockIdx.x; };
  const int share = ((count + kOrderWarps - 1) / kOrderWarps + 31) / 32 * 32;
  const int begin = min(count, warp * share), end = min(count, begin + share);
  for (int i = tid; i < kOrderWarps * clusters; i += kOrderThreads) warp_counts[i] = 0;
  NamedBarrierSync(4, kOrderThreads);
  // The share's clusters are read kBatch per lane at a time: one memory
  // latency per batch, not per 32 keys.
  constexpr int kBatch = 8;
  for (int k0 = begin; k0 < end; k0 += 32 * kBatch) {
    int cluster[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int k = k0 + 32 * u + lane;
      cluster[u] = k < end ? assign[k] : -1;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (cluster[u] >= 0) atomicAdd(&warp_counts[warp * clusters + cluster[u]], 1);
    }
  }
  NamedBarrierSync(4, kOrderThreads);
  for (int j = tid; j < clusters; j += kOrderThreads) {
    int total = 0;
    for (int w = 0; w < kOrderWarps; ++w) total += warp_counts[w * clusters + j];
    starts[j] = total;
    out.members.counts[slot(j)] = total;
  }
  NamedBarrierSync(4, kOrderThreads);
  if (warp == 0) {  // exclusive scan of the totals, a run of clusters per lane
    const int per_lane = (clusters + 31) / 32, first = lane * per_lane;
    int sum = 0;
    for (int j = first; j < min(clusters, first + per_lane); ++j) sum += starts[j];
    int inclusive = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += up;
    }
    int run = inclusive - sum;
    for (int j = first; j < min(clusters, first + per_lane); ++j) {
      const int size = starts[j];
      starts[j] = run;
      run += size;
    }
  }
  NamedBarrierSync(4, kOrderThreads);
  for (int j = tid; j < clusters; j += kOrderThreads) {
    int run = starts[j];
    out.members.starts[slot(j)] = run;
    for (int w = 0; w < kOrderWarps; ++w) {  // each warp's next place for j
      const int c = warp_counts[w * clusters + j];
      warp_counts[w * clusters + j] = run;
      run += c;
    }
  }
  NamedBarrierSync(4, kOrderThreads);
  for (int b0 = begin; b0 < end; b0 += 32 * kBatch) {
    int batch[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int k = b0 + 32 * u + lane;
      batch[u] = k < end ? assign[k] : 0;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (b0 + 32 * u >= end) break;  // warp-uniform
      const int k = b0 + 32 * u + lane;
      const bool valid = k < end;
      const unsigned mask = __ballot_sync(0xffffffffu, valid);
      const int cluster = batch[u];
      unsigned peers = 0;
      if (valid) {
        peers = __match_any_sync(mask, cluster);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        sorted[warp_counts[warp * clusters + cluster] + rank] = key0 + k;
      }
      __syncwarp();
      if (valid && lane == 31 - __clz(peers)) {
        warp_counts[warp * clusters + cluster] += __popc(peers);
      }
      __syncwarp();
    }
  }
}

// Grid (block of the head, head): block b of `blocks_per_head` scores the
// head's 64-key tiles [b T / blocks, (b + 1) T / blocks).
__global__ void __launch_bounds__(kResidentThreads, 1)
    AssignResidentKernel(const __grid_constant__ CUtensorMap key_map,
                         const __grid_constant__ CUtensorMap centroid_map, int n, int clusters,
                         int c_pad, const __grid_constant__ AssignOutputs out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  WaitForPrerequisites();  // launched dependent on the previous pass's update
  if (out.run_if != nullptr && *out.run_if == 0) return;  // converged earlier
  extern __shared__ __align__(1024) unsigned char resident_smem[];
  const uint32_t base = (SharedAddress(resident_smem) + 1023u) & ~1023u;
  const uint32_t centroid_smem = base;
  const uint32_t key_smem = centroid_smem + kResidentMaxChunks * kResidentChunkBytes;
  const uint32_t bars = key_smem + kResidentStages * kResidentKeyBytes;
  const uint32_t centroids_full = bars;
  auto key_full = [&](int stage) { return bars + 8 * (1 + stage); };
  auto key_empty = [&](int stage) { return bars + 8 * (1 + kResidentStages + stage); };

  const int tid = threadIdx.x;
  if (tid == 0) {
    MbarrierInit(centroids_full, 1);
    for (int stage = 0; stage < kResidentStages; ++stage) {
      MbarrierInit(key_full(stage), 1);
      MbarrierInit(key_empty(stage), 4);  // the consuming warpgroup's warps
    }
    FenceBarrierInit();
  }
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32;
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);  // warp-uniform for the compiler
  const int h = blockIdx.y;
  const int head_tiles = (n + 63) / 64;
  const int first_tile = static_cast<int>(int64_t{blockIdx.x} * head_tiles / gridDim.x);
  const int tiles = static_cast<int>(int64_t{blockIdx.x + 1} * head_tiles / gridDim.x) - first_tile;
  const int num_chunks = c_pad / 128;
  const int last_columns = LastChunkColumns(clusters, num_chunks);

  if (wg == 0) {
    SetMaxRegistersDec<kResidentCopyRegisters>();
    if (warp != 0) return;
    // The centroids: one copy per (chunk, 32-row group, 64-column block),
    // a lane each (at most 4 x 4 x 2).
    const int groups_total = (num_chunks - 1) * 4 + last_columns / 32;
    if (lane == 0) {
      MbarrierArriveExpectTx(centroids_full, groups_total * 2 * SwizzledBlockBytes(32));
    }
    __syncwarp();
    if (lane < 2 * groups_total) {
      const int block = lane & 1, group = lane >> 1;  // group: chunk * 4 + 32-row group
      TmaLoad3d(centroid_smem + (group / 4) * kResidentChunkBytes +
                    block * SwizzledBlockBytes(128) + (group % 4) * SwizzledBlockBytes(32),
                &centroid_map, 64 * block, 32 * group, h, centroids_full);
    }
    for (int k = 0; k < tiles; ++k) {
      const int stage = k % kResidentStages;
      MbarrierWait(key_empty(stage), ((k / kResidentStages) & 1) ^ 1);
      if (lane == 0) {
        // Rows past n land as zeros (out of the map's bounds) and are never
        // stored.
        const uint32_t dst = key_smem + stage * kResidentKeyBytes;
        const int row0 = (first_tile + k) * 64;
        MbarrierArriveExpectTx(key_full(stage), kResidentKeyBytes);
        TmaLoad3d(dst, &key_map, 0, row0, h, key_full(stage));
        TmaLoad3d(dst + SwizzledBlockBytes(64), &key_map, 64, row0, h, key_full(stage));
      }
      __syncwarp();
    }
  } else {
    SetMaxRegistersInc<kResidentScoreRegisters>();
    const int cg = wg - 1;  // takes tiles cg, cg + 3, ...
    const int g = lane / 4, q = lane % 4;
    const int my_turn = 1 + cg, next_turn = 1 + (cg + 1) % kResidentScoreGroups;
    // Turns: warpgroup 0 issues first; each issue opens the next
    // warpgroup's turn, so warpgroup 0's barrier gets one arrival more than
    // it is waited on, taken after the loop. Every warpgroup takes the same
    // number of turns (a warpgroup without a tile in the last round takes
    // its turns without products), else the turns would deadlock.
    if (cg == kResidentScoreGroups - 1) NamedBarrierArrive(1, 256);
    MbarrierWait(centroids_full, 0);
    bool any_change = false;
    const int rounds = (tiles + kResidentScoreGroups - 1) / kResidentScoreGroups;
    for (int round = 0; round < rounds; ++round) {
      const int k = round * kResidentScoreGroups + cg;
      const bool has_tile = k < tiles;
      const int stage = k % kResidentStages;
      const uint32_t keys_at = key_smem + stage * kResidentKeyBytes;
      const int row0 = (first_tile + k) * 64 + 16 * (warp % 4) + g;
      float best[2] = {-INFINITY, -INFINITY};
      int index[2] = {0, 0}, previous[2] = {-1, -1};
      if (has_tile) {
        // Read now, used after the last chunk: a load there would stall
        // this warpgroup, and the others' turns with it, for a memory
        // latency.
        previous[0] = PreviousAssignment(row0, h, n, out);
        previous[1] = PreviousAssignment(row0 + 8, h, n, out);
        MbarrierWait(key_full(stage), (k / kResidentStages) & 1);
      }
      // Scores the chunk (its first 2 kRegs columns) in this warpgroup's
      // turn and keeps the rows' best.
      auto score = [&](int chunk, auto accumulators, auto bounded) {
        constexpr int kRegs = decltype(accumulators)::value;
        float s[kRegs];
        NamedBarrierSync(my_turn, 256);
        if (has_tile) {
          WgmmaFence();
#pragma unroll
          for (int ks = 0; ks < kWgAssignHeadDim / 16; ++ks) {
            const uint32_t in_row = (ks % 4) * 32;
            const uint64_t a =
                Descriptor(keys_at + (ks / 4) * SwizzledBlockBytes(64) + in_row, 16, 1024);
            const uint64_t b = Descriptor(centroid_smem + chunk * kResidentChunkBytes +
                                              (ks / 4) * SwizzledBlockBytes(128) + in_row,
                                          16, 1024);
            if constexpr (kRegs == 64) {
              WgmmaSS(s, a, b, ks > 0 ? 1 : 0);
            } else if constexpr (kRegs == 32) {
              WgmmaSS64(s, a, b, ks > 0 ? 1 : 0);
            } else {
              WgmmaSS32(s, a, b, ks > 0 ? 1 : 0);
            }
          }
          WgmmaCommit();
        }
        NamedBarrierArrive(next_turn, 256);
        if (has_tile) {
          WgmmaWait<0>();
          PinRegisters(s);
          KeepBest<kRegs, decltype(bounded)::value>(s, chunk, clusters, q, best, index);
        }
      };
      for (int chunk = 0; chunk < num_chunks; ++chunk) {
        if (chunk < num_chunks - 1) {
          score(chunk, std::integral_constant<int, 64>(), std::false_type());
        } else if (last_columns == 128) {
          score(chunk, std::integral_constant<int, 64>(), std::true_type());
        } else if (last_columns == 64) {
          score(chunk, std::integral_constant<int, 32>(), std::true_type());
        } else {
          score(chunk, std::integral_constant<int, 16>(), std::true_type());
        }
      }
      if (has_tile) {
        __syncwarp();
        if (lane == 0) MbarrierArrive(key_empty(stage));  // the last chunk's products are done
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          any_change |= StoreAssignment(best[half], index[half], row0 + 8 * half, q == 0, h, n,
                                        clusters, out, previous[half]);
        }
      }
    }
    if (cg == 0) NamedBarrierSync(1, 256);
    if (__any_sync(0xffffffffu, any_change) && lane == 0) *out.changed = 1;
    if (out.members.sorted != nullptr) {
      // The assignments this block stored are visible to all its threads
      // after the barrier; every product is done, so the shared memory is
      // free.
      NamedBarrierSync(4, kOrderThreads);
      const int key0 = first_tile * 64, count = min(n, (first_tile + tiles) * 64) - key0;
      BlockMemberOrder(reinterpret_cast<int*>(resident_smem), h, key0, count, n, clusters,
                       out.assign + int64_t{h} * n + key0, out);
    }
  }
#else
  __trap();  // built without sm_90a: PipelinedAssignUsable keeps launches away
#endif
}

// Blocks per head of AssignResidentKernel: whole heads per SM count (8
// heads on 132 SMs: 16 blocks each, 4 SMs idle), at least one per head, at
// most one per 64-key tile and kResidentMaxBlocks.
cudaError_t ResidentBlocksPerHead(int n, int heads, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int head_tiles = (n + 63) / 64;
  *blocks = std::max(1, std::min({sms / std::max(heads, 1), head_tiles, kResidentMaxBlocks}));
  return cudaSuccess;
}

cudaError_t LaunchResidentAssign(int n, int heads, int clusters, const bf16* keys,
                                 const bf16* normed, int c_pad, const AssignOutputs& out,
                                 cudaStream_t stream) {
  if (c_pad > kResidentMaxChunks * 128) return cudaErrorInvalidValue;
  CUtensorMap key_map, centroid_map;
  if (!EncodeBf16RowsMap(keys, n, heads, 64, &key_map) ||
      !EncodeBf16RowsMap(normed, c_pad, heads, 32, &centroid_map)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err =
      cudaFuncSetAttribute(AssignResidentKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kResidentSmemBytes));
  if (err != cudaSuccess) return err;
  int blocks_per_head = 0;
  if ((err = ResidentBlocksPerHead(n, heads, &blocks_per_head)) != cudaSuccess) return err;
  // Dependent launch: the blocks start as the previous kernel drains (the
  // update's largest clusters finish last).
  return LaunchDependent(AssignResidentKernel, dim3(blocks_per_head, heads), kResidentThreads,
                         kResidentSmemBytes, stream, key_map, centroid_map, n, clusters, c_pad,
                         out);
}

// ---- Members in cluster order ------------------------------------------------
//
// ClusterMemberOrder::kRadixSort: a CUB radix sort of (head * C + cluster,
// t) pairs, stable, so each cluster's members come in ascending t; then
// each cluster's run in the sorted keys: seg_begin / seg_end of key k are
// its first and one-past-last sorted positions (both stay 0 for an empty
// cluster, zeroed beforehand).
__global__ void ZeroSegmentsKernel(int total, int32_t* __restrict__ seg_begin,
                                   int32_t* __restrict__ seg_end, const int* __restrict__ run_if) {
  if (run_if != nullptr && *run_if == 0) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    seg_begin[i] = 0;
    seg_end[i] = 0;
  }
}

__global__ void MarkSegmentsKernel(const uint32_t* __restrict__ sorted_keys, int total,
                                   int32_t* __restrict__ seg_begin, int32_t* __restrict__ seg_end,
                                   const int* __restrict__ run_if) {
  if (run_if != nullptr && *run_if == 0) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const uint32_t k = sorted_keys[i];
    if (i == 0 || sorted_keys[i - 1] != k) seg_begin[k] = i;
    if (i == total - 1 || sorted_keys[i + 1] != k) seg_end[k] = i + 1;
  }
}

// ClusterMemberOrder::kCountingSort yields the same order (cluster-major,
// ascending t within a cluster, every head's keys at h * n ..) without a
// global sort, counting over member tiles of kMemberTile keys: the
// assignment counts each (cluster, tile); MemberOffsetsKernel scans a
// head's counts (cluster-major, tile-minor) into each group's first sorted
// position; PlaceMembersKernel sorts each tile by (cluster, t) in shared
// memory and writes every key's t at its group's position plus its rank in
// the group. Integer counts and unique sort keys: the result does not
// depend on timing.

// Grid (cluster group, head), one warp per cluster of the group (a single
// block per head scanning all C x tiles counts took 24 us a pass at 32k
// keys and 410 clusters, latency bound on 8 SMs). The block first sums the
// counts of every earlier cluster of its head (cluster-major, so one
// contiguous range), then each warp scans its cluster's tile counts, and
// each cluster's offset adds the totals of the group's earlier clusters.
// Writes each (cluster, tile)'s first sorted position within the head and
// each cluster's sorted range [seg_begin, seg_end) (head h's keys occupy
// sorted positions h * n .. h * n + n - 1). The counts cannot be cleared
// here (other blocks read them all); the passes alternate between two
// count arrays, and each block clears its clusters' counts in the other
// one (`next_counts`), which the next pass's assignment fills.
constexpr int kOffsetClusters = 16;  // warps per block
constexpr int kOffsetThreads = 32 * kOffsetClusters;
__global__ void __launch_bounds__(kOffsetThreads)
    MemberOffsetsKernel(const int32_t* __restrict__ tile_counts, int32_t* __restrict__ next_counts,
                        int n, int clusters, int32_t* __restrict__ tile_base,
                        int32_t* __restrict__ seg_begin, int32_t* __restrict__ seg_end,
                        const int* __restrict__ run_if) {
  if (run_if != nullptr && *run_if == 0) return;
  using Reduce = cub::BlockReduce<int, kOffsetThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ int before_group;
  __shared__ int cluster_total[kOffsetClusters];
  const int h = blockIdx.y, first = blockIdx.x * kOffsetClusters;
  const int tiles = (n + kMemberTile - 1) / kMemberTile;
  const int32_t* counts = tile_counts + int64_t{h} * clusters * tiles;
  int32_t* base = tile_base + int64_t{h} * clusters * tiles;
  const int group_clusters = min(kOffsetClusters, clusters - first);
  int32_t* next = next_counts + (int64_t{h} * clusters + first) * tiles;
  for (int i = threadIdx.x; i < group_clusters * tiles; i += kOffsetThreads) next[i] = 0;
  int partial = 0;
  for (int64_t i = threadIdx.x; i < int64_t{first} * tiles; i += kOffsetThreads) {
    partial += counts[i];
  }
  const int sum = Reduce(reduce_storage).Sum(partial);
  if (threadIdx.x == 0) before_group = sum;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = first + warp;
  int total = 0;
  if (j < clusters) {
    for (int t = lane; t < tiles; t += 32) total += counts[int64_t{j} * tiles + t];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  }
  if (lane == 0) cluster_total[warp] = total;
  __syncthreads();
  if (j >= clusters) return;
  int offset = before_group;
  for (int w = 0; w < warp; ++w) offset += cluster_total[w];
  if (lane == 0) {
    seg_begin[int64_t{h} * clusters + j] = h * n + offset;
    seg_end[int64_t{h} * clusters + j] = h * n + offset + total;
  }
  for (int t0 = 0; t0 < tiles; t0 += 32) {
    const int t = t0 + lane;
    const int count = t < tiles ? counts[int64_t{j} * tiles + t] : 0;
    int inclusive = count;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += up;
    }
    if (t < tiles) base[int64_t{j} * tiles + t] = offset + inclusive - count;
    offset += __shfl_sync(0xffffffffu, inclusive, 31);
  }
}

// Grid (tile, head). Sort keys (cluster << kMemberTileBits | t in tile) are
// unique, so the block sort needs no stability; keys past n sort last as
// cluster `clusters` and are dropped.
constexpr int kPlaceThreads = 256;
constexpr int kPlaceItems = kMemberTile / kPlaceThreads;
__global__ void __launch_bounds__(kPlaceThreads)
    PlaceMembersKernel(const int32_t* __restrict__ assign, const int32_t* __restrict__ tile_base,
                       int n, int clusters, int end_bit, int32_t* __restrict__ sorted_t,
                       const int* __restrict__ run_if) {
  if (run_if != nullptr && *run_if == 0) return;
  using Sort = cub::BlockRadixSort<uint32_t, kPlaceThreads, kPlaceItems>;
  using Scan = cub::BlockScan<int, kPlaceThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
    uint32_t keys[kMemberTile];
  } smem;
  const int tile = blockIdx.x, h = blockIdx.y, tiles = gridDim.x;
  uint32_t key[kPlaceItems];
#pragma unroll
  for (int k = 0; k < kPlaceItems; ++k) {
    const int local = threadIdx.x * kPlaceItems + k;
    const int t = tile * kMemberTile + local;
    const int cluster = t < n ? assign[int64_t{h} * n + t] : clusters;
    key[k] = (static_cast<uint32_t>(cluster) << kMemberTileBits) | static_cast<uint32_t>(local);
  }
  // The keys come in ascending t and the radix sort is stable, so the
  // cluster bits alone give the (cluster, t) order: half the passes of
  // sorting all end_bit bits.
  Sort(smem.sort).Sort(key, kMemberTileBits, end_bit);  // blocked: positions 4i .. 4i + 3
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kPlaceItems; ++k) smem.keys[threadIdx.x * kPlaceItems + k] = key[k];
  __syncthreads();
  // Each position's group start: the last position at or before it whose
  // predecessor is in another cluster (a running max of group heads).
  int start[kPlaceItems];
#pragma unroll
  for (int k = 0; k < kPlaceItems; ++k) {
    const int p = threadIdx.x * kPlaceItems + k;
    const bool head =
        p == 0 || (smem.keys[p - 1] >> kMemberTileBits) != (key[k] >> kMemberTileBits);
    start[k] = head ? p : 0;
  }
  __syncthreads();  // smem.keys is reused by the scan
  Scan(smem.scan).InclusiveScan(start, start, ::cuda::maximum<int>());
#pragma unroll
  for (int k = 0; k < kPlaceItems; ++k) {
    const int cluster = static_cast<int>(key[k] >> kMemberTileBits);
    if (cluster >= clusters) continue;
    const int p = threadIdx.x * kPlaceItems + k;
    const int64_t group = (int64_t{h} * clusters + cluster) * tiles + tile;
    sorted_t[int64_t{h} * n + tile_base[group] + (p - start[k])] =
        tile * kMemberTile + static_cast<int>(key[k] & (kMemberTile - 1));
  }
}

// One warp per (head, cluster): the fp32 sum of its raw keys, divided by the
// size; an empty cluster keeps its centroid. Then the normalised bf16 copy
// for the next assignment pass.
//
// A row is read by kLanes lanes of 8 dims each (16-byte loads), so a warp
// reads 32 / kLanes member rows at once, four times unrolled: enough loads in
// flight that the walk over a cluster's members is not latency bound. The
// members are dealt to the row slots in a fixed order and the slots merged
// by a fixed shuffle tree, so the result does not depend on timing.
//
// kWalk: the members come from the resident assignment's per-block order
// (BlockMembers, `blocks` blocks per head, at most 32 for the same dealing
// as the global order), block by block, 32 at a time from the cluster's
// first: the same members in the same order as sorted_t[seg_begin ..].
template <int kLanes, bool kWalk>
__global__ void UpdateCentroidsKernel(const bf16* __restrict__ keys,
                                      const int32_t* __restrict__ sorted_t,
                                      const int32_t* __restrict__ seg_begin,
                                      const int32_t* __restrict__ seg_end, BlockMembers members,
                                      int blocks, int n, int heads, int d, int d_pad, int clusters,
                                      int c_pad, float* __restrict__ centroid,
                                      bf16* __restrict__ normed, const int* __restrict__ run_if) {
  WaitForPrerequisites();  // launched dependent on the pass's assignment
  if (run_if != nullptr && *run_if == 0) return;
  constexpr int kSlots = 32 / kLanes;
  const int lane = threadIdx.x % 32;
  const int gw = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (gw >= heads * clusters) return;
  const int h = gw / clusters, j = gw % clusters;
  const int chunk = lane % kLanes, slot = lane / kLanes;
  const int dim = chunk * 8;  // this lane's 8 dims (none when dim >= d)
  const bool has_dims = dim < d;
  float* cen = centroid + static_cast<int64_t>(gw) * d;
  float c[8] = {};
  const bf16* key_head = keys + static_cast<int64_t>(h) * n * d;
  // Adds the m (<= 32) members whose t lane i holds in my_t, i < m.
  auto add32 = [&](int my_t, int m) {
    for (int i = 0; i < m; i += 4 * kSlots) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int member = i + u * kSlots + slot;  // < 32 + 4 * kSlots
        const int t = __shfl_sync(0xffffffffu, my_t, member & 31);
        v[u] = (member < m && has_dims)
                   ? *reinterpret_cast<const uint4*>(key_head + static_cast<int64_t>(t) * d + dim)
                   : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v[u]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 f = __bfloat1622float2(pairs[k]);
          c[2 * k] += f.x;
          c[2 * k + 1] += f.y;
        }
      }
    }
  };
  int size = 0;
  if constexpr (kWalk) {
    const int head_tiles = (n + 63) / 64;
    for (int b0 = 0; b0 < blocks; b0 += 32) {
      const int b = b0 + lane;
      const int64_t at = (int64_t{h} * clusters + j) * blocks + b;
      const int count = b < blocks ? members.counts[at] : 0;
      // Where the block's members of j sit in head h's order.
      const int place = b < blocks ? (b * head_tiles / blocks) * 64 + members.starts[at] : 0;
      int inclusive = count;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) inclusive += up;
      }
      const int before = inclusive - count;
      const int group = __shfl_sync(0xffffffffu, inclusive, 31);
      for (int base = 0; base < group; base += 32) {
        const int member = base + lane;
        int src = 0;  // the last lane whose block starts at or before `member`
#pragma unroll
        for (int step = 16; step > 0; step >>= 1) {
          if (__shfl_sync(0xffffffffu, before, src + step) <= member) src += step;
        }
        const int src_place = __shfl_sync(0xffffffffu, place, src);
        const int src_before = __shfl_sync(0xffffffffu, before, src);
        const int my_t =
            member < group ? members.sorted[int64_t{h} * n + src_place + (member - src_before)] : 0;
        add32(my_t, min(32, group - base));
      }
      size += group;
    }
  } else {
    const int first = seg_begin[gw], last = seg_end[gw];
    for (int base = first; base < last; base += 32) {
      add32(base + lane < last ? sorted_t[base + lane] : 0, min(32, last - base));
    }
    size = last - first;
  }
  if (size > 0) {
    // Merge the row slots: afterwards every lane of a chunk holds the sum.
#pragma unroll
    for (int off = kLanes; off < 32; off <<= 1) {
#pragma unroll
      for (int k = 0; k < 8; ++k) c[k] += __shfl_xor_sync(0xffffffffu, c[k], off);
    }
    const float inv_size = 1.0f / static_cast<float>(size);
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] *= inv_size;
    if (slot == 0 && has_dims) {
#pragma unroll
      for (int k = 0; k < 8; ++k) cen[dim + k] = c[k];
    }
  } else if (has_dims) {
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = cen[dim + k];
  }
  // |c|^2 over the chunks of slot 0 (every slot holds the same values).
  float sq = 0.0f;
  if (has_dims) {
#pragma unroll
    for (int k = 0; k < 8; ++k) sq += c[k] * c[k];
  }
#pragma unroll
  for (int off = 1; off < kLanes; off <<= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  const float inv = sq > 0.0f ? rsqrtf(sq) : 0.0f;
  if (slot == 0 && has_dims) {
    bf16* out = normed + (static_cast<int64_t>(h) * c_pad + j) * d_pad + dim;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      reinterpret_cast<__nv_bfloat162*>(out)[k] =
          __floats2bfloat162_rn(c[2 * k] * inv, c[2 * k + 1] * inv);
    }
  }
}

// Grid (head, slice): block (h, 0) writes head h's extents from an
// exclusive scan of the cluster sizes (in cluster order); every block copies
// its slice of the head's centroids into the pool as bf16 (spread over
// kFinalSlices blocks, a single block per head would take ~100 us).
constexpr int kFinalThreads = 256;
constexpr int kFinalSlices = 16;
__global__ void __launch_bounds__(kFinalThreads)
    FinalizeKernel(const int32_t* __restrict__ seg_begin, const int32_t* __restrict__ seg_end,
                   const float* __restrict__ centroid, int begin, int d, int clusters,
                   int first_block, int max_blocks, bf16* __restrict__ out_centroids,
                   int32_t* __restrict__ extents) {
  using Scan = cub::BlockScan<int, kFinalThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int h = blockIdx.x;
  if (blockIdx.y == 0) {
    int carry = 0;
    for (int base = 0; base < clusters; base += kFinalThreads) {
      const int j = base + threadIdx.x;
      const int64_t k = static_cast<int64_t>(h) * clusters + j;
      const int size = j < clusters ? seg_end[k] - seg_begin[k] : 0;
      int before = 0, chunk_total = 0;
      Scan(scan_storage).ExclusiveSum(size, before, chunk_total);
      if (j < clusters) {
        const int64_t block = static_cast<int64_t>(h) * max_blocks + first_block + j;
        extents[block * 2] = begin + carry + before;
        extents[block * 2 + 1] = size;
      }
      carry += chunk_total;
      __syncthreads();  // scan_storage is reused
    }
  }
  const int64_t total = static_cast<int64_t>(clusters) * d;
  const float* src = centroid + static_cast<int64_t>(h) * clusters * d;
  bf16* dst = out_centroids + (static_cast<int64_t>(h) * max_blocks + first_block) * d;
  for (int64_t i = blockIdx.y * kFinalThreads + threadIdx.x; i < total;
       i += int64_t{kFinalSlices} * kFinalThreads) {
    dst[i] = __float2bfloat16(src[i]);  // both [clusters, d], rows contiguous
  }
}

int GridFor(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65536));
}

cudaError_t LaunchUpdate(int d, int64_t warps, const bf16* keys, const int32_t* sorted_t,
                         const int32_t* seg_begin, const int32_t* seg_end,
                         const BlockMembers* members, int blocks, int n, int heads, int d_pad,
                         int clusters, int c_pad, float* centroid, bf16* normed, const int* run_if,
                         cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int grid = static_cast<int>((warps * 32 + kThreads - 1) / kThreads);
  const int chunks = d / 8;
  cudaError_t err = cudaSuccess;
  // Dependent launches: a pass's kernels start as the one before drains.
#define STRATA_UPDATE(lanes, walk)                                                                 \
  err = LaunchDependent(UpdateCentroidsKernel<lanes, walk>, dim3(grid), dim3(kThreads), 0, stream, \
                        keys, sorted_t, seg_begin, seg_end,                                        \
                        members != nullptr ? *members : BlockMembers{}, blocks, n, heads, d,       \
                        d_pad, clusters, c_pad, centroid, normed, run_if)
  if (members != nullptr) {
    if (chunks != 16 || blocks > 32) return cudaErrorInvalidValue;  // resident shapes only
    STRATA_UPDATE(16, true);
  } else if (chunks <= 4) {
    STRATA_UPDATE(4, false);
  } else if (chunks <= 8) {
    STRATA_UPDATE(8, false);
  } else if (chunks <= 16) {
    STRATA_UPDATE(16, false);
  } else {
    STRATA_UPDATE(32, false);
  }
#undef STRATA_UPDATE
  return err;
}

template <int kKs>
cudaError_t LaunchAssignFor(int n, int heads, int d, int clusters, const bf16* keys,
                            const bf16* normed, int c_pad, const AssignOutputs& out,
                            cudaStream_t stream) {
  // Two m-tiles per warp halve the shared-memory traffic per mma; beyond
  // 128 dims their A fragments would not fit the registers.
  constexpr int kMt = kKs <= 8 ? 2 : 1;
  constexpr int kRows = kAssignWarps * kMt * 16;
  const size_t smem = 2 * kChunk * (kKs * 16 + 8) * sizeof(bf16);
  cudaError_t err = cudaFuncSetAttribute(
      AssignKernel<kKs, kMt>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((n + kRows - 1) / kRows, heads);
  AssignKernel<kKs, kMt>
      <<<grid, kAssignWarps * 32, smem, stream>>>(keys, normed, n, d, clusters, c_pad, out);
  return cudaGetLastError();
}

// One assignment pass of n keys per head against `clusters` normalised
// centroids (rows of c_pad), by `kernel` where it applies (head_dim 128 on
// sm_90a; kAuto: the measured fastest), else by the mma.sync kernel.
// Whether LaunchAssign runs AssignResidentKernel for these sizes.
bool UsesResidentAssign(int heads, int d, int c_pad, ClusterAssignKernel kernel) {
  return d == kWgAssignHeadDim && c_pad % 128 == 0 && c_pad <= kResidentMaxChunks * 128 &&
         (kernel == ClusterAssignKernel::kResident ||
          (kernel == ClusterAssignKernel::kAuto && heads >= kResidentAutoMinHeads)) &&
         PipelinedAssignUsable();
}

cudaError_t LaunchAssign(int n, int heads, int d, int clusters, const bf16* keys,
                         const bf16* normed, int c_pad, const AssignOutputs& out,
                         ClusterAssignKernel kernel, cudaStream_t stream) {
  const bool wgmma_shape = d == kWgAssignHeadDim && c_pad % 128 == 0;
  if (UsesResidentAssign(heads, d, c_pad, kernel)) {
    return LaunchResidentAssign(n, heads, clusters, keys, normed, c_pad, out, stream);
  }
  if (wgmma_shape &&
      (kernel == ClusterAssignKernel::kPipelined || kernel == ClusterAssignKernel::kAuto ||
       kernel == ClusterAssignKernel::kResident) &&
      PipelinedAssignUsable()) {
    return LaunchPipelinedAssign<2, kPipelinedStages>(n, heads, clusters, keys, normed, c_pad, out,
                                                      stream);
  }
  if (wgmma_shape && WgmmaAssignUsable()) {
    cudaError_t err =
        cudaFuncSetAttribute(AssignWgmmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kWgAssignSmemBytes));
    if (err != cudaSuccess) return err;
    const dim3 grid((n + kWgAssignRows - 1) / kWgAssignRows, heads);
    AssignWgmmaKernel<<<grid, kWgAssignThreads, kWgAssignSmemBytes, stream>>>(keys, normed, n,
                                                                              clusters, c_pad, out);
    return cudaGetLastError();
  }
  switch ((d + 15) / 16) {
#define STRATA_ASSIGN_CASE(ks) \
  case ks:                     \
    return LaunchAssignFor<ks>(n, heads, d, clusters, keys, normed, c_pad, out, stream);
    STRATA_ASSIGN_CASE(1)
    STRATA_ASSIGN_CASE(2)
    STRATA_ASSIGN_CASE(3)
    STRATA_ASSIGN_CASE(4)
    STRATA_ASSIGN_CASE(5)
    STRATA_ASSIGN_CASE(6)
    STRATA_ASSIGN_CASE(7)
    STRATA_ASSIGN_CASE(8)
    STRATA_ASSIGN_CASE(9)
    STRATA_ASSIGN_CASE(10)
    STRATA_ASSIGN_CASE(11)
    STRATA_ASSIGN_CASE(12)
    STRATA_ASSIGN_CASE(13)
    STRATA_ASSIGN_CASE(14)
    STRATA_ASSIGN_CASE(15)
    STRATA_ASSIGN_CASE(16)
#undef STRATA_ASSIGN_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

bool Valid(const ClusterKeysParams& p) {
  return p.k_cache != nullptr && p.v_cache != nullptr && p.block_table != nullptr &&
         p.centroids != nullptr && p.extents != nullptr && p.page_size >= 1 && p.begin >= 0 &&
         p.count >= 1 && p.num_kv_heads >= 1 && p.num_kv_heads <= 65535 && p.head_dim >= 8 &&
         p.head_dim % 8 == 0 && p.head_dim <= kMaxHeadDimCluster && p.num_clusters >= 1 &&
         p.num_clusters <= p.count && p.num_clusters <= kClusterKeysMaxClusters &&
         p.iterations >= 1 && p.first_block >= 0 &&
         int64_t{p.first_block} + p.num_clusters <= p.max_blocks &&
         int64_t{p.begin} + p.count <= INT32_MAX &&
         int64_t{p.num_kv_heads} * p.count <= INT32_MAX &&
         int64_t{p.num_kv_heads} * p.num_clusters <= INT32_MAX &&
         (p.reorder_cache || p.order != nullptr);
}

}  // namespace

size_t ClusterKeysWorkspaceBytes(const ClusterKeysParams& params) {
  return PlanWorkspace(params).total;
}

namespace {

// The workspace arrays the k-means passes work on.
struct PassArrays {
  const bf16* keys = nullptr;
  bf16* normed = nullptr;
  float* centroid = nullptr;
  int32_t* assign = nullptr;
  uint32_t* keys_in = nullptr;
  uint32_t* keys_out = nullptr;
  int32_t* vals_in = nullptr;
  int32_t* vals_out = nullptr;
  int32_t* seg_begin = nullptr;
  int32_t* seg_end = nullptr;
  int32_t* tile_counts[2] = {nullptr, nullptr};  // by pass parity; both zeroed
  int32_t* tile_base = nullptr;
  BlockMembers members;    // counts, starts; sorted in keys_out
  int* changed = nullptr;  // [iterations], zeroed
};

// Counts the final assignment per (head, cluster, member tile), for the
// global member order after passes that ordered their members per block.
__global__ void CountMembersKernel(const int32_t* __restrict__ assign, int n, int heads,
                                   int clusters, int32_t* __restrict__ tile_counts) {
  const int tiles = (n + kMemberTile - 1) / kMemberTile;
  const int rows = heads * n;
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
    const int h = r / n, t = r - h * n;
    atomicAdd(tile_counts + (int64_t{h} * clusters + assign[r]) * tiles + t / kMemberTile, 1);
  }
}

// p.iterations passes (assignment, member order, update) over all heads.
cudaError_t RunIterations(const ClusterKeysParams& p, const Workspace& w, void* sort_temp,
                          const PassArrays& g, int heads, bool counting, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int n = p.count, d = p.head_dim, c = p.num_clusters;
  const int d_pad = RoundUp(d, 16), c_pad = RoundUp(c, kCentroidPad);
  const int64_t items = int64_t{heads} * n;
  const int tiles = (n + kMemberTile - 1) / kMemberTile;
  const int segments = heads * c;
  cudaError_t err = cudaSuccess;
  // The resident assignment orders each block's members itself
  // (BlockMemberOrder); the global order is then made once, at the end.
  const bool block_order = counting && UsesResidentAssign(heads, d, c_pad, p.assign_kernel);
  int blocks = 0;
  if (block_order && (err = ResidentBlocksPerHead(n, heads, &blocks)) != cudaSuccess) return err;
  for (int it = 0; it < p.iterations; ++it) {
    // Iteration it runs only while the previous pass changed something; the
    // flag of a skipped pass stays 0, so once one is skipped all later are.
    const int* run_update = g.changed + it;
    AssignOutputs pass_out;
    pass_out.assign = g.assign;
    pass_out.changed = g.changed + it;
    pass_out.run_if = it == 0 ? nullptr : g.changed + it - 1;
    if (block_order) {
      pass_out.members = g.members;
    } else if (counting) {
      pass_out.tile_counts = g.tile_counts[it % 2];
    } else {
      pass_out.sort_keys = g.keys_in;
    }
    err = LaunchAssign(n, heads, d, c, g.keys, g.normed, c_pad, pass_out, p.assign_kernel, stream);
    if (err != cudaSuccess) return err;
    if (block_order) {
      // Nothing more: the update walks the blocks' orders.
    } else if (counting) {
      MemberOffsetsKernel<<<dim3((c + kOffsetClusters - 1) / kOffsetClusters, heads),
                            kOffsetThreads, 0, stream>>>(
          g.tile_counts[it % 2], g.tile_counts[(it + 1) % 2], n, c, g.tile_base, g.seg_begin,
          g.seg_end, run_update);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      PlaceMembersKernel<<<dim3(tiles, heads), kPlaceThreads, 0, stream>>>(
          g.assign, g.tile_base, n, c, w.member_end_bit, g.vals_out, run_update);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    } else {
      size_t temp_bytes = w.sort_temp_bytes;
      err = cub::DeviceRadixSort::SortPairs(sort_temp, temp_bytes, g.keys_in, g.keys_out, g.vals_in,
                                            g.vals_out, static_cast<int>(items), 0, w.end_bit,
                                            stream);
      if (err != cudaSuccess) return err;
      ZeroSegmentsKernel<<<GridFor(segments, kThreads), kThreads, 0, stream>>>(
          segments, g.seg_begin, g.seg_end, run_update);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      MarkSegmentsKernel<<<GridFor(items, kThreads), kThreads, 0, stream>>>(
          g.keys_out, static_cast<int>(items), g.seg_begin, g.seg_end, run_update);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    err = LaunchUpdate(d, int64_t{segments}, g.keys, g.vals_out, g.seg_begin, g.seg_end,
                       block_order ? &g.members : nullptr, blocks, n, heads, d_pad, c, c_pad,
                       g.centroid, g.normed, run_update, stream);
    if (err != cudaSuccess) return err;
  }
  if (block_order) {
    // The reorder and the extents need the final assignment's global order
    // (seg_begin / seg_end, vals_out): counted and placed once.
    const size_t count_bytes = sizeof(int32_t) * heads * c * tiles;
    if ((err = cudaMemsetAsync(g.tile_counts[0], 0, count_bytes, stream)) != cudaSuccess) {
      return err;
    }
    CountMembersKernel<<<GridFor(items, kThreads), kThreads, 0, stream>>>(g.assign, n, heads, c,
                                                                          g.tile_counts[0]);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    MemberOffsetsKernel<<<dim3((c + kOffsetClusters - 1) / kOffsetClusters, heads), kOffsetThreads,
                          0, stream>>>(g.tile_counts[0], g.tile_counts[1], n, c, g.tile_base,
                                       g.seg_begin, g.seg_end, nullptr);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    PlaceMembersKernel<<<dim3(tiles, heads), kPlaceThreads, 0, stream>>>(
        g.assign, g.tile_base, n, c, w.member_end_bit, g.vals_out, nullptr);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Cache>
cudaError_t LaunchClusterKeysFor(const ClusterKeysParams& params, void* workspace,
                                 cudaStream_t stream) {
  const ClusterKeysParams& p = params;
  if (!Valid(p) || workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return cudaErrorInvalidValue;
  }
  const Workspace w = PlanWorkspace(p);
  char* base = static_cast<char*>(workspace);
  bf16* scratch = reinterpret_cast<bf16*>(base + w.scratch);
  float* centroid = reinterpret_cast<float*>(base + w.centroid);
  bf16* normed = reinterpret_cast<bf16*>(base + w.normed);
  int32_t* assign = reinterpret_cast<int32_t*>(base + w.assign);
  uint32_t* keys_in = reinterpret_cast<uint32_t*>(base + w.keys_in);
  uint32_t* keys_out = reinterpret_cast<uint32_t*>(base + w.keys_out);
  int32_t* vals_in = reinterpret_cast<int32_t*>(base + w.vals_in);
  int32_t* vals_out = reinterpret_cast<int32_t*>(base + w.vals_out);
  int32_t* tile_counts = reinterpret_cast<int32_t*>(base + w.tile_counts);
  int32_t* tile_base = reinterpret_cast<int32_t*>(base + w.tile_base);
  int32_t* block_counts = reinterpret_cast<int32_t*>(base + w.block_counts);
  int32_t* block_starts = reinterpret_cast<int32_t*>(base + w.block_starts);
  int32_t* seg_begin = reinterpret_cast<int32_t*>(base + w.seg_begin);
  int32_t* seg_end = reinterpret_cast<int32_t*>(base + w.seg_end);
  int* changed = reinterpret_cast<int*>(base + w.changed);
  float* best = reinterpret_cast<float*>(base + w.best);
  int32_t* seeds = reinterpret_cast<int32_t*>(base + w.seeds);
  void* sort_temp = base + w.sort_temp;

  const int heads = p.num_kv_heads, n = p.count, d = p.head_dim, c = p.num_clusters;
  const int d_pad = RoundUp(d, 16), c_pad = RoundUp(c, kCentroidPad);
  const int64_t items = int64_t{heads} * n;
  constexpr int kThreads = 256;
  Cache* k_cache = static_cast<Cache*>(p.k_cache);
  Cache* v_cache = static_cast<Cache*>(p.v_cache);

  GatherRowsKernel<<<CopyGrid(items, d), kCopyThreads, 0, stream>>>(
      k_cache, p.block_table, p.page_size, p.begin, n, heads, d, scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // Seeding (engine/kmeans.h): c0 seeds spread over the positions, then the
  // c - c0 keys least like them. One assignment pass against the first
  // seeds gives each key's best score, a sort by similarity bucket (stable:
  // ties keep ascending t) the farthest keys, a stable compaction the list.
  const int c0 = (c + 1) / 2;
  if (c > c0) {
    const int c_pad0 = RoundUp(c0, kCentroidPad);
    InitCentroidsKernel<<<GridFor(int64_t{heads} * c_pad0 * 32, kThreads), kThreads, 0, stream>>>(
        scratch, n, heads, d, d_pad, c0, c_pad0, nullptr, centroid, normed);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    AssignOutputs seed_out;
    seed_out.assign = assign;
    seed_out.best_out = best;
    seed_out.changed = changed;
    err = LaunchAssign(n, heads, d, c0, scratch, normed, c_pad0, seed_out, p.assign_kernel, stream);
    if (err != cudaSuccess) return err;
    int lanes = 1;
    while (lanes * 8 < d) lanes *= 2;  // d <= 256: at most 32
    FarthestKeysKernel<<<GridFor(items * lanes / 4, kThreads), kThreads, 0, stream>>>(
        scratch, best, n, heads, d, c0, lanes, keys_in, vals_in);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    size_t temp_bytes = w.sort_temp_bytes;
    err =
        cub::DeviceRadixSort::SortPairs(sort_temp, temp_bytes, keys_in, keys_out, vals_in, vals_out,
                                        static_cast<int>(items), 0, w.seed_end_bit, stream);
    if (err != cudaSuccess) return err;
    int32_t* flags = assign;  // reset by InitStateKernel below
    if ((err = cudaMemsetAsync(flags, 0, sizeof(int32_t) * items, stream)) != cudaSuccess) {
      return err;
    }
    MarkFarthestKernel<<<GridFor(int64_t{heads} * (c - c0), kThreads), kThreads, 0, stream>>>(
        vals_out, n, heads, c - c0, flags);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    // vals_in still holds every key's t (the sort reads its input only);
    // the count lands in `changed`, cleared below.
    temp_bytes = w.sort_temp_bytes;
    err = cub::DeviceSelect::Flagged(sort_temp, temp_bytes, vals_in, flags, vals_out, changed,
                                     static_cast<int>(items), stream);
    if (err != cudaSuccess) return err;
    SeedListKernel<<<GridFor(int64_t{heads} * c, kThreads), kThreads, 0, stream>>>(
        vals_out, n, heads, c, c0, seeds);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  // One flag per iteration.
  if ((err = cudaMemsetAsync(changed, 0, sizeof(int) * p.iterations, stream)) != cudaSuccess) {
    return err;
  }
  const bool counting = UseCountingSort(p);
  const int tiles = (n + kMemberTile - 1) / kMemberTile;
  if (counting) {
    err = cudaMemsetAsync(tile_counts, 0, 2 * sizeof(int32_t) * heads * c * tiles, stream);
    if (err != cudaSuccess) return err;
  }
  InitStateKernel<<<GridFor(items, kThreads), kThreads, 0, stream>>>(n, heads, assign,
                                                                     counting ? nullptr : vals_in);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  InitCentroidsKernel<<<GridFor(int64_t{heads} * c_pad * 32, kThreads), kThreads, 0, stream>>>(
      scratch, n, heads, d, d_pad, c, c_pad, c > c0 ? seeds : nullptr, centroid, normed);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  PassArrays g;
  g.keys = scratch;
  g.normed = normed;
  g.centroid = centroid;
  g.assign = assign;
  g.keys_in = keys_in;
  g.keys_out = keys_out;
  g.vals_in = vals_in;
  g.vals_out = vals_out;
  g.seg_begin = seg_begin;
  g.seg_end = seg_end;
  if (counting) {
    g.tile_counts[0] = tile_counts;
    g.tile_counts[1] = tile_counts + int64_t{heads} * c * tiles;
    g.tile_base = tile_base;
    g.members.sorted = reinterpret_cast<int32_t*>(keys_out);
    g.members.counts = block_counts;
    g.members.starts = block_starts;
  }
  g.changed = changed;
  err = RunIterations(p, w, sort_temp, g, heads, counting, stream);
  if (err != cudaSuccess) return err;
  // The segments and vals_out describe the final assignment: the last pass
  // that changed anything placed them, and later passes left them alone.
  FinalizeKernel<<<dim3(heads, kFinalSlices), kFinalThreads, 0, stream>>>(
      seg_begin, seg_end, centroid, p.begin, d, c, p.first_block, p.max_blocks,
      static_cast<bf16*>(p.centroids), p.extents);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.reorder_cache) {
    ScatterRowsKernel<<<CopyGrid(items, d), kCopyThreads, 0, stream>>>(
        scratch, vals_out, p.block_table, p.page_size, p.begin, n, heads, d, k_cache);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    GatherRowsKernel<<<CopyGrid(items, d), kCopyThreads, 0, stream>>>(
        v_cache, p.block_table, p.page_size, p.begin, n, heads, d, scratch);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    ScatterRowsKernel<<<CopyGrid(items, d), kCopyThreads, 0, stream>>>(
        scratch, vals_out, p.block_table, p.page_size, p.begin, n, heads, d, v_cache);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.order != nullptr) {
    return cudaMemcpyAsync(p.order, vals_out, static_cast<size_t>(items) * sizeof(int32_t),
                           cudaMemcpyDeviceToDevice, stream);
  }
  return cudaSuccess;
}

bool Valid(const ReorderKeysParams& p) {
  return p.k_cache != nullptr && p.v_cache != nullptr && p.block_table != nullptr &&
         p.order != nullptr && p.page_size >= 1 && p.begin >= 0 && p.count >= 1 &&
         p.num_kv_heads >= 1 && p.head_dim >= 8 && p.head_dim % 8 == 0 &&
         p.head_dim <= kMaxHeadDimCluster && int64_t{p.begin} + p.count <= INT32_MAX &&
         int64_t{p.num_kv_heads} * p.count <= INT32_MAX;
}

template <typename Cache>
cudaError_t LaunchReorderKeysFor(const ReorderKeysParams& p, void* workspace, cudaStream_t stream) {
  if (!Valid(p) || workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return cudaErrorInvalidValue;
  }
  bf16* scratch = static_cast<bf16*>(workspace);
  const int heads = p.num_kv_heads, n = p.count, d = p.head_dim;
  const int64_t items = int64_t{heads} * n;
  Cache* k_cache = static_cast<Cache*>(p.k_cache);
  Cache* v_cache = static_cast<Cache*>(p.v_cache);
  for (Cache* cache : {k_cache, v_cache}) {
    GatherRowsKernel<<<CopyGrid(items, d), kCopyThreads, 0, stream>>>(
        cache, p.block_table, p.page_size, p.begin, n, heads, d, scratch);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    ScatterRowsKernel<<<CopyGrid(items, d), kCopyThreads, 0, stream>>>(
        scratch, p.order, p.block_table, p.page_size, p.begin, n, heads, d, cache);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

size_t ReorderKeysWorkspaceBytes(const ReorderKeysParams& params) {
  return static_cast<size_t>(params.num_kv_heads) * static_cast<size_t>(params.count) *
         static_cast<size_t>(params.head_dim) * sizeof(bf16);
}

cudaError_t LaunchReorderKeys(const ReorderKeysParams& params, void* workspace,
                              cudaStream_t stream) {
  return params.kv_fp8 ? LaunchReorderKeysFor<__nv_fp8_e4m3>(params, workspace, stream)
                       : LaunchReorderKeysFor<bf16>(params, workspace, stream);
}

cudaError_t LaunchClusterKeys(const ClusterKeysParams& params, void* workspace,
                              cudaStream_t stream) {
  return params.kv_fp8 ? LaunchClusterKeysFor<__nv_fp8_e4m3>(params, workspace, stream)
                       : LaunchClusterKeysFor<bf16>(params, workspace, stream);
}

}  // namespace strata::cuda::kernels
