// The CUDA backend: engine::Backend on one NVIDIA GPU.
//
// Weights, activations and the KV cache are bf16 (activation_dtype() ==
// kBF16); every operator accumulates in fp32. F32 tensors (e.g. rope inverse
// frequencies) and I32 tensors keep their dtype. GEMMs go through cuBLASLt
// (bf16 in/out, fp32 compute, bias fused as an epilogue), the other
// operators through the kernels in cuda/kernels/. All work is enqueued on one
// non-default stream owned by the backend; tensors are cudaMalloc'ed and
// freed by their shared storage's deleter when the last copy goes away.
//
// Thread-safety: like every Backend, an instance is used by one thread at a
// time. Tensors may be released from any thread.
#ifndef STRATA_CUDA_CUDA_BACKEND_H_
#define STRATA_CUDA_CUDA_BACKEND_H_

#include <cuda_runtime_api.h>

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace strata::cuda {

// Creates a backend on CUDA device `device`. Returns Unavailable when the
// machine has no usable GPU or driver (e.g. CI runners with nvcc but no GPU),
// InvalidArgument for a device index that does not exist, and other errors
// when the device is present but cannot be set up.
absl::StatusOr<std::unique_ptr<engine::Backend>> CreateCudaBackend(int device = 0);

// Where a CUDA backend enqueues its operators now: its device, and its
// compute stream (its side stream between BeginSideWork and EndSideWork).
// For work issued outside the backend that must be ordered with its
// operators and recorded into its graphs, such as NCCL collectives
// (cuda/nccl_communicator.h). The stream belongs to the backend.
struct CudaStreamInfo {
  int device = 0;
  cudaStream_t stream = nullptr;
};
// InvalidArgument when `backend` is not a CUDA backend. Like the backend, to
// be called from the thread driving it.
absl::StatusOr<CudaStreamInfo> StreamOf(engine::Backend& backend);

}  // namespace strata::cuda

#endif  // STRATA_CUDA_CUDA_BACKEND_H_
