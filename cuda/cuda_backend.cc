#include "cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "cuda/copy_engine.h"
#include "cuda/cuda_utils.h"
#include "cuda/kernels/attention.h"
#include "cuda/kernels/elementwise.h"
#include "cuda/kernels/gemv.h"
#include "cuda/kernels/kv_cluster.h"
#include "cuda/kernels/kv_select.h"
#include "cuda/kernels/sampling.h"
#include "cuda/op_timer.h"
#include "cuda/tiering.h"
#include "engine/kmeans.h"

namespace strata::cuda {
namespace {

using engine::AttentionBatch;
using engine::DType;
using engine::QkvLayout;
using engine::Tensor;

// Host <-> device transfers are staged through kStagingSlots pinned buffers
// of kStagingBytes each, used round-robin, so that copying the next chunk
// into pinned memory on the host overlaps the DMA (and conversion) of the
// previous ones. An event per slot says when its last transfer finished.
constexpr int kStagingSlots = 4;
constexpr size_t kStagingBytes = size_t{16} << 20;
// cuBLASLt workspace; 32 MiB is what cuBLAS recommends for Hopper.
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
// CTAs per SM of a recall's decode kernel when it runs as side work
// (BeginSideWork), beside the layer computing on the main stream.
constexpr int kSideRecallCtasPerSm = 1;
// GEMMs with at most this many tokens get their algorithm by timing up to
// kAutotuneCandidates of cuBLASLt's heuristic candidates.
constexpr int64_t kAutotuneMaxTokens = 64;
constexpr int kAutotuneCandidates = 32;
// Bytes written between timed runs so the weight is not served from L2
// (50 MB on an H100).
constexpr size_t kL2FlushBytes = size_t{128} << 20;

std::string ShapeString(const Tensor& t) {
  if (!t.defined()) return "<undefined>";
  return t.DebugString();
}

// Largest power of two (<= 256) dividing the address: what cuBLASLt needs to
// know to pick kernels that are legal for views at arbitrary row offsets.
uint32_t PointerAlignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && (address % alignment) != 0) alignment >>= 1;
  return alignment;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Returns InvalidArgument "<op>: <what> (<tensor shapes>)" unless `ok`.
absl::Status Check(bool ok, const char* op, absl::string_view what,
                   std::initializer_list<const Tensor*> tensors = {}) {
  if (ok) return absl::OkStatus();
  std::vector<std::string> shapes;
  for (const Tensor* t : tensors) shapes.push_back(ShapeString(*t));
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, shapes.empty() ? "" : " (",
                                                 absl::StrJoin(shapes, ", "),
                                                 shapes.empty() ? "" : ")"));
}

// ---- cuBLASLt plans ---------------------------------------------------------

struct LtDescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
};
struct LtLayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* l) const { cublasLtMatrixLayoutDestroy(l); }
};
struct LtPreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using LtDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, LtDescDeleter>;
using LtLayout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LtLayoutDeleter>;
using LtPreference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, LtPreferenceDeleter>;

// One GEMM configuration: shapes, bias epilogue and the pointer alignments
// the heuristic was asked for.
struct GemmKey {
  int64_t tokens;
  int64_t in_features;
  int64_t out_features;
  bool bias;
  uint32_t align_x;
  uint32_t align_w;
  uint32_t align_out;
  uint32_t align_bias;

  bool operator==(const GemmKey&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const GemmKey& k) {
    return H::combine(std::move(h), k.tokens, k.in_features, k.out_features, k.bias, k.align_x,
                      k.align_w, k.align_out, k.align_bias);
  }
};

// A cached cuBLASLt matmul: descriptors plus the heuristic's algorithm, or
// `use_fallback` when cuBLASLt offers no algorithm for this configuration
// (then cublasGemmEx plus a bias kernel is used).
struct GemmPlan {
  LtDesc desc;
  LtLayout a;  // weight [N, K] row-major == K x N column-major, transposed
  LtLayout b;  // x [T, K] row-major == K x T column-major
  LtLayout c;  // out [T, N] row-major == N x T column-major
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_bytes = 0;
  bool use_fallback = false;
  // At decode sizes strata's own kernel (kernels/gemv.h) when it timed
  // faster than every cuBLASLt candidate.
  bool use_gemv = false;
};

absl::Status CaptureError(const char* op) {
  return absl::FailedPreconditionError(
      absl::StrCat(op, " is not allowed while a graph is being captured"));
}

// ---- The backend ------------------------------------------------------------

class CudaBackend final : public engine::Backend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int device);

  std::string_view name() const override { return name_; }
  DType activation_dtype() const override { return DType::kBF16; }

  absl::StatusOr<Tensor> Allocate(DType dtype, std::vector<int64_t> shape) override;
  absl::Status CopyFromHost(const void* src, DType src_dtype, int64_t count, Tensor& dst,
                            int64_t dst_offset) override;
  absl::Status CopyToHost(const Tensor& src, void* dst) override;
  absl::Status FillRandom(Tensor& t, uint64_t seed, float scale) override;
  absl::Status Fill(Tensor& t, float value) override;
  absl::Status Synchronize() override;
  absl::StatusOr<engine::HostBuffer> AllocateHost(size_t bytes) override {
    STRATA_RETURN_IF_ERROR(Activate());
    return CopyEngine::AllocateHost(bytes);
  }
  absl::StatusOr<engine::CopyFence> CopyRowsToHost(std::span<const Tensor> tensors,
                                                   std::span<const engine::RowCopy> rows,
                                                   const engine::HostBuffer& host) override {
    if (capturing_) return CaptureError("CopyRowsToHost");
    STRATA_RETURN_IF_ERROR(Activate());
    return copies_.CopyRows(tensors, rows, host, /*to_host=*/true, stream());
  }
  absl::StatusOr<engine::CopyFence> CopyRowsFromHost(const engine::HostBuffer& host,
                                                     std::span<const engine::RowCopy> rows,
                                                     std::span<const Tensor> tensors) override {
    if (capturing_) return CaptureError("CopyRowsFromHost");
    STRATA_RETURN_IF_ERROR(Activate());
    return copies_.CopyRows(tensors, rows, host, /*to_host=*/false, stream());
  }
  absl::Status ChecksumRows(std::span<const Tensor> tensors, std::span<const engine::RowCopy> rows,
                            std::span<uint32_t> crcs) override {
    if (capturing_) return CaptureError("ChecksumRows");
    STRATA_RETURN_IF_ERROR(Activate());
    return copies_.ChecksumRows(tensors, rows, crcs);
  }
  absl::StatusOr<engine::CopyFence> EncodeBlocksToHost(engine::KvCodecKind codec,
                                                       std::span<const Tensor> k_caches,
                                                       std::span<const Tensor> v_caches,
                                                       std::span<const engine::KvBlockCopy> blocks,
                                                       const engine::HostBuffer& host) override {
    if (capturing_) return CaptureError("EncodeBlocksToHost");
    STRATA_RETURN_IF_ERROR(Activate());
    STRATA_ASSIGN_OR_RETURN(const bool fp8, CachesFp8("EncodeBlocksToHost", k_caches));
    return copies_.EncodeBlocks(codec, fp8, k_caches, v_caches, blocks, host, stream());
  }
  absl::Status DecodeBlocksFromHost(const engine::HostBuffer& host,
                                    std::span<const engine::KvBlockCopy> blocks,
                                    std::span<const Tensor> k_caches,
                                    std::span<const Tensor> v_caches) override {
    if (capturing_) return CaptureError("DecodeBlocksFromHost");
    STRATA_RETURN_IF_ERROR(Activate());
    STRATA_ASSIGN_OR_RETURN(const bool fp8, CachesFp8("DecodeBlocksFromHost", k_caches));
    return copies_.DecodeBlocks(fp8, host, blocks, k_caches, v_caches, stream());
  }
  // Whether KV caches hold fp8 e4m3 (else bf16); InvalidArgument for other
  // dtypes or a mix.
  static absl::StatusOr<bool> CachesFp8(absl::string_view op, std::span<const Tensor> caches) {
    bool fp8 = false;
    for (size_t i = 0; i < caches.size(); ++i) {
      const DType d = caches[i].dtype();
      if (d != DType::kBF16 && d != DType::kF8E4M3) {
        return absl::InvalidArgumentError(absl::StrCat(op, ": cache ", i, " is not bf16 or fp8"));
      }
      if (i > 0 && (d == DType::kF8E4M3) != fp8) {
        return absl::InvalidArgumentError(absl::StrCat(op, ": caches of mixed dtypes"));
      }
      fp8 = d == DType::kF8E4M3;
    }
    return fp8;
  }
  absl::StatusOr<bool> FenceDone(engine::CopyFence fence) override {
    STRATA_RETURN_IF_ERROR(Activate());
    return copies_.FenceDone(fence);
  }
  absl::Status WaitFence(engine::CopyFence fence) override {
    STRATA_RETURN_IF_ERROR(Activate());
    return copies_.WaitFence(fence);
  }
  absl::Status ComputeAfterFence(engine::CopyFence fence) override {
    if (capturing_) return CaptureError("ComputeAfterFence");
    STRATA_RETURN_IF_ERROR(Activate());
    return copies_.ComputeAfterFence(fence, stream());
  }
  absl::Status BeginSideWork() override;
  absl::Status EndSideWork() override;
  absl::Status JoinSideWork() override;
  void SetOpTiming(bool enabled) override { op_timer_.set_enabled(enabled); }
  bool SupportsGraphs() const override { return true; }
  absl::Status BeginCapture() override;
  absl::StatusOr<int> EndCapture() override;
  absl::Status ReplayGraph(int graph) override;
  absl::Status ReleaseGraph(int graph) override;
  absl::StatusOr<std::vector<engine::OpTime>> TakeOpTimes() override { return op_timer_.Take(); }

  absl::Status Gather(const Tensor& table, const Tensor& ids, Tensor& out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  absl::Status AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps,
                          Tensor& out) override;
  absl::Status Linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      Tensor& out) override;
  absl::Status Rope(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                    const Tensor& inv_freq) override;
  absl::Status SiluMul(const Tensor& gate_up, Tensor& out) override;
  absl::Status WriteKv(const Tensor& qkv, const QkvLayout& layout, const Tensor& slots,
                       Tensor& k_cache, Tensor& v_cache) override;
  absl::Status RopeWriteKv(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                           const Tensor& inv_freq, const Tensor& slots, Tensor& k_cache,
                           Tensor& v_cache) override;
  absl::Status Attention(const Tensor& qkv, const QkvLayout& layout, const Tensor& k_cache,
                         const Tensor& v_cache, const AttentionBatch& batch, float scale,
                         int sliding_window, Tensor& out) override;

  absl::Status ClusterKeys(Tensor& k_cache, Tensor& v_cache, const engine::SequenceRange& range,
                           int num_clusters, int iterations, int first_block, Tensor& centroids,
                           Tensor& extents, Tensor* order, engine::ClusterRows rows) override;
  absl::Status ReorderKeys(Tensor& k_cache, Tensor& v_cache, const engine::SequenceRange& range,
                           const Tensor& order) override;
  absl::Status KeyBounds(const Tensor& k_cache, const engine::SequenceRange& range,
                         int block_tokens, int first_block, Tensor& lo, Tensor& hi,
                         Tensor& extents) override;
  absl::Status ScoreBlocks(const Tensor& qkv, const QkvLayout& layout,
                           const engine::SparsePlan& plan, int entry_begin, int entry_end,
                           engine::BlockScoring scoring, const Tensor& summary_a,
                           const Tensor& summary_b, Tensor& scores) override;
  absl::Status SelectTokens(const Tensor& scores, const Tensor& extents,
                            engine::SparsePlan& plan) override;
  absl::Status SparseAttention(const Tensor& qkv, const QkvLayout& layout, const Tensor& k_cache,
                               const Tensor& v_cache, const AttentionBatch& batch,
                               const engine::SparsePlan& plan, float scale, Tensor& out) override;
  absl::Status OffloadBlocks(const Tensor& k_cache, const Tensor& v_cache,
                             const engine::SequenceRange& range, const Tensor& extents,
                             int first_block, int num_blocks, int block_stride,
                             engine::KvCodecKind codec, const engine::HostBuffer& host,
                             int64_t region_unit, int64_t units_per_head,
                             engine::TierTables& slot_tables) override {
    if (capturing_) return CaptureError("OffloadBlocks");
    STRATA_RETURN_IF_ERROR(Activate());
    OpTimer::Scope timed(&op_timer_, "OffloadBlocks", stream());
    return cuda::OffloadBlocks(k_cache, v_cache, range, extents, first_block, num_blocks,
                               block_stride, codec, host, region_unit, units_per_head, slot_tables,
                               tier_workspace_, stream());
  }
  absl::Status RecallBlocks(Tensor& k_cache, Tensor& v_cache, const engine::AttentionBatch&,
                            engine::SparsePlan& plan, const Tensor& extents,
                            engine::TierTables& tables, engine::TierRing& ring) override {
    STRATA_RETURN_IF_ERROR(Activate());
    // Sized for the plan's capacity on the first (direct) step, so that
    // recorded steps find it large enough.
    // Side work has its own piece list, and fewer CTAs: it shares the SMs
    // with the layer computing beside it, and a few CTAs per SM already
    // keep enough host reads in flight to fill the PCIe link.
    DeviceBuffer& workspace = on_side_ ? side_recall_workspace_ : recall_workspace_;
    // Pieces below host memory are fetched on the main stream only (a side
    // recall must not wait for the host); side work may only read ahead,
    // through fetch lists of its own.
    if (on_side_ && ring.fetcher != nullptr && !ring.list_only) {
      return absl::InvalidArgumentError("RecallBlocks: side work cannot fetch pieces");
    }
    STRATA_ASSIGN_OR_RETURN(cuda::RecallFetchContext * fetch,
                            (on_side_ ? side_recall_fetch_ : recall_fetch_)
                                .ForRecall(tables.layer, ring.fetcher, capturing_));
    STRATA_RETURN_IF_ERROR(
        GrowKeepingGraphsSafe(workspace, cuda::RecallWorkspaceBytes(plan, k_cache)));
    OpTimer::Scope timed(&op_timer_, on_side_ ? "RecallBlocks (side)" : "RecallBlocks", stream());
    return cuda::RecallBlocks(k_cache, v_cache, plan, extents, tables, ring, workspace.data(),
                              workspace.size(), (on_side_ ? kSideRecallCtasPerSm : 4) * num_sms_,
                              fetch, stream());
  }
  absl::Status SampleTokens(const Tensor& logits, const engine::SamplingTable& sampling,
                            Tensor& token_ids, Tensor& logprobs) override;

  CudaStreamInfo stream_info() const { return {device_, stream()}; }

  ~CudaBackend() override {
    // Finish queued work before members (buffers, handles) are released.
    LogIfError(cudaSetDevice(device_), "cudaSetDevice");
    if (stream_.get() != nullptr)
      LogIfError(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
    if (side_stream_.get() != nullptr)
      LogIfError(cudaStreamSynchronize(side_stream_.get()), "cudaStreamSynchronize");
    if (absl::Status s = copies_.WaitAll(); !s.ok()) {
      STRATA_LOG_ERROR("cuda backend: copies at shutdown: {}", s.ToString());
    }
  }

 private:
  CudaBackend() = default;

  // Makes this backend's device current for the calling thread (cheap when
  // it already is), so a process can drive backends on several GPUs.
  absl::Status Activate() const;
  // The queue operators go to: the side stream between BeginSideWork and
  // EndSideWork, else the main one.
  cudaStream_t stream() const { return on_side_ ? side_stream_.get() : stream_.get(); }
  // The operands of the Linear call a plan is made for (autotuning runs on
  // them; `out` is overwritten).
  struct GemmOperands {
    const void* weight;
    const void* x;
    void* out;
    const void* bias;  // null unless the epilogue adds it
  };
  absl::StatusOr<GemmPlan*> GetGemmPlan(const GemmKey& key, const void* bias,
                                        const GemmOperands& operands);
  // The index of the fastest of `count` candidate algorithms for `plan`,
  // timed on the operands with L2 flushed between runs.
  struct FastestCandidate {
    int index = 0;
    float ms = 0.0f;  // its time over the timed runs; 0 if none was timed
  };
  absl::StatusOr<FastestCandidate> FastestGemm(const GemmPlan& plan,
                                               const cublasLtMatmulHeuristicResult_t* candidates,
                                               int count, const GemmOperands& operands);
  // kernels::LaunchGemv on the operands, timed like FastestGemm's candidates.
  absl::StatusOr<float> TimeGemv(const GemmKey& key, const GemmOperands& operands);
  // Sizes the split-K decode workspace and enqueues the attention kernels.
  absl::Status LaunchAttention(const kernels::PagedAttentionParams& params, const Tensor& k_cache);
  // Grows `buffer` to at least `bytes`, keeping the old allocation alive
  // while recorded graphs may point into it.
  absl::Status GrowKeepingGraphsSafe(DeviceBuffer& buffer, size_t bytes);
  // Whether any recorded graph is still held (not released).
  bool HoldsGraphs() const {
    return std::any_of(graphs_.begin(), graphs_.end(),
                       [](const CudaGraphExec& g) { return g.valid(); });
  }

  int device_ = 0;
  int num_sms_ = 1;
  std::string name_;
  CudaStream stream_;
  // Side work (BeginSideWork): its stream, the event it starts after, and
  // the event the main stream joins on.
  CudaStream side_stream_;
  CudaEvent side_fork_, side_done_;
  bool on_side_ = false;
  bool side_pending_ = false;  // side work enqueued and not yet joined
  CopyEngine copies_;          // KV rows <-> host, on their own stream
  CublasHandle cublas_;
  CublasLtHandle cublas_lt_;
  DeviceBuffer gemm_workspace_;
  std::array<PinnedBuffer, kStagingSlots> pinned_;
  std::array<DeviceBuffer, kStagingSlots> device_staging_;
  std::array<CudaEvent, kStagingSlots> staging_done_;
  int next_slot_ = 0;
  DeviceBuffer copy_scratch_;         // CopyToHost conversions
  DeviceBuffer attention_workspace_;  // split-KV decode partials
  // Allocations that graphs recorded before a buffer grew may still use
  // (GrowKeepingGraphsSafe); freed once no graph is held (ReleaseGraph) or
  // with the backend, after the graphs.
  std::vector<DeviceBuffer> retired_buffers_;
  DeviceBuffer cluster_workspace_;      // ClusterKeys scratch
  DeviceBuffer tier_workspace_;         // OffloadBlocks' encode jobs
  DeviceBuffer recall_workspace_;       // RecallBlocks' list of missed pieces
  DeviceBuffer side_recall_workspace_;  // ... of the side work's recalls
  // The main stream's recalls' fetch lists and host functions, by layer
  // (graphs hold their addresses: declared before graphs_).
  cuda::RecallFetchContexts recall_fetch_;
  cuda::RecallFetchContexts side_recall_fetch_;  // side work's reads ahead
  OpTimer op_timer_;
  bool capturing_ = false;             // between BeginCapture and EndCapture
  std::vector<CudaGraphExec> graphs_;  // by id
  absl::flat_hash_map<GemmKey, std::unique_ptr<GemmPlan>> gemm_plans_;
};

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int device) {
  int count = 0;
  const cudaError_t count_error = cudaGetDeviceCount(&count);
  if (count_error != cudaSuccess) {
    // Clear the sticky "last error" so later, unrelated checks don't see it.
    cudaGetLastError();
    return absl::UnavailableError(absl::StrCat(
        "no usable CUDA device: cudaGetDeviceCount failed: ", cudaGetErrorName(count_error), " (",
        cudaGetErrorString(count_error), ")"));
  }
  if (count == 0) return absl::UnavailableError("no usable CUDA device: no GPU found");
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " device(s) found)"));
  }

  auto backend = std::unique_ptr<CudaBackend>(new CudaBackend());
  backend->device_ = device;
  STRATA_RETURN_IF_ERROR(backend->Activate());
  cudaDeviceProp prop{};
  STRATA_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  if (prop.major < 8) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, " (", prop.name, ", sm_", prop.major, prop.minor,
                     ") lacks bf16 support; compute capability 8.0 or newer is required"));
  }
  backend->num_sms_ = prop.multiProcessorCount;
  backend->name_ = absl::StrCat("cuda:", device, " (", prop.name, ")");

  // The model's work goes first: side work (recalls ahead of need) takes
  // the SMs the layers leave free.
  int lowest_priority = 0, highest_priority = 0;
  STRATA_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetStreamPriorityRange(&lowest_priority, &highest_priority));
  STRATA_ASSIGN_OR_RETURN(backend->stream_, CudaStream::Create(highest_priority));
  STRATA_ASSIGN_OR_RETURN(backend->side_stream_, CudaStream::Create(lowest_priority));
  STRATA_ASSIGN_OR_RETURN(backend->side_fork_, CudaEvent::Create());
  STRATA_ASSIGN_OR_RETURN(backend->side_done_, CudaEvent::Create());
  STRATA_ASSIGN_OR_RETURN(backend->copies_, CopyEngine::Create());
  STRATA_ASSIGN_OR_RETURN(backend->cublas_, CublasHandle::Create());
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasSetStream(backend->cublas_.get(), backend->stream()));
  STRATA_ASSIGN_OR_RETURN(backend->cublas_lt_, CublasLtHandle::Create());
  STRATA_ASSIGN_OR_RETURN(backend->gemm_workspace_, DeviceBuffer::Allocate(kGemmWorkspaceBytes));
  for (int i = 0; i < kStagingSlots; ++i) {
    STRATA_ASSIGN_OR_RETURN(backend->pinned_[i], PinnedBuffer::Allocate(kStagingBytes));
    STRATA_ASSIGN_OR_RETURN(backend->device_staging_[i], DeviceBuffer::Allocate(kStagingBytes));
    STRATA_ASSIGN_OR_RETURN(backend->staging_done_[i], CudaEvent::Create());
  }
  return backend;
}

absl::Status CudaBackend::Activate() const {
  STRATA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  return absl::OkStatus();
}

// ---- Memory -----------------------------------------------------------------

absl::StatusOr<Tensor> CudaBackend::Allocate(DType dtype, std::vector<int64_t> shape) {
  if (capturing_) return CaptureError("Allocate");
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Allocate: negative dimension in [", absl::StrJoin(shape, ", "), "]"));
    }
    numel *= d;
  }
  STRATA_RETURN_IF_ERROR(Activate());
  // Never allocate zero bytes: cudaMalloc(0) yields nullptr, which would make
  // an empty tensor look undefined.
  const size_t bytes = std::max<size_t>(static_cast<size_t>(numel) * engine::DTypeSize(dtype), 16);
  void* ptr = nullptr;
  const cudaError_t error = cudaMalloc(&ptr, bytes);
  if (error != cudaSuccess) {
    cudaGetLastError();  // out-of-memory is not sticky; clear it for later checks
    size_t free_bytes = 0;
    size_t total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    return absl::ResourceExhaustedError(
        absl::StrCat("Allocate(", engine::DTypeName(dtype), "[", absl::StrJoin(shape, ", "), "], ",
                     bytes, " bytes) on cuda:", device_, " failed: ", cudaGetErrorString(error),
                     "; ", free_bytes, " of ", total_bytes, " bytes free"));
  }
  const int device = device_;
  // cudaFree implicitly synchronises the device, so freeing a tensor that
  // queued kernels still use is safe.
  std::shared_ptr<void> storage(ptr, [device](void* p) {
    int current = -1;
    cudaGetDevice(&current);
    if (current != device) cudaSetDevice(device);
    LogIfError(cudaFree(p), "cudaFree (tensor storage)");
    if (current != device && current >= 0) cudaSetDevice(current);
  });
  return Tensor(std::move(storage), dtype, std::move(shape));
}

absl::Status CudaBackend::CopyFromHost(const void* src, DType src_dtype, int64_t count, Tensor& dst,
                                       int64_t dst_offset) {
  if (capturing_) return CaptureError("CopyFromHost");
  OpTimer::Scope timed(&op_timer_, "CopyFromHost", stream());
  constexpr char kOp[] = "CopyFromHost";
  STRATA_RETURN_IF_ERROR(Check(dst.defined(), kOp, "destination is undefined"));
  STRATA_RETURN_IF_ERROR(Check(
      count >= 0 && dst_offset >= 0 && dst_offset + count <= dst.numel(), kOp,
      absl::StrCat("elements [", dst_offset, ", ", dst_offset + count, ") out of range"), {&dst}));
  const bool int_copy = src_dtype == DType::kI32 || dst.dtype() == DType::kI32;
  STRATA_RETURN_IF_ERROR(Check(!int_copy || src_dtype == dst.dtype(), kOp,
                               absl::StrCat("cannot convert ", engine::DTypeName(src_dtype), " to ",
                                            engine::DTypeName(dst.dtype())),
                               {&dst}));
  if (count == 0) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(Check(src != nullptr, kOp, "source is null"));
  STRATA_RETURN_IF_ERROR(Activate());

  const size_t src_size = engine::DTypeSize(src_dtype);
  const size_t dst_size = engine::DTypeSize(dst.dtype());
  const bool same = src_dtype == dst.dtype();
  const int64_t chunk_elems = static_cast<int64_t>(kStagingBytes / src_size);
  const auto* host = static_cast<const char*>(src);
  char* device_base = static_cast<char*>(dst.data()) + dst_offset * dst_size;
  for (int64_t done = 0; done < count; done += chunk_elems) {
    const int64_t n = std::min(chunk_elems, count - done);
    const size_t bytes = static_cast<size_t>(n) * src_size;
    const int slot = next_slot_;
    next_slot_ = (next_slot_ + 1) % kStagingSlots;
    // The slot's previous transfer must have left the pinned (and device
    // staging) buffer before it is overwritten.
    STRATA_RETURN_IF_ERROR(staging_done_[slot].Synchronize());
    std::memcpy(pinned_[slot].data(), host + done * src_size, bytes);
    char* device_dst = device_base + done * dst_size;
    if (same) {
      STRATA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_dst, pinned_[slot].data(), bytes,
                                                  cudaMemcpyHostToDevice, stream()));
    } else {
      STRATA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_staging_[slot].data(),
                                                  pinned_[slot].data(), bytes,
                                                  cudaMemcpyHostToDevice, stream()));
      STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchConvert(device_staging_[slot].data(), src_dtype,
                                                         device_dst, dst.dtype(), n, stream()));
    }
    STRATA_RETURN_IF_ERROR(staging_done_[slot].Record(stream()));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyToHost(const Tensor& src, void* dst) {
  if (capturing_) return CaptureError("CopyToHost");
  OpTimer::Scope timed(&op_timer_, "CopyToHost", stream());
  constexpr char kOp[] = "CopyToHost";
  STRATA_RETURN_IF_ERROR(Check(src.defined(), kOp, "source is undefined"));
  const int64_t count = src.numel();
  if (count == 0) return Synchronize();
  STRATA_RETURN_IF_ERROR(Check(dst != nullptr, kOp, "destination is null"));
  STRATA_RETURN_IF_ERROR(Activate());

  // fp32 and int32 tensors are copied as they are; bf16/fp16 are widened to
  // fp32 on the device chunk by chunk, then copied.
  const DType out_dtype = src.dtype() == DType::kI32 ? DType::kI32 : DType::kF32;
  const size_t src_size = engine::DTypeSize(src.dtype());
  const int64_t chunk_elems = static_cast<int64_t>(kStagingBytes / 4);
  if (src.dtype() != out_dtype) {
    STRATA_RETURN_IF_ERROR(copy_scratch_.EnsureSize(kStagingBytes));
  }
  for (int64_t done = 0; done < count; done += chunk_elems) {
    const int64_t n = std::min(chunk_elems, count - done);
    const char* device_src = static_cast<const char*>(src.data()) + done * src_size;
    const void* from = device_src;
    if (src.dtype() != out_dtype) {
      STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchConvert(
          device_src, src.dtype(), copy_scratch_.data(), out_dtype, n, stream()));
      from = copy_scratch_.data();
    }
    const int slot = next_slot_;
    next_slot_ = (next_slot_ + 1) % kStagingSlots;
    STRATA_RETURN_IF_ERROR(staging_done_[slot].Synchronize());
    const size_t bytes = static_cast<size_t>(n) * 4;
    STRATA_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(pinned_[slot].data(), from, bytes, cudaMemcpyDeviceToHost, stream()));
    STRATA_RETURN_IF_ERROR(staging_done_[slot].Record(stream()));
    // Waits for everything enqueued before, which is what CopyToHost
    // promises, and for this chunk.
    STRATA_RETURN_IF_ERROR(staging_done_[slot].Synchronize());
    std::memcpy(static_cast<char*>(dst) + done * 4, pinned_[slot].data(), bytes);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::FillRandom(Tensor& t, uint64_t seed, float scale) {
  STRATA_RETURN_IF_ERROR(Check(t.defined() && t.dtype() != DType::kI32, "FillRandom",
                               "needs a defined floating-point tensor", {&t}));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(
      kernels::LaunchFillRandom(t.data(), t.dtype(), t.numel(), seed, scale, stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Fill(Tensor& t, float value) {
  STRATA_RETURN_IF_ERROR(Check(t.defined(), "Fill", "tensor is undefined"));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchFill(t.data(), t.dtype(), t.numel(), value, stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Synchronize() {
  if (capturing_) return CaptureError("Synchronize");
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_RETURN_IF_ERROR(JoinSideWork());
  return stream_.Synchronize();
}

absl::Status CudaBackend::BeginSideWork() {
  if (on_side_) return absl::FailedPreconditionError("BeginSideWork inside side work");
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_RETURN_IF_ERROR(side_fork_.Record(stream_.get()));
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side_stream_.get(), side_fork_.get(), 0));
  on_side_ = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::EndSideWork() {
  if (!on_side_) return absl::FailedPreconditionError("EndSideWork without BeginSideWork");
  on_side_ = false;
  STRATA_RETURN_IF_ERROR(side_done_.Record(side_stream_.get()));
  side_pending_ = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::JoinSideWork() {
  if (on_side_) return absl::FailedPreconditionError("JoinSideWork inside side work");
  if (!side_pending_) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), side_done_.get(), 0));
  side_pending_ = false;
  return absl::OkStatus();
}

absl::Status CudaBackend::BeginCapture() {
  if (capturing_) return CaptureError("BeginCapture");
  // Timing events recorded inside a capture would not be timed.
  if (op_timer_.enabled()) {
    return absl::FailedPreconditionError("graph capture is off while op timing is on");
  }
  STRATA_RETURN_IF_ERROR(Activate());
  // Thread-local mode: an unsafe call (an allocation, a synchronous copy)
  // from this thread fails instead of being silently left out.
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
  return absl::OkStatus();
}

absl::StatusOr<int> CudaBackend::EndCapture() {
  if (!capturing_) return absl::FailedPreconditionError("EndCapture without BeginCapture");
  // A capture ends on the stream it began on, with every fork joined.
  if (on_side_) {
    on_side_ = false;
    LogIfError(cudaEventRecord(side_done_.get(), side_stream_.get()), "cudaEventRecord");
    side_pending_ = true;
  }
  if (absl::Status joined = JoinSideWork(); !joined.ok()) {
    STRATA_LOG_ERROR("graph capture: joining side work: {}", joined.ToString());
  }
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream(), &graph);
  if (end != cudaSuccess) {
    cudaGetLastError();  // an invalidated capture is not a sticky error
    if (graph != nullptr) LogIfError(cudaGraphDestroy(graph), "cudaGraphDestroy");
    return absl::FailedPreconditionError(
        absl::StrCat("graph capture failed: ", cudaGetErrorString(end)));
  }
  absl::StatusOr<CudaGraphExec> exec = CudaGraphExec::Instantiate(graph);
  LogIfError(cudaGraphDestroy(graph), "cudaGraphDestroy");
  if (!exec.ok()) return exec.status();
  graphs_.push_back(*std::move(exec));
  return static_cast<int>(graphs_.size()) - 1;
}

absl::Status CudaBackend::ReplayGraph(int graph) {
  if (capturing_) return CaptureError("ReplayGraph");
  // A replay would hide the operators from the op timing.
  if (op_timer_.enabled())
    return absl::FailedPreconditionError("graph replay while op timing is on");
  if (graph < 0 || graph >= static_cast<int>(graphs_.size()) || !graphs_[graph].valid()) {
    return absl::InvalidArgumentError(absl::StrCat("ReplayGraph: no graph ", graph));
  }
  STRATA_RETURN_IF_ERROR(Activate());
  return graphs_[graph].Launch(stream());
}

absl::Status CudaBackend::ReleaseGraph(int graph) {
  if (capturing_) return CaptureError("ReleaseGraph");
  if (graph < 0 || graph >= static_cast<int>(graphs_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("ReleaseGraph: no graph ", graph));
  }
  // Replays already enqueued must finish before the executable goes.
  STRATA_RETURN_IF_ERROR(Synchronize());
  graphs_[graph] = CudaGraphExec();
  // With no graph left, nothing can use the buffers kept for graphs.
  if (!HoldsGraphs()) retired_buffers_.clear();
  return absl::OkStatus();
}

// ---- Operators --------------------------------------------------------------

absl::Status CudaBackend::Gather(const Tensor& table, const Tensor& ids, Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "Gather", stream());
  constexpr char kOp[] = "Gather";
  STRATA_RETURN_IF_ERROR(Check(table.defined() && ids.defined() && out.defined(), kOp,
                               "undefined tensor", {&table, &ids, &out}));
  STRATA_RETURN_IF_ERROR(Check(table.rank() == 2 && ids.rank() == 1 && out.rank() == 2 &&
                                   out.dim(0) == ids.dim(0) && out.dim(1) == table.dim(1),
                               kOp, "expected table [V, H], ids [T], out [T, H]",
                               {&table, &ids, &out}));
  STRATA_RETURN_IF_ERROR(Check(
      table.dtype() == DType::kBF16 && out.dtype() == DType::kBF16 && ids.dtype() == DType::kI32,
      kOp, "expected bf16 table/out and i32 ids", {&table, &ids, &out}));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchGather(table.data(), ids.data_as<int32_t>(),
                                                    out.data(), ids.dim(0), table.dim(1),
                                                    table.dim(0), stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "RmsNorm", stream());
  constexpr char kOp[] = "RmsNorm";
  STRATA_RETURN_IF_ERROR(Check(x.defined() && weight.defined() && out.defined(), kOp,
                               "undefined tensor", {&x, &weight, &out}));
  STRATA_RETURN_IF_ERROR(Check(
      x.rank() >= 1 && weight.rank() == 1 && weight.dim(0) == x.dim(-1) && out.shape() == x.shape(),
      kOp, "expected x [T, H], weight [H], out [T, H]", {&x, &weight, &out}));
  STRATA_RETURN_IF_ERROR(Check(
      x.dtype() == DType::kBF16 && weight.dtype() == DType::kBF16 && out.dtype() == DType::kBF16,
      kOp, "expected bf16 tensors", {&x, &weight, &out}));
  const int64_t hidden = x.dim(-1);
  if (hidden == 0) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(
      x.data(), nullptr, weight.data(), eps, out.data(), x.numel() / hidden, hidden, stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& weight,
                                     float eps, Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "AddRmsNorm", stream());
  constexpr char kOp[] = "AddRmsNorm";
  STRATA_RETURN_IF_ERROR(
      Check(residual.defined() && x.defined() && weight.defined() && out.defined(), kOp,
            "undefined tensor", {&residual, &x, &weight, &out}));
  STRATA_RETURN_IF_ERROR(Check(x.rank() >= 1 && weight.rank() == 1 && weight.dim(0) == x.dim(-1) &&
                                   out.shape() == x.shape() && residual.shape() == x.shape(),
                               kOp, "expected residual, x, out [T, H] and weight [H]",
                               {&residual, &x, &weight, &out}));
  STRATA_RETURN_IF_ERROR(Check(residual.dtype() == DType::kBF16 && x.dtype() == DType::kBF16 &&
                                   weight.dtype() == DType::kBF16 && out.dtype() == DType::kBF16,
                               kOp, "expected bf16 tensors", {&residual, &x, &weight, &out}));
  const int64_t hidden = x.dim(-1);
  if (hidden == 0) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(x.data(), residual.data(), weight.data(), eps,
                                                     out.data(), x.numel() / hidden, hidden,
                                                     stream()));
  return absl::OkStatus();
}

absl::StatusOr<GemmPlan*> CudaBackend::GetGemmPlan(const GemmKey& key, const void* bias,
                                                   const GemmOperands& operands) {
  auto it = gemm_plans_.find(key);
  if (it != gemm_plans_.end()) return it->second.get();

  auto plan = std::make_unique<GemmPlan>();
  cublasLtMatmulDesc_t desc = nullptr;
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  plan->desc.reset(desc);
  const cublasOperation_t trans_a = CUBLAS_OP_T;
  const cublasOperation_t trans_b = CUBLAS_OP_N;
  STRATA_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  STRATA_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  if (key.bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = CUDA_R_16BF;
    STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
    // The heuristic reads the pointer's value to learn its alignment.
    STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  const uint64_t m = static_cast<uint64_t>(key.out_features);
  const uint64_t n = static_cast<uint64_t>(key.tokens);
  const uint64_t k = static_cast<uint64_t>(key.in_features);
  cublasLtMatrixLayout_t layout = nullptr;
  STRATA_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, k, m, static_cast<int64_t>(k)));
  plan->a.reset(layout);
  STRATA_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, k, n, static_cast<int64_t>(k)));
  plan->b.reset(layout);
  STRATA_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, m, n, static_cast<int64_t>(m)));
  plan->c.reset(layout);

  cublasLtMatmulPreference_t pref_raw = nullptr;
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref_raw));
  LtPreference pref(pref_raw);
  const uint64_t workspace = gemm_workspace_.size();
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_w, sizeof(key.align_w)));
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_x, sizeof(key.align_x)));
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_out, sizeof(key.align_out)));
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_out, sizeof(key.align_out)));

  // Small token counts (decode) only stream the weight, and there the
  // heuristic's first choice is often not the fastest kernel (on an H100 it
  // reached 2.3 TB/s on the 8B qkv shape, and adds a split-K reduction to
  // others): time its best candidates on these operands once and keep the
  // fastest. Not while capturing a graph (timing synchronises).
  const bool autotune = key.tokens <= kAutotuneMaxTokens && !capturing_;
  std::array<cublasLtMatmulHeuristicResult_t, kAutotuneCandidates> results{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      cublas_lt_.get(), desc, plan->a.get(), plan->b.get(), plan->c.get(), plan->c.get(), pref_raw,
      autotune ? kAutotuneCandidates : 1, results.data(), &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0 || results[0].state != CUBLAS_STATUS_SUCCESS) {
    // Odd sizes or alignments cuBLASLt has no kernel for: cublasGemmEx
    // handles every layout.
    plan->use_fallback = true;
  } else {
    FastestCandidate best;
    if (autotune && found > 1) {
      STRATA_ASSIGN_OR_RETURN(best, FastestGemm(*plan, results.data(), found, operands));
    }
    plan->algo = results[best.index].algo;
    plan->workspace_bytes = results[best.index].workspaceSize;
    // strata's GEMV (which adds any bias itself) competes at up to
    // kGemvMaxTokens tokens.
    if (autotune && best.ms > 0.0f &&
        kernels::CanUseGemv(key.tokens, key.in_features, key.out_features, operands.x,
                            operands.weight)) {
      STRATA_ASSIGN_OR_RETURN(const float gemv_ms, TimeGemv(key, operands));
      plan->use_gemv = gemv_ms < best.ms;
    }
  }
  GemmPlan* raw = plan.get();
  gemm_plans_.emplace(key, std::move(plan));
  return raw;
}

absl::StatusOr<CudaBackend::FastestCandidate> CudaBackend::FastestGemm(
    const GemmPlan& plan, const cublasLtMatmulHeuristicResult_t* candidates, int count,
    const GemmOperands& operands) {
  STRATA_ASSIGN_OR_RETURN(DeviceBuffer flush, DeviceBuffer::Allocate(kL2FlushBytes));
  STRATA_ASSIGN_OR_RETURN(CudaEvent start, CudaEvent::Create(/*timing=*/true));
  STRATA_ASSIGN_OR_RETURN(CudaEvent stop, CudaEvent::Create(/*timing=*/true));
  if (operands.bias != nullptr) {
    STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        plan.desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &operands.bias, sizeof(operands.bias)));
  }
  const float alpha = 1.0f, beta = 0.0f;
  int best = 0;
  float best_ms = 0.0f;
  for (int i = 0; i < count; ++i) {
    if (candidates[i].state != CUBLAS_STATUS_SUCCESS ||
        candidates[i].workspaceSize > gemm_workspace_.size()) {
      continue;
    }
    float total_ms = 0.0f;
    bool ok = true;
    for (int run = 0; run < 4 && ok; ++run) {  // the first run is a warm-up
      STRATA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flush.data(), run, kL2FlushBytes, stream()));
      STRATA_RETURN_IF_ERROR(start.Record(stream()));
      ok = cublasLtMatmul(cublas_lt_.get(), plan.desc.get(), &alpha, operands.weight, plan.a.get(),
                          operands.x, plan.b.get(), &beta, operands.out, plan.c.get(), operands.out,
                          plan.c.get(), &candidates[i].algo, gemm_workspace_.data(),
                          candidates[i].workspaceSize, stream()) == CUBLAS_STATUS_SUCCESS;
      STRATA_RETURN_IF_ERROR(stop.Record(stream()));
      STRATA_RETURN_IF_ERROR(stop.Synchronize());
      float ms = 0.0f;
      STRATA_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()));
      if (run > 0) total_ms += ms;
    }
    if (ok && (best_ms == 0.0f || total_ms < best_ms)) {
      best = i;
      best_ms = total_ms;
    }
  }
  return FastestCandidate{best, best_ms};
}

absl::StatusOr<float> CudaBackend::TimeGemv(const GemmKey& key, const GemmOperands& operands) {
  STRATA_ASSIGN_OR_RETURN(DeviceBuffer flush, DeviceBuffer::Allocate(kL2FlushBytes));
  STRATA_ASSIGN_OR_RETURN(CudaEvent start, CudaEvent::Create(/*timing=*/true));
  STRATA_ASSIGN_OR_RETURN(CudaEvent stop, CudaEvent::Create(/*timing=*/true));
  float total_ms = 0.0f;
  for (int run = 0; run < 4; ++run) {  // the first run is a warm-up
    STRATA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flush.data(), run, kL2FlushBytes, stream()));
    STRATA_RETURN_IF_ERROR(start.Record(stream()));
    STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchGemv(operands.x, operands.weight, operands.bias,
                                                    operands.out, static_cast<int>(key.tokens),
                                                    key.in_features, key.out_features, stream()));
    STRATA_RETURN_IF_ERROR(stop.Record(stream()));
    STRATA_RETURN_IF_ERROR(stop.Synchronize());
    float ms = 0.0f;
    STRATA_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    if (run > 0) total_ms += ms;
  }
  return total_ms;
}

absl::Status CudaBackend::Linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                 Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "Linear", stream());
  constexpr char kOp[] = "Linear";
  STRATA_RETURN_IF_ERROR(Check(x.defined() && weight.defined() && out.defined(), kOp,
                               "undefined tensor", {&x, &weight, &out}));
  STRATA_RETURN_IF_ERROR(
      Check(x.rank() == 2 && weight.rank() == 2 && out.rank() == 2 && x.dim(1) == weight.dim(1) &&
                out.dim(0) == x.dim(0) && out.dim(1) == weight.dim(0),
            kOp, "expected x [T, K], weight [N, K], out [T, N]", {&x, &weight, &out}));
  STRATA_RETURN_IF_ERROR(
      Check(!bias.defined() || (bias.rank() == 1 && bias.dim(0) == weight.dim(0)), kOp,
            "expected bias [N]", {&weight, &bias}));
  STRATA_RETURN_IF_ERROR(Check(x.dtype() == DType::kBF16 && weight.dtype() == DType::kBF16 &&
                                   out.dtype() == DType::kBF16 &&
                                   (!bias.defined() || bias.dtype() == DType::kBF16),
                               kOp, "expected bf16 tensors", {&x, &weight, &out}));
  const int64_t tokens = x.dim(0);
  const int64_t in_features = x.dim(1);
  const int64_t out_features = weight.dim(0);
  if (tokens == 0 || out_features == 0) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(Activate());
  if (in_features == 0) {
    // An empty sum: out = bias or 0.
    STRATA_CUDA_RETURN_IF_ERROR(
        kernels::LaunchFill(out.data(), out.dtype(), out.numel(), 0.0f, stream()));
    if (bias.defined()) {
      STRATA_CUDA_RETURN_IF_ERROR(
          kernels::LaunchAddBias(out.data(), bias.data(), tokens, out_features, stream()));
    }
    return absl::OkStatus();
  }

  // cuBLAS is column-major: the row-major out [T, N] is the column-major
  // N x T matrix D, and D = op(A) B where A is the weight [N, K] seen as the
  // column-major K x N matrix with op = transpose, and B is x [T, K] seen as
  // the column-major K x T matrix.
  const bool fuse_bias = bias.defined() && Aligned16(bias.data());
  const GemmKey key{tokens,
                    in_features,
                    out_features,
                    fuse_bias,
                    PointerAlignment(x.data()),
                    PointerAlignment(weight.data()),
                    PointerAlignment(out.data()),
                    fuse_bias ? PointerAlignment(bias.data()) : 0u};
  STRATA_ASSIGN_OR_RETURN(GemmPlan * plan, GetGemmPlan(key, fuse_bias ? bias.data() : nullptr,
                                                       {weight.data(), x.data(), out.data(),
                                                        fuse_bias ? bias.data() : nullptr}));
  const float alpha = 1.0f;
  const float beta = 0.0f;
  if (plan->use_gemv) {
    STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchGemv(
        x.data(), weight.data(), bias.defined() ? bias.data() : nullptr, out.data(),
        static_cast<int>(tokens), in_features, out_features, stream()));
    return absl::OkStatus();
  }
  if (!plan->use_fallback) {
    if (fuse_bias) {
      const void* bias_ptr = bias.data();
      STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
          plan->desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
    }
    STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(
        cublas_lt_.get(), plan->desc.get(), &alpha, weight.data(), plan->a.get(), x.data(),
        plan->b.get(), &beta, out.data(), plan->c.get(), out.data(), plan->c.get(), &plan->algo,
        gemm_workspace_.data(), plan->workspace_bytes, stream()));
    if (bias.defined() && !fuse_bias) {
      STRATA_CUDA_RETURN_IF_ERROR(
          kernels::LaunchAddBias(out.data(), bias.data(), tokens, out_features, stream()));
    }
    return absl::OkStatus();
  }
  STRATA_CUBLAS_RETURN_IF_ERROR(
      cublasGemmEx(cublas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_features),
                   static_cast<int>(tokens), static_cast<int>(in_features), &alpha, weight.data(),
                   CUDA_R_16BF, static_cast<int>(in_features), x.data(), CUDA_R_16BF,
                   static_cast<int>(in_features), &beta, out.data(), CUDA_R_16BF,
                   static_cast<int>(out_features), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (bias.defined()) {
    STRATA_CUDA_RETURN_IF_ERROR(
        kernels::LaunchAddBias(out.data(), bias.data(), tokens, out_features, stream()));
  }
  return absl::OkStatus();
}

namespace {

// Argument checks of Rope (and RopeWriteKv).
absl::Status CheckRopeArgs(const char* op, const Tensor& qkv, const QkvLayout& layout,
                           const Tensor& positions, const Tensor& inv_freq) {
  STRATA_RETURN_IF_ERROR(Check(qkv.defined() && positions.defined() && inv_freq.defined(), op,
                               "undefined tensor", {&qkv, &positions, &inv_freq}));
  STRATA_RETURN_IF_ERROR(Check(layout.head_dim > 0 && layout.head_dim % 2 == 0 &&
                                   layout.head_dim <= 1024 && layout.num_q_heads > 0 &&
                                   layout.num_kv_heads >= 0,
                               op,
                               absl::StrCat("bad layout: Hq=", layout.num_q_heads,
                                            " Hkv=", layout.num_kv_heads, " D=", layout.head_dim)));
  STRATA_RETURN_IF_ERROR(
      Check(qkv.rank() == 2 && qkv.dim(1) == layout.row_width() && positions.rank() == 1 &&
                positions.dim(0) == qkv.dim(0) && inv_freq.rank() == 1 &&
                inv_freq.dim(0) == layout.head_dim / 2,
            op,
            absl::StrCat("expected qkv [T, ", layout.row_width(), "], positions [T], inv_freq [",
                         layout.head_dim / 2, "]"),
            {&qkv, &positions, &inv_freq}));
  return Check(qkv.dtype() == DType::kBF16 && positions.dtype() == DType::kI32 &&
                   inv_freq.dtype() == DType::kF32,
               op, "expected bf16 qkv, i32 positions, f32 inv_freq", {&qkv, &positions, &inv_freq});
}

// The dtypes a KV cache may be stored in.
bool IsKvCacheDType(DType dtype) { return dtype == DType::kBF16 || dtype == DType::kF8E4M3; }

// Argument checks of WriteKv (and RopeWriteKv).
absl::Status CheckWriteKvArgs(const char* op, const Tensor& qkv, const QkvLayout& layout,
                              const Tensor& slots, const Tensor& k_cache, const Tensor& v_cache) {
  STRATA_RETURN_IF_ERROR(
      Check(qkv.defined() && slots.defined() && k_cache.defined() && v_cache.defined(), op,
            "undefined tensor", {&qkv, &slots, &k_cache, &v_cache}));
  STRATA_RETURN_IF_ERROR(Check(
      qkv.rank() == 2 && qkv.dim(1) == layout.row_width() && slots.rank() == 1 &&
          slots.dim(0) == qkv.dim(0) && k_cache.rank() == 4 && k_cache.shape() == v_cache.shape() &&
          k_cache.dim(2) == layout.num_kv_heads && k_cache.dim(3) == layout.head_dim,
      op,
      absl::StrCat("expected qkv [T, ", layout.row_width(), "], slots [T], caches [P, S, ",
                   layout.num_kv_heads, ", ", layout.head_dim, "]"),
      {&qkv, &slots, &k_cache, &v_cache}));
  return Check(qkv.dtype() == DType::kBF16 && slots.dtype() == DType::kI32 &&
                   IsKvCacheDType(k_cache.dtype()) && v_cache.dtype() == k_cache.dtype(),
               op, "expected bf16 qkv, i32 slots and bf16 or f8_e4m3 caches of one dtype",
               {&qkv, &slots, &k_cache, &v_cache});
}

}  // namespace

absl::Status CudaBackend::Rope(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                               const Tensor& inv_freq) {
  OpTimer::Scope timed(&op_timer_, "Rope", stream());
  STRATA_RETURN_IF_ERROR(CheckRopeArgs("Rope", qkv, layout, positions, inv_freq));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchRope(
      qkv.data(), qkv.dim(0), qkv.dim(1), layout.num_q_heads, layout.num_kv_heads, layout.head_dim,
      positions.data_as<int32_t>(), inv_freq.data_as<float>(), stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::SiluMul(const Tensor& gate_up, Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "SiluMul", stream());
  constexpr char kOp[] = "SiluMul";
  STRATA_RETURN_IF_ERROR(
      Check(gate_up.defined() && out.defined(), kOp, "undefined tensor", {&gate_up, &out}));
  STRATA_RETURN_IF_ERROR(Check(gate_up.rank() == 2 && out.rank() == 2 &&
                                   gate_up.dim(0) == out.dim(0) && gate_up.dim(1) == 2 * out.dim(1),
                               kOp, "expected gate_up [T, 2I], out [T, I]", {&gate_up, &out}));
  STRATA_RETURN_IF_ERROR(Check(gate_up.dtype() == DType::kBF16 && out.dtype() == DType::kBF16, kOp,
                               "expected bf16 tensors", {&gate_up, &out}));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(
      kernels::LaunchSiluMul(gate_up.data(), out.data(), out.dim(0), out.dim(1), stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::WriteKv(const Tensor& qkv, const QkvLayout& layout, const Tensor& slots,
                                  Tensor& k_cache, Tensor& v_cache) {
  OpTimer::Scope timed(&op_timer_, "WriteKv", stream());
  STRATA_RETURN_IF_ERROR(CheckWriteKvArgs("WriteKv", qkv, layout, slots, k_cache, v_cache));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchWriteKv(
      qkv.data(), qkv.dim(0), qkv.dim(1), layout.num_q_heads, layout.num_kv_heads, layout.head_dim,
      slots.data_as<int32_t>(), k_cache.data(), v_cache.data(), k_cache.dim(0) * k_cache.dim(1),
      k_cache.dtype(), stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::RopeWriteKv(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                                      const Tensor& inv_freq, const Tensor& slots, Tensor& k_cache,
                                      Tensor& v_cache) {
  OpTimer::Scope timed(&op_timer_, "RopeWriteKv", stream());
  STRATA_RETURN_IF_ERROR(CheckRopeArgs("RopeWriteKv", qkv, layout, positions, inv_freq));
  STRATA_RETURN_IF_ERROR(CheckWriteKvArgs("RopeWriteKv", qkv, layout, slots, k_cache, v_cache));
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchRopeWriteKv(
      qkv.data(), qkv.dim(0), qkv.dim(1), layout.num_q_heads, layout.num_kv_heads, layout.head_dim,
      positions.data_as<int32_t>(), inv_freq.data_as<float>(), slots.data_as<int32_t>(),
      k_cache.data(), v_cache.data(), k_cache.dim(0) * k_cache.dim(1), k_cache.dtype(), stream()));
  return absl::OkStatus();
}

// The parameters dense and sparse attention share: tensors, the block
// table, head geometry and scale.
kernels::PagedAttentionParams AttentionParams(const Tensor& qkv, const QkvLayout& layout,
                                              const Tensor& k_cache, const Tensor& v_cache,
                                              const AttentionBatch& batch, float scale,
                                              Tensor& out) {
  kernels::PagedAttentionParams params;
  params.qkv = qkv.data();
  params.qkv_row_width = qkv.dim(1);
  params.k_cache = k_cache.data();
  params.v_cache = v_cache.data();
  params.kv_fp8 = k_cache.dtype() == DType::kF8E4M3;
  params.num_cache_slots = k_cache.dim(0) * k_cache.dim(1);
  params.out = out.data();
  params.block_table = batch.block_table.data_as<int32_t>();
  params.max_blocks_per_seq = batch.max_blocks_per_seq;
  params.page_size = batch.page_size;
  params.num_q_heads = layout.num_q_heads;
  params.num_kv_heads = layout.num_kv_heads;
  params.head_dim = layout.head_dim;
  params.scale = scale;
  return params;
}

absl::Status CudaBackend::GrowKeepingGraphsSafe(DeviceBuffer& buffer, size_t bytes) {
  if (bytes <= buffer.size()) return absl::OkStatus();
  // Recorded graphs hold the buffer's address: while any is held, the old
  // allocation is kept rather than freed, so that a replay never writes
  // into freed memory.
  if (HoldsGraphs() && buffer.size() > 0) retired_buffers_.push_back(std::move(buffer));
  return buffer.EnsureSize(bytes);
}

absl::Status CudaBackend::LaunchAttention(const kernels::PagedAttentionParams& params,
                                          const Tensor& k_cache) {
  STRATA_RETURN_IF_ERROR(Activate());
  // The decode kernel addresses cache rows (page * page_size + offset) in
  // 32 bits.
  if (k_cache.dim(0) * k_cache.dim(1) > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: a cache of ", k_cache.dim(0),
                                                   " pages of ", k_cache.dim(1),
                                                   " tokens exceeds 2^31 token slots"));
  }
  const int num_splits = kernels::ChooseDecodeSplits(params, num_sms_);
  const size_t workspace_bytes = kernels::DecodeWorkspaceBytes(params, num_splits);
  if (workspace_bytes > 0) {
    if (capturing_ && workspace_bytes > attention_workspace_.size()) {
      return CaptureError("Growing the attention workspace");
    }
    STRATA_RETURN_IF_ERROR(GrowKeepingGraphsSafe(attention_workspace_, workspace_bytes));
  }
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchPagedAttention(
      params, num_splits, workspace_bytes > 0 ? attention_workspace_.data() : nullptr, stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Attention(const Tensor& qkv, const QkvLayout& layout,
                                    const Tensor& k_cache, const Tensor& v_cache,
                                    const AttentionBatch& batch, float scale, int sliding_window,
                                    Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "Attention", stream());
  constexpr char kOp[] = "Attention";
  STRATA_RETURN_IF_ERROR(
      Check(qkv.defined() && k_cache.defined() && v_cache.defined() && out.defined(), kOp,
            "undefined tensor", {&qkv, &k_cache, &v_cache, &out}));
  const int hq = layout.num_q_heads;
  const int hkv = layout.num_kv_heads;
  const int d = layout.head_dim;
  STRATA_RETURN_IF_ERROR(Check(
      hq > 0 && hkv > 0 && hq % hkv == 0 && d > 0 && d % 8 == 0 && d <= kernels::kMaxHeadDim, kOp,
      absl::StrCat("unsupported layout Hq=", hq, " Hkv=", hkv, " D=", d,
                   " (need Hq % Hkv == 0 and D a multiple of 8 up to ", kernels::kMaxHeadDim,
                   ")")));
  const int num_seqs = batch.num_seqs;
  STRATA_RETURN_IF_ERROR(
      Check(num_seqs >= 0 && static_cast<int>(batch.host_query_start.size()) == num_seqs + 1 &&
                static_cast<int>(batch.host_context_len.size()) == num_seqs && batch.page_size > 0,
            kOp,
            absl::StrCat("inconsistent batch: num_seqs=", num_seqs, " host_query_start has ",
                         batch.host_query_start.size(), ", host_context_len has ",
                         batch.host_context_len.size(), ", page_size=", batch.page_size)));
  const int64_t tokens = num_seqs > 0 ? batch.host_query_start[num_seqs] : 0;
  STRATA_RETURN_IF_ERROR(Check(
      qkv.rank() == 2 && qkv.dim(1) == layout.row_width() && qkv.dim(0) >= tokens &&
          out.rank() == 2 && out.dim(0) == qkv.dim(0) && out.dim(1) == int64_t{hq} * d &&
          k_cache.rank() == 4 && k_cache.shape() == v_cache.shape() &&
          k_cache.dim(1) == batch.page_size && k_cache.dim(2) == hkv && k_cache.dim(3) == d,
      kOp,
      absl::StrCat("expected qkv [T, ", layout.row_width(), "], out [T, ", int64_t{hq} * d,
                   "], caches [P, ", batch.page_size, ", ", hkv, ", ", d, "] with T >= ", tokens),
      {&qkv, &out, &k_cache, &v_cache}));
  STRATA_RETURN_IF_ERROR(
      Check(qkv.dtype() == DType::kBF16 && out.dtype() == DType::kBF16 &&
                IsKvCacheDType(k_cache.dtype()) && v_cache.dtype() == k_cache.dtype(),
            kOp, "expected bf16 qkv and out, bf16 or f8_e4m3 caches of one dtype",
            {&qkv, &out, &k_cache, &v_cache}));
  if (num_seqs == 0 || tokens == 0) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(Check(
      batch.query_start.defined() && batch.context_len.defined() && batch.block_table.defined() &&
          batch.query_start.dtype() == DType::kI32 && batch.context_len.dtype() == DType::kI32 &&
          batch.block_table.dtype() == DType::kI32 && batch.query_start.numel() >= num_seqs + 1 &&
          batch.context_len.numel() >= num_seqs &&
          batch.block_table.numel() >= int64_t{num_seqs} * batch.max_blocks_per_seq,
      kOp, "batch tensors must be i32 query_start [S+1], context_len [S], block_table [S, B]",
      {&batch.query_start, &batch.context_len, &batch.block_table}));
  // The kernels move 16 bytes at a time.
  STRATA_RETURN_IF_ERROR(Check(Aligned16(qkv.data()) && Aligned16(out.data()) &&
                                   Aligned16(k_cache.data()) && Aligned16(v_cache.data()),
                               kOp, "qkv, out and the caches must be 16-byte aligned",
                               {&qkv, &out, &k_cache, &v_cache}));

  // Validate the host copies: they size the launch and guard the kernels'
  // block-table reads.
  bool has_decode = false;
  bool has_prefill = false;
  int max_query_len = 0;
  int max_context_len = 0;
  for (int s = 0; s < num_seqs; ++s) {
    const int q_len = batch.host_query_start[s + 1] - batch.host_query_start[s];
    const int ctx = batch.host_context_len[s];
    const int64_t pages_needed = (int64_t{ctx} + batch.page_size - 1) / batch.page_size;
    if (q_len < 0 || ctx < q_len || pages_needed > batch.max_blocks_per_seq ||
        (q_len > 0 && ctx == 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": sequence ", s, " has q_len ", q_len, " and context_len ", ctx,
                       " (need 0 <= q_len <= context_len and context_len <= max_blocks_per_seq (",
                       batch.max_blocks_per_seq, ") * page_size (", batch.page_size, "))"));
    }
    has_decode |= q_len == 1;
    has_prefill |= q_len > 1;
    max_query_len = std::max(max_query_len, q_len);
    max_context_len = std::max(max_context_len, ctx);
  }

  kernels::PagedAttentionParams params =
      AttentionParams(qkv, layout, k_cache, v_cache, batch, scale, out);
  params.query_start = batch.query_start.data_as<int32_t>();
  params.context_len = batch.context_len.data_as<int32_t>();
  params.num_seqs = num_seqs;
  params.sliding_window = sliding_window;
  params.max_query_len = max_query_len;
  params.max_context_len = max_context_len;
  params.has_decode = has_decode;
  params.has_prefill = has_prefill;

  return LaunchAttention(params, k_cache);
}

// ---- Sparse decoding ----------------------------------------------------------

// Checks a cache [P, S, Hkv, D] and a sequence range against each other.
absl::Status CheckSequenceRange(const char* op, const Tensor& k_cache,
                                const engine::SequenceRange& range) {
  if (!k_cache.defined() || k_cache.rank() != 4 || !IsKvCacheDType(k_cache.dtype()) ||
      k_cache.dim(3) % 8 != 0 || k_cache.dim(3) > kernels::kMaxHeadDim ||
      !Aligned16(k_cache.data())) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": cache must be bf16 or f8_e4m3 [pages, page_size, Hkv, D] (D a multiple of 8 up to ",
        kernels::kMaxHeadDim, ", 16-byte aligned), got ", ShapeString(k_cache)));
  }
  const int64_t pages =
      (int64_t{range.begin} + range.count + range.page_size - 1) / std::max(range.page_size, 1);
  if (range.page_size != k_cache.dim(1) || range.begin < 0 || range.count < 1 ||
      !range.block_table.defined() || range.block_table.dtype() != DType::kI32 ||
      range.block_table.numel() < pages) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": range [", range.begin, ", +", range.count, ") with page_size ",
                     range.page_size, " does not fit the block table ",
                     ShapeString(range.block_table), " and the cache ", ShapeString(k_cache)));
  }
  return absl::OkStatus();
}

// Checks one pool slot [Hkv, max_blocks, last_dim] of `dtype` with room for
// `blocks_needed` blocks.
absl::Status CheckPoolSlot(const char* op, const char* name, const Tensor& t, DType dtype,
                           int64_t hkv, int64_t last_dim, int64_t blocks_needed) {
  if (!t.defined() || t.dtype() != dtype || t.rank() != 3 || t.dim(0) != hkv ||
      t.dim(2) != last_dim || t.dim(1) < blocks_needed) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", name, " must be ", DTypeName(dtype),
                                                   " [", hkv, ", >= ", blocks_needed, ", ",
                                                   last_dim, "], got ", ShapeString(t)));
  }
  return absl::OkStatus();
}

// A reorder of a sequence range: I32 [Hkv, count] (ClusterKeys,
// ReorderKeys).
absl::Status CheckOrder(const char* op, const Tensor& order, int64_t hkv, int count) {
  return Check(order.defined() && order.dtype() == DType::kI32 &&
                   order.shape() == std::vector<int64_t>{hkv, count},
               op, "order must be I32 [Hkv, count]", {&order});
}

// The kernel ranks seed candidates in the CPU reference's buckets.
static_assert(kernels::kClusterSeedSimilarityBits == engine::kSeedSimilarityBits);

absl::Status CudaBackend::ClusterKeys(Tensor& k_cache, Tensor& v_cache,
                                      const engine::SequenceRange& range, int num_clusters,
                                      int iterations, int first_block, Tensor& centroids,
                                      Tensor& extents, Tensor* order, engine::ClusterRows rows) {
  OpTimer::Scope timed(&op_timer_, "ClusterKeys", stream());
  constexpr char kOp[] = "ClusterKeys";
  STRATA_RETURN_IF_ERROR(CheckSequenceRange(kOp, k_cache, range));
  STRATA_RETURN_IF_ERROR(Check(v_cache.defined() && v_cache.shape() == k_cache.shape() &&
                                   v_cache.dtype() == k_cache.dtype() && Aligned16(v_cache.data()),
                               kOp, "v_cache must match k_cache", {&k_cache, &v_cache}));
  const int64_t hkv = k_cache.dim(2), d = k_cache.dim(3);
  if (num_clusters < 1 || num_clusters > range.count || iterations < 1 || first_block < 0) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": need 1 <= num_clusters (", num_clusters,
                                                   ") <= count (", range.count,
                                                   "), iterations >= 1 and first_block >= 0"));
  }
  if (num_clusters > kernels::kClusterKeysMaxClusters) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": num_clusters (", num_clusters,
                                                   ") exceeds the CUDA backend's limit of ",
                                                   kernels::kClusterKeysMaxClusters, " per head"));
  }
  STRATA_RETURN_IF_ERROR(CheckPoolSlot(kOp, "centroids", centroids, DType::kBF16, hkv, d,
                                       int64_t{first_block} + num_clusters));
  STRATA_RETURN_IF_ERROR(CheckPoolSlot(kOp, "extents", extents, DType::kI32, hkv, 2,
                                       int64_t{first_block} + num_clusters));
  STRATA_RETURN_IF_ERROR(Check(extents.dim(1) == centroids.dim(1), kOp,
                               "centroids and extents differ in max_blocks",
                               {&centroids, &extents}));
  kernels::ClusterKeysParams p;
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.kv_fp8 = k_cache.dtype() == DType::kF8E4M3;
  p.block_table = range.block_table.data_as<int32_t>();
  p.page_size = range.page_size;
  p.begin = range.begin;
  p.count = range.count;
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.num_clusters = num_clusters;
  p.iterations = iterations;
  p.first_block = first_block;
  p.max_blocks = static_cast<int>(centroids.dim(1));
  p.centroids = centroids.data();
  p.extents = extents.data_as<int32_t>();
  if (order != nullptr) {
    STRATA_RETURN_IF_ERROR(CheckOrder(kOp, *order, hkv, range.count));
    p.order = order->data_as<int32_t>();
  }
  p.reorder_cache = rows == engine::ClusterRows::kReorder;
  if (!p.reorder_cache && order == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": leaving the rows in place needs an order to return"));
  }
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_RETURN_IF_ERROR(cluster_workspace_.EnsureSize(kernels::ClusterKeysWorkspaceBytes(p)));
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchClusterKeys(p, cluster_workspace_.data(), stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReorderKeys(Tensor& k_cache, Tensor& v_cache,
                                      const engine::SequenceRange& range, const Tensor& order) {
  OpTimer::Scope timed(&op_timer_, "ReorderKeys", stream());
  constexpr char kOp[] = "ReorderKeys";
  STRATA_RETURN_IF_ERROR(CheckSequenceRange(kOp, k_cache, range));
  STRATA_RETURN_IF_ERROR(Check(v_cache.defined() && v_cache.shape() == k_cache.shape() &&
                                   v_cache.dtype() == k_cache.dtype() && Aligned16(v_cache.data()),
                               kOp, "v_cache must match k_cache", {&k_cache, &v_cache}));
  const int64_t hkv = k_cache.dim(2);
  STRATA_RETURN_IF_ERROR(CheckOrder(kOp, order, hkv, range.count));
  kernels::ReorderKeysParams p;
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.kv_fp8 = k_cache.dtype() == DType::kF8E4M3;
  p.block_table = range.block_table.data_as<int32_t>();
  p.page_size = range.page_size;
  p.begin = range.begin;
  p.count = range.count;
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(k_cache.dim(3));
  p.order = order.data_as<int32_t>();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_RETURN_IF_ERROR(cluster_workspace_.EnsureSize(kernels::ReorderKeysWorkspaceBytes(p)));
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchReorderKeys(p, cluster_workspace_.data(), stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::KeyBounds(const Tensor& k_cache, const engine::SequenceRange& range,
                                    int block_tokens, int first_block, Tensor& lo, Tensor& hi,
                                    Tensor& extents) {
  OpTimer::Scope timed(&op_timer_, "KeyBounds", stream());
  constexpr char kOp[] = "KeyBounds";
  STRATA_RETURN_IF_ERROR(CheckSequenceRange(kOp, k_cache, range));
  const int64_t hkv = k_cache.dim(2), d = k_cache.dim(3);
  if (block_tokens < 1 || range.count % block_tokens != 0 || first_block < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": count (", range.count,
                     ") must be a positive multiple of block_tokens (", block_tokens, ")"));
  }
  const int blocks = range.count / block_tokens;
  STRATA_RETURN_IF_ERROR(CheckPoolSlot(kOp, "lo", lo, DType::kBF16, hkv, d, first_block + blocks));
  STRATA_RETURN_IF_ERROR(CheckPoolSlot(kOp, "hi", hi, DType::kBF16, hkv, d, first_block + blocks));
  STRATA_RETURN_IF_ERROR(
      CheckPoolSlot(kOp, "extents", extents, DType::kI32, hkv, 2, first_block + blocks));
  STRATA_RETURN_IF_ERROR(Check(hi.dim(1) == lo.dim(1) && extents.dim(1) == lo.dim(1), kOp,
                               "lo, hi and extents differ in max_blocks", {&lo, &hi, &extents}));
  kernels::KeyBoundsParams p;
  p.k_cache = k_cache.data();
  p.kv_fp8 = k_cache.dtype() == DType::kF8E4M3;
  p.block_table = range.block_table.data_as<int32_t>();
  p.page_size = range.page_size;
  p.begin = range.begin;
  p.num_blocks = blocks;
  p.block_tokens = block_tokens;
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.first_block = first_block;
  p.max_blocks = static_cast<int>(lo.dim(1));
  p.lo = lo.data();
  p.hi = hi.data();
  p.extents = extents.data_as<int32_t>();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchKeyBounds(p, stream()));
  return absl::OkStatus();
}

// The largest num_blocks among plan entries [begin, end), from the host copy.
int MaxNumBlocks(const engine::SparsePlan& plan, int begin, int end) {
  // num_blocks_bound keeps the launch shape fixed across steps; the entries'
  // own maximum still wins, so a bound set too low cannot leave blocks
  // unscored or overflow the selection's shared-memory sort.
  int most = plan.num_blocks_bound;
  for (int i = begin; i < end; ++i) most = std::max(most, plan.host(i, engine::kPlanNumBlocks));
  return most;
}

absl::Status CudaBackend::ScoreBlocks(const Tensor& qkv, const QkvLayout& layout,
                                      const engine::SparsePlan& plan, int entry_begin,
                                      int entry_end, engine::BlockScoring scoring,
                                      const Tensor& summary_a, const Tensor& summary_b,
                                      Tensor& scores) {
  OpTimer::Scope timed(&op_timer_, "ScoreBlocks", stream());
  constexpr char kOp[] = "ScoreBlocks";
  const int hkv = layout.num_kv_heads, d = layout.head_dim;
  STRATA_RETURN_IF_ERROR(
      Check(entry_begin >= 0 && entry_begin <= entry_end && entry_end <= plan.num_entries, kOp,
            "entry range outside the plan"));
  const bool bounds = scoring == engine::BlockScoring::kKeyBounds;
  STRATA_RETURN_IF_ERROR(Check(
      qkv.defined() && qkv.dtype() == DType::kBF16 && qkv.rank() == 2 &&
          qkv.dim(1) == layout.row_width() && summary_a.defined() &&
          summary_a.dtype() == DType::kBF16 && summary_a.rank() == 4 && summary_a.dim(1) == hkv &&
          summary_a.dim(2) == plan.max_blocks && summary_a.dim(3) == d &&
          (!bounds || (summary_b.defined() && summary_b.shape() == summary_a.shape() &&
                       summary_b.dtype() == DType::kBF16)) &&
          scores.defined() && scores.dtype() == DType::kF32 &&
          scores.numel() >= int64_t{plan.num_entries} * hkv * plan.max_blocks,
      kOp,
      "expected bf16 qkv and summaries [slots, Hkv, max_blocks, D], f32 scores [P, Hkv, "
      "max_blocks]",
      {&qkv, &summary_a, &summary_b, &scores}));
  for (int i = entry_begin; i < entry_end; ++i) {
    if (plan.host(i, engine::kPlanSlot) >= summary_a.dim(0) ||
        plan.host(i, engine::kPlanRow) >= qkv.dim(0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": entry ", i, " outside the summaries or rows"));
    }
  }
  if (entry_begin == entry_end) return absl::OkStatus();
  kernels::ScoreBlocksParams p;
  p.qkv = qkv.data();
  p.qkv_row_width = qkv.dim(1);
  p.entries = plan.entries.data_as<int32_t>();
  p.entry_begin = entry_begin;
  p.entry_end = entry_end;
  p.num_q_heads = layout.num_q_heads;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.max_blocks = plan.max_blocks;
  p.max_num_blocks = MaxNumBlocks(plan, entry_begin, entry_end);
  p.key_bounds = bounds;
  p.summary_a = summary_a.data();
  p.summary_b = bounds ? summary_b.data() : nullptr;
  p.scores = scores.data_as<float>();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchScoreBlocks(p, stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::SelectTokens(const Tensor& scores, const Tensor& extents,
                                       engine::SparsePlan& plan) {
  OpTimer::Scope timed(&op_timer_, "SelectTokens", stream());
  constexpr char kOp[] = "SelectTokens";
  STRATA_RETURN_IF_ERROR(Check(extents.defined() && extents.dtype() == DType::kI32 &&
                                   extents.rank() == 4 && extents.dim(2) == plan.max_blocks &&
                                   extents.dim(3) == 2,
                               kOp, "extents must be i32 [slots, Hkv, max_blocks, 2]", {&extents}));
  const int64_t hkv = extents.dim(1);
  STRATA_RETURN_IF_ERROR(Check(scores.defined() && scores.dtype() == DType::kF32 &&
                                   scores.numel() >= plan.num_entries * hkv * plan.max_blocks,
                               kOp, "scores must be f32 [P, Hkv, max_blocks]", {&scores}));
  for (int i = 0; i < plan.num_entries; ++i) {
    if (plan.host(i, engine::kPlanSlot) >= extents.dim(0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": entry ", i, " names a slot outside the extents"));
    }
  }
  if (plan.num_entries == 0) return absl::OkStatus();
  kernels::SelectTokensParams p;
  p.scores = scores.data_as<float>();
  p.extents = extents.data_as<int32_t>();
  p.entries = plan.entries.data_as<int32_t>();
  p.num_entries = plan.num_entries;
  p.num_kv_heads = static_cast<int>(hkv);
  p.max_blocks = plan.max_blocks;
  p.max_num_blocks = MaxNumBlocks(plan, 0, plan.num_entries);
  p.max_keys = plan.max_keys;
  p.key_index = plan.key_index.data_as<int32_t>();
  p.key_count = plan.key_count.data_as<int32_t>();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchSelectTokens(p, stream()));
  return absl::OkStatus();
}

absl::Status CudaBackend::SparseAttention(const Tensor& qkv, const QkvLayout& layout,
                                          const Tensor& k_cache, const Tensor& v_cache,
                                          const AttentionBatch& batch,
                                          const engine::SparsePlan& plan, float scale,
                                          Tensor& out) {
  OpTimer::Scope timed(&op_timer_, "SparseAttention", stream());
  constexpr char kOp[] = "SparseAttention";
  const int hq = layout.num_q_heads, hkv = layout.num_kv_heads, d = layout.head_dim;
  STRATA_RETURN_IF_ERROR(
      Check(qkv.defined() && k_cache.defined() && v_cache.defined() && out.defined() && hq > 0 &&
                hkv > 0 && hq % hkv == 0 && d % 8 == 0 && d <= kernels::kMaxHeadDim &&
                qkv.rank() == 2 && qkv.dim(1) == layout.row_width() && out.rank() == 2 &&
                out.dim(0) == qkv.dim(0) && out.dim(1) == int64_t{hq} * d && k_cache.rank() == 4 &&
                k_cache.shape() == v_cache.shape() && k_cache.dim(1) == batch.page_size &&
                k_cache.dim(2) == hkv && k_cache.dim(3) == d && qkv.dtype() == DType::kBF16 &&
                out.dtype() == DType::kBF16 && IsKvCacheDType(k_cache.dtype()) &&
                v_cache.dtype() == k_cache.dtype() && Aligned16(qkv.data()) &&
                Aligned16(out.data()) && Aligned16(k_cache.data()) && Aligned16(v_cache.data()),
            kOp,
            "expected bf16 qkv [T, row], out [T, Hq*D] and bf16 or f8_e4m3 caches [P, page, Hkv, "
            "D]",
            {&qkv, &out, &k_cache, &v_cache}));
  STRATA_RETURN_IF_ERROR(engine::ValidateSparsePlan(plan, batch, qkv.dim(0), INT32_MAX, hkv));
  if (plan.num_entries == 0) return absl::OkStatus();

  kernels::PagedAttentionParams params =
      AttentionParams(qkv, layout, k_cache, v_cache, batch, scale, out);
  params.num_seqs = plan.num_entries;
  params.plan_entries = plan.entries.data_as<int32_t>();
  params.key_index = plan.key_index.data_as<int32_t>();
  params.key_count = plan.key_count.data_as<int32_t>();
  params.max_keys = plan.max_keys;
  params.max_query_len = 1;
  params.max_context_len = plan.max_keys;
  params.has_decode = true;
  return LaunchAttention(params, k_cache);
}

absl::Status CudaBackend::SampleTokens(const Tensor& logits, const engine::SamplingTable& sampling,
                                       Tensor& token_ids, Tensor& logprobs) {
  OpTimer::Scope timed(&op_timer_, "SampleTokens", stream());
  STRATA_RETURN_IF_ERROR(engine::ValidateSampleTokens("SampleTokens", logits, DType::kBF16,
                                                      sampling, token_ids, logprobs));
  if (logits.dim(0) == 0) return absl::OkStatus();
  kernels::SampleTokensParams p;
  p.logits = logits.data();
  p.rows = static_cast<int>(logits.dim(0));
  p.vocab = static_cast<int>(logits.dim(1));
  p.params = sampling.params.data_as<int32_t>();
  p.token_ids = token_ids.data_as<int32_t>();
  p.logprobs = logprobs.data_as<float>();
  STRATA_RETURN_IF_ERROR(Activate());
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchSampleTokens(p, stream()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<engine::Backend>> CreateCudaBackend(int device) {
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> backend, CudaBackend::Create(device));
  return std::unique_ptr<engine::Backend>(std::move(backend));
}

absl::StatusOr<CudaStreamInfo> StreamOf(engine::Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  if (cuda == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("backend ", std::string(backend.name()), " is not a CUDA backend"));
  }
  return cuda->stream_info();
}

}  // namespace strata::cuda
