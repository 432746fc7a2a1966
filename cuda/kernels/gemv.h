// Launcher for the decode-size matrix-vector product: out[T, N] = x[T, K] .
// w[N, K]^T (+ bias[N]) for a few tokens, bf16 in and out, fp32 sums.
//
// At a handful of tokens a linear layer only streams its weight; this kernel
// gives each warp two weight rows and keeps four 16-byte loads of each in
// flight per lane. The CUDA backend times it against cuBLASLt's candidates
// for every decode-size shape and keeps whichever is faster.
//
// Thread-safety: no state; concurrent launches on different streams are safe.
#ifndef STRATA_CUDA_KERNELS_GEMV_H_
#define STRATA_CUDA_KERNELS_GEMV_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata::cuda::kernels {

inline constexpr int kGemvMaxTokens = 4;

// Whether LaunchGemv handles these operands: 1 <= tokens <= kGemvMaxTokens,
// in_features a positive multiple of 8, x and w 16-byte aligned.
bool CanUseGemv(int64_t tokens, int64_t in_features, int64_t out_features, const void* x,
                const void* w);

// bias may be null. Requires CanUseGemv.
cudaError_t LaunchGemv(const void* x, const void* w, const void* bias, void* out, int tokens,
                       int64_t in_features, int64_t out_features, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_GEMV_H_
