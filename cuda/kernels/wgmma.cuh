// Hopper warpgroup MMA (wgmma, sm_90a) helpers the kernels share: the
// 128-byte-swizzled shared-memory tile layout and its matrix descriptors,
// the m64n{128,64,32}k16 bf16 instructions with fp32 accumulators, and the fences
// and waits around them. Device code only: include from .cu files built for
// sm_90a; the instruction wrappers exist only when compiling for it
// (__CUDA_ARCH_FEAT_SM90_ALL).
//
// Tiles hold rows of 128 bf16 (256 bytes) as two column blocks of 64 (128
// bytes per row): block b covers columns 64b..64b+63 of every row, row r of
// a block starts at byte r * 128, and 16-byte chunk c of it is stored at
// chunk c ^ (r % 8). That is the swizzle the tensor cores apply to
// 1024-byte-aligned groups of 8 rows, so descriptors with swizzle mode 128B
// read the tiles as written (tiles must start on 1024-byte boundaries):
//   K-major operand (rows = M or N, columns = K): 8-row groups 1024 bytes
//     apart (stride byte offset); k step ks (16 columns) starts 32 * (ks % 4)
//     bytes into column block ks / 4;
//   N-major B operand (rows = K, columns = N, "transposed"): 8-row groups
//     1024 bytes apart (stride byte offset), the column blocks
//     rows * 128 bytes apart (leading byte offset); k step kk starts at row
//     16 kk.
// Accumulators (m64nNk16, fp32) of warp w of a warpgroup, lane (g = lane / 4,
// t = lane % 4): d[4j + e] is row 16w + g + 8 (e / 2), column 8j + 2t +
// e % 2, mma.sync's C layout repeated over the 8-column groups. A from
// registers uses mma.sync's A layout.
#ifndef STRATA_CUDA_KERNELS_WGMMA_CUH_
#define STRATA_CUDA_KERNELS_WGMMA_CUH_

#include <cstdint>

namespace strata::cuda::kernels {

// Bytes of one column block of a `rows`-row tile, and of the tile.
constexpr uint32_t SwizzledBlockBytes(int rows) { return static_cast<uint32_t>(rows) * 128; }

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a tile of
// `rows` rows.
__device__ __forceinline__ uint32_t SwizzledTileOffset(int rows, int row, int chunk) {
  return (chunk >> 3) * SwizzledBlockBytes(rows) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// A wgmma shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ uint64_t Descriptor(uint32_t smem_addr, uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  uint64_t desc = (smem_addr & 0x3ffffu) >> 4;
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3fffu) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3fffu) << 32;
  desc |= uint64_t{1} << 62;  // swizzle mode: 128 bytes
  return desc;
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across
// the asynchronous wgmma issue / wait points.
template <int kN>
__device__ __forceinline__ void PinRegisters(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Orders this thread's generic-proxy shared-memory writes (cp.async, plain
// stores) before the tensor cores' (async-proxy) reads that follow the next
// barrier.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d (64 x 128, fp32) = (scale_d ? d : 0) + A B on one warpgroup, A and B
// bf16 from shared memory (descriptors), both K-major: S = Q K^T.
__device__ __forceinline__ void WgmmaSS(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                        int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The same product with N = 32 (d: 64 x 32): the last, partial chunk of a
// B operand that is stored in chunks of 128 rows.
__device__ __forceinline__ void WgmmaSS32(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                          int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "%16, %17, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The same product with N = 64 (d: 64 x 64): the last, partial chunk of a
// B operand that is stored in chunks of 128 rows.
__device__ __forceinline__ void WgmmaSS64(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                          int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d (64 x 128, fp32) += A B on one warpgroup, A (64 x 16 bf16) from
// registers in the mma.sync A layout, B bf16 from shared memory, N-major
// (transposed): O += P V.
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
#endif

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_WGMMA_CUH_
