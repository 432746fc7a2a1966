// Programmatic dependent launch (Hopper): a kernel launched with
// LaunchDependent may be scheduled while the kernel before it on the stream
// is still finishing, so its launch and block set-up overlap that kernel's
// tail instead of following it (about a microsecond per kernel boundary,
// which adds up over the ~300 small kernels of a decode step).
//
// Such a kernel must call WaitForPrerequisites before it touches memory
// that earlier kernels write (griddepcontrol.wait returns once every
// prerequisite grid has completed and its writes are visible); the kernels
// here call it first thing, so their semantics are those of an ordinary
// launch. Inside CUDA graph capture the dependency becomes a programmatic
// edge. Device and host code: include from .cu files.
#ifndef STRATA_CUDA_KERNELS_DEPENDENT_LAUNCH_CUH_
#define STRATA_CUDA_KERNELS_DEPENDENT_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <utility>

namespace strata::cuda::kernels {

__device__ __forceinline__ void WaitForPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream
// serialisation allowed; returns the launch error.
template <typename... KernelArgs, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                            cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_DEPENDENT_LAUNCH_CUH_
