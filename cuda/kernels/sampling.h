// Launcher of the token sampling kernel (engine::Backend::SampleTokens; the
// CPU reference is in engine/cpu_backend.cc and the arithmetic both share in
// engine/sample_math.h).
//
// One thread block per row of bf16 logits: a pass for the argmax and the
// log-sum-exp; for top-k, a two-pass radix select (8 bits a pass over the
// 16-bit order-preserving key of the bf16 logit) for the k-th largest key;
// for top-p, the same select over the fixed-point masses of the top-k set;
// where a threshold key is shared by more tokens than are kept, the lowest
// ids among them are found by a block-wide scan; a last pass runs the
// Gumbel-max race over the kept tokens. Later passes read the row from L2.
//
// Thread-safety: no state; calls on one stream are ordered.
#ifndef STRATA_CUDA_KERNELS_SAMPLING_H_
#define STRATA_CUDA_KERNELS_SAMPLING_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace strata::cuda::kernels {

struct SampleTokensParams {
  const void* logits = nullptr;  // bf16 [rows, vocab]
  int rows = 0;
  int vocab = 0;
  const int32_t* params = nullptr;  // [rows, engine::kSamplingFields]
  int32_t* token_ids = nullptr;     // [rows]
  float* logprobs = nullptr;        // [rows]
};

// Enqueues the kernel; returns the launch error. rows == 0 launches nothing.
cudaError_t LaunchSampleTokens(const SampleTokensParams& params, cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_SAMPLING_H_
