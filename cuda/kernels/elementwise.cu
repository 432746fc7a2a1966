// Memory-bound kernels of the CUDA backend (see elementwise.h).
//
// All arithmetic is fp32; bf16 values are widened on load and rounded
// (round-to-nearest-even) once on store. Row kernels use one thread block per
// row; where a row's width is a multiple of 8 and every pointer is 16-byte
// aligned they move 8 bf16 values per 16-byte access, otherwise they fall back
// to scalar accesses, so views at odd offsets stay correct.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/kernels/dependent_launch.cuh"
#include "cuda/kernels/elementwise.h"
#include "engine/backend.h"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;
using fp8 = __nv_fp8_e4m3;
using engine::DType;

constexpr int kBlock = 256;
// Grid-stride kernels never launch more blocks than this; each thread loops.
constexpr int64_t kMaxGridBlocks = int64_t{1} << 16;

int GridFor(int64_t n, int block = kBlock) {
  return static_cast<int>(std::min<int64_t>((n + block - 1) / block, kMaxGridBlocks));
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- Scalar conversions -----------------------------------------------------

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(fp8 v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ bf16 FromFloat<bf16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}
// Round to nearest even, saturating to +-448 (engine::FloatToFp8E4M3).
template <>
__device__ __forceinline__ fp8 FromFloat<fp8>(float v) {
  fp8 out;
  out.__x = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  return out;
}

// 8 bf16 values moved as one 16-byte access.
struct alignas(16) Bf16x8 {
  bf16 v[8];
};

template <int kVec>
__device__ __forceinline__ void LoadBf16(const bf16* p, float (&out)[kVec]) {
  if constexpr (kVec == 8) {
    const Bf16x8 packed = *reinterpret_cast<const Bf16x8*>(p);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = __bfloat162float(packed.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = __bfloat162float(p[i]);
  }
}

template <int kVec>
__device__ __forceinline__ void StoreBf16(bf16* p, const float (&in)[kVec]) {
  if constexpr (kVec == 8) {
    Bf16x8 packed;
#pragma unroll
    for (int i = 0; i < 8; ++i) packed.v[i] = __float2bfloat16_rn(in[i]);
    *reinterpret_cast<Bf16x8*>(p) = packed;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) p[i] = __float2bfloat16_rn(in[i]);
  }
}

// Sum over the block; every thread gets the result. `scratch` holds 32
// floats. Callers must not reuse `scratch` before another __syncthreads.
__device__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int num_warps = (blockDim.x + 31) >> 5;
  float total = 0.0f;
  for (int w = 0; w < num_warps; ++w) total += scratch[w];
  return total;
}

// ---- Convert / fill ---------------------------------------------------------

template <typename Src, typename Dst>
__global__ void ConvertKernel(const Src* __restrict__ src, Dst* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<Dst>(ToFloat(src[i]));
  }
}

template <typename Src>
cudaError_t LaunchConvertFrom(const Src* src, void* dst, DType dst_dtype, int64_t n,
                              cudaStream_t stream) {
  switch (dst_dtype) {
    case DType::kF32:
      ConvertKernel<<<GridFor(n), kBlock, 0, stream>>>(src, static_cast<float*>(dst), n);
      break;
    case DType::kBF16:
      ConvertKernel<<<GridFor(n), kBlock, 0, stream>>>(src, static_cast<bf16*>(dst), n);
      break;
    case DType::kF16:
      ConvertKernel<<<GridFor(n), kBlock, 0, stream>>>(src, static_cast<__half*>(dst), n);
      break;
    case DType::kF8E4M3:
      ConvertKernel<<<GridFor(n), kBlock, 0, stream>>>(src, static_cast<fp8*>(dst), n);
      break;
    case DType::kI32:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename Dst>
__global__ void FillRandomKernel(Dst* __restrict__ dst, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<Dst>(engine::HashUniform(seed, static_cast<uint64_t>(i)) * scale);
  }
}

template <typename Dst>
__global__ void FillKernel(Dst* __restrict__ dst, int64_t n, Dst value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = value;
  }
}

// ---- Gather -----------------------------------------------------------------

template <int kVec>
__global__ void GatherKernel(const bf16* __restrict__ table, const int32_t* __restrict__ ids,
                             bf16* __restrict__ out, int64_t hidden, int64_t vocab) {
  WaitForPrerequisites();
  const int64_t t = blockIdx.x;
  const int64_t id = ids[t];
  bf16* dst = out + t * hidden;
  if (id < 0 || id >= vocab) {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = __float2bfloat16_rn(0.0f);
    return;
  }
  const bf16* src = table + id * hidden;
  if constexpr (kVec == 8) {
    const Bf16x8* s = reinterpret_cast<const Bf16x8*>(src);
    Bf16x8* d = reinterpret_cast<Bf16x8*>(dst);
    for (int64_t i = threadIdx.x; i < hidden / 8; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  }
}

// ---- RMS norm ---------------------------------------------------------------

// One block per row. Pass 1 forms the row (adding and storing the residual
// when present) and its sum of squares; pass 2 re-reads the row and writes the
// output. Each thread touches the same elements in both passes, so the
// re-read sees its own stores and x/out/residual may alias (in-place use).
template <int kVec, bool kResidual>
__global__ void RmsNormKernel(const bf16* x, bf16* residual, const bf16* __restrict__ weight,
                              float eps, bf16* out, int64_t hidden) {
  WaitForPrerequisites();
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const bf16* x_row = x + row * hidden;
  bf16* res_row = kResidual ? residual + row * hidden : nullptr;
  bf16* out_row = out + row * hidden;

  float sum_sq = 0.0f;
  for (int64_t i = int64_t{threadIdx.x} * kVec; i < hidden; i += int64_t{blockDim.x} * kVec) {
    float v[kVec];
    LoadBf16<kVec>(x_row + i, v);
    if constexpr (kResidual) {
      float r[kVec];
      LoadBf16<kVec>(res_row + i, r);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        // Normalise the value as stored (bf16), like a framework that keeps
        // the residual stream in bf16 would.
        v[j] = __bfloat162float(__float2bfloat16_rn(r[j] + v[j]));
      }
      StoreBf16<kVec>(res_row + i, v);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_sq += v[j] * v[j];
  }
  const float total = BlockSum(sum_sq, scratch);
  const float inv_rms = rsqrtf(total / static_cast<float>(hidden) + eps);

  const bf16* src_row = kResidual ? res_row : x_row;
  for (int64_t i = int64_t{threadIdx.x} * kVec; i < hidden; i += int64_t{blockDim.x} * kVec) {
    float v[kVec];
    float w[kVec];
    LoadBf16<kVec>(src_row + i, v);
    LoadBf16<kVec>(weight + i, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = v[j] * inv_rms * w[j];
    StoreBf16<kVec>(out_row + i, v);
  }
}

// ---- SiLU * up --------------------------------------------------------------

template <int kVec>
__global__ void SiluMulKernel(const bf16* __restrict__ gate_up, bf16* __restrict__ out,
                              int64_t num_tokens, int64_t intermediate) {
  WaitForPrerequisites();
  const int64_t vecs_per_row = intermediate / kVec;
  const int64_t total = num_tokens * vecs_per_row;
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < total;
       v += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = v / vecs_per_row;
    const int64_t i = (v - t * vecs_per_row) * kVec;
    const bf16* row = gate_up + t * 2 * intermediate;
    float g[kVec];
    float u[kVec];
    LoadBf16<kVec>(row + i, g);
    LoadBf16<kVec>(row + intermediate + i, u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    StoreBf16<kVec>(out + t * intermediate + i, g);
  }
}

// ---- Rope -------------------------------------------------------------------

// RoPE, and with slots the KV write, in one pass: one block per token. The
// token's D/2 rotation angles are computed once into shared memory, then
// threads walk the (head, i < D/2) pairs of the q and k heads. sincosf (not
// the __sinf approximation) because angles reach position * inv_freq[0] =
// tens of thousands of radians. Without slots (plain RoPE) nothing goes to
// the caches.
// Cache is the cache's element type (bf16 or fp8 e4m3): the rotated keys
// are rounded to bf16 first, as they are in qkv, then (fp8) to the cache.
constexpr int kRopeMaxHalf = 512;
template <typename Cache>
__global__ void RopeWriteKvKernel(bf16* qkv, int64_t row_width, int num_q_heads, int num_kv_heads,
                                  int head_dim, const int32_t* __restrict__ positions,
                                  const float* __restrict__ inv_freq,
                                  const int32_t* __restrict__ slots, Cache* __restrict__ k_cache,
                                  Cache* __restrict__ v_cache, int64_t num_slots) {
  WaitForPrerequisites();
  __shared__ float cos_smem[kRopeMaxHalf];
  __shared__ float sin_smem[kRopeMaxHalf];
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    sincosf(pos * inv_freq[i], &sin_smem[i], &cos_smem[i]);
  }
  const int64_t slot = slots != nullptr ? slots[t] : -1;
  const bool cached = slot >= 0 && slot < num_slots;
  const int64_t kv_width = static_cast<int64_t>(num_kv_heads) * head_dim;
  bf16* row = qkv + t * row_width;
  // V needs no rotation: copy it while the angles are computed.
  if (cached) {
    const bf16* v_src = row + static_cast<int64_t>(num_q_heads + num_kv_heads) * head_dim;
    Cache* v_dst = v_cache + slot * kv_width;
    for (int64_t i = threadIdx.x; i < kv_width; i += blockDim.x) {
      if constexpr (std::is_same_v<Cache, bf16>) {
        v_dst[i] = v_src[i];
      } else {
        v_dst[i] = FromFloat<Cache>(__bfloat162float(v_src[i]));
      }
    }
  }
  __syncthreads();
  const int pairs = (num_q_heads + num_kv_heads) * half;
  Cache* k_dst = cached ? k_cache + slot * kv_width : nullptr;
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int h = p / half;
    const int i = p - h * half;
    const float s = sin_smem[i], c = cos_smem[i];
    bf16* head = row + static_cast<int64_t>(h) * head_dim;
    const float x0 = __bfloat162float(head[i]);
    const float x1 = __bfloat162float(head[i + half]);
    const bf16 y0 = __float2bfloat16_rn(x0 * c - x1 * s);
    const bf16 y1 = __float2bfloat16_rn(x1 * c + x0 * s);
    head[i] = y0;
    head[i + half] = y1;
    if (h >= num_q_heads && cached) {
      Cache* k_head = k_dst + static_cast<int64_t>(h - num_q_heads) * head_dim;
      if constexpr (std::is_same_v<Cache, bf16>) {
        k_head[i] = y0;
        k_head[i + half] = y1;
      } else {
        k_head[i] = FromFloat<Cache>(__bfloat162float(y0));
        k_head[i + half] = FromFloat<Cache>(__bfloat162float(y1));
      }
    }
  }
}

// ---- KV write ---------------------------------------------------------------

// Cache is bf16 (values copied, 16 bytes per access when kVec is 8) or fp8
// e4m3 (values rounded; 16 bytes of bf16 in, 8 bytes out).
template <int kVec, typename Cache>
__global__ void WriteKvKernel(const bf16* __restrict__ qkv, int64_t row_width, int64_t k_offset,
                              int64_t kv_width, const int32_t* __restrict__ slots,
                              Cache* __restrict__ k_cache, Cache* __restrict__ v_cache,
                              int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  const bf16* k_src = qkv + t * row_width + k_offset;
  const bf16* v_src = k_src + kv_width;
  Cache* k_dst = k_cache + slot * kv_width;
  Cache* v_dst = v_cache + slot * kv_width;
  for (int64_t i = threadIdx.x; i < kv_width / kVec; i += blockDim.x) {
    if constexpr (std::is_same_v<Cache, bf16> && kVec == 8) {
      reinterpret_cast<Bf16x8*>(k_dst)[i] = reinterpret_cast<const Bf16x8*>(k_src)[i];
      reinterpret_cast<Bf16x8*>(v_dst)[i] = reinterpret_cast<const Bf16x8*>(v_src)[i];
    } else if constexpr (std::is_same_v<Cache, bf16>) {
      k_dst[i] = k_src[i];
      v_dst[i] = v_src[i];
    } else {
      float k[kVec], v[kVec];
      LoadBf16<kVec>(k_src + i * kVec, k);
      LoadBf16<kVec>(v_src + i * kVec, v);
      alignas(8) Cache k_out[kVec], v_out[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        k_out[e] = FromFloat<Cache>(k[e]);
        v_out[e] = FromFloat<Cache>(v[e]);
      }
      if constexpr (kVec == 8) {
        *reinterpret_cast<uint2*>(k_dst + i * 8) = *reinterpret_cast<const uint2*>(k_out);
        *reinterpret_cast<uint2*>(v_dst + i * 8) = *reinterpret_cast<const uint2*>(v_out);
      } else {
        k_dst[i] = k_out[0];
        v_dst[i] = v_out[0];
      }
    }
  }
}

// ---- Bias -------------------------------------------------------------------

__global__ void AddBiasKernel(bf16* out, const bf16* __restrict__ bias, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __float2bfloat16_rn(__bfloat162float(out[i]) + __bfloat162float(bias[i % n]));
  }
}

// Block size for one-block-per-row kernels: enough threads to cover the row
// in a few iterations, at least one warp.
int RowBlock(int64_t work_items) {
  int block = 32;
  while (block < 1024 && block < work_items) block *= 2;
  return std::min(block, 512);
}

}  // namespace

cudaError_t LaunchConvert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                          cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (src_dtype == dst_dtype) {
    return cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * engine::DTypeSize(src_dtype),
                           cudaMemcpyDeviceToDevice, stream);
  }
  switch (src_dtype) {
    case DType::kF32:
      return LaunchConvertFrom(static_cast<const float*>(src), dst, dst_dtype, n, stream);
    case DType::kBF16:
      return LaunchConvertFrom(static_cast<const bf16*>(src), dst, dst_dtype, n, stream);
    case DType::kF16:
      return LaunchConvertFrom(static_cast<const __half*>(src), dst, dst_dtype, n, stream);
    case DType::kF8E4M3:
      return LaunchConvertFrom(static_cast<const fp8*>(src), dst, dst_dtype, n, stream);
    case DType::kI32:
      break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchFillRandom(void* dst, DType dst_dtype, int64_t n, uint64_t seed, float scale,
                             cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dst_dtype) {
    case DType::kF32:
      FillRandomKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<float*>(dst), n, seed, scale);
      break;
    case DType::kBF16:
      FillRandomKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<bf16*>(dst), n, seed, scale);
      break;
    case DType::kF16:
      FillRandomKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<__half*>(dst), n, seed,
                                                          scale);
      break;
    case DType::kF8E4M3:
      FillRandomKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<fp8*>(dst), n, seed, scale);
      break;
    case DType::kI32:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchFill(void* dst, DType dst_dtype, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dst_dtype) {
    case DType::kF32:
      FillKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<float*>(dst), n, value);
      break;
    case DType::kBF16:
      FillKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<bf16*>(dst), n,
                                                    __float2bfloat16_rn(value));
      break;
    case DType::kF16:
      FillKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<__half*>(dst), n,
                                                    __float2half_rn(value));
      break;
    case DType::kF8E4M3: {
      fp8 v;
      v.__x = __nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3);
      FillKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<fp8*>(dst), n, v);
      break;
    }
    case DType::kI32:
      FillKernel<<<GridFor(n), kBlock, 0, stream>>>(static_cast<int32_t*>(dst), n,
                                                    static_cast<int32_t>(value));
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchGather(const void* table, const int32_t* ids, void* out, int64_t num_tokens,
                         int64_t hidden, int64_t vocab, cudaStream_t stream) {
  if (num_tokens <= 0 || hidden <= 0) return cudaSuccess;
  const auto* t = static_cast<const bf16*>(table);
  auto* o = static_cast<bf16*>(out);
  if (hidden % 8 == 0 && Aligned16(table) && Aligned16(out)) {
    return LaunchDependent(GatherKernel<8>, num_tokens, RowBlock(hidden / 8), 0, stream, t, ids, o,
                           hidden, vocab);
  }
  return LaunchDependent(GatherKernel<1>, num_tokens, RowBlock(hidden), 0, stream, t, ids, o,
                         hidden, vocab);
}

cudaError_t LaunchRmsNorm(const void* x, void* residual, const void* weight, float eps, void* out,
                          int64_t num_tokens, int64_t hidden, cudaStream_t stream) {
  if (num_tokens <= 0 || hidden <= 0) return cudaSuccess;
  const auto* xp = static_cast<const bf16*>(x);
  auto* rp = static_cast<bf16*>(residual);
  const auto* wp = static_cast<const bf16*>(weight);
  auto* op = static_cast<bf16*>(out);
  const bool vec = hidden % 8 == 0 && Aligned16(x) && Aligned16(weight) && Aligned16(out) &&
                   (residual == nullptr || Aligned16(residual));
  const int block = RowBlock(vec ? hidden / 8 : hidden);
  auto kernel = residual != nullptr ? (vec ? RmsNormKernel<8, true> : RmsNormKernel<1, true>)
                                    : (vec ? RmsNormKernel<8, false> : RmsNormKernel<1, false>);
  return LaunchDependent(kernel, num_tokens, block, 0, stream, xp, rp, wp, eps, op, hidden);
}

cudaError_t LaunchSiluMul(const void* gate_up, void* out, int64_t num_tokens, int64_t intermediate,
                          cudaStream_t stream) {
  if (num_tokens <= 0 || intermediate <= 0) return cudaSuccess;
  const auto* g = static_cast<const bf16*>(gate_up);
  auto* o = static_cast<bf16*>(out);
  if (intermediate % 8 == 0 && Aligned16(gate_up) && Aligned16(out)) {
    return LaunchDependent(SiluMulKernel<8>, GridFor(num_tokens * intermediate / 8), kBlock, 0,
                           stream, g, o, num_tokens, intermediate);
  }
  return LaunchDependent(SiluMulKernel<1>, GridFor(num_tokens * intermediate), kBlock, 0, stream, g,
                         o, num_tokens, intermediate);
}

cudaError_t LaunchRope(void* qkv, int64_t num_tokens, int64_t row_width, int num_q_heads,
                       int num_kv_heads, int head_dim, const int32_t* positions,
                       const float* inv_freq, cudaStream_t stream) {
  return LaunchRopeWriteKv(qkv, num_tokens, row_width, num_q_heads, num_kv_heads, head_dim,
                           positions, inv_freq, /*slots=*/nullptr, /*k_cache=*/nullptr,
                           /*v_cache=*/nullptr, /*num_slots=*/0, DType::kBF16, stream);
}

cudaError_t LaunchRopeWriteKv(void* qkv, int64_t num_tokens, int64_t row_width, int num_q_heads,
                              int num_kv_heads, int head_dim, const int32_t* positions,
                              const float* inv_freq, const int32_t* slots, void* k_cache,
                              void* v_cache, int64_t num_slots, DType cache_dtype,
                              cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (head_dim / 2 > kRopeMaxHalf) return cudaErrorInvalidValue;
  const int heads = num_q_heads + num_kv_heads;
  const int block = RowBlock(int64_t{heads} * head_dim / 2);
  switch (cache_dtype) {
    case DType::kBF16:
      return LaunchDependent(RopeWriteKvKernel<bf16>, num_tokens, block, 0, stream,
                             static_cast<bf16*>(qkv), row_width, num_q_heads, num_kv_heads,
                             head_dim, positions, inv_freq, slots, static_cast<bf16*>(k_cache),
                             static_cast<bf16*>(v_cache), num_slots);
    case DType::kF8E4M3:
      return LaunchDependent(RopeWriteKvKernel<fp8>, num_tokens, block, 0, stream,
                             static_cast<bf16*>(qkv), row_width, num_q_heads, num_kv_heads,
                             head_dim, positions, inv_freq, slots, static_cast<fp8*>(k_cache),
                             static_cast<fp8*>(v_cache), num_slots);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchWriteKv(const void* qkv, int64_t num_tokens, int64_t row_width, int num_q_heads,
                          int num_kv_heads, int head_dim, const int32_t* slots, void* k_cache,
                          void* v_cache, int64_t num_slots, DType cache_dtype,
                          cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  const int64_t kv_width = int64_t{num_kv_heads} * head_dim;
  const int64_t k_offset = int64_t{num_q_heads} * head_dim;
  const auto* q = static_cast<const bf16*>(qkv);
  // Rows start at multiples of row_width and heads at multiples of head_dim
  // (itself a multiple of 8), so the alignment of the bases and widths
  // carries over to every row: 16 bytes for bf16 rows, 8 for fp8 rows.
  const bool fp8_cache = cache_dtype == DType::kF8E4M3;
  if (!fp8_cache && cache_dtype != DType::kBF16) return cudaErrorInvalidValue;
  const uintptr_t cache_align = fp8_cache ? 7 : 15;
  const bool vec = kv_width % 8 == 0 && k_offset % 8 == 0 && row_width % 8 == 0 && Aligned16(qkv) &&
                   (reinterpret_cast<uintptr_t>(k_cache) & cache_align) == 0 &&
                   (reinterpret_cast<uintptr_t>(v_cache) & cache_align) == 0;
  const int block = RowBlock(vec ? kv_width / 8 : kv_width);
  auto launch = [&](auto* k, auto* v) {
    if (vec) {
      WriteKvKernel<8><<<num_tokens, block, 0, stream>>>(q, row_width, k_offset, kv_width, slots, k,
                                                         v, num_slots);
    } else {
      WriteKvKernel<1><<<num_tokens, block, 0, stream>>>(q, row_width, k_offset, kv_width, slots, k,
                                                         v, num_slots);
    }
  };
  if (fp8_cache) {
    launch(static_cast<fp8*>(k_cache), static_cast<fp8*>(v_cache));
  } else {
    launch(static_cast<bf16*>(k_cache), static_cast<bf16*>(v_cache));
  }
  return cudaGetLastError();
}

cudaError_t LaunchAddBias(void* out, const void* bias, int64_t rows, int64_t n,
                          cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  AddBiasKernel<<<GridFor(rows * n), kBlock, 0, stream>>>(static_cast<bf16*>(out),
                                                          static_cast<const bf16*>(bias), rows, n);
  return cudaGetLastError();
}

}  // namespace strata::cuda::kernels
