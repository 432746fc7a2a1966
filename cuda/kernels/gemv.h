// Launcher for the weight-streaming Linear kernel used at small token counts
// (decode): out[T, N] = x[T, K] * W[N, K]^T (+ bias[N]) in bf16 with fp32
// accumulation, for 1 <= T <= kSmallBatchMaxTokens.
//
// At these sizes the product is bound by reading W once; the kernel streams
// W with 16-byte loads and keeps many of them in flight per SM, in a single
// kernel (cuBLASLt reaches about 2.3-2.8 TB/s on an H100 at the Llama-3-8B
// shapes and adds a split-K reduction kernel for N = 4096).
//
// Like the launchers in elementwise.h it enqueues on `stream`, returns the
// launch error and does no shape validation beyond what
// SmallBatchLinearSupported() states. "bf16" pointers hold __nv_bfloat16 data.
//
// Thread-safety: the launcher keeps no state; concurrent calls on different
// streams are safe.
#ifndef STRATA_CUDA_KERNELS_GEMV_H_
#define STRATA_CUDA_KERNELS_GEMV_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata::cuda::kernels {

inline constexpr int64_t kSmallBatchMaxTokens = 8;

// Whether LaunchSmallBatchLinear handles this product: 1 <= tokens <= 8,
// in_features a positive multiple of 8, out_features > 0 and x and weight
// 16-byte aligned (rows are then 16-byte aligned too). out and bias may have
// any alignment; rows of x, weight and out are contiguous.
bool SmallBatchLinearSupported(const void* x, const void* weight, int64_t tokens,
                               int64_t in_features, int64_t out_features);

// out[t, n] = sum_k x[t, k] * weight[n, k] (+ bias[n] if bias is non-null),
// rounded once to bf16. Requires SmallBatchLinearSupported(...).
cudaError_t LaunchSmallBatchLinear(const void* x, const void* weight, const void* bias, void* out,
                                   int64_t tokens, int64_t in_features, int64_t out_features,
                                   cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_GEMV_H_
