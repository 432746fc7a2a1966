#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/kernels/kv_codec.cuh"
#include "cuda/kernels/kv_select.h"
#include "cuda/kernels/kv_tier.h"
#include "engine/backend.h"

namespace strata::cuda::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPiece = engine::kKvPieceTokens;
constexpr int64_t kUnit = engine::kKvHostUnit;

__device__ __forceinline__ int64_t PieceUnits(KvCodecKind codec, int tokens, int head_dim,
                                              int cache_bytes) {
  return (static_cast<int64_t>(KvBlockBytes(codec, tokens, head_dim, cache_bytes)) + kUnit - 1) /
         kUnit;
}

// ---- Offload layout -------------------------------------------------------------

// One CTA per KV head: two passes over the offloaded blocks (every
// block_stride-th), the first summing pieces and units to check the head's
// room, the second writing the tables and jobs at exclusive prefix sums.
__global__ void __launch_bounds__(kThreads) OffloadLayoutKernel(OffloadLayoutParams p) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int64_t carry_pieces, carry_units;
  __shared__ bool fits;
  const int h = blockIdx.x;
  const int tid = threadIdx.x;
  const int32_t* ext = p.extents + static_cast<int64_t>(h) * p.max_blocks * 2;
  const int count0 = p.piece_count[h];
  const int selected = (p.num_blocks + p.block_stride - 1) / p.block_stride;
  EncodeKvJob* jobs = p.jobs + static_cast<int64_t>(h) * p.jobs_per_head;
  for (int j = tid; j < p.jobs_per_head; j += kThreads) jobs[j] = EncodeKvJob{0, h, 0, 0, 0};

  auto block_of = [&](int i) { return p.first_block + i * p.block_stride; };
  auto measure = [&](int i, int64_t& pieces, int64_t& units) {
    pieces = units = 0;
    if (i >= selected) return;
    const int size = ext[block_of(i) * 2 + 1];
    for (int off = 0; off < size; off += kPiece) {
      ++pieces;
      units += PieceUnits(p.codec, min(kPiece, size - off), p.head_dim, p.cache_bytes);
    }
  };
  for (int pass = 0; pass < 2; ++pass) {
    if (tid == 0) {
      carry_pieces = carry_units = 0;
    }
    __syncthreads();
    for (int chunk = 0; chunk < selected; chunk += kThreads) {
      const int i = chunk + tid;
      int64_t pieces, units;
      measure(i, pieces, units);
      int64_t piece_before, unit_before, piece_total, unit_total;
      Scan(scan).ExclusiveSum(pieces, piece_before, piece_total);
      __syncthreads();
      Scan(scan).ExclusiveSum(units, unit_before, unit_total);
      if (pass == 1 && i < selected) {
        const int b = block_of(i);
        const int first = ext[b * 2], size = ext[b * 2 + 1];
        int64_t piece = count0 + carry_pieces + piece_before;
        int64_t unit = p.region_unit + h * p.units_per_head + carry_units + unit_before;
        p.piece_base[static_cast<int64_t>(h) * p.max_blocks + b] = static_cast<int32_t>(piece);
        for (int off = 0; off < size; off += kPiece, ++piece) {
          const int n = min(kPiece, size - off);
          p.piece_host[static_cast<int64_t>(h) * p.max_pieces + piece] = static_cast<int32_t>(unit);
          jobs[piece - count0] = EncodeKvJob{0, h, first + off, n, unit * kUnit};
          unit += PieceUnits(p.codec, n, p.head_dim, p.cache_bytes);
        }
      }
      __syncthreads();
      if (tid == 0) {
        carry_pieces += piece_total;
        carry_units += unit_total;
      }
      __syncthreads();
    }
    if (pass == 0) {
      if (tid == 0) {
        fits = carry_units <= p.units_per_head && count0 + carry_pieces <= p.max_pieces &&
               carry_pieces <= p.jobs_per_head;
        if (!fits) atomicExch(p.overflow, 1);
      }
      __syncthreads();
      if (!fits) return;
    } else if (tid == 0) {
      p.piece_count[h] = static_cast<int32_t>(count0 + carry_pieces);
    }
  }
}

// ---- Recall -----------------------------------------------------------------------

// The workspace: this header, then the RecallJob list.
constexpr size_t kWsJobs = 0;          // int32: jobs listed
constexpr size_t kWsDone = 4;          // int32: decode CTAs done
constexpr size_t kWsStart = 8;         // uint64: the recall's start (globaltimer ns)
constexpr size_t kWsFetched = 16;      // int32: pieces put on the fetch list
constexpr size_t kWsHeaderBytes = 32;  // keeps the jobs 16-byte aligned

// RecallJob::fetched of a piece read where piece_host says, and of one
// below host memory that did not fit the fetch list.
constexpr int32_t kNotFetched = -1;
constexpr int32_t kFetchOverflow = -2;

// One missed piece: decode host piece `piece` of (slot, head) into ring
// positions [dst, dst + rows). `fetched`: its index in the fetch list, or
// kNotFetched / kFetchOverflow.
struct RecallJob {
  int32_t slot, head, block, piece, dst, rows, expect, fetched;
};
static_assert(sizeof(RecallJob) == 32);

template <typename T>
__device__ __forceinline__ T* WorkspaceAt(void* workspace, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

struct RecallSmem {
  int32_t* first;        // [max_num_blocks]: the blocks' first logical index
  int32_t* run_pos;      // [max_keys]: position of each run in the key list
  int32_t* run_block;    // [max_keys]
  int32_t* run_take;     // [max_keys]
  int32_t* run_class;    // [max_keys]: 0 stays (hit or paged), 1 refresh, 2 miss
  int32_t* run_start;    // [max_keys]: ring position after the step
  int32_t* order;        // [max_keys]: refreshes by ascending old position; then piece prefixes
  unsigned char* stage;  // refresh staging
};

__host__ __device__ size_t Align16(size_t n) { return (n + 15) & ~size_t{15}; }

__host__ __device__ size_t StageBytes(int head_dim) { return size_t{64} * head_dim * 2 * 2; }

__host__ __device__ size_t RecallSmemLayout(const RecallParams& p, unsigned char* base,
                                            RecallSmem* out) {
  size_t at = 0;
  auto take = [&](size_t bytes) {
    unsigned char* ptr = base + at;
    at += Align16(bytes);
    return ptr;
  };
  const size_t keys = static_cast<size_t>(p.max_keys) * 4;
  RecallSmem s;
  s.first = reinterpret_cast<int32_t*>(take(static_cast<size_t>(max(p.max_num_blocks, 1)) * 4));
  s.run_pos = reinterpret_cast<int32_t*>(take(keys));
  s.run_block = reinterpret_cast<int32_t*>(take(keys));
  s.run_take = reinterpret_cast<int32_t*>(take(keys));
  s.run_class = reinterpret_cast<int32_t*>(take(keys));
  s.run_start = reinterpret_cast<int32_t*>(take(keys));
  s.order = reinterpret_cast<int32_t*>(take(keys + 4));
  s.stage = take(StageBytes(p.head_dim));
  if (out != nullptr) *out = s;
  return at;
}

// Jobs one (entry, head) list can add: a piece per run at most, plus one per
// 64 selected tokens.
__host__ __device__ int64_t JobsPerList(int max_keys) { return max_keys + max_keys / 64 + 1; }

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ int64_t RingSlot(const int32_t* ring_pages, int ring_rows, int page_size,
                                            int32_t pos) {
  const int r = pos % ring_rows;
  return static_cast<int64_t>(ring_pages[r / page_size]) * page_size + r % page_size;
}

template <typename Cache>
__global__ void __launch_bounds__(kThreads) RecallPlanKernel(RecallParams p) {
  extern __shared__ __align__(16) unsigned char recall_smem[];
  using Scan = cub::BlockScan<int32_t, kThreads>;
  using Reduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } cubs;
  __shared__ int32_t num_runs, host_tokens, head, num_refresh, job_base, num_jobs;
  __shared__ int32_t hits, refreshed, recalled;
  RecallSmem s;
  RecallSmemLayout(p, recall_smem, &s);

  const int entry = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  if (entry == 0 && h == 0 && tid == 0) {
    // The recall's start, for its device time (RecallDecodeKernel ends it).
    *WorkspaceAt<uint64_t>(p.workspace, kWsStart) = GlobalTimerNs();
  }
  const int32_t* fields = p.entries + static_cast<int64_t>(entry) * kPlanFields;
  const int slot = fields[kPlanSlotCol];
  const int nb = fields[kPlanNumBlocksCol];
  if (nb == 0) return;
  const int64_t sh = static_cast<int64_t>(slot) * p.num_kv_heads + h;
  const int64_t list = static_cast<int64_t>(entry) * p.num_kv_heads + h;
  int32_t* keys = p.key_index + list * p.max_keys;
  const int seg_begin = fields[kPlanSinkEndCol];
  const int seg_end = p.key_count[list] - (fields[kPlanContextLenCol] - fields[kPlanTailBeginCol]);
  const int32_t* ext = p.extents + sh * p.max_blocks * 2;
  const int32_t* base = p.piece_base + sh * p.max_blocks;
  int32_t* res_start = p.res_start + sh * p.max_blocks;
  int32_t* res_count = p.res_count + sh * p.max_blocks;
  const int32_t* ring_pages =
      p.ring_pages + static_cast<int64_t>(slot) * (p.ring_rows / p.page_size);
  const int R = p.ring_rows;
  auto row_offset = [&](int32_t pos) {
    return (RingSlot(ring_pages, R, p.page_size, pos) * p.num_kv_heads + h) *
           static_cast<int64_t>(p.head_dim);
  };
  // The block holding logical index x: the last whose extent starts at or
  // before it (extents ascend with the block; empty blocks share the next
  // one's start and come first).
  auto block_of = [&](int32_t x) {
    int lo = 0, hi = nb;
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (s.first[mid] <= x)
        lo = mid;
      else
        hi = mid;
    }
    return lo;
  };

  for (int b = tid; b < nb; b += kThreads) s.first[b] = ext[b * 2];
  if (tid == 0) {
    num_runs = 0;
    num_refresh = 0;
    head = p.ring_head[sh];
    hits = refreshed = recalled = 0;
  }
  __syncthreads();
  // 1. Runs: a position starts one when its key is a block's first index
  // (a run is one block's first tokens, SelectTokens' order).
  for (int chunk = seg_begin; chunk < seg_end; chunk += kThreads) {
    const int pos = chunk + tid;
    int start = 0;
    if (pos < seg_end) {
      const int32_t x = keys[pos];
      start = x >= 0 && s.first[block_of(x)] == x;
    }
    int32_t before, total;
    Scan(cubs.scan).ExclusiveSum(start, before, total);
    if (start) {
      s.run_pos[num_runs + before] = pos;
      s.run_block[num_runs + before] = block_of(keys[pos]);
    }
    __syncthreads();
    if (tid == 0) num_runs += total;
    __syncthreads();
  }
  const int runs = num_runs;
  // 2. Takes and the host tokens of the step.
  int32_t mine = 0;
  for (int r = tid; r < runs; r += kThreads) {
    const int take = (r + 1 < runs ? s.run_pos[r + 1] : seg_end) - s.run_pos[r];
    s.run_take[r] = take;
    if (base[s.run_block[r]] >= 0) mine += take;
  }
  const int32_t sum = Reduce(cubs.reduce).Sum(mine);
  if (tid == 0) host_tokens = sum;
  __syncthreads();
  const int T = host_tokens;
  if (p.list_only) {
    // Read ahead: every piece of a missed block below host memory goes on
    // the fetch list; nothing else is written (nothing for a selection the
    // ring cannot hold).
    if (2 * T > R) return;
    const int32_t* const below = p.piece_host + sh * p.max_pieces;
    for (int r = tid; r < runs; r += kThreads) {
      const int b = s.run_block[r], take = s.run_take[r];
      if (base[b] < 0 || (res_count[b] >= take && res_start[b] >= head - R)) continue;
      for (int k = 0; k * kPiece < take; ++k) {
        const int32_t piece = base[b] + k;
        if (below[piece] != engine::kPieceBelowHost) continue;
        const int32_t at = atomicAdd(WorkspaceAt<int32_t>(p.workspace, kWsFetched), 1);
        if (at < kRecallFetchCapacity) p.fetch.pieces[at] = RecallFetchPiece{slot, h, piece};
      }
    }
    return;
  }
  if (2 * T > R) {
    if (tid == 0) atomicOr(p.status + slot, engine::kRecallRingTooSmall);
    return;
  }
  // 3. Classify (see engine/backend.h).
  const int h0 = head;
  for (int r = tid; r < runs; r += kThreads) {
    const int b = s.run_block[r], take = s.run_take[r];
    int cls = 0;
    if (base[b] >= 0) {
      const bool resident = res_count[b] >= take && res_start[b] >= h0 - R;
      cls = resident && res_start[b] >= h0 + T - R ? 0 : resident ? 1 : 2;
      if (cls == 0) atomicAdd(&hits, take);
    }
    s.run_class[r] = cls;
    s.run_start[r] = base[b] >= 0 ? res_start[b] : -1;
  }
  __syncthreads();
  // Refreshes in ascending old position: each one's rank among them.
  for (int r = tid; r < runs; r += kThreads) {
    if (s.run_class[r] != 1) continue;
    const int at = s.run_start[r];
    int rank = 0;
    for (int q = 0; q < runs; ++q) rank += s.run_class[q] == 1 && s.run_start[q] < at;
    s.order[rank] = r;
    atomicAdd(&num_refresh, 1);
  }
  __syncthreads();
  // 4. Refreshes: forward copies through shared memory in chunks no longer
  // than the distance between source and destination (in positions before
  // the modulo, the destination is at most the source plus R), so no row is
  // overwritten before it is read.
  const int row_bytes = p.head_dim * static_cast<int>(sizeof(Cache));
  const int row_words = row_bytes / 4;  // head_dim % 8 == 0
  const int stage_rows = static_cast<int>(StageBytes(p.head_dim) / (2 * row_bytes));
  Cache* const kc = static_cast<Cache*>(p.k_cache);
  Cache* const vc = static_cast<Cache*>(p.v_cache);
  uint32_t* const stage = reinterpret_cast<uint32_t*>(s.stage);
  int32_t w = h0;
  for (int i = 0; i < num_refresh; ++i) {
    const int r = s.order[i];
    const int take = s.run_take[r];
    const int32_t src = s.run_start[r];
    const int gap = src + R - w;
    if (gap > 0) {
      const int chunk = min(gap, stage_rows);
      for (int done = 0; done < take; done += chunk) {
        const int rows = min(chunk, take - done);
        const int words = rows * row_words;
        for (int x = tid; x < 2 * words; x += kThreads) {
          const int tensor = x / words, word = x % words;
          const Cache* from = (tensor == 0 ? kc : vc) + row_offset(src + done + word / row_words);
          stage[x] = reinterpret_cast<const uint32_t*>(from)[word % row_words];
        }
        __syncthreads();
        for (int x = tid; x < 2 * words; x += kThreads) {
          const int tensor = x / words, word = x % words;
          Cache* to = (tensor == 0 ? kc : vc) + row_offset(w + done + word / row_words);
          reinterpret_cast<uint32_t*>(to)[word % row_words] = stage[x];
        }
        __syncthreads();
      }
    }
    __syncthreads();  // every thread read run_start[r] before it changes
    if (tid == 0) {
      s.run_start[r] = w;
      refreshed += take;
    }
    w += take;
  }
  __syncthreads();
  // 5. Misses take their positions in selection order; their pieces go on
  // the list (prefix sums of the pieces in s.order).
  if (tid == 0) {
    int pieces = 0;
    for (int r = 0; r < runs; ++r) {
      s.order[r] = pieces;
      if (s.run_class[r] != 2) continue;
      s.run_start[r] = w;
      w += s.run_take[r];
      recalled += s.run_take[r];
      pieces += (s.run_take[r] + kPiece - 1) / kPiece;
    }
    s.order[runs] = pieces;
    num_jobs = pieces;
    job_base = pieces > 0 ? atomicAdd(WorkspaceAt<int32_t>(p.workspace, kWsJobs), pieces) : 0;
    head = w;
  }
  __syncthreads();
  RecallJob* const jobs = WorkspaceAt<RecallJob>(p.workspace, kWsHeaderBytes);
  const int64_t capacity =
      (static_cast<int64_t>(p.workspace_bytes) - static_cast<int64_t>(kWsHeaderBytes)) /
      static_cast<int64_t>(sizeof(RecallJob));
  const bool listed = job_base + num_jobs <= capacity;
  const int32_t* const where = p.piece_host + sh * p.max_pieces;
  for (int r = tid; listed && r < runs; r += kThreads) {
    if (s.run_class[r] != 2) continue;
    const int b = s.run_block[r], take = s.run_take[r], size = ext[b * 2 + 1];
    for (int k = 0; k * kPiece < take; ++k) {
      const int64_t j = job_base + s.order[r] + k;
      const int32_t piece = base[b] + k;
      // A piece below host memory goes on the fetch list, whose answer the
      // decode kernel reads instead of piece_host.
      int32_t fetched = kNotFetched;
      if (p.fetch.pieces != nullptr && where[piece] == engine::kPieceBelowHost) {
        const int32_t at = atomicAdd(WorkspaceAt<int32_t>(p.workspace, kWsFetched), 1);
        fetched = at < kRecallFetchCapacity ? at : kFetchOverflow;
        if (at < kRecallFetchCapacity) p.fetch.pieces[at] = RecallFetchPiece{slot, h, piece};
      }
      jobs[j] = RecallJob{slot,
                          h,
                          b,
                          piece,
                          s.run_start[r] + k * kPiece,
                          min(kPiece, take - k * kPiece),
                          min(kPiece, size - k * kPiece),
                          fetched};
    }
  }
  // 6. Tables and key_index (a miss whose piece fails is made not resident
  // by the decode kernel).
  for (int r = tid; r < runs; r += kThreads) {
    const int b = s.run_block[r];
    if (base[b] < 0 || s.run_class[r] == 0) continue;
    res_start[b] = s.run_start[r];
    res_count[b] = listed || s.run_class[r] != 2 ? s.run_take[r] : 0;
  }
  for (int pos = seg_begin + tid; runs > 0 && pos < seg_end; pos += kThreads) {
    int lo = 0, hi = runs;  // the run holding pos: the last starting at or before it
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (s.run_pos[mid] <= pos)
        lo = mid;
      else
        hi = mid;
    }
    if (base[s.run_block[lo]] < 0) continue;
    keys[pos] = engine::KvCacheSlotIndex(
        RingSlot(ring_pages, R, p.page_size, s.run_start[lo] + pos - s.run_pos[lo]));
  }
  if (tid == 0) {
    p.ring_head[sh] = head;
    if (!listed) atomicOr(p.status + slot, engine::kRecallRingTooSmall);
    atomicAdd(p.stats + engine::kStatHitTokens, hits);
    atomicAdd(p.stats + engine::kStatRefreshedTokens, refreshed);
    atomicAdd(p.stats + engine::kStatRecalledTokens, recalled);
  }
}

template <typename Cache>
__global__ void __launch_bounds__(kThreads) RecallDecodeKernel(RecallParams p) {
  extern __shared__ __align__(16) unsigned char decode_smem[];
  __shared__ int32_t pieces, kib, bad;
  if (threadIdx.x == 0) pieces = kib = bad = 0;
  __syncthreads();
  const int32_t count = *WorkspaceAt<const int32_t>(p.workspace, kWsJobs);
  const RecallJob* const jobs = WorkspaceAt<const RecallJob>(p.workspace, kWsHeaderBytes);
  Cache* const kc = static_cast<Cache*>(p.k_cache);
  Cache* const vc = static_cast<Cache*>(p.v_cache);
  for (int32_t j = blockIdx.x; j < count; j += gridDim.x) {
    const RecallJob job = jobs[j];
    const int64_t sh = static_cast<int64_t>(job.slot) * p.num_kv_heads + job.head;
    const int32_t* ring_pages =
        p.ring_pages + static_cast<int64_t>(job.slot) * (p.ring_rows / p.page_size);
    int64_t at = -1;  // kFetchOverflow: a bad piece
    if (job.fetched == kNotFetched) {
      at = static_cast<int64_t>(p.piece_host[sh * p.max_pieces + job.piece]) * kUnit;
    } else if (job.fetched >= 0) {
      // The host function wrote it after the plan kernel: read from memory,
      // not a cache.
      at = *static_cast<const volatile int64_t*>(p.fetch.offsets + job.fetched);
    }
    int got = static_cast<int>(KvBlockError::kTruncated);
    if (at >= 0 && at < p.host_bytes) {
      got = DecodeKvBlock<kThreads>(
          p.host + at, static_cast<size_t>(p.host_bytes - at), p.head_dim, kc, vc,
          [&](int row) {
            return (RingSlot(ring_pages, p.ring_rows, p.page_size, job.dst + row) * p.num_kv_heads +
                    job.head) *
                   static_cast<int64_t>(p.head_dim);
          },
          job.rows, decode_smem);
    }
    if (threadIdx.x == 0) {
      if (got == job.expect) {
        // The block is still staged: its header gives its size.
        const unsigned char* hdr = decode_smem;
        const uint32_t payload =
            hdr[16] | (hdr[17] << 8) | (hdr[18] << 16) | (static_cast<uint32_t>(hdr[19]) << 24);
        ++pieces;
        kib += static_cast<int32_t>((engine::kBlockHeaderBytes + payload + 1023) / 1024);
      } else {
        ++bad;
        p.res_count[sh * p.max_blocks + job.block] = 0;
        atomicOr(p.status + job.slot, engine::kRecallBadBlock);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && (pieces | kib | bad) != 0) {
    atomicAdd(p.stats + engine::kStatRecalledPieces, pieces);
    atomicAdd(p.stats + engine::kStatRecalledKiB, kib);
    atomicAdd(p.stats + engine::kStatBadPieces, bad);
  }
  if (threadIdx.x == 0) {
    // The last CTA to finish adds the recall's device time.
    __threadfence();
    if (atomicAdd(WorkspaceAt<int32_t>(p.workspace, kWsDone), 1) ==
        static_cast<int32_t>(gridDim.x) - 1) {
      const uint64_t start = *WorkspaceAt<volatile uint64_t>(p.workspace, kWsStart);
      const uint64_t micros = (GlobalTimerNs() - start) / 1000;
      atomicAdd(p.stats + engine::kStatRecallMicros, static_cast<int32_t>(micros));
    }
  }
}

}  // namespace

cudaError_t LaunchOffloadLayout(const OffloadLayoutParams& p, cudaStream_t stream) {
  if (p.num_kv_heads < 1 || p.head_dim < 1 || p.extents == nullptr || p.piece_base == nullptr ||
      p.piece_host == nullptr || p.piece_count == nullptr || p.jobs == nullptr ||
      p.overflow == nullptr || p.block_stride < 1 || p.first_block < 0 || p.num_blocks < 0 ||
      p.first_block + p.num_blocks > p.max_blocks) {
    return cudaErrorInvalidValue;
  }
  OffloadLayoutKernel<<<p.num_kv_heads, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

size_t RecallSmemBytes(const RecallParams& p) { return RecallSmemLayout(p, nullptr, nullptr); }

size_t RecallWorkspaceBytes(const RecallParams& p) {
  return kWsHeaderBytes + static_cast<size_t>(p.num_entries) * p.num_kv_heads *
                              JobsPerList(p.max_keys) * sizeof(RecallJob);
}

namespace {

template <typename Cache>
cudaError_t LaunchRecall(const RecallParams& p, cudaStream_t stream) {
  const size_t plan_smem = RecallSmemBytes(p);
  const size_t decode_smem = KvDecodeSmemBytes(p.head_dim);
  if (cudaError_t e =
          cudaFuncSetAttribute(RecallPlanKernel<Cache>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan_smem));
      e != cudaSuccess) {
    return e;
  }
  if (cudaError_t e = cudaFuncSetAttribute(RecallDecodeKernel<Cache>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(decode_smem));
      e != cudaSuccess) {
    return e;
  }
  if (cudaError_t e = cudaMemsetAsync(p.workspace, 0, kWsHeaderBytes, stream); e != cudaSuccess) {
    return e;
  }
  RecallPlanKernel<Cache><<<dim3(p.num_entries, p.num_kv_heads), kThreads, plan_smem, stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (p.fetch.pieces != nullptr) {
    // The list is in host memory already; its length follows, then the
    // host answers (the stream waits for it).
    if (cudaError_t e = cudaMemcpyAsync(p.fetch.count, static_cast<char*>(p.workspace) + kWsFetched,
                                        sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
        e != cudaSuccess) {
      return e;
    }
    if (cudaError_t e = cudaLaunchHostFunc(stream, p.fetch.fn, p.fetch.arg); e != cudaSuccess) {
      return e;
    }
  }
  if (p.list_only) return cudaSuccess;  // nothing to decode
  RecallDecodeKernel<Cache><<<p.decode_ctas, kThreads, decode_smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRecallBlocks(const RecallParams& p, cudaStream_t stream) {
  if (p.num_entries == 0) return cudaSuccess;
  if (p.k_cache == nullptr || p.v_cache == nullptr || p.entries == nullptr ||
      p.key_index == nullptr || p.key_count == nullptr || p.ring_rows <= 0 || p.page_size <= 0 ||
      p.ring_rows % p.page_size != 0 || p.head_dim % 8 != 0 || p.host == nullptr ||
      p.workspace == nullptr || p.workspace_bytes < RecallWorkspaceBytes(p) || p.decode_ctas < 1 ||
      (p.fetch.pieces != nullptr &&
       (p.fetch.count == nullptr || p.fetch.offsets == nullptr || p.fetch.fn == nullptr)) ||
      (p.list_only && p.fetch.pieces == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return p.kv_fp8 ? LaunchRecall<__nv_fp8_e4m3>(p, stream) : LaunchRecall<__nv_bfloat16>(p, stream);
}

}  // namespace strata::cuda::kernels
