// Error handling and RAII wrappers for the CUDA runtime, cuBLAS and cuBLASLt.
//
// Every CUDA or cuBLAS call in the backend goes through one of the macros
// below, which turn a failing cudaError_t / cublasStatus_t into an
// absl::Status naming the call text, the error and file:line, and return it
// from the enclosing function:
//
//   STRATA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0, n, stream));
//   STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(...));
//   STRATA_CUDA_RETURN_IF_ERROR(kernels::LaunchSiluMul(...));  // launchers
//                                                              // return the
//                                                              // launch error
//
// The wrappers own one resource each and release it in their destructor
// (errors there can only be logged). They are created through static
// factories returning absl::StatusOr, so nothing here throws. They are
// move-only and, like the CUDA objects they wrap, not synchronised: a wrapper
// is used by one thread at a time.
#ifndef STRATA_CUDA_CUDA_UTILS_H_
#define STRATA_CUDA_CUDA_UTILS_H_

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata::cuda {

// Converts a CUDA runtime result into a Status. `expr` is the call's source
// text; OK for cudaSuccess. Missing devices and drivers map to Unavailable,
// out-of-memory to ResourceExhausted, everything else to Internal.
absl::Status CudaStatus(cudaError_t error, const char* expr, const char* file, int line);
// Same for cuBLAS / cuBLASLt results.
absl::Status CublasStatus(cublasStatus_t status, const char* expr, const char* file, int line);

}  // namespace strata::cuda

#define STRATA_CUDA_STATUS(expr) ::strata::cuda::CudaStatus((expr), #expr, __FILE__, __LINE__)
#define STRATA_CUBLAS_STATUS(expr) ::strata::cuda::CublasStatus((expr), #expr, __FILE__, __LINE__)

#define STRATA_CUDA_RETURN_IF_ERROR(expr)                                               \
  do {                                                                                  \
    const cudaError_t strata_cuda_error_ = (expr);                                      \
    if (strata_cuda_error_ != cudaSuccess) {                                            \
      return ::strata::cuda::CudaStatus(strata_cuda_error_, #expr, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)

#define STRATA_CUBLAS_RETURN_IF_ERROR(expr)                                                  \
  do {                                                                                       \
    const cublasStatus_t strata_cublas_status_ = (expr);                                     \
    if (strata_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                    \
      return ::strata::cuda::CublasStatus(strata_cublas_status_, #expr, __FILE__, __LINE__); \
    }                                                                                        \
  } while (0)

namespace strata::cuda {

// Logs (does not return) a failure of a call made in a destructor, where
// there is nobody to return a Status to.
void LogIfError(cudaError_t error, const char* what);

// An owned cudaStream_t (non-blocking with respect to the legacy default
// stream, so work on it never serialises with stray default-stream calls).
class CudaStream {
 public:
  // `priority` as cudaStreamCreateWithPriority takes it: lower numbers are
  // scheduled first; 0 is the default (and the lowest).
  static absl::StatusOr<CudaStream> Create(int priority = 0);
  CudaStream() = default;
  CudaStream(CudaStream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream() { Reset(); }

  cudaStream_t get() const { return stream_; }
  // Waits for all work enqueued so far; returns asynchronous errors.
  absl::Status Synchronize() const;

 private:
  void Reset();
  cudaStream_t stream_ = nullptr;
};

// An owned cudaEvent_t, created without timing (cheapest to record and wait
// on) unless `timing` is set.
class CudaEvent {
 public:
  static absl::StatusOr<CudaEvent> Create(bool timing = false);
  CudaEvent() = default;
  CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& other) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent() { Reset(); }

  cudaEvent_t get() const { return event_; }
  absl::Status Record(cudaStream_t stream) const;
  // Blocks the calling host thread until the last recorded work completes
  // (returns at once if the event was never recorded).
  absl::Status Synchronize() const;

 private:
  void Reset();
  cudaEvent_t event_ = nullptr;
};

// An owned, instantiated CUDA graph.
class CudaGraphExec {
 public:
  // Instantiates `graph` (which stays owned by the caller).
  static absl::StatusOr<CudaGraphExec> Instantiate(cudaGraph_t graph);
  CudaGraphExec() = default;
  CudaGraphExec(CudaGraphExec&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}
  CudaGraphExec& operator=(CudaGraphExec&& other) noexcept;
  CudaGraphExec(const CudaGraphExec&) = delete;
  CudaGraphExec& operator=(const CudaGraphExec&) = delete;
  ~CudaGraphExec() { Reset(); }

  absl::Status Launch(cudaStream_t stream) const;
  bool valid() const { return exec_ != nullptr; }

 private:
  void Reset();
  cudaGraphExec_t exec_ = nullptr;
};

// An owned cuBLAS handle.
class CublasHandle {
 public:
  static absl::StatusOr<CublasHandle> Create();
  CublasHandle() = default;
  CublasHandle(CublasHandle&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  CublasHandle& operator=(CublasHandle&& other) noexcept;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle() { Reset(); }

  cublasHandle_t get() const { return handle_; }

 private:
  void Reset();
  cublasHandle_t handle_ = nullptr;
};

// An owned cuBLASLt handle.
class CublasLtHandle {
 public:
  static absl::StatusOr<CublasLtHandle> Create();
  CublasLtHandle() = default;
  CublasLtHandle(CublasLtHandle&& other) noexcept
      : handle_(std::exchange(other.handle_, nullptr)) {}
  CublasLtHandle& operator=(CublasLtHandle&& other) noexcept;
  CublasLtHandle(const CublasLtHandle&) = delete;
  CublasLtHandle& operator=(const CublasLtHandle&) = delete;
  ~CublasLtHandle() { Reset(); }

  cublasLtHandle_t get() const { return handle_; }

 private:
  void Reset();
  cublasLtHandle_t handle_ = nullptr;
};

// Device memory from cudaMalloc. Freeing it (destructor, Reset) implicitly
// waits for the device, so a buffer may be replaced while earlier kernels
// that use it are still queued.
class DeviceBuffer {
 public:
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  void Reset();
  // Makes the buffer at least `bytes` large; the contents are not kept.
  absl::Status EnsureSize(size_t bytes);

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory from cudaMallocHost, for asynchronous copies.
class PinnedBuffer {
 public:
  static absl::StatusOr<PinnedBuffer> Allocate(size_t bytes);
  PinnedBuffer() = default;
  PinnedBuffer(PinnedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { Reset(); }

  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  void Reset();

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace strata::cuda

#endif  // STRATA_CUDA_CUDA_UTILS_H_
