// The strata binary. Subcommands:
//   generate   generation from one prompt, locally or from a server (cli/generate_command.h)
//   serve      the gRPC Generate API in one process (cli/serve_command.h)
//   prefill    a prefill worker of a disaggregated deployment (cli/serve_command.h)
//   decode     a decode worker of a disaggregated deployment (cli/serve_command.h)
//   router     the gRPC Generate API in front of prefill and decode workers (cli/router_command.h)
//   bench      benchmarks: `bench serve` loads a running server (cli/bench_command.h)
//   profile    `profile check`: validate KV profiles (cli/profile_command.h)
#include <cstdio>

#include "CLI/CLI.hpp"
#include "cli/bench_command.h"
#include "cli/generate_command.h"
#include "cli/profile_command.h"
#include "cli/router_command.h"
#include "cli/serve_command.h"
#include "common/logging.h"

int main(int argc, char** argv) {
  CLI::App app{"strata: LLM serving with tiered, recallable KV cache"};
  app.require_subcommand(1);
  std::string log_level;
  CLI::Option* log_level_option =
      app.add_option("--log-level", log_level,
                     "trace, debug, info, warn, error, off (default: $STRATA_LOG_LEVEL or warn)");
  int exit_code = 0;
  strata::cli::GenerateFlags generate_flags;
  strata::cli::AddGenerateCommand(app, generate_flags, exit_code);
  strata::cli::ServeFlags serve_flags;
  strata::cli::AddServeCommand(app, serve_flags, exit_code);
  strata::cli::ServeFlags prefill_flags, decode_flags;
  strata::cli::AddWorkerCommands(app, prefill_flags, decode_flags, exit_code);
  strata::cli::RouterFlags router_flags;
  strata::cli::AddRouterCommand(app, router_flags, exit_code);
  strata::cli::BenchFlags bench_flags;
  strata::cli::AddBenchCommand(app, bench_flags, exit_code);
  strata::cli::ProfileFlags profile_flags;
  strata::cli::AddProfileCommand(app, profile_flags, exit_code);
  app.parse_complete_callback([&] {
    if (log_level_option->count() > 0 && !strata::SetLogLevel(log_level)) {
      std::fprintf(stderr, "unknown --log-level %s\n", log_level.c_str());
    }
  });
  CLI11_PARSE(app, argc, argv);
  return exit_code;
}
