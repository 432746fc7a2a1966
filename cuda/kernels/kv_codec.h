// The KV block codecs on the GPU: batch launchers that encode KV rows of the
// paged cache into blocks and decode blocks into plain rows, byte for byte
// and bit for bit what engine::KvCodec does on the CPU (engine/kv_codec.h
// states the block format; the device functions that other kernels call,
// such as the recall step that decodes blocks straight from mapped host
// memory, are in kv_codec.cuh).
//
// Sizes and limits (host and device): a block is built or checked whole in
// shared memory, so what a CTA can take is bounded by its shared memory, not
// by the format. Encode needs KvCodecSmemBytes(codec, tokens, head_dim,
// cache element bytes); Decode reads any block that fits
// KvDecodeSmemBytes(head_dim), which holds every codec's block of up to
// kKvCodecMaxTokens (64, the recall unit) tokens from a 2-byte cache (66,736
// bytes at head_dim 256), and refuses larger ones with kTooLarge.
//
// Thread-safety: no state; calls on one stream are ordered.
#ifndef STRATA_CUDA_KERNELS_KV_CODEC_H_
#define STRATA_CUDA_KERNELS_KV_CODEC_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "engine/kv_codec.h"
#include "engine/kv_codec_math.h"

namespace strata::cuda::kernels {

using engine::KvCodecKind;

// What DecodeKvBlock returns instead of a token count when it refuses a
// block; nothing is written to the outputs then. The launchers store them
// (as int32) in their per-job status.
enum class KvBlockError : int32_t {
  kBadHeader = -1,     // magic, version, codec, source dtype, flags, reserved,
                       // shape or groups out of range, or payload_bytes not
                       // what the shape needs (engine::KvCodec::Inspect's checks)
  kBadCrc = -2,        // the header is consistent, the CRC32C is not
  kTruncated = -3,     // the header (or the block it describes) is longer than
                       // the caller's capacity
  kTooLarge = -4,      // a valid block that does not fit the decoder's shared memory
  kWrongHeadDim = -5,  // a valid block of another head_dim than expected
  kBadJob = -6,        // launchers only: a job outside the params' bounds
};

inline constexpr int kKvCodecMaxTokens = 64;  // the recall unit; sizes the decode buffer
// The CRC's scratch after the block in shared memory: a 256-entry table, one
// word per warp and a broadcast word, rounded to 16 bytes.
inline constexpr size_t kKvCrcScratchBytes = 1168;

STRATA_HOST_DEVICE constexpr size_t KvRoundUp16(size_t n) { return (n + 15) & ~size_t{15}; }

// The exact block size, header included, of `kind` for a tokens x head_dim
// block whose source elements are `source_bytes` wide (2 for bf16/fp16, 1
// for fp8, 4 for fp32; only the raw codec depends on it), with the groups
// the encoders use (the decoder takes them from the header).
STRATA_HOST_DEVICE constexpr size_t KvBlockBytes(
    KvCodecKind kind, int64_t tokens, int64_t head_dim, int source_bytes,
    int64_t key_group = engine::kKeyGroupTokens,
    int64_t value_group = engine::kValueGroupChannels) {
  const int64_t elements = tokens * head_dim;
  int64_t payload = 0;
  switch (kind) {
    case KvCodecKind::kBf16:
      payload = 2 * elements * source_bytes;
      break;
    case KvCodecKind::kFp8E4M3:
      payload = 2 * head_dim + 2 * tokens + 2 * elements;
      break;
    case KvCodecKind::kInt8:
    case KvCodecKind::kInt4: {
      const int64_t params = 4 * ((tokens + key_group - 1) / key_group) * head_dim +
                             4 * tokens * ((head_dim + value_group - 1) / value_group);
      payload = params + 2 * (kind == KvCodecKind::kInt8 ? elements : (elements + 1) / 2);
      break;
    }
  }
  return engine::kBlockHeaderBytes + static_cast<size_t>(payload);
}

// Shared memory of EncodeKvBlock: the block (rounded to 16 bytes) and the
// CRC scratch. cache_bytes: 2 for a bf16 cache, 1 for fp8.
STRATA_HOST_DEVICE constexpr size_t KvCodecSmemBytes(KvCodecKind kind, int tokens, int head_dim,
                                                     int cache_bytes = 2) {
  return KvRoundUp16(KvBlockBytes(kind, tokens, head_dim, cache_bytes)) + kKvCrcScratchBytes;
}

// The largest block, any codec, of kKvCodecMaxTokens x head_dim from a 2-byte
// source (the raw codec's from head_dim 3 on; below, int8's per-token value
// parameters weigh more).
STRATA_HOST_DEVICE constexpr size_t KvDecodeMaxBlockBytes(int head_dim) {
  size_t most = 0;
  for (int kind = 0; kind <= static_cast<int>(KvCodecKind::kInt4); ++kind) {
    const size_t bytes =
        KvBlockBytes(static_cast<KvCodecKind>(kind), kKvCodecMaxTokens, head_dim, 2);
    if (bytes > most) most = bytes;
  }
  return most;
}

// Shared memory DecodeKvBlock uses by default (smem_bytes = 0): any block up
// to KvDecodeMaxBlockBytes(head_dim), plus the CRC scratch.
STRATA_HOST_DEVICE constexpr size_t KvDecodeSmemBytes(int head_dim) {
  return KvRoundUp16(KvDecodeMaxBlockBytes(head_dim)) + kKvCrcScratchBytes;
}

// ---- Encode: paged cache -> blocks -------------------------------------------

struct EncodeKvJob {
  int32_t table_row;      // the sequence's row of block_table
  int32_t head;           // KV head
  int32_t first_logical;  // first token (logical index in the sequence)
  int32_t tokens;         // in [1, params.max_tokens]
  int64_t out_offset;     // bytes from out_base; any alignment (16 is fastest)
};
static_assert(sizeof(EncodeKvJob) == 24);

struct EncodeKvBlocksParams {
  KvCodecKind codec = KvCodecKind::kBf16;
  // [num_pages, page_size, num_kv_heads, head_dim], bf16 or (kv_fp8) fp8 e4m3;
  // the block's source dtype is the cache's.
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  bool kv_fp8 = false;
  const int32_t* block_table = nullptr;  // [rows, max_blocks_per_seq] (device)
  int max_blocks_per_seq = 0;
  int page_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;                   // [1, 1024], within the shared memory limit below
  const EncodeKvJob* jobs = nullptr;  // device
  int num_jobs = 0;
  // Upper bound of the jobs' tokens: sizes the shared memory,
  // KvCodecSmemBytes(codec, max_tokens, head_dim, cache bytes), which must
  // fit the device's opt-in limit (227 KiB on an H100).
  int max_tokens = kKvCodecMaxTokens;
  // Job j writes KvBlockBytes(codec, tokens, head_dim, cache bytes) bytes at
  // out_base + out_offset: device memory or mapped host memory.
  uint8_t* out_base = nullptr;
  // Optional [num_jobs]: the block's size in bytes, or kBadJob (a job with
  // tokens outside [1, max_tokens], a head outside the cache or a negative
  // row, token or offset; it writes nothing).
  int32_t* status = nullptr;
};
// One CTA per job. cudaErrorInvalidValue for bad params (null pointers, a
// codec outside KvCodecKind, sizes out of range, shared memory beyond the
// device's limit).
cudaError_t LaunchEncodeKvBlocks(const EncodeKvBlocksParams& params, cudaStream_t stream);

// ---- Decode: blocks -> plain rows --------------------------------------------

struct DecodeKvJob {
  int64_t in_offset;    // bytes from in_base (16-byte aligned is fastest)
  int64_t in_capacity;  // bytes readable there; the block may be shorter
  int64_t out_row;      // first output row
};
static_assert(sizeof(DecodeKvJob) == 24);

struct DecodeKvBlocksParams {
  const uint8_t* in_base = nullptr;   // device memory or mapped host memory
  const DecodeKvJob* jobs = nullptr;  // device
  int num_jobs = 0;
  int head_dim = 0;  // every block must have it (else kWrongHeadDim)
  // [out_rows, head_dim] row-major each, bf16 or (out_fp8) fp8 e4m3. Job j
  // writes rows [out_row, out_row + min(tokens, out_rows - out_row)).
  void* k_out = nullptr;
  void* v_out = nullptr;
  bool out_fp8 = false;
  int64_t out_rows = 0;
  // [num_jobs]: the block's token count, or a KvBlockError.
  int32_t* status = nullptr;
};
// One CTA per job, KvDecodeSmemBytes(head_dim) of shared memory.
// cudaErrorInvalidValue for bad params.
cudaError_t LaunchDecodeKvBlocks(const DecodeKvBlocksParams& params, cudaStream_t stream);

// ---- Pages to and from host memory, a block per (layer, page, KV head) --------

// One block: the first `tokens` tokens of page `page` of one layer's caches
// ([pages, page_size, num_kv_heads, head_dim]), head `head`, coded at host
// bytes [host_offset, host_offset + bytes) (encode: exactly the block's
// size; decode: bytes readable).
struct PageBlockJob {
  const void* k_cache;  // the layer's caches (device)
  const void* v_cache;
  int32_t page;
  int32_t head;
  int32_t tokens;
  int32_t unused;
  int64_t host_offset;
  int64_t bytes;
};
static_assert(sizeof(PageBlockJob) == 48);

struct PageBlocksParams {
  KvCodecKind codec = KvCodecKind::kBf16;  // encode only (decode reads the header)
  bool kv_fp8 = false;                     // the caches hold fp8 e4m3 (else bf16)
  int page_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  const PageBlockJob* jobs = nullptr;  // device or mapped host memory
  int num_jobs = 0;
  uint8_t* host = nullptr;  // mapped host memory: encode writes, decode reads
  // [num_jobs]: encode: the block's bytes; decode: its tokens; or a
  // KvBlockError (kBadJob for a job outside the params).
  int32_t* status = nullptr;
};
// One CTA per job; at most kKvCodecMaxTokens tokens per job.
// cudaErrorInvalidValue for bad params.
cudaError_t LaunchEncodePageBlocks(const PageBlocksParams& params, cudaStream_t stream);
// Decodes into the caches (k_cache / v_cache of each job, written through).
cudaError_t LaunchDecodePageBlocks(const PageBlocksParams& params, cudaStream_t stream);

// ---- CRC32C of device rows -----------------------------------------------------

// One row to checksum: `bytes` bytes at `data` (device memory).
struct Crc32cRow {
  const uint8_t* data;
  int64_t bytes;
};

// crcs[j] = strata::Crc32c(rows[j].data, rows[j].bytes) for j < num_rows,
// one CTA per row. `rows` and `crcs` may be mapped host memory.
// cudaErrorInvalidValue for bad params.
cudaError_t LaunchRowCrc32c(const Crc32cRow* rows, int num_rows, uint32_t* crcs,
                            cudaStream_t stream);

// ---- CRC32C (tests) ------------------------------------------------------------

struct Crc32cJob {
  int64_t offset;  // bytes from base
  int64_t bytes;
  uint32_t crc_in;  // the CRC to extend (0 starts a new one)
  uint32_t unused;
};

// crcs[j] = strata::Crc32cExtend(jobs[j].crc_in, base + offset, bytes),
// computed by BlockCrc32cExtend from global memory, or (from_shared) after
// staging the bytes in shared memory (then bytes <= 64 KiB).
cudaError_t LaunchBlockCrc32c(const uint8_t* base, const Crc32cJob* jobs, int num_jobs,
                              bool from_shared, uint32_t* crcs, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_KV_CODEC_H_
