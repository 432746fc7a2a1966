// LayerKvObserver: told, as a step's forward is enqueued, that a layer's
// keys and values for the step's rows have been written into the cache.
//
// The writes are enqueued on the compute stream before the call, so work
// the observer enqueues from it that reads those layers (on a stream that
// follows the compute stream's work so far) runs after them and beside
// the later layers' compute: a prefill worker's KV leaves layer by layer
// (kvtier::KvBlockManager::ExportByLayer).
//
// Thread-safety: called on the thread that runs the model's steps.
#ifndef STRATA_ENGINE_LAYER_KV_OBSERVER_H_
#define STRATA_ENGINE_LAYER_KV_OBSERVER_H_

#include "absl/status/status.h"

namespace strata::engine {

class LayerKvObserver {
 public:
  virtual ~LayerKvObserver() = default;
  // Layer `layer` of the step being enqueued is written; an error fails
  // the step.
  virtual absl::Status LayerKvWritten(int layer) = 0;
  // Every layer of the step is enqueued: the host would now only wait for
  // the step's results, and may spend that time on work that follows the
  // device's progress (handing over the KV copied out of the first
  // layers as each copy completes). An error fails the step.
  virtual absl::Status LayersEnqueued() { return absl::OkStatus(); }
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_LAYER_KV_OBSERVER_H_
