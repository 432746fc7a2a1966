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
#include <string>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

namespace strata::engine {

struct ModelSource {
  std::string model_dir;     // may be empty with a dummy preset
  std::string dummy_preset;  // a preset name, or "config" for DIR's config
  uint64_t dummy_seed = 1234;
};

struct LoadedModel {
  std::unique_ptr<Tokenizer> tokenizer;  // null when there is none
  std::unique_ptr<Model> model;
  double load_seconds = 0;
};

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, Backend* backend,
                                      const ModelOptions& options);

// The config LoadModel would use, without loading anything else (to size
// the options before the load).
absl::StatusOr<ModelConfig> LoadSourceConfig(const ModelSource& source);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_MODEL_LOADER_H_
