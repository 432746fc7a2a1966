// CopyEngine: the CUDA backend's asynchronous copies between device rows
// (pages of the KV caches) and pinned host memory, on a stream of their own.
//
// Each call enqueues one batch of copies (cudaMemcpyBatchAsync: the copy
// engines walk the list, so thousands of 32 KiB pages cost one call, not one
// call each) after an event recorded on the compute stream, then records a
// fence event. Fences are numbered in enqueue order; since they all live on
// one stream, a fence is done exactly when its event is, and every earlier
// fence is done too. Rows that are adjacent on both sides are merged into
// one copy. Copies to the device are done by default by a kernel reading
// the mapped host memory (kernels/row_copy.h says why), on the same stream.
//
// Thread-safety: used by the backend's one thread at a time, like the
// backend.
#ifndef STRATA_CUDA_COPY_ENGINE_H_
#define STRATA_CUDA_COPY_ENGINE_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cuda/cuda_utils.h"
#include "cuda/kernels/row_copy.h"
#include "engine/backend.h"

namespace strata::cuda {

class CopyEngine {
 public:
  static absl::StatusOr<CopyEngine> Create();

  // Who moves the rows of a copy to the device.
  enum class FromHostCopier {
    kKernel,       // kernels::LaunchCopyRows with `ctas` CTAs (the default)
    kCopyEngines,  // one cudaMemcpyBatchAsync, as the copies to the host
  };
  void SetFromHostCopier(FromHostCopier copier, int ctas);

  // Pinned, device-mapped host memory (cudaHostAlloc, portable and mapped).
  static absl::StatusOr<engine::HostBuffer> AllocateHost(size_t bytes);

  // See engine::Backend::CopyRowsToHost / CopyRowsFromHost. `compute` is the
  // stream whose work so far the copies follow.
  absl::StatusOr<engine::CopyFence> CopyRows(std::span<const engine::Tensor> tensors,
                                             std::span<const engine::RowCopy> rows,
                                             const engine::HostBuffer& host, bool to_host,
                                             cudaStream_t compute);
  absl::StatusOr<bool> FenceDone(engine::CopyFence fence);
  absl::Status WaitFence(engine::CopyFence fence);
  // Makes `compute` wait for the fence on the device.
  absl::Status ComputeAfterFence(engine::CopyFence fence, cudaStream_t compute);
  // See engine::Backend::ChecksumRows: a kernel on the copy stream, after
  // the copies enqueued so far, writes the rows' CRCs to mapped host memory;
  // the calling thread waits for it.
  absl::Status ChecksumRows(std::span<const engine::Tensor> tensors,
                            std::span<const engine::RowCopy> rows, std::span<uint32_t> crcs);
  // See engine::Backend::EncodeBlocksToHost / DecodeBlocksFromHost: the
  // codec kernels run on the copy stream after the compute stream's work so
  // far, reading (encode) or writing (decode) mapped host memory. `kv_fp8`:
  // the caches hold fp8 e4m3 (else bf16). An encode's job list and status
  // stay alive with its fence; each block's status is checked when the
  // fence is retired (an error then names the block). Decode waits.
  absl::StatusOr<engine::CopyFence> EncodeBlocks(engine::KvCodecKind codec, bool kv_fp8,
                                                 std::span<const engine::Tensor> k_caches,
                                                 std::span<const engine::Tensor> v_caches,
                                                 std::span<const engine::KvBlockCopy> blocks,
                                                 const engine::HostBuffer& host,
                                                 cudaStream_t compute);
  absl::Status DecodeBlocks(bool kv_fp8, const engine::HostBuffer& host,
                            std::span<const engine::KvBlockCopy> blocks,
                            std::span<const engine::Tensor> k_caches,
                            std::span<const engine::Tensor> v_caches, cudaStream_t compute);
  // Waits for every copy (the backend's destructor calls it).
  absl::Status WaitAll();

 private:
  struct Pending {
    engine::CopyFence fence;
    CudaEvent done;
    // An encode's job list and per-block status (mapped), checked when the
    // fence is retired (num_jobs of them); a kernel copy's job list, kept
    // until then (num_jobs 0: nothing to check); empty for the copy
    // engines' copies.
    engine::HostBuffer jobs;
    int num_jobs = 0;
  };
  // Fills a mapped buffer with the codec kernels' job list for `blocks`
  // and room for their statuses after it.
  absl::StatusOr<engine::HostBuffer> PageJobs(std::span<const engine::Tensor> k_caches,
                                              std::span<const engine::Tensor> v_caches,
                                              std::span<const engine::KvBlockCopy> blocks);
  // A mapped buffer of at least `needed` bytes for a job list: a spare one
  // or a new one.
  absl::StatusOr<engine::HostBuffer> TakeJobBuffer(size_t needed);
  // Records a new fence on the copy stream.
  absl::StatusOr<engine::CopyFence> RecordFence(engine::HostBuffer jobs, int num_jobs);
  // Pops the fences whose events completed; an error event is reported.
  absl::Status Retire(bool wait_for, engine::CopyFence upto);

  CudaStream stream_;
  CudaEvent compute_mark_;
  std::deque<Pending> pending_;   // ascending fences, not known done
  std::vector<CudaEvent> spare_;  // events of retired fences, for reuse
  // Job buffers of retired codec and kernel copy calls, for reuse: freeing pinned memory
  // (cudaFreeHost) waits for the whole device, which an export per prefill
  // chunk must not do.
  std::vector<engine::HostBuffer> spare_jobs_;
  engine::CopyFence next_fence_ = 1;
  engine::CopyFence done_upto_ = 0;  // every fence <= this is done
  bool batch_supported_ = true;      // cudaMemcpyBatchAsync worked (or was not tried)
  FromHostCopier from_host_ = FromHostCopier::kKernel;
  int from_host_ctas_ = kernels::kRowCopyCtas;
  // Scratch of the last batch (kept to avoid reallocating per call).
  std::vector<void*> dsts_;
  std::vector<const void*> srcs_;
  std::vector<size_t> sizes_;
  // ChecksumRows' row list and results, mapped for the kernel; grown as
  // needed and reused.
  engine::HostBuffer checksum_scratch_;
};

}  // namespace strata::cuda

#endif  // STRATA_CUDA_COPY_ENGINE_H_
