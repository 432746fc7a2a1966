// Prefill attention on Hopper's warpgroup tensor-core instructions (wgmma,
// sm_90a) for head_dim 128 over a bf16 paged KV cache.
//
// One thread block of two warpgroups owns 128 query rows of one (sequence,
// kv head), where a row is a (token, query head of the GQA group) pair, so
// every K/V tile serves all query heads of the group; each warpgroup owns 64
// rows. Per 128-key tile:
//   S = Q K^T: wgmma m64n128k16, Q and K read by the tensor cores straight
//     from shared memory (128-byte swizzled tiles, described by matrix
//     descriptors), fp32 accumulators in registers;
//   the fp32 online softmax in registers (the 4 lanes of a quad share a row);
//   O += P V: wgmma with P from registers (the accumulator layout of S is the
//     A-operand layout, so P never leaves registers) and V from shared
//     memory, read transposed by the tensor cores.
// K/V tiles are gathered per key row (one block-table lookup per row) with cp.async into two stages, the next tile's copies in
// flight while the current one is used. Causal and sliding-window masks apply only to tiles
// that straddle a row's visible range. Sequences with one query token belong
// to the decode kernel and are skipped.
//
// Thread-safety: no state; concurrent launches on different streams are safe.
#ifndef STRATA_CUDA_KERNELS_PREFILL_ATTENTION_WGMMA_H_
#define STRATA_CUDA_KERNELS_PREFILL_ATTENTION_WGMMA_H_

#include <cuda_runtime_api.h>

#include "cuda/kernels/attention.h"

namespace strata::cuda::kernels {

// Whether LaunchWgmmaPrefill handles `params`: head_dim 128, a bf16 cache, a
// grid that fits, and a device of compute capability 9.0 (the kernel is built
// for sm_90a only).
bool CanUseWgmmaPrefill(const PagedAttentionParams& params);

// Enqueues the prefill part of `params` (sequences with q_len > 1). Requires
// CanUseWgmmaPrefill(params).
cudaError_t LaunchWgmmaPrefill(const PagedAttentionParams& params, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_PREFILL_ATTENTION_WGMMA_H_
