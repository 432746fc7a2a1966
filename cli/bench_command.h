// `strata bench serve`: drives a running `strata serve` (--server HOST:PORT)
// with streaming Generate traffic, open-loop Poisson arrivals (--rate) or a
// fixed concurrency (--concurrency), and prints throughput, latency
// percentiles and goodput (a table, and JSON with --json FILE). The work is
// done by bench/load_generator.h; this file holds the flags.
//
// Exit status: 0; 2 for invalid flags or a workload that does not fit the
// model; 1 when the server cannot be reached or the JSON cannot be written,
// and, with --fail-on-error, when any request failed.
#ifndef STRATA_CLI_BENCH_COMMAND_H_
#define STRATA_CLI_BENCH_COMMAND_H_

#include <cstdint>
#include <string>

#include "CLI/CLI.hpp"
#include "cli/kv_bench_command.h"

namespace strata::cli {

struct BenchFlags {
  std::string server;
  double rate = 0;
  int concurrency = 0;
  int64_t num_requests = 0;
  double duration_s = 0;
  int64_t input_len = 128;
  int64_t output_len = 128;
  double len_jitter = 0;
  std::string dataset;
  bool ignore_eos = false;
  float temperature = 0;
  std::string profile;  // every request names it (empty: the server's default)
  uint64_t seed = 0;
  double request_timeout_s = 300;
  int channels = 1;
  double slo_ttft_ms = 0;
  int64_t split_prompt_tokens = 0;
  double slo_itl_ms = 0;
  std::string slo_itl_stat = "mean";
  std::string json;
  bool fail_on_error = false;
  bool quiet = false;
  // Set by CLI11 while parsing: whether the option was given at all (a given
  // --rate 0 is an error, a missing one means closed loop).
  bool rate_given = false;
  bool concurrency_given = false;
  // `bench kv-policies` / `bench kv-speed`.
  KvBenchFlags kv;
};

// Registers `bench` with its `serve`, `kv-policies` and `kv-speed` subcommands.
void AddBenchCommand(CLI::App& app, BenchFlags& flags, int& exit_code);

int RunBenchServe(const BenchFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_BENCH_COMMAND_H_
