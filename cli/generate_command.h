// `strata generate`: generate from one prompt, streaming the text (or one
// JSON object per token with --json), either with a model loaded locally
// (--model / --dummy-weights) or from a running `strata serve`
// (--server HOST:PORT), with the same flags and the same output.
#ifndef STRATA_CLI_GENERATE_COMMAND_H_
#define STRATA_CLI_GENERATE_COMMAND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"

namespace strata::cli {

struct GenerateFlags {
  std::string server;          // HOST:PORT of a strata server; empty: run locally
  double timeout_seconds = 0;  // with --server: the call's deadline (0: none)
  std::string model_dir;
  std::string prompt;
  std::string prompt_ids;  // comma-separated
  int max_tokens = 64;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  std::string backend = "cpu";
  std::string dummy_weights;
  bool logprobs = false;
  bool json = false;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  std::string stop_token_ids;
  int threads = 0;
  int tensor_parallel = 1;                 // ranks the model is split over
  double collective_timeout_seconds = 60;  // a rank's longest wait in a collective
  int max_batch_tokens = 2048;
  std::string kv_cache_dtype = "auto";
  std::string profile;         // KV profile YAML (policy, codec, host tier), as serve takes
  std::string server_profile;  // with --server: the server's profile the request names
};

// Registers the subcommand; `run` is called with its flags when chosen.
void AddGenerateCommand(CLI::App& app, GenerateFlags& flags, int& exit_code);

int RunGenerate(const GenerateFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_GENERATE_COMMAND_H_
