// Launcher for paged causal attention over a mixed batch of prefill chunks
// and decode tokens (engine::Backend::Attention on the GPU).
//
// Two kernels share the work, each skipping the sequences of the other:
//  - decode (sequences with exactly one query token): one thread block per
//    (sequence, kv head, key split) computes every query head of the GQA
//    group against the keys of its split with an fp32 online softmax; each
//    warp streams its own share of the keys through a cp.async pipeline of
//    K/V tiles, and when a sequence's keys are split over several blocks
//    (long contexts, small batches) a combine kernel merges the partials.
//  - prefill (sequences with more than one query token): for head_dim 128 on
//    a bf16 cache, the warpgroup-MMA kernel of prefill_attention_wgmma.h
//    (sm_90a); for head_dim 64, and 128 on an fp8 cache, the tensor-core
//    kernel of prefill_attention_tc.h (mma.sync bf16, fp32 accumulation);
//    for other head dims, one thread block per
//    (sequence, kv head, tile of 64 query rows), where a row is a (token,
//    query head of the group) pair, walks 64-key tiles staged in shared
//    memory on CUDA cores. Either way each K/V tile is read once for all
//    heads of the group.
//
// q and out are bf16, the caches bf16 or fp8 e4m3 (PagedAttentionParams::
// kv_fp8; the decode kernel then streams half the bytes); softmax and
// accumulation are fp32.
//
// Thread-safety: no state; concurrent calls on different streams are safe
// when they use different workspaces.
#ifndef STRATA_CUDA_KERNELS_ATTENTION_H_
#define STRATA_CUDA_KERNELS_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace strata::cuda::kernels {

struct PagedAttentionParams {
  // [T, qkv_row_width] bf16; query head h of token t starts at
  // t * qkv_row_width + h * head_dim. 16-byte aligned.
  const void* qkv = nullptr;
  int64_t qkv_row_width = 0;
  // [num_pages, page_size, num_kv_heads, head_dim], 16-byte aligned: bf16,
  // or fp8 e4m3 when kv_fp8 (widened to fp32 exactly on load).
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  bool kv_fp8 = false;
  // num_pages * page_size: the slots each cache holds (0 if unknown; the
  // copy-engine prefill kernel needs it to describe the caches).
  int64_t num_cache_slots = 0;
  // [T, num_q_heads * head_dim] bf16, 16-byte aligned.
  void* out = nullptr;
  // Device arrays as in engine::AttentionBatch.
  const int32_t* query_start = nullptr;  // [num_seqs + 1]
  const int32_t* context_len = nullptr;  // [num_seqs]
  const int32_t* block_table = nullptr;  // [num_seqs, max_blocks_per_seq]
  int num_seqs = 0;
  int max_blocks_per_seq = 0;
  int page_size = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // a multiple of 8, at most kMaxHeadDim
  float scale = 1.0f;
  int sliding_window = 0;  // <= 0: unlimited

  // Sparse decode (engine::Backend::SparseAttention): when plan_entries is
  // set, the decode kernel's sequence x is plan entry x ([num_seqs,
  // kPlanFields] of cuda/kernels/kv_select.h): its query row is column 0, its
  // block-table row column 1, and KV head h attends to exactly the keys
  // key_index[x][h][0, key_count[x][h]): logical indices (>= 0), or cache
  // slots s written as -2 - s (engine::KvCacheSlotIndex: clusters recalled
  // from the host tier). query_start and context_len
  // are then unused, and max_context_len bounds key_count.
  const int32_t* plan_entries = nullptr;
  const int32_t* key_index = nullptr;  // [num_seqs, num_kv_heads, max_keys]
  const int32_t* key_count = nullptr;  // [num_seqs, num_kv_heads]
  int max_keys = 0;

  // Launch sizing, from the host copies of the batch.
  int max_query_len = 0;
  int max_context_len = 0;
  bool has_decode = false;   // some sequence has q_len == 1
  bool has_prefill = false;  // some sequence has q_len > 1
};

inline constexpr int kMaxHeadDim = 256;

// How many blocks the decode kernel splits each sequence's keys over, for a
// GPU with `num_sms` multiprocessors: enough blocks to fill the GPU, no split
// shorter than a few hundred keys.
int ChooseDecodeSplits(const PagedAttentionParams& params, int num_sms);

// Workspace bytes LaunchPagedAttention needs with `num_splits` (0 if 1).
size_t DecodeWorkspaceBytes(const PagedAttentionParams& params, int num_splits);

// Enqueues the attention kernels. `workspace` must hold
// DecodeWorkspaceBytes(params, num_splits) bytes (16-byte aligned).
cudaError_t LaunchPagedAttention(const PagedAttentionParams& params, int num_splits,
                                 void* workspace, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_ATTENTION_H_
