#include "common/metrics.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::metrics {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, RendersExactExpositionText) {
  Registry r;
  auto requests =
      r.RegisterCounter("strata_requests_total", "Requests finished, by reason", {"finish_reason"});
  ASSERT_TRUE(requests.ok()) << requests.status();
  auto stop = (*requests)->WithLabels({"stop"});
  auto length = (*requests)->WithLabels({"length"});
  ASSERT_TRUE(stop.ok() && length.ok());
  (*stop)->Increment();
  (*stop)->Increment(2);
  (*length)->Increment();

  auto queue = r.RegisterGauge("strata_queue_depth", "Requests waiting");
  ASSERT_TRUE(queue.ok());
  (*(*queue)->WithLabels({}))->Set(7);

  auto ttft =
      r.RegisterHistogram("strata_ttft_seconds", "Time to first token", {}, {0.25, 0.5, 1.0});
  ASSERT_TRUE(ttft.ok()) << ttft.status();
  Histogram* h = *(*ttft)->WithLabels({});
  // Binary-exact values so the sum prints exactly; 0.25 lands in le="0.25"
  // because bounds are inclusive.
  for (double v : {0.125, 0.25, 0.375, 0.75, 2.0}) h->Observe(v);

  EXPECT_EQ(r.RenderText(),
            "# HELP strata_queue_depth Requests waiting\n"
            "# TYPE strata_queue_depth gauge\n"
            "strata_queue_depth 7\n"
            "# HELP strata_requests_total Requests finished, by reason\n"
            "# TYPE strata_requests_total counter\n"
            "strata_requests_total{finish_reason=\"length\"} 1\n"
            "strata_requests_total{finish_reason=\"stop\"} 3\n"
            "# HELP strata_ttft_seconds Time to first token\n"
            "# TYPE strata_ttft_seconds histogram\n"
            "strata_ttft_seconds_bucket{le=\"0.25\"} 2\n"
            "strata_ttft_seconds_bucket{le=\"0.5\"} 3\n"
            "strata_ttft_seconds_bucket{le=\"1\"} 4\n"
            "strata_ttft_seconds_bucket{le=\"+Inf\"} 5\n"
            "strata_ttft_seconds_sum 3.5\n"
            "strata_ttft_seconds_count 5\n");
}

TEST(MetricsTest, LabeledHistogramPutsLeLast) {
  Registry r;
  auto fam = r.RegisterHistogram("lat_seconds", "Latency", {"model", "phase"}, {1.0});
  ASSERT_TRUE(fam.ok());
  Histogram* h = *(*fam)->WithLabels({"m", "decode"});
  h->Observe(0.5);
  h->Observe(1.5);
  EXPECT_EQ(r.RenderText(),
            "# HELP lat_seconds Latency\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{model=\"m\",phase=\"decode\",le=\"1\"} 1\n"
            "lat_seconds_bucket{model=\"m\",phase=\"decode\",le=\"+Inf\"} 2\n"
            "lat_seconds_sum{model=\"m\",phase=\"decode\"} 2\n"
            "lat_seconds_count{model=\"m\",phase=\"decode\"} 2\n");
}

TEST(MetricsTest, UnlabeledRendersZeroAndLabeledWithoutChildrenOnlyHeaders) {
  Registry r;
  ASSERT_TRUE(r.RegisterCounter("a_total", "").ok());
  ASSERT_TRUE(r.RegisterGauge("b", "B", {"x"}).ok());
  EXPECT_EQ(r.RenderText(),
            "# TYPE a_total counter\n"
            "a_total 0\n"
            "# HELP b B\n"
            "# TYPE b gauge\n");
}

TEST(MetricsTest, EscapesHelpAndLabelValues) {
  Registry r;
  auto fam = r.RegisterCounter("esc_total", "back\\slash\nnew \"quoted\"", {"v"});
  ASSERT_TRUE(fam.ok());
  (*(*fam)->WithLabels({"a\\b\"c\nd"}))->Increment();
  EXPECT_EQ(r.RenderText(),
            "# HELP esc_total back\\\\slash\\nnew \"quoted\"\n"
            "# TYPE esc_total counter\n"
            "esc_total{v=\"a\\\\b\\\"c\\nd\"} 1\n");
}

TEST(MetricsTest, UnicodeLabelValuesPassThrough) {
  Registry r;
  auto fam = r.RegisterGauge("g", "h", {"name"});
  ASSERT_TRUE(fam.ok());
  (*(*fam)->WithLabels({"Grüße ✓"}))->Set(1);
  EXPECT_THAT(r.RenderText(), HasSubstr("g{name=\"Grüße ✓\"} 1\n"));
}

TEST(MetricsTest, RejectsBadMetricNames) {
  Registry r;
  for (const std::string name : {"", "1abc", "a-b", "a b", "caf\xc3\xa9", "a{b}", "a\n"}) {
    auto s = r.RegisterCounter(name, "h");
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  EXPECT_TRUE(r.RegisterCounter("ok:name_1", "h").ok());
  EXPECT_TRUE(r.RegisterCounter("_leading", "h").ok());
  EXPECT_TRUE(IsValidMetricName("strata_ttft_seconds"));
  EXPECT_FALSE(IsValidMetricName("9"));
  EXPECT_TRUE(IsValidLabelName("finish_reason"));
  EXPECT_FALSE(IsValidLabelName("a:b"));  // colons are for metric names only
}

TEST(MetricsTest, RejectsBadLabelNames) {
  Registry r;
  EXPECT_EQ(r.RegisterGauge("g1", "h", {"1a"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterGauge("g2", "h", {"a:b"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterGauge("g3", "h", {"__reserved"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterGauge("g4", "h", {"x", "x"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterGauge("g5", "h", {""}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterHistogram("h1", "h", {"le"}, {1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // "le" is only reserved on histograms.
  EXPECT_TRUE(r.RegisterGauge("g6", "h", {"le"}).ok());
  // Help must be UTF-8 (an invalid byte would break the whole scrape).
  EXPECT_EQ(r.RegisterGauge("g7", "bad \xff").status().code(), absl::StatusCode::kInvalidArgument);
  // Failed registrations reserve nothing.
  EXPECT_TRUE(r.RegisterGauge("g1", "h", {"a"}).ok());
}

TEST(MetricsTest, RejectsDuplicatesAndSeriesClashes) {
  Registry r;
  ASSERT_TRUE(r.RegisterCounter("dup_total", "h").ok());
  EXPECT_EQ(r.RegisterCounter("dup_total", "h").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.RegisterGauge("dup_total", "h").status().code(), absl::StatusCode::kAlreadyExists);

  ASSERT_TRUE(r.RegisterHistogram("lat", "h", {}, {1}).ok());
  EXPECT_EQ(r.RegisterCounter("lat_count", "h").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.RegisterGauge("lat_bucket", "h").status().code(), absl::StatusCode::kAlreadyExists);

  ASSERT_TRUE(r.RegisterGauge("x_sum", "h").ok());
  auto clash = r.RegisterHistogram("x", "h", {}, {1});
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(clash.status().message()), HasSubstr("x_sum"));
}

TEST(MetricsTest, RejectsMismatchedLabelValues) {
  Registry r;
  auto fam = r.RegisterCounter("c_total", "h", {"a", "b"});
  ASSERT_TRUE(fam.ok());
  EXPECT_EQ((*fam)->WithLabels({"x"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*fam)->WithLabels({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*fam)->WithLabels({"x", "y", "z"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*fam)->WithLabels({"x", "\xc0\x80"}).status().code(),  // overlong NUL
            absl::StatusCode::kInvalidArgument);
  auto unlabeled = r.RegisterGauge("g", "h");
  ASSERT_TRUE(unlabeled.ok());
  EXPECT_EQ((*unlabeled)->WithLabels({"x"}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MetricsTest, WithLabelsReturnsStablePointers) {
  Registry r;
  auto fam = r.RegisterCounter("c_total", "h", {"a"});
  ASSERT_TRUE(fam.ok());
  Counter* first = *(*fam)->WithLabels({"x"});
  for (int i = 0; i < 100; ++i) ASSERT_TRUE((*fam)->WithLabels({std::to_string(i)}).ok());
  EXPECT_EQ(*(*fam)->WithLabels({"x"}), first);
}

TEST(MetricsTest, RejectsBadBuckets) {
  Registry r;
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(r.RegisterHistogram("h1", "h", {}, {2, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterHistogram("h2", "h", {}, {1, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterHistogram("h3", "h", {}, {1, nan}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.RegisterHistogram("h4", "h", {}, {-inf, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A trailing +Inf is implied anyway, so it is accepted and not doubled.
  auto with_inf = r.RegisterHistogram("h5", "h", {}, {1, inf});
  ASSERT_TRUE(with_inf.ok());
  EXPECT_EQ((*(*with_inf)->WithLabels({}))->bounds(), std::vector<double>{1});
  // No bounds at all: just the +Inf bucket.
  auto none = r.RegisterHistogram("h6", "h", {}, {});
  ASSERT_TRUE(none.ok());
  (*(*none)->WithLabels({}))->Observe(3);
  EXPECT_THAT(r.RenderText(), HasSubstr("h6_bucket{le=\"+Inf\"} 1\nh6_sum 3\nh6_count 1\n"));
}

TEST(MetricsTest, CounterIgnoresNegativeAndNanGaugeGoesBothWays) {
  Counter c;
  c.Increment(2.5);
  c.Increment(-1);
  c.Increment(std::numeric_limits<double>::quiet_NaN());
  EXPECT_EQ(c.Value(), 2.5);
  Gauge g;
  g.Increment();
  g.Increment(2);
  g.Decrement(4.5);
  EXPECT_EQ(g.Value(), -1.5);
  g.Set(10);
  EXPECT_EQ(g.Value(), 10);
}

TEST(MetricsTest, HistogramIgnoresNanAndCountsInfinity) {
  Registry r;
  auto fam = r.RegisterHistogram("h", "h", {}, {1});
  ASSERT_TRUE(fam.ok());
  Histogram* h = *(*fam)->WithLabels({});
  h->Observe(std::numeric_limits<double>::quiet_NaN());
  h->Observe(-5);  // below every bound: first bucket
  Histogram::Snapshot s = h->Read();
  EXPECT_EQ(s.count, 1u);
  EXPECT_EQ(s.cumulative, (std::vector<uint64_t>{1, 1}));
  EXPECT_EQ(s.sum, -5);
}

TEST(MetricsTest, FormatValueIsShortestRoundTripAndLocaleFree) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(1), "1");
  EXPECT_EQ(FormatValue(-2.5), "-2.5");
  EXPECT_EQ(FormatValue(0.1), "0.1");
  EXPECT_EQ(FormatValue(0.0025), "0.0025");
  EXPECT_EQ(FormatValue(1e-5), "1e-05");
  EXPECT_EQ(FormatValue(1e20), "1e+20");
  EXPECT_EQ(FormatValue(123456789), "123456789");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::quiet_NaN()), "NaN");
  const double x = 0.1 + 0.2;
  EXPECT_EQ(std::stod(FormatValue(x)), x);
}

TEST(MetricsTest, BucketHelpers) {
  auto exp = ExponentialBuckets(0.001, 2, 4);
  ASSERT_TRUE(exp.ok());
  ASSERT_EQ(exp->size(), 4u);
  EXPECT_DOUBLE_EQ((*exp)[0], 0.001);
  EXPECT_DOUBLE_EQ((*exp)[3], 0.008);
  EXPECT_FALSE(ExponentialBuckets(0, 2, 4).ok());
  EXPECT_FALSE(ExponentialBuckets(1, 1, 4).ok());
  EXPECT_FALSE(ExponentialBuckets(1, 2, 0).ok());
  EXPECT_FALSE(ExponentialBuckets(1, 1e300, 5).ok());  // overflows to inf

  auto lin = LinearBuckets(0, 0.5, 3);
  ASSERT_TRUE(lin.ok());
  EXPECT_EQ(*lin, (std::vector<double>{0, 0.5, 1}));
  EXPECT_FALSE(LinearBuckets(0, 0, 3).ok());
  EXPECT_FALSE(LinearBuckets(0, 1, -1).ok());

  Registry r;
  EXPECT_TRUE(r.RegisterHistogram("lat_seconds", "h", {}, LatencyBucketsSeconds()).ok());
  EXPECT_TRUE(r.RegisterHistogram("exp_seconds", "h", {}, *exp).ok());
}

TEST(MetricsTest, ConcurrentUpdatesSumExactly) {
  Registry r;
  auto counters = r.RegisterCounter("c_total", "h", {"t"});
  auto gauges = r.RegisterGauge("g", "h");
  auto hists = r.RegisterHistogram("h_seconds", "h", {}, {0.5, 1.5});
  ASSERT_TRUE(counters.ok() && gauges.ok() && hists.ok());
  Counter* shared = *(*counters)->WithLabels({"shared"});
  Gauge* gauge = *(*gauges)->WithLabels({});
  Histogram* hist = *(*hists)->WithLabels({});

  constexpr int kThreads = 8;
  constexpr int kIters = 50000;
  std::atomic<bool> done{false};
  // A renderer runs alongside, as the HTTP thread would during a scrape.
  std::thread renderer([&] {
    while (!done.load()) {
      const std::string text = r.RenderText();
      ASSERT_THAT(text, HasSubstr("# TYPE h_seconds histogram"));
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Children created concurrently too.
      Counter* own = *(*counters)->WithLabels({std::to_string(t % 2)});
      for (int i = 0; i < kIters; ++i) {
        shared->Increment();
        own->Increment();
        gauge->Increment(2);
        gauge->Decrement();
        hist->Observe(i % 3);  // 0, 1, 2 in turn
      }
    });
  }
  for (auto& th : threads) th.join();
  done = true;
  renderer.join();

  const double total = double{kThreads} * kIters;
  EXPECT_EQ(shared->Value(), total);
  EXPECT_EQ((*(*counters)->WithLabels({"0"}))->Value() + (*(*counters)->WithLabels({"1"}))->Value(),
            total);
  EXPECT_EQ(gauge->Value(), total);
  const Histogram::Snapshot s = hist->Read();
  EXPECT_EQ(s.count, static_cast<uint64_t>(total));
  // i % 3 over [0, kIters): zeros, ones, twos.
  const uint64_t zeros = kThreads * ((kIters + 2) / 3);
  const uint64_t ones = kThreads * ((kIters + 1) / 3);
  EXPECT_EQ(s.cumulative[0], zeros);
  EXPECT_EQ(s.cumulative[1], zeros + ones);
  EXPECT_EQ(s.cumulative[2], static_cast<uint64_t>(total));
  const uint64_t twos = static_cast<uint64_t>(total) - zeros - ones;
  EXPECT_EQ(s.sum, double(ones + 2 * twos));
}

}  // namespace
}  // namespace strata::metrics
