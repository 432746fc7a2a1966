#include "engine/model_loader.h"

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/communicator.h"
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

namespace {

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSourceTokenizer(const ModelSource& source,
                                                               const ModelConfig& config) {
  namespace fs = std::filesystem;
  if (source.model_dir.empty()) return nullptr;
  const bool has_tokenizer = fs::exists(fs::path(source.model_dir) / "tokenizer.json") ||
                             fs::exists(fs::path(source.model_dir) / "tokenizer.model");
  if (!has_tokenizer) return nullptr;
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, LoadTokenizer(source.model_dir));
  if (tokenizer->vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(source.model_dir, ": the tokenizer has ", tokenizer->vocab_size(),
                     " tokens but the model's vocab_size is ", config.vocab_size));
  }
  return tokenizer;
}

// One rank's weights and Model (comm null: the whole model).
absl::StatusOr<std::unique_ptr<Model>> LoadRank(const ModelSource& source,
                                                const ModelConfig& config, Backend* backend,
                                                Communicator* comm, const ModelOptions& options) {
  STRATA_ASSIGN_OR_RETURN(
      const TensorParallelShard shard,
      ShardModel(config, comm != nullptr ? comm->rank() : 0, comm != nullptr ? comm->size() : 1));
  ModelWeights weights;
  if (!source.dummy_preset.empty()) {
    STRATA_ASSIGN_OR_RETURN(weights, DummyWeights(config, *backend, source.dummy_seed, shard));
  } else {
    STRATA_ASSIGN_OR_RETURN(weights, LoadWeights(config, source.model_dir, *backend, shard));
  }
  STRATA_LOG_INFO("{}: {} layers, {:.1f}M parameters, {:.1f} MB of weights on {}{}",
                  config.architecture, config.num_layers, config.NumParameters() / 1e6,
                  weights.bytes / 1e6, backend->name(),
                  shard.size > 1 ? absl::StrCat(" (rank ", shard.rank, " of ", shard.size, ")")
                                 : std::string());
  return Model::Create(config, std::move(weights), backend, options, comm);
}

}  // namespace

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, Backend* backend,
                                      const ModelOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  LoadedModel loaded;
  STRATA_ASSIGN_OR_RETURN(ModelConfig config, LoadSourceConfig(source));
  STRATA_ASSIGN_OR_RETURN(loaded.tokenizer, LoadSourceTokenizer(source, config));
  STRATA_ASSIGN_OR_RETURN(loaded.model, LoadRank(source, config, backend, nullptr, options));
  loaded.load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return loaded;
}

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, std::span<Backend* const> backends,
                                      std::span<Communicator* const> comms,
                                      const ModelOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const size_t n = backends.size();
  if (n == 0 || comms.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("tensor-parallel load: ", n, " backends and ",
                                                   comms.size(), " communicators"));
  }
  for (size_t i = 0; i < n; ++i) {
    if (comms[i] == nullptr || backends[i] == nullptr || comms[i]->rank() != static_cast<int>(i) ||
        comms[i]->size() != static_cast<int>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor-parallel load: communicator ", i, " is not rank ", i, " of ", n));
    }
  }
  LoadedModel loaded;
  STRATA_ASSIGN_OR_RETURN(ModelConfig config, LoadSourceConfig(source));
  STRATA_RETURN_IF_ERROR(ShardModel(config, 0, static_cast<int>(n)).status());
  STRATA_ASSIGN_OR_RETURN(loaded.tokenizer, LoadSourceTokenizer(source, config));
  std::vector<absl::StatusOr<std::unique_ptr<Model>>> ranks;
  for (size_t i = 0; i < n; ++i) ranks.emplace_back(absl::UnknownError("not loaded"));
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n; ++i) {
      threads.emplace_back(
          [&, i] { ranks[i] = LoadRank(source, config, backends[i], comms[i], options); });
    }
    for (std::thread& t : threads) t.join();
  }
  for (size_t i = 0; i < n; ++i) {
    if (!ranks[i].ok()) {
      return absl::Status(ranks[i].status().code(),
                          absl::StrCat("rank ", i, ": ", ranks[i].status().message()));
    }
  }
  loaded.model = *std::move(ranks[0]);
  std::vector<Model*> followers;
  for (size_t i = 1; i < n; ++i) {
    loaded.followers.push_back(*std::move(ranks[i]));
    followers.push_back(loaded.followers.back().get());
  }
  if (!followers.empty()) {
    std::vector<Model*> all = {loaded.model.get()};
    all.insert(all.end(), followers.begin(), followers.end());
    loaded.model->set_ranks(std::move(all));
    loaded.runner = std::make_unique<TensorParallelRunner>(std::move(followers));
    loaded.model->set_followers(loaded.runner.get());
  }
  loaded.load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return loaded;
}

}  // namespace strata::engine
