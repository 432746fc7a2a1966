// The row copy kernel (see row_copy.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/row_copy.h"

namespace strata::cuda::kernels {
namespace {

constexpr int kThreads = 256;
// 16-byte words each thread has in flight: a CTA reads 32 KiB at once, a
// whole KV page row of the Llama-3-8B shape.
constexpr int kUnroll = 8;

__device__ bool Wide(const RowCopyJob& job) {
  return ((reinterpret_cast<uintptr_t>(job.src) | reinterpret_cast<uintptr_t>(job.dst) |
           static_cast<uint64_t>(job.bytes)) &
          15) == 0;
}

__global__ void __launch_bounds__(kThreads) CopyRowsKernel(const RowCopyJob* jobs, int num_jobs) {
  int64_t j = blockIdx.x;
  if (j >= num_jobs) return;
  RowCopyJob job = jobs[j];
  while (true) {
    // The next job's descriptor is read before this one's bytes, so its
    // trip over the bus overlaps them.
    const int64_t next = j + gridDim.x;
    RowCopyJob following;
    if (next < num_jobs) following = jobs[next];
    if (Wide(job)) {
      const auto* src = static_cast<const uint4*>(job.src);
      auto* dst = static_cast<uint4*>(job.dst);
      const int64_t words = job.bytes / 16;
      for (int64_t base = 0; base < words; base += int64_t{kThreads} * kUnroll) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + int64_t{u} * kThreads + threadIdx.x;
          if (i < words) v[u] = src[i];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + int64_t{u} * kThreads + threadIdx.x;
          if (i < words) dst[i] = v[u];
        }
      }
    } else {
      const auto* src = static_cast<const uint8_t*>(job.src);
      auto* dst = static_cast<uint8_t*>(job.dst);
      for (int64_t i = threadIdx.x; i < job.bytes; i += kThreads) dst[i] = src[i];
    }
    if (next >= num_jobs) return;
    j = next;
    job = following;
  }
}

}  // namespace

cudaError_t LaunchCopyRows(const RowCopyJob* jobs, int num_jobs, int ctas, cudaStream_t stream) {
  if (num_jobs < 0 || ctas < 1 || (num_jobs > 0 && jobs == nullptr)) return cudaErrorInvalidValue;
  if (num_jobs == 0) return cudaSuccess;
  const int grid = num_jobs < ctas ? num_jobs : ctas;
  CopyRowsKernel<<<grid, kThreads, 0, stream>>>(jobs, num_jobs);
  return cudaGetLastError();
}

}  // namespace strata::cuda::kernels
