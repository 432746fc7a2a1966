// Launcher for ClusterKV's key clustering on the GPU
// (engine::Backend::ClusterKeys; the recipe and its CPU reference are in
// engine/kmeans.h and engine/cpu_backend.cc).
//
// For one sequence and one layer, every KV head at once: k-means with cosine
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
  int head_dim = 0;  // a multiple of 8, at most 256
  int num_clusters = 0;  // 1 <= num_clusters <= count
  int iterations = 0;    // >= 1
  int first_block = 0;   // pool block of cluster 0
  int max_blocks = 0;    // block stride of the pools
  void* centroids = nullptr;   // bf16 [num_kv_heads, max_blocks, head_dim]
  int32_t* extents = nullptr;  // [num_kv_heads, max_blocks, 2] = (first index, size)
};

// Bits of the seeding's similarity buckets; equal to
// engine::kSeedSimilarityBits (the CPU reference's, checked where both are
// seen).
inline constexpr int kClusterSeedSimilarityBits = 13;

// Scratch bytes LaunchClusterKeys needs for these sizes.
size_t ClusterKeysWorkspaceBytes(const ClusterKeysParams& params);

// Enqueues the clustering; `workspace` holds ClusterKeysWorkspaceBytes bytes
// (256-byte aligned).
cudaError_t LaunchClusterKeys(const ClusterKeysParams& params, void* workspace,
                              cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_KV_CLUSTER_H_
