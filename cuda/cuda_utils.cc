#include "cuda/cuda_utils.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace strata::cuda {
namespace {

// Strips the directories from __FILE__ so messages stay short.
const char* BaseName(const char* file) {
  const char* base = file;
  for (const char* p = file; *p != '\0'; ++p) {
    if (*p == '/') base = p + 1;
  }
  return base;
}

}  // namespace

absl::Status CudaStatus(cudaError_t error, const char* expr, const char* file, int line) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(expr, " failed: ", cudaGetErrorName(error), " (", cudaGetErrorString(error),
                   ") at ", BaseName(file), ":", line);
  switch (error) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInvalidDevice:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return absl::UnavailableError(message);
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasStatus(cublasStatus_t status, const char* expr, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrCat(expr, " failed: ", cublasGetStatusName(status), " (",
                   cublasGetStatusString(status), ") at ", BaseName(file), ":", line);
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUBLAS_STATUS_INVALID_VALUE:
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

void LogIfError(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    STRATA_LOG_ERROR("{} failed: {} ({})", what, cudaGetErrorName(error),
                     cudaGetErrorString(error));
  }
}

// ---- CudaStream -------------------------------------------------------------

absl::StatusOr<CudaStream> CudaStream::Create(int priority) {
  CudaStream stream;
  STRATA_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithPriority(&stream.stream_, cudaStreamNonBlocking, priority));
  return stream;
}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    Reset();
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

void CudaStream::Reset() {
  if (stream_ != nullptr) {
    LogIfError(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    LogIfError(cudaStreamDestroy(stream_), "cudaStreamDestroy");
    stream_ = nullptr;
  }
}

absl::Status CudaStream::Synchronize() const {
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

// ---- CudaEvent --------------------------------------------------------------

absl::StatusOr<CudaEvent> CudaEvent::Create(bool timing) {
  CudaEvent event;
  STRATA_CUDA_RETURN_IF_ERROR(
      cudaEventCreateWithFlags(&event.event_, timing ? cudaEventDefault : cudaEventDisableTiming));
  return event;
}

CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  if (this != &other) {
    Reset();
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

void CudaEvent::Reset() {
  if (event_ != nullptr) {
    LogIfError(cudaEventDestroy(event_), "cudaEventDestroy");
    event_ = nullptr;
  }
}

absl::Status CudaEvent::Record(cudaStream_t stream) const {
  STRATA_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream));
  return absl::OkStatus();
}

absl::Status CudaEvent::Synchronize() const {
  STRATA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
  return absl::OkStatus();
}

// ---- CudaGraphExec ----------------------------------------------------------

absl::StatusOr<CudaGraphExec> CudaGraphExec::Instantiate(cudaGraph_t graph) {
  CudaGraphExec exec;
  STRATA_CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&exec.exec_, graph, 0));
  return exec;
}

CudaGraphExec& CudaGraphExec::operator=(CudaGraphExec&& other) noexcept {
  if (this != &other) {
    Reset();
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}

void CudaGraphExec::Reset() {
  if (exec_ != nullptr) {
    LogIfError(cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy");
    exec_ = nullptr;
  }
}

absl::Status CudaGraphExec::Launch(cudaStream_t stream) const {
  STRATA_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, stream));
  return absl::OkStatus();
}

// ---- cuBLAS handles ---------------------------------------------------------

absl::StatusOr<CublasHandle> CublasHandle::Create() {
  CublasHandle handle;
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle.handle_));
  return handle;
}

CublasHandle& CublasHandle::operator=(CublasHandle&& other) noexcept {
  if (this != &other) {
    Reset();
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

void CublasHandle::Reset() {
  if (handle_ != nullptr) {
    const cublasStatus_t status = cublasDestroy(handle_);
    if (status != CUBLAS_STATUS_SUCCESS) {
      STRATA_LOG_ERROR("cublasDestroy failed: {}", cublasGetStatusName(status));
    }
    handle_ = nullptr;
  }
}

absl::StatusOr<CublasLtHandle> CublasLtHandle::Create() {
  CublasLtHandle handle;
  STRATA_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle.handle_));
  return handle;
}

CublasLtHandle& CublasLtHandle::operator=(CublasLtHandle&& other) noexcept {
  if (this != &other) {
    Reset();
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

void CublasLtHandle::Reset() {
  if (handle_ != nullptr) {
    const cublasStatus_t status = cublasLtDestroy(handle_);
    if (status != CUBLAS_STATUS_SUCCESS) {
      STRATA_LOG_ERROR("cublasLtDestroy failed: {}", cublasGetStatusName(status));
    }
    handle_ = nullptr;
  }
}

// ---- DeviceBuffer -----------------------------------------------------------

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer buffer;
  if (bytes > 0) {
    STRATA_CUDA_RETURN_IF_ERROR(cudaMalloc(&buffer.data_, bytes));
    buffer.bytes_ = bytes;
  }
  return buffer;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr) {
    LogIfError(cudaFree(data_), "cudaFree");
    data_ = nullptr;
    bytes_ = 0;
  }
}

absl::Status DeviceBuffer::EnsureSize(size_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  Reset();
  // Grow geometrically so a slowly increasing demand does not reallocate
  // (and implicitly synchronise the device) on every call.
  const size_t grown = bytes + bytes / 4;
  absl::StatusOr<DeviceBuffer> buffer = Allocate(grown);
  if (!buffer.ok()) return buffer.status();
  *this = std::move(buffer).value();
  return absl::OkStatus();
}

// ---- PinnedBuffer -----------------------------------------------------------

absl::StatusOr<PinnedBuffer> PinnedBuffer::Allocate(size_t bytes) {
  PinnedBuffer buffer;
  if (bytes > 0) {
    STRATA_CUDA_RETURN_IF_ERROR(cudaMallocHost(&buffer.data_, bytes));
    buffer.bytes_ = bytes;
  }
  return buffer;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void PinnedBuffer::Reset() {
  if (data_ != nullptr) {
    LogIfError(cudaFreeHost(data_), "cudaFreeHost");
    data_ = nullptr;
    bytes_ = 0;
  }
}

}  // namespace strata::cuda
