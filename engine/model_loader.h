// LoadModel: everything needed to run a model, from a Hugging Face
// directory or a named preset: config, tokenizer (when the directory has
// one), weights in the backend and the Model over them.
//
//   --model DIR                    config, tokenizer and weights from DIR
//   --model DIR --dummy-weights    config and tokenizer from DIR, random weights
//   --dummy-weights PRESET         preset shapes, random weights, no tokenizer
//
// Thread-safety: a plain function; the result is owned by the caller.
#ifndef STRATA_ENGINE_MODEL_LOADER_H_
#define STRATA_ENGINE_MODEL_LOADER_H_

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/communicator.h"
#include "engine/model.h"
#include "engine/tensor_parallel.h"
#include "engine/tokenizer.h"

namespace strata::engine {

struct ModelSource {
  std::string model_dir;     // may be empty with a dummy preset
  std::string dummy_preset;  // a preset name, or "config" for DIR's config
  uint64_t dummy_seed = 1234;
};

struct LoadedModel {
  std::unique_ptr<Tokenizer> tokenizer;  // null when there is none
  std::unique_ptr<Model> model;          // with tensor parallelism, rank 0
  double load_seconds = 0;
  // With tensor parallelism: ranks 1..N-1, and the runner that makes them
  // take rank 0's steps (declared last: it stops before they go).
  std::vector<std::unique_ptr<Model>> followers;
  std::unique_ptr<TensorParallelRunner> runner;
};

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, Backend* backend,
                                      const ModelOptions& options);

// A model split over the ranks of a tensor-parallel group: rank i's share
// of the weights goes to backends[i] (loaded side by side, a thread per
// rank), and its collectives go through comms[i]. The ranks' KV caches hold
// their KV heads only, so with the same num_pages each holds 1 / N of the
// KV. One rank (with its communicator) runs the collectives too.
absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, std::span<Backend* const> backends,
                                      std::span<Communicator* const> comms,
                                      const ModelOptions& options);

// The config LoadModel would use, without loading anything else (to size
// the options before the load).
absl::StatusOr<ModelConfig> LoadSourceConfig(const ModelSource& source);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_MODEL_LOADER_H_
