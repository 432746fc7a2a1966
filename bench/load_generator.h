// A load generator for a running `strata serve`: the engine of
// `strata bench serve` (cli/bench_command.h).
//
// It sends streaming Generate calls over real gRPC, either open-loop (Poisson
// arrivals at a fixed rate, independent of how fast the server answers) or
// closed-loop (a fixed number of calls always in flight), records per request
// the time to first token, the gaps between tokens, the end-to-end latency
// and the status, and summarises them into a Report: throughputs, latency
// percentiles and goodput under TTFT / ITL service-level objectives.
//
//   bench::LoadOptions options;
//   options.server = "127.0.0.1:50051";
//   options.rate = 5;
//   options.num_requests = 100;
//   STRATA_RETURN_IF_ERROR(bench::ValidateOptions(options));
//   STRATA_ASSIGN_OR_RETURN(bench::BenchResult result, bench::RunBenchmark(options));
//   std::fputs(bench::FormatReport(result.report).c_str(), stdout);
//
// The pieces (statistics, arrival process, workload, dataset parsing) are
// exposed so that they can be tested without a server.
//
// Thread-safety: the free functions are thread-safe (no shared state).
// PoissonArrivals and Workload are thread-compatible (one thread at a time).
// RunBenchmark blocks its caller for the whole run; internally the arrival
// process runs on the calling thread and the responses are handled on
// gRPC's callback threads.
#ifndef STRATA_BENCH_LOAD_GENERATOR_H_
#define STRATA_BENCH_LOAD_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <istream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace strata::bench {

// ---------------------------------------------------------------------------
// Statistics

// The q-th percentile (q in [0, 100]) of an ascending-sorted sample, by
// linear interpolation between the two closest ranks: the definition of
// numpy.percentile's default, so numbers compare with tools built on it.
// An empty sample gives 0.
double Percentile(const std::vector<double>& sorted, double q);

// Mean, percentiles and maximum of a sample (in the sample's unit).
struct Distribution {
  int64_t count = 0;
  double mean = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
  double max = 0;
};
Distribution Summarize(std::vector<double> values);

// ---------------------------------------------------------------------------
// Per-request records and goodput

// What one Generate call did. Times are in seconds.
//
// Inter-token latencies: a response may carry several tokens (the server
// sends what one step produced, or what it held back). The gap since the
// previous response is counted once, for the response's first token, and
// the response's other tokens count a gap of 0. So there is one ITL per
// output token after the first, and they add up to last token - first token;
// a mean ITL is therefore independent of how tokens were grouped, while the
// percentiles of ITLs show the grouping (as a user reading the stream sees it).
struct RequestRecord {
  double start_s = 0;         // when it was sent, since the benchmark started
  std::string status = "OK";  // the gRPC status code's name, or FINISH_REASON_ERROR
  std::string error;          // the status message, when not OK
  int64_t prompt_tokens = 0;  // the server's count (usage), else ours
  int64_t output_tokens = 0;
  double ttft_s = -1;         // send to the first response with a token; -1: none
  std::vector<double> itl_s;  // see above
  double e2e_s = 0;           // send to the end of the stream

  bool ok() const { return status == "OK"; }
};

// Which per-request ITL statistic an ITL objective applies to.
enum class ItlStat { kMean, kP99 };

// Service-level objectives for goodput; 0 leaves one out.
struct Slo {
  double ttft_ms = 0;
  double itl_ms = 0;
  // The default, the request's mean ITL (its time per output token), does not
  // depend on how the server groups tokens into responses; kP99 is stricter
  // and catches stalls (e.g. a long prefill of another request) that a mean
  // hides.
  ItlStat itl_stat = ItlStat::kMean;

  bool enabled() const { return ttft_ms > 0 || itl_ms > 0; }
};

// Whether a request counts towards goodput: it completed OK, its TTFT is
// within slo.ttft_ms and its mean (or p99) ITL within slo.itl_ms. A request
// with a single output token has no ITL and meets any ITL objective.
bool MeetsSlo(const RequestRecord& record, const Slo& slo);

// The summary of a run.
struct Report {
  int64_t issued = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> failures;  // by status name
  std::vector<std::string> sample_errors;   // the first few distinct messages
  double duration_s = 0;                    // the first send to the end of the last stream
  int64_t input_tokens = 0;                 // over completed requests
  int64_t output_tokens = 0;                // over completed requests
  double request_throughput = 0;            // completed / duration
  double output_throughput = 0;             // output tokens / s
  double total_token_throughput = 0;        // (input + output) tokens / s
  // Over completed requests, in milliseconds. ITL pools every gap of every
  // request (so it is token-weighted).
  Distribution ttft_ms;
  Distribution itl_ms;
  Distribution e2e_ms;
  // TTFT p99 of the requests sent in each quarter of the sending period: a
  // server that keeps up has them flat; a growing queue makes them climb.
  std::vector<double> ttft_p99_ms_by_quarter;
  Slo slo;
  int64_t good = 0;
  double goodput = 0;  // good requests / s (0 unless slo.enabled())
  // A mixed load's classes apart: under a mix of long and short prompts the
  // pooled ITL percentiles mix the long requests' own gaps (e.g. between a
  // disaggregated prefill's first token and the KV's landing) with the
  // stalls that long prefills cause the short requests.
  struct PromptClass {
    std::string name;  // "prompt < N" or "prompt >= N"
    int64_t completed = 0;
    int64_t good = 0;
    Distribution ttft_ms, itl_ms, e2e_ms;
  };
  int64_t split_prompt_tokens = 0;  // 0: by_prompt is empty
  std::vector<PromptClass> by_prompt;
  // Filled by RunBenchmark: how the run was driven.
  std::string server;
  std::string model;
  std::string arrivals;        // e.g. "poisson 5 req/s" or "concurrency 8"
  double max_send_lag_ms = 0;  // worst lateness of a send against its schedule
  int64_t max_in_flight = 0;
};

// Builds the report from the records of a run that lasted duration_s.
// With split_prompt_tokens > 0, also the latencies of the requests with
// shorter prompts and of the others, apart (Report::by_prompt).
Report BuildReport(const std::vector<RequestRecord>& records, double duration_s, const Slo& slo,
                   int64_t split_prompt_tokens = 0);

// A human-readable table (several lines, ending with a newline).
std::string FormatReport(const Report& report);

// The same numbers as JSON (latencies in ms, throughputs per second).
nlohmann::json ReportToJson(const Report& report);

// ---------------------------------------------------------------------------
// Arrivals

// The send times of an open-loop Poisson process: inter-arrival gaps are
// exponentially distributed with mean 1/rate, drawn from a generator seeded
// with `seed`, so a run's schedule is reproducible.
// Thread-compatible.
class PoissonArrivals {
 public:
  PoissonArrivals(double rate_per_s, uint64_t seed);
  // Seconds from the previous arrival to the next.
  double NextGapSeconds();

 private:
  std::mt19937_64 rng_;
  std::exponential_distribution<double> gap_;
};

// ---------------------------------------------------------------------------
// Workload

// The served model's limits, from the ModelInfo call.
struct ModelLimits {
  std::string name;
  int64_t context_length = 0;
  int64_t vocab_size = 0;
};

// One request's prompt and output length.
struct PromptSpec {
  std::string text;           // the prompt as text, or
  std::vector<int32_t> ids;   // as token ids
  int64_t prompt_tokens = 0;  // its length in tokens
  int64_t max_tokens = 0;
  bool ignore_eos = false;
  int line = 0;  // the dataset line it came from (0: synthetic)
};

// One dataset line: {"prompt": "...", "max_tokens": N} or
// {"prompt_ids": [1, 2, 3], "max_tokens": N}; max_tokens is optional
// (missing: 0, meaning the run's --output-len).
struct DatasetEntry {
  int line = 0;
  std::optional<std::string> text;
  std::vector<int32_t> ids;
  int64_t max_tokens = 0;
};

// Parses JSON lines (blank lines are skipped). Errors name `name:LINE`.
absl::StatusOr<std::vector<DatasetEntry>> ParseDataset(std::istream& in, const std::string& name);
absl::StatusOr<std::vector<DatasetEntry>> ReadDataset(const std::string& path);

// Counts the tokens of a text prompt as the server would (its Tokenize call).
using TokenCounter = std::function<absl::StatusOr<int64_t>(const std::string& text)>;

// Synthetic prompt and output lengths: each uniform in
// [round(len * (1 - jitter)), round(len * (1 + jitter))], at least 1.
struct SyntheticSpec {
  int64_t input_len = 128;
  int64_t output_len = 128;
  double jitter = 0;  // in [0, 1)
};

// Supplies the prompts of a run, one per request, in order: either synthetic
// (token ids drawn uniformly from the vocabulary by a seeded generator, with
// ignore_eos so that every request generates exactly its output length), or
// a dataset's entries in file order, cycling when the run sends more
// requests than the file has lines.
// Thread-compatible.
class Workload {
 public:
  // Fails when the longest prompt plus output could exceed the context.
  static absl::StatusOr<Workload> Synthetic(const SyntheticSpec& spec, const ModelLimits& model,
                                            uint64_t seed);
  // Checks each entry against the model (ids in the vocabulary, prompt plus
  // output within the context; text prompts are measured with count_tokens).
  // Entries without max_tokens get default_max_tokens.
  static absl::StatusOr<Workload> FromDataset(std::vector<DatasetEntry> entries,
                                              const std::string& name, const ModelLimits& model,
                                              int64_t default_max_tokens, bool ignore_eos,
                                              const TokenCounter& count_tokens);

  PromptSpec Next();

 private:
  Workload() = default;

  // Synthetic.
  SyntheticSpec spec_;
  int64_t vocab_size_ = 0;
  std::mt19937_64 rng_;
  // Dataset.
  std::vector<PromptSpec> entries_;
  size_t next_ = 0;
};

// ---------------------------------------------------------------------------
// The benchmark

struct LoadOptions {
  std::string server;        // HOST:PORT
  double rate = 0;           // > 0: Poisson arrivals at this many requests/s
  int concurrency = 0;       // > 0: this many requests always in flight
  int64_t num_requests = 0;  // stop sending after this many (0: no limit)
  double duration_s = 0;     // stop sending after this long (0: no limit)
  SyntheticSpec synthetic;
  std::string dataset;  // JSON-lines file (instead of synthetic prompts)
  bool dataset_ignore_eos = false;
  float temperature = 0;           // 0: greedy
  std::string profile;             // every request's (empty: the server's default)
  uint64_t seed = 0;               // arrivals and synthetic prompts
  double request_timeout_s = 300;  // each call's deadline
  double connect_timeout_s = 10;
  int channels = 1;  // gRPC channels (TCP connections), round-robin
  Slo slo;
  // > 0: the report also gives the latencies of the requests with prompts
  // shorter than this and of the others apart (Report::by_prompt).
  int64_t split_prompt_tokens = 0;
  // Called about once per progress_interval_s with a one-line status (from
  // the calling thread); null: silent.
  std::function<void(const std::string&)> progress;
  double progress_interval_s = 10;
};

// Checks the flags alone (no server): exactly one of rate and concurrency,
// a stop condition, positive lengths, a readable dataset, ...
absl::Status ValidateOptions(const LoadOptions& options);

struct BenchResult {
  ModelLimits model;
  std::vector<RequestRecord> records;  // in send order
  Report report;
};

// Connects, asks ModelInfo, prepares the workload (InvalidArgument when it
// does not fit the model), sends requests until the first of num_requests
// and duration_s, waits for the calls in flight (each bounded by
// request_timeout_s), and reports. A failed request is recorded, not
// returned as an error; errors are for runs that could not start.
absl::StatusOr<BenchResult> RunBenchmark(const LoadOptions& options);

}  // namespace strata::bench

#endif  // STRATA_BENCH_LOAD_GENERATOR_H_
