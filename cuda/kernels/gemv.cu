// Weight-streaming Linear for 1..8 tokens (see gemv.h).
//
// The product runs on the tensor cores with mma.m16n8k16: a block owns 16
// rows of W (output features) and its warps split K; the 8 columns of the
// MMA are the tokens (columns past T are zero and never stored). The MMA
// fragments are filled straight from 16-byte global loads: the thread
// (g = lane / 4, c = lane % 4) loads the 8 values [8c, 8c + 8) of each
// 32-wide K block from W rows g and g + 8 and from x row g. A dot product
// does not depend on the order of K, so these physical columns are fed to
// the MMA in a permuted order that is the same for W and x:
//   MMA j (j = 0, 1), logical K pair 2c     <- physical 8c + 4j + {0, 1},
//                     logical K pair 2c + 8 <- physical 8c + 4j + {2, 3}.
// Each warp keeps kUnroll blocks of 32 columns (2 * kUnroll 16-byte W loads
// per thread) in flight per step; the warps of a block take consecutive
// steps, so a block reads a contiguous stretch of each of its 16 rows. The
// per-warp partial sums are added in shared memory at the end, bias is added
// and the result rounded to bf16 once.
//
// W is read with ld.global.nc.L1::no_allocate (read once, kept out of L1 so
// that x, which every block re-reads, stays there).
//
// Grid: one block of 8 warps per 16 rows (256 blocks for N = 4096, so every
// SM of an H100 gets about two). With kUnroll = 4 a warp has 8 W loads of 512
// bytes in flight, a block 32 KB; at 48 registers five blocks fit on an SM.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/gemv.h"
#include "cuda/kernels/ptx.cuh"

namespace strata::cuda::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTileRows = 16;   // MMA M: rows of W per block
constexpr int kTileTokens = 8;  // MMA N: token columns

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16 bytes of W if `pred`, else zeros (and `p` is not read): read once, not
// allocated in L1. The L2 prefetch hint fetches the surrounding aligned 256
// bytes, which the warp reads in the same step anyway (a step covers 256
// contiguous bytes of each row). Predicated rather than branched so that all
// loads of a step issue back to back.
__device__ __forceinline__ uint4 LoadStream(const void* p, bool pred) {
  uint4 v;
  asm("{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  mov.b32 %1, 0;\n"
      "  mov.b32 %2, 0;\n"
      "  mov.b32 %3, 0;\n"
      "  @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

// 16 bytes of x if `pred`, else zeros: re-read by every block, cached in L1.
__device__ __forceinline__ uint4 LoadCached(const void* p, bool pred) {
  uint4 v;
  asm("{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  mov.b32 %1, 0;\n"
      "  mov.b32 %2, 0;\n"
      "  mov.b32 %3, 0;\n"
      "  @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

template <int kWarps, int kUnroll>
__global__ void __launch_bounds__(kWarps * 32)
    SmallBatchLinearKernel(const bf16* __restrict__ x, const bf16* __restrict__ w,
                           const bf16* __restrict__ bias, bf16* __restrict__ out, int tokens,
                           int64_t n, int64_t k) {
  __shared__ float partial[kWarps][kTileRows][kTileTokens];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t row_lo = tile + g;
  const int64_t row_hi = row_lo + 8;
  // Rows past N read row N - 1 and tokens past T read token T - 1: MMA rows
  // and columns are independent, and those outputs are never stored. (Lanes
  // of one warp that load the same x address share one L1 access.)
  const uint4* w_lo = reinterpret_cast<const uint4*>(w + (row_lo < n ? row_lo : n - 1) * k);
  const uint4* w_hi = reinterpret_cast<const uint4*>(w + (row_hi < n ? row_hi : n - 1) * k);
  const uint4* x_row = reinterpret_cast<const uint4*>(x + (g < tokens ? g : tokens - 1) * k);
  const int64_t chunks = k / 8;             // 16-byte chunks per row
  const int64_t blocks = (chunks + 3) / 4;  // 32-column blocks per row

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t first = static_cast<int64_t>(warp) * kUnroll; first < blocks;
       first += int64_t{kWarps} * kUnroll) {
    uint4 lo[kUnroll];
    uint4 hi[kUnroll];
    uint4 xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = (first + u) * 4 + c;
      lo[u] = LoadStream(w_lo + chunk, chunk < chunks);
      hi[u] = LoadStream(w_hi + chunk, chunk < chunks);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = (first + u) * 4 + c;
      xv[u] = LoadCached(x_row + chunk, chunk < chunks);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t a0[4] = {lo[u].x, hi[u].x, lo[u].y, hi[u].y};
      MmaBf16(acc, a0, xv[u].x, xv[u].y);
      const uint32_t a1[4] = {lo[u].z, hi[u].z, lo[u].w, hi[u].w};
      MmaBf16(acc, a1, xv[u].z, xv[u].w);
    }
  }

  // Accumulator layout: acc[0..1] = (row g, tokens 2c, 2c + 1),
  // acc[2..3] = (row g + 8, tokens 2c, 2c + 1).
  partial[warp][g][2 * c] = acc[0];
  partial[warp][g][2 * c + 1] = acc[1];
  partial[warp][g + 8][2 * c] = acc[2];
  partial[warp][g + 8][2 * c + 1] = acc[3];
  __syncthreads();
  // Consecutive threads write consecutive rows of one token.
  for (int i = static_cast<int>(threadIdx.x); i < kTileRows * kTileTokens; i += kWarps * 32) {
    const int r = i % kTileRows;
    const int t = i / kTileRows;
    const int64_t row = tile + r;
    if (t >= tokens || row >= n) continue;
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kWarps; ++s) sum += partial[s][r][t];
    if (bias != nullptr) sum += __bfloat162float(bias[row]);
    out[static_cast<int64_t>(t) * n + row] = __float2bfloat16_rn(sum);
  }
}

template <int kWarps, int kUnroll>
cudaError_t Launch(const bf16* x, const bf16* w, const bf16* bias, bf16* out, int tokens, int64_t n,
                   int64_t k, cudaStream_t stream) {
  const int64_t grid = (n + kTileRows - 1) / kTileRows;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  SmallBatchLinearKernel<kWarps, kUnroll>
      <<<static_cast<unsigned>(grid), kWarps * 32, 0, stream>>>(x, w, bias, out, tokens, n, k);
  return cudaGetLastError();
}

}  // namespace

bool SmallBatchLinearSupported(const void* x, const void* weight, int64_t tokens,
                               int64_t in_features, int64_t out_features) {
  return tokens >= 1 && tokens <= kSmallBatchMaxTokens && in_features > 0 && in_features % 8 == 0 &&
         out_features > 0 && Aligned16(x) && Aligned16(weight);
}

cudaError_t LaunchSmallBatchLinear(const void* x, const void* weight, const void* bias, void* out,
                                   int64_t tokens, int64_t in_features, int64_t out_features,
                                   cudaStream_t stream) {
  if (!SmallBatchLinearSupported(x, weight, tokens, in_features, out_features)) {
    return cudaErrorInvalidValue;
  }
  return Launch<8, 4>(static_cast<const bf16*>(x), static_cast<const bf16*>(weight),
                      static_cast<const bf16*>(bias), static_cast<bf16*>(out),
                      static_cast<int>(tokens), out_features, in_features, stream);
}

}  // namespace strata::cuda::kernels
