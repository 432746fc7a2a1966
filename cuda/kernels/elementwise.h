// Launchers for the memory-bound kernels of the CUDA backend: dtype
// conversion, fills, embedding gather, RMS norm, SiLU-and-multiply, rotary
// embedding and paged KV-cache writes.
//
// Each launcher enqueues one kernel on `stream` and returns the launch error
// (cudaGetLastError after the launch); execution errors surface at the next
// synchronisation. Launchers do no shape checking: the backend validates
// shapes and dtypes before calling. "bf16" pointers hold __nv_bfloat16 data;
// they are typed void* / uint16_t* here so that these headers compile with a
// plain C++ compiler. Element counts of zero launch nothing.
//
// Thread-safety: launchers keep no state; concurrent calls on different
// streams are safe.
#ifndef STRATA_CUDA_KERNELS_ELEMENTWISE_H_
#define STRATA_CUDA_KERNELS_ELEMENTWISE_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/tensor.h"

namespace strata::cuda::kernels {

// dst[i] = convert(src[i]) for i < n. src_dtype and dst_dtype are
// F32/F16/BF16/F8E4M3/I32; I32 converts only to I32. Rounding to
// bf16/fp16/fp8 is round-to-nearest-even; fp8 saturates to +-448.
cudaError_t LaunchConvert(const void* src, engine::DType src_dtype, void* dst,
                          engine::DType dst_dtype, int64_t n, cudaStream_t stream);

// dst[i] = HashUniform(seed, i) * scale rounded to dst_dtype (F32 or BF16),
// exactly the values the CPU backend produces before its own rounding.
cudaError_t LaunchFillRandom(void* dst, engine::DType dst_dtype, int64_t n, uint64_t seed,
                             float scale, cudaStream_t stream);

// dst[i] = value (F32, BF16, F16, F8E4M3; I32 receives static_cast<int32_t>(value)).
cudaError_t LaunchFill(void* dst, engine::DType dst_dtype, int64_t n, float value,
                       cudaStream_t stream);

// out[t, :] = table[ids[t], :] for bf16 rows of width `hidden`. Ids outside
// [0, vocab) produce zero rows instead of reading out of bounds.
cudaError_t LaunchGather(const void* table, const int32_t* ids, void* out, int64_t num_tokens,
                         int64_t hidden, int64_t vocab, cudaStream_t stream);

// If residual is non-null: residual += x (rounded to bf16 and stored), then
// the normalised row is computed from the stored residual. Otherwise the row
// is x. out = row * rsqrt(mean(row^2) + eps) * weight, fp32 math, bf16 I/O.
cudaError_t LaunchRmsNorm(const void* x, void* residual, const void* weight, float eps, void* out,
                          int64_t num_tokens, int64_t hidden, cudaStream_t stream);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i], I = intermediate.
cudaError_t LaunchSiluMul(const void* gate_up, void* out, int64_t num_tokens, int64_t intermediate,
                          cudaStream_t stream);

// Rotate-half rotary embedding applied in place to the first
// num_q_heads + num_kv_heads heads of each qkv row (of width row_width).
cudaError_t LaunchRope(void* qkv, int64_t num_tokens, int64_t row_width, int num_q_heads,
                       int num_kv_heads, int head_dim, const int32_t* positions,
                       const float* inv_freq, cudaStream_t stream);

// LaunchRope then LaunchWriteKv in one kernel: each token's angles are
// computed once, the rotated q and k heads go back to qkv, and the rotated
// k and the v heads to the caches (tokens with a slot outside [0,
// num_slots) are not written to the caches; null slots: none are). The
// caches are `cache_dtype` (BF16 or F8E4M3; fp8 values are the bf16 ones
// rounded again).
cudaError_t LaunchRopeWriteKv(void* qkv, int64_t num_tokens, int64_t row_width, int num_q_heads,
                              int num_kv_heads, int head_dim, const int32_t* positions,
                              const float* inv_freq, const int32_t* slots, void* k_cache,
                              void* v_cache, int64_t num_slots, engine::DType cache_dtype,
                              cudaStream_t stream);

// Copies the k and v heads of each qkv row into the paged caches
// [num_slots = pages * page_size, num_kv_heads, head_dim] at slots[t].
// Slots outside [0, num_slots) (e.g. -1 padding) are skipped. The caches
// are `cache_dtype`: BF16, or F8E4M3 (rounded to nearest even, saturating).
cudaError_t LaunchWriteKv(const void* qkv, int64_t num_tokens, int64_t row_width, int num_q_heads,
                          int num_kv_heads, int head_dim, const int32_t* slots, void* k_cache,
                          void* v_cache, int64_t num_slots, engine::DType cache_dtype,
                          cudaStream_t stream);

// out[i] += bias[i % n] for a [rows, n] bf16 matrix (used when a GEMM cannot
// fuse the bias).
cudaError_t LaunchAddBias(void* out, const void* bias, int64_t rows, int64_t n,
                          cudaStream_t stream);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_ELEMENTWISE_H_
