// Row copies from mapped pinned host memory into device memory, done by a
// kernel instead of the copy engines.
//
// The copy engines take a batch of scattered 32 KiB rows (a long prompt's
// KV read up from the host tier: one row per page, layer and K/V) at 20-35
// GB/s, and the driver spends tens of milliseconds taking a batch of 10^5
// pieces in; a kernel whose CTAs read the host memory over the bus moves the
// same pieces near the bus rate (the recall kernel reads its pieces so, at
// 0.84 of a contiguous cudaMemcpyAsync). A few dozen CTAs keep enough reads
// in flight for the bus, and leave the other SMs to the compute stream.
//
// Thread-safety: no state; calls on one stream are ordered.
#ifndef STRATA_CUDA_KERNELS_ROW_COPY_H_
#define STRATA_CUDA_KERNELS_ROW_COPY_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata::cuda::kernels {

// One piece: `bytes` bytes from `src` (device-readable: mapped host memory
// or device memory) to `dst` (device memory). Pieces aligned to 16 bytes at
// both ends, and of a multiple of 16 bytes, move in 16-byte words; others
// byte by byte.
struct RowCopyJob {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t bytes = 0;
};

// The CTAs a launch uses when the caller has no reason to pick: enough
// bytes in flight for a PCIe 5 x16 bus (64 CTAs x 32 KiB).
inline constexpr int kRowCopyCtas = 64;

// Copies every job; `jobs` (num_jobs of them) must be device-readable
// until the copy is done. `ctas` CTAs stride over the jobs (at most
// num_jobs are launched). cudaErrorInvalidValue for a null list with jobs,
// negative counts or ctas < 1.
cudaError_t LaunchCopyRows(const RowCopyJob* jobs, int num_jobs, int ctas, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_ROW_COPY_H_
