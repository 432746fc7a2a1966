#include "bench/load_generator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "strata/v1/generate.grpc.pb.h"

namespace strata::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

Clock::duration ToDuration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// How many error messages a report keeps: enough to diagnose, few enough to
// read.
constexpr size_t kMaxSampleErrors = 5;

const char* GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

nlohmann::json DistributionToJson(const Distribution& d) {
  return {{"count", d.count}, {"mean", d.mean}, {"p50", d.p50},
          {"p90", d.p90},     {"p99", d.p99},   {"max", d.max}};
}

const char* ItlStatName(ItlStat stat) { return stat == ItlStat::kMean ? "mean" : "p99"; }

std::string SloDescription(const Slo& slo) {
  std::vector<std::string> parts;
  if (slo.ttft_ms > 0) parts.push_back(absl::StrFormat("TTFT <= %g ms", slo.ttft_ms));
  if (slo.itl_ms > 0) {
    parts.push_back(absl::StrFormat("%s ITL <= %g ms", ItlStatName(slo.itl_stat), slo.itl_ms));
  }
  return absl::StrJoin(parts, ", ");
}

}  // namespace

// ---------------------------------------------------------------------------
// Statistics

double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

Distribution Summarize(std::vector<double> values) {
  Distribution d;
  if (values.empty()) return d;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  d.count = static_cast<int64_t>(values.size());
  d.mean = sum / static_cast<double>(values.size());
  d.p50 = Percentile(values, 50);
  d.p90 = Percentile(values, 90);
  d.p99 = Percentile(values, 99);
  d.max = values.back();
  return d;
}

bool MeetsSlo(const RequestRecord& record, const Slo& slo) {
  if (!record.ok()) return false;
  if (slo.ttft_ms > 0 && (record.ttft_s < 0 || record.ttft_s * 1e3 > slo.ttft_ms)) return false;
  if (slo.itl_ms > 0 && !record.itl_s.empty()) {
    double itl_s;
    if (slo.itl_stat == ItlStat::kMean) {
      double sum = 0;
      for (double v : record.itl_s) sum += v;
      itl_s = sum / static_cast<double>(record.itl_s.size());
    } else {
      std::vector<double> sorted = record.itl_s;
      std::sort(sorted.begin(), sorted.end());
      itl_s = Percentile(sorted, 99);
    }
    if (itl_s * 1e3 > slo.itl_ms) return false;
  }
  return true;
}

Report BuildReport(const std::vector<RequestRecord>& records, double duration_s, const Slo& slo,
                   int64_t split_prompt_tokens) {
  Report r;
  r.slo = slo;
  r.split_prompt_tokens = std::max<int64_t>(0, split_prompt_tokens);
  // Per class (shorter prompts, the others): ttft, itl, e2e.
  std::vector<std::array<std::vector<double>, 3>> by_class(r.split_prompt_tokens > 0 ? 2 : 0);
  if (r.split_prompt_tokens > 0) {
    r.by_prompt.resize(2);
    r.by_prompt[0].name = absl::StrCat("prompt < ", r.split_prompt_tokens);
    r.by_prompt[1].name = absl::StrCat("prompt >= ", r.split_prompt_tokens);
  }
  r.duration_s = duration_s;
  r.issued = static_cast<int64_t>(records.size());
  std::vector<double> ttft, itl, e2e;
  std::set<std::string> seen_errors;
  double last_start = 0;
  for (const RequestRecord& rec : records) last_start = std::max(last_start, rec.start_s);
  std::vector<std::vector<double>> ttft_by_quarter(4);
  for (const RequestRecord& rec : records) {
    if (!rec.ok()) {
      ++r.failed;
      ++r.failures[rec.status];
      const std::string message = absl::StrCat(rec.status, ": ", rec.error);
      if (r.sample_errors.size() < kMaxSampleErrors && seen_errors.insert(message).second) {
        r.sample_errors.push_back(message);
      }
      continue;
    }
    ++r.completed;
    r.input_tokens += rec.prompt_tokens;
    r.output_tokens += rec.output_tokens;
    if (!by_class.empty()) {
      const size_t c = rec.prompt_tokens < r.split_prompt_tokens ? 0 : 1;
      ++r.by_prompt[c].completed;
      if (slo.enabled() && MeetsSlo(rec, slo)) ++r.by_prompt[c].good;
      if (rec.ttft_s >= 0) by_class[c][0].push_back(rec.ttft_s * 1e3);
      for (double v : rec.itl_s) by_class[c][1].push_back(v * 1e3);
      by_class[c][2].push_back(rec.e2e_s * 1e3);
    }
    if (rec.ttft_s >= 0) {
      ttft.push_back(rec.ttft_s * 1e3);
      const size_t quarter =
          last_start > 0 ? std::min<size_t>(3, static_cast<size_t>(rec.start_s / last_start * 4))
                         : 0;
      ttft_by_quarter[quarter].push_back(rec.ttft_s * 1e3);
    }
    for (double v : rec.itl_s) itl.push_back(v * 1e3);
    e2e.push_back(rec.e2e_s * 1e3);
    if (slo.enabled() && MeetsSlo(rec, slo)) ++r.good;
  }
  if (duration_s > 0) {
    r.request_throughput = static_cast<double>(r.completed) / duration_s;
    r.output_throughput = static_cast<double>(r.output_tokens) / duration_s;
    r.total_token_throughput = static_cast<double>(r.input_tokens + r.output_tokens) / duration_s;
    r.goodput = static_cast<double>(r.good) / duration_s;
  }
  r.ttft_ms = Summarize(std::move(ttft));
  r.itl_ms = Summarize(std::move(itl));
  r.e2e_ms = Summarize(std::move(e2e));
  for (size_t c = 0; c < by_class.size(); ++c) {
    r.by_prompt[c].ttft_ms = Summarize(std::move(by_class[c][0]));
    r.by_prompt[c].itl_ms = Summarize(std::move(by_class[c][1]));
    r.by_prompt[c].e2e_ms = Summarize(std::move(by_class[c][2]));
  }
  for (auto& q : ttft_by_quarter) r.ttft_p99_ms_by_quarter.push_back(Summarize(std::move(q)).p99);
  return r;
}

std::string FormatReport(const Report& r) {
  std::string out;
  absl::StrAppendFormat(&out, "strata bench serve: %s (model %s), %s\n", r.server, r.model,
                        r.arrivals);
  absl::StrAppendFormat(&out, "  requests      %d sent, %d completed, %d failed\n", r.issued,
                        r.completed, r.failed);
  for (const auto& [status, count] : r.failures) {
    absl::StrAppendFormat(&out, "                  %-20s %d\n", status, count);
  }
  for (const std::string& e : r.sample_errors) absl::StrAppendFormat(&out, "    e.g. %s\n", e);
  absl::StrAppendFormat(&out, "  duration      %.2f s (first send to last response)\n",
                        r.duration_s);
  absl::StrAppendFormat(&out, "  tokens        %d input, %d output\n", r.input_tokens,
                        r.output_tokens);
  absl::StrAppendFormat(&out, "  throughput    %.2f req/s, %.1f output tok/s, %.1f total tok/s\n",
                        r.request_throughput, r.output_throughput, r.total_token_throughput);
  absl::StrAppendFormat(&out, "  %-12s %9s %9s %9s %9s %9s\n", "latency (ms)", "mean", "p50", "p90",
                        "p99", "max");
  const auto row = [&out](const char* name, const Distribution& d) {
    absl::StrAppendFormat(&out, "  %-12s %9.2f %9.2f %9.2f %9.2f %9.2f\n", name, d.mean, d.p50,
                          d.p90, d.p99, d.max);
  };
  row("TTFT", r.ttft_ms);
  row("ITL", r.itl_ms);
  row("E2E", r.e2e_ms);
  for (const Report::PromptClass& c : r.by_prompt) {
    absl::StrAppendFormat(&out, "  %s: %d completed", c.name, c.completed);
    if (r.slo.enabled()) absl::StrAppendFormat(&out, ", %d met the objectives", c.good);
    absl::StrAppendFormat(&out, "\n");
    row("  TTFT", c.ttft_ms);
    row("  ITL", c.itl_ms);
    row("  E2E", c.e2e_ms);
  }
  std::vector<std::string> quarters;
  for (double v : r.ttft_p99_ms_by_quarter) quarters.push_back(absl::StrFormat("%.2f", v));
  absl::StrAppendFormat(&out, "  TTFT p99 by quarter of the run (ms): %s\n",
                        absl::StrJoin(quarters, ", "));
  if (r.slo.enabled()) {
    absl::StrAppendFormat(&out, "  goodput       %.2f req/s (%d of %d requests met %s)\n",
                          r.goodput, r.good, r.issued, SloDescription(r.slo));
  }
  absl::StrAppendFormat(&out, "  client        max %d in flight, max send lag %.2f ms\n",
                        r.max_in_flight, r.max_send_lag_ms);
  return out;
}

nlohmann::json ReportToJson(const Report& r) {
  nlohmann::json j = {
      {"server", r.server},
      {"model", r.model},
      {"arrivals", r.arrivals},
      {"issued", r.issued},
      {"completed", r.completed},
      {"failed", r.failed},
      {"failures", r.failures},
      {"sample_errors", r.sample_errors},
      {"duration_s", r.duration_s},
      {"input_tokens", r.input_tokens},
      {"output_tokens", r.output_tokens},
      {"request_throughput", r.request_throughput},
      {"output_throughput", r.output_throughput},
      {"total_token_throughput", r.total_token_throughput},
      {"ttft_ms", DistributionToJson(r.ttft_ms)},
      {"itl_ms", DistributionToJson(r.itl_ms)},
      {"e2e_ms", DistributionToJson(r.e2e_ms)},
      {"ttft_p99_ms_by_quarter", r.ttft_p99_ms_by_quarter},
      {"max_send_lag_ms", r.max_send_lag_ms},
      {"max_in_flight", r.max_in_flight},
  };
  j["split_prompt_tokens"] = r.split_prompt_tokens;
  j["by_prompt"] = nlohmann::json::array();
  for (const Report::PromptClass& c : r.by_prompt) {
    j["by_prompt"].push_back({{"name", c.name},
                              {"completed", c.completed},
                              {"good", c.good},
                              {"ttft_ms", DistributionToJson(c.ttft_ms)},
                              {"itl_ms", DistributionToJson(c.itl_ms)},
                              {"e2e_ms", DistributionToJson(c.e2e_ms)}});
  }
  if (r.slo.enabled()) {
    j["slo"] = {{"ttft_ms", r.slo.ttft_ms},
                {"itl_ms", r.slo.itl_ms},
                {"itl_stat", ItlStatName(r.slo.itl_stat)}};
    j["good"] = r.good;
    j["goodput"] = r.goodput;
  } else {
    j["slo"] = nullptr;
    j["good"] = nullptr;
    j["goodput"] = nullptr;
  }
  return j;
}

// ---------------------------------------------------------------------------
// Arrivals

PoissonArrivals::PoissonArrivals(double rate_per_s, uint64_t seed)
    : rng_(seed), gap_(rate_per_s > 0 ? rate_per_s : 1.0) {}

double PoissonArrivals::NextGapSeconds() { return gap_(rng_); }

// ---------------------------------------------------------------------------
// Dataset

absl::StatusOr<std::vector<DatasetEntry>> ParseDataset(std::istream& in, const std::string& name) {
  std::vector<DatasetEntry> entries;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat(name, ":", line_no, ": ", why));
    };
    nlohmann::json j;
    // nlohmann reports parse errors by exception only; keep it inside.
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      return bad(absl::StrCat("not JSON: ", e.what()));
    }
    if (!j.is_object()) return bad("expected a JSON object");
    DatasetEntry entry;
    entry.line = line_no;
    const bool has_text = j.contains("prompt");
    const bool has_ids = j.contains("prompt_ids");
    if (has_text == has_ids) return bad("give exactly one of \"prompt\" and \"prompt_ids\"");
    if (has_text) {
      if (!j["prompt"].is_string()) return bad("\"prompt\" must be a string");
      entry.text = j["prompt"].get<std::string>();
      if (entry.text->empty()) return bad("\"prompt\" is empty");
    } else {
      const nlohmann::json& ids = j["prompt_ids"];
      if (!ids.is_array() || ids.empty()) return bad("\"prompt_ids\" must be a non-empty array");
      for (const nlohmann::json& id : ids) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
            id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
          return bad(absl::StrCat("\"prompt_ids\" holds ", id.dump(), ", not a token id"));
        }
        entry.ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
    }
    if (j.contains("max_tokens")) {
      const nlohmann::json& m = j["max_tokens"];
      if (!m.is_number_integer() || m.get<int64_t>() < 1) {
        return bad(absl::StrCat("\"max_tokens\" must be a positive integer, not ", m.dump()));
      }
      entry.max_tokens = m.get<int64_t>();
    }
    entries.push_back(std::move(entry));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(name, ": read error"));
  if (entries.empty()) return absl::InvalidArgumentError(absl::StrCat(name, ": no requests"));
  return entries;
}

absl::StatusOr<std::vector<DatasetEntry>> ReadDataset(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--dataset: cannot read ", path));
  return ParseDataset(in, path);
}

// ---------------------------------------------------------------------------
// Workload

namespace {

int64_t Scaled(int64_t len, double factor) {
  return std::max<int64_t>(1, std::llround(static_cast<double>(len) * factor));
}

}  // namespace

absl::StatusOr<Workload> Workload::Synthetic(const SyntheticSpec& spec, const ModelLimits& model,
                                             uint64_t seed) {
  const int64_t max_in = Scaled(spec.input_len, 1 + spec.jitter);
  const int64_t max_out = Scaled(spec.output_len, 1 + spec.jitter);
  if (max_in + max_out > model.context_length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--input-len %d and --output-len %d with --len-jitter %g reach %d + %d tokens; the "
        "model's context length is %d",
        spec.input_len, spec.output_len, spec.jitter, max_in, max_out, model.context_length));
  }
  if (model.vocab_size < 1) return absl::FailedPreconditionError("the model reports no vocabulary");
  Workload w;
  w.spec_ = spec;
  w.vocab_size_ = model.vocab_size;
  w.rng_.seed(seed);
  return w;
}

absl::StatusOr<Workload> Workload::FromDataset(std::vector<DatasetEntry> entries,
                                               const std::string& name, const ModelLimits& model,
                                               int64_t default_max_tokens, bool ignore_eos,
                                               const TokenCounter& count_tokens) {
  if (entries.empty()) return absl::InvalidArgumentError(absl::StrCat(name, ": no requests"));
  Workload w;
  for (DatasetEntry& e : entries) {
    const auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat(name, ":", e.line, ": ", why));
    };
    PromptSpec p;
    p.line = e.line;
    p.ignore_eos = ignore_eos;
    p.max_tokens = e.max_tokens > 0 ? e.max_tokens : default_max_tokens;
    if (e.text.has_value()) {
      absl::StatusOr<int64_t> n = count_tokens(*e.text);
      if (!n.ok()) return bad(absl::StrCat("cannot tokenize the prompt: ", n.status().message()));
      p.prompt_tokens = *n;
      p.text = std::move(*e.text);
    } else {
      for (int32_t id : e.ids) {
        if (id >= model.vocab_size) {
          return bad(absl::StrCat("token id ", id, " is outside the vocabulary [0, ",
                                  model.vocab_size, ")"));
        }
      }
      p.prompt_tokens = static_cast<int64_t>(e.ids.size());
      p.ids = std::move(e.ids);
    }
    if (p.prompt_tokens + p.max_tokens > model.context_length) {
      return bad(absl::StrCat("the prompt's ", p.prompt_tokens, " tokens + max_tokens ",
                              p.max_tokens, " exceed the model's context length ",
                              model.context_length));
    }
    w.entries_.push_back(std::move(p));
  }
  return w;
}

PromptSpec Workload::Next() {
  if (!entries_.empty()) {
    const PromptSpec& p = entries_[next_];
    next_ = (next_ + 1) % entries_.size();
    return p;
  }
  std::uniform_int_distribution<int64_t> in_len(Scaled(spec_.input_len, 1 - spec_.jitter),
                                                Scaled(spec_.input_len, 1 + spec_.jitter));
  std::uniform_int_distribution<int64_t> out_len(Scaled(spec_.output_len, 1 - spec_.jitter),
                                                 Scaled(spec_.output_len, 1 + spec_.jitter));
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab_size_ - 1));
  PromptSpec p;
  p.prompt_tokens = in_len(rng_);
  p.max_tokens = out_len(rng_);
  // Without ignore_eos a sampled end-of-sequence token would cut the output
  // short and the run would not measure the lengths it was asked for.
  p.ignore_eos = true;
  p.ids.reserve(static_cast<size_t>(p.prompt_tokens));
  for (int64_t i = 0; i < p.prompt_tokens; ++i) p.ids.push_back(token(rng_));
  return p;
}

// ---------------------------------------------------------------------------
// Options

absl::Status ValidateOptions(const LoadOptions& o) {
  const auto bad = [](const std::string& why) { return absl::InvalidArgumentError(why); };
  if (o.server.empty() || o.server.find(':') == std::string::npos) {
    return bad("--server must be HOST:PORT");
  }
  if (!(o.rate >= 0) || std::isinf(o.rate)) return bad("--rate must be a positive number");
  if (o.concurrency < 0) return bad("--concurrency must be at least 1");
  if ((o.rate > 0) == (o.concurrency > 0)) {
    return bad("give exactly one of --rate R (open loop) and --concurrency C (closed loop)");
  }
  if (o.num_requests < 0) return bad("--num-requests must be at least 1");
  if (!(o.duration_s >= 0) || std::isinf(o.duration_s)) return bad("--duration must be positive");
  if (o.num_requests == 0 && o.duration_s == 0) {
    return bad("give --num-requests N and/or --duration S (the run stops at the first reached)");
  }
  if (o.dataset.empty()) {
    if (o.synthetic.input_len < 1) return bad("--input-len must be at least 1");
    if (o.synthetic.output_len < 1) return bad("--output-len must be at least 1");
    if (!(o.synthetic.jitter >= 0 && o.synthetic.jitter < 1)) {
      return bad("--len-jitter must be in [0, 1)");
    }
  } else {
    std::ifstream in(o.dataset);
    if (!in) return bad(absl::StrCat("--dataset: cannot read ", o.dataset));
    if (o.synthetic.output_len < 1) return bad("--output-len must be at least 1");
  }
  if (!(o.temperature >= 0 && o.temperature <= 100))
    return bad("--temperature must be in [0, 100]");
  if (!(o.request_timeout_s > 0)) return bad("--request-timeout must be positive");
  if (!(o.connect_timeout_s > 0)) return bad("the connect timeout must be positive");
  if (o.channels < 1 || o.channels > 256) return bad("--channels must be in [1, 256]");
  if (!(o.slo.ttft_ms >= 0)) return bad("--slo-ttft-ms must be positive");
  if (!(o.slo.itl_ms >= 0)) return bad("--slo-itl-ms must be positive");
  if (!(o.progress_interval_s > 0)) return bad("the progress interval must be positive");
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The benchmark

namespace {

// The state shared by the sending thread and the calls' callbacks: the
// records, and how many calls are in flight.
// Thread-safe (one mutex).
class Tracker {
 public:
  explicit Tracker(Clock::time_point t0) : t0_(t0) {}

  Clock::time_point t0() const { return t0_; }

  // Reserves a record for a call about to be sent; returns its index.
  size_t Begin(RequestRecord record) {
    std::lock_guard<std::mutex> lock(mu_);
    records_.push_back(std::move(record));
    ++in_flight_;
    max_in_flight_ = std::max(max_in_flight_, in_flight_);
    return records_.size() - 1;
  }

  void Finish(size_t index, RequestRecord record, Clock::time_point when) {
    // Notify under the lock: once in_flight_ reaches 0 the waiting thread may
    // return and destroy this Tracker, so nothing may touch it after unlock.
    std::lock_guard<std::mutex> lock(mu_);
    if (!record.ok()) ++failed_;
    records_[index] = std::move(record);
    --in_flight_;
    ++done_;
    last_done_ = std::max(last_done_, when);
    cv_.notify_all();
  }

  // Waits until fewer than `limit` calls are in flight, or `until`.
  // Returns whether there is room.
  bool WaitForRoom(int64_t limit, Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_until(lock, until, [&] { return in_flight_ < limit; });
  }

  // Waits until no call is in flight, or `until`. Returns whether idle.
  bool WaitIdle(Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_until(lock, until, [&] { return in_flight_ == 0; });
  }

  std::string Progress(Clock::time_point now) {
    std::lock_guard<std::mutex> lock(mu_);
    return absl::StrFormat("[%6.1f s] sent %d, done %d (failed %d), in flight %d",
                           Seconds(now - t0_), records_.size(), done_, failed_, in_flight_);
  }

  // Moves the records out; call when idle.
  std::vector<RequestRecord> TakeRecords(double* duration_s, int64_t* max_in_flight) {
    std::lock_guard<std::mutex> lock(mu_);
    *duration_s = records_.empty() ? 0 : Seconds(last_done_ - t0_);
    *max_in_flight = max_in_flight_;
    return std::move(records_);
  }

 private:
  const Clock::time_point t0_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<RequestRecord> records_;
  int64_t in_flight_ = 0;
  int64_t max_in_flight_ = 0;
  int64_t done_ = 0;
  int64_t failed_ = 0;
  Clock::time_point last_done_ = t0_;
};

// One streaming Generate call on gRPC's callback API, so that sending never
// waits for a response: the reactions run on gRPC's threads and the object
// deletes itself when the call is done, after handing its record over.
class GenerateCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GenerateCall(Tracker* tracker, v1::GenerateRequest request, int64_t prompt_tokens)
      : tracker_(tracker), request_(std::move(request)) {
    record_.prompt_tokens = prompt_tokens;
  }

  void Start(v1::Generation::Stub* stub, double timeout_s) {
    context_.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::duration_cast<std::chrono::system_clock::duration>(
                              std::chrono::duration<double>(timeout_s)));
    start_ = Clock::now();
    record_.start_s = Seconds(start_ - tracker_->t0());
    index_ = tracker_->Begin(record_);
    stub->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const Clock::time_point now = Clock::now();
    const int n = response_.token_ids_size();
    if (n > 0) {
      if (record_.output_tokens == 0) {
        record_.ttft_s = Seconds(now - start_);
      } else {
        record_.itl_s.push_back(Seconds(now - last_token_));
      }
      // The response's other tokens arrived together with its first: a gap
      // of 0 each (see RequestRecord).
      for (int i = 1; i < n; ++i) record_.itl_s.push_back(0);
      record_.output_tokens += n;
      last_token_ = now;
    }
    if (response_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      finish_ = response_.finish_reason();
      finish_error_ = response_.error();
      if (response_.has_usage() && response_.usage().prompt_tokens() > 0) {
        record_.prompt_tokens = response_.usage().prompt_tokens();
      }
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    const Clock::time_point now = Clock::now();
    record_.e2e_s = Seconds(now - start_);
    if (!status.ok()) {
      record_.status = GrpcCodeName(status.error_code());
      record_.error = status.error_message();
    } else if (finish_ == v1::FINISH_REASON_ERROR) {
      record_.status = "FINISH_REASON_ERROR";
      record_.error = finish_error_;
    } else if (finish_ == v1::FINISH_REASON_CANCELLED) {
      record_.status = "FINISH_REASON_CANCELLED";
      record_.error = finish_error_;
    } else if (finish_ == v1::FINISH_REASON_UNSPECIFIED) {
      record_.status = "NO_FINISH_REASON";
      record_.error = "the stream ended without a finish reason";
    }
    // Delete this call (its ClientContext holds a reference to the channel)
    // before telling the tracker: once the tracker has the last record, the
    // sending thread may return and drop its channels, and the last
    // reference to a channel must not go away on this gRPC callback thread
    // (the channel's destructor then joins the very thread it runs on).
    Tracker* const tracker = tracker_;
    const size_t index = index_;
    RequestRecord record = std::move(record_);
    delete this;
    tracker->Finish(index, std::move(record), now);
  }

 private:
  Tracker* const tracker_;
  grpc::ClientContext context_;
  const v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  RequestRecord record_;
  size_t index_ = 0;
  Clock::time_point start_;
  Clock::time_point last_token_;
  v1::FinishReason finish_ = v1::FINISH_REASON_UNSPECIFIED;
  std::string finish_error_;
};

absl::Status FromGrpc(const grpc::Status& status, const std::string& what) {
  return absl::UnavailableError(
      absl::StrCat(what, ": ", GrpcCodeName(status.error_code()), ": ", status.error_message()));
}

std::chrono::system_clock::time_point DeadlineIn(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(
             std::chrono::duration<double>(seconds));
}

}  // namespace

absl::StatusOr<BenchResult> RunBenchmark(const LoadOptions& o) {
  STRATA_RETURN_IF_ERROR(ValidateOptions(o));
  // Read the dataset before connecting: its errors are the user's to fix
  // whether or not a server is up.
  std::vector<DatasetEntry> entries;
  if (!o.dataset.empty()) {
    STRATA_ASSIGN_OR_RETURN(entries, ReadDataset(o.dataset));
  }

  // Separate channels only make separate connections when they do not share
  // gRPC's global subchannel pool.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<v1::Generation::Stub>> stubs;
  for (int i = 0; i < o.channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channels.push_back(
        grpc::CreateCustomChannel(o.server, grpc::InsecureChannelCredentials(), args));
    stubs.push_back(v1::Generation::NewStub(channels.back()));
  }

  BenchResult result;
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(o.connect_timeout_s));
    context.set_wait_for_ready(true);
    v1::ModelInfoResponse info;
    const grpc::Status s = stubs[0]->ModelInfo(&context, v1::ModelInfoRequest(), &info);
    if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::UnavailableError(
          absl::StrFormat("no answer from %s within %g s; is `strata serve` running there?",
                          o.server, o.connect_timeout_s));
    }
    if (!s.ok()) return FromGrpc(s, absl::StrCat("ModelInfo from ", o.server));
    result.model.name = info.name();
    result.model.context_length = info.context_length();
    result.model.vocab_size = info.vocab_size();
  }
  // Connect every channel now, so that connection setup is not in the first
  // requests' latencies.
  for (auto& channel : channels) {
    if (!channel->WaitForConnected(DeadlineIn(o.connect_timeout_s))) {
      return absl::UnavailableError(absl::StrCat("cannot connect to ", o.server));
    }
  }

  absl::StatusOr<Workload> workload = absl::UnknownError("unset");
  if (o.dataset.empty()) {
    // A different seed from the arrivals', so that prompts and gaps are not
    // drawn from the same random sequence.
    workload = Workload::Synthetic(o.synthetic, result.model, o.seed ^ 0x9e3779b97f4a7c15ULL);
  } else {
    const TokenCounter count = [&](const std::string& text) -> absl::StatusOr<int64_t> {
      grpc::ClientContext context;
      context.set_deadline(DeadlineIn(o.request_timeout_s));
      v1::TokenizeRequest request;
      request.set_text(text);
      v1::TokenizeResponse response;
      const grpc::Status s = stubs[0]->Tokenize(&context, request, &response);
      if (!s.ok()) return FromGrpc(s, "Tokenize");
      return static_cast<int64_t>(response.token_ids_size());
    };
    workload = Workload::FromDataset(std::move(entries), o.dataset, result.model,
                                     o.synthetic.output_len, o.dataset_ignore_eos, count);
  }
  if (!workload.ok()) return workload.status();

  const Clock::time_point t0 = Clock::now();
  Tracker tracker(t0);
  const Clock::time_point stop_at =
      o.duration_s > 0 ? t0 + ToDuration(o.duration_s) : Clock::time_point::max();
  Clock::time_point next_progress = t0 + ToDuration(o.progress_interval_s);
  const auto tick = [&](Clock::time_point now) {
    if (now >= next_progress) {
      if (o.progress) o.progress(tracker.Progress(now));
      while (next_progress <= now) next_progress += ToDuration(o.progress_interval_s);
    }
  };
  const auto send = [&](int64_t i) {
    PromptSpec p = workload->Next();
    v1::GenerateRequest request;
    request.set_request_id(absl::StrCat("bench-", i));
    if (p.ids.empty()) {
      request.set_text(p.text);
    } else {
      request.mutable_token_ids()->mutable_ids()->Add(p.ids.begin(), p.ids.end());
    }
    request.mutable_sampling()->set_temperature(o.temperature);
    request.set_profile(o.profile);
    // A per-request seed keeps sampled runs reproducible.
    request.mutable_sampling()->set_seed(o.seed + static_cast<uint64_t>(i));
    request.mutable_stopping()->set_max_tokens(static_cast<uint32_t>(p.max_tokens));
    request.mutable_stopping()->set_ignore_eos(p.ignore_eos);
    auto* call = new GenerateCall(&tracker, std::move(request), p.prompt_tokens);
    call->Start(stubs[static_cast<size_t>(i) % stubs.size()].get(), o.request_timeout_s);
  };

  double max_lag_s = 0;
  if (o.rate > 0) {
    // Open loop: the schedule is fixed in advance (absolute times from t0),
    // so a slow send delays one request without shifting the later ones.
    PoissonArrivals arrivals(o.rate, o.seed);
    double offset_s = 0;
    for (int64_t i = 0; o.num_requests == 0 || i < o.num_requests; ++i) {
      if (i > 0) offset_s += arrivals.NextGapSeconds();
      const Clock::time_point when = t0 + ToDuration(offset_s);
      if (when >= stop_at) break;
      for (Clock::time_point now = Clock::now(); now < when; now = Clock::now()) {
        std::this_thread::sleep_until(std::min(when, next_progress));
        tick(Clock::now());
      }
      max_lag_s = std::max(max_lag_s, Seconds(Clock::now() - when));
      send(i);
    }
  } else {
    // Closed loop: a new request as soon as one finishes.
    for (int64_t i = 0; o.num_requests == 0 || i < o.num_requests; ++i) {
      bool room = false;
      while (!room && Clock::now() < stop_at) {
        room = tracker.WaitForRoom(o.concurrency, std::min(stop_at, next_progress));
        tick(Clock::now());
      }
      if (!room) break;
      send(i);
    }
  }
  // Every call has a deadline, so this wait ends.
  while (!tracker.WaitIdle(next_progress)) tick(Clock::now());

  double duration_s = 0;
  int64_t max_in_flight = 0;
  result.records = tracker.TakeRecords(&duration_s, &max_in_flight);
  result.report = BuildReport(result.records, duration_s, o.slo, o.split_prompt_tokens);
  result.report.server = o.server;
  result.report.model = result.model.name;
  result.report.arrivals = o.rate > 0 ? absl::StrFormat("poisson %g req/s", o.rate)
                                      : absl::StrFormat("concurrency %d", o.concurrency);
  absl::StrAppend(&result.report.arrivals, ", seed ", o.seed);
  if (o.num_requests > 0)
    absl::StrAppend(&result.report.arrivals, ", up to ", o.num_requests, " requests");
  if (o.duration_s > 0) {
    absl::StrAppend(&result.report.arrivals, absl::StrFormat(", up to %g s", o.duration_s));
  }
  result.report.max_send_lag_ms = max_lag_s * 1e3;
  result.report.max_in_flight = max_in_flight;
  return result;
}

}  // namespace strata::bench
