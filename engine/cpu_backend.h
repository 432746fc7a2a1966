// The CPU reference backend: every engine::Backend operator in fp32,
// parallelised over rows with a ThreadPool.
//
// It is the reference the CUDA backend is checked against (tests/cuda), and
// it runs the whole system on machines without a GPU. It favours obviously
// correct loops over speed; each output element is computed by the same
// sequence of operations whatever the batch composition, so batched and
// single-sequence runs produce bit-identical results.
//
// Thread-safety: like every Backend, used by one thread at a time.
#ifndef STRATA_ENGINE_CPU_BACKEND_H_
#define STRATA_ENGINE_CPU_BACKEND_H_

#include <memory>

#include "engine/backend.h"

namespace strata::engine {

// num_threads <= 0 uses one thread per hardware thread.
std::unique_ptr<Backend> CreateCpuBackend(int num_threads = 0);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_CPU_BACKEND_H_
