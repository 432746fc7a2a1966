#include "cuda/copy_engine.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "cuda/kernels/kv_codec.h"
#include "cuda/kernels/row_copy.h"

namespace strata::cuda {

namespace {

// The kernels' view of a mapped buffer holding a job list and statuses.
absl::StatusOr<kernels::PageBlocksParams> PageParams(const engine::HostBuffer& jobs, int num_jobs,
                                                     const engine::HostBuffer& host,
                                                     const engine::Tensor& cache, bool kv_fp8) {
  kernels::PageBlocksParams p;
  p.kv_fp8 = kv_fp8;
  p.page_size = static_cast<int>(cache.dim(1));
  p.num_kv_heads = static_cast<int>(cache.dim(2));
  p.head_dim = static_cast<int>(cache.dim(3));
  void* jobs_device = nullptr;
  void* host_device = nullptr;
  STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&jobs_device, jobs.data(), 0));
  STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&host_device, host.data(), 0));
  p.jobs = static_cast<const kernels::PageBlockJob*>(jobs_device);
  p.num_jobs = num_jobs;
  p.host = static_cast<uint8_t*>(host_device);
  p.status = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(jobs_device) +
                                        size_t(num_jobs) * sizeof(kernels::PageBlockJob));
  return p;
}

// The statuses after the kernel: each must be the job's `want` (encode:
// its bytes; decode: its tokens).
absl::Status CheckPageStatuses(const engine::HostBuffer& jobs, int num_jobs, bool decode) {
  const auto* list = reinterpret_cast<const kernels::PageBlockJob*>(jobs.data());
  const auto* status = reinterpret_cast<const int32_t*>(
      jobs.data() + size_t(num_jobs) * sizeof(kernels::PageBlockJob));
  for (int j = 0; j < num_jobs; ++j) {
    const int64_t want = decode ? list[j].tokens : list[j].bytes;
    if (status[j] == want) continue;
    const char* why = "a block of another shape than asked for";
    switch (static_cast<kernels::KvBlockError>(status[j])) {
      case kernels::KvBlockError::kBadHeader:
        why = "a bad header";
        break;
      case kernels::KvBlockError::kBadCrc:
        why = "a CRC32C mismatch";
        break;
      case kernels::KvBlockError::kTruncated:
        why = "truncated";
        break;
      case kernels::KvBlockError::kTooLarge:
        why = "too large to decode";
        break;
      case kernels::KvBlockError::kWrongHeadDim:
        why = "another head_dim";
        break;
      case kernels::KvBlockError::kBadJob:
        why = "a job outside the caches";
        break;
    }
    const std::string what = absl::StrCat(decode ? "KV block decode" : "KV block encode",
                                          ": block ", j, " (page ", list[j].page, ", head ",
                                          list[j].head, "): ", why, " (status ", status[j], ")");
    return decode ? absl::DataLossError(what) : absl::InternalError(what);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CopyEngine> CopyEngine::Create() {
  CopyEngine engine;
  STRATA_ASSIGN_OR_RETURN(engine.stream_, CudaStream::Create());
  STRATA_ASSIGN_OR_RETURN(engine.compute_mark_, CudaEvent::Create());
  return engine;
}

absl::StatusOr<engine::HostBuffer> CopyEngine::AllocateHost(size_t bytes) {
  void* p = nullptr;
  const size_t rounded = std::max<size_t>(bytes, 64);
  STRATA_CUDA_RETURN_IF_ERROR(
      cudaHostAlloc(&p, rounded, cudaHostAllocPortable | cudaHostAllocMapped));
  return engine::HostBuffer{
      std::shared_ptr<void>(p, [](void* q) { LogIfError(cudaFreeHost(q), "cudaFreeHost"); }),
      bytes};
}

absl::StatusOr<engine::CopyFence> CopyEngine::CopyRows(std::span<const engine::Tensor> tensors,
                                                       std::span<const engine::RowCopy> rows,
                                                       const engine::HostBuffer& host, bool to_host,
                                                       cudaStream_t compute) {
  STRATA_RETURN_IF_ERROR(engine::ValidateRowCopies(to_host ? "CopyRowsToHost" : "CopyRowsFromHost",
                                                   tensors, rows, host));
  if (rows.empty()) return engine::kFenceDone;
  dsts_.clear();
  srcs_.clear();
  sizes_.clear();
  const bool by_kernel = !to_host && from_host_ == FromHostCopier::kKernel;
  char* host_base = reinterpret_cast<char*>(host.data());
  if (by_kernel) {
    // The kernel reads the host bytes through their device address.
    void* mapped = nullptr;
    STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&mapped, host.data(), 0));
    host_base = static_cast<char*>(mapped);
  }
  for (const engine::RowCopy& c : rows) {
    const engine::Tensor& t = tensors[c.tensor];
    const size_t row_bytes = t.nbytes() / static_cast<size_t>(t.dim(0));
    char* device = static_cast<char*>(t.data()) + static_cast<size_t>(c.row) * row_bytes;
    char* host_ptr = host_base + c.host_offset;
    void* dst = to_host ? static_cast<void*>(host_ptr) : static_cast<void*>(device);
    const void* src =
        to_host ? static_cast<const void*>(device) : static_cast<const void*>(host_ptr);
    // Adjacent on both sides: one longer copy.
    if (!sizes_.empty() && static_cast<char*>(dsts_.back()) + sizes_.back() == dst &&
        static_cast<const char*>(srcs_.back()) + sizes_.back() == src) {
      sizes_.back() += row_bytes;
      continue;
    }
    dsts_.push_back(dst);
    srcs_.push_back(src);
    sizes_.push_back(row_bytes);
  }
  if (by_kernel && sizes_.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("CopyRowsFromHost: ", sizes_.size(), " pieces"));
  }
  engine::HostBuffer jobs;
  if (by_kernel) {
    STRATA_ASSIGN_OR_RETURN(jobs, TakeJobBuffer(sizes_.size() * sizeof(kernels::RowCopyJob)));
    auto* list = reinterpret_cast<kernels::RowCopyJob*>(jobs.data());
    for (size_t i = 0; i < sizes_.size(); ++i) {
      list[i] = {srcs_[i], dsts_[i], static_cast<int64_t>(sizes_[i])};
    }
  }
  // The copies follow the compute stream's work so far.
  STRATA_RETURN_IF_ERROR(compute_mark_.Record(compute));
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), compute_mark_.get(), 0));
  if (by_kernel) {
    void* list_device = nullptr;
    STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&list_device, jobs.data(), 0));
    STRATA_CUDA_RETURN_IF_ERROR(
        kernels::LaunchCopyRows(static_cast<const kernels::RowCopyJob*>(list_device),
                                static_cast<int>(sizes_.size()), from_host_ctas_, stream_.get()));
    // The list stays alive with the fence (no statuses to check: num_jobs 0).
    return RecordFence(std::move(jobs), 0);
  }
  if (batch_supported_) {
    cudaMemcpyAttributes attrs{};
    attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attrs.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attrs_index = 0;
    const cudaError_t batch =
        cudaMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(), sizes_.size(), &attrs,
                             &attrs_index, 1, stream_.get());
    if (batch == cudaErrorNotSupported) {
      cudaGetLastError();
      batch_supported_ = false;  // an older driver: one call per copy below
    } else {
      STRATA_CUDA_RETURN_IF_ERROR(batch);
    }
  }
  if (!batch_supported_) {
    for (size_t i = 0; i < sizes_.size(); ++i) {
      STRATA_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dsts_[i], srcs_[i], sizes_[i], cudaMemcpyDefault, stream_.get()));
    }
  }
  return RecordFence(engine::HostBuffer(), 0);
}

void CopyEngine::SetFromHostCopier(FromHostCopier copier, int ctas) {
  from_host_ = copier;
  from_host_ctas_ = std::max(1, ctas);
}

absl::StatusOr<engine::HostBuffer> CopyEngine::TakeJobBuffer(size_t needed) {
  for (size_t i = 0; i < spare_jobs_.size(); ++i) {
    if (spare_jobs_[i].bytes >= needed) {
      engine::HostBuffer buffer = std::move(spare_jobs_[i]);
      spare_jobs_.erase(spare_jobs_.begin() + static_cast<std::ptrdiff_t>(i));
      return buffer;
    }
  }
  // Rounded up to a power of two (from 64 KiB), so that a few sizes serve.
  size_t bytes = size_t{64} << 10;
  while (bytes < needed) bytes *= 2;
  return AllocateHost(bytes);
}

absl::StatusOr<engine::CopyFence> CopyEngine::RecordFence(engine::HostBuffer jobs, int num_jobs) {
  Pending pending{next_fence_++, CudaEvent(), std::move(jobs), num_jobs};
  if (!spare_.empty()) {
    pending.done = std::move(spare_.back());
    spare_.pop_back();
  } else {
    STRATA_ASSIGN_OR_RETURN(pending.done, CudaEvent::Create());
  }
  STRATA_RETURN_IF_ERROR(pending.done.Record(stream_.get()));
  pending_.push_back(std::move(pending));
  return pending_.back().fence;
}

absl::StatusOr<engine::HostBuffer> CopyEngine::PageJobs(
    std::span<const engine::Tensor> k_caches, std::span<const engine::Tensor> v_caches,
    std::span<const engine::KvBlockCopy> blocks) {
  const size_t list_bytes = blocks.size() * sizeof(kernels::PageBlockJob);
  STRATA_ASSIGN_OR_RETURN(engine::HostBuffer buffer,
                          TakeJobBuffer(list_bytes + blocks.size() * sizeof(int32_t)));
  auto* jobs = reinterpret_cast<kernels::PageBlockJob*>(buffer.data());
  for (size_t i = 0; i < blocks.size(); ++i) {
    const engine::KvBlockCopy& b = blocks[i];
    jobs[i] = {k_caches[b.layer].data(),
               v_caches[b.layer].data(),
               b.page,
               b.head,
               b.tokens,
               0,
               b.host_offset,
               b.bytes};
  }
  return buffer;
}

absl::StatusOr<engine::CopyFence> CopyEngine::EncodeBlocks(
    engine::KvCodecKind codec, bool kv_fp8, std::span<const engine::Tensor> k_caches,
    std::span<const engine::Tensor> v_caches, std::span<const engine::KvBlockCopy> blocks,
    const engine::HostBuffer& host, cudaStream_t compute) {
  STRATA_RETURN_IF_ERROR(
      engine::ValidateKvBlockCopies("EncodeBlocksToHost", k_caches, v_caches, blocks, host));
  if (blocks.empty()) return engine::kFenceDone;
  if (blocks.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodeBlocksToHost: ", blocks.size(), " blocks"));
  }
  STRATA_ASSIGN_OR_RETURN(engine::HostBuffer jobs, PageJobs(k_caches, v_caches, blocks));
  const int n = static_cast<int>(blocks.size());
  STRATA_ASSIGN_OR_RETURN(kernels::PageBlocksParams p,
                          PageParams(jobs, n, host, k_caches[blocks[0].layer], kv_fp8));
  p.codec = codec;
  STRATA_RETURN_IF_ERROR(compute_mark_.Record(compute));
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), compute_mark_.get(), 0));
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchEncodePageBlocks(p, stream_.get()));
  return RecordFence(std::move(jobs), n);
}

absl::Status CopyEngine::DecodeBlocks(bool kv_fp8, const engine::HostBuffer& host,
                                      std::span<const engine::KvBlockCopy> blocks,
                                      std::span<const engine::Tensor> k_caches,
                                      std::span<const engine::Tensor> v_caches,
                                      cudaStream_t compute) {
  STRATA_RETURN_IF_ERROR(
      engine::ValidateKvBlockCopies("DecodeBlocksFromHost", k_caches, v_caches, blocks, host));
  if (blocks.empty()) return absl::OkStatus();
  if (blocks.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeBlocksFromHost: ", blocks.size(), " blocks"));
  }
  STRATA_ASSIGN_OR_RETURN(engine::HostBuffer jobs, PageJobs(k_caches, v_caches, blocks));
  const int n = static_cast<int>(blocks.size());
  STRATA_ASSIGN_OR_RETURN(kernels::PageBlocksParams p,
                          PageParams(jobs, n, host, k_caches[blocks[0].layer], kv_fp8));
  // After every read of the rows enqueued so far.
  STRATA_RETURN_IF_ERROR(compute_mark_.Record(compute));
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), compute_mark_.get(), 0));
  STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchDecodePageBlocks(p, stream_.get()));
  // Waited for here: the compute enqueued after this returns follows it.
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  const absl::Status decoded = CheckPageStatuses(jobs, n, /*decode=*/true);
  if (spare_jobs_.size() < 8) spare_jobs_.push_back(std::move(jobs));
  return decoded;
}

absl::Status CopyEngine::Retire(bool wait_for, engine::CopyFence upto) {
  while (!pending_.empty() && pending_.front().fence <= upto) {
    Pending& p = pending_.front();
    if (wait_for) {
      STRATA_RETURN_IF_ERROR(p.done.Synchronize());
    } else {
      const cudaError_t state = cudaEventQuery(p.done.get());
      if (state == cudaErrorNotReady) break;
      STRATA_CUDA_RETURN_IF_ERROR(state);
    }
    done_upto_ = p.fence;
    spare_.push_back(std::move(p.done));
    const absl::Status encoded =
        p.num_jobs > 0 ? CheckPageStatuses(p.jobs, p.num_jobs, /*decode=*/false) : absl::OkStatus();
    if (p.jobs.defined() && spare_jobs_.size() < 8) spare_jobs_.push_back(std::move(p.jobs));
    pending_.pop_front();
    STRATA_RETURN_IF_ERROR(encoded);
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> CopyEngine::FenceDone(engine::CopyFence fence) {
  if (fence >= next_fence_) {
    return absl::InvalidArgumentError(absl::StrCat("copy fence ", fence, " was never issued"));
  }
  if (fence <= done_upto_) return true;
  STRATA_RETURN_IF_ERROR(Retire(/*wait_for=*/false, fence));
  return fence <= done_upto_;
}

absl::Status CopyEngine::WaitFence(engine::CopyFence fence) {
  if (fence >= next_fence_) {
    return absl::InvalidArgumentError(absl::StrCat("copy fence ", fence, " was never issued"));
  }
  return Retire(/*wait_for=*/true, fence);
}

absl::Status CopyEngine::ComputeAfterFence(engine::CopyFence fence, cudaStream_t compute) {
  STRATA_ASSIGN_OR_RETURN(const bool done, FenceDone(fence));
  if (done) return absl::OkStatus();
  // Events on one stream complete in order: waiting for the first pending
  // fence at or after `fence` waits for `fence` itself.
  for (const Pending& p : pending_) {
    if (p.fence >= fence) {
      STRATA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute, p.done.get(), 0));
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

absl::Status CopyEngine::ChecksumRows(std::span<const engine::Tensor> tensors,
                                      std::span<const engine::RowCopy> rows,
                                      std::span<uint32_t> crcs) {
  STRATA_RETURN_IF_ERROR(engine::ValidateChecksumRows("ChecksumRows", tensors, rows, crcs));
  if (rows.empty()) return absl::OkStatus();
  if (rows.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("ChecksumRows: ", rows.size(), " rows"));
  }
  const size_t list_bytes = rows.size() * sizeof(kernels::Crc32cRow);
  const size_t needed = list_bytes + rows.size() * sizeof(uint32_t);
  if (checksum_scratch_.bytes < needed) {
    STRATA_ASSIGN_OR_RETURN(checksum_scratch_,
                            AllocateHost(std::max(needed, 2 * checksum_scratch_.bytes)));
  }
  auto* list = reinterpret_cast<kernels::Crc32cRow*>(checksum_scratch_.data());
  auto* results = reinterpret_cast<uint32_t*>(checksum_scratch_.data() + list_bytes);
  for (size_t i = 0; i < rows.size(); ++i) {
    const engine::Tensor& t = tensors[rows[i].tensor];
    const size_t row_bytes = t.nbytes() / static_cast<size_t>(t.dim(0));
    list[i] = {static_cast<const uint8_t*>(t.data()) + static_cast<size_t>(rows[i].row) * row_bytes,
               static_cast<int64_t>(row_bytes)};
  }
  // Mapped memory: the kernel reads the list and writes the results over
  // the bus (16 and 4 bytes per row, against the row's tens of KiB).
  void* list_device = nullptr;
  STRATA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&list_device, checksum_scratch_.data(), 0));
  auto* results_device = reinterpret_cast<uint32_t*>(static_cast<char*>(list_device) + list_bytes);
  STRATA_CUDA_RETURN_IF_ERROR(
      kernels::LaunchRowCrc32c(static_cast<const kernels::Crc32cRow*>(list_device),
                               static_cast<int>(rows.size()), results_device, stream_.get()));
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  std::copy(results, results + rows.size(), crcs.begin());
  return absl::OkStatus();
}

absl::Status CopyEngine::WaitAll() { return Retire(/*wait_for=*/true, next_fence_ - 1); }

}  // namespace strata::cuda
