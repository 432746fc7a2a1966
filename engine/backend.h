// engine::Backend: the operator set the transformer forward pass needs.
//
// The forward pass (engine/model.h) is written once against this interface;
// the CPU reference backend (engine/cpu_backend.h, fp32) and the CUDA backend
// (cuda/cuda_backend.h, bf16 with fp32 accumulation) implement it.
//
// Conventions shared by every operator:
//  - Tensors are row-major and contiguous; shapes are checked and a mismatch
//    returns InvalidArgument naming the operator and the shapes.
//  - Activations and weights use activation_dtype(); token ids, positions,
//    slots and tables are kI32; rope inverse frequencies are kF32.
//  - Operators are enqueued in order on the backend's single stream and may
//    run asynchronously; CopyToHost and Synchronize wait for completion.
//  - Linear weights keep the Hugging Face layout [out_features, in_features].
//  - The fused projections keep their parts side by side in each row:
//      qkv row = [q heads (Hq*D) | k heads (Hkv*D) | v heads (Hkv*D)]
//      gate_up row = [gate (I) | up (I)]
//
// Thread-safety: a Backend instance is used by one thread at a time.
#ifndef STRATA_ENGINE_BACKEND_H_
#define STRATA_ENGINE_BACKEND_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/kv_codec.h"
#include "engine/sampler.h"
#include "engine/tensor.h"

namespace strata::engine {

// Head geometry of a fused qkv activation.
struct QkvLayout {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int64_t row_width() const { return int64_t{num_q_heads + 2 * num_kv_heads} * head_dim; }
};

// Describes one forward step's tokens for paged attention.
//
// The step's T tokens are grouped by sequence: sequence s owns query rows
// [query_start[s], query_start[s+1]). Its KV cache holds context_len[s]
// tokens once this step's keys are written (so the query token at local index
// j has position context_len[s] - q_len + j and attends to cache positions
// [max(0, pos - sliding_window + 1), pos]). Position p of sequence s lives in
// page block_table[s * max_blocks_per_seq + p / page_size] at offset
// p % page_size.
//
// The device tensors are built by the caller (engine/batch.h); the host
// copies size the launches without a device round trip.
struct AttentionBatch {
  Tensor query_start;  // kI32 [S + 1] (device)
  Tensor context_len;  // kI32 [S] (device)
  Tensor block_table;  // kI32 [S, max_blocks_per_seq] (device)
  int num_seqs = 0;
  int max_blocks_per_seq = 0;
  int max_query_len = 0;    // host copy: largest q_len in this step
  int max_context_len = 0;  // host copy: largest context_len in this step
  int page_size = 0;
  std::vector<int32_t> host_query_start;  // host copy of query_start
  std::vector<int32_t> host_context_len;  // host copy of context_len
  // With two page groups (engine/kv_memory.h), the upper layers' block table
  // [S, max_blocks_per_seq]; undefined with one. Kernels read block_table
  // only: UpperLayers() gives the batch the upper layers see.
  Tensor upper_block_table;
  AttentionBatch UpperLayers() const {
    AttentionBatch upper = *this;
    upper.block_table = upper_block_table;
    upper.upper_block_table = Tensor();
    return upper;
  }
};

// Host memory for the KV tiers (Backend::AllocateHost). On the CUDA backend
// it is pinned and mapped into the device's address space, so copies run at
// the bus's full rate and kernels may read it directly; on the CPU backend it
// is ordinary aligned memory. Freed when the last copy of `storage` goes.
struct HostBuffer {
  std::shared_ptr<void> storage;
  size_t bytes = 0;
  bool defined() const { return storage != nullptr; }
  uint8_t* data() const { return static_cast<uint8_t*>(storage.get()); }
};

// ---- Sparse decoding ------------------------------------------------------
//
// KV policies (kvtier/kv_policy.h) make a decode step attend to a subset of a
// sequence's cached tokens. They address tokens by LOGICAL INDEX: index i of
// sequence s lives at slot block_table[s][i / page_size] * page_size +
// i % page_size. Before any clustering the logical index is the position;
// ClusterKeys then reorders a range per KV head so each cluster's tokens
// are contiguous (positions are baked into the keys by RoPE, and every
// cached token precedes the decode query, so attention does not depend on
// where a key sits).
//
// A policy summarises blocks of tokens (clusters or Quest pages) into
// per-sequence pools owned by the policy, indexed by a pool slot:
//   summaries: activation dtype [slots, Hkv, max_blocks, D]
//   extents:   kI32 [slots, Hkv, max_blocks, 2] = (first logical index, size)

// What Backend::ClusterKeys does with the clustered K and V rows.
enum class ClusterRows {
  kReorder,  // reorders them cluster-major in the cache
  kLeave,    // leaves them: only the order that would do it is returned
};

// Columns of SparsePlan::entries: one row per planned decode query.
enum SparsePlanField : int {
  kPlanRow = 0,         // the query's row in qkv and out
  kPlanSeq = 1,         // its sequence in the AttentionBatch (block-table row)
  kPlanSlot = 2,        // its pool slot (summaries, extents)
  kPlanNumBlocks = 3,   // blocks in its pools, <= max_blocks
  kPlanBudget = 4,      // tokens selected from the blocks
  kPlanSinkEnd = 5,     // logical [0, sink_end) is always attended
  kPlanTailBegin = 6,   // logical [tail_begin, context_len) is always attended
  kPlanContextLen = 7,  // cached tokens including the query's own
  kSparsePlanFields = 8,
};

// The sparse decode queries of one layer. Entries are built on the host and
// copied once per step; key_index / key_count are filled on the device by
// SelectTokens and read by SparseAttention, so a step needs no host round
// trip.
struct SparsePlan {
  Tensor entries;                     // kI32 [P, kSparsePlanFields] (device)
  std::vector<int32_t> host_entries;  // host copy of entries
  int num_entries = 0;                // P
  int max_blocks = 0;                 // block stride of scores, summaries, extents
  int max_keys = 0;                   // key stride of key_index
  // An upper bound of every entry's num_blocks that the backends size their
  // launches by (0: the largest num_blocks of the entries). A planner whose
  // steps replay from recorded graphs rounds it up, so that launches keep
  // their shape while blocks are appended.
  int num_blocks_bound = 0;
  Tensor key_index;  // kI32 [>= P, Hkv, max_keys]: logical indices
  Tensor key_count;  // kI32 [>= P, Hkv]

  int32_t host(int entry, SparsePlanField field) const {
    return host_entries[static_cast<size_t>(entry) * kSparsePlanFields + field];
  }
};

// Checks a plan against the batch and the cache before any kernel reads it:
// rows, sequences and slots in range, 0 <= sink_end <= tail_begin <
// context_len == the sequence's context, num_blocks <= max_blocks, and
// sink_end + min(budget, tail_begin - sink_end) + (context_len - tail_begin)
// <= max_keys (blocks hold tokens of [sink_end, tail_begin) only).
absl::Status ValidateSparsePlan(const SparsePlan& plan, const AttentionBatch& batch,
                                int64_t num_rows, int num_slots, int num_kv_heads);

// How block scores are computed (ScoreBlocks).
enum class BlockScoring {
  // ClusterKV: sum over the KV group's query heads of q . centroid.
  kCentroid,
  // Quest: sum over the group of sum_d max(q[d] * lo[d], q[d] * hi[d]), an
  // upper bound of q . k over the block's keys.
  kKeyBounds,
};

// One sequence's token range, for the per-sequence summary operators.
struct SequenceRange {
  Tensor block_table;  // kI32 [>= ceil((begin + count) / page_size)] (device)
  int page_size = 0;
  int begin = 0;  // first logical index
  int count = 0;  // tokens
};

// ---- Tiered sparse decoding --------------------------------------------------
//
// A sparse sequence's blocks may have their home in host memory instead of
// the paged cache ("host-homed"). OffloadBlocks encodes a layer's new blocks
// there as KV blocks (engine/kv_codec.h) of at most kKvPieceTokens tokens
// each ("pieces", stored at kKvHostUnit-aligned offsets), and a decode
// step's RecallBlocks brings the host-homed blocks the step selected into a
// ring of GPU cache slots, rewriting their key_index entries to those slots
// (KvCacheSlotIndex), so SparseAttention reads them there without any host
// round trip. The ring is ring_rows slots of pages of the paged caches that
// the planner reserved for the sequence: the same pages in every layer, each
// KV head using its own part of every slot.
//
// Ring positions grow without bound; position p is slot
// ring_pages[(p % ring_rows) / page_size] * page_size + p % page_size. A
// block is resident when its res_count tokens, written from ring position
// res_start, have not been overwritten (res_start >= ring_head - ring_rows).
// Recall of one (entry, KV head), with T the tokens this step takes from
// host-homed blocks (T <= budget, ring_rows >= 2 * budget):
//  1. a selected block with enough resident tokens at positions >= head + T
//     - ring_rows stays where it is (a hit);
//  2. other resident blocks, in ascending res_start, are copied to the head
//     (a refresh: they would be overwritten by this step's writes);
//  3. the rest are decoded from their host pieces to the head (a miss);
// so the ring keeps blocks by recency of selection (least recently selected
// first out). Misses take their positions in selection order; a piece that
// fails its checks (header, CRC) sets a bit in the entry's slot's status and
// leaves its block not resident, and the step's token for that sequence
// must not be used (its keys may read rows that were never written).
inline constexpr int kKvPieceTokens = 64;
inline constexpr int64_t kKvHostUnit = 64;

// A host-homed piece may also live below host memory (on the SSD tier):
// its piece_host entry is then kPieceBelowHost, and a recall that misses
// it asks the ring's fetcher (TierRing::fetcher) to bring it into the host
// buffer first, waiting for it (a hard miss). Without a fetcher such a
// piece fails like a bad one.
inline constexpr int32_t kPieceBelowHost = -1;

// Brings pieces that live below host memory into the ring's host buffer
// during RecallBlocks (implemented by the tier below, kvtier's
// ClusterSpill). Called on the CPU backend inline, and on CUDA from a host
// callback of the recall's stream, once per layer that misses such pieces,
// so it must not call CUDA and the stream waits until it returns. Calls
// through one fetcher never overlap; a read-ahead recall (TierRing::
// list_only) names a fetcher of its own, which may be called beside them.
class PieceFetcher {
 public:
  struct Piece {
    int32_t slot = 0;  // pool slot of the sequence (TierTables rows)
    int32_t head = 0;  // KV head
    int32_t piece = 0;
  };
  virtual ~PieceFetcher() = default;
  // Sets offsets[i] to the byte offset into the ring's host buffer where
  // pieces[i]'s encoded block now is, or -1 when it cannot be had (not
  // stored, failed its check): RecallBlocks then treats it as a bad piece.
  // The bytes stay there until the next call.
  virtual void Fetch(int layer, std::span<const Piece> pieces, std::span<int64_t> offsets) = 0;
};

// key_index values: >= 0 a logical index (paged cache), <= -2 a physical
// cache slot.
inline constexpr int32_t KvCacheSlotIndex(int64_t slot) { return static_cast<int32_t>(-2 - slot); }

// Recall status bits (TierRing::status; RecallBlocks only sets them).
enum KvRecallStatus : int32_t {
  kRecallOk = 0,
  kRecallBadBlock = 1,      // a piece failed its header or CRC check
  kRecallRingTooSmall = 2,  // the selection does not fit the ring
};

// Statistics RecallBlocks accumulates (TierRing::stats, I32, added to).
enum KvTierStat : int {
  kStatHitTokens = 0,        // selected host-homed tokens found resident
  kStatRefreshedTokens = 1,  // ... resident but copied ahead of the writes
  kStatRecalledTokens = 2,   // ... decoded from host memory
  kStatRecalledPieces = 3,
  kStatRecalledKiB = 4,  // host bytes read, KiB (rounded up per piece)
  kStatBadPieces = 5,
  // Microseconds the recall took on the device (or the CPU), from the start
  // of its planning to its last piece decoded, summed over its calls.
  kStatRecallMicros = 6,
  kKvTierStats = 7,
};

// One layer's tiering tables (device tensors, I32), by pool slot.
struct TierTables {
  Tensor piece_base;   // [slots, Hkv, max_blocks]: the block's first piece; -1 paged-cache home
  Tensor piece_host;   // [slots, Hkv, max_pieces]: the piece's host offset in kKvHostUnit units
  Tensor piece_count;  // [slots, Hkv]: pieces used
  Tensor res_start;    // [slots, Hkv, max_blocks]: ring position of the resident tokens
  Tensor res_count;    // [slots, Hkv, max_blocks]: tokens resident (0: none)
  Tensor ring_head;    // [slots, Hkv]: the next ring position to write
  int layer = 0;       // the layer these tables are for (PieceFetcher::Fetch)
};

// What every layer shares.
struct TierRing {
  Tensor ring_pages;  // I32 [slots, ring_rows / page_size]
  int ring_rows = 0;  // a multiple of the page size
  Tensor status;      // I32 [slots]: KvRecallStatus bits RecallBlocks set (cleared by the caller)
  Tensor stats;       // I32 [kKvTierStats], added to by RecallBlocks
  HostBuffer host;    // where the pieces are
  // Where pieces below host memory come from; null: there are none (a
  // kPieceBelowHost entry is then a bad piece).
  PieceFetcher* fetcher = nullptr;
  // Read ahead only (a guessed selection's recall on the side stream, with
  // a fetcher that starts reads and answers at once): RecallBlocks hands
  // the fetcher the selection's missed pieces below host memory, ignores
  // its answers, and changes nothing else (no ring row, table, key_index,
  // status or stat). Needs a fetcher.
  bool list_only = false;
};

// ---- Sampling --------------------------------------------------------------

// Columns of SamplingTable::params: one row per sampled logits row. Floats
// are stored as their IEEE bits.
enum SamplingField : int {
  kSampleTemperature = 0,  // float bits; 0: greedy
  kSampleTopK = 1,         // 0: all tokens
  kSampleTopP = 2,         // float bits, (0, 1]
  kSampleSeedLo = 3,       // low 32 bits of the seed
  kSampleSeedHi = 4,       // high 32 bits of the seed
  kSampleCounter = 5,      // the row's counter (tokens generated so far)
  kSamplingFields = 6,
};

// The per-row parameters of SampleTokens; built on the host and copied once
// per step. The host copy lets a backend validate them without a device
// round trip.
struct SamplingTable {
  Tensor params;                     // kI32 [>= R, kSamplingFields] (device)
  std::vector<int32_t> host_params;  // host copy: R rows
  int num_rows() const { return static_cast<int>(host_params.size() / kSamplingFields); }
  SamplingRow row(int r) const;
};

// The host rows of a SamplingTable for `rows`.
std::vector<int32_t> EncodeSamplingRows(std::span<const SamplingRow> rows);

// Checks SampleTokens' arguments: logits [R, V] of `logits_dtype`, V >= 1,
// the table's R rows with valid parameters (SamplingParams::Validate),
// token_ids kI32 [R], logprobs kF32 [R]. InvalidArgument naming `op`.
absl::Status ValidateSampleTokens(absl::string_view op, const Tensor& logits, DType logits_dtype,
                                  const SamplingTable& sampling, const Tensor& token_ids,
                                  const Tensor& logprobs);

// ---- Host memory and KV movement ---------------------------------------------

// One row (along the first dimension: one page of a paged cache) of
// tensors[tensor] and the host bytes [host_offset, host_offset + row bytes)
// of a HostBuffer, where row bytes = nbytes() / dim(0).
struct RowCopy {
  int32_t tensor = 0;
  int64_t row = 0;
  int64_t host_offset = 0;
};

// A point in a backend's copy stream, done once every copy enqueued before
// it has finished. kFenceDone is done from the start.
using CopyFence = int64_t;
inline constexpr CopyFence kFenceDone = 0;

// Host units a head's pieces of `count` tokens in at most `clusters`
// blocks take with `codec` (each piece of at most kKvPieceTokens tokens,
// kKvHostUnit-aligned): what OffloadBlocks needs per head.
int64_t KvPieceUnitsBound(KvCodecKind codec, int head_dim, DType source, int64_t count,
                          int64_t clusters);

// Checks OffloadBlocks' arguments before any kernel reads them (the caches'
// dtype is each backend's to check): extents and tables one slot's, the
// blocks inside the extents, the host region inside the host buffer and
// addressable in int32 units. InvalidArgument naming `op`.
absl::Status ValidateOffloadBlocks(absl::string_view op, const Tensor& k_cache,
                                   const Tensor& extents, int first_block, int num_blocks,
                                   int block_stride, const HostBuffer& host, int64_t region_unit,
                                   int64_t units_per_head, const TierTables& slot_tables);
// The same for RecallBlocks: extents and tables of every slot, a ring of
// whole pages, status per slot, the stats, the host buffer.
absl::Status ValidateRecallBlocks(absl::string_view op, const Tensor& k_cache,
                                  const SparsePlan& plan, const Tensor& extents,
                                  const TierTables& tables, const TierRing& ring);

// Checks RowCopy lists before any byte moves: tensors defined with rows of
// equal size within a tensor, rows and host ranges in bounds. InvalidArgument
// naming `op` and the offending copy.
absl::Status ValidateRowCopies(absl::string_view op, std::span<const Tensor> tensors,
                               std::span<const RowCopy> rows, const HostBuffer& host);
// The same for ChecksumRows (host offsets unused), and one CRC per row.
absl::Status ValidateChecksumRows(absl::string_view op, std::span<const Tensor> tensors,
                                  std::span<const RowCopy> rows, std::span<const uint32_t> crcs);

// One (page, KV head) block of one layer's paged caches, coded with a KV
// block codec (engine/kv_codec.h) in host memory: the first `tokens` tokens
// of row `page` of k_caches[layer] and v_caches[layer] ([pages, page_size,
// kv_heads, head_dim] each), head `head`, as one KvCodec block at host
// bytes [host_offset, host_offset + bytes). Encoding writes exactly
// KvCodec::EncodedBytes(tokens, head_dim, cache dtype) bytes, which `bytes`
// must equal; decoding reads at most `bytes`. KV pages travel between
// workers this way (Backend::EncodeBlocksToHost / DecodeBlocksFromHost).
struct KvBlockCopy {
  int32_t layer = 0;
  int32_t page = 0;
  int32_t head = 0;
  int32_t tokens = 0;
  int64_t host_offset = 0;
  int64_t bytes = 0;
};

// Checks KvBlockCopy lists: caches of equal count and rank 4, each block's
// layer, page, head and tokens inside them, its host range inside the host
// buffer. InvalidArgument naming `op` and the offending block.
absl::Status ValidateKvBlockCopies(absl::string_view op, std::span<const Tensor> k_caches,
                                   std::span<const Tensor> v_caches,
                                   std::span<const KvBlockCopy> blocks, const HostBuffer& host);

// Device time spent in one operator over a span of work
// (Backend::TakeOpTimes).
struct OpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string_view name() const = 0;
  // The dtype of weights, activations and the KV cache on this backend.
  virtual DType activation_dtype() const = 0;

  // ---- Memory -------------------------------------------------------------
  // Allocates an uninitialised tensor in this backend's memory.
  virtual absl::StatusOr<Tensor> Allocate(DType dtype, std::vector<int64_t> shape) = 0;
  // Copies `count` host elements of `src_dtype` into dst starting at element
  // `dst_offset`, converting to dst's dtype (F32/F16/BF16 -> F32/BF16; I32 ->
  // I32 only). The host buffer may be reused once this returns.
  virtual absl::Status CopyFromHost(const void* src, DType src_dtype, int64_t count, Tensor& dst,
                                    int64_t dst_offset) = 0;
  // Copies the whole tensor to host memory as fp32 (I32 tensors are copied
  // as int32). Waits for preceding work.
  virtual absl::Status CopyToHost(const Tensor& src, void* dst) = 0;
  // Fills with uniform values in [-scale, scale] from a counter-based hash of
  // (seed, element index), so a result does not depend on the backend's
  // thread or block layout: both backends produce the same values up to the
  // rounding of their dtype.
  virtual absl::Status FillRandom(Tensor& t, uint64_t seed, float scale) = 0;
  virtual absl::Status Fill(Tensor& t, float value) = 0;
  // Waits for all enqueued work; reports asynchronous errors.
  virtual absl::Status Synchronize() = 0;

  // ---- Host memory and KV movement -----------------------------------------
  // Copies run on a copy stream of their own, so they overlap the compute
  // stream's work; fences order the two where the data demands it.
  //
  // Allocates host memory for the KV tiers (see HostBuffer).
  virtual absl::StatusOr<HostBuffer> AllocateHost(size_t bytes) = 0;
  // Enqueues copies of device rows to host memory (CopyRowsToHost) or back
  // (CopyRowsFromHost). They start after the work enqueued on the compute
  // stream so far: a copy to the host sees every write before it, a copy to
  // the device lands after every read of the rows' old contents. The host
  // buffer and the tensors must stay alive until the returned fence is done;
  // a copy to the device is seen by compute work only after
  // ComputeAfterFence. Arguments are checked first (ValidateRowCopies).
  virtual absl::StatusOr<CopyFence> CopyRowsToHost(std::span<const Tensor> tensors,
                                                   std::span<const RowCopy> rows,
                                                   const HostBuffer& host) = 0;
  virtual absl::StatusOr<CopyFence> CopyRowsFromHost(const HostBuffer& host,
                                                     std::span<const RowCopy> rows,
                                                     std::span<const Tensor> tensors) = 0;
  // Whether the fence is done, without waiting; reports copy errors.
  virtual absl::StatusOr<bool> FenceDone(CopyFence fence) = 0;
  // Blocks the calling thread until the fence is done.
  virtual absl::Status WaitFence(CopyFence fence) = 0;
  // Compute work enqueued from now on starts after the fence (the host does
  // not wait).
  virtual absl::Status ComputeAfterFence(CopyFence fence) = 0;
  // The CRC32C (common/crc32c.h) of each device row that `rows` names (its
  // tensor and row; host offsets unused) into crcs[i], computed once every
  // copy enqueued so far has landed; blocks until they are known. KV read up
  // from the host tier is checked where it landed, at device memory speed,
  // instead of in host memory before its copy (gigabytes for a long prompt,
  // which the host's cores check slower than the bus copies them).
  // Arguments are checked first (ValidateChecksumRows).
  virtual absl::Status ChecksumRows(std::span<const Tensor> tensors, std::span<const RowCopy> rows,
                                    std::span<uint32_t> crcs) = 0;
  // Encodes blocks of the paged caches with `codec` into host memory (what
  // a prefill worker sends: a quarter to a half of the raw bytes). It
  // starts after the compute enqueued so far, like CopyRowsToHost; the host
  // bytes are written once the returned fence is done. The blocks' host
  // ranges must not overlap. Arguments are checked first
  // (ValidateKvBlockCopies; each block's bytes its encoded size).
  virtual absl::StatusOr<CopyFence> EncodeBlocksToHost(KvCodecKind codec,
                                                       std::span<const Tensor> k_caches,
                                                       std::span<const Tensor> v_caches,
                                                       std::span<const KvBlockCopy> blocks,
                                                       const HostBuffer& host) = 0;
  // Decodes blocks from host memory into the paged caches, after every
  // read of those rows enqueued so far; compute enqueued afterwards sees
  // them. Waits until they are decoded: DataLoss naming the first block
  // that fails its check (a CRC, a header that is not the block asked for:
  // another head_dim or token count), after which the rows of any block may
  // hold anything. Arguments are checked first (ValidateKvBlockCopies).
  virtual absl::Status DecodeBlocksFromHost(const HostBuffer& host,
                                            std::span<const KvBlockCopy> blocks,
                                            std::span<const Tensor> k_caches,
                                            std::span<const Tensor> v_caches) = 0;

  // ---- Side work ----------------------------------------------------------
  // Work that may run beside the operators enqueued after it (the KV
  // policies recall a later layer's clusters while this layer computes).
  // Operators called between BeginSideWork and EndSideWork go to a side
  // queue, ordered after all work enqueued before BeginSideWork;
  // JoinSideWork orders the work enqueued after it after that side work.
  // Until the join, side work must not write what later main-queue work
  // reads or writes, nor read what it writes. Graph captures record both
  // queues (EndCapture and Synchronize join first). Backends with one queue
  // (the CPU) run side work in line: the calls then do nothing.
  virtual absl::Status BeginSideWork() { return absl::OkStatus(); }
  virtual absl::Status EndSideWork() { return absl::OkStatus(); }
  virtual absl::Status JoinSideWork() { return absl::OkStatus(); }

  // ---- Profiling ----------------------------------------------------------
  // While enabled, the backend records each operator's device time (the CUDA
  // backend with timing events; backends that cannot time record nothing).
  // TakeOpTimes waits for enqueued work and returns the per-operator totals
  // since the previous call. Timing adds a little host work per operator.
  virtual void SetOpTiming(bool /*enabled*/) {}
  virtual absl::StatusOr<std::vector<OpTime>> TakeOpTimes() { return std::vector<OpTime>(); }

  // ---- Graphs -------------------------------------------------------------
  // Between BeginCapture and EndCapture the operators are recorded into a
  // graph instead of running; EndCapture returns its id, and ReplayGraph
  // enqueues the whole recording at once, as one launch (the CUDA backend:
  // CUDA graphs). A replay uses exactly the tensors, shapes and launch
  // choices of the recording; only the contents of the tensors may differ.
  // While capturing, copies to or from the host, Synchronize and
  // allocations fail, as do operators that would need one (e.g. a larger
  // workspace): the caller then abandons the capture with EndCapture and
  // runs the step directly. ReplayGraph returns FailedPrecondition when it
  // cannot replay now (the CUDA backend: while op timing is on). Backends
  // without graphs return Unimplemented, and say so in SupportsGraphs.
  virtual bool SupportsGraphs() const { return false; }
  virtual absl::Status BeginCapture() {
    return absl::UnimplementedError(std::string(name()) + " backend has no graphs");
  }
  virtual absl::StatusOr<int> EndCapture() {
    return absl::UnimplementedError(std::string(name()) + " backend has no graphs");
  }
  virtual absl::Status ReplayGraph(int /*graph*/) {
    return absl::UnimplementedError(std::string(name()) + " backend has no graphs");
  }
  // Frees a recording once the work enqueued so far is done with it; its id
  // is not reused, and replaying it is InvalidArgument.
  virtual absl::Status ReleaseGraph(int /*graph*/) {
    return absl::UnimplementedError(std::string(name()) + " backend has no graphs");
  }

  // ---- Operators ----------------------------------------------------------
  // out[i, :] = table[ids[i], :]. table [V, H], ids kI32 [T], out [T, H].
  // Ids outside [0, V) are an error (checked by the caller on the host).
  virtual absl::Status Gather(const Tensor& table, const Tensor& ids, Tensor& out) = 0;
  // out = x / rms(x) * weight, per row. x, out [T, H]; weight [H].
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // residual += x; out = RmsNorm(residual). All [T, H].
  virtual absl::Status AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& weight,
                                  float eps, Tensor& out) = 0;
  // out[T, N] = x[T, K] . weight[N, K]^T (+ bias[N] if bias is defined).
  virtual absl::Status Linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                              Tensor& out) = 0;
  // Rotates the q and k heads of qkv [T, row_width] in place, rotate-half
  // (GPT-NeoX / Hugging Face Llama) convention: for i < D/2 with
  // angle = positions[t] * inv_freq[i]:
  //   x[i]       = x[i] cos - x[i + D/2] sin
  //   x[i + D/2] = x[i + D/2] cos + x[i] sin
  // positions kI32 [T]; inv_freq kF32 [D/2].
  virtual absl::Status Rope(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                            const Tensor& inv_freq) = 0;
  // out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]. gate_up [T, 2I], out [T, I].
  virtual absl::Status SiluMul(const Tensor& gate_up, Tensor& out) = 0;
  // Writes the k and v heads of qkv [T, row_width] into the paged caches
  // k_cache, v_cache [num_pages, page_size, Hkv, D] at slots[t] =
  // page * page_size + offset. slots kI32 [T].
  virtual absl::Status WriteKv(const Tensor& qkv, const QkvLayout& layout, const Tensor& slots,
                               Tensor& k_cache, Tensor& v_cache) = 0;
  // Rope, then WriteKv of the rotated keys: one operator, so a backend can
  // fuse the two (the CUDA backend does); by default it runs both.
  virtual absl::Status RopeWriteKv(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                                   const Tensor& inv_freq, const Tensor& slots, Tensor& k_cache,
                                   Tensor& v_cache) {
    if (absl::Status s = Rope(qkv, layout, positions, inv_freq); !s.ok()) return s;
    return WriteKv(qkv, layout, slots, k_cache, v_cache);
  }
  // Causal paged attention for a mixed batch of prefill chunks and decode
  // tokens (see AttentionBatch). Query head h reads KV head
  // h / (Hq / Hkv). out [T, Hq * D]. sliding_window <= 0 means unlimited.
  virtual absl::Status Attention(const Tensor& qkv, const QkvLayout& layout, const Tensor& k_cache,
                                 const Tensor& v_cache, const AttentionBatch& batch, float scale,
                                 int sliding_window, Tensor& out) = 0;

  // ---- Sparse decoding (see SparsePlan) -------------------------------------
  // ClusterKV's k-means over range.count keys of every KV head of one
  // sequence and layer, then the reordering. Per KV head, with x_t the keys
  // (fp32) of logical indices begin + t and C = num_clusters (1 <= C <= count):
  //   init: with c0 = ceil(C / 2), c_j = x_{floor(j * count / c0)} for j <
  //     c0, and c_{c0..C-1} = the C - c0 other keys of lowest max_{j<c0}
  //     cos(x_t, c_j), compared in SeedSimilarityBucket buckets (ties to the
  //     lower t), in ascending t (engine/kmeans.h: why);
  //   `iterations` times: assign each key to argmax_j cos(x_t, c_j) (a zero
  //     vector has similarity 0; ties go to the lowest j), then c_j = the
  //     mean of its RAW keys (an empty cluster keeps its centroid).
  // Then the K and V rows of the range are reordered so that cluster 0's
  // tokens come first (ascending t), then cluster 1's, and so on; block
  // first_block + j of the pools gets centroid c_j and extent
  // (begin + tokens of clusters < j, size of j).
  // centroids: activation dtype [Hkv, max_blocks, D]; extents: kI32
  // [Hkv, max_blocks, 2] (one pool slot). `order`, when not null, kI32
  // [Hkv, count], gets the reordering: logical index begin + i of head h
  // now holds the key that was at begin + order[h][i] (what ReorderKeys
  // takes to redo it on the same keys without the k-means). With
  // ClusterRows::kLeave the rows stay where they are and only `order` (then
  // required), the centroids and the extents are written: what the
  // reordering would be, for a worker that decodes from these keys
  // elsewhere (a prefill worker's export; the rows here serve other
  // readers as they are).
  virtual absl::Status ClusterKeys(Tensor& k_cache, Tensor& v_cache, const SequenceRange& range,
                                   int num_clusters, int iterations, int first_block,
                                   Tensor& centroids, Tensor& extents, Tensor* order,
                                   ClusterRows rows) = 0;
  // Reorders the K and V rows of the range per KV head as ClusterKeys did
  // when it returned `order` (kI32 [Hkv, count]), without clustering: a
  // stored prompt's clusters are reused so. `order` must hold a permutation
  // of [0, count) per head; the caller checks that (it comes from storage),
  // and a backend that cannot check it on the device keeps its reads inside
  // the range whatever it holds.
  virtual absl::Status ReorderKeys(Tensor& k_cache, Tensor& v_cache, const SequenceRange& range,
                                   const Tensor& order) = 0;
  // Quest's page summaries: block first_block + j covers logical indices
  // [begin + j * block_tokens, + block_tokens) (range.count is a multiple of
  // block_tokens); lo / hi [Hkv, max_blocks, D] get the per-channel min and
  // max of its keys and extents [Hkv, max_blocks, 2] its extent.
  virtual absl::Status KeyBounds(const Tensor& k_cache, const SequenceRange& range,
                                 int block_tokens, int first_block, Tensor& lo, Tensor& hi,
                                 Tensor& extents) = 0;
  // scores kF32 [P, Hkv, max_blocks]: for plan entries [entry_begin,
  // entry_end) and their blocks b < num_blocks, the score of block b of
  // their slot (summary_b is unused for kCentroid). Other blocks untouched.
  virtual absl::Status ScoreBlocks(const Tensor& qkv, const QkvLayout& layout,
                                   const SparsePlan& plan, int entry_begin, int entry_end,
                                   BlockScoring scoring, const Tensor& summary_a,
                                   const Tensor& summary_b, Tensor& scores) = 0;
  // Fills plan.key_index / key_count: per entry and KV head, the logical
  // indices [0, sink_end), then blocks in descending score (ties: lower
  // block) with their extents' indices in order until `budget` tokens (the
  // last block truncated to its first indices), then [tail_begin,
  // context_len). extents: kI32 [slots, Hkv, max_blocks, 2].
  virtual absl::Status SelectTokens(const Tensor& scores, const Tensor& extents,
                                    SparsePlan& plan) = 0;
  // Decode attention of each plan entry's query row over exactly the keys
  // plan.key_index names (no causal mask: every cached key precedes the
  // query). Query head h reads KV head h / (Hq / Hkv); writes the entries'
  // rows of out [T, Hq * D] only.
  virtual absl::Status SparseAttention(const Tensor& qkv, const QkvLayout& layout,
                                       const Tensor& k_cache, const Tensor& v_cache,
                                       const AttentionBatch& batch, const SparsePlan& plan,
                                       float scale, Tensor& out) = 0;

  // ---- Tiered sparse decoding (see TierTables) -------------------------------
  // Encodes blocks first_block, first_block + block_stride, ... below
  // first_block + num_blocks of one sequence and layer (extents: one slot,
  // [Hkv, max_blocks, 2]; their tokens in range's block table; the blocks
  // skipped keep their home) into `host` with `codec`, each head's pieces packed
  // from unit region_unit + h * units_per_head; sets their piece_base and
  // piece_host entries (one slot of each table) and advances piece_count.
  // InvalidArgument when a head's pieces would not fit its units (the
  // caller sizes them with KvPieceUnitsBound). Runs after the work before
  // it, like every operator; the host bytes are written when it completes.
  virtual absl::Status OffloadBlocks(const Tensor& k_cache, const Tensor& v_cache,
                                     const SequenceRange& range, const Tensor& extents,
                                     int first_block, int num_blocks, int block_stride,
                                     KvCodecKind codec, const HostBuffer& host, int64_t region_unit,
                                     int64_t units_per_head, TierTables& slot_tables) = 0;
  // Recalls the host-homed blocks each plan entry selected (SelectTokens
  // ran) into its ring and rewrites their key_index entries (see above).
  // extents and tables are the layer's (all slots); ring.status[slot] gets
  // the KvRecallStatus bits of each entry's slot and ring.stats the
  // KvTierStat counts added. No host round trip: replayable from graphs.
  virtual absl::Status RecallBlocks(Tensor& k_cache, Tensor& v_cache, const AttentionBatch& batch,
                                    SparsePlan& plan, const Tensor& extents, TierTables& tables,
                                    TierRing& ring) = 0;

  // ---- Sampling -------------------------------------------------------------
  // Samples one token per row of logits [R, V] (activation dtype) with the
  // row's parameters (engine/sampler.h gives the semantics):
  //  - temperature 0: the argmax, ties to the lowest id;
  //  - otherwise, with tokens ordered by descending logit (ties: lower id),
  //    the first top_k (0: all), then the shortest prefix of those whose
  //    mass reaches top_p of theirs, where a token's mass is
  //    sample_math::Weight((logit - max) / T) (exp in 2^-32 fixed point, so
  //    sums are exact); the token drawn is the kept token with the highest
  //    sample_math::Score (Gumbel-max over a counter-based hash of
  //    (seed, counter, id)), an exact draw from softmax(logits / T)
  //    renormalised over the kept set.
  // token_ids kI32 [R] gets the ids and logprobs kF32 [R] log_softmax(logits)
  // at them. Every backend returns the same ids for the same logits.
  virtual absl::Status SampleTokens(const Tensor& logits, const SamplingTable& sampling,
                                    Tensor& token_ids, Tensor& logprobs) = 0;
};

#if defined(__CUDACC__)
#define STRATA_HOST_DEVICE __host__ __device__
#else
#define STRATA_HOST_DEVICE
#endif

// Hash used by FillRandom: maps (seed, index) to a uniform float in [-1, 1).
// Host and device code share this definition, so the CPU and CUDA backends
// agree bit for bit before rounding to their dtype.
STRATA_HOST_DEVICE inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
STRATA_HOST_DEVICE inline float HashUniform(uint64_t seed, uint64_t index) {
  const uint64_t h = SplitMix64(seed * 0x100000001b3ULL ^ SplitMix64(index));
  // 24 random bits -> [0, 1) -> [-1, 1)
  return static_cast<float>(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

}  // namespace strata::engine

#endif  // STRATA_ENGINE_BACKEND_H_
