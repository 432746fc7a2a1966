// Launchers for tiered sparse decoding on the GPU (engine::Backend::
// OffloadBlocks and RecallBlocks; engine/backend.h, TierTables, states the
// contract and engine/cpu_kv_tiering.cc is the reference):
//  - LaunchOffloadLayout lays a layer's new clusters out as pieces in the
//    host region (piece_base, piece_host, piece_count) and writes one
//    encode job per piece for LaunchEncodeKvBlocks (kv_codec.h), which
//    writes them straight into mapped host memory.
//  - LaunchRecallBlocks runs two kernels. The plan kernel, one CTA per
//    (plan entry, KV head), finds the runs of the selection that
//    SelectTokens wrote, keeps the hits, copies ahead the resident clusters
//    the step's writes would overwrite, gives the misses their ring
//    positions, appends one job per missed piece to a device-side list,
//    and rewrites key_index to the ring's cache slots. The decode kernel, a
//    fixed grid of CTAs walking that list, decodes each piece from mapped
//    host memory (DecodeKvBlock, CRC checked) into its rows: many pieces in
//    flight at once, which is what keeps the bus busy. The ring evolves
//    exactly as the CPU reference's.
//  - Pieces below host memory (engine::kPieceBelowHost), when the params
//    carry a fetch list: the plan kernel also lists the missed ones there
//    (mapped host memory), the list's length is copied to the host, a host
//    function of the stream (cudaLaunchHostFunc) answers each with its byte
//    offset in the host buffer (or -1), and the decode kernel reads those
//    pieces from there. Every step is a stream operation, so a graph
//    records it; the host function runs at each replay.
//  - Read ahead (RecallParams::list_only): only the plan kernel's list of
//    missed pieces below host memory and the host function; the ring, the
//    tables and key_index stay as they are.
//
// Thread-safety: no state; calls on one stream are ordered.
#ifndef STRATA_CUDA_KERNELS_KV_TIER_H_
#define STRATA_CUDA_KERNELS_KV_TIER_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernels/kv_codec.h"

namespace strata::cuda::kernels {

struct OffloadLayoutParams {
  KvCodecKind codec = KvCodecKind::kBf16;
  int cache_bytes = 2;  // 2: bf16 cache, 1: fp8
  int num_kv_heads = 0;
  int head_dim = 0;
  const int32_t* extents = nullptr;  // one slot [Hkv, max_blocks, 2]
  int max_blocks = 0;
  int first_block = 0;
  int num_blocks = 0;
  int block_stride = 1;
  int64_t region_unit = 0;  // each head's units start at region_unit + h * units_per_head
  int64_t units_per_head = 0;
  int32_t* piece_base = nullptr;   // one slot [Hkv, max_blocks]
  int32_t* piece_host = nullptr;   // one slot [Hkv, max_pieces]
  int32_t* piece_count = nullptr;  // one slot [Hkv]
  int max_pieces = 0;
  // [Hkv, jobs_per_head]: one encode job per new piece, tokens 0 past them.
  EncodeKvJob* jobs = nullptr;
  int jobs_per_head = 0;
  int32_t* overflow = nullptr;  // set to 1 when a head's pieces outgrow its units or jobs
};
cudaError_t LaunchOffloadLayout(const OffloadLayoutParams& params, cudaStream_t stream);

// One entry of a recall's fetch list: a missed piece below host memory
// (the layout of engine::PieceFetcher::Piece).
struct RecallFetchPiece {
  int32_t slot, head, piece;
};
static_assert(sizeof(RecallFetchPiece) == 12);
// Entries one recall's fetch list holds; missed pieces below host memory
// past it fail like bad pieces.
inline constexpr int kRecallFetchCapacity = 8192;

// The fetch list of a recall (RecallParams::fetch): pinned host memory at
// addresses that do not change while graphs may replay the recall.
struct RecallFetchList {
  RecallFetchPiece* pieces = nullptr;  // device pointer, [kRecallFetchCapacity]
  int32_t* count = nullptr;            // host pointer: pieces listed (may exceed the capacity)
  const int64_t* offsets = nullptr;    // device pointer, [kRecallFetchCapacity]: fn's answers
  // Runs on the host once the list and its count are there; sets
  // offsets[i] for i < min(count, capacity) to the byte offset of piece i in
  // the host buffer, or < 0 (a bad piece).
  cudaHostFn_t fn = nullptr;
  void* arg = nullptr;
};

struct RecallParams {
  // The layer's caches [pages, page_size, Hkv, D]: bf16, or fp8 (kv_fp8).
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  bool kv_fp8 = false;
  int page_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  const int32_t* entries = nullptr;  // [P, kPlanFields]
  int num_entries = 0;
  int32_t* key_index = nullptr;  // [P, Hkv, max_keys]
  const int32_t* key_count = nullptr;
  int max_keys = 0;
  const int32_t* extents = nullptr;  // [slots, Hkv, max_blocks, 2]
  int max_blocks = 0;
  int max_num_blocks = 0;               // largest num_blocks of the entries (shared memory)
  const int32_t* piece_base = nullptr;  // [slots, Hkv, max_blocks]
  const int32_t* piece_host = nullptr;  // [slots, Hkv, max_pieces]
  int max_pieces = 0;
  int32_t* res_start = nullptr;  // [slots, Hkv, max_blocks]
  int32_t* res_count = nullptr;
  int32_t* ring_head = nullptr;         // [slots, Hkv]
  const int32_t* ring_pages = nullptr;  // [slots, ring_rows / page_size]
  int ring_rows = 0;
  const uint8_t* host = nullptr;  // device pointer of the mapped host buffer
  int64_t host_bytes = 0;
  int32_t* status = nullptr;  // [slots]: KvRecallStatus bits
  int32_t* stats = nullptr;   // [kKvTierStats]
  // RecallWorkspaceBytes(params) of device memory (the piece list), and the
  // decode kernel's CTAs (a few per SM).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int decode_ctas = 0;
  // Pieces below host memory: fetched through `fetch` when fetch.pieces is
  // set, else bad pieces.
  RecallFetchList fetch;
  // Read ahead only (engine::TierRing::list_only; needs `fetch`): the plan
  // kernel lists the missed pieces below host memory and writes nothing
  // else, the host function runs, and no piece is decoded.
  bool list_only = false;
};
// Shared memory the plan kernel takes for these params.
size_t RecallSmemBytes(const RecallParams& params);
size_t RecallWorkspaceBytes(const RecallParams& params);
cudaError_t LaunchRecallBlocks(const RecallParams& params, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_KV_TIER_H_
