// Hopper asynchronous-pipeline helpers the warp-specialized kernels share:
// shared-memory mbarriers (arrive, expected transaction bytes, phase-parity
// waits), the bulk tensor copy engine (TMA) loading a box of a tensor map
// into shared memory, named barriers for a subset of the block's warps, and
// setmaxnreg to move registers between warpgroup roles. Device code only:
// include from .cu files; setmaxnreg exists only on sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL), the rest on sm_90.
//
// Pipelines built on these follow one pattern: for each stage a "full"
// barrier the producer arms with the bytes it will copy (the copy engine
// completes it) and an "empty" barrier the consumers arrive on when done
// with the stage. Waits are on a phase's parity: a stage's n-th use waits
// for parity n % 2 of its full barrier, and the producer's n-th refill for
// parity (n % 2) ^ 1 of its empty barrier, which a fresh barrier reports
// complete, so the first pass through the stages does not wait.
#ifndef STRATA_CUDA_KERNELS_TMA_CUH_
#define STRATA_CUDA_KERNELS_TMA_CUH_

#include <cuda.h>

#include <cstdint>

namespace strata::cuda::kernels {

// Initialises the barrier at shared address `bar` to expect `count`
// arrivals per phase. Make the initialisation visible to the copy engine
// with FenceBarrierInit and a block barrier before any thread uses it.
__device__ __forceinline__ void MbarrierInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void FenceBarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrives once and adds `bytes` to the transaction bytes this phase waits
// for (the copies that complete on it subtract them).
__device__ __forceinline__ void MbarrierArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarrierArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Blocks until the phase of parity `parity` has completed. Completion makes
// the copy engine's writes of that phase visible to the waiting thread.
__device__ __forceinline__ void MbarrierWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// Copies the box at coordinates (c0, c1, c2) of the 3-d tensor map `map`
// (the address of a __grid_constant__ kernel parameter) to shared address
// `dst`; the copy's bytes complete on barrier `bar`.
__device__ __forceinline__ void TmaLoad3d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                          int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// Synchronises the `threads` threads (whole warps) that use barrier `id`
// (1..15; 0 is __syncthreads').
__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives at barrier `id` without waiting: with NamedBarrierSync on the
// same id from other warps, a one-way signal ("you may go on").
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Lowers / raises this warpgroup's per-thread register budget (a multiple
// of 8 in 24..256). The kernel needs a register cap at entry
// (__launch_bounds__(threads, 1)), and each role one branch of an if/else.
template <int kRegisters>
__device__ __forceinline__ void SetMaxRegistersDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void SetMaxRegistersInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
#endif

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_TMA_CUH_
