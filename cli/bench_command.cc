#include "cli/bench_command.h"

#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "bench/load_generator.h"
#include "cli/exit_status.h"

namespace strata::cli {
namespace {

int Fail(const absl::Status& status) { return ExitWithError("strata bench serve", status); }

}  // namespace

void AddBenchCommand(CLI::App& app, BenchFlags& f, int& exit_code) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  CLI::App* cmd = bench->add_subcommand(
      "serve",
      "Load a running server with streaming Generate calls and report latency and throughput");
  cmd->add_option("--server", f.server, "HOST:PORT of a strata server")->required();
  CLI::Option* rate =
      cmd->add_option("--rate", f.rate, "Open loop: Poisson arrivals at R requests/s");
  CLI::Option* concurrency =
      cmd->add_option("--concurrency", f.concurrency, "Closed loop: C requests always in flight");
  cmd->add_option("--num-requests", f.num_requests,
                  "Send N requests (with --duration: whichever ends first)");
  cmd->add_option("--duration", f.duration_s,
                  "Send for S seconds (then wait for the requests in flight)");
  cmd->add_option("--input-len", f.input_len, "Synthetic prompt length in tokens");
  cmd->add_option("--output-len", f.output_len,
                  "Tokens to generate (synthetic; and dataset lines without max_tokens)");
  cmd->add_option("--len-jitter", f.len_jitter,
                  "Lengths uniform in +-F of their value, F in [0, 1)");
  cmd->add_option("--dataset", f.dataset,
                  "JSON lines {\"prompt\": \"...\", \"max_tokens\": N} or {\"prompt_ids\": [...]} "
                  "(instead of synthetic prompts)");
  cmd->add_flag(
      "--ignore-eos", f.ignore_eos,
      "With --dataset: generate max_tokens past end-of-sequence (synthetic runs always do)");
  cmd->add_option("--temperature", f.temperature, "Sampling temperature (0: greedy)");
  cmd->add_option("--profile", f.profile,
                  "The serving profile every request names (its KV policy, tiers and codec)");
  cmd->add_option("--seed", f.seed, "Seed of the arrivals and synthetic prompts");
  cmd->add_option("--request-timeout", f.request_timeout_s, "Each request's deadline in seconds");
  cmd->add_option("--channels", f.channels, "gRPC channels (connections), used round-robin");
  cmd->add_option("--slo-ttft-ms", f.slo_ttft_ms, "Goodput objective: time to first token (ms)");
  cmd->add_option("--slo-itl-ms", f.slo_itl_ms, "Goodput objective: inter-token latency (ms)");
  cmd->add_option("--slo-itl-stat", f.slo_itl_stat,
                  "Which per-request ITL --slo-itl-ms bounds: mean (time per output token) or p99")
      ->check(CLI::IsMember({"mean", "p99"}));
  cmd->add_option("--split-prompt-tokens", f.split_prompt_tokens,
                  "Also report the latencies of requests with prompts shorter than N tokens and "
                  "of the others apart (a mixed load's classes)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  cmd->add_option("--json", f.json, "Also write the results as JSON to FILE");
  cmd->add_flag("--fail-on-error", f.fail_on_error, "Exit 1 when any request failed");
  cmd->add_flag("--quiet", f.quiet, "No progress lines on stderr");
  cmd->callback([&f, &exit_code, rate, concurrency] {
    f.rate_given = rate->count() > 0;
    f.concurrency_given = concurrency->count() > 0;
    exit_code = RunBenchServe(f);
  });
  AddKvBenchCommands(*bench, f.kv, exit_code);
}

int RunBenchServe(const BenchFlags& f) {
  if (f.rate_given && !(f.rate > 0)) return Fail(absl::InvalidArgumentError("--rate must be > 0"));
  if (f.concurrency_given && f.concurrency < 1) {
    return Fail(absl::InvalidArgumentError("--concurrency must be at least 1"));
  }
  bench::LoadOptions o;
  o.server = f.server;
  o.rate = f.rate;
  o.concurrency = f.concurrency;
  o.num_requests = f.num_requests;
  o.duration_s = f.duration_s;
  o.synthetic = {f.input_len, f.output_len, f.len_jitter};
  o.dataset = f.dataset;
  o.dataset_ignore_eos = f.ignore_eos;
  o.temperature = f.temperature;
  o.profile = f.profile;
  o.seed = f.seed;
  o.request_timeout_s = f.request_timeout_s;
  o.channels = f.channels;
  o.slo.ttft_ms = f.slo_ttft_ms;
  o.slo.itl_ms = f.slo_itl_ms;
  o.slo.itl_stat = f.slo_itl_stat == "p99" ? bench::ItlStat::kP99 : bench::ItlStat::kMean;
  o.split_prompt_tokens = f.split_prompt_tokens;
  if (!f.quiet) {
    o.progress = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  }
  if (absl::Status s = bench::ValidateOptions(o); !s.ok()) return Fail(s);

  absl::StatusOr<bench::BenchResult> result = bench::RunBenchmark(o);
  if (!result.ok()) return Fail(result.status());
  const bench::Report& report = result->report;
  std::fputs(bench::FormatReport(report).c_str(), stdout);
  std::fflush(stdout);

  if (!f.json.empty()) {
    nlohmann::json j = bench::ReportToJson(report);
    // The flags too, so that a JSON file says how it was produced.
    j["config"] = {{"rate", f.rate},
                   {"concurrency", f.concurrency},
                   {"num_requests", f.num_requests},
                   {"duration_s", f.duration_s},
                   {"input_len", f.dataset.empty() ? nlohmann::json(f.input_len) : nullptr},
                   {"output_len", f.output_len},
                   {"len_jitter", f.len_jitter},
                   {"dataset", f.dataset},
                   {"temperature", f.temperature},
                   {"profile", f.profile},
                   {"seed", f.seed},
                   {"request_timeout_s", f.request_timeout_s},
                   {"channels", f.channels}};
    j["model_info"] = {{"name", result->model.name},
                       {"context_length", result->model.context_length},
                       {"vocab_size", result->model.vocab_size}};
    std::ofstream out(f.json);
    out << j.dump(2) << "\n";
    out.close();
    if (!out) return Fail(absl::UnavailableError(absl::StrCat("cannot write --json ", f.json)));
  }
  if (f.fail_on_error && report.failed > 0) {
    std::fprintf(stderr, "strata bench serve: %lld of %lld requests failed\n",
                 static_cast<long long>(report.failed), static_cast<long long>(report.issued));
    return 1;
  }
  return 0;
}

}  // namespace strata::cli
