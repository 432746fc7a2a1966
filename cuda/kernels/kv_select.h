// Launchers for the per-step token selection of the sparse KV policies
// (engine::Backend::KeyBounds, ScoreBlocks and SelectTokens; the CPU
// reference is in engine/cpu_backend.cc and the plan layout in
// engine/backend.h, SparsePlan).
//
//  - KeyBounds: Quest's per-block channel min / max of the keys.
//  - ScoreBlocks: one block score per (plan entry, KV head, block), summed
//    over the KV group's query heads: q . centroid (ClusterKV) or Quest's
//    upper bound sum_d max(q[d] lo[d], q[d] hi[d]).
//  - SelectTokens: per (plan entry, KV head), the blocks in descending score
//    (ties: lower block) until the token budget, the last one truncated;
//    writes the logical key indices sinks ++ selection ++ tail.
//
// Thread-safety: no state; calls on one stream are ordered.
#ifndef STRATA_CUDA_KERNELS_KV_SELECT_H_
#define STRATA_CUDA_KERNELS_KV_SELECT_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata::cuda::kernels {

struct KeyBoundsParams {
  // [num_pages, page_size, num_kv_heads, head_dim], bf16 or (kv_fp8) fp8 e4m3.
  const void* k_cache = nullptr;
  bool kv_fp8 = false;
  const int32_t* block_table = nullptr;
  int page_size = 0;
  int begin = 0;         // first logical index
  int num_blocks = 0;    // blocks summarised
  int block_tokens = 0;  // tokens per block
  int num_kv_heads = 0;
  int head_dim = 0;
  int first_block = 0;
  int max_blocks = 0;
  void* lo = nullptr;  // bf16 [num_kv_heads, max_blocks, head_dim]
  void* hi = nullptr;
  int32_t* extents = nullptr;  // [num_kv_heads, max_blocks, 2]
};
cudaError_t LaunchKeyBounds(const KeyBoundsParams& params, cudaStream_t stream);

// Columns of the entries table (engine::SparsePlanField).
inline constexpr int kPlanFields = 8;
inline constexpr int kPlanRowCol = 0, kPlanSeqCol = 1, kPlanSlotCol = 2, kPlanNumBlocksCol = 3,
                     kPlanBudgetCol = 4, kPlanSinkEndCol = 5, kPlanTailBeginCol = 6,
                     kPlanContextLenCol = 7;

struct ScoreBlocksParams {
  const void* qkv = nullptr;  // bf16 [T, qkv_row_width]; query head h at h * head_dim
  int64_t qkv_row_width = 0;
  const int32_t* entries = nullptr;  // [P, kPlanFields]
  int entry_begin = 0;
  int entry_end = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_blocks = 0;               // block stride of summaries and scores
  int max_num_blocks = 0;           // largest num_blocks among the entries (launch sizing)
  bool key_bounds = false;          // false: centroid dot product; true: Quest bound
  const void* summary_a = nullptr;  // bf16 [slots, num_kv_heads, max_blocks, head_dim]
  const void* summary_b = nullptr;  // hi, for key_bounds
  float* scores = nullptr;          // [P, num_kv_heads, max_blocks]
};
cudaError_t LaunchScoreBlocks(const ScoreBlocksParams& params, cudaStream_t stream);

struct SelectTokensParams {
  const float* scores = nullptr;     // [P, num_kv_heads, max_blocks]
  const int32_t* extents = nullptr;  // [slots, num_kv_heads, max_blocks, 2]
  const int32_t* entries = nullptr;  // [P, kPlanFields]
  int num_entries = 0;
  int num_kv_heads = 0;
  int max_blocks = 0;
  int max_num_blocks = 0;  // largest num_blocks among the entries
  int max_keys = 0;
  int32_t* key_index = nullptr;  // [P, num_kv_heads, max_keys]
  int32_t* key_count = nullptr;  // [P, num_kv_heads]
};
cudaError_t LaunchSelectTokens(const SelectTokensParams& params, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_KV_SELECT_H_
