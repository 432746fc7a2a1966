// `strata profile check FILE...`: validates KV profiles the way `serve`
// would load them, and says everything wrong with each at once: YAML
// errors, unknown keys, bad values or units, what this build cannot run
// yet, and, for a model (--model DIR or --dummy-weights PRESET), budgets
// that cannot be met: a GPU budget below one sequence's part that stays on
// the GPU, a host tier that cannot hold one sequence's clusters.
//
//   strata profile check deploy/profiles/*.yaml [--dummy-weights llama-3-8b]
//       [--max-context 32768] [--kv-cache-dtype auto]
//
// Prints "FILE: ok" with how the budgets divide, or each problem on its
// own line. Exit status: 0 when every profile is valid; 2 otherwise.
#ifndef STRATA_CLI_PROFILE_COMMAND_H_
#define STRATA_CLI_PROFILE_COMMAND_H_

#include <string>
#include <vector>

#include "CLI/CLI.hpp"

namespace strata::cli {

struct ProfileFlags {
  std::vector<std::string> files;
  std::string model_dir;
  std::string dummy_weights;
  int max_context = 32768;
  // The paged caches' dtype on the GPU: auto (bf16) or fp8_e4m3.
  std::string kv_cache_dtype = "auto";
};

void AddProfileCommand(CLI::App& app, ProfileFlags& flags, int& exit_code);
int RunProfileCheck(const ProfileFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_PROFILE_COMMAND_H_
