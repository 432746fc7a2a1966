// The CUDA backend's tiered sparse decoding (engine::Backend::OffloadBlocks
// and RecallBlocks): argument checks and launches of cuda/kernels/kv_tier.h
// and the encoders of kv_codec.h, kept apart from cuda_backend.cc.
//
// Thread-safety: as the backend (one thread at a time).
#ifndef STRATA_CUDA_TIERING_H_
#define STRATA_CUDA_TIERING_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "cuda/cuda_utils.h"
#include "engine/backend.h"

namespace strata::cuda {

// `workspace` holds the encode jobs; it grows as needed (never used by a
// graph: offloads run only in steps that are not replayed).
absl::Status OffloadBlocks(const engine::Tensor& k_cache, const engine::Tensor& v_cache,
                           const engine::SequenceRange& range, const engine::Tensor& extents,
                           int first_block, int num_blocks, int block_stride,
                           engine::KvCodecKind codec, const engine::HostBuffer& host,
                           int64_t region_unit, int64_t units_per_head,
                           engine::TierTables& slot_tables, DeviceBuffer& workspace,
                           cudaStream_t stream);

// The device workspace RecallBlocks needs for plans of `plan`'s capacity
// (its entries tensor), so that it does not change between steps.
size_t RecallWorkspaceBytes(const engine::SparsePlan& plan, const engine::Tensor& k_cache);

// `workspace` holds RecallWorkspaceBytes; `decode_ctas` CTAs decode the
// missed pieces.
absl::Status RecallBlocks(engine::Tensor& k_cache, engine::Tensor& v_cache,
                          engine::SparsePlan& plan, const engine::Tensor& extents,
                          engine::TierTables& tables, engine::TierRing& ring, void* workspace,
                          size_t workspace_bytes, int decode_ctas, cudaStream_t stream);

}  // namespace strata::cuda

#endif  // STRATA_CUDA_TIERING_H_
