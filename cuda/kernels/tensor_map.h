// Host-side construction of the copy engine's (TMA) tensor maps, shared by
// the kernels that load tiles with cp.async.bulk.tensor (tma.cuh).
//
// Thread-safety: TensorMapEncoder looks the driver entry point up once
// (thread-safe static initialisation); encoding writes only the caller's map.
#ifndef STRATA_CUDA_KERNELS_TENSOR_MAP_H_
#define STRATA_CUDA_KERNELS_TENSOR_MAP_H_

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace strata::cuda::kernels {

// The driver's cuTensorMapEncodeTiled, looked up through the runtime (so
// that strata needs no link-time dependency on the driver library); null
// when the driver does not provide it.
PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder();

// A row-major bf16 array [outer][rows][128] as a 3-d tensor map (dims,
// innermost first: 128 columns, rows, outer), copied in boxes of 64 columns
// x box_rows rows x 1 with the 128-byte swizzle: each copy fills one column
// block of wgmma.cuh's swizzled tile layout. Rows past `rows` read as zeros.
// False when the encoder is missing or rejects the shape.
bool EncodeBf16RowsMap(const void* base, int64_t rows, int64_t outer, int box_rows,
                       CUtensorMap* map);

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_TENSOR_MAP_H_
