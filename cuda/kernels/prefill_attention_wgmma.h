// Prefill attention on Hopper's warpgroup tensor-core instructions (wgmma,
// sm_90a) for head_dim 128 over a bf16 paged KV cache.
//
// One thread block owns 128 query rows of one (sequence, kv head), where a
// row is a (token, query head of the GQA group) pair, so every K/V tile
// serves all query heads of the group. The block is warp-specialized, as in
// FlashAttention-3:
//   warpgroup 0 loads: one warp copies each 128-key tile of K and V with the
//     bulk tensor copy engine (TMA) into two shared-memory stages,
//     completing on mbarriers: one copy per 64-dim column block when the
//     tile's pages are consecutive slots, else one per page and column
//     block (the block table read once per page); it gives its registers to
//     the others (setmaxnreg);
//   warpgroups 1 and 2 compute 64 rows each. Per tile:
//     S = Q K^T: wgmma m64n128k16, Q and K read by the tensor cores straight
//       from shared memory (128-byte swizzled tiles, described by matrix
//       descriptors), fp32 accumulators in registers;
//     the fp32 online softmax in registers (the 4 lanes of a quad share a
//       row), which overlaps the previous tile's P V on the tensor cores:
//       S of tile j + 1 is issued before P V of tile j;
//     O += P V: wgmma with P from registers (the accumulator layout of S is
//       the A-operand layout) and V from shared memory, read transposed.
// Causal and sliding-window masks apply only to tiles that straddle a row's
// visible range; keys past the context are zeroed in shared memory before
// use, so a NaN in an unwritten cache slot never reaches O. With a sliding
// window, tiles start on 128-key boundaries below the window: those keys
// are masked (P = 0), which assumes their pages stay mapped and hold what
// was written there (strata never unmaps pages below a window). Sequences with
// one query token belong to the decode kernel and are skipped.
//
// Thread-safety: no state; concurrent launches on different streams are safe.
#ifndef STRATA_CUDA_KERNELS_PREFILL_ATTENTION_WGMMA_H_
#define STRATA_CUDA_KERNELS_PREFILL_ATTENTION_WGMMA_H_

#include <cuda_runtime_api.h>

#include "cuda/kernels/attention.h"

namespace strata::cuda::kernels {

// Whether LaunchWgmmaPrefill handles `params`: head_dim 128, a bf16 cache
// whose size is known (num_cache_slots), pages of 8, 16, 32, 64 or a multiple
// of 128 slots, a grid that fits, and a device of compute capability 9.0
// (the kernel is built for sm_90a only) whose driver encodes tensor maps.
bool CanUseWgmmaPrefill(const PagedAttentionParams& params);

// Enqueues the prefill part of `params` (sequences with q_len > 1). Requires
// CanUseWgmmaPrefill(params).
cudaError_t LaunchWgmmaPrefill(const PagedAttentionParams& params, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_PREFILL_ATTENTION_WGMMA_H_
