// Decode-size matrix-vector product (see gemv.h).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/dependent_launch.cuh"
#include "cuda/kernels/gemv.h"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;   // per block
constexpr int kRows = 2;    // weight rows per warp
constexpr int kUnroll = 4;  // 16-byte chunks of each row in flight per lane
constexpr int kChunk = 8;   // bf16 per 16-byte chunk

// The weight is read once: past L1.
__device__ __forceinline__ uint4 LoadStreaming(const bf16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// sum += a . b over 8 bf16 pairs packed in 16 bytes (a bf16 is the high half
// of a float).
__device__ __forceinline__ float Dot8(uint4 a, uint4 b, float sum) {
  const uint32_t wa[4] = {a.x, a.y, a.z, a.w};
  const uint32_t wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    sum = fmaf(__uint_as_float(wa[i] << 16), __uint_as_float(wb[i] << 16), sum);
    sum = fmaf(__uint_as_float(wa[i] & 0xffff0000u), __uint_as_float(wb[i] & 0xffff0000u), sum);
  }
  return sum;
}

template <int kT>
__global__ void __launch_bounds__(kWarps * 32)
    GemvKernel(const bf16* __restrict__ x, const bf16* __restrict__ w,
               const bf16* __restrict__ bias, bf16* __restrict__ out, int64_t k_dim,
               int64_t n_dim) {
  WaitForPrerequisites();
  const int lane = threadIdx.x % 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= n_dim) return;
  const bf16* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = w + min(row0 + r, n_dim - 1) * k_dim;
  float acc[kRows][kT];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int t = 0; t < kT; ++t) acc[r][t] = 0.0f;
  }
  constexpr int kStep = 32 * kChunk * kUnroll;
  for (int64_t k0 = lane * kChunk; k0 < k_dim; k0 += kStep) {
    uint4 wv[kUnroll][kRows];
    uint4 xv[kUnroll][kT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * 32 * kChunk;
      const bool in = k < k_dim;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        wv[u][r] = in ? LoadStreaming(rows[r] + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        xv[u][t] =
            in ? __ldg(reinterpret_cast<const uint4*>(x + t * k_dim + k)) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int t = 0; t < kT; ++t) acc[r][t] = Dot8(wv[u][r], xv[u][t], acc[r][t]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      float v = acc[r][t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[r][t] = v;
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t n = row0 + r;
      if (n >= n_dim) break;
      const float b = bias != nullptr ? __bfloat162float(bias[n]) : 0.0f;
#pragma unroll
      for (int t = 0; t < kT; ++t) out[t * n_dim + n] = __float2bfloat16_rn(acc[r][t] + b);
    }
  }
}

}  // namespace

bool CanUseGemv(int64_t tokens, int64_t in_features, int64_t out_features, const void* x,
                const void* w) {
  return tokens >= 1 && tokens <= kGemvMaxTokens && in_features > 0 && in_features % 8 == 0 &&
         out_features > 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(w) & 15) == 0;
}

cudaError_t LaunchGemv(const void* x, const void* w, const void* bias, void* out, int tokens,
                       int64_t in_features, int64_t out_features, cudaStream_t stream) {
  const int64_t blocks = (out_features + kWarps * kRows - 1) / (kWarps * kRows);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const auto* xp = static_cast<const bf16*>(x);
  const auto* wp = static_cast<const bf16*>(w);
  const auto* bp = static_cast<const bf16*>(bias);
  auto* op = static_cast<bf16*>(out);
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (tokens) {
    case 1:
      return LaunchDependent(GemvKernel<1>, grid, kWarps * 32, 0, stream, xp, wp, bp, op,
                             in_features, out_features);
    case 2:
      return LaunchDependent(GemvKernel<2>, grid, kWarps * 32, 0, stream, xp, wp, bp, op,
                             in_features, out_features);
    case 3:
      return LaunchDependent(GemvKernel<3>, grid, kWarps * 32, 0, stream, xp, wp, bp, op,
                             in_features, out_features);
    case 4:
      return LaunchDependent(GemvKernel<4>, grid, kWarps * 32, 0, stream, xp, wp, bp, op,
                             in_features, out_features);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace strata::cuda::kernels
