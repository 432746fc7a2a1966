// Tensor-core prefill attention (FlashAttention-2 style) for head_dim 64 and
// 128, over the paged KV cache.
//
// One thread block of 8 warps owns 256 query rows of one (sequence, kv head),
// where a row is a (token, query head of the GQA group) pair, so every K/V
// tile staged in shared memory serves all query heads of the group. Each warp
// owns 32 rows (two m16 tiles sharing each K/V fragment); S = Q K^T and O += P V run on mma.sync
// m16n8k16 (bf16 in, fp32 accumulate), fragments come from shared memory through ldmatrix, the
// 64-key K/V tiles are gathered per key row (one page lookup per row) with
// cp.async into two stages, and the softmax is the usual fp32 online form in
// registers, 32 keys at a time. Causal and sliding-window masks are applied
// only to tiles that straddle a row's visible range.
//
// Sequences with one query token belong to the decode kernel and are skipped,
// exactly as in the CUDA-core prefill kernel this one replaces where it
// applies.
#ifndef STRATA_CUDA_KERNELS_PREFILL_ATTENTION_TC_H_
#define STRATA_CUDA_KERNELS_PREFILL_ATTENTION_TC_H_

#include <cuda_runtime_api.h>

#include "cuda/kernels/attention.h"

namespace strata::cuda::kernels {

// Whether LaunchTensorCorePrefill handles `params` (head_dim 64 or 128, a
// grid that fits). Host-only check; no device calls.
bool CanUseTensorCorePrefill(const PagedAttentionParams& params);

// Enqueues the prefill part of `params` (sequences with q_len > 1). Requires
// CanUseTensorCorePrefill(params).
cudaError_t LaunchTensorCorePrefill(const PagedAttentionParams& params, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_PREFILL_ATTENTION_TC_H_
