// Launcher for ClusterKV's key clustering on the GPU
// (engine::Backend::ClusterKeys; the recipe and its CPU reference are in
// engine/kmeans.h and engine/cpu_backend.cc).
//
// For one sequence and one layer, every KV head: k-means with cosine
// assignment over the keys of logical indices [begin, begin + count), then
// the in-place reordering of those K and V rows into cluster-major order,
// and the clusters' centroids and extents written into one pool slot.
// Iterations stop early, without a host round trip, once an assignment pass
// changes nothing (the remaining launches see a device flag and return).
//
// Thread-safety: no state; calls on one stream are ordered.
#ifndef STRATA_CUDA_KERNELS_KV_CLUSTER_H_
#define STRATA_CUDA_KERNELS_KV_CLUSTER_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace strata::cuda::kernels {

// Kernel variants of an iteration's steps, for tests and benchmarks that
// compare them. kAuto is the fastest agreeing combination in
// CudaClusterTest.KernelVariantTiming32k on an H100 (bench/RESULTS.md): with
// the counting sort while its count arrays stay small (else the radix
// sort), kResident from 4 KV heads on where a head's centroids fit, else
// kPipelined (kWgmma where the copy-engine tensor map cannot be made). At
// 32k keys x 8 heads x 410 clusters x 20 passes: 2.05 ms, against 2.45 ms
// for kPipelined and 3.7 ms for kWgmma with the radix sort.
//
// Assignment of head_dim-128 keys on sm_90a (other shapes always use the
// mma.sync kernel): kWgmma, blocks of two warpgroups of 64 keys with the
// centroid chunks double buffered by cp.async; kPipelined, persistent
// warp-specialized blocks whose copy warp streams 256-key tiles and
// centroid chunks through the copy engine (TMA) to two warpgroups;
// kResident, blocks that keep one head's centroids in shared memory (at
// most 512 clusters; more fall back to kPipelined) and stream 64-key tiles
// to three warpgroups, and with the counting sort also order their own
// keys by cluster. All give the same assignment.
enum class ClusterAssignKernel { kAuto, kWgmma, kPipelined, kResident };
// How each pass orders every cluster's members (ascending t): kRadixSort, a
// CUB radix sort of all keys by (head, cluster); kCountingSort, counts per
// (cluster, 1024-key tile) from the assignment, a scan per head and a block
// sort per tile (with kResident: each assignment block sorts its own keys,
// and the scan and tile sorts run once, for the reorder). Both give the
// same order.
enum class ClusterMemberOrder { kAuto, kRadixSort, kCountingSort };

struct ClusterKeysParams {
  // [num_pages, page_size, num_kv_heads, head_dim], bf16 or (kv_fp8) fp8 e4m3.
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  bool kv_fp8 = false;
  const int32_t* block_table = nullptr;  // the sequence's pages (device)
  int page_size = 0;
  int begin = 0;  // first logical index clustered
  int count = 0;  // tokens clustered, >= 1
  int num_kv_heads = 0;
  int head_dim = 0;            // a multiple of 8, at most 256
  int num_clusters = 0;        // 1 <= num_clusters <= min(count, kClusterKeysMaxClusters)
  int iterations = 0;          // >= 1
  int first_block = 0;         // pool block of cluster 0
  int max_blocks = 0;          // block stride of the pools
  void* centroids = nullptr;   // bf16 [num_kv_heads, max_blocks, head_dim]
  int32_t* extents = nullptr;  // [num_kv_heads, max_blocks, 2] = (first index, size)
  // Null, or [num_kv_heads, count]: the reorder applied (Backend::ClusterKeys).
  int32_t* order = nullptr;
  // False: the cache's rows stay in place and only `order` (then required)
  // says how they would move (engine::ClusterRows::kLeave).
  bool reorder_cache = true;
  ClusterAssignKernel assign_kernel = ClusterAssignKernel::kAuto;
  ClusterMemberOrder member_order = ClusterMemberOrder::kAuto;
};

// Bits of the seeding's similarity buckets; equal to
// engine::kSeedSimilarityBits (the CPU reference's, checked where both are
// seen).
inline constexpr int kClusterSeedSimilarityBits = 13;

// Most clusters one call makes per head (the per-pass counting sort packs a
// cluster and a key's place in its 1024-key tile into 32 bits).
inline constexpr int kClusterKeysMaxClusters = (1 << 22) - 1;

// Scratch bytes LaunchClusterKeys needs for these sizes.
size_t ClusterKeysWorkspaceBytes(const ClusterKeysParams& params);

// Enqueues the clustering; `workspace` holds ClusterKeysWorkspaceBytes bytes
// (256-byte aligned).
cudaError_t LaunchClusterKeys(const ClusterKeysParams& params, void* workspace,
                              cudaStream_t stream);

// Backend::ReorderKeys: the rows of [begin, begin + count) of every KV head
// reordered by `order` as ClusterKeys reorders them, without the k-means.
struct ReorderKeysParams {
  void* k_cache = nullptr;  // as ClusterKeysParams'
  void* v_cache = nullptr;
  bool kv_fp8 = false;
  const int32_t* block_table = nullptr;
  int page_size = 0;
  int begin = 0;
  int count = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  // [num_kv_heads, count]: row begin + i of head h gets the row that was at
  // begin + order[h][i]; entries outside [0, count) are clamped into it.
  const int32_t* order = nullptr;
};
size_t ReorderKeysWorkspaceBytes(const ReorderKeysParams& params);
cudaError_t LaunchReorderKeys(const ReorderKeysParams& params, void* workspace,
                              cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_KV_CLUSTER_H_
