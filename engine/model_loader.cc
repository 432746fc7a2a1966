#include "engine/model_loader.h"

#include <chrono>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/weights.h"

namespace strata::engine {

absl::StatusOr<ModelConfig> LoadSourceConfig(const ModelSource& source) {
  if (!source.dummy_preset.empty() && source.dummy_preset != "config") {
    return PresetModelConfig(source.dummy_preset);
  }
  if (source.model_dir.empty()) return absl::InvalidArgumentError("no model directory given");
  if (!std::filesystem::is_directory(source.model_dir)) {
    return absl::NotFoundError(absl::StrCat(source.model_dir, ": not a directory"));
  }
  return LoadModelConfig(source.model_dir);
}

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, Backend* backend,
                                      const ModelOptions& options) {
  namespace fs = std::filesystem;
  const auto start = std::chrono::steady_clock::now();
  LoadedModel loaded;
  STRATA_ASSIGN_OR_RETURN(ModelConfig config, LoadSourceConfig(source));
  if (!source.model_dir.empty()) {
    const bool has_tokenizer = fs::exists(fs::path(source.model_dir) / "tokenizer.json") ||
                               fs::exists(fs::path(source.model_dir) / "tokenizer.model");
    if (has_tokenizer) {
      STRATA_ASSIGN_OR_RETURN(loaded.tokenizer, LoadTokenizer(source.model_dir));
      if (loaded.tokenizer->vocab_size() > config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(source.model_dir, ": the tokenizer has ", loaded.tokenizer->vocab_size(),
                         " tokens but the model's vocab_size is ", config.vocab_size));
      }
    }
  }
  ModelWeights weights;
  if (!source.dummy_preset.empty()) {
    STRATA_ASSIGN_OR_RETURN(weights, DummyWeights(config, *backend, source.dummy_seed));
  } else {
    STRATA_ASSIGN_OR_RETURN(weights, LoadWeights(config, source.model_dir, *backend));
  }
  STRATA_LOG_INFO("{}: {} layers, {:.1f}M parameters, {:.1f} MB of weights on {}",
                  config.architecture, config.num_layers, config.NumParameters() / 1e6,
                  weights.bytes / 1e6, backend->name());
  STRATA_ASSIGN_OR_RETURN(loaded.model,
                          Model::Create(config, std::move(weights), backend, options));
  loaded.load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return loaded;
}

}  // namespace strata::engine
