#include "cuda/tiering.h"

#include <algorithm>
#include <cstddef>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "cuda/kernels/kv_codec.h"
#include "cuda/kernels/kv_tier.h"

namespace strata::cuda {
namespace {

using engine::DType;
using engine::PieceFetcher;
using engine::Tensor;
using kernels::kRecallFetchCapacity;
using kernels::RecallFetchPiece;

// The fetch list is handed to the fetcher as it is laid out.
static_assert(sizeof(RecallFetchPiece) == sizeof(PieceFetcher::Piece) &&
              offsetof(RecallFetchPiece, slot) == offsetof(PieceFetcher::Piece, slot) &&
              offsetof(RecallFetchPiece, head) == offsetof(PieceFetcher::Piece, head) &&
              offsetof(RecallFetchPiece, piece) == offsetof(PieceFetcher::Piece, piece));

// A RecallFetchContext's pinned memory: the count, the list, the offsets.
constexpr size_t kFetchListAt = 16;
constexpr size_t kFetchOffsetsAt =
    kFetchListAt + (sizeof(RecallFetchPiece) * kRecallFetchCapacity + 15) / 16 * 16;
constexpr size_t kFetchBytes = kFetchOffsetsAt + sizeof(int64_t) * kRecallFetchCapacity;
// Layers a backend keeps fetch contexts for.
constexpr int kMaxFetchLayers = 1 << 16;

absl::Status Bad(const char* op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("cuda ", op, ": ", what));
}

absl::Status CheckCaches(const char* op, const Tensor& k, const Tensor& v) {
  if (!k.defined() || k.rank() != 4 || k.shape() != v.shape() || k.dtype() != v.dtype() ||
      (k.dtype() != DType::kBF16 && k.dtype() != DType::kF8E4M3) || k.dim(3) % 8 != 0) {
    return Bad(op, "caches must be BF16 or F8_E4M3 [pages, page_size, Hkv, D], alike, D % 8 == 0");
  }
  return absl::OkStatus();
}

absl::StatusOr<const uint8_t*> DevicePointer(const engine::HostBuffer& host) {
  void* device = nullptr;
  STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&device, host.data(), 0));
  return static_cast<const uint8_t*>(device);
}

}  // namespace

absl::Status OffloadBlocks(const Tensor& k_cache, const Tensor& v_cache,
                           const engine::SequenceRange& range, const Tensor& extents,
                           int first_block, int num_blocks, int block_stride,
                           engine::KvCodecKind codec, const engine::HostBuffer& host,
                           int64_t region_unit, int64_t units_per_head, engine::TierTables& t,
                           DeviceBuffer& workspace, cudaStream_t stream) {
  constexpr char kOp[] = "OffloadBlocks";
  STRATA_RETURN_IF_ERROR(CheckCaches(kOp, k_cache, v_cache));
  STRATA_RETURN_IF_ERROR(engine::ValidateOffloadBlocks("cuda OffloadBlocks", k_cache, extents,
                                                       first_block, num_blocks, block_stride, host,
                                                       region_unit, units_per_head, t));
  const int64_t hkv = k_cache.dim(2), d = k_cache.dim(3);
  const int64_t max_blocks = extents.dim(1), max_pieces = t.piece_host.dim(1);
  if (num_blocks == 0) return absl::OkStatus();
  STRATA_ASSIGN_OR_RETURN(const uint8_t* host_device, DevicePointer(host));
  // At most one partial piece per block beyond the full ones.
  const int64_t jobs_per_head = std::min<int64_t>(
      max_pieces, (range.count + engine::kKvPieceTokens - 1) / engine::kKvPieceTokens + num_blocks);
  const size_t job_bytes = static_cast<size_t>(hkv * jobs_per_head) * sizeof(kernels::EncodeKvJob);
  STRATA_RETURN_IF_ERROR(workspace.EnsureSize(job_bytes + 16));
  auto* jobs = static_cast<kernels::EncodeKvJob*>(workspace.data());
  auto* overflow = reinterpret_cast<int32_t*>(static_cast<char*>(workspace.data()) + job_bytes);
  STRATA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(overflow, 0, 4, stream));
  const int cache_bytes = k_cache.dtype() == DType::kBF16 ? 2 : 1;
  kernels::OffloadLayoutParams layout;
  layout.codec = codec;
  layout.cache_bytes = cache_bytes;
  layout.num_kv_heads = static_cast<int>(hkv);
  layout.head_dim = static_cast<int>(d);
  layout.extents = extents.data_as<int32_t>();
  layout.max_blocks = static_cast<int>(max_blocks);
  layout.first_block = first_block;
  layout.num_blocks = num_blocks;
  layout.block_stride = block_stride;
  layout.region_unit = region_unit;
  layout.units_per_head = units_per_head;
  layout.piece_base = t.piece_base.data_as<int32_t>();
  layout.piece_host = t.piece_host.data_as<int32_t>();
  layout.piece_count = t.piece_count.data_as<int32_t>();
  layout.max_pieces = static_cast<int>(max_pieces);
  layout.jobs = jobs;
  layout.jobs_per_head = static_cast<int>(jobs_per_head);
  // A head whose pieces would not fit (the caller's bound is exact enough
  // that this does not happen) writes nothing: its blocks stay paged.
  layout.overflow = overflow;
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchOffloadLayout(layout, stream));
  kernels::EncodeKvBlocksParams encode;
  encode.codec = codec;
  encode.k_cache = k_cache.data();
  encode.v_cache = v_cache.data();
  encode.kv_fp8 = cache_bytes == 1;
  encode.block_table = range.block_table.data_as<int32_t>();
  encode.max_blocks_per_seq = static_cast<int>(range.block_table.numel());
  encode.page_size = range.page_size;
  encode.num_kv_heads = static_cast<int>(hkv);
  encode.head_dim = static_cast<int>(d);
  encode.jobs = jobs;
  encode.num_jobs = static_cast<int>(hkv * jobs_per_head);
  encode.max_tokens = engine::kKvPieceTokens;
  encode.out_base = const_cast<uint8_t*>(host_device);
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchEncodeKvBlocks(encode, stream));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RecallFetchContext>> RecallFetchContext::Create(int layer) {
  std::unique_ptr<RecallFetchContext> c(new RecallFetchContext(layer));
  STRATA_CUDA_RETURN_IF_ERROR(
      cudaHostAlloc(&c->host_, kFetchBytes, cudaHostAllocPortable | cudaHostAllocMapped));
  void* device = nullptr;
  STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&device, c->host_, 0));
  char* const host = static_cast<char*>(c->host_);
  char* const dev = static_cast<char*>(device);
  c->list_.count = reinterpret_cast<int32_t*>(host);
  *c->list_.count = 0;
  c->pieces_ = reinterpret_cast<const RecallFetchPiece*>(host + kFetchListAt);
  c->list_.pieces = reinterpret_cast<RecallFetchPiece*>(dev + kFetchListAt);
  c->offsets_ = reinterpret_cast<int64_t*>(host + kFetchOffsetsAt);
  c->list_.offsets = reinterpret_cast<const int64_t*>(dev + kFetchOffsetsAt);
  c->list_.fn = &RecallFetchContext::Fetch;
  c->list_.arg = c.get();
  c->scratch_.resize(kRecallFetchCapacity);
  return c;
}

RecallFetchContext::~RecallFetchContext() {
  if (host_ != nullptr) LogIfError(cudaFreeHost(host_), "cudaFreeHost");
}

void RecallFetchContext::Fetch(void* context) {
  auto* c = static_cast<RecallFetchContext*>(context);
  // Pieces past the capacity were not listed (they fail as bad pieces).
  const int n = std::clamp(*c->list_.count, 0, kRecallFetchCapacity);
  if (n == 0) return;
  std::fill_n(c->offsets_, n, int64_t{-1});
  PieceFetcher* const fetcher = c->fetcher_.load(std::memory_order_acquire);
  if (fetcher == nullptr) return;
  for (int i = 0; i < n; ++i) {
    c->scratch_[i] = {c->pieces_[i].slot, c->pieces_[i].head, c->pieces_[i].piece};
  }
  fetcher->Fetch(c->layer_, std::span<const PieceFetcher::Piece>(c->scratch_.data(), n),
                 std::span<int64_t>(c->offsets_, n));
}

absl::StatusOr<RecallFetchContext*> RecallFetchContexts::ForRecall(int layer, PieceFetcher* fetcher,
                                                                   bool capturing) {
  if (fetcher == nullptr) return nullptr;
  if (layer < 0 || layer >= kMaxFetchLayers) {
    return Bad("RecallBlocks", absl::StrCat("tables of layer ", layer, " cannot fetch pieces"));
  }
  if (static_cast<size_t>(layer) >= by_layer_.size()) by_layer_.resize(layer + 1);
  std::unique_ptr<RecallFetchContext>& context = by_layer_[layer];
  if (context == nullptr) {
    if (capturing) {
      return absl::FailedPreconditionError(
          absl::StrCat("RecallBlocks' first fetch for layer ", layer,
                       " (pinned memory to allocate) is not allowed while a graph is being "
                       "captured"));
    }
    STRATA_ASSIGN_OR_RETURN(context, RecallFetchContext::Create(layer));
  }
  context->set_fetcher(fetcher);
  return context.get();
}

size_t RecallWorkspaceBytes(const engine::SparsePlan& plan, const Tensor& k_cache) {
  kernels::RecallParams p;
  p.num_entries = plan.entries.defined() ? static_cast<int>(plan.entries.dim(0)) : 0;
  p.num_kv_heads = k_cache.rank() == 4 ? static_cast<int>(k_cache.dim(2)) : 0;
  p.max_keys = plan.max_keys;
  return kernels::RecallWorkspaceBytes(p);
}

absl::Status RecallBlocks(Tensor& k_cache, Tensor& v_cache, engine::SparsePlan& plan,
                          const Tensor& extents, engine::TierTables& t, engine::TierRing& ring,
                          void* workspace, size_t workspace_bytes, int decode_ctas,
                          RecallFetchContext* fetch, cudaStream_t stream) {
  constexpr char kOp[] = "RecallBlocks";
  STRATA_RETURN_IF_ERROR(CheckCaches(kOp, k_cache, v_cache));
  STRATA_RETURN_IF_ERROR(
      engine::ValidateRecallBlocks("cuda RecallBlocks", k_cache, plan, extents, t, ring));
  const int64_t hkv = k_cache.dim(2), page_size = k_cache.dim(1);
  const int64_t max_blocks = extents.dim(2);
  STRATA_ASSIGN_OR_RETURN(const uint8_t* host_device, DevicePointer(ring.host));
  kernels::RecallParams p;
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.kv_fp8 = k_cache.dtype() == DType::kF8E4M3;
  p.page_size = static_cast<int>(page_size);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(k_cache.dim(3));
  p.entries = plan.entries.data_as<int32_t>();
  p.num_entries = plan.num_entries;
  p.key_index = plan.key_index.data_as<int32_t>();
  p.key_count = plan.key_count.data_as<int32_t>();
  p.max_keys = plan.max_keys;
  p.extents = extents.data_as<int32_t>();
  p.max_blocks = static_cast<int>(max_blocks);
  p.max_num_blocks = static_cast<int>(max_blocks);  // steady shared memory for graphs
  p.piece_base = t.piece_base.data_as<int32_t>();
  p.piece_host = t.piece_host.data_as<int32_t>();
  p.max_pieces = static_cast<int>(t.piece_host.dim(2));
  p.res_start = t.res_start.data_as<int32_t>();
  p.res_count = t.res_count.data_as<int32_t>();
  p.ring_head = t.ring_head.data_as<int32_t>();
  p.ring_pages = ring.ring_pages.data_as<int32_t>();
  p.ring_rows = ring.ring_rows;
  p.host = host_device;
  p.host_bytes = static_cast<int64_t>(ring.host.bytes);
  p.status = ring.status.data_as<int32_t>();
  p.stats = ring.stats.data_as<int32_t>();
  p.workspace = workspace;
  p.workspace_bytes = workspace_bytes;
  p.decode_ctas = decode_ctas;
  if (fetch != nullptr) p.fetch = fetch->list();
  p.list_only = ring.list_only;
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchRecallBlocks(p, stream));
  return absl::OkStatus();
}

}  // namespace strata::cuda
