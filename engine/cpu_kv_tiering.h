// The CPU backend's tiered sparse decoding (engine::Backend::OffloadBlocks
// and RecallBlocks): the reference the CUDA kernels are checked against,
// written for clarity, one (entry, KV head) after another.
//
// Thread-safety: no state; the tensors are the caller's.
#ifndef STRATA_ENGINE_CPU_KV_TIERING_H_
#define STRATA_ENGINE_CPU_KV_TIERING_H_

#include "absl/status/status.h"
#include "engine/backend.h"

namespace strata::engine::cpu_tiering {

absl::Status OffloadBlocks(const Tensor& k_cache, const Tensor& v_cache, const SequenceRange& range,
                           const Tensor& extents, int first_block, int num_blocks, int block_stride,
                           KvCodecKind codec, const HostBuffer& host, int64_t region_unit,
                           int64_t units_per_head, TierTables& slot_tables);

absl::Status RecallBlocks(Tensor& k_cache, Tensor& v_cache, SparsePlan& plan, const Tensor& extents,
                          TierTables& tables, TierRing& ring);

}  // namespace strata::engine::cpu_tiering

#endif  // STRATA_ENGINE_CPU_KV_TIERING_H_
