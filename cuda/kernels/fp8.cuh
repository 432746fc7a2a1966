// fp8 e4m3 (the KV-cache storage type) <-> wider types on the device. The
// kernels widen fp8 exactly (e4m3 -> fp16 is one cvt per pair, and every
// e4m3 value is an fp16, bf16 and fp32 value too); a pair is two e4m3 bytes,
// the first in the low byte. Device code only: include from .cu files.
#ifndef STRATA_CUDA_KERNELS_FP8_CUH_
#define STRATA_CUDA_KERNELS_FP8_CUH_

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace strata::cuda::kernels {

// The pair in the low 16 bits of `pair`, as an fp16x2 (first in the low half).
__device__ __forceinline__ uint32_t Fp8x2ToHalf2Bits(uint32_t pair) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

__device__ __forceinline__ float2 Fp8x2ToFloat2(uint32_t pair) {
  const uint32_t h = Fp8x2ToHalf2Bits(pair);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Eight values (two words, lowest byte first) -> fp32.
__device__ __forceinline__ void Fp8x8ToFloat(uint2 w, float (&out)[8]) {
  const uint32_t words[2] = {w.x, w.y};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Fp8x2ToFloat2(words[i / 2] >> (16 * (i % 2)));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Two floats -> an e4m3 pair in the low 16 bits (round to nearest even,
// saturating to +-448, as engine::FloatToFp8E4M3).
__device__ __forceinline__ uint32_t Float2ToFp8x2(float2 f) {
  return __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3) & 0xffffu;
}

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_FP8_CUH_
