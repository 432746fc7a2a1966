// Tests of the load generator behind `strata bench serve`.
//
// Unit tests (no server): percentiles, goodput and the report, the Poisson
// arrival process, synthetic and dataset workloads, flag validation.
// Integration tests (BenchServe*): a `strata serve` child process on the
// tiny model, driven by RunBenchmark and by the strata binary.
#include "bench/load_generator.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/router/server_process.h"

namespace strata::bench {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// Statistics

TEST(PercentileTest, InterpolatesBetweenClosestRanks) {
  // The values numpy.percentile gives for the same samples.
  EXPECT_DOUBLE_EQ(Percentile({1, 2, 3, 4}, 50), 2.5);
  std::vector<double> ten;
  for (int i = 1; i <= 10; ++i) ten.push_back(i);
  EXPECT_DOUBLE_EQ(Percentile(ten, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(ten, 90), 9.1);
  EXPECT_NEAR(Percentile(ten, 99), 9.91, 1e-12);
  EXPECT_DOUBLE_EQ(Percentile(ten, 100), 10);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
}

TEST(PercentileTest, SummarizeSortsAndAverages) {
  const Distribution d = Summarize({5, 1, 4, 2, 3});
  EXPECT_EQ(d.count, 5);
  EXPECT_DOUBLE_EQ(d.mean, 3);
  EXPECT_DOUBLE_EQ(d.p50, 3);
  EXPECT_DOUBLE_EQ(d.p90, 4.6);
  EXPECT_DOUBLE_EQ(d.max, 5);
  EXPECT_EQ(Summarize({}).count, 0);
}

RequestRecord Ok(double start_s, double ttft_s, std::vector<double> itl_s, int64_t prompt = 10) {
  RequestRecord r;
  r.start_s = start_s;
  r.ttft_s = ttft_s;
  r.itl_s = std::move(itl_s);
  r.prompt_tokens = prompt;
  r.output_tokens = static_cast<int64_t>(r.itl_s.size()) + 1;
  double e2e = ttft_s;
  for (double v : r.itl_s) e2e += v;
  r.e2e_s = e2e;
  return r;
}

RequestRecord Failed(const std::string& status, const std::string& error) {
  RequestRecord r;
  r.status = status;
  r.error = error;
  return r;
}

TEST(GoodputTest, TtftAndMeanOrP99Itl) {
  // Mean ITL 20 ms, but one 100 ms stall among ten gaps: its p99 is ~93 ms.
  const RequestRecord stall =
      Ok(0, 0.050, {0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.100});
  Slo slo;
  slo.ttft_ms = 100;
  slo.itl_ms = 25;
  EXPECT_TRUE(MeetsSlo(stall, slo));
  slo.itl_stat = ItlStat::kP99;
  EXPECT_FALSE(MeetsSlo(stall, slo));
  slo.itl_ms = 95;
  EXPECT_TRUE(MeetsSlo(stall, slo));
  slo.ttft_ms = 40;
  EXPECT_FALSE(MeetsSlo(stall, slo));
  // One output token: no ITL, so only the TTFT objective applies.
  EXPECT_TRUE(MeetsSlo(Ok(0, 0.030, {}), slo));
  // A failed request is never good.
  EXPECT_FALSE(MeetsSlo(Failed("UNAVAILABLE", "down"), Slo{}));
}

TEST(ReportTest, CountsThroughputsAndGoodput) {
  std::vector<RequestRecord> records = {
      Ok(0.0, 0.010, {0.020, 0.020}),  // good
      Ok(1.0, 0.300, {0.020, 0.020}),  // TTFT too slow
      Ok(2.0, 0.010, {0.090, 0.090}),  // ITL too slow
      Ok(3.0, 0.020, {0.010, 0.010}),  // good
      Failed("RESOURCE_EXHAUSTED", "queue full"),
      Failed("RESOURCE_EXHAUSTED", "queue full"),
      Failed("DEADLINE_EXCEEDED", "Deadline Exceeded"),
  };
  Slo slo;
  slo.ttft_ms = 100;
  slo.itl_ms = 50;
  const Report r = BuildReport(records, /*duration_s=*/4.0, slo);
  EXPECT_EQ(r.issued, 7);
  EXPECT_EQ(r.completed, 4);
  EXPECT_EQ(r.failed, 3);
  EXPECT_EQ(r.failures.at("RESOURCE_EXHAUSTED"), 2);
  EXPECT_EQ(r.failures.at("DEADLINE_EXCEEDED"), 1);
  EXPECT_EQ(r.sample_errors.size(), 2u);  // distinct messages only
  EXPECT_EQ(r.input_tokens, 40);
  EXPECT_EQ(r.output_tokens, 12);
  EXPECT_DOUBLE_EQ(r.request_throughput, 1.0);
  EXPECT_DOUBLE_EQ(r.output_throughput, 3.0);
  EXPECT_DOUBLE_EQ(r.total_token_throughput, 13.0);
  EXPECT_EQ(r.good, 2);
  EXPECT_DOUBLE_EQ(r.goodput, 0.5);
  EXPECT_EQ(r.ttft_ms.count, 4);
  EXPECT_NEAR(r.ttft_ms.mean, 85, 1e-9);
  EXPECT_EQ(r.itl_ms.count, 8);
  EXPECT_NEAR(r.itl_ms.max, 90, 1e-9);
  ASSERT_EQ(r.ttft_p99_ms_by_quarter.size(), 4u);
  // Failed requests start at 0 but have no TTFT; the quarters hold one
  // completed request each.
  EXPECT_NEAR(r.ttft_p99_ms_by_quarter[0], 10, 1e-9);
  EXPECT_NEAR(r.ttft_p99_ms_by_quarter[1], 300, 1e-9);
  EXPECT_NEAR(r.ttft_p99_ms_by_quarter[3], 20, 1e-9);

  const nlohmann::json j = ReportToJson(r);
  EXPECT_EQ(j["completed"], 4);
  EXPECT_EQ(j["failures"]["RESOURCE_EXHAUSTED"], 2);
  EXPECT_DOUBLE_EQ(j["goodput"].get<double>(), 0.5);
  EXPECT_EQ(j["slo"]["itl_stat"], "mean");
  const std::string table = FormatReport(r);
  EXPECT_THAT(table, HasSubstr("RESOURCE_EXHAUSTED"));
  EXPECT_THAT(table, HasSubstr("goodput"));
  EXPECT_THAT(table, HasSubstr("TTFT"));
}

TEST(ReportTest, SplitsTheLatenciesOfShortAndLongPrompts) {
  std::vector<RequestRecord> records = {
      Ok(0.0, 0.010, {0.020, 0.020}, /*prompt=*/100),    // short
      Ok(0.5, 0.012, {0.040, 0.020}, /*prompt=*/1000),   // short
      Ok(1.0, 0.300, {0.150, 0.020}, /*prompt=*/16000),  // long: a 150 ms gap
      Failed("UNAVAILABLE", "down"),
  };
  Slo slo;
  slo.ttft_ms = 100;
  const Report r = BuildReport(records, 2.0, slo, /*split_prompt_tokens=*/4096);
  ASSERT_EQ(r.by_prompt.size(), 2u);
  EXPECT_EQ(r.by_prompt[0].name, "prompt < 4096");
  EXPECT_EQ(r.by_prompt[0].completed, 2);
  EXPECT_EQ(r.by_prompt[0].good, 2);
  EXPECT_NEAR(r.by_prompt[0].itl_ms.max, 40, 1e-9);
  EXPECT_NEAR(r.by_prompt[0].ttft_ms.mean, 11, 1e-9);
  EXPECT_EQ(r.by_prompt[1].completed, 1);
  EXPECT_EQ(r.by_prompt[1].good, 0);
  EXPECT_NEAR(r.by_prompt[1].itl_ms.max, 150, 1e-9);
  EXPECT_EQ(r.itl_ms.count, 6);  // the pooled figures are unchanged
  const nlohmann::json j = ReportToJson(r);
  EXPECT_EQ(j["split_prompt_tokens"], 4096);
  EXPECT_EQ(j["by_prompt"][1]["name"], "prompt >= 4096");
  EXPECT_DOUBLE_EQ(j["by_prompt"][1]["itl_ms"]["max"].get<double>(), 150);
  EXPECT_THAT(FormatReport(r), HasSubstr("prompt >= 4096: 1 completed, 0 met the objectives"));
  // Without a split, none.
  EXPECT_TRUE(BuildReport(records, 2.0, slo).by_prompt.empty());
  EXPECT_TRUE(ReportToJson(BuildReport(records, 2.0, slo))["by_prompt"].empty());
}

TEST(ReportTest, NoSloMeansNoGoodput) {
  const Report r = BuildReport({Ok(0, 0.01, {0.01})}, 1.0, Slo{});
  EXPECT_EQ(r.good, 0);
  EXPECT_TRUE(ReportToJson(r)["goodput"].is_null());
  EXPECT_THAT(FormatReport(r), ::testing::Not(HasSubstr("goodput")));
}

// ---------------------------------------------------------------------------
// Arrivals

TEST(PoissonArrivalsTest, MeanRateAndExponentialGaps) {
  const double rate = 20;
  const int n = 20000;
  PoissonArrivals arrivals(rate, /*seed=*/42);
  double sum = 0, sum_sq = 0;
  int within_mean = 0;
  for (int i = 0; i < n; ++i) {
    const double gap = arrivals.NextGapSeconds();
    ASSERT_GE(gap, 0);
    sum += gap;
    sum_sq += gap * gap;
    if (gap < 1 / rate) ++within_mean;
  }
  const double mean = sum / n;
  const double stddev = std::sqrt(sum_sq / n - mean * mean);
  // The sample mean's standard error is 1/(rate*sqrt(n)), ~0.7% here; 3%
  // leaves room for any seed.
  EXPECT_NEAR(n / sum, rate, rate * 0.03);
  // Exponential: the standard deviation equals the mean, and
  // P(gap < mean) = 1 - 1/e.
  EXPECT_NEAR(stddev / mean, 1.0, 0.05);
  EXPECT_NEAR(static_cast<double>(within_mean) / n, 1 - std::exp(-1.0), 0.02);
}

TEST(PoissonArrivalsTest, SeedMakesTheScheduleReproducible) {
  PoissonArrivals a(5, 7), b(5, 7), c(5, 8);
  bool differs = false;
  for (int i = 0; i < 100; ++i) {
    const double x = a.NextGapSeconds();
    EXPECT_EQ(x, b.NextGapSeconds());
    differs |= x != c.NextGapSeconds();
  }
  EXPECT_TRUE(differs);
}

// ---------------------------------------------------------------------------
// Workload

const ModelLimits kModelLimits{"tiny", /*context_length=*/2048, /*vocab_size=*/2048};

TEST(WorkloadTest, SyntheticLengthsAndIds) {
  auto w = Workload::Synthetic({100, 50, 0.2}, kModelLimits, 1);
  ASSERT_TRUE(w.ok()) << w.status();
  int64_t min_in = 1 << 30, max_in = 0;
  for (int i = 0; i < 500; ++i) {
    const PromptSpec p = w->Next();
    EXPECT_EQ(static_cast<int64_t>(p.ids.size()), p.prompt_tokens);
    EXPECT_GE(p.prompt_tokens, 80);
    EXPECT_LE(p.prompt_tokens, 120);
    EXPECT_GE(p.max_tokens, 40);
    EXPECT_LE(p.max_tokens, 60);
    EXPECT_TRUE(p.ignore_eos);
    for (int32_t id : p.ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, 2048);
    }
    min_in = std::min(min_in, p.prompt_tokens);
    max_in = std::max(max_in, p.prompt_tokens);
  }
  EXPECT_LT(min_in, 85);  // the jitter is used
  EXPECT_GT(max_in, 115);
  // No jitter: exact lengths.
  auto exact = Workload::Synthetic({16, 8, 0}, kModelLimits, 1);
  ASSERT_TRUE(exact.ok());
  const PromptSpec p = exact->Next();
  EXPECT_EQ(p.prompt_tokens, 16);
  EXPECT_EQ(p.max_tokens, 8);
}

TEST(WorkloadTest, SyntheticMustFitTheContext) {
  EXPECT_TRUE(Workload::Synthetic({1024, 1024, 0}, kModelLimits, 0).ok());
  auto too_long = Workload::Synthetic({1024, 1000, 0.1}, kModelLimits, 0);
  ASSERT_FALSE(too_long.ok());
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_long.status().message()), HasSubstr("context length is 2048"));
}

TEST(DatasetTest, ParsesJsonLinesSkippingBlankOnes) {
  std::istringstream in(
      "{\"prompt\": \"hello\", \"max_tokens\": 4}\n"
      "\n"
      "{\"prompt_ids\": [1, 2, 3], \"extra\": true}\n");
  auto entries = ParseDataset(in, "d.jsonl");
  ASSERT_TRUE(entries.ok()) << entries.status();
  ASSERT_EQ(entries->size(), 2u);
  EXPECT_EQ((*entries)[0].line, 1);
  EXPECT_EQ(*(*entries)[0].text, "hello");
  EXPECT_EQ((*entries)[0].max_tokens, 4);
  EXPECT_EQ((*entries)[1].line, 3);
  EXPECT_EQ((*entries)[1].ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ((*entries)[1].max_tokens, 0);
}

TEST(DatasetTest, ErrorsNameTheLine) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"prompt\": \"ok\"}\n{not json\n", "d.jsonl:2: not JSON"},
      {"{\"prompt\": \"ok\"}\n\n[1, 2]\n", "d.jsonl:3: expected a JSON object"},
      {"{\"max_tokens\": 3}\n", "d.jsonl:1: give exactly one of"},
      {"{\"prompt\": \"a\", \"prompt_ids\": [1]}\n", "d.jsonl:1: give exactly one of"},
      {"{\"prompt_ids\": [1, -2]}\n", "d.jsonl:1: \"prompt_ids\" holds -2"},
      {"{\"prompt_ids\": []}\n", "d.jsonl:1: \"prompt_ids\" must be a non-empty array"},
      {"{\"prompt\": \"a\", \"max_tokens\": 0}\n", "d.jsonl:1: \"max_tokens\" must be a positive"},
      {"{\"prompt\": 3}\n", "d.jsonl:1: \"prompt\" must be a string"},
      {"\n\n", "d.jsonl: no requests"},
  };
  for (const auto& [text, error] : cases) {
    std::istringstream in(text);
    auto entries = ParseDataset(in, "d.jsonl");
    ASSERT_FALSE(entries.ok()) << text;
    EXPECT_EQ(entries.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(std::string(entries.status().message()), HasSubstr(error)) << text;
  }
}

TEST(DatasetTest, WorkloadChecksTheModelAndCycles) {
  std::istringstream in(
      "{\"prompt\": \"four words long here\", \"max_tokens\": 4}\n"
      "{\"prompt_ids\": [5, 6]}\n");
  auto entries = ParseDataset(in, "d.jsonl");
  ASSERT_TRUE(entries.ok());
  const TokenCounter words = [](const std::string& text) -> absl::StatusOr<int64_t> {
    return static_cast<int64_t>(std::count(text.begin(), text.end(), ' ') + 1);
  };
  auto w = Workload::FromDataset(*entries, "d.jsonl", kModelLimits, 32, false, words);
  ASSERT_TRUE(w.ok()) << w.status();
  PromptSpec a = w->Next(), b = w->Next(), c = w->Next();
  EXPECT_EQ(a.text, "four words long here");
  EXPECT_EQ(a.prompt_tokens, 4);
  EXPECT_EQ(a.max_tokens, 4);
  EXPECT_FALSE(a.ignore_eos);
  EXPECT_EQ(b.ids, (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(b.max_tokens, 32);  // the default output length
  EXPECT_EQ(c.text, a.text);    // cycles

  // Against a small model: line 2 overflows the context, then the vocabulary.
  auto small =
      Workload::FromDataset(*entries, "d.jsonl", ModelLimits{"s", 16, 6}, 32, false, words);
  ASSERT_FALSE(small.ok());
  EXPECT_THAT(std::string(small.status().message()), HasSubstr("d.jsonl:2: token id 6 is outside"));
  auto short_ctx =
      Workload::FromDataset(*entries, "d.jsonl", ModelLimits{"s", 16, 100}, 32, false, words);
  ASSERT_FALSE(short_ctx.ok());
  EXPECT_THAT(std::string(short_ctx.status().message()),
              HasSubstr("d.jsonl:2: the prompt's 2 tokens + max_tokens 32 exceed"));
}

// ---------------------------------------------------------------------------
// Flags

LoadOptions ValidOptions() {
  LoadOptions o;
  o.server = "127.0.0.1:1";
  o.rate = 5;
  o.num_requests = 10;
  return o;
}

TEST(ValidateOptionsTest, ChecksEachFlag) {
  EXPECT_TRUE(ValidateOptions(ValidOptions()).ok());
  const auto error = [](LoadOptions o) { return std::string(ValidateOptions(o).message()); };
  LoadOptions o = ValidOptions();
  o.rate = -1;
  EXPECT_THAT(error(o), HasSubstr("--rate"));
  o = ValidOptions();
  o.concurrency = 4;
  EXPECT_THAT(error(o), HasSubstr("exactly one of --rate"));
  o.rate = 0;
  EXPECT_TRUE(ValidateOptions(o).ok());
  o.concurrency = 0;
  EXPECT_THAT(error(o), HasSubstr("exactly one of --rate"));
  o = ValidOptions();
  o.num_requests = 0;
  EXPECT_THAT(error(o), HasSubstr("--num-requests N and/or --duration S"));
  o.duration_s = 5;
  EXPECT_TRUE(ValidateOptions(o).ok());
  o = ValidOptions();
  o.synthetic.jitter = 1;
  EXPECT_THAT(error(o), HasSubstr("--len-jitter"));
  o = ValidOptions();
  o.synthetic.input_len = 0;
  EXPECT_THAT(error(o), HasSubstr("--input-len"));
  o = ValidOptions();
  o.dataset = "/nonexistent/file.jsonl";
  EXPECT_THAT(error(o), HasSubstr("--dataset: cannot read /nonexistent/file.jsonl"));
  o = ValidOptions();
  o.server = "localhost";
  EXPECT_THAT(error(o), HasSubstr("HOST:PORT"));
  o = ValidOptions();
  o.request_timeout_s = 0;
  EXPECT_THAT(error(o), HasSubstr("--request-timeout"));
}

// ---------------------------------------------------------------------------
// Integration: a real server

// The server under load: a `strata serve` child process (shared with the
// router tests).
constexpr const char* kBenchServerArgs[] = {"--grace-seconds", "5", nullptr};
class BenchServeTest : public testing_util::SharedServerTest<kBenchServerArgs> {};

TEST_F(BenchServeTest, OpenLoopRunCompletesEveryRequest) {
  LoadOptions o;
  o.server = server_->address();
  o.rate = 20;
  o.num_requests = 20;
  o.synthetic = {16, 8, 0};
  o.request_timeout_s = 60;
  o.slo.ttft_ms = 60000;
  o.slo.itl_ms = 60000;
  auto result = RunBenchmark(o);
  ASSERT_TRUE(result.ok()) << result.status();
  const Report& r = result->report;
  EXPECT_EQ(result->model.vocab_size, 2048);
  EXPECT_EQ(result->model.context_length, 2048);
  EXPECT_EQ(r.failed, 0) << FormatReport(r);
  EXPECT_EQ(r.completed, 20);
  EXPECT_EQ(r.output_tokens, 160);
  EXPECT_EQ(r.input_tokens, 320);
  EXPECT_EQ(r.itl_ms.count, 20 * 7);
  EXPECT_EQ(r.good, 20);
  // Sane latencies: positive, ordered, and far below the deadline.
  EXPECT_GT(r.ttft_ms.p50, 0);
  EXPECT_LT(r.ttft_ms.p99, 10000);
  EXPECT_LE(r.ttft_ms.p50, r.ttft_ms.p99);
  EXPECT_GE(r.e2e_ms.p50, r.ttft_ms.p50);
  EXPECT_GE(r.itl_ms.mean, 0);
  // 20 arrivals at 20/s take about a second to send.
  EXPECT_GT(r.duration_s, 0.3);
  EXPECT_LT(r.duration_s, 30);
  EXPECT_NEAR(r.request_throughput * r.duration_s, 20, 1e-6);
  for (const RequestRecord& rec : result->records) {
    EXPECT_TRUE(rec.ok()) << rec.status << ": " << rec.error;
    EXPECT_EQ(rec.output_tokens, 8);
    EXPECT_EQ(rec.prompt_tokens, 16);
    EXPECT_GE(rec.e2e_s, rec.ttft_s);
  }
}

TEST_F(BenchServeTest, ClosedLoopHoldsTheConcurrency) {
  LoadOptions o;
  o.server = server_->address();
  o.concurrency = 3;
  o.num_requests = 9;
  o.synthetic = {8, 4, 0};
  auto result = RunBenchmark(o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->report.completed, 9);
  EXPECT_EQ(result->report.failed, 0);
  EXPECT_EQ(result->report.max_in_flight, 3);
}

TEST_F(BenchServeTest, DeadlinesAreRecordedAsFailures) {
  LoadOptions o;
  o.server = server_->address();
  o.rate = 100;
  o.num_requests = 3;
  o.synthetic = {16, 1000, 0};
  o.request_timeout_s = 0.05;  // far less than 1000 tokens take
  auto result = RunBenchmark(o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->report.failed, 3);
  EXPECT_EQ(result->report.failures.at("DEADLINE_EXCEEDED"), 3);
}

TEST_F(BenchServeTest, RejectsAWorkloadLongerThanTheContext) {
  LoadOptions o;
  o.server = server_->address();
  o.rate = 1;
  o.num_requests = 1;
  o.synthetic = {2000, 100, 0};
  auto result = RunBenchmark(o);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("context length is 2048"));
}

TEST_F(BenchServeTest, DatasetOfTextAndIds) {
  const std::string path = ::testing::TempDir() + "/bench_dataset.jsonl";
  {
    std::ofstream out(path);
    out << "{\"prompt\": \"Return the number of\", \"max_tokens\": 5}\n"
        << "{\"prompt_ids\": [1, 2, 3, 4], \"max_tokens\": 3}\n";
  }
  LoadOptions o;
  o.server = server_->address();
  o.concurrency = 2;
  o.num_requests = 4;
  o.dataset = path;
  o.dataset_ignore_eos = true;
  auto result = RunBenchmark(o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->report.completed, 4);
  EXPECT_EQ(result->report.output_tokens, 2 * (5 + 3));
  EXPECT_EQ(result->records[0].prompt_tokens, 5);  // the server's count (with bos)
  EXPECT_EQ(result->records[1].prompt_tokens, 4);
}

// Runs a shell command; returns its exit status and fills `out` with its
// stdout and stderr.
int Shell(const std::string& command, std::string* out) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  const int status = pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(BenchServeTest, CommandPrintsTheTableAndWritesJson) {
  const std::string json_path = ::testing::TempDir() + "/bench_result.json";
  std::filesystem::remove(json_path);
  std::string out;
  const int rc = Shell(std::string(STRATA_BINARY) + " bench serve --server " + server_->address() +
                           " --rate 50 --num-requests 5 --input-len 8 --output-len 4 --quiet" +
                           " --slo-ttft-ms 60000 --slo-itl-ms 60000 --slo-itl-stat p99" +
                           " --fail-on-error --json " + json_path,
                       &out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("5 completed, 0 failed"));
  EXPECT_THAT(out, HasSubstr("goodput"));
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["completed"], 5);
  EXPECT_EQ(j["output_tokens"], 20);
  EXPECT_EQ(j["good"], 5);
  EXPECT_EQ(j["slo"]["itl_stat"], "p99");
  EXPECT_EQ(j["config"]["rate"], 50.0);
  EXPECT_EQ(j["model_info"]["vocab_size"], 2048);
}

TEST_F(BenchServeTest, CommandFailsOnErrorWhenAsked) {
  std::string out;
  const std::string base = std::string(STRATA_BINARY) + " bench serve --server " +
                           server_->address() +
                           " --rate 100 --num-requests 2 --input-len 8 --output-len 1000" +
                           " --request-timeout 0.05 --quiet";
  EXPECT_EQ(Shell(base, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("DEADLINE_EXCEEDED"));
  out.clear();
  EXPECT_EQ(Shell(base + " --fail-on-error", &out), 1) << out;
}

TEST_F(BenchServeTest, CommandValidatesFlags) {
  const std::string bench =
      std::string(STRATA_BINARY) + " bench serve --server " + server_->address();
  std::string out;
  EXPECT_EQ(Shell(bench + " --rate 0 --num-requests 1", &out), 2);
  EXPECT_THAT(out, HasSubstr("--rate must be > 0"));
  out.clear();
  EXPECT_EQ(Shell(bench + " --rate 1 --concurrency 2 --num-requests 1", &out), 2);
  EXPECT_THAT(out, HasSubstr("exactly one of --rate"));
  out.clear();
  EXPECT_EQ(Shell(bench + " --rate 1 --num-requests 1 --input-len 4000", &out), 2);
  EXPECT_THAT(out, HasSubstr("context length is 2048"));
  const std::string path = ::testing::TempDir() + "/bench_bad.jsonl";
  {
    std::ofstream f(path);
    f << "{\"prompt\": \"fine\"}\n{\"prompt\": \"broken\"\n";
  }
  out.clear();
  EXPECT_EQ(Shell(bench + " --rate 1 --num-requests 1 --dataset " + path, &out), 2);
  EXPECT_THAT(out, HasSubstr(path + ":2: not JSON"));
}

}  // namespace
}  // namespace strata::bench
